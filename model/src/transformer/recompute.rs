//! Training with activation recomputation (`[train] activation_checkpointing = true`): the
//! forward keeps only each layer's input; the backward runs layer by layer from the top,
//! recomputing one layer's activations with autograd on and sending the upstream gradient
//! through them. Peak activation memory falls from every layer's saved tensors to the layer
//! inputs plus one layer's; the price is a second forward of every layer.
//!
//! Dropout-free layers recompute exactly what the first forward computed, so the gradients equal
//! those of the plain backward.
//!
//! Shapes: B batch, T new tokens, R computed slots, D hidden.
use anyhow::{Context, Result};
use tch::Tensor;

use super::attention::KvSource;
use super::span::SpanTokens;
use super::Transformer;

impl Transformer {
    /// Forward and backward of the layer stack with recomputation. `head` receives the final
    /// hidden states [B, T, D] (after the last norm; zeros at slots not computed) with autograd
    /// on, and must run the backward from the loss into them; its result is returned. Then every
    /// layer's gradients, and the embedding's, are added into the parameters' `.grad`.
    ///
    /// Inputs as in `forward_train_hidden`; `past` (another model's K/V) is only read.
    pub(crate) fn backward_recomputing(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        past: Option<&[(Tensor, Tensor)]>,
        tokens: SpanTokens,
        head: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut kv = KvSource::reading(past);
        // Forward without a graph, keeping each layer's input ([R, D] each).
        let (mut x, span) = tch::no_grad(|| self.embed_span(ids, positions, attention_mask, &kv, tokens))?;
        let mut layer_inputs = Vec::with_capacity(self.layers.len());
        tch::no_grad(|| {
            for (i, block) in self.layers.iter().enumerate() {
                let output = block.forward(&x, &span, i, &mut kv, &mut None);
                layer_inputs.push(std::mem::replace(&mut x, output));
            }
        });

        // The final norm and whatever `head` computes, from the last layer's output as a leaf.
        let last = x.set_requires_grad(true);
        let result = head(&span.unpack(&self.norm.forward(&last))).context("the loss and its backward")?;
        let mut grad = last.grad();

        // Layer by layer from the top: recompute with a graph, send the gradient through.
        for (i, block) in self.layers.iter().enumerate().rev() {
            let input = layer_inputs.pop().context("one saved input per layer")?.set_requires_grad(true);
            let output = block.forward(&input, &span, i, &mut kv, &mut None);
            backward_with_gradient(&output, &grad).with_context(|| format!("recomputed backward of layer {i}"))?;
            grad = input.grad();
        }
        // The embedding again, now with a graph (the forward's ran without one).
        backward_with_gradient(&self.embed(ids, &span), &grad).context("backward of the embedding")?;
        Ok(result)
    }
}

/// Backward from `output` with upstream gradient `grad` (same shape). tch has no
/// `backward(gradient)`; the gradient of Σ(output ⊙ grad) with respect to `output` is exactly
/// `grad` (the sum's backward is ones, the product's multiplies them by `grad`).
pub(crate) fn backward_with_gradient(output: &Tensor, grad: &Tensor) -> Result<()> {
    (output * grad).sum(output.kind()).f_backward()?;
    Ok(())
}
