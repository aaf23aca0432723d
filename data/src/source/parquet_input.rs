//! Infinity-Instruct-style Parquet input. A file's schema is checked before any work; then only
//! the columns a conversation needs are decoded (the real 7M release also carries `id`, `label`,
//! `reward`, ... which are never read). Every codec pyarrow and the Hugging Face hub write
//! (Snappy by default, gzip, Brotli, LZ4, zstd, none) is decoded by the `parquet` crate's features.
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::{Array, AsArray, RecordBatch, StructArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::{InputFile, RawConversation, RawPayload, RowSink};

/// The conversation column, by preference (either row schema works).
const CONVERSATION_COLUMNS: [&str; 2] = ["conversations", "messages"];
/// The language tag column, by preference (Infinity-Instruct calls it `langdetect`).
const LANGUAGE_COLUMNS: [&str; 3] = ["langdetect", "language", "lang"];
const SYSTEM_COLUMNS: [&str; 1] = ["system_prompt"];
const EXPECTED_TURNS: &str = "a list of struct<from: string, value: string> (or role/content)";
const BATCH_ROWS: usize = 1024;

/// The columns of one file the reader decodes, checked against its schema.
struct Columns {
    conversations: String,
    language: Option<String>,
    system_prompt: Option<String>,
}

impl Columns {
    fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.conversations.as_str()).chain(self.language.as_deref()).chain(self.system_prompt.as_deref())
    }
}

fn is_string(data_type: &DataType) -> bool {
    matches!(data_type, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn first_field<'a>(schema: &'a Schema, names: &[&str]) -> Option<&'a Field> {
    names.iter().find_map(|n| schema.field_with_name(n).ok())
}

/// Why a conversation column's type is not a list of `{from, value}` string structs.
fn turns_type_problem(data_type: &DataType) -> Option<String> {
    let item = match data_type {
        DataType::List(item) | DataType::LargeList(item) => item,
        _ => return Some("not a list".into()),
    };
    let DataType::Struct(fields) = item.data_type() else {
        return Some("its items are not structs".into());
    };
    for (name, alias) in [("from", "role"), ("value", "content")] {
        let Some(field) = fields.iter().find(|f| f.name() == name).or_else(|| fields.iter().find(|f| f.name() == alias)) else {
            return Some(format!("its turn struct has no `{name}` (or `{alias}`) field"));
        };
        if !is_string(field.data_type()) {
            return Some(format!("turn field `{}` is {}, not a string", field.name(), field.data_type()));
        }
    }
    None
}

/// Find and check the needed columns; errors name the file, the column and the type found.
fn resolve_columns(path: &Path, schema: &Schema) -> Result<Columns> {
    let Some(conversations) = first_field(schema, &CONVERSATION_COLUMNS) else {
        let found: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        bail!(
            "Parquet file {}: required column `conversations` (or `messages`) is missing; the file has columns [{}]",
            path.display(),
            found.join(", ")
        );
    };
    if let Some(problem) = turns_type_problem(conversations.data_type()) {
        bail!(
            "Parquet file {}: column `{}` has type {}, expected {EXPECTED_TURNS}: {problem}",
            path.display(),
            conversations.name(),
            conversations.data_type()
        );
    }
    // A language or system column of another type would silently read as absent (and let
    // every row through the language filter), so it is an error too.
    let optional_string = |names: &[&str]| -> Result<Option<String>> {
        match first_field(schema, names) {
            None => Ok(None),
            Some(f) if is_string(f.data_type()) => Ok(Some(f.name().clone())),
            Some(f) => bail!("Parquet file {}: column `{}` has type {}, expected string", path.display(), f.name(), f.data_type()),
        }
    };
    Ok(Columns {
        conversations: conversations.name().clone(),
        language: optional_string(&LANGUAGE_COLUMNS)?,
        system_prompt: optional_string(&SYSTEM_COLUMNS)?,
    })
}

fn open(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| format!("{} is not a readable Parquet file", path.display()))
}

/// Check a file's footer and schema (no data pages are read).
pub(super) fn check_schema(path: &Path) -> Result<()> {
    let builder = open(path)?;
    resolve_columns(path, builder.schema()).map(|_| ())
}

fn string_value(array: &dyn Array, i: usize) -> Option<String> {
    if array.is_null(i) {
        return None;
    }
    match array.data_type() {
        DataType::Utf8 => Some(array.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Some(array.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Some(array.as_string_view().value(i).to_string()),
        _ => None,
    }
}

/// Row `i` of a `list<struct<from|role, value|content>>` column (its type is checked up front).
fn conversation_at(column: &dyn Array, i: usize) -> Result<Vec<(String, String)>, String> {
    if column.is_null(i) {
        return Err("conversations is null".into());
    }
    let turns = match column.data_type() {
        DataType::List(_) => column.as_list::<i32>().value(i),
        DataType::LargeList(_) => column.as_list::<i64>().value(i),
        other => return Err(format!("conversations has type {other}, expected {EXPECTED_TURNS}")),
    };
    let turns: &StructArray = turns.as_struct_opt().ok_or("conversation turns are not structs")?;
    let field = |a: &str, b: &str| turns.column_by_name(a).or_else(|| turns.column_by_name(b)).cloned();
    let roles = field("from", "role").ok_or("turn struct has no `from`/`role` field")?;
    let values = field("value", "content").ok_or("turn struct has no `value`/`content` field")?;
    (0..turns.len())
        .map(|t| {
            let role = string_value(roles.as_ref(), t).ok_or(format!("turn {t}: role is missing or not a string"))?;
            let value = string_value(values.as_ref(), t).ok_or(format!("turn {t}: content is missing or not a string"))?;
            Ok((role, value))
        })
        .collect()
}

/// Stream the rows of one Parquet file into `rows`. Row groups wholly before the resume point
/// are not read at all; the rest of the skip is an offset into the first group read.
pub(super) fn read(file: &InputFile, bytes_read: &AtomicU64, rows: &mut RowSink) -> Result<u64> {
    let path = file.path.display();
    let builder = open(&file.path)?;
    let columns = resolve_columns(&file.path, builder.schema())?;
    let group_rows: Vec<u64> = builder.metadata().row_groups().iter().map(|g| g.num_rows().max(0) as u64).collect();
    let total_rows: u64 = group_rows.iter().sum();

    let mut first_group = 0;
    let mut rows_before = 0u64;
    while first_group < group_rows.len() && rows_before + group_rows[first_group] <= rows.skip {
        rows_before += group_rows[first_group];
        first_group += 1;
    }
    let progress = |n: u64| file.size * n / total_rows.max(1);
    bytes_read.fetch_add(progress(rows_before), Ordering::Relaxed);
    if first_group == group_rows.len() {
        return Ok(total_rows);
    }

    let roots = builder.parquet_schema().root_schema().get_fields();
    let wanted: Vec<usize> = columns.names().filter_map(|name| roots.iter().position(|f| f.name() == name)).collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), wanted);
    let offset = rows.skip - rows_before;
    let reader = builder
        .with_projection(mask)
        .with_row_groups((first_group..group_rows.len()).collect())
        .with_offset(offset as usize)
        .with_batch_size(BATCH_ROWS)
        .build()
        .with_context(|| format!("reading {path}"))?;

    let mut row = rows_before + offset;
    bytes_read.fetch_add(progress(offset), Ordering::Relaxed);
    for batch in reader {
        let batch: RecordBatch = batch.with_context(|| format!("decoding {path} near row {row}"))?;
        let column = |name: &str| batch.column_by_name(name).ok_or_else(|| anyhow!("{path}: column `{name}` missing from a decoded batch"));
        let conversations = column(&columns.conversations)?;
        let language = columns.language.as_deref().map(column).transpose()?;
        let system = columns.system_prompt.as_deref().map(column).transpose()?;
        for i in 0..batch.num_rows() {
            let decoded = conversation_at(conversations.as_ref(), i).map(|turns| RawConversation {
                turns,
                system_prompt: system.and_then(|c| string_value(c.as_ref(), i)),
                language: language.and_then(|c| string_value(c.as_ref(), i)),
            });
            rows.emit(row, None, RawPayload::Decoded(decoded))?;
            row += 1;
        }
        bytes_read.fetch_add(progress(batch.num_rows() as u64), Ordering::Relaxed);
    }
    if row != total_rows {
        bail!("{path}: read {row} rows but the file's metadata promises {total_rows}; the file is damaged");
    }
    Ok(row)
}
