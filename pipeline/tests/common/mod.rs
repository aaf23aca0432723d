//! What the training CLI tests share: running the binary, and the tiny trained-from-nothing fixture
//! (synthetic data and tokenizer → preprocess → init-model → calibrate-prune) every one of them
//! starts from.
#![allow(dead_code)] // each test binary uses its own part of this module

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tch::Tensor;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn overfill(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_overfill")).current_dir(cwd).args(args).output().expect("run overfill")
}

/// Runs a command that must succeed; returns its stdout.
pub fn overfill_ok(cwd: &Path, args: &[&str]) -> String {
    let out = overfill(cwd, args);
    assert!(
        out.status.success(),
        "overfill {} failed:\n{}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A fresh folder `<target tmp>/<prefix><pid>` holding a tiny Llama (`full`), its tokenizer (`tok`),
/// shards (`shards`) and its calibrate-pruned decoder (`pruned`), made by the real commands from
/// `recipe` (written as `recipe.toml`). Folders of earlier test processes that are gone are
/// removed (there is no teardown for a shared fixture; a concurrent run's folder is left alone).
pub fn make_train_fixture(prefix: &str, recipe: &str) -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    remove_fixtures_of_finished_runs(tmp, prefix);
    let dir = tmp.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    overfill_ok(&dir, &["synth-data", "--tokenizer-out", "tok"]);
    overfill_ok(&dir, &["synth-data", "--format", "openhermes", "--rows", "80", "--seed", "3", "--out", "raw.json"]);
    let config = repo_root().join("configs/models/tiny-llama.json");
    overfill_ok(&dir, &["init-model", "--config", config.to_str().unwrap(), "--out", "full", "--seed", "1", "--tokenizer", "tok"]);
    std::fs::write(dir.join("recipe.toml"), recipe).unwrap();
    overfill_ok(&dir, &["preprocess", "--config", "recipe.toml"]);
    overfill_ok(&dir, &["calibrate-prune", "--config", "recipe.toml"]);
    dir
}

fn remove_fixtures_of_finished_runs(tmp: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(pid) = name.strip_prefix(prefix).and_then(|p| p.parse::<u32>().ok()) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// The tensors of a decoder folder's `model.safetensors`.
pub fn weights(dir: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(dir.join("model.safetensors")).unwrap().into_iter().collect()
}
