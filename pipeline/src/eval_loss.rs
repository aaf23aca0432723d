//! `overfill eval-loss`: the mean cross-entropy over predicted target tokens (Σ CE / Σ tokens over
//! the whole split, the training loss's definition) of a decoder, in any training mode. The
//! trainer's validation loss is the same computation, split over ranks
//! (`overfill_train::eval::evaluate_across_ranks`).
use std::path::PathBuf;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use overfill_data::reader::{ShardDataset, Split};
use overfill_model::checkpoint::{device_and_dtype, load_config};
use overfill_model::train::check_compatible;
use overfill_model::transformer::Transformer;
use overfill_train::eval::evaluate;
use overfill_train::settings::{check_paths_exist, check_shard_vocab};
use overfill_train::TrainMode;
use serde_json::json;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitArg {
    Train,
    Val,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The frozen full model (overfill mode).
    #[arg(long)]
    pub full: Option<PathBuf>,
    /// The decoder (overfill) or the single model (pruned, sft).
    #[arg(long)]
    pub decoder: PathBuf,
    /// Token shards written by `overfill preprocess`.
    #[arg(long)]
    pub data: PathBuf,
    /// The split to score.
    #[arg(long, value_enum, default_value = "val")]
    pub split: SplitArg,
    /// How the decoder is run: overfill (reading the full model's cache of the context), or
    /// pruned/sft (one model over context ‖ target). The scored tokens are the same.
    #[arg(long, value_enum, default_value = "overfill", hide_possible_values = true)]
    pub mode: TrainMode,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Evaluate the first N rows of the split only (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_rows: usize,
    /// Cut rows to this many context + target tokens as training does (default: no cut).
    #[arg(long)]
    pub max_seq_length: Option<usize>,
    /// cpu, cuda or cuda:N [default: cuda when available].
    #[arg(long)]
    pub device: Option<String>,
    /// f32, bf16 or f16 [default: bf16 on CUDA, f32 on CPU].
    #[arg(long)]
    pub dtype: Option<String>,
    /// Intra-op threads for libtorch (default: libtorch's own choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Print `{"loss": …, "tokens": …}` as the last line on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let full_dir = match args.mode {
        TrainMode::Overfill => match &args.full {
            Some(dir) => Some(dir.clone()),
            None => bail!("--full is required in overfill mode (the frozen model that prefills the context)"),
        },
        TrainMode::Pruned | TrainMode::Sft => None,
    };
    check_paths_exist(full_dir.as_deref(), &args.decoder, &args.data)?;
    let decoder_config = load_config(&args.decoder)?;
    if let Some(dir) = &full_dir {
        check_compatible(&load_config(dir)?, &decoder_config)?;
    }
    let (split, split_name) = match args.split {
        SplitArg::Train => (Split::Train, "train"),
        SplitArg::Val => (Split::Val, "val"),
    };
    let ds = ShardDataset::open_split(&args.data, split)?;
    if ds.is_empty() {
        bail!("the {split_name} split of {} has no rows", args.data.display());
    }
    check_shard_vocab(&ds, split_name, &decoder_config, &args.decoder)?;
    let (device, kind) = device_and_dtype(args.device.as_deref(), args.dtype.as_deref())?;
    let decoder = Transformer::load(&args.decoder, device, kind)?;
    let full = full_dir.as_deref().map(|dir| Transformer::load(dir, device, kind)).transpose()?;

    let progress = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("eval-loss {bar:30} {pos}/{len} rows [{elapsed_precise} < {eta_precise}]")
            .expect("valid progress template"),
    );
    let totals = evaluate(&decoder, full.as_ref(), &ds, args.batch_size, args.max_rows, args.max_seq_length, &progress)?;
    progress.finish_and_clear();
    if totals.predicted_tokens == 0 {
        bail!("no row of the split has a target of 2 or more tokens within the length limit: nothing to score");
    }
    let loss = totals.mean();
    eprintln!(
        "loss {loss:.6} (perplexity {:.3}) over {} predicted tokens in {} rows ({} skipped)",
        loss.exp(),
        totals.predicted_tokens,
        totals.rows,
        totals.skipped_rows
    );
    if args.json {
        println!("{}", json!({ "loss": loss, "tokens": totals.predicted_tokens, "rows": totals.rows, "skipped_rows": totals.skipped_rows }));
    }
    Ok(())
}
