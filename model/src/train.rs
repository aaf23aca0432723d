//! What one training step computes on the model side: the (context, target) batch as tensors,
//! the full model / decoder compatibility check, the summed token cross-entropy of the three
//! training modes, and the trainable model's parameters.
//!
//! OverFill: the frozen full model prefills the context x (no grad) and its per-layer K/V are
//! handed to the decoder, which runs over y0..y(N-1) at positions |x|..|x|+N-1 and is scored on
//! y1..yN. The Pruned/SFT baselines run one trainable model over x ‖ y0..y(N-1) and are scored on
//! the same tokens, so the losses of all modes compare.
//!
//! Shapes: B rows, Tc context width (left-padded), N target width (right-padded), D hidden,
//! V vocab, M predicted tokens in the batch.
use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Reduction, Tensor};

use crate::config::ModelConfig;
use crate::transformer::{backward_with_gradient, SpanTokens, Transformer};

/// Label of a position that predicts nothing (padding); the value transformers uses.
pub const IGNORE_INDEX: i64 = -100;

/// Token id written into padding slots (never attended to, never scored).
const PAD_ID: i64 = 0;

/// Largest block of f32 logits the loss computes at once, in bytes.
///
/// On the CPU 30 MiB ([245, V] rows for a 32k vocabulary, [61, V] for Llama 3's 128k): below
/// glibc's largest mmap threshold (32 MiB), so a block's memory comes from the heap and is reused
/// (the trainer's `keep_freed_memory`) instead of being mapped and faulted in again every step.
/// On a GPU 1 GiB: every block reads the whole [V, D] LM head again, so blocks of a few dozen
/// rows would make its matmul memory-bound; the block only bounds the temporaries.
pub fn logits_block_bytes(device: Device) -> i64 {
    match device {
        Device::Cpu => 30 << 20,
        _ => 1 << 30,
    }
}

/// (context, target) rows as tensors. Context left-padded, target right-padded (pad id 0).
#[derive(Debug)]
pub struct TrainBatch {
    /// [B, Tc] i64
    pub context_ids: Tensor,
    /// [B, Tc] i64, 1 = real token
    pub context_mask: Tensor,
    /// [B, Tc] i64, cumsum(mask) - 1, padding clamped to 0
    pub context_positions: Tensor,
    /// [Rc] i64: the flat indices (row · Tc + j) of the real context slots, found on the host
    pub context_real: Tensor,
    /// [B, N] i64: y0..y(N-1) of each row, right-padded
    pub target_inputs: Tensor,
    /// [B, N] i64
    pub target_mask: Tensor,
    /// [B, N] i64: |x_row| + j
    pub target_positions: Tensor,
    /// [B, N] i64: y1..yN, IGNORE_INDEX on padding
    pub labels: Tensor,
    /// [M] i64: the flat indices (row · N + j) of the labels != IGNORE_INDEX, found on the host;
    /// also the real target slots (the target inputs y0..y(N-1) are exactly the scored positions)
    pub scored: Tensor,
    /// labels != IGNORE_INDEX, counted on the host
    pub predicted_tokens: i64,
    /// The largest token id in the context, target inputs and labels (checked against the
    /// models' vocabulary on the host, so that a step does not wait for the device to check it).
    pub max_token_id: i64,
}

impl TrainBatch {
    /// rows: (context ids, target ids y0..yN). Errors: no rows, an empty context, an empty
    /// target. A target of one token (only y0) predicts nothing; allowed (its row is padding).
    pub fn from_rows(rows: &[(&[u32], &[u32])], device: Device) -> Result<TrainBatch> {
        if rows.is_empty() {
            bail!("a training batch needs at least one row");
        }
        for (i, (context, target)) in rows.iter().enumerate() {
            if context.is_empty() {
                bail!("row {i} of the batch has an empty context");
            }
            if target.is_empty() {
                bail!("row {i} of the batch has an empty target");
            }
        }
        let b = rows.len();
        let tc = rows.iter().map(|(c, _)| c.len()).max().unwrap_or(1);
        // At least one column, so that a batch of one-token targets still has a span to run.
        let n = rows
            .iter()
            .map(|(_, t)| t.len() - 1)
            .max()
            .unwrap_or(0)
            .max(1);

        let mut context_ids = vec![PAD_ID; b * tc];
        let mut context_mask = vec![0i64; b * tc];
        let mut context_positions = vec![0i64; b * tc];
        let mut target_inputs = vec![PAD_ID; b * n];
        let mut target_mask = vec![0i64; b * n];
        let mut target_positions = vec![0i64; b * n];
        let mut labels = vec![IGNORE_INDEX; b * n];
        let mut context_real = Vec::new();
        let mut scored = Vec::new();
        for (row, (context, target)) in rows.iter().enumerate() {
            let start = row * tc + tc - context.len();
            for (j, &id) in context.iter().enumerate() {
                context_ids[start + j] = id as i64;
                context_mask[start + j] = 1;
                context_positions[start + j] = j as i64;
                context_real.push((start + j) as i64);
            }
            let start = row * n;
            for j in 0..target.len() - 1 {
                target_inputs[start + j] = target[j] as i64;
                target_mask[start + j] = 1;
                labels[start + j] = target[j + 1] as i64;
                scored.push((start + j) as i64);
            }
            for j in 0..n {
                target_positions[start + j] = (context.len() + j) as i64;
            }
        }
        let max_token_id = rows
            .iter()
            .flat_map(|(context, target)| context.iter().chain(target.iter()))
            .max()
            .map_or(0, |&id| id as i64);
        let tensor = |values: &[i64], width: usize| {
            Tensor::from_slice(values)
                .view([b as i64, width as i64])
                .to_device(device)
        };
        Ok(TrainBatch {
            context_ids: tensor(&context_ids, tc),
            context_mask: tensor(&context_mask, tc),
            context_positions: tensor(&context_positions, tc),
            context_real: Tensor::from_slice(&context_real).to_device(device),
            target_inputs: tensor(&target_inputs, n),
            target_mask: tensor(&target_mask, n),
            target_positions: tensor(&target_positions, n),
            labels: tensor(&labels, n),
            predicted_tokens: scored.len() as i64,
            scored: Tensor::from_slice(&scored).to_device(device),
            max_token_id,
        })
    }

    pub fn to_device(&self, device: Device) -> TrainBatch {
        TrainBatch {
            context_ids: self.context_ids.to_device(device),
            context_mask: self.context_mask.to_device(device),
            context_positions: self.context_positions.to_device(device),
            context_real: self.context_real.to_device(device),
            target_inputs: self.target_inputs.to_device(device),
            target_mask: self.target_mask.to_device(device),
            target_positions: self.target_positions.to_device(device),
            labels: self.labels.to_device(device),
            scored: self.scored.to_device(device),
            predicted_tokens: self.predicted_tokens,
            max_token_id: self.max_token_id,
        }
    }

    pub fn rows(&self) -> i64 {
        self.context_ids.size()[0]
    }
}

/// Refuses a decoder that cannot read the full model's cache: layers, attention heads, KV heads,
/// head_dim, rope settings (theta and scaling) and vocabulary must agree. The error lists every
/// field that differs with both values.
pub fn check_compatible(full: &ModelConfig, decoder: &ModelConfig) -> Result<()> {
    let fields: [(&str, String, String); 7] = [
        (
            "num_hidden_layers",
            full.num_hidden_layers.to_string(),
            decoder.num_hidden_layers.to_string(),
        ),
        (
            "num_attention_heads",
            full.num_attention_heads.to_string(),
            decoder.num_attention_heads.to_string(),
        ),
        (
            "num_key_value_heads",
            full.num_key_value_heads.to_string(),
            decoder.num_key_value_heads.to_string(),
        ),
        (
            "head_dim",
            full.head_dim.to_string(),
            decoder.head_dim.to_string(),
        ),
        (
            "rope_theta",
            full.rope_theta.to_string(),
            decoder.rope_theta.to_string(),
        ),
        (
            "rope_scaling",
            format!("{:?}", full.rope_scaling),
            format!("{:?}", decoder.rope_scaling),
        ),
        (
            "vocab_size",
            full.vocab_size.to_string(),
            decoder.vocab_size.to_string(),
        ),
    ];
    let mismatches: Vec<String> = fields
        .iter()
        .filter(|(_, f, d)| f != d)
        .map(|(name, f, d)| format!("{name}: full model {f}, decoder {d}"))
        .collect();
    if !mismatches.is_empty() {
        bail!(
            "the decoder cannot read the full model's KV cache: {}",
            mismatches.join("; ")
        );
    }
    Ok(())
}

/// What the decoder runs over in one training step, after the checks (and, in OverFill mode, the
/// frozen full model's prefill).
struct DecoderInputs {
    /// [B, T] ids, positions; [B, P + T] mask.
    ids: Tensor,
    positions: Tensor,
    mask: Tensor,
    /// OverFill: the full model's per-layer K/V of the context, [B, KV, Tc, hd] each.
    past: Option<Vec<(Tensor, Tensor)>>,
    /// [R] flat indices of the real slots of ids.
    real: Tensor,
    /// The target's columns within T: Pruned/SFT run context ‖ target (Tc, N); OverFill only
    /// the target (0, N).
    target_columns: (i64, i64),
}

impl DecoderInputs {
    /// OverFill (`full = Some`): the full model prefills the context without grad and the
    /// decoder runs over target_inputs at target_positions, attending to that K/V first. Pruned/SFT
    /// (`full = None`): the decoder runs over context ‖ target_inputs in one pass.
    fn new(decoder: &Transformer, full: Option<&Transformer>, batch: &TrainBatch) -> Result<Self> {
        let device = decoder.device();
        if batch.context_ids.device() != device {
            bail!(
                "the batch is on {:?}, the decoder on {device:?}",
                batch.context_ids.device()
            );
        }
        // The ids are range-checked here, on the host, so the forward passes need not wait for
        // the device to check them again; they compute the real slots only (padding costs
        // nothing in the projections and MLPs).
        let vocab = decoder.config.vocab_size as i64;
        if batch.max_token_id >= vocab {
            bail!(
                "token id {} of the batch is outside the decoder's vocabulary of {vocab}",
                batch.max_token_id
            );
        }
        let target_width = batch.target_inputs.size()[1];
        match full {
            Some(full) => {
                check_compatible(&full.config, &decoder.config)?;
                if full.device() != device {
                    bail!(
                        "the full model is on {:?}, the decoder on {device:?}",
                        full.device()
                    );
                }
                let past = full
                    .prefill_kv_with(
                        &batch.context_ids,
                        &batch.context_positions,
                        &batch.context_mask,
                        SpanTokens::Real(&batch.context_real),
                    )
                    .context("full-model prefill of the context")?;
                Ok(DecoderInputs {
                    ids: batch.target_inputs.shallow_clone(),
                    positions: batch.target_positions.shallow_clone(),
                    mask: Tensor::cat(&[&batch.context_mask, &batch.target_mask], 1),
                    past: Some(past),
                    real: batch.scored.shallow_clone(),
                    target_columns: (0, target_width),
                })
            }
            None => {
                let context_width = batch.context_ids.size()[1];
                // The real slots of context ‖ target: row · (Tc + N) + j.
                let width = context_width + target_width;
                let (context, target) = (&batch.context_real, &batch.scored);
                let real = Tensor::cat(
                    &[
                        context.floor_divide_scalar(context_width) * width
                            + context.remainder(context_width),
                        target.floor_divide_scalar(target_width) * width
                            + context_width
                            + target.remainder(target_width),
                    ],
                    0,
                );
                Ok(DecoderInputs {
                    ids: Tensor::cat(&[&batch.context_ids, &batch.target_inputs], 1),
                    positions: Tensor::cat(&[&batch.context_positions, &batch.target_positions], 1),
                    mask: Tensor::cat(&[&batch.context_mask, &batch.target_mask], 1),
                    past: None,
                    real,
                    target_columns: (context_width, target_width),
                })
            }
        }
    }

    /// The decoder's final hidden states with autograd on, [B, T, D].
    fn hidden(&self, decoder: &Transformer) -> Result<Tensor> {
        decoder
            .forward_train_hidden(
                &self.ids,
                &self.positions,
                &self.mask,
                self.past.as_deref(),
                SpanTokens::Real(&self.real),
            )
            .context("decoder forward")
    }

    /// The final hidden states [B, T, D] -> those of the M scored positions [M, D]: only they go
    /// through the LM head (padding costs no [.., V] logits).
    fn scored_hidden(&self, hidden: &Tensor, batch: &TrainBatch) -> Tensor {
        let (first, width) = self.target_columns;
        let d = hidden.size()[2];
        hidden.narrow(1, first, width).reshape([-1, d]).index_select(0, &batch.scored)
    }
}

/// Sum (f32 scalar, differentiable w.r.t. the decoder's parameters) of the token cross-entropies
/// over the batch's labels.
///
/// `full = Some(frozen model)`: OverFill — the full model prefills the context without grad,
/// the decoder runs over target_inputs at target_positions attending to that K/V (read-only) and
/// causally to its own. `full = None`: the Pruned/SFT baselines — the decoder runs over
/// context ‖ target_inputs in one pass and only the target positions go through the LM head.
/// Both score exactly the tokens y1..yN. Divide by the step's predicted tokens for the loss.
/// (Training uses `backward_loss_sum`, which frees each block of logits as it goes.)
pub fn loss_sum(
    decoder: &Transformer,
    full: Option<&Transformer>,
    batch: &TrainBatch,
) -> Result<Tensor> {
    let inputs = DecoderInputs::new(decoder, full, batch)?;
    let hidden = inputs.scored_hidden(&inputs.hidden(decoder)?, batch); // [M, D]
    let labels = batch.labels.view([-1]).index_select(0, &batch.scored); // [M]
    cross_entropy_sum(decoder, &hidden, &labels, logits_block_rows(decoder))
}

/// One micro-batch of a training step: `loss_sum`'s forward and its backward, the gradient of
/// `scale` × the sum added into the decoder's `.grad`s (the trainer's scale is 1 / the step's
/// predicted tokens). Returns the unscaled sum, detached.
///
/// The LM head and the loss run in blocks of rows (`logits_block_bytes`), each block's backward
/// right after its forward, so at most one block of [rows, V] logits and their log-softmax exist
/// at a time. With `activation_checkpointing` the decoder's layers keep only their inputs and
/// recompute their activations in the backward (`Transformer::backward_recomputing`); the
/// gradients equal those without it.
pub fn backward_loss_sum(
    decoder: &Transformer,
    full: Option<&Transformer>,
    batch: &TrainBatch,
    scale: f64,
    activation_checkpointing: bool,
) -> Result<Tensor> {
    let inputs = DecoderInputs::new(decoder, full, batch)?;
    if batch.predicted_tokens == 0 {
        return Ok(Tensor::zeros([], (Kind::Float, decoder.device())));
    }
    let labels = batch.labels.view([-1]).index_select(0, &batch.scored); // [M]
    let rows = logits_block_rows(decoder);
    let mut head = |hidden: &Tensor| -> Result<Tensor> {
        let scored = inputs.scored_hidden(hidden, batch); // [M, D]
        let (sum, grad) = cross_entropy_backward(decoder, &scored, &labels, rows, scale)?;
        backward_with_gradient(&scored, &grad)?;
        Ok(sum)
    };
    if activation_checkpointing {
        decoder.backward_recomputing(
            &inputs.ids,
            &inputs.positions,
            &inputs.mask,
            inputs.past.as_deref(),
            SpanTokens::Real(&inputs.real),
            &mut head,
        )
    } else {
        head(&inputs.hidden(decoder)?)
    }
}

/// Rows of [rows, V] f32 logits per block of the loss (`logits_block_bytes`).
fn logits_block_rows(decoder: &Transformer) -> i64 {
    let vocab = decoder.config.vocab_size as i64;
    (logits_block_bytes(decoder.device()) / (vocab * 4)).max(1)
}

/// `cross_entropy_sum` with each block's backward right after its forward: the LM head's gradient
/// goes into its `.grad`, and the gradient of `scale` × the sum with respect to `hidden` [M, D] is
/// returned beside the unscaled sum (detached).
fn cross_entropy_backward(
    decoder: &Transformer,
    hidden: &Tensor,
    labels: &Tensor,
    rows: i64,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let mut sums = Vec::new();
    let mut grads = Vec::new();
    for (hidden, labels) in hidden.detach().split(rows, 0).iter().zip(labels.split(rows, 0)) {
        let hidden = hidden.detach().set_requires_grad(true);
        let sum = cross_entropy_sum(decoder, &hidden, &labels, rows)?;
        (&sum * scale).f_backward().context("backward of the loss")?;
        sums.push(sum.detach());
        grads.push(hidden.grad());
    }
    Ok((Tensor::stack(&sums, 0).sum(Kind::Float), Tensor::cat(&grads, 0)))
}

/// Σ cross-entropy of the LM head's logits of `hidden` [M, D] against `labels` [M], computed
/// `rows` rows at a time.
fn cross_entropy_sum(
    decoder: &Transformer,
    hidden: &Tensor,
    labels: &Tensor,
    rows: i64,
) -> Result<Tensor> {
    let mut block_losses = Vec::new();
    for (hidden, labels) in hidden.split(rows, 0).iter().zip(labels.split(rows, 0)) {
        let logits = decoder.lm_head(hidden).to_kind(Kind::Float); // [rows, V]
        block_losses.push(logits.log_softmax(-1, Kind::Float).f_nll_loss::<&Tensor>(
            &labels,
            None,
            Reduction::Sum,
            IGNORE_INDEX,
        )?);
    }
    Ok(Tensor::stack(&block_losses, 0).sum(Kind::Float))
}

/// The trainable model's parameter handles.
impl Transformer {
    /// requires_grad on every parameter (tied embeddings stay one tensor).
    pub fn set_requires_grad(&self, on: bool) {
        for (_, p) in self.tensors() {
            // The handles share the model's tensors, so this flags the model's own.
            let _ = p.set_requires_grad(on);
        }
    }

    /// Parameters by HF name, handles that share storage and autograd identity with the model
    /// (so `p.grad()` is the model's gradient); `lm_head.weight` only when untied.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.tensors().into_iter().collect()
    }

    /// Overwrites parameter values in place (no grad) from HF-named tensors of the same shapes,
    /// casting to the model's dtype and device: the trainer's f32 master weights into the
    /// compute copy, and resume. Every parameter must be given; `lm_head.weight` of a tied
    /// model is ignored (as when loading); any other unknown name is an error.
    pub fn copy_parameters_from(&self, values: &BTreeMap<String, Tensor>) -> Result<()> {
        let params = self.tensors();
        for (name, p) in &params {
            let value = values
                .get(name)
                .with_context(|| format!("no value for parameter {name}"))?;
            if value.size() != p.size() {
                bail!(
                    "value for {name} has shape {:?}, the parameter {:?}",
                    value.size(),
                    p.size()
                );
            }
        }
        if let Some(extra) = values.keys().find(|n| {
            !params.contains_key(*n)
                && !(self.config.tie_word_embeddings && n.as_str() == "lm_head.weight")
        }) {
            bail!("value for {extra}, which is not a parameter of this model");
        }
        let _guard = tch::no_grad_guard();
        for (name, p) in &params {
            let mut p = p.shallow_clone();
            p.f_copy_(&values[name])
                .with_context(|| format!("copying parameter {name}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transformer::random_tensors;

    /// The loss in blocks of rows equals the one-block loss, and so do its gradients (the blocks
    /// of a real vocabulary are far larger than any reference test's batch).
    #[test]
    fn cross_entropy_in_blocks_equals_one_block() {
        let config = ModelConfig::from_json_str(
            r#"{"model_type":"llama","vocab_size":50,"hidden_size":16,"intermediate_size":32,
                "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":8,
                "rms_norm_eps":1e-5,"max_position_embeddings":64}"#,
        )
        .unwrap();
        let tensors = random_tensors(&config, 0.5, 3, Device::Cpu, Kind::Float).unwrap();
        let decoder = Transformer::from_tensors(config, tensors).unwrap();
        decoder.set_requires_grad(true);
        let head = &decoder
            .parameters()
            .into_iter()
            .find(|(n, _)| n == "lm_head.weight")
            .unwrap()
            .1;
        let labels = Tensor::from_slice(&[3i64, 49, 0, 7, 7, 21, 30]);
        let hidden = Tensor::randn([7, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut results = Vec::new();
        for rows in [7, 3, 1] {
            let loss = cross_entropy_sum(&decoder, &hidden, &labels, rows).unwrap();
            loss.backward();
            results.push((
                loss.double_value(&[]),
                hidden.grad().copy(),
                head.grad().copy(),
            ));
            tch::no_grad(|| {
                let _ = hidden.grad().zero_();
                let _ = head.grad().zero_();
            });
        }
        let (loss, hidden_grad, head_grad) = &results[0];
        assert!(*loss > 0.0);
        for (blocked_loss, blocked_hidden_grad, blocked_head_grad) in &results[1..] {
            assert!(
                (blocked_loss - loss).abs() < 1e-5 * loss,
                "{blocked_loss} vs {loss}"
            );
            let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
            assert!(diff(blocked_hidden_grad, hidden_grad) < 1e-5);
            assert!(diff(blocked_head_grad, head_grad) < 1e-5);
        }
    }
}
