//! `manifest.json`: what a shard folder holds and how it was made.
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::shard::{write_atomic, Stats};

pub const MANIFEST_FILE: &str = "manifest.json";
/// Where a run keeps its work until it finishes (see `preprocess`).
pub const WORK_DIR: &str = ".partial";
/// Bump when the shard layout or the processing changes meaning (old folders then rebuild).
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputEntry {
    pub path: String,
    pub source: String,
    pub format: String,
    pub size: u64,
    pub sha256: String,
    pub rows: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizerEntry {
    pub path: String,
    pub sha256: String,
    pub config_sha256: Option<String>,
    pub vocab_size: usize,
    pub bos_token: String,
    pub end_of_turn: String,
    pub end_of_turn_id: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateEntry {
    /// `llama3`, `chatml`, `model` or a file path.
    pub spec: String,
    pub sha256: String,
    pub source: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
    pub context_tokens: u64,
    pub target_tokens: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SplitEntry {
    pub rows: u64,
    pub context_tokens: u64,
    pub target_tokens: u64,
    pub shards: Vec<ShardEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// SHA-256 over inputs, config, template and tokenizer: equal key, equal shards.
    pub key: String,
    pub config: serde_json::Value,
    pub inputs: Vec<InputEntry>,
    pub tokenizer: TokenizerEntry,
    pub template: TemplateEntry,
    /// Counts over all input rows: kept, dropped by reason, bad rows, tokens, length histograms.
    pub counts: Stats,
    pub bad_fraction: f64,
    pub histogram_edges: Vec<usize>,
    pub train: SplitEntry,
    pub val: SplitEntry,
    pub created_unix: u64,
    /// Set when the run failed (e.g. too many malformed rows): why. Such a folder holds no
    /// shards, only the counts and the malformed samples, and [`Manifest::load`] refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

impl Manifest {
    /// The manifest of a finished shard folder. Refuses the manifest of a failed run, with its
    /// reason: what every later stage reads.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let manifest = Manifest::load_any(dir)?;
        if let Some(reason) = &manifest.failed {
            bail!(
                "{} is the output of a failed preprocess run and holds no shards: {reason} (fix the input or the limit and run preprocess again)",
                dir.display()
            );
        }
        Ok(manifest)
    }

    /// The manifest whether or not its run failed (for preprocess itself and for inspecting the
    /// counts and malformed samples of a failed run).
    pub fn load_any(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if dir.join(WORK_DIR).is_dir() => {
                return Err(e).with_context(|| {
                    format!("{} holds an unfinished preprocess run (no {MANIFEST_FILE} yet); run preprocess again to finish it", dir.display())
                })
            }
            Err(e) => {
                return Err(e).with_context(|| format!("reading {} (is {} a preprocessed shard folder?)", path.display(), dir.display()))
            }
        };
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// What the shards hold, independent of where the folder is: SHA-256 over the key (inputs,
    /// settings, tokenizer, template) and the train and val tables (each shard's file, rows,
    /// bytes and token counts), so a folder rebuilt by another version of preprocess with other
    /// rows differs too. A copied or moved folder keeps it; `overfill train --resume` compares it.
    pub fn content_digest(&self) -> Result<String> {
        let identity = serde_json::json!({"key": self.key, "train": self.train, "val": self.val});
        Ok(hex::encode(Sha256::digest(serde_json::to_vec(&identity)?)))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        write_atomic(&dir.join(MANIFEST_FILE), serde_json::to_string_pretty(self)?.as_bytes())
    }
}
