//! The loader thread: turns the data order of (seed, epoch) into CPU `TrainBatch`es ahead of the
//! compute, over a bounded channel, so the device never waits on batch building.
//!
//! Rows longer than `max_seq_length` lose the end of their target; a row whose context alone
//! leaves no room for 2 target tokens (one input, one label) is skipped and counted. The predicted
//! tokens of a whole optimizer step are counted here, on the host, from the global batch (every
//! rank computes the same number without communication), so each micro-batch's backward can
//! divide by the step's total before the step's first backward.
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};
use crossbeam_channel::{bounded, Receiver};
use overfill_data::order::{epoch_batches, micro_batches};
use overfill_data::reader::ShardDataset;
use overfill_model::train::TrainBatch;
use tch::Device;

/// `(context, target)` of row `i` cut to `max_seq_length` tokens, or `None` when the context leaves
/// no room for 2 target tokens (or the target has fewer than 2 tokens: nothing to predict).
pub fn truncated_row(ds: &ShardDataset, i: usize, max_seq_length: Option<usize>) -> Option<(&[u32], &[u32])> {
    let (context, target) = (ds.context_ids(i), ds.target_ids(i));
    let target_room = match max_seq_length {
        Some(max) => max.checked_sub(context.len())?,
        None => target.len(),
    };
    let target = &target[..target.len().min(target_room)];
    (!context.is_empty() && target.len() >= 2).then_some((context, target))
}

/// Rows of `indices` after truncation, and how many were skipped.
pub fn batch_rows<'a>(ds: &'a ShardDataset, indices: &[usize], max_seq_length: Option<usize>) -> (Vec<(&'a [u32], &'a [u32])>, usize) {
    let rows: Vec<_> = indices.iter().filter_map(|&i| truncated_row(ds, i, max_seq_length)).collect();
    let skipped = indices.len() - rows.len();
    (rows, skipped)
}

/// Where in the data order an optimizer step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPosition {
    /// 1-based optimizer step over the whole run.
    pub step: u64,
    pub epoch: u64,
    /// 0-based index of this step's global batch in its epoch.
    pub step_in_epoch: usize,
}

impl StepPosition {
    pub fn of(step: u64, steps_per_epoch: usize) -> StepPosition {
        let per = steps_per_epoch.max(1) as u64;
        StepPosition { step, epoch: (step - 1) / per, step_in_epoch: ((step - 1) % per) as usize }
    }
}

/// This rank's share of one optimizer step, built on the CPU.
pub struct StepBatches {
    pub position: StepPosition,
    /// This rank's micro-batches (`None` where a micro-batch of the small last global batch, or
    /// one whose rows were all skipped, is empty).
    pub micro: Vec<Option<TrainBatch>>,
    /// Predicted tokens (labels) of the whole global batch, all ranks: the loss divisor.
    pub global_predicted_tokens: i64,
    /// Target tokens (y0..yN, after truncation) of the whole global batch: tokens/s.
    pub global_target_tokens: i64,
    /// Rows of the global batch skipped for lack of room.
    pub global_skipped_rows: usize,
}

pub struct LoaderConfig {
    pub seed: u64,
    pub global_batch_rows: usize,
    pub group_batches: usize,
    pub accumulation_steps: usize,
    pub rank: usize,
    pub world_size: usize,
    pub max_seq_length: usize,
    pub steps_per_epoch: usize,
    /// Channel capacity in micro-batches (rounded up to whole steps).
    pub prefetch_batches: usize,
}

/// Builds one step's batches (also used without the thread, e.g. by tests).
pub fn build_step(ds: &ShardDataset, cfg: &LoaderConfig, global: &[usize], position: StepPosition) -> Result<StepBatches> {
    let max = Some(cfg.max_seq_length);
    let (all_rows, global_skipped_rows) = batch_rows(ds, global, max);
    let global_predicted_tokens = all_rows.iter().map(|(_, t)| t.len() as i64 - 1).sum();
    let global_target_tokens = all_rows.iter().map(|(_, t)| t.len() as i64).sum();
    let micro = micro_batches(ds, global, cfg.rank, cfg.world_size, cfg.accumulation_steps)
        .iter()
        .map(|indices| {
            let (rows, _) = batch_rows(ds, indices, max);
            if rows.is_empty() {
                return Ok(None);
            }
            TrainBatch::from_rows(&rows, Device::Cpu).map(Some)
        })
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("building the batches of step {}", position.step))?;
    Ok(StepBatches { position, micro, global_predicted_tokens, global_target_tokens, global_skipped_rows })
}

/// The running loader thread; dropping it stops the thread (its next send fails).
pub struct Loader {
    receiver: Option<Receiver<Result<StepBatches>>>,
    handle: Option<JoinHandle<()>>,
}

impl Loader {
    /// Starts producing steps `first_step..=last_step` (1-based).
    pub fn spawn(ds: Arc<ShardDataset>, cfg: LoaderConfig, first_step: u64, last_step: u64) -> Result<Loader> {
        let capacity = cfg.prefetch_batches.div_ceil(cfg.accumulation_steps.max(1)).max(1);
        let (sender, receiver) = bounded(capacity);
        let handle = std::thread::Builder::new()
            .name("overfill-loader".into())
            .spawn(move || {
                let mut epoch_plan: Option<(u64, Vec<Vec<usize>>)> = None;
                for step in first_step..=last_step {
                    let position = StepPosition::of(step, cfg.steps_per_epoch);
                    if epoch_plan.as_ref().map(|(e, _)| *e) != Some(position.epoch) {
                        let plan = epoch_batches(&ds, cfg.seed, position.epoch, cfg.global_batch_rows, cfg.group_batches);
                        epoch_plan = Some((position.epoch, plan));
                    }
                    let plan = &epoch_plan.as_ref().expect("planned above").1;
                    let item = match plan.get(position.step_in_epoch) {
                        Some(global) => build_step(&ds, &cfg, global, position),
                        None => Err(anyhow!(
                            "the data order of epoch {} has {} steps, step {} needs index {}",
                            position.epoch,
                            plan.len(),
                            step,
                            position.step_in_epoch
                        )),
                    };
                    let failed = item.is_err();
                    if sender.send(item).is_err() || failed {
                        return; // The trainer stopped listening, or this error was its last item.
                    }
                }
            })
            .context("starting the loader thread")?;
        Ok(Loader { receiver: Some(receiver), handle: Some(handle) })
    }

    /// The next step's batches (blocks until the thread has built them).
    pub fn next(&self) -> Result<StepBatches> {
        let receiver = self.receiver.as_ref().ok_or_else(|| anyhow!("the loader is closed"))?;
        receiver.recv().map_err(|_| anyhow!("the loader thread stopped early"))?
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channel first makes a thread blocked in `send` return.
        self.receiver.take();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}
