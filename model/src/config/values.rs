//! Typed reads of config.json values. A key of the wrong type is an error naming the key and
//! what it held, never a silent default; an absent or null key is `None` (the caller picks
//! transformers' default).
use anyhow::{anyhow, bail, Result};
use serde_json::Value;

pub(super) fn get_usize(raw: &Value, key: &str) -> Result<Option<usize>> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| anyhow!("config key {key:?} must be a non-negative integer, got {v}")),
    }
}

pub(super) fn require_usize(raw: &Value, key: &str) -> Result<usize> {
    let n = get_usize(raw, key)?
        .ok_or_else(|| anyhow!("config is missing the required key {key:?}"))?;
    if n == 0 {
        bail!("config key {key:?} must be positive, got 0");
    }
    Ok(n)
}

pub(super) fn get_f64(raw: &Value, key: &str) -> Result<Option<f64>> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| anyhow!("config key {key:?} must be a number, got {v}")),
    }
}

pub(super) fn get_bool(raw: &Value, key: &str) -> Result<Option<bool>> {
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
