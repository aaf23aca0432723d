//! The token cache of one split: the Parquet shards decoded once into two flat files that every
//! process memory-maps, so a process's memory does not grow with the dataset and data-parallel
//! ranks share one copy through the page cache.
//!
//! `<shards>/.cache/<split>-<key>-<fingerprint>.tokens`: all rows' context ‖ target tokens as
//! little-endian `u32`, row after row, from offset 0.
//! `<shards>/.cache/<split>-<key>-<fingerprint>.index`: a 64-byte header, one 40-byte
//! [`RowRecord`] per row in shard order, then the source names as a JSON array.
//!
//! `key` is the manifest key; `fingerprint` hashes the manifest's shard list and the shard files'
//! sizes and modification times, so new shards get a new cache and an old one is never read.
//! Files are written under temporary names and renamed into place (tokens first, index last).
//! When several ranks open a split at once, one builds while holding `<...>.lock` and the others
//! wait, then map its files; should the lock not work (some network filesystems), each builds and
//! whoever renames last wins, with identical contents. A mapped file is never modified in place,
//! which is what makes mapping it sound.
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::AsArray;
use arrow::datatypes::{UInt32Type, UInt64Type};
use bytemuck::{Pod, Zeroable};
use memmap2::Mmap;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use sha2::{Digest, Sha256};

use crate::manifest::{Manifest, SplitEntry};

/// Folder inside the shard folder that holds the caches.
pub const CACHE_DIR: &str = ".cache";
const MAGIC: [u8; 8] = *b"OVFTOKIX";
/// Bump when the file layout changes (the fingerprint includes it, so old caches are rebuilt).
const CACHE_VERSION: u32 = 1;
const HEADER_BYTES: usize = std::mem::size_of::<Header>();
const RECORD_BYTES: usize = std::mem::size_of::<RowRecord>();
// The on-disk layout: records stay 8-byte aligned after the header.
const _: () = assert!(HEADER_BYTES == 64 && RECORD_BYTES == 40);

/// Start of the index file.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
struct Header {
    magic: [u8; 8],
    version: u32,
    record_bytes: u32,
    rows: u64,
    tokens: u64,
    sources_json_bytes: u64,
    /// First 16 bytes of the fingerprint in the file name (a renamed or copied file is refused).
    fingerprint: [u8; 16],
    reserved: u64,
}

/// One row of the split, in shard order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct RowRecord {
    /// Offset of the row's first token in the token file, in tokens.
    pub token_start: u64,
    pub context_len: u32,
    /// Context + target tokens.
    pub total_len: u32,
    pub row_id: u64,
    pub shuffle_key: u64,
    /// Index into the source names.
    pub source: u32,
    reserved: u32,
}

/// A split's cache, mapped.
pub struct TokenCache {
    tokens: Mmap,
    index: Mmap,
    rows: usize,
    pub source_names: Vec<String>,
}

impl TokenCache {
    /// Map the split's cache, building it first when it is missing or does not match (a cache of
    /// other shards, a truncated or otherwise damaged file).
    pub fn open(dir: &Path, split_name: &str, manifest: &Manifest, entry: &SplitEntry) -> Result<TokenCache> {
        if cfg!(target_endian = "big") {
            bail!("the token cache stores little-endian u32 and is mapped as is; big-endian hosts are not supported");
        }
        let fingerprint = fingerprint(dir, split_name, manifest, entry)?;
        let stem = format!("{split_name}-{}-{}", short(&manifest.key, 12), hex::encode(&fingerprint[..8]));
        let cache_dir = dir.join(CACHE_DIR);
        let tokens_path = cache_dir.join(format!("{stem}.tokens"));
        let index_path = cache_dir.join(format!("{stem}.index"));
        let expected = Expected { rows: entry.rows, tokens: entry.context_tokens + entry.target_tokens, fingerprint };
        if tokens_path.exists() || index_path.exists() {
            match TokenCache::map(&tokens_path, &index_path, &expected) {
                Ok(cache) => return Ok(cache),
                Err(err) => eprintln!("reader: rebuilding the token cache {}: {err:#}", index_path.display()),
            }
        }
        std::fs::create_dir_all(&cache_dir)
            .with_context(|| format!("creating the token cache folder {} (the shard folder must be writable)", cache_dir.display()))?;
        // One builder at a time; the other ranks wait and then map what it built. Correctness does
        // not rest on the lock (each build renames identical files into place), it saves work.
        let _lock = lock_build(&cache_dir.join(format!("{stem}.lock")))?;
        if let Ok(cache) = TokenCache::map(&tokens_path, &index_path, &expected) {
            return Ok(cache); // built while this process waited
        }
        build(dir, entry, &tokens_path, &index_path, &expected)?;
        remove_stale(&cache_dir, split_name, &stem);
        TokenCache::map(&tokens_path, &index_path, &expected)
            .with_context(|| format!("mapping the token cache just built at {}", index_path.display()))
    }

    fn map(tokens_path: &Path, index_path: &Path, expected: &Expected) -> Result<TokenCache> {
        let index = map_file(index_path)?;
        let header: Header = *bytemuck::try_from_bytes(index.get(..HEADER_BYTES).ok_or_else(|| anyhow!("shorter than its header"))?)
            .map_err(|e| anyhow!("header: {e}"))?;
        if header.magic != MAGIC || header.version != CACHE_VERSION || header.record_bytes as usize != RECORD_BYTES {
            bail!("not a version-{CACHE_VERSION} token index");
        }
        if header.fingerprint[..] != expected.fingerprint[..16] {
            bail!("made from other shards");
        }
        if (header.rows, header.tokens) != (expected.rows, expected.tokens) {
            bail!("holds {} rows and {} tokens, the manifest says {} and {}", header.rows, header.tokens, expected.rows, expected.tokens);
        }
        let rows = usize::try_from(header.rows)?;
        let records_end = HEADER_BYTES + rows * RECORD_BYTES;
        let index_len = records_end as u64 + header.sources_json_bytes;
        if index.len() as u64 != index_len {
            bail!("index file is {} bytes, expected {index_len} (truncated or damaged)", index.len());
        }
        let tokens = map_file(tokens_path)?;
        if tokens.len() as u64 != header.tokens * 4 {
            bail!("token file {} is {} bytes, expected {} (truncated or damaged)", tokens_path.display(), tokens.len(), header.tokens * 4);
        }
        // Both casts are checked once here; the accessors below then cannot fail.
        bytemuck::try_cast_slice::<u8, u32>(&tokens).map_err(|e| anyhow!("token file: {e}"))?;
        bytemuck::try_cast_slice::<u8, RowRecord>(&index[HEADER_BYTES..records_end]).map_err(|e| anyhow!("index records: {e}"))?;
        let source_names: Vec<String> = serde_json::from_slice(&index[records_end..]).context("source names")?;
        let cache = TokenCache { tokens, index, rows, source_names };
        // Rows must tile the token file exactly, so the accessors' slices are always in range.
        // One pass over the index (40 bytes a row; training's length sort reads it all anyway).
        let mut next_start = 0u64;
        for (i, r) in cache.records().iter().enumerate() {
            if r.token_start != next_start || r.context_len > r.total_len || r.source as usize >= cache.source_names.len() {
                bail!("index record {i} is inconsistent ({r:?})");
            }
            next_start += r.total_len as u64;
        }
        if next_start != header.tokens {
            bail!("the rows end at token {next_start}, the file holds {}", header.tokens);
        }
        Ok(cache)
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn records(&self) -> &[RowRecord] {
        bytemuck::cast_slice(&self.index[HEADER_BYTES..HEADER_BYTES + self.rows * RECORD_BYTES])
    }

    pub fn record(&self, i: usize) -> &RowRecord {
        &self.records()[i]
    }

    /// All tokens of the split.
    pub fn tokens(&self) -> &[u32] {
        bytemuck::cast_slice(&self.tokens)
    }
}

/// What a cache of the current shards must hold.
struct Expected {
    rows: u64,
    tokens: u64,
    fingerprint: [u8; 32],
}

/// The first `n` letters and digits of `s` (a manifest key is hex; anything else stays out of file names).
fn short(s: &str, n: usize) -> String {
    s.chars().filter(|c| c.is_ascii_alphanumeric()).take(n).collect()
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: cache files are written under a temporary name and renamed into place, never
    // modified after that, so the mapped bytes do not change while mapped.
    unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))
}

/// Hash of everything the cache's contents depend on.
fn fingerprint(dir: &Path, split_name: &str, manifest: &Manifest, entry: &SplitEntry) -> Result<[u8; 32]> {
    let mut hash = Sha256::new();
    hash.update(format!("overfill token cache v{CACHE_VERSION}\n{}\n{split_name}\n", manifest.key));
    for shard in &entry.shards {
        let path = dir.join(&shard.file);
        let meta = std::fs::metadata(&path).with_context(|| format!("shard {} of the manifest", path.display()))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        hash.update(format!(
            "{} {} {} {} {} {} {modified}\n",
            shard.file,
            shard.rows,
            shard.bytes,
            shard.context_tokens,
            shard.target_tokens,
            meta.len()
        ));
    }
    Ok(hash.finalize().into())
}

/// `path` + `.tmp-PID-N`: unique per process and call, so concurrent builders (ranks, threads)
/// never share a file.
fn unique_tmp(path: &Path) -> PathBuf {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".tmp-{}-{n}", std::process::id()));
    path.with_file_name(name)
}

/// Removes its files on drop unless disarmed (a failed build leaves nothing behind).
struct TmpFiles(Vec<PathBuf>);

impl Drop for TmpFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// An exclusive advisory lock on `path` (released when the returned file is closed, also when the
/// process dies). Waits, with a message, while another process holds it.
fn lock_build(path: &Path) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!("reader: waiting for another process to finish the token cache ({})", path.display());
            file.lock().with_context(|| format!("locking {}", path.display()))?;
        }
        Err(std::fs::TryLockError::Error(err)) => {
            eprintln!("reader: cannot lock {} ({err}); building without the lock", path.display());
        }
    }
    Ok(file)
}

fn build(dir: &Path, entry: &SplitEntry, tokens_path: &Path, index_path: &Path, expected: &Expected) -> Result<()> {
    eprintln!("reader: building the token cache {} ({} rows)", index_path.display(), entry.rows);
    let tmp = TmpFiles(vec![unique_tmp(tokens_path), unique_tmp(index_path)]);
    let create = |path: &Path| File::create(path).with_context(|| format!("creating {}", path.display()));
    let mut tokens_out = BufWriter::with_capacity(1 << 20, create(&tmp.0[0])?);
    let mut index_out = BufWriter::with_capacity(1 << 20, create(&tmp.0[1])?);
    index_out.write_all(bytemuck::bytes_of(&Header::zeroed()))?;

    let progress = indicatif::ProgressBar::new(entry.rows).with_style(
        indicatif::ProgressStyle::with_template("token cache {bar:40} {human_pos}/{human_len} rows eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut source_names: Vec<String> = Vec::new();
    let (mut rows, mut tokens) = (0u64, 0u64);
    for shard in &entry.shards {
        let path = dir.join(&shard.file);
        let shard_rows_before = rows;
        let file = File::open(&path).with_context(|| format!("opening shard {}", path.display()))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| format!("reading shard {}", path.display()))?;
        let columns = ["row_id", "source", "context_ids", "target_ids", "shuffle_key"];
        let mask = ProjectionMask::columns(builder.parquet_schema(), columns);
        for batch in builder.with_projection(mask).with_batch_size(1024).build()? {
            let batch = batch.with_context(|| format!("decoding shard {}", path.display()))?;
            let column = |name: &str| batch.column_by_name(name).ok_or_else(|| anyhow!("shard {}: no column {name}", path.display()));
            let row_id = column("row_id")?.as_primitive_opt::<UInt64Type>().ok_or_else(|| anyhow!("row_id is not u64"))?;
            let shuffle_key = column("shuffle_key")?.as_primitive_opt::<UInt64Type>().ok_or_else(|| anyhow!("shuffle_key is not u64"))?;
            let source = column("source")?.as_string_opt::<i32>().ok_or_else(|| anyhow!("source is not utf8"))?;
            let context = column("context_ids")?.as_list_opt::<i32>().ok_or_else(|| anyhow!("context_ids is not a list"))?;
            let target = column("target_ids")?.as_list_opt::<i32>().ok_or_else(|| anyhow!("target_ids is not a list"))?;
            for i in 0..batch.num_rows() {
                let context_ids = context.value(i);
                let target_ids = target.value(i);
                let context_ids = context_ids.as_primitive_opt::<UInt32Type>().ok_or_else(|| anyhow!("context_ids are not u32"))?;
                let target_ids = target_ids.as_primitive_opt::<UInt32Type>().ok_or_else(|| anyhow!("target_ids are not u32"))?;
                let name = source.value(i);
                let source_index = match source_names.iter().position(|s| s == name) {
                    Some(k) => k,
                    None => {
                        source_names.push(name.to_string());
                        source_names.len() - 1
                    }
                };
                let total_len = context_ids.len() + target_ids.len();
                let record = RowRecord {
                    token_start: tokens,
                    context_len: u32::try_from(context_ids.len())?,
                    total_len: u32::try_from(total_len)?,
                    row_id: row_id.value(i),
                    shuffle_key: shuffle_key.value(i),
                    source: source_index as u32,
                    reserved: 0,
                };
                // Little-endian on disk = native here (big-endian hosts are refused above).
                tokens_out.write_all(bytemuck::cast_slice(context_ids.values()))?;
                tokens_out.write_all(bytemuck::cast_slice(target_ids.values()))?;
                index_out.write_all(bytemuck::bytes_of(&record))?;
                tokens += total_len as u64;
                rows += 1;
            }
            progress.inc(batch.num_rows() as u64);
        }
        if rows - shard_rows_before != shard.rows {
            bail!("shard {} holds {} rows, the manifest says {}; preprocess again", path.display(), rows - shard_rows_before, shard.rows);
        }
    }
    progress.finish_and_clear();
    if (rows, tokens) != (expected.rows, expected.tokens) {
        bail!(
            "the shards of {} hold {rows} rows and {tokens} tokens, the manifest says {} and {}; preprocess again",
            dir.display(),
            expected.rows,
            expected.tokens
        );
    }
    let sources_json = serde_json::to_vec(&source_names)?;
    index_out.write_all(&sources_json)?;
    let mut fingerprint = [0u8; 16];
    fingerprint.copy_from_slice(&expected.fingerprint[..16]);
    let header = Header {
        magic: MAGIC,
        version: CACHE_VERSION,
        record_bytes: RECORD_BYTES as u32,
        rows,
        tokens,
        sources_json_bytes: sources_json.len() as u64,
        fingerprint,
        reserved: 0,
    };
    index_out.seek(SeekFrom::Start(0))?;
    index_out.write_all(bytemuck::bytes_of(&header))?;
    for (out, path) in [(tokens_out, &tmp.0[0]), (index_out, &tmp.0[1])] {
        let file = out.into_inner().map_err(|e| anyhow!("writing {}: {}", path.display(), e.error()))?;
        file.sync_all().with_context(|| format!("writing {}", path.display()))?;
    }
    // Tokens first: an index in place always has its token file in place.
    for (from, to) in tmp.0.iter().zip([tokens_path, index_path]) {
        std::fs::rename(from, to).with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// Remove this split's caches (and their lock files) of earlier shards, best effort. Processes
/// that still map one keep their pages: unlinking a mapped file leaves the mapping valid.
fn remove_stale(cache_dir: &Path, split_name: &str, current_stem: &str) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.starts_with(&format!("{split_name}-"))
            && (name.ends_with(".tokens") || name.ends_with(".index") || name.ends_with(".lock"));
        if ours && !name.starts_with(current_stem) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
