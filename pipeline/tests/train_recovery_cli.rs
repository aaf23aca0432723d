//! `overfill train` after faults (issue 19), on the tiny CPU fixture of `train_cli`: a run killed
//! while `final/` is written is completed by `--resume` to the bytes of an uninterrupted run, and
//! readers refuse an incomplete `final/` naming the missing file; resume knows the shards by
//! content (three spellings of their path continue exactly, other shards at the same path are
//! refused naming both digests); a truncated file of the newest checkpoint is named and resume
//! continues from the previous checkpoint.
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

mod common;
use common::{assert_success, make_train_fixture, overfill, overfill_err, overfill_ok, python, stderr, tiny_train_recipe};

fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| make_train_fixture("train-recovery-", &tiny_train_recipe("train-recovery", "")))
}

/// `train --config recipe.toml --out OUT --save-steps 2 EXTRA`: its output, which must be a success.
fn train(out: &str, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--config", "recipe.toml", "--out", out, "--save-steps", "2"];
    args.extend_from_slice(extra);
    assert_success(overfill(fixture(), &args), &args)
}

/// An uninterrupted run of 4 steps with checkpoints at 2 and 4: what every recovered run must equal.
fn reference() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        train("reference", &["--max-steps", "4"]);
        fixture().join("reference")
    })
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `final/` of `run` holds the reference's files byte for byte (its trainer_state.json but for
/// the run folder's name, which the state's settings record).
fn assert_final_equals_reference(run: &Path) {
    for file in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(bytes(&reference().join("final").join(file)) == bytes(&run.join("final").join(file)), "final/{file} differs in {}", run.display());
    }
    let state = |dir: &Path| {
        let mut state: serde_json::Value = serde_json::from_slice(&bytes(&dir.join("final/trainer_state.json"))).unwrap();
        state["settings"]["out"] = serde_json::Value::Null;
        state
    };
    assert_eq!(state(reference()), state(run));
}

#[test]
fn a_kill_while_final_is_written_is_completed_by_resume() {
    let dir = fixture();
    reference();
    for (i, point) in ["final:decoder", "final:state", "final:digests"].iter().enumerate() {
        let out = format!("killed-{i}");
        let args = ["train", "--config", "recipe.toml", "--out", &out, "--save-steps", "2", "--max-steps", "4"];
        let killed = Command::new(env!("CARGO_BIN_EXE_overfill")).current_dir(dir).args(args).env("OVERFILL_TEST_KILL_AT", point).output().unwrap();
        assert_eq!(killed.status.signal(), Some(libc::SIGKILL), "{point}: {}", stderr(&killed));
        let run = dir.join(&out);
        assert!(run.join("checkpoint-4").is_dir() && !run.join("final").exists(), "{point}: final/ appears only complete");

        let resumed = train(&out, &["--max-steps", "4", "--resume"]);
        let said = stderr(&resumed);
        assert!(said.contains("final is missing: wrote"), "{point}: {said}");
        assert_final_equals_reference(&run);
    }

    // A final/ that lost a file: every reader names it; --resume writes final/ again.
    let run = dir.join("killed-0");
    std::fs::remove_file(run.join("final/tokenizer.json")).unwrap();
    let err = overfill_err(dir, &["generate", "--model", "killed-0/final", "--prompt", "hi", "--max-new-tokens", "2"]);
    assert!(err.contains("killed-0/final is incomplete: tokenizer.json is missing"), "{err}");
    let err = overfill_err(dir, &["generate", "--model", "full", "--decoder", "killed-0/final", "--prompt", "hi", "--max-new-tokens", "2"]);
    assert!(err.contains("tokenizer.json is missing"), "{err}");
    let err = overfill_err(dir, &["eval-loss", "--full", "full", "--decoder", "killed-0/final", "--data", "shards", "--json"]);
    assert!(err.contains("tokenizer.json is missing"), "{err}");
    let said = stderr(&train("killed-0", &["--max-steps", "4", "--resume"]));
    assert!(said.contains("final is incomplete: tokenizer.json is missing") && said.contains("wrote"), "{said}");
    assert_final_equals_reference(&run);

    // A final/ left as older versions left it when killed (files moved in one by one): config.json
    // and the weights, no trainer_state.json and no file list.
    for file in ["tokenizer.json", "tokenizer_config.json", "trainer_state.json", "file_digests.json"] {
        std::fs::remove_file(run.join("final").join(file)).unwrap();
    }
    let said = stderr(&train("killed-0", &["--max-steps", "4", "--resume"]));
    assert!(said.contains("final is incomplete: trainer_state.json is missing: wrote"), "{said}");
    assert_final_equals_reference(&run);
    // Complete: nothing to do.
    let said = stderr(&train("killed-0", &["--max-steps", "4", "--resume"]));
    assert!(said.contains("nothing to train") && !said.contains("wrote"), "{said}");
}

/// `Manifest::content_digest` of a shard folder, computed by Python from its manifest.json.
fn content_digest(shards: &Path) -> String {
    let script = r#"
import hashlib, json, sys
m = json.load(open(sys.argv[1] + "/manifest.json"))
identity = {"key": m["key"], "train": m["train"], "val": m["val"]}
print(hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest())
"#;
    let out = Command::new(python()).args(["-c", script, shards.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn copy_folder(from: &Path, to: &Path) {
    let status = Command::new("cp").arg("-r").arg(from).arg(to).status().unwrap();
    assert!(status.success());
}

#[test]
fn resume_knows_the_shards_by_content() {
    let dir = fixture();
    reference();
    // The same shards as `shards` (relative), as an absolute path with a trailing slash, and as a
    // copy in another folder: the run continues exactly.
    copy_folder(&dir.join("shards"), &dir.join("shards-copy"));
    let absolute = format!("{}/", dir.join("shards").display());
    train("spellings", &["--max-steps", "1", "--data", "shards"]);
    train("spellings", &["--max-steps", "2", "--data", &absolute, "--resume"]);
    train("spellings", &["--max-steps", "4", "--data", "shards-copy", "--resume"]);
    assert_final_equals_reference_weights(&dir.join("spellings"));

    // Other shards at the same path: refused, naming both digests.
    std::fs::write(dir.join("other.toml"), tiny_train_recipe("train-recovery", "").replace("raw.json", "other.json").replace("\"shards\"", "\"other-shards\"")).unwrap();
    overfill_ok(dir, &["synth-data", "--format", "openhermes", "--rows", "80", "--seed", "4", "--out", "other.json"]);
    overfill_ok(dir, &["preprocess", "--config", "other.toml"]);
    copy_folder(&dir.join("shards"), &dir.join("swapped"));
    train("swap", &["--max-steps", "2", "--data", "swapped"]);
    std::fs::remove_dir_all(dir.join("swapped")).unwrap();
    copy_folder(&dir.join("other-shards"), &dir.join("swapped"));
    let err = overfill_err(dir, &["train", "--config", "recipe.toml", "--out", "swap", "--max-steps", "4", "--data", "swapped", "--resume"]);
    let (trained_on, now) = (content_digest(&dir.join("shards")), content_digest(&dir.join("other-shards")));
    assert_ne!(trained_on, now);
    assert!(err.contains(&trained_on) && err.contains(&now) && err.contains("other shards"), "{err}");
    assert!(!dir.join("swap/checkpoint-4").exists());
}

fn assert_final_equals_reference_weights(run: &Path) {
    let file = |dir: &Path| bytes(&dir.join("final/model.safetensors"));
    assert!(file(reference()) == file(run), "the final decoder of {} differs from the uninterrupted run's", run.display());
    let log = |dir: &Path| std::fs::read_to_string(dir.join("log.jsonl")).unwrap();
    let losses = |dir: &Path| -> Vec<(u64, f64)> {
        log(dir)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["loss"].is_f64())
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
            .collect()
    };
    assert_eq!(losses(reference()), losses(run));
}

#[test]
fn a_damaged_newest_checkpoint_is_named_and_resume_falls_back() {
    let dir = fixture();
    reference();
    train("damaged", &["--max-steps", "4"]);
    let weights = dir.join("damaged/checkpoint-4/model.safetensors");
    let full = bytes(&weights);
    std::fs::write(&weights, &full[..full.len() / 2]).unwrap();
    std::fs::remove_dir_all(dir.join("damaged/final")).unwrap();
    let said = stderr(&train("damaged", &["--max-steps", "4", "--resume"]));
    assert!(said.contains(&format!("checkpoint-4/model.safetensors is damaged: {} bytes", full.len() / 2)), "{said}");
    assert!(said.contains("checkpoint-2, the newest intact checkpoint") && said.contains("resuming from"), "{said}");
    assert_final_equals_reference_weights(&dir.join("damaged"));
    assert!(bytes(&weights) == full, "checkpoint-4 was written again");

    // A flipped byte keeps the size: the digest names it.
    let optimizer = dir.join("damaged/checkpoint-4/optimizer.safetensors");
    let mut changed = bytes(&optimizer);
    let last = changed.len() - 1;
    changed[last] ^= 1;
    std::fs::write(&optimizer, changed).unwrap();
    let said = stderr(&train("damaged", &["--max-steps", "4", "--resume"]));
    assert!(said.contains("checkpoint-4/optimizer.safetensors is damaged: its SHA-256"), "{said}");
}
