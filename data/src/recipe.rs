//! The data part of a recipe TOML (`configs/<name>.toml`): `name`, `[model]`, `[data]`,
//! `[[sources]]` and `[preprocess]`. Other stages add their own tables (`[calibrate]`,
//! `[prune]`, `[train]`, ...); this struct ignores them.
//!
//! ```toml
//! name = "8b-3b"
//! [model]
//! path = "meta-llama/Llama-3.1-8B-Instruct"
//! [data]
//! shards = "work/8b-3b/shards"   # written by `preprocess`, read by later stages
//! template = "llama3"            # llama3 | chatml | model | path/to/template.jinja
//! # tokenizer = "path"           # default: the model path
//! [[sources]]
//! name = "openhermes"
//! path = "data/openhermes2_5.json"  # a path or a glob
//! format = "auto"                   # auto | openhermes | infinity | jsonl | parquet
//! fraction = 1.0                    # keep this share of the rows (seeded)
//! [preprocess]
//! pre_filter_max_seq_length = 2000
//! max_seq_length = 2048
//! val_size = 3000
//! ```
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// One `[[sources]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceSpec {
    /// A file path or a glob (relative to the working directory).
    pub path: String,
    /// `auto` (default), `openhermes`/`json`, `infinity`/`parquet`, `jsonl`.
    #[serde(default)]
    pub format: Option<String>,
    /// Written to the `source` column (default: the file name).
    #[serde(default)]
    pub name: Option<String>,
    /// Keep this fraction of the source's rows, chosen by a seeded hash of the row id.
    #[serde(default)]
    pub fraction: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModelSection {
    /// A model folder or a Hugging Face hub id.
    pub path: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DataSection {
    /// Output folder of `preprocess`, input of later stages.
    pub shards: Option<String>,
    /// Tokenizer folder or `tokenizer.json` (default: `[model] path`).
    pub tokenizer: Option<String>,
    /// `llama3`, `chatml`, `model` or a template file.
    pub template: Option<String>,
}

/// `[preprocess]`: filters, split and shard settings. Every field is optional; see
/// [`PreprocessConfig`] for the defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PreprocessSection {
    pub max_seq_length: Option<usize>,
    pub pre_filter_max_seq_length: Option<usize>,
    pub max_context_length: Option<usize>,
    pub val_size: Option<u64>,
    pub val_fraction: Option<f64>,
    pub languages: Option<Vec<String>>,
    pub seed: Option<u64>,
    pub dedup: Option<bool>,
    pub max_bad_fraction: Option<f64>,
    pub rows_per_shard: Option<u64>,
}

/// The data part of a recipe.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Recipe {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    pub sources: Vec<SourceSpec>,
    #[serde(default)]
    pub preprocess: PreprocessSection,
}

impl Recipe {
    pub fn load(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading recipe {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing recipe {}", path.display()))
    }

    /// Where `preprocess` writes and later stages read (`[data] shards`).
    pub fn shards_dir(&self) -> Option<PathBuf> {
        self.data.shards.as_ref().map(PathBuf::from)
    }
}

/// How many rows go to validation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ValSize {
    Count(u64),
    Fraction(f64),
}

/// The effective settings of one preprocess run (recipe plus command-line overrides). Its JSON
/// form (minus `out`, `max_bad_fraction`) goes into the manifest key.
#[derive(Debug, Clone, Serialize)]
pub struct PreprocessConfig {
    pub sources: Vec<SourceSpec>,
    /// Tokenizer folder, file or hub id.
    pub tokenizer: String,
    /// `llama3`, `chatml`, `model` or a file.
    pub template: String,
    pub out: PathBuf,
    pub val_size: ValSize,
    /// Rows longer than this (context + target tokens) are dropped (`too_long`).
    pub pre_filter_max_seq_length: Option<usize>,
    /// Rows are truncated to this many tokens; a row whose target would be empty is dropped.
    pub max_seq_length: usize,
    /// Rows whose context is longer than this are dropped (`context_too_long`).
    pub max_context_length: Option<usize>,
    /// Allowed language tags (rows without a tag pass); empty: all.
    pub languages: Vec<String>,
    pub seed: u64,
    /// Drop exact duplicate conversations (by content hash).
    pub dedup: bool,
    /// Exit non-zero when more than this fraction of rows is malformed.
    pub max_bad_fraction: f64,
    /// Input rows per shard (bounds shard size and the unit of resume).
    pub rows_per_shard: u64,
}

impl PreprocessConfig {
    /// Defaults filled in from a recipe (paths still need to be present).
    pub fn from_recipe(recipe: &Recipe) -> Result<PreprocessConfig> {
        let p = &recipe.preprocess;
        let val_size = match (p.val_size, p.val_fraction) {
            (Some(_), Some(_)) => bail!("[preprocess] has both val_size and val_fraction"),
            (Some(n), None) => ValSize::Count(n),
            (None, Some(f)) => ValSize::Fraction(f),
            (None, None) => ValSize::Count(0),
        };
        Ok(PreprocessConfig {
            sources: recipe.sources.clone(),
            tokenizer: recipe.data.tokenizer.clone().or_else(|| recipe.model.path.clone()).unwrap_or_default(),
            template: recipe.data.template.clone().unwrap_or_else(|| "llama3".into()),
            out: recipe.shards_dir().unwrap_or_default(),
            val_size,
            pre_filter_max_seq_length: p.pre_filter_max_seq_length,
            max_seq_length: p.max_seq_length.unwrap_or(2048),
            max_context_length: p.max_context_length,
            languages: p.languages.clone().unwrap_or_default(),
            seed: p.seed.unwrap_or(42),
            dedup: p.dedup.unwrap_or(false),
            max_bad_fraction: p.max_bad_fraction.unwrap_or(0.01),
            rows_per_shard: p.rows_per_shard.unwrap_or(50_000),
        })
    }

    pub fn validate(&self) -> Result<()> {
        if self.tokenizer.is_empty() {
            bail!("no tokenizer: give --tokenizer, [data] tokenizer or [model] path");
        }
        if self.out.as_os_str().is_empty() {
            bail!("no output folder: give --out or [data] shards");
        }
        if self.max_seq_length < 2 {
            bail!("max_seq_length must be at least 2");
        }
        if self.rows_per_shard == 0 {
            bail!("rows_per_shard must be positive");
        }
        if let ValSize::Fraction(f) = self.val_size {
            if !(0.0..1.0).contains(&f) {
                bail!("val_fraction must be in [0, 1)");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_tables_are_ignored() {
        let recipe: Recipe = toml::from_str(
            "name = 'x'\n[model]\npath = 'm'\n[data]\nshards = 'out'\n[[sources]]\npath = 'a.json'\n[preprocess]\nval_size = 3\n[train]\nlr = 1e-4\n[calibrate]\nn = 5\n",
        )
        .unwrap();
        let config = PreprocessConfig::from_recipe(&recipe).unwrap();
        assert_eq!(config.tokenizer, "m");
        assert_eq!(config.val_size, ValSize::Count(3));
        assert_eq!(config.max_seq_length, 2048);
    }
}
