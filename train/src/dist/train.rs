//! What data parallelism plugs into `overfill train`: `Dist` as the trainer's `GradientReducer`,
//! the rank's device, and the optimizer either replicated (plain data parallelism) or sharded
//! (ZeRO-1), with each rank's optimizer checkpoint file.
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tch::{Device, Tensor};

use super::zero::{shard_file_name, ShardedAdamW};
use super::{Dist, DistEnv};
use crate::optimizer::{AdamW, AdamWConfig};
use crate::run_folder;
use crate::reducer::GradientReducer;

impl GradientReducer for Dist {
    fn rank(&self) -> usize {
        Dist::rank(self)
    }
    fn world_size(&self) -> usize {
        Dist::world_size(self)
    }
    fn all_reduce_gradients(&self, gradients: &mut [Tensor]) -> Result<()> {
        Dist::all_reduce_sum(self, gradients)
    }
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()> {
        self.all_reduce_f64(values)
    }
    fn broadcast_from_rank0(&self, tensors: &[Tensor]) -> Result<()> {
        tch::no_grad(|| self.broadcast(tensors, 0))
    }
    fn reduce_scatter_sum(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        tch::no_grad(|| Dist::reduce_scatter_sum(self, output, input))
    }
    fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        tch::no_grad(|| Dist::all_gather(self, output, input))
    }
    fn barrier(&self) -> Result<()> {
        Dist::barrier(self)
    }
}

/// Joins the job described by the environment (world size 1 without one) for training on
/// `device`; on CUDA each rank of a node takes GPU `LOCAL_RANK` when the recipe says plain `cuda`.
pub fn join_for_training(device_setting: &str, device: Device, timeout: Duration) -> Result<(Dist, Device)> {
    let Some(env) = DistEnv::from_env()? else { return Ok((Dist::single(), device)) };
    let device = match device {
        Device::Cuda(_) if device_setting.trim().eq_ignore_ascii_case("cuda") => Device::Cuda(env.local_rank),
        other => other,
    };
    if let Device::Cuda(i) = device {
        let available = tch::Cuda::device_count() as usize;
        if i >= available {
            anyhow::bail!("rank {} (local rank {}) needs cuda:{i}, this node has {available} GPUs", env.rank, env.local_rank);
        }
    }
    let dist = Dist::join(&env, device, timeout)?;
    if dist.world_size() > 1 && dist.is_main() {
        eprintln!(
            "data parallel: {} ranks ({} environment), {} backend, rendezvous {}:{}",
            dist.world_size(),
            env.source,
            if matches!(device, Device::Cuda(_)) { "NCCL" } else { "Gloo" },
            env.master_addr,
            env.master_port
        );
    }
    Ok((dist, device))
}

/// The optimizer of a data-parallel step: every rank holds all the state (plain data parallelism,
/// gradients all-reduced), or its slice of it (ZeRO-1 and 2, gradients reduce-scattered).
pub enum StepOptimizer {
    Replicated(AdamW),
    Sharded(ShardedAdamW),
}

impl StepOptimizer {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig, zero_stage: u8, reducer: &dyn GradientReducer) -> Result<Self> {
        Ok(match zero_stage {
            0 => StepOptimizer::Replicated(AdamW::new(params, config)?),
            1 | 2 => StepOptimizer::Sharded(ShardedAdamW::new(params, config, zero_stage, reducer.rank(), reducer.world_size())?),
            other => anyhow::bail!(
                "[train] zero_stage = {other}: only 0 (replicated optimizer), 1 (sharded optimizer state) and 2 (sharded optimizer state and gradients) exist"
            ),
        })
    }

    pub fn steps(&self) -> u64 {
        match self {
            StepOptimizer::Replicated(o) => o.steps,
            StepOptimizer::Sharded(o) => o.steps,
        }
    }

    pub fn zero_grad(&mut self) {
        match self {
            StepOptimizer::Replicated(o) => o.zero_grad(),
            StepOptimizer::Sharded(o) => o.zero_grad(),
        }
    }

    /// After each micro-batch's backward (ZeRO-2 reduce-scatters its gradients here).
    pub fn accumulate_micro_batch(&mut self, reducer: &dyn GradientReducer) -> Result<()> {
        match self {
            StepOptimizer::Replicated(o) => {
                o.accumulate_micro_batch();
                Ok(())
            }
            StepOptimizer::Sharded(o) => o.accumulate_micro_batch(reducer),
        }
    }

    /// Sums gradients over ranks: all-reduce (replicated) or reduce-scatter (sharded).
    pub fn reduce_gradients(&mut self, reducer: &dyn GradientReducer) -> Result<()> {
        match self {
            StepOptimizer::Replicated(o) => reducer.all_reduce_gradients(&mut o.gradients()),
            StepOptimizer::Sharded(o) => o.reduce_gradients(reducer),
        }
    }

    /// Global pre-clip gradient norm (after `reduce_gradients`).
    pub fn grad_norm(&mut self, reducer: &dyn GradientReducer) -> Result<f64> {
        match self {
            StepOptimizer::Replicated(o) => Ok(o.grad_norm()),
            StepOptimizer::Sharded(o) => o.grad_norm(reducer),
        }
    }

    pub fn step(&mut self, lr: f64, grad_scale: f64, reducer: &dyn GradientReducer) -> Result<()> {
        match self {
            StepOptimizer::Replicated(o) => {
                o.step(lr, grad_scale);
                Ok(())
            }
            StepOptimizer::Sharded(o) => o.step(lr, grad_scale, reducer),
        }
    }

    /// What rank 0 writes as the checkpoint's `optimizer.safetensors` (the whole state when
    /// replicated; rank 0's slice when sharded).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        match self {
            StepOptimizer::Replicated(o) => o.state_tensors(),
            StepOptimizer::Sharded(o) => o.state_tensors(),
        }
    }

    /// Restores from a checkpoint folder: `optimizer.safetensors` (replicated), or this rank's
    /// `optimizer-rank-R-of-W.safetensors` (sharded).
    pub fn load_from(&mut self, checkpoint: &Path, steps: u64, reducer: &dyn GradientReducer) -> Result<()> {
        match self {
            StepOptimizer::Replicated(o) => o.load_state(run_folder::read_optimizer_state(checkpoint)?, steps),
            StepOptimizer::Sharded(o) => {
                let path = checkpoint.join(shard_file_name(reducer.rank(), reducer.world_size()));
                if !path.exists() {
                    anyhow::bail!(
                        "{} has no {}: it was not written by a ZeRO run of world size {} (resume needs the same world size and a zero_stage of 1 or 2)",
                        checkpoint.display(),
                        path.file_name().unwrap_or_default().to_string_lossy(),
                        reducer.world_size()
                    );
                }
                let saved = Tensor::read_safetensors(&path).with_context(|| format!("reading {}", path.display()))?;
                o.load_state(saved, steps, reducer)
            }
        }
    }

    /// Sharded: every rank writes its slice to `out/.zero1-STEP.tmp/` and waits for the others; the
    /// files returned are moved into the checkpoint folder by rank 0 before it becomes visible.
    /// Replicated: nothing (rank 0's `optimizer.safetensors` holds everything).
    pub fn write_rank_files(&self, out: &Path, step: u64, reducer: &dyn GradientReducer) -> Result<Vec<(String, std::path::PathBuf)>> {
        let StepOptimizer::Sharded(o) = self else { return Ok(Vec::new()) };
        let staging = out.join(format!(".zero1-{step}.tmp"));
        std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
        let name = shard_file_name(reducer.rank(), reducer.world_size());
        let tmp = staging.join(format!(".{name}.tmp"));
        Tensor::write_safetensors(&o.state_tensors(), &tmp).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, staging.join(&name)).with_context(|| format!("renaming {}", tmp.display()))?;
        reducer.barrier()?;
        Ok((0..reducer.world_size())
            .map(|r| {
                let name = shard_file_name(r, reducer.world_size());
                (name.clone(), staging.join(name))
            })
            .collect())
    }
}
