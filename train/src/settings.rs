//! The resolved settings of one `overfill train` run, and every check that must
//! fail before any work is done (nothing is written and no weight is loaded until they pass).
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use overfill_data::reader::ShardDataset;
use overfill_model::config::ModelConfig;
use tch::Kind;

use crate::config::{TrainMode, TrainSection};

/// Everything a run needs, after merging recipe and flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The resolved `[train]` table: flags applied, `full`/`decoder`/`data`/`out` filled in.
    pub train: TrainSection,
    pub full: Option<PathBuf>,
    pub decoder: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub resume: bool,
    /// The resolved recipe as TOML (its `[train]` table equals `train` above): written into the
    /// run folder and shown in TensorBoard.
    pub recipe_toml: String,
}

impl Settings {
    /// Rows of one optimizer step over all ranks.
    pub fn global_batch_rows(&self, world_size: usize) -> usize {
        self.train.per_device_batch_size * self.train.gradient_accumulation_steps * world_size
    }
}

/// Paths default to the recipe's other stages: `[model] path` is the full model, `[prune] out` the
/// decoder, `[data] shards` the data.
pub fn default_paths(t: &mut TrainSection, model_path: &Option<String>, prune_out: &Option<String>, data_shards: &Option<String>) {
    if t.full.is_none() {
        t.full = model_path.clone();
    }
    if t.decoder.is_none() {
        t.decoder = prune_out.clone();
    }
    if t.data.is_none() {
        t.data = data_shards.clone();
    }
    if t.mode != TrainMode::Overfill {
        // The single-model baselines have no frozen model.
        t.full = None;
    }
}

/// A `[train]` table with its paths defaulted ([`default_paths`]) and flags applied → settings;
/// checks the numbers (no file is touched). `recipe_toml` is the resolved recipe holding `t`.
pub fn resolve(t: TrainSection, resume: bool, recipe_toml: String) -> Result<Settings> {
    check_numbers(&t)?;
    let required = |value: &Option<String>, what: &str, flag: &str| -> Result<PathBuf> {
        value.as_deref().map(PathBuf::from).ok_or_else(|| anyhow!("no {flag} given and no {what} in the recipe"))
    };
    let full = match t.mode {
        TrainMode::Overfill => Some(required(&t.full, "[model] path or [train] full", "--full")?),
        TrainMode::Pruned | TrainMode::Sft => None,
    };
    let decoder = required(&t.decoder, "[prune] out or [train] decoder", "--decoder")?;
    let data = required(&t.data, "[data] shards or [train] data", "--data")?;
    let out = required(&t.out, "[train] out", "--out")?;
    Ok(Settings { full, decoder, data, out, resume, recipe_toml, train: t })
}

fn check_numbers(t: &TrainSection) -> Result<()> {
    let positive = |v: usize, name: &str| -> Result<()> {
        if v == 0 {
            bail!("{name} must be at least 1");
        }
        Ok(())
    };
    positive(t.per_device_batch_size, "per_device_batch_size (--batch-size)")?;
    positive(t.gradient_accumulation_steps, "gradient_accumulation_steps (--grad-accum)")?;
    positive(t.num_epochs, "num_epochs")?;
    positive(t.prefetch_batches, "prefetch_batches")?;
    if t.max_seq_length < 3 {
        bail!("max_seq_length = {} leaves no room for a context and 2 target tokens", t.max_seq_length);
    }
    if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
        bail!("learning_rate (--lr) must be a positive number, got {}", t.learning_rate);
    }
    if !(0.0..=1.0).contains(&t.warmup_ratio) {
        bail!("warmup_ratio must be in [0, 1], got {}", t.warmup_ratio);
    }
    if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
        bail!("weight_decay must be >= 0, got {}", t.weight_decay);
    }
    for (name, beta) in [("adam_beta1", t.adam_beta1), ("adam_beta2", t.adam_beta2)] {
        if !(0.0..1.0).contains(&beta) {
            bail!("{name} must be in [0, 1), got {beta}");
        }
    }
    if !(t.adam_epsilon.is_finite() && t.adam_epsilon > 0.0) {
        bail!("adam_epsilon must be positive, got {}", t.adam_epsilon);
    }
    if !(t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0) {
        bail!("max_grad_norm must be >= 0 (0 = no clipping), got {}", t.max_grad_norm);
    }
    if t.max_steps == Some(0) {
        bail!("--max-steps must be at least 1");
    }
    if t.zero_stage > 2 {
        bail!("zero_stage must be 0 (replicated optimizer), 1 (sharded optimizer state) or 2 (sharded optimizer state and gradients), got {}", t.zero_stage);
    }
    if t.max_bad_steps == 0 {
        bail!("max_bad_steps must be at least 1");
    }
    if t.logging_steps == 0 {
        bail!("logging_steps must be at least 1");
    }
    Ok(())
}

/// The fields that decide the trajectory of a run (the weights after step k). A run folder may be
/// continued only with equal ones; where to stop, how often to log/save/evaluate, threads and
/// device may change on resume. The inputs' paths are left out: a checkpoint records the inputs
/// by content (`inputs::RunInputs`), so another spelling of the same folder's path resumes.
pub fn trajectory_key(t: &TrainSection) -> TrainSection {
    TrainSection {
        full: None,
        decoder: None,
        data: None,
        out: None,
        max_steps: None,
        device: String::new(),
        logging_steps: 1,
        eval_steps: 0,
        eval_max_rows: 0,
        save_steps: 0,
        save_total_limit: 0,
        max_bad_steps: 1,
        prefetch_batches: 1,
        threads: 0,
        // Memory levers that leave the gradients as they are.
        activation_checkpointing: false,
        zero_stage: t.zero_stage.min(1),
        ..t.clone()
    }
}

/// Names and values of the trajectory fields in which `a` (the folder's) and `b` (this run's) differ.
pub fn trajectory_differences(a: &TrainSection, b: &TrainSection) -> Vec<String> {
    let table = |t: &TrainSection| toml::Value::try_from(trajectory_key(t)).ok().and_then(|v| v.as_table().cloned()).unwrap_or_default();
    let (ta, tb) = (table(a), table(b));
    let mut keys: Vec<&String> = ta.keys().chain(tb.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| ta.get(*k) != tb.get(*k))
        .map(|k| {
            let show = |v: Option<&toml::Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "(unset)".into());
            format!("{k}: {} in the run folder, {} now", show(ta.get(k)), show(tb.get(k)))
        })
        .collect()
}

/// Every input folder must exist before anything is loaded.
pub fn check_paths_exist(full: Option<&Path>, decoder: &Path, data: &Path) -> Result<()> {
    let check = |path: &Path, what: &str, file: &str| -> Result<()> {
        if !path.is_dir() {
            bail!("{what} {} does not exist or is not a folder", path.display());
        }
        if !path.join(file).is_file() {
            bail!("{what} {} has no {file}", path.display());
        }
        Ok(())
    };
    if let Some(full) = full {
        check(full, "full model", "config.json")?;
    }
    check(decoder, "decoder", "config.json")?;
    check(data, "shard folder", "manifest.json")
}

/// The frozen model's KV cache must be in the dtype the decoder computes in; both are loaded with
/// one compute dtype, so this only fails if that ever changes.
pub fn check_cache_dtype(cache: Kind, decoder: Kind) -> Result<()> {
    if cache != decoder {
        bail!("the full model's KV cache is {cache:?} but the decoder computes in {decoder:?}; they must match");
    }
    Ok(())
}

/// Shards from another tokenizer: a vocabulary larger than the model's embedding, or any token id
/// past it (a scan over the memory-mapped tokens; seconds even at the paper's scale).
pub fn check_shard_vocab(ds: &ShardDataset, what: &str, config: &ModelConfig, model_dir: &Path) -> Result<()> {
    let vocab = config.vocab_size;
    let tokenizer_vocab = ds.manifest.tokenizer.vocab_size;
    // Real releases ship tokenizers with a few ids past the text model's embedding (Llama 3.2's
    // <|image|>): a warning, as at every other load; an id the shards actually use is refused below.
    if tokenizer_vocab > vocab {
        eprintln!(
            "warning: {}: the shards' tokenizer ({}) has {tokenizer_vocab} tokens but the model {} has vocab_size {vocab}; \
             checking that no row uses an id the model cannot embed",
            ds.dir.display(),
            ds.manifest.tokenizer.path,
            model_dir.display()
        );
    }
    for i in 0..ds.len() {
        let context = ds.context_ids(i);
        let target = ds.target_ids(i);
        if let Some(&id) = context.iter().chain(target.iter()).find(|&&id| id as usize >= vocab) {
            bail!(
                "{} ({what} row {i}): token id {id} is not below the model's vocab_size {vocab} ({}; shards from another tokenizer?)",
                ds.dir.display(),
                model_dir.display()
            );
        }
    }
    Ok(())
}
