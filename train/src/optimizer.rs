//! AdamW with its own state tensors (libtorch's optimizer state cannot be saved from tch), fp32
//! master weights, and the learning-rate schedule.
//!
//! Mixed precision: when the model computes in bf16/f16, the model's parameters are a compute copy;
//! the optimizer keeps fp32 masters, fp32 moments and fp32 gradient accumulators (each micro-batch's
//! half-precision gradient is added into them and cleared), and after each step writes the masters
//! back into the compute copy. This is the optimizer side of PyTorch AMP / DeepSpeed's bf16 optimizer;
//! the forward and backward run on the bf16 copy (no autocast). In f32 the model's parameters are
//! the masters and gradients accumulate in their `.grad`.
//!
//! Weight decay (decoupled, PyTorch's AdamW) applies to every matrix (dim >= 2: projections,
//! embeddings, LM head) and not to vectors (RMSNorm weights, biases), as Hugging Face's Trainer does.
use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use tch::{Kind, Tensor};

use crate::config::{LrSchedule, TrainSection};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    pub fn from_train(t: &TrainSection) -> Self {
        AdamWConfig { beta1: t.adam_beta1, beta2: t.adam_beta2, eps: t.adam_epsilon, weight_decay: t.weight_decay }
    }
}

struct ParamState {
    name: String,
    /// The model's tensor (requires grad; the compute copy in bf16).
    param: Tensor,
    /// fp32 master and gradient accumulator, only when `param` is not f32.
    master: Option<Tensor>,
    grad_acc: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Stands in for the gradient of an f32 parameter backward never reached (tch cannot set
    /// `.grad`); zeros, so it changes nothing.
    unused_grad: Option<Tensor>,
    decay: bool,
}

pub struct AdamW {
    config: AdamWConfig,
    params: Vec<ParamState>,
    /// Optimizer steps taken (Adam's t, for the bias corrections).
    pub steps: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, param)| {
                if !param.requires_grad() {
                    bail!("parameter {name} does not require grad");
                }
                let half = param.kind() != Kind::Float;
                let master = half.then(|| param.detach().to_kind(Kind::Float));
                let grad_acc = half.then(|| param.zeros_like().to_kind(Kind::Float));
                let f32_zeros = || Tensor::zeros(param.size(), (Kind::Float, param.device()));
                Ok(ParamState {
                    decay: param.dim() >= 2,
                    exp_avg: f32_zeros(),
                    exp_avg_sq: f32_zeros(),
                    unused_grad: None,
                    name,
                    param,
                    master,
                    grad_acc,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { config, params, steps: 0 })
    }

    /// Clears every gradient (before a step's first micro-batch, and after a skipped step).
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.param.zero_grad();
            if let Some(acc) = &mut p.grad_acc {
                let _ = acc.zero_();
            }
        }
    }

    /// After each micro-batch's backward: moves half-precision gradients into the fp32
    /// accumulators (no-op in f32, where `.grad` accumulates in f32 already).
    pub fn accumulate_micro_batch(&mut self) {
        tch::no_grad(|| {
            for p in &mut self.params {
                if let Some(acc) = &mut p.grad_acc {
                    let grad = p.param.grad();
                    if grad.defined() {
                        let _ = acc.g_add_(&grad.to_kind(Kind::Float));
                        p.param.zero_grad();
                    }
                }
            }
        })
    }

    /// The fp32 gradient of each parameter (zeros where backward never reached it), in a fixed
    /// order: what a data-parallel reducer all-reduces in place.
    pub fn gradients(&mut self) -> Vec<Tensor> {
        self.params
            .iter_mut()
            .map(|p| match &p.grad_acc {
                Some(acc) => acc.shallow_clone(),
                None => {
                    let grad = p.param.grad();
                    if grad.defined() {
                        grad
                    } else {
                        let param = &p.param;
                        p.unused_grad.get_or_insert_with(|| tch::no_grad(|| param.zeros_like())).shallow_clone()
                    }
                }
            })
            .collect()
    }

    /// Global L2 norm of all gradients (torch's clip_grad_norm_: the norm of the per-tensor norms);
    /// NaN or infinite when any gradient is.
    pub fn grad_norm(&mut self) -> f64 {
        let norms: Vec<Tensor> = tch::no_grad(|| self.gradients().iter().map(|g| g.norm()).collect());
        if norms.is_empty() {
            return 0.0;
        }
        tch::no_grad(|| Tensor::stack(&norms, 0).norm().double_value(&[]))
    }

    /// One AdamW update at learning rate `lr`, gradients first scaled by `grad_scale` (the clipping
    /// coefficient, 1 = none). PyTorch's single-tensor AdamW, in fp32.
    pub fn step(&mut self, lr: f64, grad_scale: f64) {
        self.steps += 1;
        let weight_decay = self.config.weight_decay;
        let grads = self.gradients();
        tch::no_grad(|| {
            for (p, mut grad) in self.params.iter_mut().zip(grads) {
                // In place: the gradients are cleared before the next step anyway.
                if grad_scale < 1.0 {
                    let _ = grad.g_mul_scalar_(grad_scale);
                }
                let master = match &mut p.master {
                    Some(m) => m,
                    None => &mut p.param,
                };
                if p.decay && weight_decay > 0.0 {
                    let _ = master.g_mul_scalar_(1.0 - lr * weight_decay);
                }
                adam_update(master, &mut p.exp_avg, &mut p.exp_avg_sq, &grad, &self.config, lr, self.steps);
                if let Some(m) = &p.master {
                    p.param.copy_(&m.to_kind(p.param.kind()));
                }
            }
        });
    }

    /// Masters and moments under `master.NAME`, `exp_avg.NAME`, `exp_avg_sq.NAME` (fp32).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.params.len() * 3);
        for p in &self.params {
            let master = p.master.as_ref().unwrap_or(&p.param).detach();
            out.push((format!("master.{}", p.name), master));
            out.push((format!("exp_avg.{}", p.name), p.exp_avg.shallow_clone()));
            out.push((format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.shallow_clone()));
        }
        out
    }

    /// Restores masters (and the compute copy from them) and moments saved by `state_tensors`.
    pub fn load_state(&mut self, saved: Vec<(String, Tensor)>, steps: u64) -> Result<()> {
        let mut saved: BTreeMap<String, Tensor> = saved.into_iter().collect();
        let expected = self.params.len() * 3;
        if saved.len() != expected {
            bail!("the optimizer state holds {} tensors, this decoder needs {expected}", saved.len());
        }
        tch::no_grad(|| -> Result<()> {
            for p in &mut self.params {
                let mut take = |prefix: &str| -> Result<Tensor> {
                    let key = format!("{prefix}.{}", p.name);
                    let t = saved.remove(&key).ok_or_else(|| anyhow!("the optimizer state has no {key}"))?;
                    if t.size() != p.param.size() {
                        bail!("optimizer state {key} has shape {:?}, the parameter {:?}", t.size(), p.param.size());
                    }
                    Ok(t.to_kind(Kind::Float))
                };
                let master = take("master")?;
                p.exp_avg.copy_(&take("exp_avg")?);
                p.exp_avg_sq.copy_(&take("exp_avg_sq")?);
                match &mut p.master {
                    Some(m) => {
                        m.copy_(&master);
                        p.param.copy_(&master.to_kind(p.param.kind()));
                    }
                    None => p.param.copy_(&master),
                }
            }
            Ok(())
        })?;
        self.steps = steps;
        Ok(())
    }
}

/// The Adam part of PyTorch's single-tensor AdamW update at optimizer step `steps` (1-based), in
/// place and in fp32, after the decoupled weight decay (which the caller applies: per tensor in
/// `AdamW`, by a mask over a flat slice in ZeRO-1): the moments, then
/// master += -lr / (1 - β1^t) · m / (sqrt(v) / sqrt(1 - β2^t) + ε), with two temporaries.
/// Call under `no_grad`.
pub fn adam_update(master: &mut Tensor, exp_avg: &mut Tensor, exp_avg_sq: &mut Tensor, grad: &Tensor, config: &AdamWConfig, lr: f64, steps: u64) {
    let AdamWConfig { beta1, beta2, eps, .. } = *config;
    let t = steps as i32;
    let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
    let step_size = lr / (1.0 - beta1.powi(t));
    let _ = exp_avg.lerp_(grad, 1.0 - beta1);
    let _ = exp_avg_sq.g_mul_scalar_(beta2);
    let _ = exp_avg_sq.addcmul_(grad, &(grad * (1.0 - beta2)));
    let mut denom = exp_avg_sq.sqrt();
    let _ = denom.g_div_scalar_(bias_correction2_sqrt);
    let _ = denom.g_add_scalar_(eps);
    let _ = denom.g_div_scalar_(-step_size);
    let _ = master.addcdiv_(&*exp_avg, &denom);
}

/// The clipping coefficient of torch's `clip_grad_norm_`: max_norm / (norm + 1e-6), at most 1;
/// 1 when clipping is off.
pub fn clip_coefficient(grad_norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (grad_norm + 1e-6)).min(1.0)
}

/// Steps of linear warmup: ceil(warmup_ratio × total_steps).
pub fn warmup_steps(warmup_ratio: f64, total_steps: u64) -> u64 {
    ((warmup_ratio * total_steps as f64).ceil() as u64).min(total_steps)
}

/// Learning rate of optimizer step `step` (1-based) out of `total_steps`.
///
/// Warmup: peak × step / W for step <= W (never 0 at step 1). Cosine afterwards: Hugging Face's
/// `get_cosine_schedule_with_warmup` at the 0-based step (peak at step W+1, decaying towards 0,
/// still positive at the last step).
pub fn learning_rate(peak: f64, schedule: LrSchedule, warmup: u64, total_steps: u64, step: u64) -> f64 {
    if warmup > 0 && step <= warmup {
        return peak * step as f64 / warmup as f64;
    }
    match schedule {
        LrSchedule::Constant => peak,
        LrSchedule::Cosine => {
            let decay_steps = total_steps.saturating_sub(warmup).max(1) as f64;
            let progress = (step.saturating_sub(1).max(warmup) - warmup) as f64 / decay_steps;
            peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_and_never_hits_zero_inside_the_run() {
        let total = 100;
        let w = warmup_steps(0.01, total);
        assert_eq!(w, 1);
        assert_eq!(learning_rate(1.0, LrSchedule::Cosine, w, total, 1), 1.0);
        assert_eq!(learning_rate(1.0, LrSchedule::Cosine, w, total, 2), 1.0);
        let last = learning_rate(1.0, LrSchedule::Cosine, w, total, total);
        assert!(last > 0.0 && last < 1e-3, "{last}");
        let w = warmup_steps(0.1, total);
        assert_eq!(w, 10);
        assert!((learning_rate(2.0, LrSchedule::Cosine, w, total, 1) - 0.2).abs() < 1e-12);
        assert!((learning_rate(2.0, LrSchedule::Cosine, w, total, 10) - 2.0).abs() < 1e-12);
        // Half-way through the decay: half the peak.
        let mid = learning_rate(2.0, LrSchedule::Cosine, w, total, 11 + 45);
        assert!((mid - 1.0).abs() < 1e-12, "{mid}");
        assert_eq!(learning_rate(2.0, LrSchedule::Constant, w, total, 90), 2.0);
        // No warmup: the first step runs at the peak.
        assert_eq!(learning_rate(3.0, LrSchedule::Cosine, 0, total, 1), 3.0);
    }

    #[test]
    fn adamw_matches_the_closed_form_first_step() {
        // First AdamW step: m̂ = g, v̂ = g², update = lr · g / (|g| + eps) (+ decoupled decay).
        let p = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0]).reshape([2, 2]).set_requires_grad(true);
        let loss = (&p * Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.0]).reshape([2, 2])).sum(Kind::Float);
        loss.backward();
        let mut opt = AdamW::new(vec![("w".into(), p.shallow_clone())], AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 })
            .unwrap();
        opt.step(0.01, 1.0);
        let got: Vec<f32> = Vec::try_from(p.detach().flatten(0, -1)).unwrap();
        let g = [0.5f64, -1.0, 2.0, 0.0];
        let p0 = [1.0f64, -2.0, 0.5, 3.0];
        for i in 0..4 {
            let decayed = p0[i] * (1.0 - 0.01 * 0.1);
            let want = decayed - 0.01 * g[i] / (g[i].abs() + 1e-8);
            assert!((got[i] as f64 - want).abs() < 1e-6, "{i}: {} vs {want}", got[i]);
        }
    }
}
