//! The resolved recipe as TOML, each value marked with where it came from:
//!
//! ```toml
//! [preprocess]
//! max_seq_length = 1024                 # flag
//! seed = 0                              # recipe
//! rows_per_shard = 50000                # default
//! # max_context_length = (not set)      # default
//! ```
//!
//! Values go through serde (the same `Serialize` the reader's `Deserialize` mirrors), so reading
//! the text back gives the same recipe. Keys that are not set are printed as comments.
use anyhow::{Context, Result};
use serde_json::Value as Json;

use super::{Origin, Recipe};

/// Top-level keys in print order (anything else after them).
const ORDER: &[&str] = &["name", "model", "data", "sources", "preprocess", "calibrate", "prune", "train"];

pub(super) fn annotated_toml(recipe: &Recipe) -> Result<String> {
    // JSON keeps unset options (null), which a TOML serializer drops.
    let Json::Object(top) = serde_json::to_value(recipe).context("serializing the recipe")? else {
        anyhow::bail!("the recipe did not serialize to a table");
    };
    let mut keys: Vec<&String> = ORDER.iter().filter_map(|k| top.get_key_value(*k).map(|(k, _)| k)).collect();
    keys.extend(top.keys().filter(|k| !ORDER.contains(&k.as_str())));

    let mut out = String::new();
    out.push_str("# The resolved recipe");
    if let Some(file) = recipe.file() {
        out.push_str(&format!(" of {}", file.display()));
    }
    out.push_str(" (`overfill config` prints it; every stage writes it next to its output).\n");
    out.push_str("# Each value says where it came from: `recipe` (the file), `flag` (the command line) or\n");
    out.push_str("# `default` (built in). Keys that are not set are shown as comments. Feed it back with --config.\n");

    // Top-level scalars first: after a table header every key belongs to that table.
    for key in &keys {
        let value = &top[key.as_str()];
        if !value.is_object() && !is_table_array(value) {
            out.push_str(&line(key, value, recipe.origin(key))?);
        }
    }
    for key in &keys {
        let value = &top[key.as_str()];
        match value {
            Json::Object(table) => {
                out.push_str(&format!("\n[{key}]\n"));
                for (field, v) in table {
                    out.push_str(&line(field, v, recipe.origin(&format!("{key}.{field}")))?);
                }
            }
            Json::Array(items) if is_table_array(value) => {
                if items.is_empty() {
                    out.push_str(&format!("\n# [[{key}]]: none{}# {}\n", pad(key.len() + 11), recipe.origin(key).as_str()));
                }
                for item in items {
                    out.push_str(&format!("\n[[{key}]]{}# {}\n", pad(key.len() + 4), recipe.origin(key).as_str()));
                    if let Json::Object(table) = item {
                        for (field, v) in table {
                            out.push_str(&line(field, v, recipe.origin(key))?);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// `[[sources]]`-like: a list of tables (an empty `sources` list is one too).
fn is_table_array(value: &Json) -> bool {
    match value {
        Json::Array(items) => items.is_empty() || items.iter().all(Json::is_object),
        _ => false,
    }
}

/// `key = value   # origin`, or `# key = (not set)   # origin` for an unset option.
fn line(key: &str, value: &Json, origin: Origin) -> Result<String> {
    let assignment = match value {
        Json::Null => format!("# {key} = (not set)"),
        v => {
            let toml_value = toml::Value::try_from(v).with_context(|| format!("{key}: not representable in TOML"))?;
            format!("{key} = {toml_value}")
        }
    };
    let width = assignment.chars().count();
    Ok(format!("{assignment}{}# {}\n", pad(width), origin.as_str()))
}

/// Spaces that align the origin comments at column 40 (at least two).
fn pad(width: usize) -> String {
    " ".repeat(40usize.saturating_sub(width).max(2))
}
