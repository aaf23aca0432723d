//! Checkpoint IO: round trips with transformers (single file and sharded), shape-only parameter
//! counts of real configs, hub-cache resolution, and clear errors for bad checkpoints.
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use overfill_model::checkpoint::{load_config, load_tensors, resolve_model_dir, save_checkpoint};
use overfill_model::config::ModelConfig;
use overfill_model::transformer::Transformer;
use tch::{Device, Kind, Tensor};

fn prompt_logits(model: &Transformer, ids: &[i64]) -> Tensor {
    let t = ids.len() as i64;
    let ids = Tensor::from_slice(ids).unsqueeze(0);
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let mask = Tensor::ones([1, t], (Kind::Int64, Device::Cpu));
    model
        .forward(&ids, &positions, &mask, None)
        .unwrap()
        .squeeze_dim(0)
}

/// Logits of `ids` from transformers loading each directory (one Python run).
fn transformers_logits(dirs: &[std::path::PathBuf], ids: &[i64]) -> Vec<Tensor> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let ids_arg: Vec<String> = ids.iter().map(i64::to_string).collect();
    let ids_arg = ids_arg.join(",");
    let mut args = vec!["logits", &ids_arg, out.path().to_str().unwrap()];
    args.extend(dirs.iter().map(|d| d.to_str().unwrap()));
    model_ref(&args);
    let mut refs = read_refs(out.path());
    (0..dirs.len())
        .map(|i| refs.remove(&format!("logits_{i}")).expect("logits key"))
        .collect()
}

#[test]
fn saved_checkpoints_load_in_transformers_with_equal_logits() {
    let ids = [5i64, 17, 33, 2, 90, 61, 8];
    let out = tempfile::tempdir().unwrap();
    let mut saved = vec![]; // (label, dir, our logits)
    for case in ["llama3_tied", "qwen2_bias", "llama_head_dim"] {
        let model = Transformer::load(&case_model_dir(case), Device::Cpu, Kind::Float).unwrap();
        let ours = prompt_logits(&model, &ids);
        for (label, max_shard_bytes) in [("single", u64::MAX), ("sharded", 40_000)] {
            let dir = out.path().join(format!("{case}-{label}"));
            save_checkpoint(&dir, &model.config, &model.tensors(), max_shard_bytes).unwrap();
            let has_index = dir.join("model.safetensors.index.json").is_file();
            assert_eq!(
                has_index,
                label == "sharded",
                "{case} {label}: index file presence"
            );
            if label == "sharded" {
                assert!(
                    shard_files(&dir).len() > 2,
                    "{case}: expected several shards"
                );
                assert!(!dir.join("model.safetensors").exists());
            }
            let reloaded = Transformer::load(&dir, Device::Cpu, Kind::Float).unwrap();
            assert_eq!(
                max_abs_diff(&ours, &prompt_logits(&reloaded, &ids)),
                0.0,
                "{case} {label}: reload"
            );
            assert_eq!(reloaded.config.head_dim, model.config.head_dim);
            saved.push((format!("{case} {label}"), dir, ours.shallow_clone()));
        }
    }
    let dirs: Vec<_> = saved.iter().map(|(_, d, _)| d.clone()).collect();
    for ((label, _, ours), theirs) in saved.iter().zip(transformers_logits(&dirs, &ids)) {
        let diff = max_abs_diff(ours, &theirs);
        assert!(
            diff <= 1e-4,
            "{label}: transformers logits of our checkpoint differ by {diff}"
        );
    }
}

fn shard_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("model-") && name.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    files
}

#[test]
fn bf16_checkpoint_round_trips() {
    let model =
        Transformer::load(&case_model_dir("llama_untied"), Device::Cpu, Kind::BFloat16).unwrap();
    assert_eq!(model.kind(), Kind::BFloat16);
    let out = tempfile::tempdir().unwrap();
    save_checkpoint(out.path(), &model.config, &model.tensors(), u64::MAX).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    let tensors = load_tensors(out.path(), &model.config, Device::Cpu, Kind::BFloat16).unwrap();
    for (name, t) in model.tensors() {
        assert_eq!(max_abs_diff(&t, &tensors[&name]), 0.0, "{name}");
    }
}

#[test]
fn real_configs_give_transformers_parameter_counts() {
    let dir = repo_root().join("../shared/fixtures/model-configs");
    let names = [
        "Llama-3.2-3B-Instruct",
        "Llama-3.1-8B-Instruct",
        "Qwen2.5-14B-Instruct",
    ];
    let paths: Vec<String> = names
        .iter()
        .map(|n| dir.join(format!("{n}.json")).to_string_lossy().to_string())
        .collect();
    if let Some(p) = paths.iter().find(|p| !Path::new(p).is_file()) {
        eprintln!("skipping: fixture {p} is absent");
        return;
    }
    let args: Vec<&str> = std::iter::once("param-count")
        .chain(paths.iter().map(String::as_str))
        .collect();
    let counts: serde_json::Value = serde_json::from_str(model_ref(&args).trim()).unwrap();
    let rounded = ["3.21", "8.03", "14.77"];
    for ((path, name), expected_rounded) in paths.iter().zip(names).zip(rounded) {
        let config = ModelConfig::from_file(Path::new(path)).unwrap();
        let count = config.param_count();
        assert_eq!(
            count,
            counts[path].as_u64().unwrap(),
            "{name}: param count vs transformers (meta device)"
        );
        assert_eq!(
            format!("{:.2}", count as f64 / 1e9),
            expected_rounded,
            "{name}"
        );
        assert_eq!(
            config.parameter_shapes().len(),
            2 + config.num_hidden_layers * (9 + 3 * config.attention_bias as usize)
                + (!config.tie_word_embeddings) as usize
        );
    }
}

#[test]
fn hub_ids_resolve_from_a_local_cache() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--some-org--Tiny-Model");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    std::fs::write(snapshot.join("config.json"), "{}").unwrap();
    // Only this test touches these variables.
    std::env::remove_var("HF_HUB_CACHE");
    std::env::set_var("HF_HOME", home.path());
    assert_eq!(resolve_model_dir("some-org/Tiny-Model").unwrap(), snapshot);
    let err = format!("{:#}", resolve_model_dir("some-org/Absent").unwrap_err());
    assert!(
        err.contains("not in the local Hugging Face cache")
            && err.contains("models--some-org--Absent"),
        "{err}"
    );
    // HF_HUB_CACHE wins over HF_HOME.
    std::env::set_var("HF_HUB_CACHE", home.path().join("elsewhere"));
    assert!(resolve_model_dir("some-org/Tiny-Model").is_err());
    std::env::set_var("HF_HUB_CACHE", home.path().join("hub"));
    assert_eq!(resolve_model_dir("some-org/Tiny-Model").unwrap(), snapshot);
    std::env::remove_var("HF_HUB_CACHE");
    std::env::remove_var("HF_HOME");
    // A directory is returned as is.
    assert_eq!(
        resolve_model_dir(home.path().to_str().unwrap()).unwrap(),
        home.path()
    );
}

/// A copy of the llama_untied reference checkpoint to break.
fn copy_checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(case_model_dir("llama_untied")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect();
    edit(&mut tensors);
    let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    Tensor::write_safetensors(&list, &path).unwrap();
}

fn load_error(dir: &Path) -> String {
    match Transformer::load(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_checkpoint();
    rewrite_weights(dir.path(), |t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    let err = load_error(dir.path());
    assert!(
        err.contains("missing tensor model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );
}

#[test]
fn unexpected_tensor_is_named_with_its_file() {
    let dir = copy_checkpoint();
    rewrite_weights(dir.path(), |t| {
        t.insert(
            "model.layers.2.mlp.up_proj.weight".into(),
            Tensor::zeros([96, 64], (Kind::Float, Device::Cpu)),
        );
    });
    let err = load_error(dir.path());
    assert!(
        err.contains("model.safetensors")
            && err.contains("unexpected tensor model.layers.2.mlp.up_proj.weight"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_file_tensor_and_shapes() {
    let dir = copy_checkpoint();
    rewrite_weights(dir.path(), |t| {
        t.insert(
            "model.layers.0.self_attn.k_proj.weight".into(),
            Tensor::zeros([64, 64], (Kind::Float, Device::Cpu)),
        );
    });
    let err = load_error(dir.path());
    assert!(
        err.contains("model.safetensors")
            && err.contains("model.layers.0.self_attn.k_proj.weight")
            && err.contains("[64, 64]")
            && err.contains("expected [32, 64]"),
        "{err}"
    );
}

#[test]
fn unsupported_model_type_is_rejected() {
    let dir = copy_checkpoint();
    edit_config(dir.path(), |c| c["model_type"] = "mistral".into());
    let err = load_error(dir.path());
    assert!(
        err.contains("config.json") && err.contains("unsupported model_type \"mistral\""),
        "{err}"
    );
}

#[test]
fn unsupported_rope_type_is_rejected() {
    let dir = copy_checkpoint();
    edit_config(dir.path(), |c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})
    });
    let err = load_error(dir.path());
    assert!(
        err.contains("config.json") && err.contains("unsupported rope_type \"yarn\""),
        "{err}"
    );
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = copy_checkpoint();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("truncated or corrupt"),
        "{err}"
    );
    // A file cut inside its header too.
    std::fs::write(&path, &bytes[..20]).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("truncated or corrupt"), "{err}");
}

#[test]
fn missing_config_and_weights_are_reported() {
    let dir = copy_checkpoint();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("has neither model.safetensors nor model.safetensors.index.json"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("config.json not found"), "{err}");
    assert!(load_config(dir.path()).is_err());
}

#[test]
fn missing_shard_is_reported() {
    let model =
        Transformer::load(&case_model_dir("llama_untied"), Device::Cpu, Kind::Float).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_checkpoint(dir.path(), &model.config, &model.tensors(), 40_000).unwrap();
    let shards = shard_files(dir.path());
    assert!(shards.len() > 2);
    std::fs::remove_file(&shards[1]).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("model.safetensors.index.json names shard") && err.contains("does not exist"),
        "{err}"
    );
}
