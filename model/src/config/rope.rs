//! RoPE settings: reading `rope_theta` + `rope_scaling` (transformers 4.x, the hub's original
//! files) and `rope_parameters` (transformers 5.x), checking that a config holding both agrees
//! with itself, and building the rope objects written back on save.
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

use super::values::{get_f64, get_usize};

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
pub(super) fn parse_rope(raw: &Value) -> Result<(f64, RopeScaling, RopeFormat)> {
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
pub(super) fn rope_object(theta: f64, scaling: RopeScaling, with_theta: bool) -> Value {
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
