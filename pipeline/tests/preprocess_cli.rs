//! `overfill synth-data`, `preprocess` and `inspect` through the command line.
mod common;

use common::here::overfill;

#[test]
fn synth_preprocess_inspect() {
    let tmp = tempfile_dir();
    let dir = |p: &str| tmp.join(p).display().to_string();
    let out = overfill(&["synth-data", "--tokenizer-out", &dir("tok")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = overfill(&["synth-data", "--format", "openhermes", "--rows", "300", "--seed", "1", "--bad-every", "150", "--out", &dir("raw.json")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let args = ["preprocess", "--input", &dir("raw.json"), "--tokenizer", &dir("tok"), "--out", &dir("shards"), "--val-size", "20", "--rows-per-shard", "100"];
    let out = overfill(&args);
    // 2 of 300 rows malformed (0.67%) is under the default 1% threshold.
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["raw_rows"], 300);
    assert_eq!(summary["val_rows"], 20);
    assert_eq!(summary["train_rows"], 278);
    assert_eq!(summary["dropped"]["malformed"], 2);
    let again = overfill(&args);
    assert!(String::from_utf8_lossy(&again.stderr).contains("up to date"));
    let strict = overfill(&[&args[..], &["--max-bad-fraction", "0.001"]].concat());
    assert!(!strict.status.success(), "above the threshold must fail");
    let inspect = overfill(&["inspect", &dir("shards"), "--examples", "2"]);
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(text.contains("matches the manifest"), "{text}");
    assert_eq!(text.matches("⟦TARGET⟧").count(), 2);
    assert!(text.contains("<|start_header_id|>assistant<|end_header_id|>\n\n\u{1b}[7m⟦TARGET⟧"), "{text}");
    let _ = std::fs::remove_dir_all(&tmp);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("overfill-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
