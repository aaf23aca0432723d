//! Shared helpers of the model tests, and (as `common::model`) of the pipeline's command-line
//! tests: paths, the Python reference, comparisons, config.json edits.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use overfill_model::generate::GenerateOptions;
use overfill_model::transformer::Transformer;
use serde_json::{json, Value};
use tch::{Kind, Tensor};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("model/ has a parent")
        .to_path_buf()
}

pub fn python() -> PathBuf {
    std::env::var_os("OVERFILL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"))
}

/// Runs `tests/python/model_ref.py ARGS` and returns its stdout; panics with stderr on failure.
pub fn model_ref(args: &[&str]) -> String {
    python_script("model_ref.py", args)
}

/// Runs `tests/python/SCRIPT ARGS` and returns its stdout; panics with stderr on failure.
pub fn python_script(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(repo_root().join("tests/python").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The reference checkpoints and outputs. Made once per version of model_ref.py into a cache
/// folder beside the test executables (`<target>/release/model-ref-cache/<hash>`), so the test
/// binaries share one Python run; built in a temporary folder and renamed into place.
pub fn reference_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_script_output("model_ref.py", "model-ref-cache"))
        .as_path()
}

/// Modules of tests/python that reference scripts import: part of every script's version.
const SHARED_REFERENCE_MODULES: [&str; 1] = ["tiny_decoder.py"];

/// `tests/python/SCRIPT make DIR`, run once per version of the script (and of the shared
/// modules it may import) into `<target>/release/CACHE/<hash>` (see `reference_dir`); returns
/// that folder.
pub fn cached_script_output(script_name: &str, cache_name: &str) -> PathBuf {
    let read = |name: &str| {
        std::fs::read(repo_root().join("tests/python").join(name))
            .unwrap_or_else(|e| panic!("tests/python/{name}: {e}"))
    };
    let mut sources = read(script_name);
    for module in SHARED_REFERENCE_MODULES {
        sources.extend(read(module));
    }
    // FNV-1a: a stable content hash without extra dependencies.
    let hash = sources.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    let exe = std::env::current_exe().expect("test executable path");
    let cache = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join(cache_name);
    let dir = cache.join(format!("{hash:016x}"));
    if !dir.join("done").is_file() {
        std::fs::create_dir_all(&cache).expect("cache folder");
        let tmp = tempfile::Builder::new()
            .prefix(".building")
            .tempdir_in(&cache)
            .expect("temp dir");
        python_script(
            script_name,
            &["make", tmp.path().to_str().expect("utf-8 temp path")],
        );
        std::fs::write(tmp.path().join("done"), "").expect("marker");
        let tmp = tmp.keep();
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another process finished first; use its copy.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    dir
}

/// tests/python/two_stage_ref.py's tiny full models, their sliced decoders and the reference
/// tokens, made once (see `cached_script_output`).
pub fn two_stage_ref_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_script_output("two_stage_ref.py", "two-stage-ref-cache"))
}

/// A checkpoint of two_stage_ref.py (case "llama3" or "qwen2_bias"; "full", "decoder" or
/// "shallow"), CPU f32.
pub fn two_stage_model(case: &str, which: &str) -> Transformer {
    let dir = two_stage_ref_dir().join(case).join(which);
    Transformer::load(&dir, tch::Device::Cpu, Kind::Float).unwrap()
}

/// A two_stage_ref.py case's full model and its sliced decoder.
pub fn two_stage_pair(case: &str) -> (Transformer, Transformer) {
    (
        two_stage_model(case, "full"),
        two_stage_model(case, "decoder"),
    )
}

/// The reference tensors of a two_stage_ref.py case.
pub fn two_stage_refs(case: &str) -> HashMap<String, Tensor> {
    read_refs(&two_stage_ref_dir().join(case).join("ref.safetensors"))
}

/// Generation of exactly `max_new_tokens` tokens (no stop ids: the references ignore eos).
pub fn no_stop_options(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        eos_token_ids: vec![],
        pad_token_id: 0,
        keep_prompt_logits: false,
    }
}

/// The rows of a [B, N] tensor.
pub fn tensor_rows(t: &Tensor) -> Vec<Vec<i64>> {
    (0..t.size()[0]).map(|r| to_vec_i64(&t.get(r))).collect()
}

pub const CASES: [&str; 5] = [
    "llama3_tied",
    "llama_untied",
    "qwen2_bias",
    "llama_head_dim",
    "qwen2_head_dim",
];

pub fn case_model_dir(case: &str) -> PathBuf {
    reference_dir().join(case).join("model")
}

pub fn read_refs(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn case_refs(case: &str) -> HashMap<String, Tensor> {
    read_refs(&reference_dir().join(case).join("ref.safetensors"))
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

pub fn to_vec_i64(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.to_kind(Kind::Int64).flatten(0, -1)).expect("i64 tensor")
}

pub fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

pub fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// The 4.x config rewritten as transformers 5 writes it (see ../shared/fixtures/model-configs):
/// `rope_theta` and `rope_scaling` go, `rope_parameters` holds the rope type, theta and the
/// scaling keys.
pub fn to_5x(config: &Value) -> Value {
    let mut out = config.as_object().unwrap().clone();
    let theta = out.remove("rope_theta").expect("4.x config has rope_theta");
    let mut params = match out.remove("rope_scaling") {
        Some(Value::Object(scaling)) => scaling,
        _ => serde_json::Map::from_iter([("rope_type".to_string(), json!("default"))]),
    };
    params.insert("rope_theta".into(), theta);
    out.insert("rope_parameters".into(), Value::Object(params));
    out.insert("transformers_version".into(), json!("5.24.0"));
    Value::Object(out)
}
