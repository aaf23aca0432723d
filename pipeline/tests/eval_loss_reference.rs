//! `overfill eval-loss` against a transformers reference on shards made with the real Llama-3.2
//! tokenizer (`shared/fixtures/llama-3.2-tokenizer`; skipped with a note when absent): a full
//! model and a narrower decoder with Llama 3.2's text vocabulary of 128256 (the tokenizer has one
//! more id, `<|image|>`, which the shards never use), in overfill and pruned modes.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{llama32_tokenizer, python, repo_root};

fn run_ok(cwd: &Path, program: &Path, args: &[&str]) -> String {
    let out = Command::new(program).current_dir(cwd).args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{} {} failed:\n{}",
        program.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("no output")).expect("JSON line")
}

#[test]
fn eval_loss_equals_transformers_on_real_tokenizer_shards() {
    let Some(tokenizer) = llama32_tokenizer() else {
        return;
    };
    let overfill = PathBuf::from(env!("CARGO_BIN_EXE_overfill"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // Models: the tiny Llama with the real text vocabulary, and a decoder of half its width
    // (same layers, heads, KV heads, head_dim and rope: it can read the full model's cache).
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo_root().join("configs/models/tiny-llama.json")).unwrap()).unwrap();
    config["vocab_size"] = 128256.into();
    config["hidden_size"] = 64.into();
    config["intermediate_size"] = 160.into();
    std::fs::write(dir.join("full.json"), config.to_string()).unwrap();
    config["hidden_size"] = 48.into();
    config["intermediate_size"] = 96.into();
    std::fs::write(dir.join("decoder.json"), config.to_string()).unwrap();
    run_ok(dir, &overfill, &["init-model", "--config", "full.json", "--out", "full", "--seed", "0", "--std", "0.05"]);
    run_ok(dir, &overfill, &["init-model", "--config", "decoder.json", "--out", "decoder", "--seed", "1", "--std", "0.05"]);

    run_ok(dir, &overfill, &["synth-data", "--format", "openhermes", "--rows", "24", "--seed", "3", "--out", "raw.json"]);
    let tokenizer = tokenizer.to_str().unwrap();
    run_ok(
        dir,
        &overfill,
        &["preprocess", "--input", "raw.json", "--format", "openhermes", "--tokenizer", tokenizer, "--template", "llama3", "--val-size", "6", "--out", "shards"],
    );

    for mode in ["overfill", "pruned"] {
        let mut ours_args = vec!["eval-loss", "--decoder", "decoder", "--data", "shards", "--split", "val", "--mode", mode];
        ours_args.extend(["--batch-size", "4", "--device", "cpu", "--dtype", "f32", "--json"]);
        let mut ref_args = vec!["tests/python/eval_loss_ref.py".to_string()];
        ref_args.extend(["--decoder", "decoder", "--shards", "shards", "--split", "val", "--mode", mode].map(String::from));
        if mode == "overfill" {
            ours_args.extend(["--full", "full"]);
            ref_args.extend(["--full".to_string(), "full".to_string()]);
        }
        let ours = last_json(&run_ok(dir, &overfill, &ours_args));
        let script = repo_root().join(&ref_args[0]);
        ref_args[0] = script.to_str().unwrap().to_string();
        let ref_args: Vec<&str> = ref_args.iter().map(String::as_str).collect();
        let theirs = last_json(&run_ok(dir, &python(), &ref_args));
        assert_eq!(ours["tokens"], theirs["tokens"], "{mode}: scored tokens");
        assert!(theirs["tokens"].as_i64().unwrap() > 50, "{mode}: too few tokens to compare: {theirs}");
        let (a, b) = (ours["loss"].as_f64().unwrap(), theirs["loss"].as_f64().unwrap());
        eprintln!("{mode}: overfill {a:.7} transformers {b:.7} over {} tokens", theirs["tokens"]);
        // A random model over 128256 ids: the loss is near ln(128256) ≈ 11.76.
        assert!((a - b).abs() < 1e-4, "{mode}: overfill {a} vs transformers {b}");
        assert!(a > 5.0, "{mode}: implausible loss {a}");
    }
}
