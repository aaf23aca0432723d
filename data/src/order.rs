//! The order in which training and evaluation visit rows.
//!
//! Training: [`epoch_batches`] is a pure function of (seed, epoch, global batch rows, group size),
//! so the set of rows in global batch k does not depend on how the batch is later split into
//! micro-batches, accumulation steps and ranks ([`micro_batches`]); runs with accumulation 2 ×
//! batch 2 and batch 4 × accumulation 1 see the same rows per optimizer step, and a resumed run
//! recomputes the same plan and continues at (epoch, step). Only ChaCha8 streams and sorts with
//! index tie-breaks are used, so every process computes identical lists.
//!
//! ```no_run
//! use overfill_data::order::{epoch_batches, micro_batches};
//! use overfill_data::reader::ShardDataset;
//! # fn main() -> anyhow::Result<()> {
//! let train = ShardDataset::open("work/tiny/shards")?;
//! let (rank, world_size, accumulation_steps, per_device_rows) = (0, 2, 2, 4);
//! let global_rows = per_device_rows * world_size * accumulation_steps;
//! for global in epoch_batches(&train, 42, /*epoch*/ 0, global_rows, 64) {
//!     for micro in micro_batches(&train, &global, rank, world_size, accumulation_steps) {
//!         let _rows: Vec<&[u32]> = micro.iter().map(|&i| train.ids(i)).collect();
//!     }
//! }
//! # Ok(()) }
//! ```
use std::cmp::Reverse;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::reader::ShardDataset;

/// Global batches of one epoch: rows shuffled by (seed, epoch), cut into windows of
/// `group_batches` global batches, each window sorted by total length (longest first, ties by
/// index) and cut into global batches of `global_batch_rows` rows, then the global batches
/// shuffled (seeded). The last, smaller global batch (when the rows do not divide evenly) is kept
/// and stays last, so every other optimizer step sees a full batch.
///
/// `global_batch_rows` and `group_batches` of 0 count as 1.
pub fn epoch_batches(ds: &ShardDataset, seed: u64, epoch: u64, global_batch_rows: usize, group_batches: usize) -> Vec<Vec<usize>> {
    epoch_batches_by_len(ds.len(), |i| ds.total_len(i), seed, epoch, global_batch_rows, group_batches)
}

/// [`epoch_batches`] over rows `0..rows` with lengths from `total_len`.
fn epoch_batches_by_len(
    rows: usize,
    total_len: impl Fn(usize) -> usize,
    seed: u64,
    epoch: u64,
    global_batch_rows: usize,
    group_batches: usize,
) -> Vec<Vec<usize>> {
    let batch_rows = global_batch_rows.max(1);
    let window_rows = batch_rows.saturating_mul(group_batches.max(1));
    // One ChaCha8 stream per epoch of the same seed: epochs are independent and reproducible.
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut order: Vec<usize> = (0..rows).collect();
    order.shuffle(&mut rng);
    let mut batches: Vec<Vec<usize>> = Vec::with_capacity(steps_per_epoch(rows, batch_rows));
    for window in order.chunks_mut(window_rows) {
        window.sort_by_key(|&i| (Reverse(total_len(i)), i));
        batches.extend(window.chunks(batch_rows).map(<[usize]>::to_vec));
    }
    // Only the very last window can end in a smaller batch (every other window is a whole number
    // of batches); keep it out of the shuffle so it stays last.
    let smaller = batches.last().filter(|b| b.len() < batch_rows).is_some().then(|| batches.pop()).flatten();
    batches.shuffle(&mut rng);
    batches.extend(smaller);
    batches
}

/// One rank's micro-batches of a global batch: `accumulation_steps` lists of row indices (some may
/// be empty when the global batch is the small last one). The global batch is sorted by length
/// (longest first, ties by index) and cut into `world_size × accumulation_steps` contiguous runs
/// of near-equal size (the first ones one row longer); run `step × world_size + rank` is this
/// rank's micro-batch `step`. Micro-batches hold rows of similar length, ranks at the same step
/// get similar lengths, and the union over all ranks and steps is exactly the global batch, each
/// row once.
///
/// `world_size` and `accumulation_steps` of 0 count as 1. Panics if `rank >= world_size`.
pub fn micro_batches(ds: &ShardDataset, global: &[usize], rank: usize, world_size: usize, accumulation_steps: usize) -> Vec<Vec<usize>> {
    micro_batches_by_len(|i| ds.total_len(i), global, rank, world_size, accumulation_steps)
}

fn micro_batches_by_len(
    total_len: impl Fn(usize) -> usize,
    global: &[usize],
    rank: usize,
    world_size: usize,
    accumulation_steps: usize,
) -> Vec<Vec<usize>> {
    let world_size = world_size.max(1);
    let steps = accumulation_steps.max(1);
    assert!(rank < world_size, "rank {rank} is not below the world size {world_size}");
    let mut sorted = global.to_vec();
    sorted.sort_by_key(|&i| (Reverse(total_len(i)), i));
    let runs = world_size * steps;
    let (base, extra) = (sorted.len() / runs, sorted.len() % runs);
    // Run r starts after r runs of `base` rows and min(r, extra) extra rows.
    let run = |r: usize| {
        let start = r * base + r.min(extra);
        let len = base + usize::from(r < extra);
        sorted[start..start + len].to_vec()
    };
    (0..steps).map(|step| run(step * world_size + rank)).collect()
}

/// Number of optimizer steps in one epoch (= `epoch_batches(..).len()`, computed without building
/// them). `global_batch_rows` of 0 counts as 1.
pub fn steps_per_epoch(rows: usize, global_batch_rows: usize) -> usize {
    rows.div_ceil(global_batch_rows.max(1))
}

/// Evaluation batches: the first `max_rows` rows in shard order (0 = all), longest first (ties by
/// index), cut into batches of `batch_rows` rows (0 counts as 1). Independent of any seed, so
/// every evaluation of a run, and every run, sees the same batches.
pub fn eval_batches(ds: &ShardDataset, batch_rows: usize, max_rows: usize) -> Vec<Vec<usize>> {
    eval_batches_by_len(ds.len(), |i| ds.total_len(i), batch_rows, max_rows)
}

/// One rank's share of [`eval_batches`] under data parallelism: batch `i` goes to rank
/// `i % world_size`. The batches are in length order, so round-robin gives every rank batches of
/// similar lengths; the union over ranks is exactly `eval_batches`, each batch once. A pure
/// function of (rank, world size), like the training order: every rank computes the same split.
///
/// `world_size` of 0 counts as 1. Panics if `rank >= world_size`.
pub fn rank_eval_batches(ds: &ShardDataset, batch_rows: usize, max_rows: usize, rank: usize, world_size: usize) -> Vec<Vec<usize>> {
    share_of_rank(eval_batches(ds, batch_rows, max_rows), rank, world_size)
}

/// Items `rank`, `rank + world_size`, `rank + 2·world_size`, … of `items`.
fn share_of_rank<T>(items: Vec<T>, rank: usize, world_size: usize) -> Vec<T> {
    let world_size = world_size.max(1);
    assert!(rank < world_size, "rank {rank} is not below the world size {world_size}");
    items.into_iter().skip(rank).step_by(world_size).collect()
}

fn eval_batches_by_len(rows: usize, total_len: impl Fn(usize) -> usize, batch_rows: usize, max_rows: usize) -> Vec<Vec<usize>> {
    let rows = if max_rows == 0 { rows } else { rows.min(max_rows) };
    let mut order: Vec<usize> = (0..rows).collect();
    order.sort_by_key(|&i| (Reverse(total_len(i)), i));
    order.chunks(batch_rows.max(1)).map(<[usize]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lengths 1..=n in a scrambled but fixed order, with ties.
    fn lengths(n: usize) -> Vec<usize> {
        (0..n).map(|i| 1 + (i * 37) % 23).collect()
    }

    fn sorted(mut v: Vec<usize>) -> Vec<usize> {
        v.sort_unstable();
        v
    }

    #[test]
    fn an_epoch_covers_every_row_once_and_is_reproducible() {
        let lens = lengths(103);
        let plan = |seed, epoch| epoch_batches_by_len(lens.len(), |i| lens[i], seed, epoch, 8, 3);
        let batches = plan(1, 0);
        assert_eq!(batches.len(), steps_per_epoch(103, 8));
        assert_eq!(batches.len(), 13);
        assert_eq!(sorted(batches.concat()), (0..103).collect::<Vec<_>>());
        // Full batches, then the smaller one last.
        assert!(batches[..12].iter().all(|b| b.len() == 8));
        assert_eq!(batches[12].len(), 103 - 96);
        assert_eq!(batches, plan(1, 0));
        assert_ne!(batches, plan(1, 1));
        assert_ne!(batches, plan(2, 0));
    }

    #[test]
    fn batches_hold_rows_of_one_sorted_window() {
        // With one window per batch, each batch is exactly a run of the shuffled order, sorted.
        let lens = lengths(64);
        let batches = epoch_batches_by_len(64, |i| lens[i], 5, 0, 16, 4);
        for b in &batches {
            assert!(b.windows(2).all(|w| (Reverse(lens[w[0]]), w[0]) < (Reverse(lens[w[1]]), w[1])), "{b:?}");
        }
        // Length grouping: the spread of lengths inside a batch is far below the data's spread.
        let spread: usize = batches.iter().map(|b| lens[b[0]] - lens[*b.last().unwrap()]).sum();
        assert!(spread < 4 * 22, "total spread {spread}");
    }

    #[test]
    fn micro_batches_partition_the_global_batch_for_every_layout() {
        let lens = lengths(50);
        for n in [0, 1, 3, 7, 8, 13] {
            let global: Vec<usize> = (0..n).map(|i| (i * 7) % 50).collect();
            for (world, steps) in [(1, 1), (1, 2), (2, 1), (2, 2), (3, 2), (4, 4)] {
                let per_rank: Vec<Vec<Vec<usize>>> =
                    (0..world).map(|r| micro_batches_by_len(|i| lens[i], &global, r, world, steps)).collect();
                assert!(per_rank.iter().all(|m| m.len() == steps));
                let all: Vec<usize> = per_rank.iter().flatten().flatten().copied().collect();
                assert_eq!(sorted(all), sorted(global.clone()), "n {n}, world {world}, steps {steps}");
                // Sizes differ by at most one row across all micro-batches.
                let sizes: Vec<usize> = per_rank.iter().flatten().map(Vec::len).collect();
                assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
            }
        }
    }

    #[test]
    fn micro_batches_are_contiguous_runs_of_the_length_order() {
        let lens = [5, 9, 1, 7, 3, 8, 2, 6];
        let global: Vec<usize> = (0..8).collect();
        // Longest first: rows 1 (9), 5 (8), 3 (7), 7 (6), 0 (5), 4 (3), 6 (2), 2 (1).
        assert_eq!(micro_batches_by_len(|i| lens[i], &global, 0, 2, 2), vec![vec![1, 5], vec![0, 4]]);
        assert_eq!(micro_batches_by_len(|i| lens[i], &global, 1, 2, 2), vec![vec![3, 7], vec![6, 2]]);
        assert_eq!(micro_batches_by_len(|i| lens[i], &global[..3], 1, 2, 2), vec![vec![0], vec![]]);
    }

    #[test]
    fn eval_order_is_by_length_over_the_first_rows() {
        let lens = [3, 9, 3, 1, 9, 4];
        assert_eq!(eval_batches_by_len(6, |i| lens[i], 4, 0), vec![vec![1, 4, 5, 0], vec![2, 3]]);
        assert_eq!(eval_batches_by_len(6, |i| lens[i], 2, 3), vec![vec![1, 0], vec![2]]);
        assert_eq!(eval_batches_by_len(0, |i| lens[i], 2, 0), Vec::<Vec<usize>>::new());
        assert_eq!(steps_per_epoch(0, 4), 0);
        assert_eq!(steps_per_epoch(9, 0), 9);
    }

    #[test]
    fn ranks_share_the_eval_batches_round_robin() {
        let lens = lengths(23);
        let all = eval_batches_by_len(23, |i| lens[i], 2, 0);
        assert_eq!(all.len(), 12);
        for world in [1, 2, 3, 5, 16] {
            let shares: Vec<Vec<Vec<usize>>> = (0..world).map(|r| share_of_rank(all.clone(), r, world)).collect();
            // Batch i on rank i % world, in order.
            for (i, batch) in all.iter().enumerate() {
                assert_eq!(&shares[i % world][i / world], batch, "world {world}, batch {i}");
            }
            assert_eq!(shares.iter().map(Vec::len).sum::<usize>(), all.len(), "world {world}");
            // Shares differ by at most one batch; ranks past the last batch get none.
            let sizes: Vec<usize> = shares.iter().map(Vec::len).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
        }
        assert_eq!(share_of_rank(all.clone(), 0, 0), all);
    }
}
