//! The `overfill generate` and `overfill init-model` command-line contract, checked against
//! transformers (tests/python/model_ref.py).
mod common;

use std::path::Path;

use common::here::{overfill, overfill_ok};
use common::model::{max_abs_diff, model_ref, read_refs, reference_dir, to_vec_i64 as ids};
use common::{init_model_with_tokenizer, llama32_tokenizer};
use tch::{Kind, Tensor};

fn read(path: &Path) -> std::collections::HashMap<String, Tensor> {
    read_refs(path)
}

#[test]
fn prompt_ids_give_transformers_logits_and_greedy_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    for case in ["llama3_tied", "qwen2_bias"] {
        let model = reference_dir().join(case).join("model");
        let refs = read(&reference_dir().join(case).join("ref.safetensors"));
        let prompt: Vec<String> = ids(&refs["prompt_ids"])
            .iter()
            .map(i64::to_string)
            .collect();
        let logits_file = tmp.path().join(format!("{case}-logits.safetensors"));
        let stdout = overfill_ok(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            &prompt.join(","),
            "--max-new-tokens",
            "8",
            "--json",
            "--logits",
            logits_file.to_str().unwrap(),
        ]);
        let (out, ours) = parse_generate_json(&stdout);
        // The reference decodes 8 steps ignoring eos; ours stops after eos (id 2 in these configs).
        let expected = ids(&refs["greedy_ids"]);
        let cut = expected
            .iter()
            .position(|&t| t == 2)
            .map_or(expected.len(), |p| p + 1);
        assert_eq!(ours, expected[..cut].to_vec(), "{case}");
        for key in ["prefill_seconds", "decode_seconds_per_token"] {
            assert!(out[key].as_f64().unwrap() >= 0.0, "{case}: {key} in {out}");
        }
        let logits = read(&logits_file);
        assert_eq!(logits["logits"].kind(), Kind::Float);
        let diff = max_abs_diff(&logits["logits"], &refs["prompt_logits"]);
        assert!(
            diff <= 1e-4,
            "{case}: --logits differ from transformers by {diff}"
        );
    }
}

#[test]
fn text_prompt_with_init_model_checkpoint_matches_transformers() {
    let Some(tokenizer) = llama32_tokenizer() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // The real Llama 3.2 vocabulary with a very small body.
    let config = r#"{"model_type":"llama","vocab_size":128256,"hidden_size":32,"intermediate_size":64,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
            "rms_norm_eps":1e-5,"rope_theta":500000.0,"tie_word_embeddings":true,
            "rope_scaling":{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
    let model = init_model_with_tokenizer(tmp.path(), config, "3", &tokenizer);
    let model_s = model.to_str().unwrap();
    assert!(model.join("tokenizer.json").is_file() && model.join("model.safetensors").is_file());
    let text = "The quick brown fox jumps over the lazy dog.";
    let refs_file = tmp.path().join("refs.safetensors");
    model_ref(&["text-ref", model_s, text, "6", refs_file.to_str().unwrap()]);
    let refs = read(&refs_file);
    let logits_file = tmp.path().join("logits.safetensors");
    let stdout = overfill_ok(&[
        "generate",
        "--model",
        model_s,
        "--prompt",
        text,
        // The reference tokenizes the text as it is; --prompt alone applies the chat template.
        "--raw",
        "--max-new-tokens",
        "6",
        "--json",
        "--logits",
        logits_file.to_str().unwrap(),
    ]);
    let (out, ours) = parse_generate_json(&stdout);
    assert_eq!(ours, ids(&refs["greedy_ids"]));
    assert_eq!(
        out["prompt_tokens"].as_u64().unwrap() as i64,
        refs["prompt_ids"].size()[0]
    );
    let diff = max_abs_diff(&read(&logits_file)["logits"], &refs["logits"]);
    assert!(diff <= 1e-4, "logits differ from transformers by {diff}");
}

#[test]
fn bad_input_fails_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let out = overfill(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt-ids",
        "1,2",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.json not found") && !err.contains("panicked"),
        "{err}"
    );
    let out = overfill(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt-ids",
        "1,x",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not an integer token id"),
        "{err}"
    );
    let out = overfill(&["generate", "--model", tmp.path().to_str().unwrap()]);
    assert!(!out.status.success(), "a prompt is required");
    for sub in ["generate", "init-model"] {
        let help = overfill_ok(&[sub, "--help"]);
        assert!(
            help.contains("--model") || help.contains("--config"),
            "{help}"
        );
    }
}

/// The `--json` object of `overfill generate` and its generated `token_ids`.
fn parse_generate_json(stdout: &str) -> (serde_json::Value, Vec<i64>) {
    let out: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let token_ids = out["token_ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    (out, token_ids)
}
