//! config.json as transformers 4.x and 5.x write it: RoPE under `rope_theta` + `rope_scaling` or
//! under `rope_parameters`, read alike and written back in the source's spelling; settings that
//! would change the numerics and are not implemented are errors naming the key.
//!
//! The logits reference is transformers 4.57 on the checkpoints it saved with the 4.x keys
//! (tests/python/model_ref.py); the 5.x configs are those files rewritten with the keys exactly
//! as transformers 5.24 writes them (`../shared/fixtures/model-configs/`).
mod common;

use std::path::{Path, PathBuf};

use common::*;
use overfill_model::checkpoint::{load_config, save_checkpoint};
use overfill_model::config::{ModelConfig, RopeFormat, RopeScaling};
use overfill_model::prune::prune_config;
use overfill_model::transformer::Transformer;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

/// A copy of a reference checkpoint with its config.json edited.
fn copy_case(case: &str, edit: impl FnOnce(&Value) -> Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(case_model_dir(case)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let path = dir.path().join("config.json");
    let edited = edit(&read_json(&path));
    write_json(&path, &edited);
    dir
}

fn prompt_logits(model: &Transformer, prompt: &Tensor) -> Tensor {
    let t = prompt.size()[0];
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let mask = Tensor::ones([1, t], (Kind::Int64, Device::Cpu));
    model
        .forward(&prompt.unsqueeze(0), &positions, &mask, None)
        .unwrap()
        .squeeze_dim(0)
}

fn load(dir: &Path) -> Transformer {
    Transformer::load(dir, Device::Cpu, Kind::Float)
        .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
}

fn load_error(dir: &Path) -> String {
    match Transformer::load(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn five_x_configs_give_transformers_logits() {
    // llama3_tied: llama3 rope scaling with theta 5e5; qwen2_bias: default rope with theta 1e6.
    for (case, theta, llama3) in [("llama3_tied", 500000.0, true), ("qwen2_bias", 1e6, false)] {
        let refs = case_refs(case);
        let dir = copy_case(case, to_5x);
        let config = read_json(&dir.path().join("config.json"));
        assert!(config.get("rope_theta").is_none() && config.get("rope_scaling").is_none());
        let model = load(dir.path());
        assert_eq!(model.config.rope_format, RopeFormat::Parameters, "{case}");
        assert_eq!(model.config.rope_theta, theta, "{case}");
        assert_eq!(
            matches!(model.config.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0),
            llama3,
            "{case}: {:?}",
            model.config.rope_scaling
        );
        let ours = prompt_logits(&model, &refs["prompt_ids"]);
        let diff = max_abs_diff(&ours, &refs["prompt_logits"]);
        assert!(
            diff <= TOL,
            "{case}: 5.x config logits differ from transformers (4.x keys) by {diff}"
        );

        // The test can see a dropped rope_parameters: without it (theta 10000, no scaling) the
        // logits are far from transformers'.
        let dropped = copy_case(case, |c| {
            let mut c = to_5x(c);
            c.as_object_mut().unwrap().remove("rope_parameters");
            c
        });
        let wrong = prompt_logits(&load(dropped.path()), &refs["prompt_ids"]);
        let wrong_diff = max_abs_diff(&wrong, &refs["prompt_logits"]);
        assert!(
            wrong_diff > 100.0 * TOL,
            "{case}: rope settings do not show in the logits ({wrong_diff})"
        );
    }
}

#[test]
fn both_spellings_must_agree() {
    // Agreeing: loads, gives transformers' logits, and is written back with both spellings.
    let refs = case_refs("llama3_tied");
    let both = copy_case("llama3_tied", |c| {
        let mut out = to_5x(c);
        out["rope_theta"] = c["rope_theta"].clone();
        out["rope_scaling"] = c["rope_scaling"].clone();
        out
    });
    let model = load(both.path());
    assert_eq!(model.config.rope_format, RopeFormat::Both);
    let diff = max_abs_diff(
        &prompt_logits(&model, &refs["prompt_ids"]),
        &refs["prompt_logits"],
    );
    assert!(diff <= TOL, "{diff}");
    let written = model.config.to_hf_json();
    let source = read_json(&both.path().join("config.json"));
    for key in ["rope_theta", "rope_scaling", "rope_parameters"] {
        assert_eq!(written[key], source[key], "{key}");
    }

    // Disagreeing theta, or scaling (what the old writer produced: theta 10000 and a null
    // rope_scaling next to the original rope_parameters): an error naming both spellings.
    let edits: [fn(&mut Value); 3] = [
        |c| c["rope_theta"] = json!(10000.0),
        |c| c["rope_scaling"] = Value::Null,
        |c| c["rope_scaling"]["factor"] = json!(32.0),
    ];
    for edit in edits {
        let dir = copy_case("llama3_tied", |c| {
            let mut out = to_5x(c);
            out["rope_theta"] = c["rope_theta"].clone();
            out["rope_scaling"] = c["rope_scaling"].clone();
            edit(&mut out);
            out
        });
        let err = load_error(dir.path());
        assert!(
            err.contains("config.json")
                && err.contains("disagree")
                && err.contains("rope_parameters")
                && err.contains("rope_scaling")
                && err.contains("rope_theta"),
            "{err}"
        );
    }
}

/// (case, edit of the 5.x config, text the error must contain): settings that would change the
/// numerics and are not implemented.
fn unsupported_settings() -> Vec<(&'static str, Box<dyn Fn(&mut Value)>, &'static str)> {
    vec![
        (
            "llama3_tied",
            Box::new(|c: &mut Value| c["rope_parameters"]["rope_type"] = json!("yarn")),
            "unsupported rope_type \"yarn\"",
        ),
        (
            "llama3_tied",
            Box::new(|c: &mut Value| c["rope_parameters"]["rope_type"] = json!("longrope")),
            "rope_parameters.rope_type",
        ),
        (
            "qwen2_bias",
            Box::new(|c: &mut Value| {
                c["rope_parameters"] =
                    json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})
            }),
            "unsupported rope_type \"linear\"",
        ),
        (
            "qwen2_bias",
            Box::new(|c: &mut Value| {
                c["rope_parameters"] =
                    json!({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6})
            }),
            "rope_parameters.rope_type",
        ),
        (
            "qwen2_bias",
            Box::new(|c: &mut Value| c["rope_parameters"]["factor"] = json!(4.0)),
            "rope_parameters.factor",
        ),
        (
            "qwen2_bias",
            Box::new(|c: &mut Value| c["rope_parameters"]["partial_rotary_factor"] = json!(0.5)),
            "partial_rotary_factor",
        ),
        (
            "qwen2_bias",
            Box::new(|c: &mut Value| {
                c["use_sliding_window"] = json!(true);
                c["sliding_window"] = json!(4);
            }),
            "\"use_sliding_window\" = true",
        ),
        (
            "qwen2_bias",
            Box::new(|c: &mut Value| c["layer_types"][1] = json!("sliding_attention")),
            "\"layer_types\"",
        ),
        (
            "qwen2_bias",
            Box::new(|c: &mut Value| c["attention_bias"] = json!(false)),
            "\"attention_bias\"",
        ),
        (
            "llama3_tied",
            Box::new(|c: &mut Value| c["attention_bias"] = json!(true)),
            "\"attention_bias\"",
        ),
        (
            "llama3_tied",
            Box::new(|c: &mut Value| c["mlp_bias"] = json!(true)),
            "\"mlp_bias\"",
        ),
        (
            "llama3_tied",
            Box::new(|c: &mut Value| c["hidden_act"] = json!("gelu")),
            "\"hidden_act\"",
        ),
        (
            "llama3_tied",
            Box::new(|c: &mut Value| c["attention_dropout"] = json!(0.1)),
            "\"attention_dropout\"",
        ),
        (
            "llama3_tied",
            Box::new(|c: &mut Value| {
                c["architectures"] = json!(["LlamaForSequenceClassification"])
            }),
            "\"architectures\"",
        ),
        (
            "llama3_tied",
            Box::new(|c: &mut Value| {
                c["quantization_config"] = json!({"quant_method": "bitsandbytes"})
            }),
            "\"quantization_config\"",
        ),
        (
            "llama3_tied",
            Box::new(|c: &mut Value| {
                c["rope_parameters"] =
                    json!({"full_attention": {"rope_type": "default", "rope_theta": 1e4}})
            }),
            "rope_parameters",
        ),
    ]
}

#[test]
fn unimplemented_settings_are_errors_naming_the_key() {
    for (case, edit, needle) in unsupported_settings() {
        let dir = copy_case(case, |c| {
            let mut c = to_5x(c);
            edit(&mut c);
            c
        });
        let err = load_error(dir.path());
        assert!(
            err.contains("config.json") && err.contains(needle),
            "{case} {needle}: {err}"
        );
    }
    // The same in the 4.x spelling.
    let dir = copy_case("llama3_tied", |c| {
        let mut c = c.clone();
        c["rope_scaling"]["rope_type"] = json!("dynamic");
        c
    });
    let err = load_error(dir.path());
    assert!(
        err.contains("unsupported rope_type \"dynamic\"") && err.contains("rope_scaling.rope_type"),
        "{err}"
    );
    // Settings with no numerical effect in transformers 4.57 are accepted.
    let dir = copy_case("llama3_tied", |c| {
        let mut c = to_5x(c);
        c["pretraining_tp"] = json!(2);
        c["attention_dropout"] = json!(0.0);
        c
    });
    load(dir.path());
}

#[test]
fn saved_configs_keep_the_source_spelling_and_prune_only_widths() {
    let out = tempfile::tempdir().unwrap();
    for case in ["llama3_tied", "qwen2_bias"] {
        for (label, edit) in [
            ("4x", (|c: &Value| c.clone()) as fn(&Value) -> Value),
            ("5x", to_5x),
        ] {
            let src = copy_case(case, edit);
            let source = read_json(&src.path().join("config.json"));
            let model = load(src.path());
            let pruned = prune_config(&model.config, 48, 64).unwrap();
            let pruned_json = pruned.to_hf_json();
            // Pruning changes only the widths (and writes head_dim explicitly).
            for (key, value) in source.as_object().unwrap() {
                let expected = match key.as_str() {
                    "hidden_size" => json!(48),
                    "intermediate_size" => json!(64),
                    _ => value.clone(),
                };
                assert_eq!(pruned_json[key], expected, "{case} {label}: {key}");
            }
            let extra: Vec<&String> = pruned_json
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| source.get(k.as_str()).is_none())
                .collect();
            let allowed = ["head_dim", "attention_bias", "hidden_act", "torch_dtype"];
            assert!(
                extra.iter().all(|k| allowed.contains(&k.as_str())),
                "{case} {label}: added {extra:?}"
            );

            // A saved checkpoint: same spelling, loads back to the same rope, ordinary file modes.
            let dir = out.path().join(format!("{case}-{label}"));
            save_checkpoint(&dir, &model.config, &model.tensors(), u64::MAX).unwrap();
            let saved = read_json(&dir.join("config.json"));
            for key in ["rope_theta", "rope_scaling", "rope_parameters"] {
                assert_eq!(saved.get(key), source.get(key), "{case} {label}: {key}");
            }
            let reloaded = load_config(&dir).unwrap();
            assert_eq!(reloaded.rope_format, model.config.rope_format);
            assert_eq!(
                (reloaded.rope_theta, reloaded.rope_scaling),
                (model.config.rope_theta, model.config.rope_scaling)
            );
            check_ordinary_file_modes(&dir, out.path());
        }
    }
    // A config whose rope was changed in code is written canonically, still in its spelling.
    let src = copy_case("qwen2_bias", to_5x);
    let mut config = load_config(src.path()).unwrap();
    config.rope_theta = 2e6;
    let written = config.to_hf_json();
    assert_eq!(
        written["rope_parameters"],
        json!({"rope_type": "default", "rope_theta": 2e6})
    );
    assert!(written.get("rope_theta").is_none() && written.get("rope_scaling").is_none());
    let again = ModelConfig::from_json_str(&written.to_string()).unwrap();
    assert_eq!(again.rope_theta, 2e6);
}

/// Every file of `dir` has the mode a plain new file gets here (0666 modulo the umask).
#[cfg(unix)]
fn check_ordinary_file_modes(dir: &Path, scratch: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let probe = scratch.join("mode-probe");
    std::fs::write(&probe, "").unwrap();
    let expected = std::fs::metadata(&probe).unwrap().permissions().mode() & 0o777;
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
fn check_ordinary_file_modes(_dir: &Path, _scratch: &Path) {}

#[test]
fn real_configs_read_their_rope_parameters() {
    let dir = repo_root().join("../shared/fixtures/model-configs");
    // (file, theta, llama3 factor, params counted by transformers in checkpoint.rs's test)
    let cases = [
        ("Llama-3.2-3B-Instruct", 500000.0, Some(32.0)),
        ("Llama-3.1-8B-Instruct", 500000.0, Some(8.0)),
        ("Qwen2.5-14B-Instruct", 1e6, None),
    ];
    for (name, theta, factor) in cases {
        let path = dir.join(format!("{name}.json"));
        if !path.is_file() {
            eprintln!("skipping: fixture {} is absent", path.display());
            return;
        }
        let config = ModelConfig::from_file(&path).unwrap();
        let source = read_json(&path);
        assert_eq!(config.rope_format, RopeFormat::Parameters, "{name}");
        assert_eq!(config.rope_theta, theta, "{name}");
        match (config.rope_scaling, factor) {
            (RopeScaling::None, None) => {}
            (
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                },
                Some(expected),
            ) => {
                assert_eq!(
                    (
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings
                    ),
                    (expected, 1.0, 4.0, 8192),
                    "{name}"
                );
            }
            (other, _) => panic!("{name}: {other:?}"),
        }
        // Every key of the real configs is decided (see the table in config.rs).
        assert!(
            config.unread_keys().is_empty(),
            "{name}: {:?}",
            config.unread_keys()
        );
        let written = config.to_hf_json();
        assert_eq!(
            written["rope_parameters"], source["rope_parameters"],
            "{name}"
        );
        assert!(
            written.get("rope_theta").is_none() && written.get("rope_scaling").is_none(),
            "{name}"
        );
    }
}
