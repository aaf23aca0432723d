//! Width pruning that keeps the KV cache compatible.
//!
//! Only the hidden (residual) size D and the FFN size I shrink; layers, attention heads, KV heads
//! and head_dim stay, so a pruned decoder can read the full model's K/V. Everything here is a pure
//! function of `(ModelConfig, tensors)` and kept channel indices: no calibration, no file IO.
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use tch::Tensor;

use crate::config::ModelConfig;

/// A requested width: the fraction P of channels to *remove*, or the absolute number to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Width {
    /// Prune fraction P in [0, 1): kept = int((1 - P) · dim), as the paper's Table 1.
    Fraction(f64),
    /// Keep exactly this many channels.
    Absolute(usize),
}

impl FromStr for Width {
    type Err = anyhow::Error;

    /// "0.43" → prune 43 %; "0" → prune nothing; "2334" → keep 2334 channels.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            let n: usize = t.parse().with_context(|| format!("width {s:?} is not a number"))?;
            return Ok(if n == 0 { Width::Fraction(0.0) } else { Width::Absolute(n) });
        }
        let p: f64 = t
            .parse()
            .map_err(|_| anyhow!("width {s:?} is neither a prune ratio in [0, 1) nor a whole number of channels"))?;
        Width::fraction(p)
    }
}

impl Width {
    /// A checked prune fraction.
    pub fn fraction(p: f64) -> Result<Self> {
        if !p.is_finite() || !(0.0..1.0).contains(&p) {
            bail!("prune ratio {p} is outside [0, 1) (a ratio is the fraction of channels removed; give a whole number for an absolute width)");
        }
        Ok(Width::Fraction(p))
    }
}

impl fmt::Display for Width {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Width::Fraction(p) => write!(f, "{p}"),
            Width::Absolute(n) => write!(f, "{n}"),
        }
    }
}

/// Number of channels kept out of `dim` for a requested width, optionally rounded to a multiple of
/// `round_to` (nearest multiple, never above `dim`, never zero) for tensor-core-friendly shapes.
pub fn kept_width(dim: usize, width: Width, round_to: Option<usize>) -> Result<usize> {
    let kept = match width {
        Width::Fraction(p) => {
            Width::fraction(p)?;
            // int((1-P)·dim) like the paper's code; the f64 product of e.g. 0.57·4096 = 2334.72.
            ((1.0 - p) * dim as f64).floor() as usize
        }
        Width::Absolute(n) => {
            if n > dim {
                bail!("requested width {n} is larger than the model's dimension {dim}");
            }
            n
        }
    };
    let kept = match round_to {
        None | Some(1) => kept,
        Some(0) => bail!("--round-to must be at least 1"),
        Some(m) => {
            if m > dim {
                bail!("cannot round a width of dimension {dim} to a multiple of {m}");
            }
            let nearest = ((kept + m / 2) / m) * m;
            if nearest > dim {
                (dim / m) * m
            } else {
                nearest.max(m)
            }
        }
    };
    if kept == 0 {
        bail!("width {width} of a dimension of {dim} keeps no channel");
    }
    Ok(kept)
}

/// Indices of the `k` largest scores, sorted ascending (so the kept channels stay in their
/// original order). Ties go to the lower index; NaN scores are an error.
pub fn top_k_indices(scores: &[f32], k: usize) -> Result<Vec<i64>> {
    if k > scores.len() {
        bail!("cannot keep {k} channels out of {}", scores.len());
    }
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        bail!("importance score of channel {i} is NaN");
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Descending by score, ascending index among equal scores.
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut kept: Vec<i64> = order[..k].iter().map(|&i| i as i64).collect();
    kept.sort_unstable();
    Ok(kept)
}

/// Kept channel indices: one set for the hidden size (shared by every layer, since the residual
/// stream is shared) and one per layer for the FFN.
#[derive(Debug, Clone, PartialEq)]
pub struct PrunePlan {
    pub hidden: Vec<i64>,
    pub intermediate: Vec<Vec<i64>>,
}

impl PrunePlan {
    /// Keep everything (ratio 0).
    pub fn identity(config: &ModelConfig) -> Self {
        PrunePlan {
            hidden: (0..config.hidden_size as i64).collect(),
            intermediate: vec![(0..config.intermediate_size as i64).collect(); config.num_hidden_layers],
        }
    }

    /// Check the plan against a config: right layer count, all kept widths equal, indices strictly
    /// ascending and in range.
    pub fn validate(&self, config: &ModelConfig) -> Result<()> {
        check_indices("hidden", &self.hidden, config.hidden_size)?;
        if self.intermediate.len() != config.num_hidden_layers {
            bail!(
                "prune plan has intermediate indices for {} layers, the model has {}",
                self.intermediate.len(),
                config.num_hidden_layers
            );
        }
        let width = self.intermediate.first().map(Vec::len).unwrap_or(0);
        for (layer, idx) in self.intermediate.iter().enumerate() {
            check_indices(&format!("intermediate of layer {layer}"), idx, config.intermediate_size)?;
            if idx.len() != width {
                bail!(
                    "layer {layer} keeps {} intermediate channels, layer 0 keeps {width}; a config has one intermediate_size",
                    idx.len()
                );
            }
        }
        Ok(())
    }
}

fn check_indices(what: &str, idx: &[i64], dim: usize) -> Result<()> {
    if idx.is_empty() {
        bail!("{what}: no channel kept");
    }
    for w in idx.windows(2) {
        if w[0] >= w[1] {
            bail!("{what}: kept indices must be strictly ascending ({} then {})", w[0], w[1]);
        }
    }
    if idx[0] < 0 || *idx.last().unwrap_or(&0) >= dim as i64 {
        bail!("{what}: kept index out of range 0..{dim}");
    }
    Ok(())
}

/// The pruned config (no weights): same layers/heads/head_dim, new hidden and intermediate sizes.
/// head_dim is a field of ModelConfig and `to_hf_json` always writes it, so it survives
/// hidden_size / num_heads no longer equalling it.
pub fn prune_config(config: &ModelConfig, hidden_size: usize, intermediate_size: usize) -> Result<ModelConfig> {
    if hidden_size == 0 || hidden_size > config.hidden_size {
        bail!("pruned hidden size {hidden_size} must be in 1..={}", config.hidden_size);
    }
    if intermediate_size == 0 || intermediate_size > config.intermediate_size {
        bail!("pruned intermediate size {intermediate_size} must be in 1..={}", config.intermediate_size);
    }
    let mut pruned = config.clone();
    pruned.hidden_size = hidden_size;
    pruned.intermediate_size = intermediate_size;
    Ok(pruned)
}

/// Which dims of a tensor are indexed by which kept set.
enum Axis {
    Hidden,
    Intermediate(usize),
}

/// The axes to slice for an HF tensor name, in (dim, axis) pairs; errors on a name it doesn't know.
fn slicing_for(name: &str) -> Result<Vec<(i64, Axis)>> {
    use Axis::*;
    if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
        // [V, D]: columns are hidden channels.
        return Ok(vec![(1, Hidden)]);
    }
    if name == "model.norm.weight" {
        return Ok(vec![(0, Hidden)]);
    }
    let rest = name
        .strip_prefix("model.layers.")
        .ok_or_else(|| anyhow!("tensor {name:?} is not part of a Llama/Qwen2 checkpoint; refusing to prune it"))?;
    let (layer, param) = rest
        .split_once('.')
        .ok_or_else(|| anyhow!("tensor {name:?}: cannot parse the layer index"))?;
    let layer: usize = layer.parse().with_context(|| format!("tensor {name:?}: bad layer index"))?;
    Ok(match param {
        "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![(0, Hidden)],
        // [H*hd, D] / [KV*hd, D]: only the input columns shrink; the head outputs (and their
        // biases) stay, which is what keeps the K/V cache identical in shape.
        "self_attn.q_proj.weight" | "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![(1, Hidden)],
        "self_attn.q_proj.bias" | "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => vec![],
        // [D, H*hd]: output rows are residual channels.
        "self_attn.o_proj.weight" => vec![(0, Hidden)],
        "self_attn.o_proj.bias" => vec![(0, Hidden)],
        // [I, D]
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![(0, Intermediate(layer)), (1, Hidden)],
        "mlp.gate_proj.bias" | "mlp.up_proj.bias" => vec![(0, Intermediate(layer))],
        // [D, I]
        "mlp.down_proj.weight" => vec![(0, Hidden), (1, Intermediate(layer))],
        "mlp.down_proj.bias" => vec![(0, Hidden)],
        _ => bail!("tensor {name:?} is not part of a Llama/Qwen2 checkpoint; refusing to prune it"),
    })
}

/// Slice every tensor of a checkpoint to the kept channels. Returns the pruned config and tensors
/// (new, contiguous tensors on the same device and dtype as the inputs).
pub fn prune_tensors(
    config: &ModelConfig,
    tensors: &BTreeMap<String, Tensor>,
    plan: &PrunePlan,
) -> Result<(ModelConfig, BTreeMap<String, Tensor>)> {
    plan.validate(config)?;
    let new_config = prune_config(config, plan.hidden.len(), plan.intermediate[0].len())?;
    let expected: BTreeMap<String, Vec<i64>> = config.parameter_shapes().into_iter().collect();
    let mut out = BTreeMap::new();
    // Index tensors are made once per device.
    let mut hidden_idx: Option<Tensor> = None;
    let mut inter_idx: BTreeMap<usize, Tensor> = BTreeMap::new();
    for (name, tensor) in tensors {
        let shape = tensor.size();
        if let Some(exp) = expected.get(name) {
            if *exp != shape {
                bail!("tensor {name} has shape {shape:?}, the config expects {exp:?}");
            }
        } else if !(name.ends_with(".bias")) {
            bail!("tensor {name} is not expected by the config");
        }
        let device = tensor.device();
        let mut sliced = tensor.shallow_clone();
        for (dim, axis) in slicing_for(name)? {
            let index = match axis {
                Axis::Hidden => hidden_idx
                    .get_or_insert_with(|| Tensor::from_slice(&plan.hidden).to_device(device))
                    .shallow_clone(),
                Axis::Intermediate(layer) => {
                    let kept = plan
                        .intermediate
                        .get(layer)
                        .ok_or_else(|| anyhow!("tensor {name}: layer {layer} is beyond the plan"))?;
                    inter_idx
                        .entry(layer)
                        .or_insert_with(|| Tensor::from_slice(kept).to_device(device))
                        .shallow_clone()
                }
            };
            sliced = sliced
                .f_index_select(dim, &index)
                .with_context(|| format!("slicing tensor {name} along dim {dim}"))?;
        }
        out.insert(name.clone(), sliced.contiguous());
    }
    for name in expected.keys() {
        if !out.contains_key(name) {
            bail!("tensor {name} is missing from the checkpoint");
        }
    }
    Ok((new_config, out))
}

/// Parameter counts of a dry run, no weights involved.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DryRun {
    pub params_before: u64,
    pub params_after: u64,
    pub hidden_size: usize,
    pub intermediate_size: usize,
}

/// Shapes and parameter counts of pruning `config` to the given widths.
pub fn dry_run(
    config: &ModelConfig,
    width_hidden: Width,
    width_intermediate: Width,
    round_to: Option<usize>,
) -> Result<(ModelConfig, DryRun)> {
    let hidden = kept_width(config.hidden_size, width_hidden, round_to).context("hidden width")?;
    let inter = kept_width(config.intermediate_size, width_intermediate, round_to).context("intermediate width")?;
    let pruned = prune_config(config, hidden, inter)?;
    let report = DryRun {
        params_before: config.param_count(),
        params_after: pruned.param_count(),
        hidden_size: hidden,
        intermediate_size: inter,
    };
    Ok((pruned, report))
}
