//! The commands on configs as transformers 5 writes them (`rope_parameters`), on a tokenizer with
//! ids past the model's vocabulary (the real Llama 3.2 one: `<|image|>` at 128256), and on prompts
//! past `max_position_embeddings`. References: transformers 4.57 (tests/python/model_ref.py).
mod common;

use std::path::{Path, PathBuf};

use common::here::{overfill_refused, overfill_output_ok};
use common::model::{
    case_model_dir, case_refs, max_abs_diff, model_ref, read_refs, to_5x, to_vec_i64,
};
use common::{llama32_tokenizer, read_json, stderr, write_calibration_data, write_json};
use serde_json::{json, Value};

/// The xorshift seed of the calibration rows (`write_calibration_data`).
const CALIBRATION_SEED: u64 = 0x2545F4914F6CDD1D;

/// And back: the 4.x spelling of a 5.x config, for transformers 4.57 to read.
fn to_4x(config: &Value) -> Value {
    let mut out = config.as_object().unwrap().clone();
    let mut params = out
        .remove("rope_parameters")
        .unwrap()
        .as_object()
        .unwrap()
        .clone();
    out.insert("rope_theta".into(), params.remove("rope_theta").unwrap());
    let scaling = if params["rope_type"] == "default" {
        Value::Null
    } else {
        Value::Object(params)
    };
    out.insert("rope_scaling".into(), scaling);
    Value::Object(out)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

#[cfg(unix)]
fn assert_ordinary_file_modes(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let probe = dir.with_extension("mode-probe");
    std::fs::write(&probe, "").unwrap();
    let expected = std::fs::metadata(&probe).unwrap().permissions().mode() & 0o777;
    std::fs::remove_file(&probe).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path: PathBuf = entry.unwrap().path();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode,
            expected,
            "{}: mode {mode:o}, a new file gets {expected:o}",
            path.display()
        );
    }
}

#[cfg(not(unix))]
fn assert_ordinary_file_modes(_dir: &Path) {}

#[test]
fn calibrate_prune_on_5x_config_keeps_its_rope_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("calib.json");
    write_calibration_data(&data, 24, 97, CALIBRATION_SEED);
    let ids = [5i64, 17, 33, 2, 90, 61, 8, 40, 12];
    let ids_arg = ids.map(|i| i.to_string()).join(",");
    let mut for_transformers = vec![];
    let mut ours = vec![];
    for case in ["llama3_tied", "qwen2_bias"] {
        let model = tmp.path().join(format!("{case}-5x"));
        copy_dir(&case_model_dir(case), &model);
        let source = to_5x(&read_json(&model.join("config.json")));
        write_json(&model.join("config.json"), &source);
        let out = tmp.path().join(format!("{case}-pruned"));
        overfill_output_ok(&[
            "calibrate-prune",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--calib-size",
            "16",
            "--batch-size",
            "8",
            "--max-seq-len",
            "32",
            "--device",
            "cpu",
            "--dtype",
            "f32",
            "--width-hidden",
            "0.25",
            "--width-intermediate",
            "0.5",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ]);
        let pruned = read_json(&out.join("config.json"));
        // RoPE settings equal the input's: same keys, same values, nothing in the 4.x spelling.
        assert_eq!(
            pruned["rope_parameters"], source["rope_parameters"],
            "{case}"
        );
        assert!(
            pruned.get("rope_theta").is_none() && pruned.get("rope_scaling").is_none(),
            "{case}: {pruned}"
        );
        assert_eq!(
            (
                pruned["hidden_size"].clone(),
                pruned["intermediate_size"].clone()
            ),
            (json!(48), json!(48))
        );
        assert_ordinary_file_modes(&out);

        // The pruned 5.x checkpoint runs with those settings: our logits equal transformers' on
        // the same weights with the config in the 4.x spelling.
        let as_4x = tmp.path().join(format!("{case}-pruned-4x"));
        copy_dir(&out, &as_4x);
        write_json(&as_4x.join("config.json"), &to_4x(&pruned));
        for_transformers.push(as_4x);
        let logits = tmp.path().join(format!("{case}-logits.safetensors"));
        overfill_output_ok(&[
            "generate",
            "--model",
            out.to_str().unwrap(),
            "--prompt-ids",
            &ids_arg,
            "--max-new-tokens",
            "1",
            "--logits",
            logits.to_str().unwrap(),
        ]);
        ours.push(read_refs(&logits).remove("logits").unwrap());
    }
    let refs_file = tmp.path().join("transformers.safetensors");
    let mut args = vec!["logits", ids_arg.as_str(), refs_file.to_str().unwrap()];
    args.extend(for_transformers.iter().map(|d| d.to_str().unwrap()));
    model_ref(&args);
    let refs = read_refs(&refs_file);
    for (i, ours) in ours.iter().enumerate() {
        let diff = max_abs_diff(ours, &refs[&format!("logits_{i}")]);
        assert!(
            diff <= 1e-4,
            "pruned checkpoint {i}: logits differ from transformers by {diff}"
        );
    }
}

#[test]
fn unsupported_settings_fail_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let edits: [(&str, fn(&mut Value), &str); 3] = [
        (
            "yarn",
            |c| c["rope_parameters"]["rope_type"] = json!("yarn"),
            "rope_parameters.rope_type",
        ),
        (
            "sliding",
            |c| c["use_sliding_window"] = json!(true),
            "use_sliding_window",
        ),
        ("mlp-bias", |c| c["mlp_bias"] = json!(true), "mlp_bias"),
    ];
    for (label, edit, key) in edits {
        let case = if label == "sliding" {
            "qwen2_bias"
        } else {
            "llama3_tied"
        };
        let model = tmp.path().join(label);
        copy_dir(&case_model_dir(case), &model);
        let mut config = to_5x(&read_json(&model.join("config.json")));
        edit(&mut config);
        write_json(&model.join("config.json"), &config);
        let err = overfill_refused(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            "1,2,3",
        ]);
        assert!(
            err.contains(key) && err.contains("config.json"),
            "{label}: {err}"
        );
        let err = overfill_refused(&[
            "init-model",
            "--config",
            model.join("config.json").to_str().unwrap(),
            "--out",
            tmp.path().join(format!("{label}-init")).to_str().unwrap(),
        ]);
        assert!(err.contains(key), "{label}: {err}");
    }
}

#[test]
fn tokenizer_ids_past_the_vocabulary_warn_at_load_and_are_refused_when_encoded() {
    let Some(tokenizer) = llama32_tokenizer() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // The real Llama 3.2 text vocabulary (128256) in the 5.x spelling, with a very small body.
    let config = tmp.path().join("config.json");
    std::fs::write(
        &config,
        r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":128256,"hidden_size":32,
            "intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "head_dim":16,"rms_norm_eps":1e-5,"tie_word_embeddings":true,"max_position_embeddings":131072,
            "rope_parameters":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
            "original_max_position_embeddings":8192,"rope_theta":500000.0,"rope_type":"llama3"},
            "bos_token_id":128000,"eos_token_id":[128001,128008,128009]}"#,
    )
    .unwrap();
    let model = tmp.path().join("model");
    let model_s = model.to_str().unwrap();
    let warned =
        |err: &str| err.contains("warning") && err.contains("128256") && err.contains("<|image|>");
    let init = overfill_output_ok(&[
        "init-model",
        "--config",
        config.to_str().unwrap(),
        "--out",
        model_s,
        "--seed",
        "3",
        "--std",
        "0.5",
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--dtype",
        "BF16",
    ]);
    assert!(warned(&stderr(&init)), "init-model: {}", stderr(&init));
    assert!(
        stderr(&init).contains("bf16") && !stderr(&init).contains("BF16"),
        "{}",
        stderr(&init)
    );
    let saved = read_json(&model.join("config.json"));
    assert_eq!(
        saved["rope_parameters"],
        read_json(&config)["rope_parameters"]
    );
    assert_ordinary_file_modes(&model);
    // Again over the same folder: the copied (read-only) fixture files are replaceable.
    overfill_output_ok(&[
        "init-model",
        "--config",
        config.to_str().unwrap(),
        "--out",
        model_s,
        "--tokenizer",
        tokenizer.to_str().unwrap(),
    ]);

    // Ordinary text works, with the same warning at load.
    let run = overfill_output_ok(&[
        "generate",
        "--model",
        model_s,
        "--prompt",
        "The quick brown fox",
        "--max-new-tokens",
        "2",
        "--json",
    ]);
    assert!(warned(&stderr(&run)), "generate: {}", stderr(&run));
    // Text that encodes to <|image|> is refused where it is encoded, naming the token.
    let err = overfill_refused(&[
        "generate",
        "--model",
        model_s,
        "--prompt",
        "Describe <|image|> please",
        "--max-new-tokens",
        "2",
    ]);
    assert!(
        err.contains("<|image|>") && err.contains("128256") && err.contains("the prompt"),
        "{err}"
    );
    let err = overfill_refused(&[
        "generate",
        "--model",
        model_s,
        "--prompt-ids",
        "128000,128256",
        "--max-new-tokens",
        "2",
    ]);
    assert!(
        err.contains("<|image|>") && err.contains("--prompt-ids"),
        "{err}"
    );

    // calibrate-prune agrees: the same pair only warns, and data holding the id is refused
    // naming the token.
    let data = tmp.path().join("calib.json");
    write_calibration_data(&data, 8, 128000, CALIBRATION_SEED);
    let args = |data: &Path, out: &Path| -> Vec<String> {
        [
            "calibrate-prune",
            "--model",
            model_s,
            "--data",
            data.to_str().unwrap(),
            "--calib-size",
            "8",
            "--batch-size",
            "4",
            "--max-seq-len",
            "16",
            "--device",
            "cpu",
            "--dtype",
            "f32",
            "--width-hidden",
            "0.5",
            "--width-intermediate",
            "0.5",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let pruned = tmp.path().join("pruned");
    let run = overfill_output_ok(
        &args(&data, &pruned)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(warned(&stderr(&run)), "calibrate-prune: {}", stderr(&run));
    assert_eq!(
        read_json(&pruned.join("config.json"))["rope_parameters"],
        saved["rope_parameters"]
    );
    let bad = tmp.path().join("bad.json");
    std::fs::write(
        &bad,
        "[[128000, 9906, 128256, 13], [128000, 9906], [1, 2], [3, 4]]",
    )
    .unwrap();
    let err = overfill_refused(
        &args(&bad, &tmp.path().join("pruned-bad"))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(err.contains("<|image|>") && err.contains("128256"), "{err}");
}

#[test]
fn generate_refuses_prompts_past_max_positions_warns_on_generation_past_them_and_echoes_canonical_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&case_model_dir("llama3_tied"), &model);
    let mut config = to_5x(&read_json(&model.join("config.json")));
    config["max_position_embeddings"] = json!(8);
    write_json(&model.join("config.json"), &config);
    let refs = case_refs("llama3_tied");
    let prompt: Vec<String> = to_vec_i64(&refs["prompt_ids"])
        .iter()
        .map(i64::to_string)
        .collect();
    assert!(prompt.len() > 8);
    let prompt = prompt.join(",");
    let model_s = model.to_str().unwrap();
    // A prompt that does not fit is refused, with or without --strict.
    let err = overfill_refused(&["generate", "--model", model_s, "--prompt-ids", &prompt, "--max-new-tokens", "2"]);
    assert!(err.contains("max_position_embeddings 8") && err.contains("11 tokens"), "{err}");
    // Generation past the limit is warned about; dtype and device are echoed canonically.
    let run = overfill_output_ok(&[
        "generate",
        "--model",
        model_s,
        "--prompt-ids",
        "5,6,7",
        "--max-new-tokens",
        "6",
        "--json",
        "--dtype",
        "BF16",
        "--device",
        "CPU",
    ]);
    let err = stderr(&run);
    assert!(err.contains("warning") && err.contains("max_position_embeddings 8"), "{err}");
    let out: Value = serde_json::from_str(String::from_utf8_lossy(&run.stdout).trim().lines().last().unwrap()).unwrap();
    assert_eq!(
        (out["dtype"].as_str(), out["device"].as_str()),
        (Some("bf16"), Some("cpu"))
    );
    // Prompt within the limit but generation past it: warned, refused with --strict.
    let err = overfill_refused(&[
        "generate",
        "--model",
        model_s,
        "--prompt-ids",
        "5,6,7",
        "--max-new-tokens",
        "6",
        "--strict",
    ]);
    assert!(
        err.contains("--max-new-tokens 6") && err.contains("max_position_embeddings 8"),
        "{err}"
    );
    let run = overfill_output_ok(&[
        "generate",
        "--model",
        model_s,
        "--prompt-ids",
        "5,6,7",
        "--max-new-tokens",
        "5",
        "--strict",
    ]);
    assert!(!stderr(&run).contains("warning"), "{}", stderr(&run));
}
