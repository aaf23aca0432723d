//! The stages chained the way `just demo` chains them, through the command line and a recipe:
//! synthetic data + tiny tokenizer → `preprocess` shards → `init-model` → `calibrate-prune` reading
//! those shards (the recipe's `[data] shards`) → `generate` with the pruned model.
//! Each stage is checked in its own tests against references; this one checks the hand-offs.
mod common;

use common::{overfill_ok, read_json, repo_root};

#[test]
fn synth_preprocess_init_calibrate_prune_generate() {
    let root = repo_root();
    let tmp = std::env::temp_dir().join(format!("overfill-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();

    overfill_ok(&tmp, &["synth-data", "--tokenizer-out", "tok"]);
    overfill_ok(&tmp, &["synth-data", "--format", "openhermes", "--rows", "200", "--seed", "3", "--out", "raw.json"]);
    let model_config = root.join("configs/models/tiny-llama.json");
    overfill_ok(&tmp, &["init-model", "--config", model_config.to_str().unwrap(), "--out", "full", "--seed", "1", "--tokenizer", "tok"]);

    // A recipe in the shape of configs/tiny.toml, with small numbers.
    let recipe = r#"
name = "e2e"
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
calib_size = 12
batch_size = 4
max_seq_len = 48
seq_agg = "mean"
norm = "l2"
dtype = "f32"
device = "cpu"
[prune]
width_hidden = 0.5
width_intermediate = 0.25
out = "pruned"
"#;
    std::fs::write(tmp.join("recipe.toml"), recipe).unwrap();

    overfill_ok(&tmp, &["preprocess", "--config", "recipe.toml"]);
    let manifest = read_json(&tmp.join("shards/manifest.json"));
    assert!(manifest.is_object(), "preprocess wrote a manifest");

    overfill_ok(&tmp, &["calibrate-prune", "--config", "recipe.toml"]);
    let config = read_json(&tmp.join("pruned/config.json"));
    // int((1 - 0.5) * 128) = 64 and int((1 - 0.25) * 352) = 264; heads, KV heads, head_dim and
    // layers unchanged so the pruned decoder can read the full model's KV cache.
    assert_eq!(config["hidden_size"], 64);
    assert_eq!(config["intermediate_size"], 264);
    assert_eq!(config["num_attention_heads"], 4);
    assert_eq!(config["num_key_value_heads"], 2);
    assert_eq!(config["head_dim"], 32);
    assert_eq!(config["num_hidden_layers"], 4);
    let report = read_json(&tmp.join("pruned/pruning.json"));
    assert_eq!(report["calibration"]["samples"], 12, "calibration read 12 samples from the shards");
    assert!(report["calibration"]["tokens"].as_u64().unwrap() <= 12 * 48);
    assert_eq!(report["kept"]["hidden"].as_array().unwrap().len(), 64);
    assert_eq!(report["kept"]["intermediate"].as_array().unwrap().len(), 4, "one kept list per layer");
    assert!(report["loss_before"].as_f64().unwrap().is_finite());
    assert!(tmp.join("pruned/tokenizer.json").exists(), "tokenizer files are copied");

    let out = overfill_ok(&tmp, &["generate", "--model", "pruned", "--prompt", "Hello", "--max-new-tokens", "4", "--json"]);
    let generated: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids = generated["token_ids"].as_array().unwrap();
    assert!(!ids.is_empty() && ids.len() <= 4);
    assert!(ids.iter().all(|id| id.as_u64().unwrap() < 512));

    let _ = std::fs::remove_dir_all(&tmp);
}
