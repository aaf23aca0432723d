//! `overfill eval-loss`: the mean cross-entropy over predicted target tokens (Σ CE / Σ tokens over
//! the whole split, the training loss's definition) of a decoder, in any training mode. The
//! trainer's validation loss is the same computation, split over ranks (`evaluate_across_ranks`).
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use overfill_data::order::{eval_batches, rank_eval_batches};
use overfill_data::reader::{ShardDataset, Split};
use overfill_model::checkpoint::{load_config, parse_device, parse_dtype};
use overfill_model::train::{check_compatible, loss_sum, TrainBatch};
use overfill_model::transformer::Transformer;
use serde_json::json;

use crate::train::loader::batch_rows;
use crate::train::settings::{check_paths_exist, check_shard_vocab};
use crate::train::trainer::GradientReducer;
use crate::train::TrainMode;

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

/// Σ CE and Σ predicted tokens over evaluation batches.
#[derive(Debug, Clone, Copy, Default)]
pub struct EvalTotals {
    pub loss_sum: f64,
    pub predicted_tokens: i64,
    pub rows: usize,
    pub skipped_rows: usize,
}

impl EvalTotals {
    /// Mean CE per predicted token (NaN when nothing was predicted).
    pub fn mean(&self) -> f64 {
        self.loss_sum / self.predicted_tokens as f64
    }
}

/// The token-mean loss of `decoder` over `eval_batches(ds, batch_rows, max_rows)`, without grad.
pub fn evaluate(
    decoder: &Transformer,
    full: Option<&Transformer>,
    ds: &ShardDataset,
    batch_rows_per_pass: usize,
    max_rows: usize,
    max_seq_length: Option<usize>,
    progress: &ProgressBar,
) -> Result<EvalTotals> {
    let batches = eval_batches(ds, batch_rows_per_pass, max_rows);
    evaluate_batches(decoder, full, ds, &batches, max_seq_length, progress)
}

/// [`evaluate`] under data parallelism: each rank scores only its share of the same evaluation
/// batches (`rank_eval_batches`: batch i on rank i % world size) and the totals are summed over
/// ranks, so every rank returns the numbers one process would (up to the order of the f64 sums).
/// Also returns the rows each rank scored, in rank order.
pub fn evaluate_across_ranks(
    decoder: &Transformer,
    full: Option<&Transformer>,
    ds: &ShardDataset,
    batch_rows_per_pass: usize,
    max_rows: usize,
    max_seq_length: Option<usize>,
    reducer: &dyn GradientReducer,
) -> Result<(EvalTotals, Vec<usize>)> {
    let (rank, world_size) = (reducer.rank(), reducer.world_size());
    let batches = rank_eval_batches(ds, batch_rows_per_pass, max_rows, rank, world_size);
    let local = evaluate_batches(decoder, full, ds, &batches, max_seq_length, &ProgressBar::hidden())?;
    // One reduction for everything, whatever this rank's share (possibly none: every rank must
    // take part). Counts stay exact in f64 far beyond any split's size.
    let mut sums = vec![local.loss_sum, local.predicted_tokens as f64, local.rows as f64, local.skipped_rows as f64];
    sums.extend((0..world_size).map(|r| if r == rank { local.rows as f64 } else { 0.0 }));
    reducer.all_reduce_sum(&mut sums).context("summing the validation loss over ranks")?;
    let totals = EvalTotals {
        loss_sum: sums[0],
        predicted_tokens: sums[1] as i64,
        rows: sums[2] as usize,
        skipped_rows: sums[3] as usize,
    };
    let rows_per_rank = sums[4..].iter().map(|&r| r as usize).collect();
    Ok((totals, rows_per_rank))
}

/// Σ CE and Σ predicted tokens of `decoder` over `batches` (row indices of `ds`), without grad.
fn evaluate_batches(
    decoder: &Transformer,
    full: Option<&Transformer>,
    ds: &ShardDataset,
    batches: &[Vec<usize>],
    max_seq_length: Option<usize>,
    progress: &ProgressBar,
) -> Result<EvalTotals> {
    let _guard = tch::no_grad_guard();
    progress.set_length(batches.iter().map(|b| b.len() as u64).sum());
    let mut totals = EvalTotals::default();
    for indices in batches {
        let (rows, skipped) = batch_rows(ds, indices, max_seq_length);
        totals.skipped_rows += skipped;
        if !rows.is_empty() {
            let batch = TrainBatch::from_rows(&rows, decoder.device())?;
            totals.loss_sum += loss_sum(decoder, full, &batch)?.double_value(&[]);
            totals.predicted_tokens += batch.predicted_tokens;
            totals.rows += rows.len();
        }
        progress.inc(indices.len() as u64);
    }
    Ok(totals)
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
    let device = match &args.device {
        Some(d) => parse_device(d)?,
        None => tch::Device::cuda_if_available(),
    };
    let kind = match &args.dtype {
        Some(d) => parse_dtype(d)?,
        None if device.is_cuda() => tch::Kind::BFloat16,
        None => tch::Kind::Float,
    };
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
