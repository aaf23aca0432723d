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
//! the text back gives the same recipe. Tables and keys come in the order of the structs (the
//! stages' order); keys that are not set are printed as comments.
use std::path::Path;

use anyhow::{Context, Result};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value as Json;

/// Where a value of the resolved recipe came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Default,
    Recipe,
    Flag,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Default => "default",
            Origin::Recipe => "recipe",
            Origin::Flag => "flag",
        }
    }
}

/// `recipe` (read from `file`) as TOML, each value marked with `origin(dotted key)`.
pub(super) fn annotated_toml(recipe: &impl serde::Serialize, file: Option<&Path>, origin: impl Fn(&str) -> Origin) -> Result<String> {
    // Through JSON text: it keeps unset options (null), which a TOML serializer drops, and its
    // fields come in struct order, which `Node` keeps.
    let json = serde_json::to_string(recipe).context("serializing the recipe")?;
    let Node::Table(top) = serde_json::from_str::<Node>(&json).context("reading the serialized recipe")? else {
        anyhow::bail!("the recipe did not serialize to a table");
    };

    let mut out = String::new();
    out.push_str("# The resolved recipe");
    if let Some(file) = file {
        out.push_str(&format!(" of {}", file.display()));
    }
    out.push_str(" (`overfill config` prints it; every stage writes it next to its output).\n");
    out.push_str("# Each value says where it came from: `recipe` (the file), `flag` (the command line) or\n");
    out.push_str("# `default` (built in). Keys that are not set are shown as comments. Feed it back with --config.\n");

    // Top-level values first: after a table header every key belongs to that table.
    for (key, node) in &top {
        if let Node::Value(value) = node {
            out.push_str(&line(key, value, origin(key))?);
        }
    }
    for (key, node) in &top {
        match node {
            Node::Table(fields) => {
                out.push_str(&format!("\n[{key}]\n"));
                for (field, node) in fields {
                    // A list or table inside a section is a TOML value (`[]`, `{ a = 1 }`).
                    let value = node.to_json();
                    out.push_str(&line(field, &value, origin(&format!("{key}.{field}")))?);
                }
            }
            Node::Tables(items) => {
                if items.is_empty() {
                    out.push_str(&format!("\n# [[{key}]]: none{}# {}\n", pad(key.len() + 11), origin(key).as_str()));
                }
                for fields in items {
                    out.push_str(&format!("\n[[{key}]]{}# {}\n", pad(key.len() + 4), origin(key).as_str()));
                    for (field, value) in fields {
                        out.push_str(&line(field, value, origin(key))?);
                    }
                }
            }
            Node::Value(_) => {}
        }
    }
    Ok(out)
}

/// A serialized recipe with fields in struct order: a value, a table, or a list of tables
/// (`[[sources]]`; an empty list of tables is `sources = []`, printed as a comment).
enum Node {
    Value(Json),
    Table(Vec<(String, Node)>),
    Tables(Vec<Vec<(String, Json)>>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Node, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a serialized recipe")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Node, A::Error> {
        let mut fields = Vec::new();
        while let Some((key, node)) = map.next_entry::<String, Node>()? {
            fields.push((key, node));
        }
        Ok(Node::Table(fields))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        // Tables in a list: `[[key]]` entries (one level deep, like `[[sources]]`).
        if items.is_empty() || items.iter().all(|i| matches!(i, Node::Table(_))) {
            let tables = items
                .into_iter()
                .map(|item| match item {
                    Node::Table(fields) => fields.iter().map(|(k, v)| (k.clone(), v.to_json())).collect(),
                    _ => Vec::new(),
                })
                .collect();
            return Ok(Node::Tables(tables));
        }
        Ok(Node::Value(Json::Array(items.iter().map(Node::to_json).collect())))
    }

    fn visit_bool<E>(self, v: bool) -> std::result::Result<Node, E> {
        Ok(Node::Value(Json::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Node, E> {
        Ok(Node::Value(Json::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Node, E> {
        Ok(Node::Value(Json::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Node, E> {
        Ok(Node::Value(Json::from(v)))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Node, E> {
        Ok(Node::Value(Json::String(v.to_string())))
    }
    fn visit_unit<E>(self) -> std::result::Result<Node, E> {
        Ok(Node::Value(Json::Null))
    }
}

impl Node {
    fn to_json(&self) -> Json {
        match self {
            Node::Value(v) => v.clone(),
            Node::Table(fields) => Json::Object(fields.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()),
            Node::Tables(items) => Json::Array(items.iter().map(|f| Json::Object(f.iter().cloned().collect())).collect()),
        }
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
