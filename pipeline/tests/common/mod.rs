//! What the command-line tests share: running the `overfill` binary and checking how it ended
//! (the failure message shows its output), the model tests' helpers (`model`: paths, .venv's
//! Python, the cached transformers references, comparisons, config.json edits), and the fixtures
//! several tests start from (the tiny trained-from-nothing training fixture, a tiny model with the
//! real Llama 3.2 tokenizer, calibration data).
//!
//! Every test binary with `mod common;` compiles all of it and uses its own part.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tch::Tensor;

// One copy of the model tests' helpers for both crates' tests.
#[path = "../../../model/tests/common/mod.rs"]
pub mod model;

#[allow(unused_imports)] // like the rest of this module, each binary uses its own part
pub use model::{python, read_json, repo_root, write_json};

/// Runs `overfill ARGS` in `cwd`.
pub fn overfill(cwd: &Path, args: &[&str]) -> Output {
    run(Some(cwd), args)
}

/// Runs a command that must succeed; returns its stdout.
pub fn overfill_ok(cwd: &Path, args: &[&str]) -> String {
    stdout(&assert_success(overfill(cwd, args), args))
}

/// Runs a command that must fail; returns its stderr.
pub fn overfill_err(cwd: &Path, args: &[&str]) -> String {
    let out = overfill(cwd, args);
    let stderr = stderr(&out);
    assert!(!out.status.success(), "overfill {} should have failed; stderr:\n{stderr}", args.join(" "));
    stderr
}

/// The same runners in the test's own working directory, for tests whose arguments name
/// absolute paths.
pub mod here {
    use std::process::Output;

    use super::{assert_success, run, stderr, stdout};

    /// Runs `overfill ARGS`.
    pub fn overfill(args: &[&str]) -> Output {
        run(None, args)
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn overfill_ok(args: &[&str]) -> String {
        stdout(&assert_success(run(None, args), args))
    }

    /// Runs a command that must succeed; returns its output (for the warnings on stderr).
    pub fn overfill_output_ok(args: &[&str]) -> Output {
        assert_success(run(None, args), args)
    }

    /// Runs a command that must fail with an error, not a panic; returns its stderr.
    pub fn overfill_refused(args: &[&str]) -> String {
        let out = run(None, args);
        let err = stderr(&out);
        assert!(!out.status.success(), "overfill {args:?} should fail:\n{err}");
        assert!(!err.contains("panicked"), "panic instead of an error:\n{err}");
        err
    }
}

fn run(cwd: Option<&Path>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_overfill"));
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    command.args(args).output().expect("run overfill")
}

/// `out` of `overfill ARGS`, which must have succeeded (the failure shows stdout and stderr).
pub fn assert_success(out: Output, args: &[&str]) -> Output {
    assert!(
        out.status.success(),
        "overfill {} failed:\n{}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The recipe of the tiny training fixture (`make_train_fixture`): synthetic OpenHermes rows, the
/// tiny Llama, P = 0.5 / 0.25 calibrate-prune, CPU f32 training at batch 2 × accumulation 2;
/// `extra_train_keys` are appended to its `[train]` table.
pub fn tiny_train_recipe(name: &str, extra_train_keys: &str) -> String {
    format!(
        r#"name = "{name}"
[model]
path = "full"
[data]
shards = "shards"
tokenizer = "tok"
template = "llama3"
[[sources]]
name = "synthetic"
path = "raw.json"
format = "openhermes"
[preprocess]
pre_filter_max_seq_length = 1000
max_seq_length = 1024
val_size = 10
seed = 0
rows_per_shard = 100
[calibrate]
calib_size = 8
batch_size = 4
max_seq_len = 48
dtype = "f32"
device = "cpu"
[prune]
width_hidden = 0.5
width_intermediate = 0.25
out = "pruned"
[train]
device = "cpu"
dtype = "f32"
threads = 1
learning_rate = 1e-3
warmup_ratio = 0.1
weight_decay = 0.01
per_device_batch_size = 2
gradient_accumulation_steps = 2
max_seq_length = 1024
logging_steps = 1
eval_steps = 0
eval_max_rows = 8
save_steps = 0
{extra_train_keys}"#
    )
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

/// The real Llama 3.2 tokenizer fixture, or `None` (and a printed reason) when it is absent.
pub fn llama32_tokenizer() -> Option<PathBuf> {
    let dir = repo_root().join("../shared/fixtures/llama-3.2-tokenizer");
    if dir.join("tokenizer.json").is_file() {
        Some(dir)
    } else {
        eprintln!("skipping: fixture {} is absent", dir.display());
        None
    }
}

/// config.json of a very small Llama with the real Llama 3.2 text vocabulary and special ids.
pub const LLAMA32_VOCAB_TINY_CONFIG: &str = r#"{"model_type":"llama","vocab_size":128256,"hidden_size":32,"intermediate_size":64,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
            "rms_norm_eps":1e-5,"rope_theta":500000.0,"tie_word_embeddings":true,
            "bos_token_id":128000,"eos_token_id":[128001,128009]}"#;

/// `init-model --seed SEED --std 0.5` of `config` (config.json text, written to
/// `dir/config.json`) with `tokenizer`, into `dir/model`; returns that folder.
pub fn init_model_with_tokenizer(dir: &Path, config: &str, seed: &str, tokenizer: &Path) -> PathBuf {
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config).unwrap();
    let model = dir.join("model");
    here::overfill_ok(&[
        "init-model",
        "--config",
        config_path.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
        "--seed",
        seed,
        "--std",
        "0.5",
        "--tokenizer",
        tokenizer.to_str().unwrap(),
    ]);
    model
}

/// `rows` rows of pseudo-random ids below `vocab`, 5 to 40 long, as a JSON list of lists
/// (xorshift64 from `seed`).
pub fn write_calibration_data(path: &Path, rows: usize, vocab: u64, seed: u64) {
    let mut state = seed;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let data: Vec<Vec<u64>> = (0..rows).map(|_| (0..5 + next() % 36).map(|_| next() % vocab).collect()).collect();
    std::fs::write(path, serde_json::to_string(&data).unwrap()).unwrap();
}

/// Every path under `dir`, files and folders, depth first (each folder's entries in `read_dir`
/// order, the last folder found walked first).
pub fn paths_under(dir: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path.clone());
            }
            paths.push(path);
        }
    }
    paths
}

/// The demo's real model (`scripts/smollm2.py`): the converted folder, or None (with the reason printed) when the set-up has not made it.
pub fn smollm2_dir() -> Option<PathBuf> {
    let cache = std::env::var_os("OVERFILL_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/overfill")))?;
    let dir = cache.join("models/SmolLM2-135M-Instruct");
    if dir.join(".overfill-converted").is_file() {
        Some(dir)
    } else {
        eprintln!("skipped: {} is absent (`just setup` converts SmolLM2-135M-Instruct there)", dir.display());
        None
    }
}

/// transformers' answers, computed once per version of the reference script and of the converted
/// folder (its conversion stamp), and once per test binary.
pub fn smollm2_reference(model: &Path) -> &'static Value {
    static REFERENCE: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    REFERENCE.get_or_init(|| {
        let stamp = std::fs::read_to_string(model.join(".overfill-converted")).expect("conversion stamp");
        let dir = model::cached_script_output("smollm2_ref.py", &format!("smollm2-ref-cache-v{}", stamp.trim()));
        read_json(&dir.join("ref.json"))
    })
}

/// A JSON list of token ids.
pub fn json_ids(value: &Value) -> Vec<i64> {
    value.as_array().expect("a list of ids").iter().map(|v| v.as_i64().expect("an id")).collect()
}
