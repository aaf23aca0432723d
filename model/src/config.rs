//! `config.json` of a Hugging Face Llama 3.x / Qwen2.5 checkpoint, and the tensor names and
//! shapes it implies (the shape-only path: no weights are touched).
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

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

/// `rope_scaling` of config.json. `None` is both a missing/null entry and `rope_type: "default"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// The Llama 3.1/3.2 frequency smoothing.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
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
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (always for qwen2).
    pub attention_bias: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    /// The original config.json, kept to write back keys this crate does not model.
    pub raw: Value,
}

fn get_usize(raw: &Value, key: &str) -> Result<Option<usize>> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| anyhow!("config key {key:?} must be a non-negative integer, got {v}")),
    }
}

fn require_usize(raw: &Value, key: &str) -> Result<usize> {
    let n = get_usize(raw, key)?
        .ok_or_else(|| anyhow!("config is missing the required key {key:?}"))?;
    if n == 0 {
        bail!("config key {key:?} must be positive, got 0");
    }
    Ok(n)
}

fn get_f64(raw: &Value, key: &str) -> Result<Option<f64>> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| anyhow!("config key {key:?} must be a number, got {v}")),
    }
}

fn get_bool(raw: &Value, key: &str) -> Result<Option<bool>> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| anyhow!("config key {key:?} must be true or false, got {v}")),
    }
}

/// `eos_token_id` may be null, an integer or a list of integers.
pub(crate) fn parse_token_ids(value: Option<&Value>, key: &str) -> Result<Vec<i64>> {
    match value {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| anyhow!("{key:?} must hold integers, got {v}"))
            })
            .collect(),
        Some(v) => Ok(vec![v.as_i64().ok_or_else(|| {
            anyhow!("{key:?} must be an integer or a list, got {v}")
        })?]),
    }
}

fn parse_rope_scaling(raw: &Value) -> Result<RopeScaling> {
    let scaling = match raw.get("rope_scaling") {
        None | Some(Value::Null) => return Ok(RopeScaling::None),
        Some(v) => v,
    };
    // transformers accepts both `rope_type` and the older `type`.
    let rope_type = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("rope_scaling has no \"rope_type\": {scaling}"))?;
    match rope_type {
        "default" => Ok(RopeScaling::None),
        "llama3" => {
            let num = |key: &str| -> Result<f64> {
                get_f64(scaling, key)?.ok_or_else(|| anyhow!("rope_scaling (llama3) is missing {key:?}"))
            };
            let original = get_usize(scaling, "original_max_position_embeddings")?
                .ok_or_else(|| anyhow!("rope_scaling (llama3) is missing \"original_max_position_embeddings\""))?;
            let scaling = RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: original,
            };
            if let RopeScaling::Llama3 { low_freq_factor, high_freq_factor, factor, .. } = scaling {
                if high_freq_factor <= low_freq_factor || factor <= 0.0 {
                    bail!("rope_scaling (llama3) needs factor > 0 and high_freq_factor > low_freq_factor");
                }
            }
            Ok(scaling)
        }
        other => bail!("unsupported rope_type {other:?} in rope_scaling (supported: none, \"default\", \"llama3\")"),
    }
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
        if let Some(act) = raw.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                bail!("unsupported hidden_act {act:?} (only \"silu\")");
            }
        }
        let attention_bias = match model_type {
            ModelType::Qwen2 => true,
            ModelType::Llama => {
                // Llama's attention_bias also puts a bias on o_proj; no released Llama 3 uses it.
                if get_bool(&raw, "attention_bias")?.unwrap_or(false) {
                    bail!("unsupported: llama with attention_bias = true");
                }
                false
            }
        };
        if get_bool(&raw, "mlp_bias")?.unwrap_or(false) {
            bail!("unsupported: mlp_bias = true");
        }
        if model_type == ModelType::Qwen2 && get_bool(&raw, "use_sliding_window")?.unwrap_or(false)
        {
            bail!("unsupported: qwen2 with use_sliding_window = true");
        }
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
        let default_max_pos = match model_type {
            ModelType::Llama => 2048,
            ModelType::Qwen2 => 32768,
        };
        Ok(ModelConfig {
            model_type,
            vocab_size: require_usize(&raw, "vocab_size")?,
            hidden_size,
            intermediate_size: require_usize(&raw, "intermediate_size")?,
            num_hidden_layers: require_usize(&raw, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: get_f64(&raw, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: get_f64(&raw, "rope_theta")?.unwrap_or(10000.0),
            rope_scaling: parse_rope_scaling(&raw)?,
            tie_word_embeddings: get_bool(&raw, "tie_word_embeddings")?.unwrap_or(false),
            attention_bias,
            max_position_embeddings: get_usize(&raw, "max_position_embeddings")?
                .unwrap_or(default_max_pos),
            bos_token_id: raw.get("bos_token_id").and_then(Value::as_i64),
            eos_token_ids: parse_token_ids(raw.get("eos_token_id"), "eos_token_id")?,
            raw,
        })
    }

    /// config.json for this model: the original keys, overwritten by the current fields
    /// (`head_dim` always explicit, since pruning breaks head_dim = hidden / heads).
    pub fn to_hf_json(&self) -> Value {
        let mut out = match &self.raw {
            Value::Object(map) => map.clone(),
            _ => serde_json::Map::new(),
        };
        let mut set = |k: &str, v: Value| {
            out.insert(k.to_string(), v);
        };
        set("model_type", json!(self.model_type.as_str()));
        set("architectures", json!([self.model_type.hf_architecture()]));
        set("vocab_size", json!(self.vocab_size));
        set("hidden_size", json!(self.hidden_size));
        set("intermediate_size", json!(self.intermediate_size));
        set("num_hidden_layers", json!(self.num_hidden_layers));
        set("num_attention_heads", json!(self.num_attention_heads));
        set("num_key_value_heads", json!(self.num_key_value_heads));
        set("head_dim", json!(self.head_dim));
        set("hidden_act", json!("silu"));
        set("rms_norm_eps", json!(self.rms_norm_eps));
        set("rope_theta", json!(self.rope_theta));
        set(
            "rope_scaling",
            match self.rope_scaling {
                RopeScaling::None => Value::Null,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                } => json!({
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                }),
            },
        );
        set("tie_word_embeddings", json!(self.tie_word_embeddings));
        if self.model_type == ModelType::Llama {
            set("attention_bias", json!(false));
        }
        set(
            "max_position_embeddings",
            json!(self.max_position_embeddings),
        );
        set("bos_token_id", json!(self.bos_token_id));
        set(
            "eos_token_id",
            match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => json!(one),
                many => json!(many),
            },
        );
        Value::Object(out)
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
    fn counts_parameters_by_hand() {
        let c = ModelConfig::from_json_str(&tiny()).unwrap();
        // embed 80 + norms 8+8 + q 64 + k 32 + v 32 + o 64 + mlp 3*96 + final norm 8 + lm_head 80
        assert_eq!(c.param_count(), 80 + 16 + 64 + 32 + 32 + 64 + 288 + 8 + 80);
    }
}
