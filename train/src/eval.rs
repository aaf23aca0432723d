//! The validation loss: the mean cross-entropy over predicted target tokens (Σ CE / Σ tokens over
//! the whole split, the training loss's definition) of a decoder, in any training mode, on one
//! process (`overfill eval-loss`) or split over the ranks of a data-parallel run (the trainer's
//! `evaluate_across_ranks`).
use anyhow::{Context, Result};
use indicatif::ProgressBar;
use overfill_data::order::{eval_batches, rank_eval_batches};
use overfill_data::reader::ShardDataset;
use overfill_model::train::{loss_sum, TrainBatch};
use overfill_model::transformer::Transformer;

use crate::loader::batch_rows;
use crate::reducer::GradientReducer;

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
