//! ZeRO stages 1 and 2 (`[train] zero_stage = 1 | 2`): optimizer-state (and gradient) sharding over
//! the data-parallel ranks.
//!
//! All parameters are laid out end to end in one flat fp32 vector, padded to a multiple of the world
//! size; rank r owns the r-th equal slice. Each rank keeps the fp32 master weights and the AdamW
//! moments of its slice only (12 bytes per parameter / world size instead of 12).
//!
//! Gradients. Stage 1: they accumulate over the micro-batches into a flat fp32 buffer of all
//! parameters (as the replicated optimizer's fp32 accumulators), and one reduce-scatter at the end
//! of the step sums them over ranks into this rank's slice. Stage 2: after every micro-batch's
//! backward, the gradients are reduce-scattered bucket by bucket and added into this rank's fp32
//! slice, so no rank holds an fp32 accumulator of all parameters (4 bytes per parameter less, for
//! one reduce-scatter per micro-batch instead of one per step).
//!
//! A step: the global norm is the all-reduced sum of squares of the slices, the slice takes the same
//! element-wise AdamW update as `train::optimizer::AdamW` (so results equal plain data parallelism),
//! and the updated slices are all-gathered bucket by bucket straight into the model's parameters
//! (no fp32 copy of all parameters).
//!
//! Each rank saves its own slice (`optimizer-rank-R-of-W.safetensors`, the same for both stages);
//! resuming needs the same world size.
use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::optimizer::{adam_update, AdamWConfig};
use crate::reducer::GradientReducer;

/// Elements of one bucket of a stage-2 reduce-scatter or of the gather (all ranks' pieces
/// together): 128 MiB of fp32, whatever the model's size.
const BUCKET_ELEMENTS: i64 = 1 << 25;

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
    /// Stage 1: all gradients, fp32, `shard × world_size` (accumulated over micro-batches);
    /// `None` in stage 2.
    grad_acc: Option<Tensor>,
    /// This rank's slice of the summed gradients (stage 2: accumulated over micro-batches).
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
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig, stage: u8, rank: usize, world_size: usize) -> Result<Self> {
        if !(1..=2).contains(&stage) {
            bail!("ZeRO stage {stage}: the sharded optimizer has stages 1 and 2");
        }
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
            grad_acc: (stage == 1).then(|| zeros(padded)),
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
        match &mut self.grad_acc {
            Some(acc) => {
                let _ = acc.zero_();
            }
            None => {
                let _ = self.grad_shard.zero_();
            }
        }
    }

    /// After each micro-batch's backward: stage 1 adds every gradient into the flat fp32 buffer;
    /// stage 2 reduce-scatters them into this rank's slice. Either way the parameters' `.grad`s
    /// are cleared for the next micro-batch.
    pub fn accumulate_micro_batch(&mut self, reducer: &dyn GradientReducer) -> Result<()> {
        match &self.grad_acc {
            Some(acc) => tch::no_grad(|| {
                for slot in &self.slots {
                    let grad = slot.param.grad();
                    if grad.defined() {
                        let _ = acc.narrow(0, slot.offset, slot.numel).g_add_(&grad.reshape([-1]).to_kind(Kind::Float));
                    }
                }
            }),
            None => self.reduce_scatter_gradients(reducer)?,
        }
        for slot in &mut self.slots {
            slot.param.zero_grad();
        }
        Ok(())
    }

    /// Stage 2: this micro-batch's gradients summed over ranks into this rank's slice, one bucket
    /// at a time. A bucket holds the same stretch [start, start + len) of every rank's slice, in
    /// rank order, which is what a reduce-scatter hands back piece by piece.
    fn reduce_scatter_gradients(&self, reducer: &dyn GradientReducer) -> Result<()> {
        let world = self.world_size as i64;
        let device = self.grad_shard.device();
        for (start, len) in self.buckets() {
            let input = Tensor::zeros([world * len], (Kind::Float, device));
            tch::no_grad(|| {
                for piece in self.bucket_pieces(start, len) {
                    let grad = self.slots[piece.slot].param.grad();
                    if grad.defined() {
                        let values = grad.reshape([-1]).narrow(0, piece.in_param, piece.len);
                        input.narrow(0, piece.in_bucket, piece.len).copy_(&values);
                    }
                }
            });
            let summed = Tensor::zeros([len], (Kind::Float, device));
            reducer.reduce_scatter_sum(&summed, &input)?;
            tch::no_grad(|| {
                let _ = self.grad_shard.narrow(0, start, len).g_add_(&summed);
            });
        }
        Ok(())
    }

    /// Sums the gradients over ranks into this rank's slice: stage 1's reduce-scatter of the
    /// accumulated buffer (stage 2 did it micro-batch by micro-batch).
    pub fn reduce_gradients(&mut self, reducer: &dyn GradientReducer) -> Result<()> {
        match &self.grad_acc {
            Some(acc) => reducer.reduce_scatter_sum(&self.grad_shard, acc),
            None => Ok(()),
        }
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

    /// Every rank's slice of the masters gathered into the model's parameters, one bucket at a
    /// time (see `reduce_scatter_gradients` for a bucket's layout).
    fn gather_parameters(&mut self, reducer: &dyn GradientReducer) -> Result<()> {
        let world = self.world_size as i64;
        for (start, len) in self.buckets() {
            let gathered = Tensor::zeros([world * len], (Kind::Float, self.master.device()));
            reducer.all_gather(&gathered, &self.master.narrow(0, start, len))?;
            tch::no_grad(|| -> Result<()> {
                for piece in self.bucket_pieces(start, len) {
                    let param = &self.slots[piece.slot].param;
                    let values = gathered.narrow(0, piece.in_bucket, piece.len);
                    param
                        .f_view([-1])
                        .context("a parameter is not contiguous")?
                        .narrow(0, piece.in_param, piece.len)
                        .copy_(&values.to_kind(param.kind()));
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// The buckets of a rank's slice: (start, len) stretches covering [0, shard).
    fn buckets(&self) -> Vec<(i64, i64)> {
        let chunk = (BUCKET_ELEMENTS / self.world_size as i64).max(1);
        (0..self.shard).step_by(chunk as usize).map(|start| (start, chunk.min(self.shard - start))).collect()
    }

    /// The parts of parameters in the bucket [start, start + len) of every rank's slice, each with
    /// its place in the bucket's buffer (rank r's stretch at r · len; padding has no part).
    fn bucket_pieces(&self, start: i64, len: i64) -> Vec<Piece> {
        let mut pieces = Vec::new();
        for r in 0..self.world_size as i64 {
            let (lo, hi) = (r * self.shard + start, r * self.shard + start + len);
            for (slot, s) in self.slots.iter().enumerate() {
                let (from, to) = (s.offset.max(lo), (s.offset + s.numel).min(hi));
                if from < to {
                    pieces.push(Piece { slot, in_param: from - s.offset, in_bucket: r * len + from - lo, len: to - from });
                }
            }
        }
        pieces
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

/// The part of one parameter inside a bucket.
struct Piece {
    slot: usize,
    /// Offset in the flattened parameter and in the bucket's buffer; elements.
    in_param: i64,
    in_bucket: i64,
    len: i64,
}

/// File name of one rank's optimizer slice inside a checkpoint folder.
pub fn shard_file_name(rank: usize, world_size: usize) -> String {
    format!("optimizer-rank-{rank}-of-{world_size}.safetensors")
}
