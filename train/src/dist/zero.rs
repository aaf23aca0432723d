//! ZeRO stage 1 (`[train] zero_stage = 1`): optimizer-state sharding over the data-parallel ranks.
//!
//! All parameters are laid out end to end in one flat fp32 vector, padded to a multiple of the world
//! size; rank r owns the r-th equal slice. Each rank keeps the fp32 master weights and the AdamW
//! moments of its slice only (12 bytes per parameter / world size instead of 12). A step:
//! gradients accumulate into a flat fp32 buffer (as the replicated optimizer's fp32 accumulators),
//! a reduce-scatter sums them over ranks into this rank's slice, the global norm is the all-reduced
//! sum of squares of the slices, the slice takes the same element-wise AdamW update as
//! `train::optimizer::AdamW` (so results equal plain data parallelism), and an all-gather of the
//! updated slices writes every parameter back into the model.
//!
//! Each rank saves its own slice (`optimizer-rank-R-of-W.safetensors`); resuming needs the same
//! world size.
use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::optimizer::{adam_update, AdamWConfig};
use crate::reducer::GradientReducer;

/// One parameter's place in the flat vector.
struct Slot {
    param: Tensor,
    offset: i64,
    numel: i64,
}

pub struct ShardedAdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    rank: usize,
    world_size: usize,
    /// Parameters in the flat vector (before padding).
    total: i64,
    /// Elements per rank.
    shard: i64,
    /// All gradients, fp32, `shard × world_size` (accumulated over micro-batches).
    grad_acc: Tensor,
    /// This rank's slice of the summed gradients.
    grad_shard: Tensor,
    master: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// 1 where weight decay applies (matrices), 0 elsewhere (vectors, padding).
    decay_mask: Tensor,
    /// Optimizer steps taken (Adam's t).
    pub steps: u64,
}

impl ShardedAdamW {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig, rank: usize, world_size: usize) -> Result<Self> {
        let device = params.first().map(|(_, p)| p.device()).unwrap_or(Device::Cpu);
        let mut slots = Vec::with_capacity(params.len());
        let mut offset = 0;
        for (name, param) in params {
            if !param.requires_grad() {
                bail!("parameter {name} does not require grad");
            }
            let numel = param.numel() as i64;
            slots.push(Slot { param, offset, numel });
            offset += numel;
        }
        let total = offset;
        let world = world_size.max(1) as i64;
        let shard = (total + world - 1) / world;
        let padded = shard * world;
        let start = shard * rank as i64;
        let (master, decay_mask) = tch::no_grad(|| {
            // Build only this rank's slice: copy the parts of the parameters that fall in it.
            let master = Tensor::zeros([shard], (Kind::Float, device));
            let decay_mask = Tensor::zeros([shard], (Kind::Float, device));
            for slot in &slots {
                let (lo, hi) = (slot.offset.max(start), (slot.offset + slot.numel).min(start + shard));
                if lo >= hi {
                    continue;
                }
                let part = slot.param.detach().reshape([-1]).narrow(0, lo - slot.offset, hi - lo).to_kind(Kind::Float);
                master.narrow(0, lo - start, hi - lo).copy_(&part);
                if slot.param.dim() >= 2 {
                    let _ = decay_mask.narrow(0, lo - start, hi - lo).fill_(1.0);
                }
            }
            (master, decay_mask)
        });
        let zeros = |n: i64| Tensor::zeros([n], (Kind::Float, device));
        Ok(ShardedAdamW {
            config,
            slots,
            rank,
            world_size: world as usize,
            total,
            shard,
            grad_acc: zeros(padded),
            grad_shard: zeros(shard),
            exp_avg: zeros(shard),
            exp_avg_sq: zeros(shard),
            master,
            decay_mask,
            steps: 0,
        })
    }

    pub fn zero_grad(&mut self) {
        for slot in &mut self.slots {
            slot.param.zero_grad();
        }
        let _ = self.grad_acc.zero_();
    }

    /// After each micro-batch's backward: adds every gradient into the flat fp32 buffer.
    pub fn accumulate_micro_batch(&mut self) {
        tch::no_grad(|| {
            for slot in &mut self.slots {
                let grad = slot.param.grad();
                if grad.defined() {
                    let _ = self.grad_acc.narrow(0, slot.offset, slot.numel).g_add_(&grad.reshape([-1]).to_kind(Kind::Float));
                    slot.param.zero_grad();
                }
            }
        })
    }

    /// Sums the gradients over ranks into this rank's slice (reduce-scatter).
    pub fn reduce_gradients(&mut self, reducer: &dyn GradientReducer) -> Result<()> {
        reducer.reduce_scatter_sum(&self.grad_shard, &self.grad_acc)
    }

    /// Global L2 norm of the summed gradients (NaN/inf when any gradient is).
    pub fn grad_norm(&self, reducer: &dyn GradientReducer) -> Result<f64> {
        let local = tch::no_grad(|| self.grad_shard.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]));
        let mut sums = [local];
        reducer.all_reduce_sum(&mut sums)?;
        Ok(sums[0].sqrt())
    }

    /// AdamW on this rank's slice (`train::optimizer::adam_update`, as `AdamW::step`),
    /// then every rank's slice gathered back into the model's parameters.
    pub fn step(&mut self, lr: f64, grad_scale: f64, reducer: &dyn GradientReducer) -> Result<()> {
        self.steps += 1;
        let weight_decay = self.config.weight_decay;
        tch::no_grad(|| {
            let grad = if grad_scale < 1.0 { &self.grad_shard * grad_scale } else { self.grad_shard.shallow_clone() };
            if weight_decay > 0.0 {
                // mask·(1 - lr·wd) + (1 - mask): the same f32 factor as the per-tensor update's scalar.
                let decayed = Tensor::full([self.shard], 1.0 - lr * weight_decay, (Kind::Float, self.master.device()));
                let factor = decayed.where_self(&self.decay_mask.gt(0.5), &self.decay_mask.ones_like());
                let _ = self.master.g_mul_(&factor);
            }
            adam_update(&mut self.master, &mut self.exp_avg, &mut self.exp_avg_sq, &grad, &self.config, lr, self.steps);
        });
        self.gather_parameters(reducer)
    }

    /// Every rank's slice of the masters gathered and copied into the model's parameters.
    fn gather_parameters(&mut self, reducer: &dyn GradientReducer) -> Result<()> {
        let full = Tensor::zeros([self.shard * self.world_size as i64], (Kind::Float, self.master.device()));
        reducer.all_gather(&full, &self.master)?;
        tch::no_grad(|| {
            for slot in &mut self.slots {
                let values = full.narrow(0, slot.offset, slot.numel).view(slot.param.size().as_slice());
                slot.param.copy_(&values.to_kind(slot.param.kind()));
            }
        });
        Ok(())
    }

    /// This rank's slice: masters, moments and the layout it belongs to (rank, world size, total).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("zero1.layout".into(), Tensor::from_slice(&[self.rank as i64, self.world_size as i64, self.total])),
            ("zero1.master".into(), self.master.shallow_clone()),
            ("zero1.exp_avg".into(), self.exp_avg.shallow_clone()),
            ("zero1.exp_avg_sq".into(), self.exp_avg_sq.shallow_clone()),
        ]
    }

    /// Restores this rank's slice saved by `state_tensors` (same world size), and the model's
    /// parameters from all ranks' masters.
    pub fn load_state(&mut self, saved: Vec<(String, Tensor)>, steps: u64, reducer: &dyn GradientReducer) -> Result<()> {
        let get = |key: &str| -> Result<Tensor> {
            saved.iter().find(|(k, _)| k == key).map(|(_, t)| t.shallow_clone()).with_context(|| format!("the optimizer shard has no {key}"))
        };
        let layout: Vec<i64> = Vec::try_from(&get("zero1.layout")?).context("reading zero1.layout")?;
        let want = [self.rank as i64, self.world_size as i64, self.total];
        if layout != want {
            bail!(
                "the optimizer shard was written by rank {} of {} for {} parameters; this is rank {} of {} with {}: \
                 resume with the same world size and decoder",
                layout.first().unwrap_or(&-1),
                layout.get(1).unwrap_or(&-1),
                layout.get(2).unwrap_or(&-1),
                want[0],
                want[1],
                want[2]
            );
        }
        tch::no_grad(|| -> Result<()> {
            for (key, into) in [("zero1.master", &mut self.master), ("zero1.exp_avg", &mut self.exp_avg), ("zero1.exp_avg_sq", &mut self.exp_avg_sq)] {
                let t = get(key)?;
                if t.size() != into.size() {
                    bail!("optimizer shard {key} has shape {:?}, expected {:?}", t.size(), into.size());
                }
                into.copy_(&t.to_kind(Kind::Float).to_device(into.device()));
            }
            Ok(())
        })?;
        self.steps = steps;
        self.gather_parameters(reducer)
    }
}

/// File name of one rank's optimizer slice inside a checkpoint folder.
pub fn shard_file_name(rank: usize, world_size: usize) -> String {
    format!("optimizer-rank-{rank}-of-{world_size}.safetensors")
}
