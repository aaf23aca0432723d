//! Error messages for a recipe that does not fit its types: which file, line, table and key, and
//! for a misspelt key or value the closest valid one ("did you mean `max_seq_length`?").
//!
//! serde reports what is wrong ("unknown field `max_seq_lenght`, expected one of ...") and the toml
//! parser where (a byte span); the table and key are found by walking the spanned document to
//! that position.
use std::path::Path;

use toml::de::{DeTable, DeValue};

/// One step of a path into the document: a key, or the index of an `[[array]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Part {
    Key(String),
    Index(usize),
}

/// A deserialization error of the recipe file `file` (text `text`), as one message:
/// `FILE:LINE:COL: unknown key `x` in [table]; did you mean `y`?` plus the line itself.
pub(super) fn file_error(file: &Path, text: &str, err: &toml::de::Error) -> String {
    let Some(span) = err.span() else {
        return format!("{}: {}", file.display(), err.message().trim());
    };
    let (line, col) = line_col(text, span.start);
    let path = path_at(text, span.start);
    let snippet = text.lines().nth(line - 1).unwrap_or("").trim_end();
    format!("{}:{line}:{col}: {}\n{line:>5} | {snippet}", file.display(), describe(&path, err, None))
}

/// What is wrong, and where in the recipe: `path` is the position of the error (empty when not
/// known); `key` a dotted key that names it instead (from `--set`).
pub(super) fn describe(path: &[Part], err: &toml::de::Error, key: Option<&str>) -> String {
    let message = err.message().trim();
    let path: Vec<Part> = match key {
        Some(k) if path.is_empty() => k.split('.').map(|p| Part::Key(p.to_string())).collect(),
        _ => path.to_vec(),
    };
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let names = backticked(rest);
        let Some((unknown, valid)) = names.split_first() else { return message.to_string() };
        // The table holding the unknown key: everything before it in the path.
        let table: Vec<Part> = match path.iter().position(|p| *p == Part::Key(unknown.clone())) {
            Some(i) => path[..i].to_vec(),
            None => path[..path.len().saturating_sub(1)].to_vec(),
        };
        return unknown_key(unknown, valid, &table);
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        let names = backticked(rest);
        if let Some((unknown, valid)) = names.split_first() {
            let mut text = format!("{}: unknown value `{unknown}` (expected {})", location(&path), list(valid));
            if let Some(best) = closest(unknown, valid) {
                text.push_str(&format!("; did you mean `{best}`?"));
            }
            return text;
        }
    }
    if let Some(rest) = message.strip_prefix("missing field ") {
        return format!("{}: missing key {rest}", location(&path));
    }
    if message == "duplicate key" {
        return format!("{}: the key is given twice", location(&path));
    }
    if path.is_empty() {
        return message.to_string();
    }
    format!("{}: {}", location(&path), plain_types(message))
}

fn unknown_key(unknown: &str, valid: &[String], table: &[Part]) -> String {
    let best = closest(unknown, valid);
    if table.is_empty() {
        // At the top level every valid name but `name` is a table.
        return match best {
            Some("name") => format!("unknown top-level key `{unknown}`; did you mean `name`?"),
            Some(t) => format!("unknown table [{unknown}]; did you mean [{t}]?"),
            None => format!("unknown table or key `{unknown}` at the top level (valid: {})", list(valid)),
        };
    }
    match best {
        Some(b) => format!("unknown key `{unknown}` in {}; did you mean `{b}`?", table_name(table)),
        None => format!("unknown key `{unknown}` in {} (valid keys: {})", table_name(table), list(valid)),
    }
}

/// `[preprocess] max_seq_length`, `[[sources]] #2 fraction`, `name`.
fn location(path: &[Part]) -> String {
    match path.split_last() {
        None => "the recipe".to_string(),
        Some((Part::Key(key), [])) => format!("`{key}`"),
        Some((Part::Key(key), table)) => format!("{} {key}", table_name(table)),
        Some((Part::Index(_), _)) => table_name(path),
    }
}

/// `[preprocess]`, `[[sources]] #2`.
fn table_name(path: &[Part]) -> String {
    let mut keys = Vec::new();
    let mut entry = None;
    for part in path {
        match part {
            Part::Key(k) => keys.push(k.as_str()),
            Part::Index(i) => entry = Some(i + 1),
        }
    }
    match entry {
        Some(n) => format!("[[{}]] #{n}", keys.join(".")),
        None => format!("[{}]", keys.join(".")),
    }
}

/// The closest candidate to a misspelt name, if one is close enough to be a likely typo.
pub(super) fn closest<'a>(name: &str, candidates: &'a [String]) -> Option<&'a str> {
    let name = name.to_ascii_lowercase().replace('-', "_");
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(&name, &c.to_ascii_lowercase().replace('-', "_")), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.as_str())
}

/// The names between backticks in serde's messages: "`x`, expected one of `a`, `b`" -> [x, a, b].
fn backticked(text: &str) -> Vec<String> {
    text.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        return "none".to_string();
    }
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

/// serde names Rust types ("expected usize"); say what to write instead.
fn plain_types(message: &str) -> String {
    let mut text = message.to_string();
    for (rust, plain) in [
        ("expected usize", "expected a whole number >= 0"),
        ("expected u64", "expected a whole number >= 0"),
        ("expected u32", "expected a whole number >= 0"),
        ("expected i64", "expected a whole number"),
        ("expected i32", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ] {
        if text.ends_with(rust) {
            text = format!("{}{plain}", &text[..text.len() - rust.len()]);
        }
    }
    text
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, before[line_start..].chars().count() + 1)
}

/// Line and column of a dotted key (`prune.width_hidden`) in a recipe's text.
pub(super) fn position_of(text: &str, key: &str) -> Option<(usize, usize)> {
    let doc = DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref() == part)?;
        if parts.peek().is_none() {
            return Some(line_col(text, k.span().start));
        }
        table = v.get_ref().as_table()?;
    }
    None
}

/// The path (tables, `[[array]]` entries, key) to the key or value at byte `pos` of `text`.
pub(super) fn path_at(text: &str, pos: usize) -> Vec<Part> {
    let Ok(doc) = DeTable::parse(text) else { return Vec::new() };
    let mut best = Vec::new();
    walk_table(doc.get_ref(), pos, &mut Vec::new(), &mut best);
    best
}

fn walk_table(table: &DeTable<'_>, pos: usize, path: &mut Vec<Part>, best: &mut Vec<Part>) {
    for (key, value) in table.iter() {
        path.push(Part::Key(key.get_ref().to_string()));
        if key.span().contains(&pos) || value.span().contains(&pos) {
            *best = path.clone();
        }
        walk_value(value.get_ref(), pos, path, best);
        path.pop();
    }
}

fn walk_value(value: &DeValue<'_>, pos: usize, path: &mut Vec<Part>, best: &mut Vec<Part>) {
    match value {
        DeValue::Table(t) => walk_table(t, pos, path, best),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Part::Index(i));
                if item.span().contains(&pos) && item.get_ref().is_table() {
                    *best = path.clone();
                }
                walk_value(item.get_ref(), pos, path, best);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Every key a recipe file sets, dotted (`name`, `preprocess.seed`); an `[[array]]` of tables
/// counts as one key (`sources`).
pub(super) fn leaf_keys(table: &toml::Table) -> Vec<String> {
    let mut keys = Vec::new();
    for (key, value) in table {
        match value {
            toml::Value::Table(inner) => keys.extend(inner.keys().map(|k| format!("{key}.{k}"))),
            _ => keys.push(key.clone()),
        }
    }
    keys
}
