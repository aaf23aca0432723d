//! Writing a config back as config.json, in its source's format: keys this crate does not model
//! are kept, and RoPE keeps the spelling (and, when unchanged, the very entries) it was read in.
use serde_json::{json, Map, Value};

use super::rope::{parse_rope, rope_object};
use super::{ModelConfig, ModelType, RopeFormat};

impl ModelConfig {
    /// config.json for this model: the original keys, overwritten by the current fields
    /// (`head_dim` always explicit, since pruning breaks head_dim = hidden / heads). RoPE is
    /// written in the source's spelling; when it is unchanged, the source's entries are copied
    /// as they were (same keys, same numbers).
    pub fn to_hf_json(&self) -> Value {
        let mut out = match &self.raw {
            Value::Object(map) => map.clone(),
            _ => Map::new(),
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
        set("tie_word_embeddings", json!(self.tie_word_embeddings));
        if self.model_type == ModelType::Llama {
            set("attention_bias", json!(false));
        }
        set(
            "max_position_embeddings",
            json!(self.max_position_embeddings),
        );
        // Only "full_attention" layers load, so the list is that, one per layer (a config whose
        // layer count was changed in code would otherwise contradict itself).
        if self.raw.get("layer_types").is_some_and(Value::is_array) {
            set(
                "layer_types",
                json!(vec!["full_attention"; self.num_hidden_layers]),
            );
        }
        set("bos_token_id", json!(self.bos_token_id));
        set(
            "eos_token_id",
            match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => json!(one),
                many => json!(many),
            },
        );
        let unchanged = parse_rope(&self.raw).ok()
            == Some((self.rope_theta, self.rope_scaling, self.rope_format));
        for key in ["rope_theta", "rope_scaling", "rope_parameters"] {
            out.remove(key);
        }
        let legacy = matches!(
            self.rope_format,
            RopeFormat::ThetaAndScaling | RopeFormat::Both
        );
        let parameters = matches!(self.rope_format, RopeFormat::Parameters | RopeFormat::Both);
        if unchanged {
            for key in ["rope_theta", "rope_scaling", "rope_parameters"] {
                if let Some(v) = self.raw.get(key) {
                    out.insert(key.to_string(), v.clone());
                }
            }
        } else {
            if legacy {
                out.insert("rope_theta".into(), json!(self.rope_theta));
                out.insert(
                    "rope_scaling".into(),
                    rope_object(self.rope_theta, self.rope_scaling, false),
                );
            }
            if parameters {
                out.insert(
                    "rope_parameters".into(),
                    rope_object(self.rope_theta, self.rope_scaling, true),
                );
            }
        }
        Value::Object(out)
    }
}
