//! What a run folder holds before this run touches it ([`inspect`]), and what `--resume` continues
//! from: the newest checkpoint whose files are intact (a damaged one is
//! named and passed over), trained on the same inputs (the shards by content, so the same shards
//! by another path resume and other shards at the same path are refused); and a `final/` that a
//! kill left missing or incomplete, written again from that checkpoint.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use overfill_model::file_digests::check_digests;
use overfill_model::transformer::Transformer;
use serde::Deserialize;

use crate::config::TrainSection;
use crate::inputs::RunInputs;
use crate::run_folder::{checkpoints, newest_checkpoint, read_state, save_final_folder, TrainerState, FINAL_DIR, RECIPE_FILE, STATE_FILE};
use crate::settings::{trajectory_differences, Settings};

/// The newest checkpoint of `out` whose listed files all have their sizes and digests and whose
/// inputs are this run's. A damaged checkpoint is named and the previous one tried; `None` when
/// `out` has no checkpoint.
pub fn resume_point(out: &Path, inputs: &RunInputs) -> Result<Option<(u64, PathBuf)>> {
    let all = checkpoints(out)?;
    let mut damaged = Vec::new();
    for (step, dir) in all.into_iter().rev() {
        let checked = check_digests(&dir).and_then(|()| read_state(&dir));
        let state = match checked {
            Ok(state) => state,
            Err(e) => {
                eprintln!("--resume: {} is damaged ({e:#}); falling back to the previous checkpoint", dir.display());
                damaged.push(dir);
                continue;
            }
        };
        match &state.inputs {
            Some(recorded) => recorded.check_same(inputs, &dir)?,
            None => eprintln!(
                "note: {} records no content digest of its shards (written by an older overfill): not checking that --data holds the same shards",
                dir.display()
            ),
        }
        if !damaged.is_empty() {
            eprintln!("--resume: continuing from {}, the newest intact checkpoint", dir.display());
        }
        return Ok(Some((step, dir)));
    }
    if !damaged.is_empty() {
        bail!(
            "--resume: every checkpoint in {} is damaged ({}); choose another --out to train again",
            out.display(),
            damaged.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(None)
}

/// `final/` is complete: every file its `file_digests.json` lists is present with its size
/// (written by this version: renamed into place complete), or, in a folder from before the lists,
/// `trainer_state.json` (then the last file written) is present. The error names what is missing.
pub fn check_final(out: &Path) -> Result<()> {
    let dir = out.join(FINAL_DIR);
    if !dir.is_dir() {
        bail!("{} is missing", dir.display());
    }
    overfill_model::file_digests::check_sizes(&dir)?;
    if !dir.join(STATE_FILE).is_file() {
        bail!("{} is incomplete: {STATE_FILE} is missing", dir.display());
    }
    Ok(())
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
/// `--resume` also picks the newest intact checkpoint trained on `run_inputs`.
pub fn inspect(settings: &Settings, total_steps: u64, run_inputs: &RunInputs) -> Result<Existing> {
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
        if let Err(incomplete) = check_final(out) {
            bail!(
                "--resume: {incomplete:#}, and the run left no checkpoint to write it again from (save_steps = 0); \
                 choose another --out to train again"
            );
        }
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
    Ok(Existing::SameRun { checkpoint: if settings.resume { resume_point(out, run_inputs)? } else { None } })
}

/// The `[train]` table of the run's resolved recipe (its other tables are the other stages').
fn read_train_section(recipe_path: &Path) -> Result<TrainSection> {
    #[derive(Deserialize)]
    struct RunRecipe {
        #[serde(default)]
        train: TrainSection,
    }
    let context = || format!("reading the run's recipe {}", recipe_path.display());
    let text = std::fs::read_to_string(recipe_path).with_context(context)?;
    let recipe: RunRecipe = toml::from_str(&text).with_context(context)?;
    Ok(recipe.train)
}

/// `final/` when it is missing or incomplete (a run killed while writing it, or one that stopped
/// at a checkpoint): written from the decoder restored from the newest checkpoint.
pub fn complete_final(out: &Path, decoder: &Transformer, decoder_source: &Path, state: &TrainerState) -> Result<()> {
    if let Err(incomplete) = check_final(out) {
        let dir = save_final_folder(out, decoder, decoder_source, state)?;
        eprintln!("{incomplete:#}: wrote {} from the checkpoint at step {}", dir.display(), state.step);
    }
    Ok(())
}
