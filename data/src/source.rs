//! Input files and their readers: OpenHermes-style JSON arrays (streamed), JSONL, and
//! Infinity-Instruct-style Parquet. Either row schema works in every format:
//! `conversations: [{from, value}]` or `messages: [{role, content}]`.
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::recipe::SourceSpec;

mod parquet_input;

/// A JSON array element larger than this means the file is not what we think it is.
const MAX_JSON_ROW_BYTES: usize = 64 << 20;

/// File formats (the row schema is detected per row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Auto,
    /// One JSON array of row objects (OpenHermes-2.5).
    Json,
    /// One JSON object per line.
    Jsonl,
    /// Parquet (Infinity-Instruct).
    Parquet,
}

impl Format {
    /// `auto`, `openhermes`/`json`, `jsonl`, `infinity`/`parquet`.
    pub fn parse(s: &str) -> Result<Format> {
        Ok(match s {
            "auto" => Format::Auto,
            "openhermes" | "json" => Format::Json,
            "jsonl" | "ndjson" => Format::Jsonl,
            "infinity" | "parquet" => Format::Parquet,
            other => bail!("unknown input format {other:?} (expected auto, openhermes, infinity, jsonl or parquet)"),
        })
    }
}

/// One input file of a source.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InputFile {
    pub path: PathBuf,
    pub format: Format,
    /// The source's name (written to the `source` column).
    pub source: String,
    /// Keep this fraction of the rows (seeded, by row id).
    pub fraction: f64,
    pub size: u64,
}

/// Expand `[[sources]]` (paths or globs) into files, checking that each exists and is readable
/// and detecting its format. Fails before any work is done.
pub fn expand_sources(sources: &[SourceSpec]) -> Result<Vec<InputFile>> {
    if sources.is_empty() {
        bail!("no input: give --input or [[sources]] in the recipe");
    }
    let mut files = Vec::new();
    for spec in sources {
        let mut paths: Vec<PathBuf> = if spec.path.contains(['*', '?', '[']) {
            glob::glob(&spec.path)
                .with_context(|| format!("bad glob {}", spec.path))?
                .collect::<std::result::Result<_, _>>()
                .with_context(|| format!("listing {}", spec.path))?
        } else {
            vec![PathBuf::from(&spec.path)]
        };
        if paths.is_empty() {
            bail!("input glob {} matches no file", spec.path);
        }
        paths.sort();
        let format = Format::parse(spec.format.as_deref().unwrap_or("auto"))?;
        let fraction = spec.fraction.unwrap_or(1.0);
        if !(fraction > 0.0 && fraction <= 1.0) {
            bail!("source {}: fraction must be in (0, 1], got {fraction}", spec.path);
        }
        for path in paths {
            let meta = std::fs::metadata(&path).with_context(|| format!("input file {} is missing", path.display()))?;
            if !meta.is_file() {
                bail!("input {} is not a file", path.display());
            }
            // Opening proves it is readable now rather than an hour into the run.
            File::open(&path).with_context(|| format!("input file {} is not readable", path.display()))?;
            let format = if format == Format::Auto { detect_format(&path)? } else { format };
            if format == Format::Parquet {
                parquet_input::check_schema(&path)?;
            }
            let source = spec.name.clone().unwrap_or_else(|| default_source_name(&path));
            files.push(InputFile { path, format, source, fraction, size: meta.len() });
        }
    }
    Ok(files)
}

fn default_source_name(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "input".into())
}

/// By extension, then by the first non-blank byte (`[` → JSON array, `{` → JSONL).
pub fn detect_format(path: &Path) -> Result<Format> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "parquet" => return Ok(Format::Parquet),
        "jsonl" | "ndjson" => return Ok(Format::Jsonl),
        _ => {}
    }
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut head = [0u8; 4096];
    let n = file.read(&mut head).with_context(|| format!("reading {}", path.display()))?;
    if head[..n].starts_with(b"PAR1") {
        return Ok(Format::Parquet);
    }
    match head[..n].iter().copied().find(|b| !b.is_ascii_whitespace() && *b != 0xEF && *b != 0xBB && *b != 0xBF) {
        Some(b'[') => Ok(Format::Json),
        Some(b'{') => Ok(Format::Jsonl),
        _ => bail!("cannot detect the format of {} (not a JSON array, JSONL or Parquet); pass --format", path.display()),
    }
}

/// A conversation as found in the file, roles not yet normalised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawConversation {
    /// `(role name, content)` per turn.
    pub turns: Vec<(String, String)>,
    pub system_prompt: Option<String>,
    pub language: Option<String>,
}

/// What a reader hands on for one row: JSON bytes (parsed later, in parallel) or an already
/// decoded Parquet row.
#[derive(Debug)]
pub enum RawPayload {
    Json(Vec<u8>),
    Decoded(Result<RawConversation, String>),
}

/// One row of one input file.
#[derive(Debug)]
pub struct RawRecord {
    /// Position of the row in the whole input (all files of all sources, in order).
    pub row_id: u64,
    pub file_index: usize,
    /// Row index within its file.
    pub row_in_file: u64,
    /// Byte offset in the file (JSON formats).
    pub byte_offset: Option<u64>,
    pub payload: RawPayload,
}

#[derive(Deserialize)]
struct JsonTurn {
    #[serde(alias = "role")]
    from: String,
    #[serde(alias = "content")]
    value: String,
}

#[derive(Deserialize)]
struct JsonRow {
    #[serde(default)]
    conversations: Option<Vec<JsonTurn>>,
    #[serde(default)]
    messages: Option<Vec<JsonTurn>>,
    #[serde(default)]
    system_prompt: Option<String>,
    #[serde(default, alias = "language", alias = "lang")]
    langdetect: Option<String>,
}

/// Parse one row object. Errors name what is wrong (bad JSON, missing field, wrong type,
/// invalid UTF-8).
pub fn parse_json_row(bytes: &[u8]) -> Result<RawConversation, String> {
    let row: JsonRow = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let turns = match (row.conversations, row.messages) {
        (Some(turns), _) | (None, Some(turns)) => turns,
        (None, None) => return Err("row has neither `conversations` nor `messages`".into()),
    };
    Ok(RawConversation {
        turns: turns.into_iter().map(|t| (t.from, t.value)).collect(),
        system_prompt: row.system_prompt,
        language: row.langdetect,
    })
}

/// Stream the rows of one file into `sink`, skipping the first `skip` rows (already done in an
/// earlier run) without decoding them. `bytes_read` advances for the progress bar. Returns the
/// number of rows in the file.
pub fn read_file(
    file: &InputFile,
    file_index: usize,
    first_row_id: u64,
    skip: u64,
    bytes_read: &AtomicU64,
    sink: &mut dyn FnMut(RawRecord) -> Result<()>,
) -> Result<u64> {
    let mut rows = RowSink { file_index, first_row_id, skip, sink };
    match file.format {
        Format::Json => read_json_array(file, bytes_read, &mut rows),
        Format::Jsonl => read_jsonl(file, bytes_read, &mut rows),
        Format::Parquet => parquet_input::read(file, bytes_read, &mut rows),
        Format::Auto => bail!("format of {} not resolved", file.path.display()),
    }
}

/// Where the format readers hand their rows: numbers them and drops the first `skip` rows of
/// the file (already done in an earlier run).
struct RowSink<'a> {
    file_index: usize,
    first_row_id: u64,
    skip: u64,
    sink: &'a mut dyn FnMut(RawRecord) -> Result<()>,
}

impl RowSink<'_> {
    /// Whether row `row_in_file` is passed on (readers skip decoding the others).
    fn wants(&self, row_in_file: u64) -> bool {
        row_in_file >= self.skip
    }

    fn emit(&mut self, row_in_file: u64, byte_offset: Option<u64>, payload: RawPayload) -> Result<()> {
        if !self.wants(row_in_file) {
            return Ok(());
        }
        (self.sink)(RawRecord {
            row_id: self.first_row_id + row_in_file,
            file_index: self.file_index,
            row_in_file,
            byte_offset,
            payload,
        })
    }
}

fn open(file: &InputFile) -> Result<BufReader<File>> {
    let f = File::open(&file.path).with_context(|| format!("opening {}", file.path.display()))?;
    Ok(BufReader::with_capacity(1 << 20, f))
}

/// Scan a top-level JSON array element by element, keeping only one element in memory. The
/// scanner tracks strings and nesting depth only; each element's bytes are parsed later.
fn read_json_array(
    file: &InputFile,
    bytes_read: &AtomicU64,
    rows: &mut RowSink,
) -> Result<u64> {
    let mut reader = open(file)?;
    let path = file.path.display();
    let mut offset: u64 = 0;
    // Find the opening bracket.
    loop {
        let buf = reader.fill_buf().with_context(|| format!("reading {path}"))?;
        if buf.is_empty() {
            bail!("{path}: empty file, expected a JSON array");
        }
        match buf.iter().position(|b| !(b.is_ascii_whitespace() || matches!(b, 0xEF | 0xBB | 0xBF))) {
            Some(p) if buf[p] == b'[' => {
                reader.consume(p + 1);
                offset += p as u64 + 1;
                break;
            }
            Some(p) => bail!("{path}: expected a JSON array, found byte {:?} at offset {}", buf[p] as char, offset + p as u64),
            None => {
                let n = buf.len();
                reader.consume(n);
                offset += n as u64;
            }
        }
    }
    let mut row: u64 = 0;
    let mut element: Vec<u8> = Vec::new();
    // Scanner state, carried across buffer refills.
    let mut in_element = false;
    let mut element_start = 0u64;
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut finished = false;
    let mut reported = 0u64;
    while !finished {
        let buf = reader.fill_buf().with_context(|| format!("reading {path}"))?;
        if buf.is_empty() {
            // The array never closed: the file was cut short (usually an interrupted download),
            // so rows are missing and none of its counts can be trusted.
            let at = if in_element {
                format!("inside row {row}, which starts at byte offset {element_start}")
            } else {
                format!("after {row} complete rows")
            };
            bail!("{path}: the file ends at byte offset {offset}, {at}, before its JSON array is closed by `]`; it is truncated (an incomplete download?)");
        }
        let mut i = 0;
        let mut element_done = false;
        let keep = rows.wants(row);
        while i < buf.len() {
            let b = buf[i];
            if !in_element {
                match b {
                    b' ' | b'\n' | b'\r' | b'\t' | b',' => {}
                    b']' => {
                        finished = true;
                        i += 1;
                        break;
                    }
                    _ => {
                        in_element = true;
                        element_start = offset + i as u64;
                        depth = 0;
                        in_string = false;
                        escaped = false;
                        continue; // re-examine this byte as part of the element
                    }
                }
                i += 1;
                continue;
            }
            if in_string {
                // Jump to the next quote or backslash.
                match memchr::memchr2(b'"', b'\\', &buf[i..]) {
                    _ if escaped => {
                        escaped = false;
                        i += 1;
                    }
                    Some(p) => {
                        i += p;
                        if buf[i] == b'\\' {
                            escaped = true;
                        } else {
                            in_string = false;
                        }
                        i += 1;
                    }
                    None => i = buf.len(),
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' if depth > 0 => {
                    depth -= 1;
                    if depth == 0 {
                        i += 1;
                        element_done = true;
                        break;
                    }
                }
                b']' | b',' if depth == 0 => {
                    // A scalar element ends here (leave the byte for the outer loop).
                    element_done = true;
                    break;
                }
                _ => {}
            }
            i += 1;
        }
        if in_element && keep {
            let start_in_buf = if element_start >= offset { (element_start - offset) as usize } else { 0 };
            element.extend_from_slice(&buf[start_in_buf.min(i)..i]);
            if element.len() > MAX_JSON_ROW_BYTES {
                bail!("{path}: row {row} at byte offset {element_start} is larger than {} MB; the file is probably not a valid JSON array", MAX_JSON_ROW_BYTES >> 20);
            }
        }
        reader.consume(i);
        offset += i as u64;
        if offset - reported > (4 << 20) {
            bytes_read.fetch_add(offset - reported, Ordering::Relaxed);
            reported = offset;
        }
        if element_done {
            rows.emit(row, Some(element_start), RawPayload::Json(std::mem::take(&mut element)))?;
            in_element = false;
            row += 1;
        }
    }
    // Only whitespace may follow the array (a second array or stray bytes mean a broken file).
    loop {
        let buf = reader.fill_buf().with_context(|| format!("reading {path}"))?;
        if buf.is_empty() {
            break;
        }
        if let Some(p) = buf.iter().position(|b| !b.is_ascii_whitespace()) {
            bail!("{path}: unexpected data at byte offset {} after the JSON array's closing `]`", offset + p as u64);
        }
        let n = buf.len();
        reader.consume(n);
        offset += n as u64;
    }
    bytes_read.fetch_add(file.size.saturating_sub(reported), Ordering::Relaxed);
    Ok(row)
}

fn read_jsonl(
    file: &InputFile,
    bytes_read: &AtomicU64,
    rows: &mut RowSink,
) -> Result<u64> {
    let mut reader = open(file)?;
    let mut line = Vec::new();
    let mut offset = 0u64;
    let mut row = 0u64;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).with_context(|| format!("reading {}", file.path.display()))?;
        if n == 0 {
            break;
        }
        bytes_read.fetch_add(n as u64, Ordering::Relaxed);
        let start = offset;
        offset += n as u64;
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        if rows.wants(row) {
            rows.emit(row, Some(start), RawPayload::Json(line.clone()))?;
        }
        row += 1;
    }
    Ok(row)
}

/// Number of rows of a file, counted by scanning (JSON) or from metadata (Parquet).
pub fn count_rows(file: &InputFile) -> Result<u64> {
    let counter = AtomicU64::new(0);
    read_file(file, 0, 0, u64::MAX, &counter, &mut |_| Ok(()))
}
