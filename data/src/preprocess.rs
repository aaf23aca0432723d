//! The preprocess stage: sources → filters → chat template → tokens → shards + manifest.
//!
//! Phase 1 streams the inputs through three stages joined by bounded channels: a reader thread
//! (scans files, hands on raw rows in batches), the calling thread (parses, templates and
//! tokenizes each batch with rayon), and a writer thread (counts, dedups, and writes work chunks
//! `.partial/chunk-NNNNNN.parquet`, each covering `rows_per_shard` consecutive input rows and
//! carrying its statistics in its metadata). A chunk appears atomically, so a killed run resumes
//! after the last complete chunk. Phase 2 draws the validation rows (the `val_size` smallest
//! seeded shuffle keys), writes `train-NNNNN.parquet` / `val-NNNNN.parquet` (rows ordered by
//! shuffle key within each shard) and `manifest.json`, then removes the work folder.
//!
//! The output folder is never shared or borrowed: a run locks it ([`OutputLock`], a second run
//! fails at once naming the first), writes only into a folder that is new, empty or its own
//! ([`OwnedFiles`]), and deletes or replaces only files it created. A rebuild first retires the
//! earlier manifest, and a run that fails on its data (too many malformed rows, nothing left for
//! the validation split) writes a manifest marked failed with no shards, which
//! [`Manifest::load`] refuses: no later stage takes a failed run's folder for finished output.
//!
//! Testing hook: `OVERFILL_TEST_ABORT_AFTER_SHARDS=N` makes the process exit hard (status 86)
//! right after it has written N work chunks, as if killed.
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::bounded;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::filter::{DropReason, Example, Outcome, Processed, RowProcessor};
use crate::manifest::{
    InputEntry, Manifest, ShardEntry, SplitEntry, TemplateEntry, TokenizerEntry, FORMAT_VERSION, MANIFEST_FILE, WORK_DIR,
};
use crate::out_lock::OutputLock;
use crate::owned_files::OwnedFiles;
use crate::recipe::{PreprocessConfig, ValSize};
use crate::shard::{read_examples, read_stats, read_u64_columns, write_atomic, BadRow, ShardWriter, Stats, HIST_EDGES};
use crate::source::{expand_sources, read_file, InputFile, RawRecord};
use crate::digest::{sha256_file, sha256_str};
use crate::template::ChatTemplate;
use crate::tokenize::{ChatCodec, SplitTokenizer};

const STATE_FILE: &str = "state.json";
/// Raw rows per batch handed from the reader to the workers.
const BATCH_ROWS: usize = 512;
pub const ABORT_ENV: &str = "OVERFILL_TEST_ABORT_AFTER_SHARDS";

/// What a run did.
#[derive(Debug)]
pub struct RunSummary {
    /// The folder already held shards with the same key: nothing was done.
    pub up_to_date: bool,
    /// Chunks found from an interrupted run and reused.
    pub resumed_chunks: usize,
    pub manifest: Manifest,
}

#[derive(Serialize, Deserialize)]
struct WorkState {
    key: String,
}

/// Everything resolved before any work: files, tokenizer, template, key.
struct Prepared {
    files: Vec<InputFile>,
    file_hashes: Vec<String>,
    template: ChatTemplate,
    tokenizer: SplitTokenizer,
    tokenizer_entry: TokenizerEntry,
    template_entry: TemplateEntry,
    config_json: serde_json::Value,
    key: String,
}

fn prepare(config: &PreprocessConfig) -> Result<Prepared> {
    config.validate()?;
    let files = expand_sources(&config.sources)?;
    let codec = ChatCodec::load(&config.tokenizer, &config.template)?;

    let file_hashes: Vec<String> = files.par_iter().map(|f| sha256_file(&f.path)).collect::<Result<_>>()?;
    let tokenizer_entry = TokenizerEntry {
        path: codec.files.tokenizer_json.display().to_string(),
        sha256: codec.tokenizer_sha256.clone(),
        config_sha256: codec.config_sha256.clone(),
        vocab_size: codec.tokenizer.tokenizer.get_vocab_size(true),
        bos_token: codec.template.tokens.bos_token.clone(),
        end_of_turn: codec.template.end_of_turn.clone(),
        end_of_turn_id: codec.tokenizer.end_of_turn_id,
    };
    let template_entry =
        TemplateEntry { spec: config.template.clone(), sha256: codec.template_sha256.clone(), source: codec.template.source.clone() };
    let ChatCodec { template, tokenizer, .. } = codec;
    let mut config_json = serde_json::to_value(config)?;
    // The key covers what changes the shards' content, not where they go or the failure threshold.
    let mut key_config = config_json.clone();
    if let Some(obj) = key_config.as_object_mut() {
        obj.remove("out");
        obj.remove("max_bad_fraction");
        obj.remove("tokenizer");
        obj.remove("template");
    }
    let key_material = serde_json::json!({
        "format_version": FORMAT_VERSION,
        "config": key_config,
        "inputs": files.iter().zip(&file_hashes).map(|(f, h)| serde_json::json!([f.source, f.format, f.fraction, h])).collect::<Vec<_>>(),
        "tokenizer": [&tokenizer_entry.sha256, &tokenizer_entry.config_sha256],
        "template": &template_entry.sha256,
    });
    let key = sha256_str(&key_material.to_string());
    if let Some(obj) = config_json.as_object_mut() {
        obj.insert("key_material".into(), key_material);
    }
    Ok(Prepared { files, file_hashes, template, tokenizer, tokenizer_entry, template_entry, config_json, key })
}

fn chunk_path(work: &Path, index: usize) -> PathBuf {
    work.join(format!("chunk-{index:06}.parquet"))
}

/// Complete chunks 0..n from an earlier run (anything after a gap is discarded).
fn existing_chunks(work: &Path) -> usize {
    let mut n = 0;
    while chunk_path(work, n).is_file() {
        n += 1;
    }
    n
}

/// Why a run's data fails it: more malformed rows than allowed.
fn bad_fraction_error(counts: &Stats, config: &PreprocessConfig) -> Option<String> {
    let fraction = if counts.raw_rows == 0 { 0.0 } else { counts.bad_rows as f64 / counts.raw_rows as f64 };
    (fraction > config.max_bad_fraction).then(|| {
        format!(
            "{} of {} input rows ({:.2}%) are malformed, above --max-bad-fraction {}; see bad_samples in {}",
            counts.bad_rows,
            counts.raw_rows,
            100.0 * fraction,
            config.max_bad_fraction,
            config.out.join(MANIFEST_FILE).display()
        )
    })
}

/// `train-NNNNN.parquet` / `val-NNNNN.parquet`: the shard names this stage writes.
fn is_shard_name(name: &str) -> bool {
    let number = name.strip_suffix(".parquet").and_then(|n| n.strip_prefix("train-").or_else(|| n.strip_prefix("val-")));
    number.is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// Files in `out` holding a name this stage writes that it did not create (a user's file). A
/// rebuild refuses to start while there are any, rather than stop halfway.
fn foreign_output_names(out: &Path, owned: &OwnedFiles) -> Result<Vec<String>> {
    let mut foreign = Vec::new();
    for entry in std::fs::read_dir(out).with_context(|| format!("listing {}", out.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let base = name.strip_suffix(".tmp").unwrap_or(&name);
        let ours_to_write = is_shard_name(base) || base == MANIFEST_FILE || base == WORK_DIR;
        if ours_to_write && !owned.owns(base) {
            foreign.push(name);
        }
    }
    foreign.sort();
    Ok(foreign)
}

/// The files of a folder written before `.overfill-files.json` existed: the manifest, the shards
/// it lists and an interrupted run's work folder. `None` when the folder holds none of them.
fn legacy_outputs(out: &Path) -> Option<Vec<String>> {
    let mut names = Vec::new();
    if let Ok(manifest) = Manifest::load_any(out) {
        names.push(MANIFEST_FILE.to_string());
        names.extend(manifest.train.shards.iter().chain(&manifest.val.shards).map(|s| s.file.clone()).filter(|f| is_shard_name(f)));
    }
    if out.join(WORK_DIR).join(STATE_FILE).is_file() {
        names.push(WORK_DIR.to_string());
    }
    (!names.is_empty()).then_some(names)
}

/// Remove the manifest and shards of an earlier build (only files this stage created). The
/// manifest goes first: a run killed in between leaves shards that no reader takes for finished.
fn remove_outputs(owned: &mut OwnedFiles) -> Result<()> {
    owned.remove(MANIFEST_FILE)?;
    for name in owned.names() {
        if is_shard_name(&name) {
            owned.remove(&name)?;
        }
    }
    Ok(())
}

/// Run the stage. Fails, leaving a manifest marked failed and no shards, when the malformed
/// fraction exceeds `max_bad_fraction`.
pub fn run_preprocess(config: &PreprocessConfig) -> Result<RunSummary> {
    config.validate()?;
    let out = &config.out;
    // Held until this function returns or the process dies, whichever comes first.
    let _lock = OutputLock::acquire(out, "preprocess")?;
    let mut owned = OwnedFiles::open(out, "preprocess", || legacy_outputs(out))?;
    let prepared = prepare(config)?;
    owned.claim()?;

    if owned.owns(MANIFEST_FILE) {
        if let Ok(manifest) = Manifest::load_any(out) {
            let shards_present = manifest.train.shards.iter().chain(&manifest.val.shards).all(|s| out.join(&s.file).is_file());
            if manifest.key == prepared.key && manifest.failed.is_none() && shards_present {
                eprintln!("preprocess: {} is up to date (key {})", out.display(), &prepared.key[..12]);
                // Left by a run of other settings that was stopped; this folder no longer needs it.
                owned.remove(WORK_DIR)?;
                if let Some(reason) = bad_fraction_error(&manifest.counts, config) {
                    bail!(reason);
                }
                return Ok(RunSummary { up_to_date: true, resumed_chunks: 0, manifest });
            }
        }
    }
    let foreign = foreign_output_names(out, &owned)?;
    if !foreign.is_empty() {
        bail!(
            "--out {} holds {}, not created by preprocess; refusing to run, as the run could replace it (move it out of --out)",
            out.display(),
            foreign.join(", ")
        );
    }
    remove_outputs(&mut owned)?;

    let work = owned.create(WORK_DIR)?;
    let state_path = work.join(STATE_FILE);
    let same_work = std::fs::read_to_string(&state_path)
        .ok()
        .and_then(|s| serde_json::from_str::<WorkState>(&s).ok())
        .map(|s| s.key == prepared.key)
        .unwrap_or(false);
    if !same_work && work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("removing stale {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    write_atomic(&state_path, serde_json::to_string(&WorkState { key: prepared.key.clone() })?.as_bytes())?;
    let resumed_chunks = existing_chunks(&work);
    if resumed_chunks > 0 {
        eprintln!("preprocess: resuming after {resumed_chunks} complete shard(s) of an interrupted run");
    }

    let rows_per_file = process_inputs(config, &prepared, &work, resumed_chunks)?;
    let manifest = finalize(config, &prepared, &work, &rows_per_file, &mut owned)?;
    owned.remove(WORK_DIR)?;
    eprintln!(
        "preprocess: {} rows in, {} train + {} val rows out ({} target tokens), {} malformed; {}",
        manifest.counts.raw_rows,
        manifest.train.rows,
        manifest.val.rows,
        manifest.counts.target_tokens,
        manifest.counts.bad_rows,
        out.display()
    );
    Ok(RunSummary { up_to_date: false, resumed_chunks, manifest })
}

/// Phase 1. Returns the number of rows of each input file.
fn process_inputs(config: &PreprocessConfig, prepared: &Prepared, work: &Path, done_chunks: usize) -> Result<Vec<u64>> {
    let skip_rows = done_chunks as u64 * config.rows_per_shard;
    let total_bytes: u64 = prepared.files.iter().map(|f| f.size).sum();
    let bytes_read = AtomicU64::new(0);
    let progress = indicatif::ProgressBar::new(total_bytes).with_style(
        indicatif::ProgressStyle::with_template("preprocess {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let processor = RowProcessor {
        config,
        template: &prepared.template,
        tokenizer: &prepared.tokenizer,
        files: prepared.files.iter().map(|f| (f.source.clone(), f.fraction)).collect(),
    };
    let abort_after: Option<usize> = std::env::var(ABORT_ENV).ok().and_then(|v| v.parse().ok());

    let (raw_tx, raw_rx) = bounded::<Vec<RawRecord>>(4);
    let (out_tx, out_rx) = bounded::<Vec<Processed>>(4);
    std::thread::scope(|scope| -> Result<Vec<u64>> {
        let files = &prepared.files;
        let bytes_read = &bytes_read;
        let reader = scope.spawn(move || -> Result<Vec<u64>> {
            let mut rows_per_file = Vec::with_capacity(files.len());
            let mut next_row_id = 0u64;
            let mut batch = Vec::with_capacity(BATCH_ROWS);
            for (index, file) in files.iter().enumerate() {
                let skip = skip_rows.saturating_sub(next_row_id);
                let rows = read_file(file, index, next_row_id, skip, bytes_read, &mut |record| {
                    batch.push(record);
                    if batch.len() == BATCH_ROWS {
                        raw_tx.send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH_ROWS))).map_err(|_| anyhow!("workers stopped"))?;
                    }
                    Ok(())
                })?;
                rows_per_file.push(rows);
                next_row_id += rows;
            }
            if !batch.is_empty() {
                raw_tx.send(batch).map_err(|_| anyhow!("workers stopped"))?;
            }
            Ok(rows_per_file)
        });

        let writer = scope.spawn(move || write_chunks(config, prepared, work, done_chunks, out_rx, abort_after));

        for batch in raw_rx {
            let processed: Vec<Processed> = batch.into_par_iter().with_min_len(4).map(|r| processor.process(r)).collect();
            progress.set_position(bytes_read.load(Ordering::Relaxed));
            if out_tx.send(processed).is_err() {
                break; // the writer failed; its error is reported below
            }
        }
        drop(out_tx);
        progress.finish_and_clear();
        let writer_result = writer.join().map_err(|_| anyhow!("shard writer panicked"))?;
        let reader_result = reader.join().map_err(|_| anyhow!("input reader panicked"))?;
        writer_result?;
        reader_result
    })
}

/// The open work chunk: input rows `[index * rows_per_shard, (index + 1) * rows_per_shard)`.
struct Chunk {
    index: usize,
    end_row: u64,
    writer: ShardWriter,
    stats: Stats,
    pending: Vec<Example>,
}

impl Chunk {
    fn open(work: &Path, index: usize, rows_per_shard: u64) -> Result<Chunk> {
        Ok(Chunk {
            index,
            end_row: (index as u64 + 1) * rows_per_shard,
            writer: ShardWriter::create(&chunk_path(work, index))?,
            stats: Stats::new(),
            pending: Vec::new(),
        })
    }

    fn flush(&mut self) -> Result<()> {
        self.writer.write(&self.pending)?;
        self.pending.clear();
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        self.flush()?;
        self.writer.finish(Some(&self.stats))?;
        Ok(())
    }
}

fn write_chunks(
    config: &PreprocessConfig,
    prepared: &Prepared,
    work: &Path,
    done_chunks: usize,
    rx: crossbeam_channel::Receiver<Vec<Processed>>,
    abort_after: Option<usize>,
) -> Result<()> {
    // Duplicates are judged against every row kept so far, including resumed chunks.
    let mut seen: HashSet<u64> = HashSet::new();
    if config.dedup {
        for index in 0..done_chunks {
            let columns = read_u64_columns(&chunk_path(work, index), &["content_hash"])?;
            seen.extend(columns[0].iter().copied());
        }
    }
    let mut logged_bad = 0usize;
    let mut written_now = 0usize;
    let mut chunk: Option<Chunk> = None;
    for batch in rx {
        for processed in batch {
            // Close chunks until this row falls inside the open one.
            loop {
                match &chunk {
                    Some(c) if processed.row_id < c.end_row => break,
                    Some(_) => {
                        let finished = chunk.take().ok_or_else(|| anyhow!("no open chunk"))?;
                        let next = finished.index + 1;
                        finished.finish()?;
                        written_now += 1;
                        if abort_after == Some(written_now) {
                            eprintln!("preprocess: {ABORT_ENV}={written_now} reached, exiting hard");
                            std::process::exit(86);
                        }
                        chunk = Some(Chunk::open(work, next, config.rows_per_shard)?);
                    }
                    None => {
                        let index = (processed.row_id / config.rows_per_shard) as usize;
                        chunk = Some(Chunk::open(work, index, config.rows_per_shard)?);
                    }
                }
            }
            let c = chunk.as_mut().ok_or_else(|| anyhow!("no open chunk"))?;
            c.stats.raw_rows += 1;
            match processed.outcome {
                Outcome::Kept(example) => {
                    if config.dedup && !seen.insert(example.content_hash) {
                        c.stats.add_dropped(&DropReason::Duplicate.name());
                    } else {
                        c.stats.add_kept(&example);
                        c.pending.push(example);
                        if c.pending.len() >= 1024 {
                            c.flush()?;
                        }
                    }
                }
                Outcome::Dropped(reason) => c.stats.add_dropped(&reason.name()),
                Outcome::Bad(error) => {
                    let bad = BadRow {
                        file: prepared.files[processed.file_index].path.display().to_string(),
                        row: processed.row_in_file,
                        byte_offset: processed.byte_offset,
                        error,
                    };
                    if logged_bad < 20 {
                        let at = bad.byte_offset.map(|o| format!(", byte {o}")).unwrap_or_default();
                        eprintln!("preprocess: skipping malformed row {} of {}{at}: {}", bad.row, bad.file, bad.error);
                    } else if logged_bad == 20 {
                        eprintln!("preprocess: more malformed rows; samples go to the manifest");
                    }
                    logged_bad += 1;
                    c.stats.bad_rows += 1;
                    c.stats.add_dropped(&DropReason::Malformed.name());
                    if c.stats.bad_samples.len() < Stats::MAX_BAD_SAMPLES {
                        c.stats.bad_samples.push(bad);
                    }
                }
            }
        }
    }
    if let Some(c) = chunk {
        c.finish()?;
    }
    Ok(())
}

fn shard_entry(dir: &Path, path: &Path, examples: &[Example]) -> Result<ShardEntry> {
    Ok(ShardEntry {
        file: path.strip_prefix(dir).unwrap_or(path).display().to_string(),
        rows: examples.len() as u64,
        bytes: std::fs::metadata(path)?.len(),
        context_tokens: examples.iter().map(|e| e.context_ids.len() as u64).sum(),
        target_tokens: examples.iter().map(|e| e.target_ids.len() as u64).sum(),
    })
}

fn add_to_split(split: &mut SplitEntry, entry: ShardEntry) {
    split.rows += entry.rows;
    split.context_tokens += entry.context_tokens;
    split.target_tokens += entry.target_tokens;
    split.shards.push(entry);
}

/// Phase 2: validation draw, final shards, manifest. When the data fails the run (too many
/// malformed rows, too few rows for the validation split) it writes a manifest marked failed, with
/// the counts and malformed samples but no shards, and returns the error. The work folder stays
/// so that a rerun with other limits does not read the inputs again.
fn finalize(config: &PreprocessConfig, prepared: &Prepared, work: &Path, rows_per_file: &[u64], owned: &mut OwnedFiles) -> Result<Manifest> {
    let out = &config.out;
    let chunks = existing_chunks(work);
    let mut counts = Stats::new();
    let mut keys: Vec<(u64, u64)> = Vec::new();
    for index in 0..chunks {
        let path = chunk_path(work, index);
        counts.merge(&read_stats(&path)?);
        let columns = read_u64_columns(&path, &["shuffle_key", "row_id"])?;
        keys.extend(columns[0].iter().copied().zip(columns[1].iter().copied()));
    }
    let kept = keys.len() as u64;
    let val_rows = match config.val_size {
        ValSize::Count(n) => n,
        ValSize::Fraction(f) => (f * kept as f64).round() as u64,
    };
    let failure = bad_fraction_error(&counts, config).or_else(|| {
        (val_rows > 0 && val_rows >= kept).then(|| {
            let dropped = counts.dropped.iter().map(|(reason, n)| format!("{n} {reason}")).collect::<Vec<_>>().join(", ");
            format!(
                "validation size {val_rows} is not smaller than the {kept} rows kept (of {} input rows; dropped: {}); lower --val-size",
                counts.raw_rows,
                if dropped.is_empty() { "none".to_string() } else { dropped }
            )
        })
    });
    if let Some(reason) = failure {
        let mut manifest = build_manifest(prepared, rows_per_file, counts, SplitEntry::default(), SplitEntry::default());
        manifest.failed = Some(reason.clone());
        owned.create(MANIFEST_FILE)?;
        manifest.save(out)?;
        bail!(reason);
    }
    keys.sort_unstable();
    let val_ids: HashSet<u64> = keys.iter().take(val_rows as usize).map(|&(_, row)| row).collect();
    drop(keys);

    // Each chunk gives at most one train and one val shard: fail before writing any of them
    // when a file this stage did not create holds one of their names.
    for index in 0..chunks {
        for name in [format!("train-{index:05}.parquet"), format!("val-{index:05}.parquet")] {
            if owned.would_clobber(&name) {
                bail!("refusing to overwrite {}: it was not created by preprocess (move it out of --out)", out.join(name).display());
            }
        }
    }
    let mut train = SplitEntry::default();
    let mut val = SplitEntry::default();
    let mut val_pending: Vec<Example> = Vec::new();
    let mut val_index = 0usize;
    let flush_val = |owned: &mut OwnedFiles, pending: &mut Vec<Example>, val: &mut SplitEntry, index: &mut usize| -> Result<()> {
        pending.sort_by_key(|e| (e.shuffle_key, e.row_id));
        let path = owned.create(&format!("val-{index:05}.parquet"))?;
        let mut writer = ShardWriter::create(&path)?;
        writer.write(pending)?;
        writer.finish(None)?;
        add_to_split(val, shard_entry(out, &path, pending)?);
        pending.clear();
        *index += 1;
        Ok(())
    };
    let mut train_index = 0usize;
    for index in 0..chunks {
        let examples = read_examples(&chunk_path(work, index))?;
        let (mut val_part, mut train_part): (Vec<Example>, Vec<Example>) = examples.into_iter().partition(|e| val_ids.contains(&e.row_id));
        if !train_part.is_empty() {
            train_part.sort_by_key(|e| (e.shuffle_key, e.row_id));
            let path = owned.create(&format!("train-{train_index:05}.parquet"))?;
            let mut writer = ShardWriter::create(&path)?;
            writer.write(&train_part)?;
            writer.finish(None)?;
            add_to_split(&mut train, shard_entry(out, &path, &train_part)?);
            train_index += 1;
        }
        val_pending.append(&mut val_part);
        if val_pending.len() as u64 >= config.rows_per_shard {
            flush_val(owned, &mut val_pending, &mut val, &mut val_index)?;
        }
    }
    if !val_pending.is_empty() {
        flush_val(owned, &mut val_pending, &mut val, &mut val_index)?;
    }

    let manifest = build_manifest(prepared, rows_per_file, counts, train, val);
    owned.create(MANIFEST_FILE)?;
    manifest.save(out)?;
    Ok(manifest)
}

fn build_manifest(prepared: &Prepared, rows_per_file: &[u64], counts: Stats, train: SplitEntry, val: SplitEntry) -> Manifest {
    let bad_fraction = if counts.raw_rows == 0 { 0.0 } else { counts.bad_rows as f64 / counts.raw_rows as f64 };
    Manifest {
        format_version: FORMAT_VERSION,
        key: prepared.key.clone(),
        config: prepared.config_json.clone(),
        inputs: prepared
            .files
            .iter()
            .zip(&prepared.file_hashes)
            .zip(rows_per_file)
            .map(|((f, hash), &rows)| InputEntry {
                path: f.path.display().to_string(),
                source: f.source.clone(),
                format: serde_json::to_value(f.format).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
                size: f.size,
                sha256: hash.clone(),
                rows,
            })
            .collect(),
        tokenizer: prepared.tokenizer_entry.clone(),
        template: prepared.template_entry.clone(),
        counts,
        bad_fraction,
        histogram_edges: HIST_EDGES.to_vec(),
        train,
        val,
        created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        failed: None,
    }
}
