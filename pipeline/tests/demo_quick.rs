//! `scripts/demo.sh --quick` (what `just demo` runs, on less data) end to end into a temporary run
//! folder: the stages connect (tasks in both input formats with German rows filtered, a trained
//! tokenizer, a full model trained from scratch, shards, a pruned model at P = 0.5, the OverFill
//! decoder and the Pruned baseline trained with the same steps, evaluations, the table), and a rerun
//! skips every finished stage.
//!
//! And the paper's claim at this scale: OverFill's held-out target loss is below Pruned's, with the
//! same decoder size, data and steps (a short decoder fine-tuning next to the full model's training).
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{read_json, repo_root};

fn run_demo(root: &Path, work: &Path) -> String {
    let out = Command::new("bash")
        .arg(root.join("scripts/demo.sh"))
        .args(["--quick", "--out"])
        .arg(work)
        .env("OVERFILL_BIN", env!("CARGO_BIN_EXE_overfill"))
        .output()
        .expect("run bash scripts/demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "scripts/demo.sh --quick failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Held-out target loss of a system in the run's summary.json.
fn target_loss(summary: &serde_json::Value, system: &str) -> f64 {
    summary["systems"][system]["target_loss"].as_f64().unwrap_or_else(|| panic!("{system} loss in {summary}"))
}

#[test]
fn demo_quick_connects_the_stages_and_overfill_beats_pruned() {
    let root = repo_root();
    let tmp = tempfile::tempdir().expect("temp dir");
    let work: PathBuf = tmp.path().join("demo");
    let stdout = run_demo(&root, &work);

    // Data: both formats, German rows dropped by the language filter, held-out prompts.
    assert!(work.join("raw/tasks.json").is_file() && work.join("raw/tasks-infinity.parquet").is_file());
    let manifest = read_json(&work.join("shards/manifest.json"));
    let manifest_text = manifest.to_string();
    assert!(manifest_text.contains("\"language\""), "no rows dropped for their language: {manifest_text}");
    let heldout = std::fs::read_to_string(work.join("heldout.jsonl")).expect("heldout.jsonl");
    assert_eq!(heldout.lines().count(), 100);

    // The trained tokenizer is the one every model folder carries.
    let tokenizer = std::fs::read(work.join("tokenizer/tokenizer.json")).expect("tokenizer");
    for model in ["runs/full/final", "pruned", "runs/overfill/final", "runs/pruned/final"] {
        assert_eq!(std::fs::read(work.join(model).join("tokenizer.json")).ok().as_ref(), Some(&tokenizer), "{model}");
    }
    // Pruned at P = 0.5 from the full model; both decoders keep the pruned shapes.
    let full = read_json(&work.join("runs/full/final/config.json"));
    let pruned = read_json(&work.join("pruned/config.json"));
    assert_eq!(pruned["hidden_size"].as_u64().unwrap() * 2, full["hidden_size"].as_u64().unwrap());
    assert_eq!(pruned["num_hidden_layers"], full["num_hidden_layers"]);
    for run in ["runs/overfill/final", "runs/pruned/final"] {
        assert_eq!(read_json(&work.join(run).join("config.json"))["hidden_size"], pruned["hidden_size"], "{run}");
    }
    // Same steps for both decoders (each run's log ends at the same step), TensorBoard events.
    let last_step = |run: &str| -> u64 {
        let log = std::fs::read_to_string(work.join(run).join("log.jsonl")).expect("log.jsonl");
        log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64()).max().expect("steps")
    };
    assert_eq!(last_step("runs/overfill"), last_step("runs/pruned"));
    for run in ["runs/full", "runs/overfill", "runs/pruned"] {
        let events = std::fs::read_dir(work.join(run)).unwrap().filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().starts_with("events.out.tfevents"));
        assert!(events, "no TensorBoard events in {run}");
    }

    // Every system was scored on the same held-out target tokens; same decoder size for both.
    let summary = read_json(&work.join("summary.json"));
    for system in ["full", "pruned", "overfill"] {
        let loss = target_loss(&summary, system);
        assert!(loss.is_finite() && loss > 0.0, "{system}: {loss}");
    }
    let (overfill, pruned_loss) = (target_loss(&summary, "overfill"), target_loss(&summary, "pruned"));
    assert!(overfill < pruned_loss, "OverFill {overfill} is not below Pruned {pruned_loss}: {summary}");
    let tokens = |name: &str| read_json(&work.join(format!("eval/loss-{name}.json")))["tokens"].clone();
    assert_eq!(tokens("overfill"), tokens("pruned"));
    assert_eq!(tokens("overfill"), tokens("full"));
    assert_eq!(summary["systems"]["overfill"]["decoder_parameters"], summary["systems"]["pruned"]["decoder_parameters"]);
    for system in ["full", "pruned", "overfill", "overfill-refresh"] {
        let tasks = read_json(&work.join(format!("eval/tasks-{system}.json")));
        assert_eq!(tasks["total"], 100, "{system}");
        assert!(tasks["decode_tokens_per_second"].as_f64().unwrap() > 0.0, "{system}");
        // Exact match: each prompt's verdict is its generated text against its answer, and the
        // counts per task add up to the totals.
        let answers = std::fs::read_to_string(work.join(format!("eval/answers-{system}.jsonl"))).expect("answers");
        let mut correct = 0;
        for line in answers.lines() {
            let row: serde_json::Value = serde_json::from_str(line).expect("answer line");
            let same = row["generated"].as_str().unwrap().trim() == row["answer"].as_str().unwrap().trim();
            assert_eq!(row["correct"].as_bool(), Some(same), "{row}");
            correct += same as u64;
        }
        assert_eq!(answers.lines().count(), 100);
        assert_eq!(tasks["correct"].as_u64(), Some(correct), "{system}");
        let per_task: u64 = tasks["tasks"].as_object().unwrap().values().map(|t| t["correct"].as_u64().unwrap()).sum();
        assert_eq!(per_task, correct, "{system}");
    }
    assert!(stdout.contains("| system | decoder params | lookup | add | reverse | copy | recall |"), "{stdout}");

    // A rerun reuses every finished stage.
    let again = run_demo(&root, &work);
    for stage in ["data", "train-full", "prune", "train-decoders", "eval-loss", "eval-tasks"] {
        assert!(again.contains(&format!("{stage}: up to date")), "stage {stage} ran again:\n{again}");
    }
}
