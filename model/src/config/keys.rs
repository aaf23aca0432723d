//! Every key of the real Llama 3.x and Qwen2.5 configs is decided below. A setting that would
//! change the numerics and that this crate does not implement is an error naming the key; it is
//! never ignored. (transformers 4.57.6 is the reference for what a key does.)
//!
//! | key | decision |
//! |---|---|
//! | `model_type` | read: `llama` or `qwen2`; anything else is an error |
//! | `architectures` | checked: when present it must name `LlamaForCausalLM` / `Qwen2ForCausalLM` (another head, e.g. `...ForSequenceClassification`, is an error) |
//! | `vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`, `num_attention_heads` | read, required |
//! | `num_key_value_heads` | read (default: `num_attention_heads`) |
//! | `head_dim` | read (default: hidden / heads); always written back, pruning breaks the default |
//! | `hidden_act` | read: only `silu`; anything else is an error |
//! | `rms_norm_eps` | read (default 1e-6, transformers' default for both) |
//! | `rope_theta`, `rope_scaling` | read (4.x spelling); `rope_type` (or the older `type`) `default` or `llama3`; `linear`, `dynamic`, `yarn`, `longrope`, ... are an error |
//! | `rope_parameters` | read (5.x spelling), same rope types; disagreeing with `rope_theta` / `rope_scaling` is an error |
//! | `partial_rotary_factor` (top level or in the rope object) | 1.0 accepted; anything else rotates part of each head: error |
//! | `tie_word_embeddings` | read |
//! | `attention_bias` | llama: `true` (bias on q/k/v/o) is an error; qwen2 always has q/k/v biases (transformers' Qwen2 ignores the key), so `false` contradicts the architecture: error |
//! | `mlp_bias` | `true` is an error (no MLP biases are loaded) |
//! | `attention_dropout` | 0 accepted; > 0 is an error (dropout is not implemented, it would change training numerics) |
//! | `pretraining_tp` | accepted, any value: transformers 4.57's Llama no longer reads it (it only split matmuls) |
//! | `use_sliding_window` | `true` is an error (sliding-window attention is not implemented) |
//! | `sliding_window`, `max_window_layers` | accepted: they matter only with `use_sliding_window` (transformers sets `sliding_window` to None without it) |
//! | `layer_types` | every entry must be `full_attention`; any other is an error |
//! | `max_position_embeddings` | read (default 2048 llama / 32768 qwen2); `generate` warns past it |
//! | `bos_token_id`, `eos_token_id` | read (`generation_config.json` overrides them, as in transformers) |
//! | `pad_token_id` | accepted, not used (generation pads with eos) |
//! | `initializer_range` | accepted, not used (only initialisation; `init-model --std` is explicit) |
//! | `use_cache` | accepted: no numerical effect |
//! | `dtype` / `torch_dtype` | accepted: the storage dtype; the compute dtype is a command option; rewritten on save |
//! | `transformers_version`, `_name_or_path` | accepted: informational |
//! | `quantization_config` | error: quantized weights are not implemented |
//! | any other key | kept and written back, reported by `unread_keys` so commands can warn |
use anyhow::{bail, Result};
use serde_json::Value;

use super::values::{get_bool, get_f64};
use super::{ModelConfig, ModelType};

/// Keys of the table above that are read, checked or deliberately accepted; anything else is
/// reported by `ModelConfig::unread_keys`.
const DECIDED_KEYS: &[&str] = &[
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "attention_dropout",
    "pretraining_tp",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "use_cache",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
];
/// Checks the keys that would change the numerics if they were honoured (see the table above).
pub(super) fn check_unimplemented_settings(raw: &Value, model_type: ModelType) -> Result<()> {
    if let Some(archs) = raw.get("architectures").filter(|v| !v.is_null()) {
        let names: Vec<&str> = archs
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !names.contains(&model_type.hf_architecture()) {
            bail!(
                "unsupported: config key \"architectures\" is {archs}, expected [\"{}\"] for model_type {:?}",
                model_type.hf_architecture(),
                model_type.as_str()
            );
        }
    }
    match raw.get("hidden_act") {
        None | Some(Value::Null) => {}
        Some(Value::String(act)) if act == "silu" => {}
        Some(other) => {
            bail!("unsupported hidden_act {other} in config key \"hidden_act\" (only \"silu\")")
        }
    }
    match (model_type, get_bool(raw, "attention_bias")?) {
        // Llama's attention_bias also puts a bias on o_proj; no released Llama 3 uses it.
        (ModelType::Llama, Some(true)) => {
            bail!("unsupported: config key \"attention_bias\" = true for llama (biases on q/k/v/o)")
        }
        (ModelType::Qwen2, Some(false)) => bail!(
            "unsupported: config key \"attention_bias\" = false for qwen2 (Qwen2 always has q/k/v biases)"
        ),
        _ => {}
    }
    if get_bool(raw, "mlp_bias")?.unwrap_or(false) {
        bail!("unsupported: config key \"mlp_bias\" = true (MLP biases are not implemented)");
    }
    if let Some(p) = get_f64(raw, "attention_dropout")? {
        if p != 0.0 {
            bail!("unsupported: config key \"attention_dropout\" = {p} (attention dropout is not implemented; set it to 0.0)");
        }
    }
    if get_bool(raw, "use_sliding_window")?.unwrap_or(false) {
        bail!("unsupported: config key \"use_sliding_window\" = true (sliding-window attention is not implemented)");
    }
    match raw.get("layer_types") {
        None | Some(Value::Null) => {}
        Some(Value::Array(types)) => {
            if let Some(t) = types.iter().find(|t| t.as_str() != Some("full_attention")) {
                bail!("unsupported: config key \"layer_types\" has {t} (only \"full_attention\" is implemented)");
            }
        }
        Some(v) => bail!("config key \"layer_types\" must be a list, got {v}"),
    }
    if let Some(f) = get_f64(raw, "partial_rotary_factor")? {
        if f != 1.0 {
            bail!("unsupported: config key \"partial_rotary_factor\" = {f} (RoPE on part of each head is not implemented)");
        }
    }
    if raw.get("quantization_config").is_some_and(|v| !v.is_null()) {
        bail!("unsupported: config key \"quantization_config\" (quantized checkpoints are not implemented)");
    }
    Ok(())
}

impl ModelConfig {
    /// Top-level keys of the source config that are in no row of the table of this module: kept
    /// and written back, but nothing here reads them (commands warn about them).
    pub fn unread_keys(&self) -> Vec<String> {
        self.raw
            .as_object()
            .map(|map| {
                map.keys()
                    .filter(|k| !DECIDED_KEYS.contains(&k.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}
