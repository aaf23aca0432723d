//! `overfill train`: OverFill decoder training (and the Pruned / SFT baselines) — see issue 8.
use std::path::PathBuf;

use anyhow::Result;
use overfill_model::prune::Width;
use overfill_train::budget::PlannedWidths;
use overfill_train::settings::{self, Settings};
use overfill_train::TrainMode;

use crate::recipe::{PruneSection, Recipe};

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
    /// 0 = replicated optimizer, 1 = ZeRO-1 (sharded optimizer state), 2 = ZeRO-2 (also sharded
    /// gradient accumulators) [train.zero_stage].
    #[arg(long)]
    pub zero_stage: Option<u8>,
    /// Recompute each decoder layer's activations in the backward instead of keeping them
    /// [train.activation_checkpointing = true].
    #[arg(long)]
    pub activation_checkpointing: bool,
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

/// `overfill train`: the recipe and flags resolved, then the budget (--dry-run) or the run.
pub fn run(args: Args) -> Result<()> {
    let (settings, recipe) = resolve(&args)?;
    if args.dry_run {
        return overfill_train::budget::run(&settings, &planned_widths(&recipe.prune), args.gpus, args.gpu_memory);
    }
    overfill_train::run(settings)
}

/// Recipe (if any) + flags → settings; checks the numbers (no file is touched but the recipe).
/// Also returns the recipe (its `[prune]` widths size the decoder of a --dry-run).
fn resolve(args: &Args) -> Result<(Settings, Recipe)> {
    let mut recipe = args.recipe.load()?;
    apply_flags(args, &mut recipe);
    recipe.check()?;
    let mut t = recipe.train.clone();
    settings::default_paths(&mut t, &recipe.model.path, &recipe.prune.out, &recipe.data.shards);
    recipe.train = t.clone();
    let settings = settings::resolve(t, args.resume, recipe.to_toml()?)?;
    Ok((settings, recipe))
}

/// The decoder's widths from `[prune]` (for a --dry-run before calibrate-prune).
fn planned_widths(prune: &PruneSection) -> PlannedWidths {
    let width = |kept: Option<usize>, ratio: Option<f64>| match (kept, ratio) {
        (Some(n), _) => Width::Absolute(n),
        (None, Some(r)) => Width::Fraction(r),
        (None, None) => Width::Fraction(0.0),
    };
    PlannedWidths {
        hidden: width(prune.hidden_size, prune.width_hidden),
        intermediate: width(prune.intermediate_size, prune.width_intermediate),
        round_to: prune.round_to,
    }
}

/// `overfill train`'s flags into the recipe's `[train]` table, marked as set by a flag.
fn apply_flags(args: &Args, recipe: &mut Recipe) {
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    recipe.flag(&["train.mode"], args.mode, |r, v| r.train.mode = v);
    recipe.flag(&["train.full"], path(&args.full), |r, v| r.train.full = Some(v));
    recipe.flag(&["train.decoder"], path(&args.decoder), |r, v| r.train.decoder = Some(v));
    recipe.flag(&["train.data"], path(&args.data), |r, v| r.train.data = Some(v));
    recipe.flag(&["train.out"], path(&args.out), |r, v| r.train.out = Some(v));
    recipe.flag(&["train.max_steps"], args.max_steps, |r, v| r.train.max_steps = Some(v));
    recipe.flag(&["train.per_device_batch_size"], args.batch_size, |r, v| r.train.per_device_batch_size = v);
    recipe.flag(&["train.gradient_accumulation_steps"], args.grad_accum, |r, v| r.train.gradient_accumulation_steps = v);
    recipe.flag(&["train.learning_rate"], args.lr, |r, v| r.train.learning_rate = v);
    recipe.flag(&["train.seed"], args.seed, |r, v| r.train.seed = v);
    recipe.flag(&["train.save_steps"], args.save_steps, |r, v| r.train.save_steps = v);
    recipe.flag(&["train.eval_steps"], args.eval_steps, |r, v| r.train.eval_steps = v);
    recipe.flag(&["train.device"], args.device.clone(), |r, v| r.train.device = v);
    recipe.flag(&["train.dtype"], args.dtype.clone(), |r, v| r.train.dtype = v);
    recipe.flag(&["train.threads"], args.threads, |r, v| r.train.threads = v);
    recipe.flag(&["train.zero_stage"], args.zero_stage, |r, v| r.train.zero_stage = v);
    recipe.flag(&["train.activation_checkpointing"], args.activation_checkpointing.then_some(true), |r, v| {
        r.train.activation_checkpointing = v
    });
}
