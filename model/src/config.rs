//! `config.json` of a Hugging Face Llama 3.x / Qwen2.5 checkpoint, and the tensor names and
//! shapes it implies (the shape-only path: no weights are touched).
//!
//! Two spellings of RoPE occur in the wild: transformers 4.x and the hub's original files write
//! `rope_theta` + `rope_scaling`, transformers 5.x writes one `rope_parameters` object. Both are
//! read; a config holding both must agree with itself; a saved config keeps its source's spelling.
//!
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
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

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

/// The RoPE frequency scaling. `None` is a missing/null `rope_scaling` and `rope_type: "default"`.
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

/// Where config.json keeps the RoPE settings; a saved config keeps its source's spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeFormat {
    /// `rope_theta` + `rope_scaling` (transformers 4.x, the hub's original files).
    ThetaAndScaling,
    /// One `rope_parameters` object (transformers 5.x).
    Parameters,
    /// Both spellings, checked to agree.
    Both,
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

/// The RoPE settings of one spelling: theta when it names one, and the scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RopeSettings {
    theta: Option<f64>,
    scaling: RopeScaling,
}

/// Reads a rope object (`rope_scaling` or `rope_parameters`, named `key` in messages). Keys the
/// rope type does not use are an error: they would mean a setting that is silently dropped.
fn parse_rope_object(obj: &Map<String, Value>, key: &str) -> Result<RopeSettings> {
    let as_value = Value::Object(obj.clone());
    let type_of = |k: &str| -> Result<Option<&str>> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => bail!("config key \"{key}.{k}\" must be a string, got {v}"),
        }
    };
    // transformers accepts both `rope_type` and the older `type`.
    let rope_type = match (type_of("rope_type")?, type_of("type")?) {
        (Some(a), Some(b)) if a != b => {
            bail!("config keys \"{key}.rope_type\" ({a:?}) and \"{key}.type\" ({b:?}) disagree")
        }
        (Some(a), _) | (None, Some(a)) => a,
        // transformers 5 always writes rope_type; a bare rope_parameters means the default.
        (None, None) if key == "rope_parameters" => "default",
        (None, None) => bail!("{key} has no \"rope_type\": {as_value}"),
    };
    let num = |k: &str| -> Result<Option<f64>> {
        get_f64(&as_value, k).with_context(|| format!("in {key}"))
    };
    let theta = num("rope_theta")?;
    if let Some(theta) = theta {
        if !(theta > 0.0 && theta.is_finite()) {
            bail!("config key \"{key}.rope_theta\" must be a positive number, got {theta}");
        }
    }
    if let Some(f) = num("partial_rotary_factor")? {
        if f != 1.0 {
            bail!("unsupported: \"{key}.partial_rotary_factor\" = {f} (RoPE on part of each head is not implemented)");
        }
    }
    let mut used = vec!["rope_type", "type", "rope_theta", "partial_rotary_factor"];
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "llama3" => {
            let required = |k: &str| -> Result<f64> {
                num(k)?.ok_or_else(|| anyhow!("{key} (llama3) is missing {k:?}"))
            };
            let original = get_usize(&as_value, "original_max_position_embeddings")
                .with_context(|| format!("in {key}"))?
                .ok_or_else(|| {
                    anyhow!("{key} (llama3) is missing \"original_max_position_embeddings\"")
                })?;
            let (factor, low_freq_factor, high_freq_factor) = (
                required("factor")?,
                required("low_freq_factor")?,
                required("high_freq_factor")?,
            );
            if high_freq_factor <= low_freq_factor || factor <= 0.0 || original == 0 {
                bail!("{key} (llama3) needs factor > 0, high_freq_factor > low_freq_factor and original_max_position_embeddings > 0");
            }
            used.extend([
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ]);
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            }
        }
        other => bail!(
            "unsupported rope_type {other:?} in config key \"{key}.rope_type\" (supported: \"default\", \"llama3\")"
        ),
    };
    if let Some(extra) = obj.keys().find(|k| !used.contains(&k.as_str())) {
        bail!(
            "unsupported: config key \"{key}.{extra}\" is not used by rope_type {rope_type:?} (its meaning would be dropped)"
        );
    }
    Ok(RopeSettings { theta, scaling })
}

/// theta, scaling and spelling of a whole config. transformers' default theta is 10000.
fn parse_rope(raw: &Value) -> Result<(f64, RopeScaling, RopeFormat)> {
    let top_theta = get_f64(raw, "rope_theta")?;
    if let Some(theta) = top_theta {
        if !(theta > 0.0 && theta.is_finite()) {
            bail!("config key \"rope_theta\" must be a positive number, got {theta}");
        }
    }
    let legacy_scaling = match raw.get("rope_scaling") {
        None | Some(Value::Null) => None,
        Some(Value::Object(obj)) => Some(parse_rope_object(obj, "rope_scaling")?),
        Some(v) => bail!("config key \"rope_scaling\" must be an object or null, got {v}"),
    };
    let has_legacy = raw.get("rope_theta").is_some() || raw.get("rope_scaling").is_some();
    let legacy = RopeSettings {
        theta: match (top_theta, legacy_scaling.and_then(|s| s.theta)) {
            (Some(a), Some(b)) if a != b => bail!(
                "config keys \"rope_theta\" ({a}) and \"rope_scaling.rope_theta\" ({b}) disagree"
            ),
            (a, b) => a.or(b),
        },
        scaling: legacy_scaling.map_or(RopeScaling::None, |s| s.scaling),
    };
    let parameters = match raw.get("rope_parameters") {
        None | Some(Value::Null) => None,
        Some(Value::Object(obj)) => {
            if obj.values().any(Value::is_object) {
                bail!("unsupported: config key \"rope_parameters\" holds one rope object per layer type; only one shared rope is implemented");
            }
            Some(parse_rope_object(obj, "rope_parameters")?)
        }
        Some(v) => bail!("config key \"rope_parameters\" must be an object or null, got {v}"),
    };
    const DEFAULT_THETA: f64 = 10000.0;
    Ok(match parameters {
        None => (
            legacy.theta.unwrap_or(DEFAULT_THETA),
            legacy.scaling,
            RopeFormat::ThetaAndScaling,
        ),
        Some(params) if !has_legacy => (
            params.theta.unwrap_or(DEFAULT_THETA),
            params.scaling,
            RopeFormat::Parameters,
        ),
        Some(params) => {
            let theta_disagrees =
                matches!((legacy.theta, params.theta), (Some(a), Some(b)) if a != b);
            // A present `rope_scaling` key (null included) states the scaling.
            let scaling_disagrees =
                raw.get("rope_scaling").is_some() && legacy.scaling != params.scaling;
            if theta_disagrees || scaling_disagrees {
                bail!(
                    "config has both \"rope_theta\"/\"rope_scaling\" (transformers 4.x) and \"rope_parameters\" (5.x), and they disagree: \
                     rope_theta {} with rope_scaling {} vs rope_parameters {}; remove the wrong one",
                    raw.get("rope_theta").unwrap_or(&Value::Null),
                    raw.get("rope_scaling").unwrap_or(&Value::Null),
                    raw.get("rope_parameters").unwrap_or(&Value::Null),
                );
            }
            (
                params.theta.or(legacy.theta).unwrap_or(DEFAULT_THETA),
                params.scaling,
                RopeFormat::Both,
            )
        }
    })
}

/// The rope object of `scaling` with `theta` for `rope_parameters` (`with_theta`) or
/// `rope_scaling` (null when there is no scaling).
fn rope_object(theta: f64, scaling: RopeScaling, with_theta: bool) -> Value {
    let mut obj = match scaling {
        RopeScaling::None if !with_theta => return Value::Null,
        RopeScaling::None => json!({ "rope_type": "default" }),
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
    };
    if with_theta {
        obj["rope_theta"] = json!(theta);
    }
    obj
}

/// Checks the keys that would change the numerics if they were honoured (see the table above).
fn check_unimplemented_settings(raw: &Value, model_type: ModelType) -> Result<()> {
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

    /// Top-level keys of the source config that are in no row of the table above: kept and
    /// written back, but nothing here reads them (commands warn about them).
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
