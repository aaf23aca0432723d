//! OverFill decoder training (issue 8): the step loop (`trainer`), AdamW with fp32 master weights
//! (`optimizer`), the background data loader (`loader`), the run folder with its checkpoints
//! (`run_folder`), TensorBoard events (`events`), the per-GPU memory budget (`budget`), the
//! validation loss (`eval`) and data parallelism over libtorch's own c10d (`dist`, with the C++
//! shim `dist/shim.cpp` built by `build.rs`).
//!
//! The `[train]` table of a recipe is [`TrainSection`]; the `overfill` binary reads the recipe,
//! resolves it with its flags into [`settings::Settings`] and calls this crate.
pub mod budget;
pub mod config;
pub mod dist;
pub mod eval;
pub mod events;
mod inputs;
mod loader;
pub mod memory;
pub mod memory_plan;
pub mod optimizer;
pub mod reducer;
mod resume;
mod run_folder;
pub mod settings;
pub mod trainer;

pub use config::{LrSchedule, TrainMode, TrainSection};

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use overfill_data::order::steps_per_epoch;
use overfill_data::reader::{ShardDataset, Split};
use overfill_model::checkpoint::{load_config, parse_device, parse_dtype};
use overfill_model::train::check_compatible;

use settings::Settings;

/// `overfill train` on resolved settings: every check first (nothing written, no weight loaded
/// until they pass), then the run folder, then the loop.
pub fn run(settings: Settings) -> Result<()> {
    let t = settings.train.clone();
    if t.threads > 0 {
        tch::set_num_threads(t.threads as i32);
    }
    settings::check_paths_exist(settings.full.as_deref(), &settings.decoder, &settings.data)?;
    let device = parse_device(&t.device)?;
    let kind = parse_dtype(&t.dtype)?;
    let decoder_config = load_config(&settings.decoder)?;
    if let Some(full) = &settings.full {
        check_compatible(&load_config(full)?, &decoder_config)?;
    }
    let train = ShardDataset::open_split(&settings.data, Split::Train)?;
    if train.is_empty() {
        bail!("the train split of {} has no rows", settings.data.display());
    }
    settings::check_shard_vocab(&train, "train", &decoder_config, &settings.decoder)?;
    let val = ShardDataset::open_split(&settings.data, Split::Val)?;
    let val = if val.is_empty() {
        eprintln!("note: {} has no val rows: no validation loss", settings.data.display());
        None
    } else {
        settings::check_shard_vocab(&val, "val", &decoder_config, &settings.decoder)?;
        Some(val)
    };
    // Under torchrun/SLURM/`overfill launch` the global batch spans every rank.
    let dist_env = crate::dist::DistEnv::from_env()?;
    let world_size = dist_env.as_ref().map_or(1, |env| env.world_size);
    let per_epoch = steps_per_epoch(train.len(), settings.global_batch_rows(world_size));
    let total_steps = (per_epoch * t.num_epochs) as u64;
    // One run per folder at a time (released when this process ends, however it ends).
    // (Rank 0 holds it for all ranks of a data-parallel run.)
    let _lock = match dist_env.as_ref().map_or(0, |env| env.rank) {
        0 => Some(overfill_data::out_lock::OutputLock::acquire(&settings.out, "train")?),
        _ => None,
    };
    let run_inputs = inputs::RunInputs::of(&settings, &train)?;
    let resume_from = match resume::inspect(&settings, total_steps, &run_inputs)? {
        resume::Existing::Fresh => None,
        resume::Existing::SameRun { checkpoint } => checkpoint,
        resume::Existing::Finished { step } => {
            eprintln!("{} already finished at step {step}: nothing to train", settings.out.display());
            return Ok(());
        }
    };
    if settings.resume && resume_from.is_none() {
        eprintln!("--resume: no checkpoint in {} yet; starting from step 0", settings.out.display());
    }

    // Checks passed on this rank: join the others (world size 1 without a launcher). SIGINT and
    // SIGTERM from here on stop after the current step with a checkpoint.
    crate::dist::stop::install();
    let (dist, device) = crate::dist::train::join_for_training(&t.device, device, Duration::from_secs(t.collective_timeout_secs))?;

    // The run folder may be written from here on, by rank 0 only.
    if dist.is_main() {
        std::fs::create_dir_all(&settings.out).with_context(|| format!("creating {}", settings.out.display()))?;
        run_folder::remove_stale_temporaries(&settings.out)?;
        run_folder::write_recipe(&settings)?;
    }
    trainer::train(
        trainer::TrainInputs {
            settings,
            device,
            kind,
            train: Arc::new(train),
            val,
            steps_per_epoch: per_epoch,
            total_steps,
            resume_from,
            run_inputs,
        },
        &dist,
    )
}
