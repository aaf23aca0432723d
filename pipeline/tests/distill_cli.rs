//! `overfill distill` against transformers: a tiny model with the real Llama 3.2 tokenizer and chat
//! template answers prompts written with Python's `json.dump`; our batched answers (left-padded,
//! two per batch) equal transformers' greedy `generate()` of each prompt alone, in text, length and
//! whether the model stopped. Then a run stopped after its first part resumes to the same files, a
//! run with other settings is refused without touching the folder, and preprocess reads the output.
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::here::{overfill_ok, overfill_refused};
use common::model::python_script;
use common::{init_model_with_tokenizer, llama32_tokenizer, LLAMA32_VOCAB_TINY_CONFIG};
use serde_json::Value;

fn parts(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("part-") {
            files.insert(name, std::fs::read(&path).unwrap());
        }
    }
    files
}

fn rows(dir: &Path) -> Vec<Value> {
    parts(dir)
        .values()
        .flat_map(|bytes| String::from_utf8(bytes.clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect::<Vec<Value>>())
        .collect()
}

#[test]
fn distilled_answers_equal_transformers_greedy_and_resume() {
    let Some(tokenizer) = llama32_tokenizer() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = init_model_with_tokenizer(tmp.path(), LLAMA32_VOCAB_TINY_CONFIG, "5", &tokenizer);
    let (input, expected) = (tmp.path().join("prompts.json"), tmp.path().join("expected.json"));
    python_script("distill_ref.py", &[model.to_str().unwrap(), input.to_str().unwrap(), expected.to_str().unwrap(), "12"]);
    let expected: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&expected).unwrap()).unwrap();
    assert_eq!(expected.len(), 5, "the tool row has no prompt");
    assert!(expected.iter().any(|e| e["finished"] == false), "some answer must reach max_new_tokens");

    let distill = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["distill", "--model", model.to_str().unwrap(), "--input", input.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(["--out", out.to_str().unwrap(), "--max-new-tokens", "12", "--batch-size", "2"].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let out = tmp.path().join("distilled");
    let args = distill(&out, &[]);
    let summary: Value = serde_json::from_str(overfill_ok(&args.iter().map(String::as_str).collect::<Vec<_>>()).trim()).unwrap();
    assert_eq!(summary["raw_rows"], 6);
    assert_eq!(summary["unusable_rows"], 1);
    assert_eq!(summary["prompts"], 5);
    assert_eq!(summary["parts"], 3);

    let ours = rows(&out);
    let written: Vec<&Value> = expected.iter().filter(|e| !e["answer"].as_str().unwrap().trim().is_empty()).collect();
    assert_eq!(ours.len(), written.len());
    assert_eq!(summary["rows_written"], written.len());
    for (row, want) in ours.iter().zip(written) {
        let mut messages = want["messages"].as_array().unwrap().clone();
        messages.push(serde_json::json!({"role": "assistant", "content": want["answer"]}));
        assert_eq!(row["messages"], Value::Array(messages), "row {}", want["row_id"]);
        assert_eq!(row["distill"]["row_id"], want["row_id"]);
        assert_eq!(row["distill"]["finished"], want["finished"], "row {}", want["row_id"]);
        assert_eq!(row["distill"]["new_tokens"], want["new_tokens"], "row {}", want["row_id"]);
    }

    // A run stopped after its first part continues from there, to the same files.
    let resumed = tmp.path().join("resumed");
    let args = distill(&resumed, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_overfill"))
        .args(&args)
        .env("OVERFILL_TEST_DISTILL_STOP_AFTER_PARTS", "1")
        .output()
        .unwrap();
    assert!(!status.status.success());
    assert_eq!(parts(&resumed).len(), 1);
    let summary: Value = serde_json::from_str(overfill_ok(&args).trim()).unwrap();
    assert_eq!(summary["resumed_parts"], 1);
    assert_eq!(parts(&resumed), parts(&out));

    // Other settings into the same folder: refused, nothing touched.
    let before: BTreeMap<_, _> = common::paths_under(&out).into_iter().map(|p| (p.clone(), std::fs::read(&p).ok())).collect();
    let args = distill(&out, &["--drop-unfinished"]);
    let err = overfill_refused(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("other settings") && err.contains("drop_unfinished"), "{err}");
    let after: BTreeMap<_, _> = common::paths_under(&out).into_iter().map(|p| (p.clone(), std::fs::read(&p).ok())).collect();
    assert_eq!(before, after);

    // --limit: only the first rows are looked at.
    let limited = tmp.path().join("limited");
    let args = distill(&limited, &["--limit", "2"]);
    let summary: Value = serde_json::from_str(overfill_ok(&args.iter().map(String::as_str).collect::<Vec<_>>()).trim()).unwrap();
    assert_eq!((summary["raw_rows"].as_u64(), summary["prompts"].as_u64(), summary["parts"].as_u64()), (Some(2), Some(2), Some(1)));
    assert_eq!(rows(&limited), ours[..2].to_vec());

    // A prompt whose text encodes to an id past the embedding table is refused before any work.
    let image = tmp.path().join("image.jsonl");
    std::fs::write(&image, "{\"messages\": [{\"role\": \"user\", \"content\": \"Look: <|image|>\"}]}\n").unwrap();
    let refused = tmp.path().join("refused");
    let err = overfill_refused(&["distill", "--model", model.to_str().unwrap(), "--input", image.to_str().unwrap(), "--out", refused.to_str().unwrap()]);
    assert!(err.contains("<|image|>") && err.contains("input row 0"), "{err}");
    assert!(!refused.exists(), "nothing is written for a refused run");

    // preprocess reads the answers as conversations.
    let glob = format!("{}/part-*.jsonl", out.display());
    let shards = tmp.path().join("shards");
    let report: Value = serde_json::from_str(
        overfill_ok(&["preprocess", "--input", &glob, "--tokenizer", model.to_str().unwrap(), "--out", shards.to_str().unwrap()]).trim(),
    )
    .unwrap();
    assert_eq!(report["raw_rows"], ours.len());
    assert_eq!(report["train_rows"], ours.len(), "{report}");
}
