//! One forward pass's span of new tokens: which of its slots are computed, and what every layer
//! shares (the attention mask and the RoPE tables).
//!
//! Shapes: B rows, T new tokens, P past slots, S = P + T, R computed slots.
use tch::{Kind, Tensor};

use super::rope;

/// Which of a span's token ids a forward pass computes, and whether they still need the range
/// check against the vocabulary.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SpanTokens<'a> {
    /// Every slot; the ids come from a caller and are range-checked (which waits for the device).
    Given,
    /// Every slot; the ids were sampled from this vocabulary's logits (in range by construction:
    /// decoding must not wait for the device every token).
    Sampled,
    /// Only the real slots, [R] i64 flat indices (row · T + j): padding costs nothing in the
    /// projections and MLPs (attention sees zeros there, masked). The ids were range-checked by
    /// the caller on the host (training batches).
    Real(&'a Tensor),
}

/// What every layer of one forward pass shares.
#[derive(Debug)]
pub(super) struct Span {
    pub(super) rows: i64,
    pub(super) tokens: i64,
    /// [B, 1, T, S] bool, true = may attend.
    pub(super) mask: Tensor,
    /// [B, 1, T, hd] RoPE tables in the model's kind.
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    /// [R] i64 flat indices (row · T + j) of the computed slots; `None`: all B·T, and per-token
    /// activations keep their [B, T, ..] shape.
    real: Option<Tensor>,
}

impl Span {
    /// attention_mask [B, S] (1 = real token); positions [B, T]; `past` slots before the span.
    pub(super) fn new(
        attention_mask: &Tensor,
        positions: &Tensor,
        past: i64,
        inv_freq: &Tensor,
        kind: Kind,
        tokens: SpanTokens,
    ) -> Span {
        let device = attention_mask.device();
        let (rows, t) = (positions.size()[0], positions.size()[1]);
        // Query i (slot past+i) sees real slots j <= past+i, and always itself, so that padding
        // queries stay finite (their outputs are never used).
        let s = past + t;
        let query_slot = Tensor::arange_start(past, s, (Kind::Int64, device)).view([t, 1]);
        let key_slot = Tensor::arange(s, (Kind::Int64, device)).view([1, s]);
        let causal = key_slot.le_tensor(&query_slot); // [T, S]
        let diagonal = key_slot.eq_tensor(&query_slot);
        let real_keys = attention_mask.ne(0).view([-1, 1, 1, s]); // [B, 1, 1, S]
        let mask = real_keys.logical_and(&causal).logical_or(&diagonal);
        let (cos, sin) = rope::tables(inv_freq, positions, kind);
        let real = match tokens {
            SpanTokens::Real(real) => Some(real.shallow_clone()),
            SpanTokens::Given | SpanTokens::Sampled => None,
        };
        Span {
            rows,
            tokens: t,
            mask,
            cos,
            sin,
            real,
        }
    }

    /// Per-slot values [B, T, ..] -> those of the computed slots [R, ..] (unchanged when all
    /// slots are computed).
    pub(super) fn pack(&self, x: &Tensor) -> Tensor {
        match &self.real {
            None => x.shallow_clone(),
            Some(real) => x.flatten(0, 1).index_select(0, real),
        }
    }

    /// Values of the computed slots [R, F] -> [B, T, F], zeros at the other slots (unchanged
    /// when all slots are computed).
    pub(super) fn unpack(&self, x: &Tensor) -> Tensor {
        match &self.real {
            None => x.shallow_clone(),
            Some(real) => {
                let features = x.size()[1];
                Tensor::zeros([self.rows * self.tokens, features], (x.kind(), x.device()))
                    .index_copy(0, real, x)
                    .view([self.rows, self.tokens, features])
            }
        }
    }
}
