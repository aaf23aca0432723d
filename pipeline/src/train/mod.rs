//! `overfill train`: OverFill decoder training (and the Pruned / SFT baselines) — see issue 8.
pub mod config;
pub mod events;
pub mod loader;
pub mod memory;
pub mod optimizer;
pub mod run_folder;
pub mod settings;
pub mod trainer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use overfill_data::order::steps_per_epoch;
use overfill_data::reader::{ShardDataset, Split};
use overfill_model::checkpoint::{load_config, parse_device, parse_dtype};
use overfill_model::train::check_compatible;

#[allow(unused_imports)]
pub use config::{LrSchedule, TrainMode, TrainSection};

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// The recipe (`--config`, `--set`): its [train] table (and [model] path, [data] shards,
    /// [prune] out) give the defaults that flags override.
    #[command(flatten)]
    pub recipe: crate::recipe::RecipeArgs,
    /// The frozen full model (overfill mode) [train.full; default: the recipe's [model] path].
    #[arg(long)]
    pub full: Option<PathBuf>,
    /// The trainable model: the pruned decoder, or the single model in pruned/sft modes
    /// [train.decoder; default: the recipe's [prune] out].
    #[arg(long)]
    pub decoder: Option<PathBuf>,
    /// Token shards from `overfill preprocess` [train.data; default: the recipe's [data] shards].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The run folder: checkpoints, final decoder, TensorBoard events, resolved recipe [train.out].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// overfill (frozen full-model prefill + decoder), pruned or sft (one model over context ‖
    /// target) [train.mode].
    #[arg(long, value_enum)]
    pub mode: Option<TrainMode>,
    /// Stop after this optimizer step (the schedule still spans num_epochs, so a later --resume
    /// with a larger value continues the same run) [train.max_steps].
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Continue from the newest complete checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Rows per micro-batch on each device [train.per_device_batch_size].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [train.gradient_accumulation_steps].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate [train.learning_rate].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of the data order and of libtorch [train.seed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Optimizer steps between checkpoints (0 = only at the end) [train.save_steps].
    #[arg(long)]
    pub save_steps: Option<u64>,
    /// Optimizer steps between validation losses (0 = only at the end) [train.eval_steps].
    #[arg(long)]
    pub eval_steps: Option<u64>,
    /// cpu, cuda or cuda:N [train.device].
    #[arg(long)]
    pub device: Option<String>,
    /// Compute dtype: f32, or bf16 (fp32 master weights and optimizer state) [train.dtype].
    #[arg(long)]
    pub dtype: Option<String>,
    /// Intra-op threads for libtorch (0 = libtorch's default) [train.threads].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the per-GPU memory budget of the recipe's shapes (replicated and ZeRO-1 optimizer
    /// state) for --gpus × --gpu-memory and whether it fits; nothing is loaded or trained.
    #[arg(long)]
    pub dry_run: bool,
    /// GPUs (data-parallel ranks) for --dry-run.
    #[arg(long, default_value_t = 1, requires = "dry_run")]
    pub gpus: usize,
    /// Memory of one GPU in GiB for --dry-run.
    #[arg(long, default_value_t = 80.0, requires = "dry_run")]
    pub gpu_memory: f64,
}

/// `overfill train`: every check first (nothing written, no weight loaded until they pass), then
/// the run folder, then the loop.
pub fn run(args: Args) -> Result<()> {
    let settings = settings::resolve(&args)?;
    if args.dry_run {
        return crate::dist::budget::run(&settings, args.gpus, args.gpu_memory);
    }
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
    let resume_from = match run_folder::inspect(&settings, total_steps)? {
        run_folder::Existing::Fresh => None,
        run_folder::Existing::SameRun { checkpoint } => checkpoint,
        run_folder::Existing::Finished { step } => {
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
        },
        &dist,
    )
}
