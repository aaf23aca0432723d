//! End-to-end `overfill calibrate-prune` on a tiny random model (made by transformers), checking
//! the output directory, score reuse, recipes, --dry-run on the real model configs, and that bad
//! input ends in a clear error (no panic, no half-written output).
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{python, read_json, repo_root, write_calibration_data};
use serde_json::Value;

/// `overfill calibrate-prune ARGS`.
fn overfill(args: &[&str]) -> Output {
    common::here::overfill(&[&["calibrate-prune"][..], args].concat())
}

fn ok_json(out: &Output) -> Value {
    assert!(out.status.success(), "overfill failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON")
}

fn assert_clear_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure mentioning {needle:?}");
    assert!(stderr.contains(needle), "stderr lacks {needle:?}:\n{stderr}");
    assert!(!stderr.contains("panicked"), "panic instead of an error:\n{stderr}");
}

/// A small word-level tokenizer.json with `n` tokens (only its size matters here).
fn write_tokenizer(dir: &Path, n: usize) {
    let vocab: serde_json::Map<String, Value> = (0..n).map(|i| (format!("t{i}"), Value::from(i))).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"model_max_length": 512}"#).unwrap();
}

/// The xorshift seed of the calibration rows (`write_calibration_data`).
const CALIBRATION_SEED: u64 = 0x9E3779B97F4A7C15;

struct Fixture {
    dir: PathBuf,
    model: PathBuf,
    data: PathBuf,
}

fn fixture(name: &str) -> Option<Fixture> {
    let py = python();
    if !py.exists() {
        eprintln!("skipping: {} not found (run `just setup`)", py.display());
        return None;
    }
    let dir = std::env::temp_dir().join(format!("overfill-cp-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("model");
    let out = Command::new(&py)
        .arg(repo_root().join("tests/python/prune_ref.py"))
        .args(["make-model", "--out", model.to_str().unwrap(), "--seed", "7"])
        .output()
        .unwrap();
    assert!(out.status.success(), "make-model: {}", String::from_utf8_lossy(&out.stderr));
    write_tokenizer(&model, 250);
    let data = dir.join("calib.json");
    write_calibration_data(&data, 24, 250, CALIBRATION_SEED);
    Some(Fixture { dir, model, data })
}

#[test]
fn prunes_a_tiny_model_end_to_end_and_reuses_scores() {
    let Some(f) = fixture("e2e") else { return };
    let out_dir = f.dir.join("pruned");
    let common = [
        "--model", f.model.to_str().unwrap(), "--data", f.data.to_str().unwrap(), "--calib-size", "20", "--batch-size", "8",
        "--max-seq-len", "32", "--device", "cpu", "--dtype", "f32", "--json",
    ];
    let mut args = common.to_vec();
    args.extend(["--width-hidden", "0.25", "--width-intermediate", "0.5", "--out", out_dir.to_str().unwrap()]);
    let summary = ok_json(&overfill(&args));
    assert_eq!(summary["hidden_size"], 48);
    assert_eq!(summary["intermediate_size"], 64);

    let config = read_json(&out_dir.join("config.json"));
    assert_eq!(config["hidden_size"], 48);
    assert_eq!(config["intermediate_size"], 64);
    assert_eq!(config["head_dim"], 16);
    assert_eq!(config["num_attention_heads"], 4);
    assert_eq!(config["num_key_value_heads"], 2);
    for file in ["tokenizer.json", "tokenizer_config.json", "importance.safetensors"] {
        assert!(out_dir.join(file).is_file(), "{file} missing");
    }
    let report = read_json(&out_dir.join("pruning.json"));
    let hidden: Vec<i64> = serde_json::from_value(report["kept"]["hidden"].clone()).unwrap();
    let inter: Vec<Vec<i64>> = serde_json::from_value(report["kept"]["intermediate"].clone()).unwrap();
    assert_eq!(hidden.len(), 48);
    assert!(hidden.windows(2).all(|w| w[0] < w[1]) && *hidden.last().unwrap() < 64);
    assert_eq!(inter.len(), 2);
    assert!(inter.iter().all(|l| l.len() == 64 && l.windows(2).all(|w| w[0] < w[1])));
    // Parameter counts by hand: V·D (embed) + V·D (lm_head) + per layer attention + MLP + norms.
    let count = |d: u64, i: u64| 2 * 256 * d + 2 * (d * 64 * 2 + d * 32 * 2 + 3 * d * i + 2 * d) + d;
    assert_eq!(report["params_before"], count(64, 128));
    assert_eq!(report["params_after"], count(48, 64));
    assert_eq!(report["settings"]["calib_size"], 20);
    let (before, after) = (report["loss_before"].as_f64().unwrap(), report["loss_after"].as_f64().unwrap());
    assert!(before.is_finite() && after.is_finite() && before > 0.0 && after > 0.0, "{before} {after}");
    // Nothing staged is left next to the output.
    let leftovers: Vec<_> = std::fs::read_dir(&f.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());

    // transformers loads the pruned checkpoint.
    let logits = f.dir.join("logits.safetensors");
    let batches = f.dir.join("batches.json");
    std::fs::write(&batches, "[[[1, 2, 3, 4], [5, 6]]]").unwrap();
    let py = Command::new(python())
        .arg(repo_root().join("tests/python/prune_ref.py"))
        .args(["logits", "--model", out_dir.to_str().unwrap(), "--batches", batches.to_str().unwrap(), "--out", logits.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(py.status.success(), "transformers could not load the pruned model: {}", String::from_utf8_lossy(&py.stderr));

    // Reusing the saved scores (no calibration) gives the same channels; a rerun replaces the output.
    let reuse_dir = f.dir.join("pruned-again");
    let scores = out_dir.join("importance.safetensors");
    let mut args = common.to_vec();
    args.extend(["--width-hidden", "0.25", "--width-intermediate", "0.5", "--scores", scores.to_str().unwrap(), "--out", reuse_dir.to_str().unwrap()]);
    ok_json(&overfill(&args));
    ok_json(&overfill(&args));
    let again = read_json(&reuse_dir.join("pruning.json"));
    assert_eq!(again["kept"], report["kept"]);
    assert_eq!(again["loss_before"], report["loss_before"]);

    // Absolute width and rounding: hidden 0.3 -> 44 -> nearest multiple of 16 = 48; I 40 -> 48.
    let round_dir = f.dir.join("pruned-rounded");
    let mut args = common.to_vec();
    args.extend(["--width-hidden", "0.3", "--intermediate-size", "40", "--round-to", "16", "--scores", scores.to_str().unwrap(), "--out", round_dir.to_str().unwrap()]);
    let summary = ok_json(&overfill(&args));
    assert_eq!((summary["hidden_size"].as_u64(), summary["intermediate_size"].as_u64()), (Some(48), Some(48)));
    std::fs::remove_dir_all(&f.dir).unwrap();
}

#[test]
fn recipe_tables_supply_defaults_and_flags_override() {
    let Some(f) = fixture("recipe") else { return };
    let recipe = f.dir.join("recipe.toml");
    let out_dir = f.dir.join("out");
    std::fs::write(
        &recipe,
        format!(
            "[calibrate]\nmodel = {:?}\ndata = {:?}\ncalib_size = 16\nbatch_size = 4\nmax_seq_len = 24\nseq_agg = \"abs-mean\"\ndevice = \"cpu\"\ndtype = \"f32\"\n\n[prune]\nwidth_hidden = 0.5\nwidth_intermediate = 0.25\nout = {:?}\n",
            f.model, f.data, out_dir
        ),
    )
    .unwrap();
    let summary = ok_json(&overfill(&["--config", recipe.to_str().unwrap(), "--hidden-size", "40", "--json"]));
    assert_eq!(summary["hidden_size"], 40); // flag wins
    assert_eq!(summary["intermediate_size"], 96); // recipe
    let report = read_json(&out_dir.join("pruning.json"));
    assert_eq!(report["settings"]["seq_agg"], "abs-mean");
    assert_eq!(report["settings"]["calib_size"], 16);
    assert_eq!(report["settings"]["batch_size"], 4);
    std::fs::remove_dir_all(&f.dir).unwrap();
}

#[test]
fn dry_run_prints_table_1_numbers() {
    let config = repo_root().join("../shared/fixtures/model-configs/Llama-3.1-8B-Instruct.json");
    if !config.exists() {
        eprintln!("skipping: {} is absent", config.display());
        return;
    }
    let json = ok_json(&overfill(&["--dry-run", "--model-config", config.to_str().unwrap(), "--width-hidden", "0.43", "--width-intermediate", "0.43", "--json"]));
    assert_eq!(json["hidden_size"], 2334);
    assert_eq!(json["intermediate_size"], 8171);
    assert_eq!(json["params_before"], 8030261248u64);
    assert_eq!(json["params_after"], 3194482782u64);
    let out = overfill(&["--dry-run", "--model-config", config.to_str().unwrap(), "--width-hidden", "0.43", "--width-intermediate", "0.43"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3.19B") && text.contains("4096 -> 2334"), "{text}");
    let out = overfill(&["--dry-run", "--model-config", config.to_str().unwrap(), "--hidden-size", "5000", "--width-intermediate", "0.43"]);
    assert_clear_error(&out, "larger than the model");
}

#[test]
fn bad_input_gives_clear_errors() {
    let Some(f) = fixture("bad") else { return };
    let out_dir = f.dir.join("out");
    let run = |extra: &[&str], data: &Path, model: &Path| {
        let mut args = vec![
            "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--calib-size", "20", "--batch-size", "8",
            "--max-seq-len", "32", "--device", "cpu", "--dtype", "f32", "--out", out_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = overfill(&args);
        assert!(!out_dir.exists(), "a failed run left {}", out_dir.display());
        out
    };
    let widths = ["--width-hidden", "0.25", "--width-intermediate", "0.5"];
    assert_clear_error(&run(&["--width-hidden", "1.0", "--width-intermediate", "0.5"], &f.data, &f.model), "outside [0, 1)");
    assert_clear_error(&run(&["--width-hidden", "-0.2", "--width-intermediate", "0.5"], &f.data, &f.model), "outside [0, 1)");
    assert_clear_error(&run(&["--width-hidden", "0.25", "--intermediate-size", "500"], &f.data, &f.model), "larger than the model");
    // A whole number is not a ratio: absolute widths have their own flags.
    assert_clear_error(&run(&["--width-hidden", "1", "--width-intermediate", "0.5"], &f.data, &f.model), "use --hidden-size 1");
    assert_clear_error(&run(&["--width-hidden", "0.25", "--width-intermediate", "40"], &f.data, &f.model), "use --intermediate-size 40");
    assert_clear_error(&run(&["--width-hidden", "0.25"], &f.data, &f.model), "width-intermediate");
    assert_clear_error(&run(&[&widths[..], &["--seq-agg", "median"]].concat(), &f.data, &f.model), "median");

    let empty = f.dir.join("empty.json");
    std::fs::write(&empty, "[]").unwrap();
    assert_clear_error(&run(&widths, &empty, &f.model), "calibration set is empty");
    let short = f.dir.join("short.json");
    write_calibration_data(&short, 5, 250, CALIBRATION_SEED);
    assert_clear_error(&run(&widths, &short, &f.model), "fewer than one batch");
    let garbage = f.dir.join("garbage.json");
    std::fs::write(&garbage, "{\"not\": \"ids\"}").unwrap();
    assert_clear_error(&run(&widths, &garbage, &f.model), "garbage.json");
    let missing = f.dir.join("missing");
    assert_clear_error(&run(&widths, &missing, &f.model), "does not exist");
    let out_of_vocab = f.dir.join("oov.json");
    std::fs::write(&out_of_vocab, serde_json::to_string(&vec![vec![1u32, 2, 999]; 10]).unwrap()).unwrap();
    assert_clear_error(&run(&widths, &out_of_vocab, &f.model), "token id 999");

    // A tokenizer with more tokens than the model's embedding (vocab 256).
    let mismatched = f.dir.join("mismatched-model");
    std::fs::create_dir_all(&mismatched).unwrap();
    for entry in std::fs::read_dir(&f.model).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), mismatched.join(entry.file_name())).unwrap();
    }
    write_tokenizer(&mismatched, 300);
    // Loading only warns (real releases ship such tokenizers: Llama 3.2's <|image|>); data holding
    // an id the model cannot embed is refused, naming the token.
    let oov = f.dir.join("oov-named.json");
    std::fs::write(&oov, serde_json::to_string(&vec![vec![1u32, 2, 260]; 10]).unwrap()).unwrap();
    let out = run(&widths, &oov, &mismatched);
    assert_clear_error(&out, "token id 260 (\"t260\")");
    assert!(String::from_utf8_lossy(&out.stderr).contains("44 token ids the model cannot embed"));

    // Scores from another model are refused.
    let other_scores = f.dir.join("other.safetensors");
    std::fs::write(&other_scores, b"junk").unwrap();
    assert_clear_error(&run(&[&widths[..], &["--scores", other_scores.to_str().unwrap()]].concat(), &f.data, &f.model), "other.safetensors");

    // An existing directory that is not ours is never overwritten.
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("precious.txt"), "keep me").unwrap();
    let mut args = vec!["--model", f.model.to_str().unwrap(), "--data", f.data.to_str().unwrap(), "--out", out_dir.to_str().unwrap(), "--device", "cpu"];
    args.extend_from_slice(&widths);
    assert_clear_error(&overfill(&args), "refusing to overwrite");
    assert!(out_dir.join("precious.txt").is_file());
    std::fs::remove_dir_all(&f.dir).unwrap();
}
