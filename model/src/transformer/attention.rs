//! Grouped-query self-attention with RoPE, and where it finds keys and values besides the span's
//! own (`KvSource`: none, the inference cache, a read-only past, or a record of the prefill).
//!
//! Shapes: B rows, T new tokens, R computed slots (see `Span`), P past slots, S = P + T,
//! D hidden, H query heads, KV key/value heads, hd head_dim.
use tch::Tensor;

use super::linear::Linear;
use super::rope;
use super::span::Span;
use crate::kv_cache::KvCache;

/// Where attention finds keys and values besides those of the span being run.
pub(super) enum KvSource<'a> {
    /// Only the span itself.
    None,
    /// The inference cache: each layer appends the span's K/V and attends to all slots.
    Cache(&'a mut KvCache),
    /// Training: per layer (K, V) [B, KV, P, hd] that are only read, concatenated with the
    /// span's own (a new tensor, so autograd flows into the span's K/V and never into past).
    Past(&'a [(Tensor, Tensor)]),
    /// Frozen prefill: no past; each layer's K/V after RoPE is pushed here.
    Record(&'a mut Vec<(Tensor, Tensor)>),
}

impl<'a> KvSource<'a> {
    /// Another model's per-layer K/V to attend to first (only read), or none.
    pub(super) fn reading(past: Option<&'a [(Tensor, Tensor)]>) -> Self {
        match past {
            Some(past) => KvSource::Past(past),
            None => KvSource::None,
        }
    }
}

impl<'a> From<Option<&'a mut KvCache>> for KvSource<'a> {
    fn from(cache: Option<&'a mut KvCache>) -> Self {
        match cache {
            Some(cache) => KvSource::Cache(cache),
            None => KvSource::None,
        }
    }
}

#[derive(Debug)]
pub(super) struct Attention {
    /// [H·hd, D]
    pub(super) q_proj: Linear,
    /// [KV·hd, D]
    pub(super) k_proj: Linear,
    /// [KV·hd, D]
    pub(super) v_proj: Linear,
    /// [D, H·hd]
    pub(super) o_proj: Linear,
    pub(super) num_heads: i64,
    pub(super) num_kv_heads: i64,
    pub(super) head_dim: i64,
}

impl Attention {
    /// x [R, D] (or [B, T, D]) -> [R, D] (or [B, T, D]).
    pub(super) fn forward(
        &self,
        x: &Tensor,
        span: &Span,
        layer: usize,
        kv: &mut KvSource,
    ) -> Tensor {
        let q = self.queries(x, span);
        let (k, v) = self.key_values(x, span);
        // [B, KV, S, hd]
        let (k, v) = match kv {
            KvSource::None => (k, v),
            KvSource::Cache(cache) => cache.append(layer, &k, &v),
            KvSource::Past(past) => {
                let (past_k, past_v) = &past[layer];
                (
                    Tensor::cat(&[&past_k.to_kind(k.kind()), &k], 2),
                    Tensor::cat(&[&past_v.to_kind(v.kind()), &v], 2),
                )
            }
            KvSource::Record(out) => {
                out.push((k.shallow_clone(), v.shallow_clone()));
                (k, v)
            }
        };
        let gqa = self.num_heads != self.num_kv_heads;
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(&span.mask),
            0.0,
            false,
            None,
            gqa,
        );
        // [B, H, T, hd] -> [B, T, H·hd] -> the computed slots
        let out =
            out.transpose(1, 2)
                .reshape([span.rows, span.tokens, self.num_heads * self.head_dim]);
        self.o_proj.forward(&span.pack(&out))
    }

    /// x [R, D] -> queries [B, H, T, hd] after RoPE (zeros at slots not computed).
    fn queries(&self, x: &Tensor, span: &Span) -> Tensor {
        let q = self.heads(&self.q_proj.forward(x), span, self.num_heads);
        rope::apply(&q, &span.cos, &span.sin)
    }

    /// x [R, D] -> the span's keys (after RoPE) and values, each [B, KV, T, hd].
    pub(super) fn key_values(&self, x: &Tensor, span: &Span) -> (Tensor, Tensor) {
        let k = self.heads(&self.k_proj.forward(x), span, self.num_kv_heads);
        let v = self.heads(&self.v_proj.forward(x), span, self.num_kv_heads);
        (rope::apply(&k, &span.cos, &span.sin), v)
    }

    /// [R, heads·hd] -> [B, heads, T, hd]
    fn heads(&self, x: &Tensor, span: &Span, heads: i64) -> Tensor {
        span.unpack(x)
            .view([span.rows, span.tokens, heads, self.head_dim])
            .transpose(1, 2)
    }
}
