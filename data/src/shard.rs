//! Token shards (Parquet, zstd), per-shard statistics, and atomic file writes.
//!
//! Shard columns: `row_id` u64, `source` utf8, `context_ids` list<u32>, `target_ids` list<u32>,
//! `context_len` u32, `target_len` u32, `total_len` u32, `content_hash` u64, `shuffle_key` u64.
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use arrow::array::{
    Array, ArrayRef, AsArray, ListArray, RecordBatch, StringArray, UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt32Type, UInt64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::filter::Example;

/// Key of the statistics stored in each work chunk's Parquet metadata.
pub const STATS_KEY: &str = "overfill.stats";

/// Upper edges of the length histogram buckets (the last bucket is open-ended).
pub const HIST_EDGES: [usize; 9] = [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192];

pub fn shard_schema() -> SchemaRef {
    let ids = DataType::List(Arc::new(Field::new("item", DataType::UInt32, false)));
    Arc::new(Schema::new(vec![
        Field::new("row_id", DataType::UInt64, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("context_ids", ids.clone(), false),
        Field::new("target_ids", ids, false),
        Field::new("context_len", DataType::UInt32, false),
        Field::new("target_len", DataType::UInt32, false),
        Field::new("total_len", DataType::UInt32, false),
        Field::new("content_hash", DataType::UInt64, false),
        Field::new("shuffle_key", DataType::UInt64, false),
    ]))
}

/// A malformed row, for the log and the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BadRow {
    pub file: String,
    pub row: u64,
    pub byte_offset: Option<u64>,
    pub error: String,
}

/// Counts of one chunk of input rows; they add up across chunks.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub raw_rows: u64,
    pub kept_rows: u64,
    pub bad_rows: u64,
    /// Rows dropped, by reason (including `malformed`).
    pub dropped: BTreeMap<String, u64>,
    pub truncated_rows: u64,
    pub context_tokens: u64,
    pub target_tokens: u64,
    /// Histograms over [`HIST_EDGES`].
    pub context_len_hist: Vec<u64>,
    pub target_len_hist: Vec<u64>,
    pub total_len_hist: Vec<u64>,
    /// The first malformed rows (at most [`Stats::MAX_BAD_SAMPLES`]).
    pub bad_samples: Vec<BadRow>,
}

fn bucket(len: usize) -> usize {
    HIST_EDGES.iter().position(|&edge| len < edge).unwrap_or(HIST_EDGES.len())
}

impl Stats {
    pub const MAX_BAD_SAMPLES: usize = 20;

    pub fn new() -> Stats {
        let empty = vec![0; HIST_EDGES.len() + 1];
        Stats { context_len_hist: empty.clone(), target_len_hist: empty.clone(), total_len_hist: empty, ..Stats::default() }
    }

    pub fn add_kept(&mut self, example: &Example) {
        let (c, t) = (example.context_ids.len(), example.target_ids.len());
        self.kept_rows += 1;
        self.context_tokens += c as u64;
        self.target_tokens += t as u64;
        self.truncated_rows += example.truncated as u64;
        self.context_len_hist[bucket(c)] += 1;
        self.target_len_hist[bucket(t)] += 1;
        self.total_len_hist[bucket(c + t)] += 1;
    }

    pub fn add_dropped(&mut self, reason: &str) {
        *self.dropped.entry(reason.to_string()).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Stats) {
        self.raw_rows += other.raw_rows;
        self.kept_rows += other.kept_rows;
        self.bad_rows += other.bad_rows;
        for (k, v) in &other.dropped {
            *self.dropped.entry(k.clone()).or_default() += v;
        }
        self.truncated_rows += other.truncated_rows;
        self.context_tokens += other.context_tokens;
        self.target_tokens += other.target_tokens;
        for (mine, theirs) in [
            (&mut self.context_len_hist, &other.context_len_hist),
            (&mut self.target_len_hist, &other.target_len_hist),
            (&mut self.total_len_hist, &other.total_len_hist),
        ] {
            mine.resize(theirs.len().max(mine.len()), 0);
            for (m, t) in mine.iter_mut().zip(theirs) {
                *m += t;
            }
        }
        let room = (5 * Stats::MAX_BAD_SAMPLES).saturating_sub(self.bad_samples.len());
        self.bad_samples.extend(other.bad_samples.iter().take(room).cloned());
    }
}

/// Write to `path.tmp`, then rename: readers never see a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

fn list_array(lists: impl Iterator<Item = impl AsRef<[u32]>>) -> ListArray {
    let mut offsets = vec![0i32];
    let mut values: Vec<u32> = Vec::new();
    for list in lists {
        values.extend_from_slice(list.as_ref());
        offsets.push(values.len() as i32);
    }
    ListArray::new(
        Arc::new(Field::new("item", DataType::UInt32, false)),
        OffsetBuffer::new(offsets.into()),
        Arc::new(UInt32Array::from(values)),
        None,
    )
}

/// Examples as one Arrow record batch in the shard schema.
pub fn examples_to_batch(examples: &[Example]) -> Result<RecordBatch> {
    let len32 = |f: &dyn Fn(&Example) -> usize| -> ArrayRef {
        Arc::new(UInt32Array::from_iter_values(examples.iter().map(|e| f(e) as u32)))
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(examples.iter().map(|e| e.row_id))),
        Arc::new(StringArray::from_iter_values(examples.iter().map(|e| e.source.as_str()))),
        Arc::new(list_array(examples.iter().map(|e| &e.context_ids))),
        Arc::new(list_array(examples.iter().map(|e| &e.target_ids))),
        len32(&|e| e.context_ids.len()),
        len32(&|e| e.target_ids.len()),
        len32(&|e| e.context_ids.len() + e.target_ids.len()),
        Arc::new(UInt64Array::from_iter_values(examples.iter().map(|e| e.content_hash))),
        Arc::new(UInt64Array::from_iter_values(examples.iter().map(|e| e.shuffle_key))),
    ];
    Ok(RecordBatch::try_new(shard_schema(), columns)?)
}

/// Writes one shard file through a temporary name; `finish` renames it into place.
pub struct ShardWriter {
    path: PathBuf,
    writer: ArrowWriter<File>,
    pub rows: u64,
}

impl ShardWriter {
    pub fn create(path: &Path) -> Result<ShardWriter> {
        let tmp = tmp_path(path);
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
            .set_max_row_group_row_count(Some(2048))
            .build();
        let writer = ArrowWriter::try_new(file, shard_schema(), Some(props))?;
        Ok(ShardWriter { path: path.to_path_buf(), writer, rows: 0 })
    }

    pub fn write(&mut self, examples: &[Example]) -> Result<()> {
        if examples.is_empty() {
            return Ok(());
        }
        self.writer.write(&examples_to_batch(examples)?)?;
        self.rows += examples.len() as u64;
        Ok(())
    }

    /// Close and move into place, with optional statistics in the file metadata.
    pub fn finish(mut self, stats: Option<&Stats>) -> Result<PathBuf> {
        if let Some(stats) = stats {
            self.writer.append_key_value_metadata(KeyValue::new(STATS_KEY.to_string(), serde_json::to_string(stats)?));
        }
        self.writer.close()?;
        std::fs::rename(tmp_path(&self.path), &self.path)
            .with_context(|| format!("moving shard into place at {}", self.path.display()))?;
        Ok(self.path)
    }
}

/// The statistics stored in a work chunk's metadata.
pub fn read_stats(path: &Path) -> Result<Stats> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| format!("reading {}", path.display()))?;
    let kv = builder.metadata().file_metadata().key_value_metadata();
    let json = kv
        .and_then(|kv| kv.iter().find(|k| k.key == STATS_KEY))
        .and_then(|k| k.value.clone())
        .ok_or_else(|| anyhow!("{} has no {STATS_KEY} metadata", path.display()))?;
    Ok(serde_json::from_str(&json)?)
}

/// Read whole shard rows back as examples (`truncated` is not stored and reads as false).
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("reading {}", path.display()))?
        .with_batch_size(4096)
        .build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("decoding {}", path.display()))?;
        let col = |name: &str| batch.column_by_name(name).ok_or_else(|| anyhow!("{}: no column {name}", path.display()));
        let row_id = col("row_id")?.as_primitive::<UInt64Type>().clone();
        let source = col("source")?.as_string::<i32>().clone();
        let context = col("context_ids")?.as_list::<i32>().clone();
        let target = col("target_ids")?.as_list::<i32>().clone();
        let hash = col("content_hash")?.as_primitive::<UInt64Type>().clone();
        let key = col("shuffle_key")?.as_primitive::<UInt64Type>().clone();
        for i in 0..batch.num_rows() {
            let ids = |list: &ListArray| -> Vec<u32> { list.value(i).as_primitive::<UInt32Type>().values().to_vec() };
            out.push(Example {
                row_id: row_id.value(i),
                source: source.value(i).to_string(),
                context_ids: ids(&context),
                target_ids: ids(&target),
                content_hash: hash.value(i),
                shuffle_key: key.value(i),
                truncated: false,
            });
        }
    }
    Ok(out)
}

/// Selected scalar columns of a shard (no token lists decoded).
pub fn read_u64_columns(path: &Path, names: &[&str]) -> Result<Vec<Vec<u64>>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| format!("reading {}", path.display()))?;
    let mask = ProjectionMask::columns(builder.parquet_schema(), names.iter().copied());
    let reader = builder.with_projection(mask).with_batch_size(8192).build()?;
    let mut out = vec![Vec::new(); names.len()];
    for batch in reader {
        let batch = batch?;
        for (slot, name) in out.iter_mut().zip(names) {
            let column = batch.column_by_name(name).ok_or_else(|| anyhow!("{}: no column {name}", path.display()))?;
            match column.data_type() {
                DataType::UInt64 => slot.extend(column.as_primitive::<UInt64Type>().values().iter().copied()),
                DataType::UInt32 => slot.extend(column.as_primitive::<UInt32Type>().values().iter().map(|&v| v as u64)),
                other => anyhow::bail!("{}: column {name} has type {other}", path.display()),
            }
        }
    }
    Ok(out)
}

/// Number of rows in a Parquet file (from its footer).
pub fn parquet_rows(path: &Path) -> Result<u64> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    Ok(builder.metadata().file_metadata().num_rows() as u64)
}

