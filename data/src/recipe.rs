//! The data tables of a recipe TOML (`configs/<name>.toml`): `[model]`, `[data]`, `[[sources]]`
//! and `[preprocess]`. The whole recipe (these plus `[calibrate]`, `[prune]`, `[train]`) is read
//! in one place, `overfill::recipe` in the pipeline crate; the section types live here because
//! `preprocess` is built on them and this crate has no libtorch. Every table rejects unknown keys,
//! and its `Default` holds the built-in defaults (what `overfill config` prints as `# default`).
//!
//! ```toml
//! [model]
//! path = "meta-llama/Llama-3.1-8B-Instruct"
//! [data]
//! shards = "work/8b-3b/shards"   # written by `preprocess`, read by later stages
//! template = "llama3"            # auto | llama3 | chatml | model | path/to/template.jinja
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

/// The file every stage writes next to its output: the resolved recipe.
pub const RESOLVED_FILE: &str = "resolved-recipe.toml";

/// Writes a resolved recipe's text to `dir/resolved-recipe.toml` (atomically), so that a run can be
/// reproduced from its output folder alone.
pub fn write_resolved_text(dir: &Path, text: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(RESOLVED_FILE);
    let tmp = dir.join(format!("{RESOLVED_FILE}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// One `[[sources]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

/// `[model]`: the full model every stage starts from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A model folder or a Hugging Face hub id.
    pub path: Option<String>,
}

/// `[data]`: where the token shards live and how they are made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Output folder of `preprocess`, input of later stages.
    pub shards: Option<String>,
    /// Tokenizer folder or `tokenizer.json` (default: `[model] path`).
    pub tokenizer: Option<String>,
    /// `auto` (the model's own template, `llama3` when it has none), `llama3` (the paper's),
    /// `chatml`, `model` or a template file.
    pub template: String,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection { shards: None, tokenizer: None, template: "auto".into() }
    }
}

/// `[preprocess]`: filters, split and shard settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreprocessSection {
    /// Rows are truncated to this many tokens; a row whose target would be empty is dropped.
    pub max_seq_length: usize,
    /// Rows longer than this (before truncation) are dropped. Not set: no such filter.
    pub pre_filter_max_seq_length: Option<usize>,
    /// Rows whose context is longer than this are dropped. Not set: no such filter.
    pub max_context_length: Option<usize>,
    /// Validation rows (count). Not set, and no `val_fraction`: no validation split.
    pub val_size: Option<u64>,
    /// Validation rows (fraction of the kept rows); excludes `val_size`.
    pub val_fraction: Option<f64>,
    /// Allowed language tags (rows without a tag pass); empty: all.
    pub languages: Vec<String>,
    pub seed: u64,
    /// Drop exact duplicate conversations.
    pub dedup: bool,
    /// Exit non-zero when more than this fraction of rows is malformed.
    pub max_bad_fraction: f64,
    /// Input rows per shard.
    pub rows_per_shard: u64,
}

impl Default for PreprocessSection {
    fn default() -> Self {
        PreprocessSection {
            max_seq_length: 2048,
            pre_filter_max_seq_length: None,
            max_context_length: None,
            val_size: None,
            val_fraction: None,
            languages: Vec::new(),
            seed: 42,
            dedup: false,
            max_bad_fraction: 0.01,
            rows_per_shard: 50_000,
        }
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
    /// The settings of a recipe's data tables (command-line overrides are applied to the recipe
    /// before this). `out` is `[data] shards`.
    pub fn from_recipe(
        model: &ModelSection,
        data: &DataSection,
        sources: &[SourceSpec],
        preprocess: &PreprocessSection,
    ) -> Result<PreprocessConfig> {
        let p = preprocess;
        let val_size = match (p.val_size, p.val_fraction) {
            (Some(_), Some(_)) => bail!("[preprocess] has both val_size and val_fraction"),
            (Some(n), None) => ValSize::Count(n),
            (None, Some(f)) => ValSize::Fraction(f),
            (None, None) => ValSize::Count(0),
        };
        Ok(PreprocessConfig {
            sources: sources.to_vec(),
            tokenizer: data.tokenizer.clone().or_else(|| model.path.clone()).unwrap_or_default(),
            template: data.template.clone(),
            out: data.shards.as_ref().map(PathBuf::from).unwrap_or_default(),
            val_size,
            pre_filter_max_seq_length: p.pre_filter_max_seq_length,
            max_seq_length: p.max_seq_length,
            max_context_length: p.max_context_length,
            languages: p.languages.clone(),
            seed: p.seed,
            dedup: p.dedup,
            max_bad_fraction: p.max_bad_fraction,
            rows_per_shard: p.rows_per_shard,
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
    fn defaults_fill_what_a_section_leaves_out() {
        let model: ModelSection = toml::from_str("path = 'm'").unwrap();
        let data: DataSection = toml::from_str("shards = 'out'").unwrap();
        let preprocess: PreprocessSection = toml::from_str("val_size = 3").unwrap();
        let config = PreprocessConfig::from_recipe(&model, &data, &[], &preprocess).unwrap();
        assert_eq!(config.tokenizer, "m");
        assert_eq!(config.template, "auto");
        assert_eq!(config.out, PathBuf::from("out"));
        assert_eq!(config.val_size, ValSize::Count(3));
        assert_eq!(config.max_seq_length, 2048);
        assert_eq!(config.seed, 42);
        assert_eq!(config.rows_per_shard, 50_000);
        let both: PreprocessSection = toml::from_str("val_size = 3\nval_fraction = 0.1").unwrap();
        let err = PreprocessConfig::from_recipe(&model, &data, &[], &both).unwrap_err().to_string();
        assert!(err.contains("both val_size and val_fraction"), "{err}");
    }

    #[test]
    fn every_section_rejects_unknown_keys_and_wrong_types() {
        let unknown = [
            toml::from_str::<ModelSection>("paht = 'm'").err(),
            toml::from_str::<DataSection>("shard = 'x'").err(),
            toml::from_str::<SourceSpec>("path = 'a'\nfractoin = 0.5").err(),
            toml::from_str::<PreprocessSection>("max_seq_lenght = 16").err(),
        ];
        for (err, key) in unknown.iter().zip(["paht", "shard", "fractoin", "max_seq_lenght"]) {
            let msg = err.as_ref().map(|e| e.message().to_string()).unwrap_or_default();
            assert!(msg.contains(&format!("unknown field `{key}`")), "{key}: {msg}");
        }
        let wrong = [
            toml::from_str::<ModelSection>("path = 3").err(),
            toml::from_str::<DataSection>("template = true").err(),
            toml::from_str::<SourceSpec>("path = 'a'\nfraction = '0.5'").err(),
            toml::from_str::<PreprocessSection>("max_seq_length = '16'").err(),
        ];
        for err in wrong {
            let msg = err.map(|e| e.message().to_string()).unwrap_or_default();
            assert!(msg.contains("invalid type"), "{msg}");
        }
    }
}
