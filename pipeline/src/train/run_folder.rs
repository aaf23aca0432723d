//! The run folder: `checkpoint-STEP/` (decoder in HF layout + `optimizer.safetensors` +
//! `trainer_state.json`), `final/`, the resolved recipe, the step log. A checkpoint is written to
//! `.checkpoint-STEP.tmp/` and renamed, so a folder named `checkpoint-STEP` is always complete.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use overfill_model::checkpoint::save_checkpoint;
use overfill_model::transformer::Transformer;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::config::TrainSection;
use super::settings::{trajectory_differences, Settings};
use crate::recipe::{write_resolved, Recipe, RESOLVED_FILE};

/// The resolved recipe; its `[train]` table identifies the run.
pub const RECIPE_FILE: &str = RESOLVED_FILE;
pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const FINAL_DIR: &str = "final";
/// One JSON object per logged step (rank 0): what the progress bar and TensorBoard show.
pub const LOG_FILE: &str = "log.jsonl";
/// Weight files above this are split into shards (as transformers' default 5 GB).
const MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Tokenizer files copied from the decoder's source folder into every saved decoder.
const TOKENIZER_FILES: [&str; 5] =
    ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "generation_config.json"];

/// Where the run stands after an optimizer step: everything besides weights and optimizer
/// tensors that an exact resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done (skipped steps included).
    pub step: u64,
    /// Epoch and index in it of the next step's global batch.
    pub epoch: u64,
    pub step_in_epoch: usize,
    /// AdamW's update count (steps minus skipped ones).
    pub optimizer_steps: u64,
    pub bad_step_streak: u64,
    pub skipped_steps: u64,
    pub skipped_rows: u64,
    pub predicted_tokens: u64,
    pub total_steps: u64,
    pub seed: u64,
    /// The trainer uses no random numbers after initialisation (no dropout): nothing to restore.
    pub rng_state: Option<String>,
    pub settings: TrainSection,
}

/// What is in a run folder before this run touches it.
pub enum Existing {
    /// No folder, or an empty one.
    Fresh,
    /// A run of the same trajectory; its newest complete checkpoint, if any.
    SameRun { checkpoint: Option<(u64, PathBuf)> },
    /// `--resume` of a run that already ended at `step` (its `final/`), at or past this run's stop.
    Finished { step: u64 },
}

/// Refuses a folder that is not a run of these settings (before anything is written); with
/// `--resume` also picks the newest complete checkpoint.
pub fn inspect(settings: &Settings, total_steps: u64) -> Result<Existing> {
    let out = &settings.out;
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    let inputs = [("full model", settings.full.as_deref()), ("decoder", Some(settings.decoder.as_path())), ("shard folder", Some(settings.data.as_path()))];
    for (what, input) in inputs {
        if let Some(input) = input {
            if same(out, input) || input.canonicalize().is_ok_and(|i| out.canonicalize().is_ok_and(|o| i.starts_with(&o) || o.starts_with(&i))) {
                bail!("--out {} overlaps the {what} {}; choose a separate run folder", out.display(), input.display());
            }
        }
    }
    if !out.exists() {
        return Ok(Existing::Fresh);
    }
    if !out.is_dir() {
        bail!("--out {} exists and is not a folder", out.display());
    }
    let is_empty = std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))?.next().is_none();
    if is_empty {
        return Ok(Existing::Fresh);
    }
    let recipe_path = out.join(RECIPE_FILE);
    // Other stages write a resolved recipe too: a model folder (config.json) or a shard folder
    // (manifest.json) is never a run folder.
    if !recipe_path.is_file() || out.join("config.json").exists() || out.join("manifest.json").exists() {
        bail!("--out {} is not empty and holds no {RECIPE_FILE}: not a run folder of overfill train; choose another --out", out.display());
    }
    let previous = read_train_section(&recipe_path)?;
    let differences = trajectory_differences(&previous, &settings.train);
    if !differences.is_empty() {
        bail!(
            "--out {} holds a run with a different recipe ({}); refusing to {} it. Choose another --out.",
            out.display(),
            differences.join("; "),
            if settings.resume { "resume" } else { "overwrite" }
        );
    }
    let checkpoint = newest_checkpoint(out)?;
    if !settings.resume && (checkpoint.is_some() || out.join(FINAL_DIR).exists()) {
        bail!(
            "--out {} already holds this run ({}); pass --resume to continue it, or choose another --out",
            out.display(),
            match &checkpoint {
                Some((step, _)) => format!("checkpoint at step {step}"),
                None => "a final decoder".to_string(),
            }
        );
    }
    if settings.resume && checkpoint.is_none() && out.join(FINAL_DIR).exists() {
        // Finished without checkpoints (save_steps = 0): fine if it already reached this run's
        // stop, impossible to continue otherwise (no optimizer state).
        let finished_at = read_state(&out.join(FINAL_DIR)).ok().map(|s| s.step);
        let stop = settings.train.max_steps.unwrap_or(u64::MAX);
        match finished_at {
            Some(step) if step >= stop || step == total_steps => return Ok(Existing::Finished { step }),
            _ => bail!(
                "--resume: the run in {} finished{} and left no checkpoint to continue from (save_steps = 0); \
                 choose another --out to train again",
                out.display(),
                finished_at.map(|s| format!(" at step {s}")).unwrap_or_default()
            ),
        }
    }
    Ok(Existing::SameRun { checkpoint: if settings.resume { checkpoint } else { None } })
}

fn read_train_section(recipe_path: &Path) -> Result<TrainSection> {
    Ok(Recipe::load(recipe_path).with_context(|| format!("reading the run's recipe {}", recipe_path.display()))?.train)
}

/// `checkpoint-STEP` folders (complete ones: they are renamed into place last), oldest first.
pub fn checkpoints(out: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(out) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", out.display()))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(step) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<u64>().ok()) {
            if entry.path().join(STATE_FILE).is_file() {
                found.push((step, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

pub fn newest_checkpoint(out: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(checkpoints(out)?.pop())
}

/// Removes temporary folders a killed run left behind.
pub fn remove_stale_temporaries(out: &Path) -> Result<()> {
    for entry in std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') && name.contains(".tmp") && entry.path().is_dir() {
            std::fs::remove_dir_all(entry.path()).with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Writes the resolved recipe (the `[train]` table as this run uses it).
pub fn write_recipe(settings: &Settings) -> Result<()> {
    write_resolved(&settings.recipe, &settings.out)
}

/// The decoder in HF layout (config.json, safetensors, the source's tokenizer files) into `dir`.
pub fn save_decoder(decoder: &Transformer, source_dir: &Path, dir: &Path) -> Result<()> {
    save_checkpoint(dir, &decoder.config, &decoder.tensors(), MAX_SHARD_BYTES)
        .with_context(|| format!("saving the decoder to {}", dir.display()))?;
    for name in TOKENIZER_FILES {
        let src = source_dir.join(name);
        if src.is_file() {
            std::fs::copy(&src, dir.join(name)).with_context(|| format!("copying {} to {}", src.display(), dir.display()))?;
        }
    }
    Ok(())
}

/// Writes `checkpoint-STEP` atomically and keeps the newest `keep` (0 = all).
pub fn save_checkpoint_folder(
    out: &Path,
    decoder: &Transformer,
    decoder_source: &Path,
    optimizer_state: &[(String, Tensor)],
    rank_files: &[(String, PathBuf)],
    state: &TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    let name = format!("checkpoint-{}", state.step);
    let tmp = out.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("clearing {}", tmp.display()))?;
    }
    save_decoder(decoder, decoder_source, &tmp)?;
    let optimizer_path = tmp.join(OPTIMIZER_FILE);
    Tensor::write_safetensors(optimizer_state, &optimizer_path).with_context(|| format!("writing {}", optimizer_path.display()))?;
    // Files each rank wrote for this checkpoint (ZeRO-1 optimizer slices), moved in before the
    // folder becomes visible.
    for (name, path) in rank_files {
        std::fs::rename(path, tmp.join(name)).with_context(|| format!("moving {} into {}", path.display(), tmp.display()))?;
        if let Some(staging) = path.parent() {
            let _ = std::fs::remove_dir(staging);
        }
    }
    write_state(&tmp, state)?;
    let dir = out.join(&name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    if keep > 0 {
        let all = checkpoints(out)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
            std::fs::remove_dir_all(old).with_context(|| format!("removing old checkpoint {}", old.display()))?;
        }
    }
    Ok(dir)
}

pub fn write_state(dir: &Path, state: &TrainerState) -> Result<()> {
    let path = dir.join(STATE_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(state)? + "\n").with_context(|| format!("writing {}", path.display()))
}

pub fn read_state(checkpoint: &Path) -> Result<TrainerState> {
    let path = checkpoint.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

pub fn read_optimizer_state(checkpoint: &Path) -> Result<Vec<(String, Tensor)>> {
    let path = checkpoint.join(OPTIMIZER_FILE);
    Tensor::read_safetensors(&path).with_context(|| format!("reading {}", path.display()))
}

/// Keeps only the step-log lines of steps <= `step` (a resumed run rewrites the later ones).
pub fn truncate_log(out: &Path, step: u64) -> Result<()> {
    let path = out.join(LOG_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(&path, kept).with_context(|| format!("rewriting {}", path.display()))
}
