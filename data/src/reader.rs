//! Reading preprocessed shards: the API later stages (calibration, training) use.
//!
//! ```no_run
//! use overfill_data::reader::{BatchSpec, ShardDataset, Split};
//! # fn main() -> anyhow::Result<()> {
//! let train = ShardDataset::open("work/tiny/shards")?;            // train split
//! let val = ShardDataset::open_split("work/tiny/shards", Split::Val)?;
//! let example = train.get(0).expect("non-empty");                 // row_id, source, ids
//! let spec = BatchSpec { batch_size: Some(8), max_tokens: Some(4096), seed: 0, ..BatchSpec::default() };
//! for batch in train.batches_for_rank(&spec, /*rank*/ 0, /*world_size*/ 2) {
//!     for &i in &batch { let (_ctx, _tgt) = (train.context_ids(i), train.target_ids(i)); }
//! }
//! let calibration: Vec<Vec<u32>> = train.calibration_samples(128, 2048);
//! # let _ = (val, example, calibration); Ok(()) }
//! ```
//!
//! Rows are read through a memory-mapped token cache that the first open of a split builds inside
//! the shard folder ([`cache`]): a process's memory does not grow with the dataset, rows are
//! zero-copy `&[u32]` slices into the map, and data-parallel ranks share one copy through the
//! page cache. The training and evaluation orders are in [`crate::order`].
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::manifest::Manifest;

pub mod cache;
use cache::{RowRecord, TokenCache};

/// Which split to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    /// `train` or `val`, as in shard and cache file names.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// One row of a shard folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Position of the row in the preprocess input (stable for the same inputs).
    pub row_id: u64,
    /// The `[[sources]]` name it came from.
    pub source: String,
    /// Tokens through the last assistant header (processed by the full model, no loss).
    pub context_ids: Vec<u32>,
    /// The last assistant turn, ending with the end-of-turn token (the decoder's loss tokens).
    pub target_ids: Vec<u32>,
}

/// How to group rows into batches.
#[derive(Debug, Clone)]
pub struct BatchSpec {
    /// At most this many rows per batch.
    pub batch_size: Option<usize>,
    /// At most this many padded tokens per batch (rows × longest row in the batch).
    pub max_tokens: Option<usize>,
    /// Seed of the shuffles (rows into groups, and the order of the batches).
    pub seed: u64,
    /// Rows are sorted by length inside groups of this many batches' worth of rows, so a
    /// batch holds rows of similar length while the data stays shuffled.
    pub group_batches: usize,
}

impl Default for BatchSpec {
    fn default() -> Self {
        BatchSpec { batch_size: Some(8), max_tokens: None, seed: 0, group_batches: 64 }
    }
}

/// One split of a preprocessed folder, memory-mapped.
pub struct ShardDataset {
    pub dir: PathBuf,
    pub manifest: Manifest,
    cache: TokenCache,
}

impl ShardDataset {
    /// The train split of a folder written by `overfill preprocess`.
    pub fn open(dir: impl AsRef<Path>) -> Result<ShardDataset> {
        ShardDataset::open_split(dir, Split::Train)
    }

    /// Map one split, building its token cache on first use (or when the shards changed).
    /// An empty split opens with `len() == 0`.
    pub fn open_split(dir: impl AsRef<Path>, split: Split) -> Result<ShardDataset> {
        let dir = dir.as_ref().to_path_buf();
        let manifest = Manifest::load(&dir)?;
        let entry = match split {
            Split::Train => &manifest.train,
            Split::Val => &manifest.val,
        };
        let cache = TokenCache::open(&dir, split.name(), &manifest, entry)
            .with_context(|| format!("opening the {} split of {}", split.name(), dir.display()))?;
        Ok(ShardDataset { dir, manifest, cache })
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn record(&self, i: usize) -> &RowRecord {
        self.cache.record(i)
    }

    /// Row `i` (0-based, in shard order), or `None` past the end.
    pub fn get(&self, i: usize) -> Option<Example> {
        (i < self.len()).then(|| Example {
            row_id: self.row_id(i),
            source: self.source(i).to_string(),
            context_ids: self.context_ids(i).to_vec(),
            target_ids: self.target_ids(i).to_vec(),
        })
    }

    pub fn row_id(&self, i: usize) -> u64 {
        self.record(i).row_id
    }

    /// The `[[sources]]` name row `i` came from.
    pub fn source(&self, i: usize) -> &str {
        self.cache.source_names.get(self.record(i).source as usize).map(String::as_str).unwrap_or("")
    }

    /// Context then target tokens of row `i`, as one slice. Panics if `i >= len()`.
    pub fn ids(&self, i: usize) -> &[u32] {
        let r = self.record(i);
        let start = r.token_start as usize;
        &self.cache.tokens()[start..start + r.total_len as usize]
    }

    pub fn context_ids(&self, i: usize) -> &[u32] {
        &self.ids(i)[..self.context_len(i)]
    }

    pub fn target_ids(&self, i: usize) -> &[u32] {
        &self.ids(i)[self.context_len(i)..]
    }

    /// Context + target length of row `i` (read from the index, no token page touched).
    pub fn total_len(&self, i: usize) -> usize {
        self.record(i).total_len as usize
    }

    pub fn context_len(&self, i: usize) -> usize {
        self.record(i).context_len as usize
    }

    pub fn target_len(&self, i: usize) -> usize {
        self.total_len(i) - self.context_len(i)
    }

    /// Shuffled, length-grouped batches of row indices over the whole split (seeded). The rows of
    /// a batch depend on `batch_size`; training uses [`crate::order::epoch_batches`] instead.
    pub fn batches(&self, spec: &BatchSpec) -> Vec<Vec<usize>> {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut rng);
        let group_rows = spec.batch_size.unwrap_or(64).max(1) * spec.group_batches.max(1);
        let mut batches = Vec::new();
        for group in order.chunks_mut(group_rows) {
            // Longest first, ties by index so the order does not depend on the sort algorithm.
            group.sort_by_key(|&i| (std::cmp::Reverse(self.total_len(i)), i));
            let mut batch: Vec<usize> = Vec::new();
            let mut longest = 0usize;
            for &i in group.iter() {
                let len = self.total_len(i);
                let would_be = (batch.len() + 1) * longest.max(len);
                let full_by_rows = spec.batch_size.map(|b| batch.len() >= b).unwrap_or(false);
                let full_by_tokens = spec.max_tokens.map(|t| would_be > t).unwrap_or(false);
                if !batch.is_empty() && (full_by_rows || full_by_tokens) {
                    batches.push(std::mem::take(&mut batch));
                    longest = 0;
                }
                longest = longest.max(len);
                batch.push(i);
            }
            if !batch.is_empty() {
                batches.push(batch);
            }
        }
        batches.shuffle(&mut rng);
        batches
    }

    /// This rank's share of [`ShardDataset::batches`]: every `world_size`-th batch starting at
    /// `rank`, cut so every rank gets the same number of batches. Ranks' batches are disjoint.
    pub fn batches_for_rank(&self, spec: &BatchSpec, rank: usize, world_size: usize) -> Vec<Vec<usize>> {
        shard_for_rank(self.batches(spec), rank, world_size)
    }

    /// Row indices of this rank: `rank, rank + world_size, ...`, equal counts on every rank.
    pub fn indices_for_rank(&self, rank: usize, world_size: usize) -> Vec<usize> {
        shard_for_rank((0..self.len()).collect(), rank, world_size)
    }

    /// Rows in the seeded global shuffle order of preprocessing (by shuffle key).
    pub fn shuffled_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_by_key(|&i| {
            let r = self.record(i);
            (r.shuffle_key, r.row_id)
        });
        order
    }

    /// The first `n` rows of the seeded shuffle order, each context + target truncated to
    /// `max_seq_len` tokens. Deterministic for a given shard folder.
    pub fn calibration_samples(&self, n: usize, max_seq_len: usize) -> Vec<Vec<u32>> {
        self.shuffled_order()
            .into_iter()
            .take(n)
            .map(|i| self.ids(i)[..self.total_len(i).min(max_seq_len)].to_vec())
            .collect()
    }

    /// [`ShardDataset::calibration_samples`], longest first (stable), for padding-free batching.
    pub fn calibration_samples_by_length(&self, n: usize, max_seq_len: usize) -> Vec<Vec<u32>> {
        let mut samples = self.calibration_samples(n, max_seq_len);
        samples.sort_by_key(|s| std::cmp::Reverse(s.len()));
        samples
    }
}

/// Items `rank, rank + world_size, ...`, truncated to `len / world_size` so all ranks get the same
/// count. `world_size` 0 is treated as 1.
pub fn shard_for_rank<T>(items: Vec<T>, rank: usize, world_size: usize) -> Vec<T> {
    let world_size = world_size.max(1);
    let per_rank = items.len() / world_size;
    items.into_iter().skip(rank).step_by(world_size).take(per_rank).collect()
}
