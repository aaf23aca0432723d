//! The run folder: `checkpoint-STEP/` (decoder in HF layout + `optimizer.safetensors` +
//! `trainer_state.json`), `final/`, the resolved recipe, the step log. A checkpoint (and `final/`)
//! is written to `.NAME.tmp/`, ends with its `file_digests.json` and is then renamed, so a folder
//! named `checkpoint-STEP` or `final` is always complete.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use overfill_data::recipe::{write_resolved_text, RESOLVED_FILE};
use overfill_model::checkpoint::save_checkpoint;
use overfill_model::file_digests::write_file_digests;
use overfill_model::transformer::Transformer;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::config::TrainSection;
use crate::inputs::RunInputs;
use crate::settings::Settings;

/// The resolved recipe; its `[train]` table identifies the run.
pub const RECIPE_FILE: &str = RESOLVED_FILE;
pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const FINAL_DIR: &str = "final";
/// One JSON object per logged step (rank 0): what the progress bar and TensorBoard show.
pub const LOG_FILE: &str = "log.jsonl";
/// Weight files above this are split into shards (as transformers' default 5 GB).
const MAX_SHARD_BYTES: u64 = 5_000_000_000;


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
    /// What the run trains on (absent in checkpoints of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<RunInputs>,
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
    write_resolved_text(&settings.out, &settings.recipe_toml)
}

/// The decoder in HF layout (config.json, safetensors, the source's tokenizer files) into `dir`.
pub fn save_decoder(decoder: &Transformer, source_dir: &Path, dir: &Path) -> Result<()> {
    save_checkpoint(dir, &decoder.config, &decoder.tensors(), MAX_SHARD_BYTES)
        .with_context(|| format!("saving the decoder to {}", dir.display()))?;
    overfill_model::checkpoint::copy_tokenizer_files(source_dir, dir)
}

/// Writes `out/name` into `out/.name.tmp/` (`fill`, then the `file_digests.json` of what it
/// wrote) and renames it into place, replacing an older folder of that name.
fn write_folder_atomically(out: &Path, name: &str, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let tmp = out.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("clearing {}", tmp.display()))?;
    }
    fill(&tmp)?;
    write_file_digests(&tmp)?;
    test_kill_point(name, "digests");
    let dir = out.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    Ok(dir)
}

/// Tests only: `OVERFILL_TEST_KILL_AT=FOLDER:POINT` (e.g. `final:decoder`, `final:state`,
/// `final:digests`) kills this process with SIGKILL at that point of writing the run folder's
/// `FOLDER`, as a kill from outside would, so tests can show that `--resume` completes it.
fn test_kill_point(folder: &str, point: &str) {
    if std::env::var("OVERFILL_TEST_KILL_AT").is_ok_and(|at| at == format!("{folder}:{point}")) {
        eprintln!("OVERFILL_TEST_KILL_AT={folder}:{point}: killing this process");
        // SAFETY: sends a signal to this process; nothing in memory is touched.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
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
    let dir = write_folder_atomically(out, &format!("checkpoint-{}", state.step), |tmp| {
        save_decoder(decoder, decoder_source, tmp)?;
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
        write_state(tmp, state)
    })?;
    if keep > 0 {
        let all = checkpoints(out)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
            std::fs::remove_dir_all(old).with_context(|| format!("removing old checkpoint {}", old.display()))?;
        }
    }
    Ok(dir)
}

/// Writes `final/` atomically: the decoder and, for a later `--resume`, where the run ended (no
/// optimizer tensors: that is a checkpoint).
pub fn save_final_folder(out: &Path, decoder: &Transformer, decoder_source: &Path, state: &TrainerState) -> Result<PathBuf> {
    write_folder_atomically(out, FINAL_DIR, |tmp| {
        save_decoder(decoder, decoder_source, tmp)?;
        test_kill_point(FINAL_DIR, "decoder");
        write_state(tmp, state)?;
        test_kill_point(FINAL_DIR, "state");
        Ok(())
    })
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
