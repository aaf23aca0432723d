//! The recipe: one typed structure for every stage, read in one place.
//!
//! A recipe TOML (`configs/<name>.toml`) has one table per stage: `name`, `[model]`, `[data]`,
//! `[[sources]]`, `[preprocess]` (section types from `overfill_data::recipe`, shared with the
//! data crate), `[calibrate]`, `[prune]` (here), `[train]` (`overfill_train::TrainSection`) and
//! `[distill]` (here).
//! Every table rejects unknown keys and wrong types, with an error naming the file, line, table
//! and key and the closest valid key ([`explain`]). Built-in defaults fill what a recipe leaves
//! out; `--set TABLE.KEY=VALUE` and each stage's own flags override recipe values. The recipe
//! remembers where every value came from, and [`Recipe::to_toml`] prints the resolved recipe with
//! that marked (`# default`, `# recipe`, `# flag`) in a form that reads back to the same values;
//! every stage writes it next to its output ([`write_resolved`]).
mod emit;
mod explain;

pub use emit::Origin;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use overfill_data::recipe::{write_resolved_text, DataSection, ModelSection, PreprocessSection, SourceSpec};
use serde::{Deserialize, Serialize};

use overfill_train::TrainSection;

/// `[calibrate]`: the calibration pass of `overfill calibrate-prune`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalibrateSection {
    /// The model to score and prune. Not set: `[model] path`.
    pub model: Option<String>,
    /// Token shards, or a JSON file of token-id lists. Not set: `[data] shards`.
    pub data: Option<String>,
    /// Calibration samples.
    pub calib_size: usize,
    /// Samples per forward pass.
    pub batch_size: usize,
    /// Tokens per sample (context + target, truncated).
    pub max_seq_len: usize,
    /// Aggregation over a sample's tokens: `mean` (signed, the paper) or `abs-mean` (Model-Optimizer).
    pub seq_agg: String,
    /// Norm over samples: `l2` or `l1`.
    pub norm: String,
    /// `f32`, `bf16` or `f16`. Not set: bf16 on CUDA, f32 on CPU.
    pub dtype: Option<String>,
    /// `cpu`, `cuda` or `cuda:N`. Not set: CUDA when available.
    pub device: Option<String>,
    /// Importance scores of an earlier run to reuse instead of calibrating.
    pub scores: Option<String>,
}

impl Default for CalibrateSection {
    fn default() -> Self {
        CalibrateSection {
            model: None,
            data: None,
            calib_size: 512,
            batch_size: 16,
            max_seq_len: 512,
            seq_agg: "mean".into(),
            norm: "l2".into(),
            dtype: None,
            device: None,
            scores: None,
        }
    }
}

/// `[prune]`: the widths of the pruned model. Each width is a prune ratio (`width_*`, the share
/// of channels removed, in [0, 1)) or an absolute size (`hidden_size`, `intermediate_size`), never
/// both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PruneSection {
    /// Share of the hidden channels removed: kept = int((1 - ratio) · hidden_size).
    pub width_hidden: Option<f64>,
    /// Share of the FFN channels removed.
    pub width_intermediate: Option<f64>,
    /// Hidden channels kept (instead of `width_hidden`).
    pub hidden_size: Option<usize>,
    /// FFN channels kept (instead of `width_intermediate`).
    pub intermediate_size: Option<usize>,
    /// Round kept widths to the nearest multiple of this.
    pub round_to: Option<usize>,
    /// Output folder of the pruned checkpoint.
    pub out: Option<String>,
}

/// `[distill]`: `overfill distill`, the full model's own answers to the `[[sources]]` prompts as
/// training data for a speculative-decoding drafter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillSection {
    /// Output folder of the answers (JSONL parts, `distill.json`).
    pub out: Option<String>,
    /// Use only the first N rows (in input order, after source fractions). Not set: all.
    pub limit: Option<u64>,
    /// Tokens per answer at most; longer answers are cut there (and marked unfinished).
    pub max_new_tokens: usize,
    /// Prompts generated together (one output part each).
    pub batch_size: usize,
    /// Leave out answers cut at `max_new_tokens` (their end-of-turn token, added by
    /// preprocess, would teach the drafter to stop where the cut was).
    pub drop_unfinished: bool,
    /// `f32`, `bf16` or `f16`. Not set: bf16 on CUDA, f32 on CPU.
    pub dtype: Option<String>,
    /// `cpu`, `cuda` or `cuda:N`. Not set: CUDA when available.
    pub device: Option<String>,
}

impl Default for DistillSection {
    fn default() -> Self {
        DistillSection { out: None, limit: None, max_new_tokens: 256, batch_size: 32, drop_unfinished: false, dtype: None, device: None }
    }
}

/// The whole recipe. Field order is the order of the printed recipe.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    #[serde(default)]
    pub calibrate: CalibrateSection,
    #[serde(default)]
    pub prune: PruneSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub distill: DistillSection,
    /// Origin of every value that is not a default, by dotted key (`preprocess.seed`,
    /// `sources`). Not part of the TOML.
    #[serde(skip)]
    origins: BTreeMap<String, Origin>,
    /// The file the recipe was read from, and its text (for positions in messages).
    #[serde(skip)]
    file: Option<PathBuf>,
    #[serde(skip)]
    text: Option<String>,
}

/// `--config FILE` and `--set TABLE.KEY=VALUE`, shared by every command that reads a recipe.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RecipeArgs {
    /// Recipe TOML (configs/*.toml); flags override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override any recipe value, e.g. --set train.learning_rate=1e-4 --set data.shards=work/x
    /// (VALUE is TOML; a bare word is a string). Repeatable.
    #[arg(long = "set", value_name = "TABLE.KEY=VALUE")]
    pub set: Vec<String>,
}

impl RecipeArgs {
    /// The recipe file (or the built-in defaults without `--config`) with the `--set` overrides.
    pub fn load(&self) -> Result<Recipe> {
        let mut recipe = match &self.config {
            Some(path) => Recipe::load(path)?,
            None => Recipe::default(),
        };
        for assignment in &self.set {
            recipe.set(assignment)?;
        }
        Ok(recipe)
    }
}

impl Recipe {
    /// Read a recipe strictly: unknown tables or keys and values of the wrong type are errors
    /// that name the file, line, table and key (and the closest valid key).
    pub fn load(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading recipe {}", path.display()))?;
        Recipe::parse(&text, path)
    }

    /// [`Recipe::load`] on text already read (`file` names it in errors).
    pub fn parse(text: &str, file: &Path) -> Result<Recipe> {
        let mut recipe: Recipe = toml::from_str(text).map_err(|e| anyhow!(explain::file_error(file, text, &e)))?;
        // Which keys the file sets (for `# recipe`); the text parsed above, so this cannot fail.
        let table: toml::Table = toml::from_str(text).map_err(|e| anyhow!("{}: {}", file.display(), e.message()))?;
        for key in explain::leaf_keys(&table) {
            recipe.origins.insert(key, Origin::Recipe);
        }
        recipe.file = Some(file.to_path_buf());
        recipe.text = Some(text.to_string());
        Ok(recipe)
    }

    /// Apply one `--set TABLE.KEY=VALUE` override: the value is TOML (`16`, `1e-4`, `"x"`,
    /// `["en"]`); a value that does not parse as TOML is taken as a string (`--set data.shards=work/x`).
    /// It is checked by the same strict reader as a file.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (key, text) = assignment
            .split_once('=')
            .ok_or_else(|| anyhow!("--set {assignment:?}: expected TABLE.KEY=VALUE (e.g. --set train.learning_rate=1e-4)"))?;
        let key = key.trim();
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) || parts.len() > 2 {
            bail!("--set {assignment:?}: expected TABLE.KEY=VALUE or a top-level KEY=VALUE");
        }
        let value = parse_set_value(text.trim());
        let mut table = toml::Table::try_from(&*self).context("serializing the recipe")?;
        match parts[..] {
            [top] => {
                table.insert(top.to_string(), value);
            }
            [section, field] => {
                let entry = table.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match entry {
                    toml::Value::Table(t) => {
                        t.insert(field.to_string(), value);
                    }
                    _ => bail!("--set {assignment:?}: `{section}` is not a table"),
                }
            }
            _ => unreachable!("checked above"),
        }
        let updated: Recipe = Recipe::deserialize(toml::Value::Table(table))
            .map_err(|e| anyhow!("--set {assignment}: {}", explain::describe(&[], &e, Some(key))))?;
        let (origins, file, text) = (std::mem::take(&mut self.origins), self.file.take(), self.text.take());
        *self = Recipe { origins, file, text, ..updated };
        self.origins.insert(key.to_string(), Origin::Flag);
        Ok(())
    }

    /// A command-line override: when `value` is given, `apply` stores it and `keys` (dotted, e.g.
    /// `preprocess.seed`) are marked as set by a flag.
    pub fn flag<T>(&mut self, keys: &[&str], value: Option<T>, apply: impl FnOnce(&mut Recipe, T)) {
        if let Some(v) = value {
            apply(self, v);
            for key in keys {
                self.origins.insert(key.to_string(), Origin::Flag);
            }
        }
    }

    /// Where a value came from (dotted key; entries of `[[sources]]` share `sources`).
    pub fn origin(&self, key: &str) -> Origin {
        let key = if key.starts_with("sources.") { "sources" } else { key };
        self.origins.get(key).copied().unwrap_or(Origin::Default)
    }

    /// The file the recipe was read from, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Checks across keys and of value ranges that types cannot express. Every command runs them
    /// after its flags are applied, before any work.
    pub fn check(&self) -> Result<()> {
        let p = &self.preprocess;
        if p.val_size.is_some() && p.val_fraction.is_some() {
            bail!("{}[preprocess] has both val_size and val_fraction; give one", self.at("preprocess.val_fraction"));
        }
        let c = &self.calibrate;
        if !matches!(c.seq_agg.as_str(), "mean" | "abs-mean") {
            bail!("{}[calibrate] seq_agg = {:?}: expected \"mean\" or \"abs-mean\"", self.at("calibrate.seq_agg"), c.seq_agg);
        }
        if !matches!(c.norm.as_str(), "l2" | "l1") {
            bail!("{}[calibrate] norm = {:?}: expected \"l2\" or \"l1\"", self.at("calibrate.norm"), c.norm);
        }
        if let Some(dtype) = &c.dtype {
            overfill_model::checkpoint::parse_dtype(dtype).with_context(|| format!("{}[calibrate] dtype", self.at("calibrate.dtype")))?;
        }
        if let Some(device) = &c.device {
            check_device_name(device).with_context(|| format!("{}[calibrate] device", self.at("calibrate.device")))?;
        }
        let pr = &self.prune;
        for (ratio_key, ratio, size_key, size) in [
            ("width_hidden", pr.width_hidden, "hidden_size", pr.hidden_size),
            ("width_intermediate", pr.width_intermediate, "intermediate_size", pr.intermediate_size),
        ] {
            if ratio.is_some() && size.is_some() {
                bail!(
                    "{}[prune] has both {ratio_key} (a ratio) and {size_key} (an absolute width); give one",
                    self.at(&format!("prune.{size_key}"))
                );
            }
            if let Some(r) = ratio {
                check_ratio(r).map_err(|why| {
                    let at = self.at(&format!("prune.{ratio_key}"));
                    // `width_hidden = 2334` most likely meant 2334 channels.
                    let n = if r >= 1.0 && r.fract() == 0.0 { format!("{r}") } else { "N".to_string() };
                    anyhow!("{at}[prune] {ratio_key} = {r}: {why}; to keep {n} channels write {size_key} = {n}")
                })?;
            }
        }
        check_device_name(&self.train.device).with_context(|| format!("{}[train] device", self.at("train.device")))?;
        let d = &self.distill;
        if d.max_new_tokens == 0 || d.batch_size == 0 || d.limit == Some(0) {
            bail!("{}[distill] max_new_tokens, batch_size and limit must be at least 1", self.at("distill.max_new_tokens"));
        }
        if let Some(dtype) = &d.dtype {
            overfill_model::checkpoint::parse_dtype(dtype).with_context(|| format!("{}[distill] dtype", self.at("distill.dtype")))?;
        }
        if let Some(device) = &d.device {
            check_device_name(device).with_context(|| format!("{}[distill] device", self.at("distill.device")))?;
        }
        Ok(())
    }

    /// Where a value came from, as the start of a message: `FILE:LINE:COL: ` for a recipe value,
    /// `command line: ` for a flag, nothing for a default.
    fn at(&self, key: &str) -> String {
        match (self.origin(key), &self.file) {
            (Origin::Flag, _) => "command line: ".to_string(),
            (Origin::Recipe, Some(file)) => {
                let position = self.text.as_deref().and_then(|text| explain::position_of(text, key));
                match position {
                    Some((line, col)) => format!("{}:{line}:{col}: ", file.display()),
                    None => format!("{}: ", file.display()),
                }
            }
            _ => String::new(),
        }
    }

    /// The resolved recipe as TOML, every value marked with where it came from; reading it back
    /// gives the same values.
    pub fn to_toml(&self) -> Result<String> {
        emit::annotated_toml(self, self.file(), |key| self.origin(key))
    }
}

/// Write the resolved recipe to `dir/resolved-recipe.toml` (atomically), so that a run can be
/// reproduced from its output folder alone.
pub fn write_resolved(recipe: &Recipe, dir: &Path) -> Result<()> {
    write_resolved_text(dir, &recipe.to_toml()?)
}

/// A prune ratio is the share of channels removed, in [0, 1).
pub fn check_ratio(ratio: f64) -> std::result::Result<(), String> {
    if ratio.is_finite() && (0.0..1.0).contains(&ratio) {
        Ok(())
    } else {
        Err(format!("prune ratio {ratio} is outside [0, 1) (a ratio is the share of channels removed)"))
    }
}

/// `cpu`, `cuda` or `cuda:N` (whether the device exists is checked when a model loads).
fn check_device_name(device: &str) -> Result<()> {
    let d = device.trim().to_ascii_lowercase();
    let ok = d == "cpu" || d == "cuda" || d.strip_prefix("cuda:").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if !ok {
        bail!("invalid device {device:?} (use cpu, cuda or cuda:N)");
    }
    Ok(())
}

/// A `--set` value: TOML when it parses as a TOML value, otherwise the text as a string.
fn parse_set_value(text: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {text}")) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(text.to_string())),
        Err(_) => toml::Value::String(text.to_string()),
    }
}

#[cfg(test)]
mod tests;
