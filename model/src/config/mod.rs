//! `config.json` of a Hugging Face Llama 3.x / Qwen2.5 checkpoint, and the tensor names and
//! shapes it implies (the shape-only path: no weights are touched).
//!
//! Two spellings of RoPE occur in the wild: transformers 4.x and the hub's original files write
//! `rope_theta` + `rope_scaling`, transformers 5.x writes one `rope_parameters` object. Both are
//! read; a config holding both must agree with itself; a saved config keeps its source's spelling.
//!
//! Every key of the real Llama 3.x and Qwen2.5 configs is decided in `keys` (the table there); a
//! setting that would change the numerics and that this crate does not implement is an error
//! naming the key, never ignored.
//!
//! `config.json` is read as a `serde_json::Value` rather than into a derived serde struct: the
//! original object is kept to write back keys this crate does not model, and each key is checked
//! with its own error (both RoPE spellings, keys that must be absent or false).
//!
//! - `values`: typed reads of single keys;
//! - `rope`: the two RoPE spellings and their agreement;
//! - `keys`: the table of keys, the check of numerics-changing settings, `unread_keys`;
//! - `save`: `to_hf_json`, the config written back in its source's format.
mod keys;
mod rope;
mod save;
mod values;

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub use rope::{RopeFormat, RopeScaling};
pub(crate) use values::parse_token_ids;

use keys::check_unimplemented_settings;
use rope::parse_rope;
use values::{get_bool, get_f64, get_usize, require_usize};

/// The architectures this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Llama,
    Qwen2,
}

impl ModelType {
    pub fn as_str(&self) -> &'static str {
        match self {
            ModelType::Llama => "llama",
            ModelType::Qwen2 => "qwen2",
        }
    }

    /// The `architectures` entry transformers uses for a causal LM of this type.
    pub fn hf_architecture(&self) -> &'static str {
        match self {
            ModelType::Llama => "LlamaForCausalLM",
            ModelType::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Explicit in config.json, or hidden_size / num_attention_heads when absent. Pruned models
    /// change hidden_size but keep head_dim, so it is always written back explicitly.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// The spelling `rope_theta` / `rope_scaling` are written back in.
    pub rope_format: RopeFormat,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (always for qwen2).
    pub attention_bias: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    /// The original config.json, kept to write back keys this crate does not model.
    pub raw: Value,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json_str(&text)
            .with_context(|| format!("invalid model config {}", path.display()))
    }

    pub fn from_json_str(s: &str) -> Result<Self> {
        let raw: Value = serde_json::from_str(s).context("config is not valid JSON")?;
        if !raw.is_object() {
            bail!("config must be a JSON object");
        }
        let model_type = match raw.get("model_type").and_then(Value::as_str) {
            Some("llama") => ModelType::Llama,
            Some("qwen2") => ModelType::Qwen2,
            Some(other) => {
                bail!("unsupported model_type {other:?} (supported: \"llama\", \"qwen2\")")
            }
            None => bail!("config has no \"model_type\" (supported: \"llama\", \"qwen2\")"),
        };
        check_unimplemented_settings(&raw, model_type)?;
        let (rope_theta, rope_scaling, rope_format) = parse_rope(&raw)?;
        let hidden_size = require_usize(&raw, "hidden_size")?;
        let num_attention_heads = require_usize(&raw, "num_attention_heads")?;
        let num_key_value_heads =
            get_usize(&raw, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            bail!("num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})");
        }
        let head_dim = match get_usize(&raw, "head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    bail!("hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}) and head_dim is not given");
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            bail!("head_dim must be a positive even number (rotary embedding), got {head_dim}");
        }
        let num_hidden_layers = require_usize(&raw, "num_hidden_layers")?;
        if let Some(types) = raw.get("layer_types").and_then(Value::as_array) {
            if types.len() != num_hidden_layers {
                bail!(
                    "config key \"layer_types\" has {} entries for {num_hidden_layers} layers",
                    types.len()
                );
            }
        }
        let default_max_pos = match model_type {
            ModelType::Llama => 2048,
            ModelType::Qwen2 => 32768,
        };
        Ok(ModelConfig {
            model_type,
            vocab_size: require_usize(&raw, "vocab_size")?,
            hidden_size,
            intermediate_size: require_usize(&raw, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: get_f64(&raw, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_format,
            tie_word_embeddings: get_bool(&raw, "tie_word_embeddings")?.unwrap_or(false),
            attention_bias: model_type == ModelType::Qwen2,
            max_position_embeddings: get_usize(&raw, "max_position_embeddings")?
                .unwrap_or(default_max_pos),
            bos_token_id: raw.get("bos_token_id").and_then(Value::as_i64),
            eos_token_ids: parse_token_ids(raw.get("eos_token_id"), "eos_token_id")?,
            raw,
        })
    }

    /// Every parameter tensor of the checkpoint with its HF name and shape, in HF's order.
    /// `lm_head.weight` is listed only when the embeddings are not tied.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let d = self.hidden_size as i64;
        let v = self.vocab_size as i64;
        let i = self.intermediate_size as i64;
        let q = (self.num_attention_heads * self.head_dim) as i64;
        let kv = (self.num_key_value_heads * self.head_dim) as i64;
        let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
        for layer in 0..self.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            shapes.push((format!("{p}.input_layernorm.weight"), vec![d]));
            shapes.push((format!("{p}.self_attn.q_proj.weight"), vec![q, d]));
            if self.attention_bias {
                shapes.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            }
            shapes.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d]));
            if self.attention_bias {
                shapes.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            }
            shapes.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d]));
            if self.attention_bias {
                shapes.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
            shapes.push((format!("{p}.self_attn.o_proj.weight"), vec![d, q]));
            shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
            shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![i, d]));
            shapes.push((format!("{p}.mlp.up_proj.weight"), vec![i, d]));
            shapes.push((format!("{p}.mlp.down_proj.weight"), vec![d, i]));
        }
        shapes.push(("model.norm.weight".to_string(), vec![d]));
        if !self.tie_word_embeddings {
            shapes.push(("lm_head.weight".to_string(), vec![v, d]));
        }
        shapes
    }

    /// Number of parameters (a tied lm_head is counted once, as transformers does).
    pub fn param_count(&self) -> u64 {
        self.parameter_shapes()
            .iter()
            .map(|(_, shape)| shape.iter().product::<i64>() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tiny() -> String {
        r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":12,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1}"#
            .to_string()
    }

    #[test]
    fn head_dim_defaults_to_hidden_over_heads_and_is_written_back() {
        let c = ModelConfig::from_json_str(&tiny()).unwrap();
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.to_hf_json()["head_dim"], json!(4));
        let again = ModelConfig::from_json_str(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(again.parameter_shapes(), c.parameter_shapes());
    }

    #[test]
    fn layer_types_follow_the_layer_count() {
        let text = tiny().replace("\"llama\"", "\"qwen2\"").replace(
            "\"num_hidden_layers\":1",
            "\"num_hidden_layers\":1,\"layer_types\":[\"full_attention\"]",
        );
        let mut c = ModelConfig::from_json_str(&text).unwrap();
        c.num_hidden_layers = 3;
        let again = ModelConfig::from_json_str(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(again.num_hidden_layers, 3);
        assert_eq!(
            again.to_hf_json()["layer_types"].as_array().unwrap().len(),
            3
        );
    }

    #[test]
    fn counts_parameters_by_hand() {
        let c = ModelConfig::from_json_str(&tiny()).unwrap();
        // embed 80 + norms 8+8 + q 64 + k 32 + v 32 + o 64 + mlp 3*96 + final norm 8 + lm_head 80
        assert_eq!(c.param_count(), 80 + 16 + 64 + 32 + 32 + 64 + 288 + 8 + 80);
    }
}
