//! One decoder layer: x + attention(norm(x)), then x + mlp(norm(x)).
use tch::Tensor;

use super::attention::{Attention, KvSource};
use super::linear::RmsNorm;
use super::mlp::Mlp;
use super::span::Span;
use super::{Tap, TapPoint};

#[derive(Debug)]
pub(super) struct Block {
    pub(super) input_layernorm: RmsNorm,
    pub(super) self_attn: Attention,
    pub(super) post_attention_layernorm: RmsNorm,
    pub(super) mlp: Mlp,
}

impl Block {
    /// x [R, D] (or [B, T, D]) -> the same shape.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        span: &Span,
        layer: usize,
        kv: &mut KvSource,
        tap: &mut Tap,
    ) -> Tensor {
        let normed = self.input_layernorm.forward(x);
        if let Some(tap) = tap.as_mut() {
            tap(layer, TapPoint::AttnNormOut, &normed);
        }
        let x = x + self.self_attn.forward(&normed, span, layer, kv);
        let normed = self.post_attention_layernorm.forward(&x);
        if let Some(tap) = tap.as_mut() {
            tap(layer, TapPoint::MlpNormOut, &normed);
        }
        &x + self.mlp.forward(&normed, layer, tap)
    }

    /// Only this layer's K/V (after RoPE), each [B, KV, T, hd], for a prefill's last layer:
    /// its queries, attention output and MLP would feed nothing.
    pub(super) fn key_values(&self, x: &Tensor, span: &Span) -> (Tensor, Tensor) {
        self.self_attn
            .key_values(&self.input_layernorm.forward(x), span)
    }
}
