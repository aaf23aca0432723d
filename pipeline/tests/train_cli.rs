//! The `overfill train` / `overfill eval-loss` command-line contract on CPU f32 with a tiny random
//! Llama, its calibrate-pruned decoder and synthetic shards (chained as `just demo` chains them):
//! exact resume, accumulation vs batch size, the final decoder in transformers, bad input refused
//! before any work, and eval-loss equal to the trainer's own validation loss.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tch::Tensor;

mod common;
use common::{make_train_fixture, overfill_err, overfill_ok, python, repo_root, tiny_train_recipe, weights};

/// synth-data → preprocess → init-model → calibrate-prune, once per test binary.
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| make_train_fixture("train-cli-", &tiny_train_recipe("train-cli", "")))
}

/// One trained run (4 steps, overfill) shared by the tests that only read it.
fn trained() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = fixture();
        overfill_ok(dir, &["train", "--config", "recipe.toml", "--out", "trained", "--max-steps", "4"]);
        dir.join("trained")
    })
}

fn log_lines(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// (step, loss, grad_norm) of every logged training step.
fn train_losses(run: &Path) -> Vec<(u64, f64, f64)> {
    log_lines(run)
        .iter()
        .filter(|v| v.get("loss").is_some_and(|l| l.is_f64()))
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap(), v["grad_norm"].as_f64().unwrap()))
        .collect()
}

fn bytes(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[test]
fn resume_ends_with_the_same_decoder_as_an_uninterrupted_run() {
    let dir = fixture();
    let train = |out: &str, extra: &[&str]| {
        let mut args = vec!["train", "--config", "recipe.toml", "--out", out, "--save-steps", "2"];
        args.extend_from_slice(extra);
        overfill_ok(dir, &args);
    };
    train("whole", &["--max-steps", "6"]);
    train("halves", &["--max-steps", "3"]);
    assert!(dir.join("halves/checkpoint-3/trainer_state.json").is_file(), "a stopped run leaves a checkpoint at its last step");
    train("halves", &["--max-steps", "6", "--resume"]);

    let (whole, halves) = (dir.join("whole"), dir.join("halves"));
    assert_eq!(bytes(whole.join("final/model.safetensors")), bytes(halves.join("final/model.safetensors")), "final decoders differ");
    assert_eq!(
        bytes(whole.join("checkpoint-6/optimizer.safetensors")),
        bytes(halves.join("checkpoint-6/optimizer.safetensors")),
        "optimizer states differ"
    );
    // The resumed log holds each step once, with the uninterrupted run's numbers.
    assert_eq!(train_losses(&whole), train_losses(&halves));
    assert_eq!(train_losses(&whole).iter().map(|s| s.0).collect::<Vec<_>>(), (1..=6).collect::<Vec<_>>());
    // save_total_limit = 2 (the default): the newest two checkpoints stay.
    let mut kept: Vec<String> = std::fs::read_dir(&whole)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    kept.sort();
    assert_eq!(kept, ["checkpoint-4", "checkpoint-6"]);
    let state: serde_json::Value = serde_json::from_slice(&bytes(whole.join("checkpoint-6/trainer_state.json"))).unwrap();
    assert_eq!(state["step"], 6);
    assert_eq!(state["settings"]["per_device_batch_size"], 2);
    for file in ["config.json", "tokenizer.json"] {
        assert!(whole.join("final").join(file).is_file(), "final/ has {file}");
    }
    assert!(whole.join("resolved-recipe.toml").is_file());
    assert!(std::fs::read_dir(&whole).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("events.out.tfevents.")));

    // TensorBoard's own reader sees each step once, although steps 1..3 were logged by another
    // process, and the scalars of issue 8.
    let out = Command::new(python())
        .arg(repo_root().join("tests/python/read_events.py"))
        .arg(&halves)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(out.status.success(), "read_events.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let events: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps = |tag: &str| -> Vec<u64> {
        events["scalars"][tag].as_array().unwrap_or_else(|| panic!("no {tag} in {events}")).iter().map(|e| e[0].as_u64().unwrap()).collect()
    };
    for tag in ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/skipped_steps", "memory/rss_mib"] {
        assert_eq!(steps(tag), (1..=6).collect::<Vec<_>>(), "{tag}");
    }
    assert_eq!(steps("eval/loss"), [3, 6], "validation at the end of each part");
    let logged: Vec<f64> = events["scalars"]["train/loss"].as_array().unwrap().iter().map(|e| e[1].as_f64().unwrap()).collect();
    for ((_, loss, _), tb) in train_losses(&whole).iter().zip(&logged) {
        assert!((loss - tb).abs() <= 1e-6 * loss.abs(), "event file loss {tb} vs step log {loss}");
    }

    // The same folder again without --resume, or with another recipe: refused, nothing touched.
    let before = bytes(whole.join("final/model.safetensors"));
    let err = overfill_err(dir, &["train", "--config", "recipe.toml", "--out", "whole", "--max-steps", "6"]);
    assert!(err.contains("--resume"), "{err}");
    let err = overfill_err(dir, &["train", "--config", "recipe.toml", "--out", "whole", "--max-steps", "8", "--lr", "0.01", "--resume"]);
    assert!(err.contains("different recipe") && err.contains("learning_rate"), "{err}");
    assert_eq!(before, bytes(whole.join("final/model.safetensors")));
    assert_eq!(train_losses(&whole).len(), 6);
}

#[test]
fn accumulation_2_of_batch_2_equals_batch_4() {
    let dir = fixture();
    overfill_ok(dir, &["train", "--config", "recipe.toml", "--out", "accum", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "4"]);
    overfill_ok(dir, &["train", "--config", "recipe.toml", "--out", "batch", "--batch-size", "4", "--grad-accum", "1", "--max-steps", "4"]);
    let (a, b) = (train_losses(&dir.join("accum")), train_losses(&dir.join("batch")));
    assert_eq!(a.len(), 4);
    assert_eq!(a.len(), b.len());
    for ((step, la, ga), (_, lb, gb)) in a.iter().zip(&b) {
        assert!((la - lb).abs() <= 1e-5, "step {step}: loss {la} vs {lb}");
        assert!((ga - gb).abs() <= 1e-5 * ga.max(1.0), "step {step}: grad norm {ga} vs {gb}");
    }
    let (wa, wb) = (weights(&dir.join("accum/final")), weights(&dir.join("batch/final")));
    let initial = weights(&dir.join("pruned"));
    assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
    let mut moved = 0.0f64;
    for (name, ta) in &wa {
        let diff = (ta - &wb[name]).abs().max().double_value(&[]);
        assert!(diff <= 1e-5, "{name}: final weights differ by {diff}");
        moved = moved.max((ta - &initial[name]).abs().max().double_value(&[]));
    }
    assert!(moved > 1e-4, "training changed the decoder (max change {moved})");
}

#[test]
fn final_decoder_loads_in_transformers_with_equal_logits() {
    let run = trained();
    let ids = "1,40,41,42,50,60,70,80,90,100,110,120";
    let logits = run.join("final-logits.safetensors");
    overfill_ok(
        run,
        &["generate", "--model", "final", "--prompt-ids", ids, "--max-new-tokens", "1", "--dtype", "f32", "--device", "cpu", "--logits", logits.to_str().unwrap()],
    );
    let script = r#"
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
ids = torch.tensor([[int(x) for x in sys.argv[2].split(",")]])
with torch.no_grad():
    ref = model(ids).logits[0]
ours = load_file(sys.argv[3])["logits"]
assert ours.shape == ref.shape, (ours.shape, ref.shape)
print((ours - ref).abs().max().item())
"#;
    let out = Command::new(python())
        .args(["-c", script, run.join("final").to_str().unwrap(), ids, logits.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(out.status.success(), "transformers failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let diff: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(diff <= 1e-4, "logits of the trained decoder differ from transformers by {diff}");
}

#[test]
fn eval_loss_prints_json_equal_to_the_trainers_validation_loss() {
    let run = trained();
    let dir = fixture();
    let stdout = overfill_ok(
        dir,
        &[
            "eval-loss", "--full", "full", "--decoder", "trained/final", "--data", "shards", "--batch-size", "2", "--max-rows", "8",
            "--max-seq-length", "1024", "--device", "cpu", "--dtype", "f32", "--threads", "1", "--json",
        ],
    );
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let (loss, tokens) = (last["loss"].as_f64().unwrap(), last["tokens"].as_i64().unwrap());
    assert!(loss.is_finite() && loss > 0.0 && tokens > 0, "{last}");
    let trainer_eval = log_lines(run).into_iter().rev().find(|v| v.get("eval_loss").is_some()).expect("the run logged a validation loss");
    assert_eq!(trainer_eval["step"], 4, "validation loss at the end of the run");
    assert_eq!(trainer_eval["eval_tokens"].as_i64().unwrap(), tokens);
    assert!((trainer_eval["eval_loss"].as_f64().unwrap() - loss).abs() <= 1e-5, "{trainer_eval} vs {last}");

    // Rows cut to 300 tokens: the target loses its end, a row whose context leaves no room for two
    // target tokens is skipped. The counts, from the Parquet shards read by pyarrow:
    let script = r#"
import glob, json, sys
import pyarrow.parquet as pq
limit, tokens, rows, skipped = int(sys.argv[2]), 0, 0, 0
for path in sorted(glob.glob(sys.argv[1] + "/val-*.parquet")):
    table = pq.read_table(path)
    for context, target in zip(table.column("context_ids").to_pylist(), table.column("target_ids").to_pylist()):
        kept = min(len(target), limit - len(context))
        if kept >= 2:
            tokens, rows = tokens + kept - 1, rows + 1
        else:
            skipped += 1
print(json.dumps({"tokens": tokens, "rows": rows, "skipped_rows": skipped}))
"#;
    let out = Command::new(python()).args(["-c", script, dir.join("shards").to_str().unwrap(), "300"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stdout = overfill_ok(
        dir,
        &["eval-loss", "--full", "full", "--decoder", "trained/final", "--data", "shards", "--max-seq-length", "300", "--device", "cpu", "--dtype", "f32", "--json"],
    );
    let cut: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(expected["skipped_rows"].as_u64().unwrap() > 0 && expected["rows"].as_u64().unwrap() > 0, "{expected}");
    for key in ["tokens", "rows", "skipped_rows"] {
        assert_eq!(cut[key], expected[key], "{key}: ours {cut}, pyarrow {expected}");
    }

    // The pruned baseline: one model over context ‖ target, scored on the same tokens.
    overfill_ok(dir, &["train", "--config", "recipe.toml", "--mode", "pruned", "--out", "pruned-run", "--max-steps", "2"]);
    let stdout = overfill_ok(
        dir,
        &["eval-loss", "--mode", "pruned", "--decoder", "pruned-run/final", "--data", "shards", "--max-rows", "8", "--max-seq-length", "1024", "--device", "cpu", "--dtype", "f32", "--json"],
    );
    let pruned: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(pruned["tokens"].as_i64().unwrap(), tokens, "every mode scores the same tokens");
    assert!(pruned["loss"].as_f64().unwrap().is_finite());
}

#[test]
fn bad_input_is_refused_before_any_work() {
    let dir = fixture();
    let base: serde_json::Value = serde_json::from_slice(&bytes(repo_root().join("configs/models/tiny-llama.json"))).unwrap();
    let write_config = |name: &str, key: &str, value: i64| {
        let mut config = base.clone();
        config[key] = value.into();
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
        overfill_ok(dir, &["init-model", "--config", path.to_str().unwrap(), "--out", name, "--seed", "2"]);
    };
    write_config("two-layers", "num_hidden_layers", 2);
    write_config("small-vocab", "vocab_size", 256);
    // Shards with an empty split: preprocess with no validation rows (val empty), then the same
    // manifest with its splits swapped (train empty).
    overfill_ok(dir, &["synth-data", "--format", "openhermes", "--rows", "6", "--seed", "5", "--out", "few.json"]);
    let few = tiny_train_recipe("train-cli", "").replace("raw.json", "few.json").replace("val_size = 10", "val_size = 0").replace("\"shards\"", "\"few-shards\"");
    std::fs::write(dir.join("few.toml"), few).unwrap();
    overfill_ok(dir, &["preprocess", "--config", "few.toml"]);
    let err = overfill_err(dir, &["eval-loss", "--mode", "sft", "--decoder", "pruned", "--data", "few-shards", "--split", "val", "--json"]);
    assert!(err.contains("val split") && err.contains("no rows"), "{err}");
    let manifest_path = dir.join("few-shards/manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&bytes(manifest_path.clone())).unwrap();
    let train = manifest["train"].take();
    manifest["train"] = manifest["val"].take();
    manifest["val"] = train;
    std::fs::write(&manifest_path, serde_json::to_string(&manifest).unwrap()).unwrap();

    let cases: [(&str, Vec<&str>, Vec<&str>); 4] = [
        ("incompatible decoder", vec!["--decoder", "two-layers"], vec!["num_hidden_layers", "full model 4", "decoder 2"]),
        ("vocabulary larger than the model's", vec!["--mode", "sft", "--decoder", "small-vocab"], vec!["tokens", "vocab_size 256"]),
        ("empty train split", vec!["--data", "few-shards"], vec!["train split", "no rows"]),
        ("missing folder", vec!["--full", "no-such-model"], vec!["no-such-model", "does not exist"]),
    ];
    for (i, (what, flags, words)) in cases.iter().enumerate() {
        let out = format!("bad-{i}");
        let mut args = vec!["train", "--config", "recipe.toml", "--out", &out];
        args.extend(flags.iter().copied());
        let err = overfill_err(dir, &args);
        for word in words {
            assert!(err.contains(word), "{what}: {word:?} not in:\n{err}");
        }
        assert!(!dir.join(&out).exists(), "{what}: the run folder was created");
    }
    // A run folder that is one of the inputs (here the decoder, which also holds a resolved recipe).
    let err = overfill_err(dir, &["train", "--config", "recipe.toml", "--out", "pruned"]);
    assert!(err.contains("overlaps the decoder"), "{err}");
    assert!(!dir.join("pruned/final").exists() && !dir.join("pruned/log.jsonl").exists());
    let err = overfill_err(dir, &["eval-loss", "--full", "full", "--decoder", "two-layers", "--data", "shards", "--json"]);
    assert!(err.contains("num_hidden_layers"), "{err}");
}

#[test]
fn non_finite_steps_are_skipped_then_the_run_stops() {
    let dir = fixture();
    // lr 1e30: the first update makes every weight huge, every later loss is not finite.
    let err = overfill_err(
        dir,
        &["train", "--config", "recipe.toml", "--out", "diverged", "--lr", "1e30", "--max-steps", "10", "--set", "train.max_bad_steps=3"],
    );
    assert!(err.contains("3 optimizer steps in a row had a non-finite loss or gradient"), "{err}");
    let log = log_lines(&dir.join("diverged"));
    let last = log.last().unwrap();
    assert_eq!(last["step"], 4, "step 1 updates, steps 2-4 are skipped, then the run stops");
    assert_eq!(last["skipped_steps"], 3);
    assert!(!dir.join("diverged/final").exists(), "no final decoder from a diverged run");
}

#[test]
fn bf16_keeps_fp32_masters_and_tracks_the_f32_run() {
    let dir = fixture();
    overfill_ok(dir, &["train", "--config", "recipe.toml", "--out", "f32-run", "--max-steps", "3"]);
    overfill_ok(dir, &["train", "--config", "recipe.toml", "--out", "bf16-run", "--max-steps", "3", "--dtype", "bf16"]);
    let (f32_losses, bf16_losses) = (train_losses(&dir.join("f32-run")), train_losses(&dir.join("bf16-run")));
    assert_eq!(f32_losses.len(), 3);
    for ((step, a, _), (_, b, _)) in f32_losses.iter().zip(&bf16_losses) {
        assert!((a - b).abs() <= 0.02, "step {step}: f32 loss {a}, bf16 loss {b}");
    }
    let state: BTreeMap<String, Tensor> = Tensor::read_safetensors(dir.join("bf16-run/checkpoint-3/optimizer.safetensors")).unwrap().into_iter().collect();
    let decoder = weights(&dir.join("bf16-run/checkpoint-3"));
    for (name, weight) in &decoder {
        assert_eq!(weight.kind(), tch::Kind::BFloat16, "{name}");
        let master = &state[&format!("master.{name}")];
        assert_eq!(master.kind(), tch::Kind::Float, "{name}");
        assert_eq!(state[&format!("exp_avg.{name}")].kind(), tch::Kind::Float, "{name}");
        // The bf16 weights are the masters rounded.
        let rounded = master.to_kind(tch::Kind::BFloat16);
        assert!(rounded.equal(weight), "{name}: the bf16 copy is not the rounded master");
    }
}
