//! The model's entry points (inference under `no_grad`, training with autograd, the frozen
//! prefill for another model) and the layer stack they share.
//!
//! Shapes: B batch, T new tokens, P past slots, S = P + T, R computed slots, D hidden,
//! KV key/value heads, hd head_dim, V vocab.
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::attention::KvSource;
use super::span::{Span, SpanTokens};
use super::{Tap, TapPoint, Transformer};
use crate::kv_cache::KvCache;

impl Transformer {
    /// Logits [B, T, V] (in the model's dtype).
    ///
    /// ids [B, T] i64; positions [B, T] i64 (rope positions, e.g. cumsum(mask) - 1);
    /// attention_mask [B, S] with S = cached slots + T (1 = real token, 0 = padding).
    /// With a cache, the step attends to the cached K/V first and appends its own.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let hidden = self.hidden(
            ids,
            positions,
            attention_mask,
            cache.into(),
            None,
            SpanTokens::Given,
        )?;
        Ok(self.lm_head(&hidden))
    }

    /// `forward` for a decode step whose ids were sampled from the logits of a model with this
    /// vocabulary (checked once, before generation, by `check_two_stage`): the per-step range check
    /// would copy two values from the device and wait for it, every token.
    pub fn forward_sampled(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let kv = KvSource::Cache(cache);
        let hidden = self.hidden(
            ids,
            positions,
            attention_mask,
            kv,
            None,
            SpanTokens::Sampled,
        )?;
        Ok(self.lm_head(&hidden))
    }

    /// `forward` without a cache that also reports the activations of every layer at the
    /// three `TapPoint`s (for calibration).
    pub fn forward_with_taps(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        tap: &mut dyn FnMut(usize, TapPoint, &Tensor),
    ) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let hidden = self.hidden(
            ids,
            positions,
            attention_mask,
            KvSource::None,
            Some(tap),
            SpanTokens::Given,
        )?;
        Ok(self.lm_head(&hidden))
    }

    /// Final hidden states [B, T, D] (after the last norm), without the LM head.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.hidden(
            ids,
            positions,
            attention_mask,
            cache.into(),
            None,
            SpanTokens::Given,
        )
    }

    /// Logits [B, T, V] with autograd on (training). ids/positions [B, T] i64;
    /// attention_mask [B, P + T]; `past`: per layer (K, V) [B, KV, P, hd] (e.g. another model's
    /// `prefill_kv`), only read: the span attends to them first, then causally to itself.
    pub fn forward_train(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        past: Option<&[(Tensor, Tensor)]>,
    ) -> Result<Tensor> {
        let hidden =
            self.forward_train_hidden(ids, positions, attention_mask, past, SpanTokens::Given)?;
        Ok(self.lm_head(&hidden))
    }

    /// `forward_train` without the LM head (final hidden states [B, T, D]), computing the slots
    /// `tokens` says (zeros at the others).
    pub(crate) fn forward_train_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        past: Option<&[(Tensor, Tensor)]>,
        tokens: SpanTokens,
    ) -> Result<Tensor> {
        self.hidden(ids, positions, attention_mask, KvSource::reading(past), None, tokens)
    }

    /// The frozen prefill (no grad): per layer (K, V) after RoPE, each [B, KV, T, hd] in the
    /// model's dtype, for another model's `forward_train`. Inputs as in `forward`.
    pub fn prefill_kv(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        self.prefill_kv_with(ids, positions, attention_mask, SpanTokens::Given)
    }

    /// `prefill_kv` computing the slots `tokens` says (K/V zeros at the others).
    pub(crate) fn prefill_kv_with(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        tokens: SpanTokens,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let _guard = tch::no_grad_guard();
        let (mut x, span) =
            self.embed_span(ids, positions, attention_mask, &KvSource::None, tokens)?;
        let mut kv = Vec::with_capacity(self.layers.len());
        // Every layer but the last runs whole, recording its K/V. The last layer's K/V depend only
        // on its input: its queries, attention output, MLP and the final norm would feed nothing.
        let Some((last, layers)) = self.layers.split_last() else {
            return Ok(kv);
        };
        let mut record = KvSource::Record(&mut kv);
        for (i, block) in layers.iter().enumerate() {
            x = block.forward(&x, &span, i, &mut record, &mut None);
        }
        kv.push(last.key_values(&x, &span));
        Ok(kv)
    }

    /// The LM head: hidden [.., D] -> logits [.., V].
    pub fn lm_head(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<&Tensor>(&self.lm_head, None)
    }

    /// The layer stack: final hidden states [B, T, D] (zeros at slots not computed). Autograd
    /// follows the caller's mode.
    fn hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        mut kv: KvSource,
        mut tap: Tap,
        tokens: SpanTokens,
    ) -> Result<Tensor> {
        let (mut x, span) = self.embed_span(ids, positions, attention_mask, &kv, tokens)?;
        if let KvSource::Cache(c) = &mut kv {
            c.set_attention_mask(&attention_mask.to_kind(Kind::Int64));
        }
        for (i, block) in self.layers.iter().enumerate() {
            x = block.forward(&x, &span, i, &mut kv, &mut tap);
        }
        if let KvSource::Cache(c) = kv {
            c.advance(span.tokens as usize);
        }
        Ok(span.unpack(&self.norm.forward(&x)))
    }

    /// After checking the inputs: the embeddings of the computed slots, [R, D] (or [B, T, D]
    /// when all are computed), and what all layers of the pass share.
    pub(super) fn embed_span(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        kv: &KvSource,
        tokens: SpanTokens,
    ) -> Result<(Tensor, Span)> {
        let past = self.check_inputs(ids, positions, attention_mask, kv, tokens)?;
        let span = Span::new(
            attention_mask,
            positions,
            past,
            &self.inv_freq,
            self.kind(),
            tokens,
        );
        Ok((self.embed(ids, &span), span))
    }

    /// The embeddings of the span's computed slots, [R, D] (or [B, T, D] when all are computed).
    pub(super) fn embed(&self, ids: &Tensor, span: &Span) -> Tensor {
        Tensor::embedding(&self.embed_tokens, &span.pack(ids), -1, false, false)
    }

    /// Checks the inputs so that the tensor ops cannot fail on user data; returns the number of
    /// past slots.
    fn check_inputs(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        attention_mask: &Tensor,
        kv: &KvSource,
        tokens: SpanTokens,
    ) -> Result<i64> {
        let ids_size = ids.size();
        if ids_size.len() != 2 || ids_size[1] == 0 {
            bail!("token ids must be [batch, tokens] with tokens > 0, got {ids_size:?}");
        }
        let (b, t) = (ids_size[0], ids_size[1]);
        if ids.kind() != Kind::Int64 || positions.kind() != Kind::Int64 {
            bail!(
                "token ids and positions must be i64, got {:?} and {:?}",
                ids.kind(),
                positions.kind()
            );
        }
        if positions.size() != ids_size {
            bail!(
                "positions {:?} must have the shape of the token ids {ids_size:?}",
                positions.size()
            );
        }
        let past = match kv {
            KvSource::Cache(c) => {
                if c.num_layers() != self.layers.len() {
                    bail!(
                        "KV cache has {} layers, the model {}",
                        c.num_layers(),
                        self.layers.len()
                    );
                }
                if let Some(cb) = c.batch_size() {
                    if cb != b {
                        bail!("KV cache holds a batch of {cb}, this step has {b} rows");
                    }
                }
                c.len() as i64
            }
            KvSource::Past(past) => self.check_past(past, b)?,
            KvSource::None | KvSource::Record(_) => 0,
        };
        if attention_mask.size() != [b, past + t] {
            bail!(
                "attention mask {:?} must be [batch, cached + new] = [{b}, {}]",
                attention_mask.size(),
                past + t
            );
        }
        for dev in [ids.device(), positions.device(), attention_mask.device()] {
            if dev != self.device() {
                bail!(
                    "inputs must be on the model's device {:?}, got {dev:?}",
                    self.device()
                );
            }
        }
        match tokens {
            SpanTokens::Given => {
                let (min, max) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
                if min < 0 || max >= self.config.vocab_size as i64 {
                    bail!(
                        "token id out of range [0, {}): min {min}, max {max}",
                        self.config.vocab_size
                    );
                }
            }
            SpanTokens::Sampled => {}
            SpanTokens::Real(real) => {
                let size = real.size();
                if real.kind() != Kind::Int64
                    || size.len() != 1
                    || size[0] > b * t
                    || real.device() != self.device()
                {
                    bail!(
                        "the real slots must be at most {} i64 indices on {:?}, got {:?} {size:?} on {:?}",
                        b * t,
                        self.device(),
                        real.kind(),
                        real.device()
                    );
                }
            }
        }
        Ok(past)
    }

    /// Past K/V for `forward_train`: one (K, V) per layer, all [B, KV, P, hd] with one P.
    fn check_past(&self, past: &[(Tensor, Tensor)], batch: i64) -> Result<i64> {
        if past.len() != self.layers.len() {
            bail!(
                "past K/V has {} layers, the model {}",
                past.len(),
                self.layers.len()
            );
        }
        let slots = past[0].0.size().get(2).copied().unwrap_or(0);
        let expected = [
            batch,
            self.config.num_key_value_heads as i64,
            slots,
            self.config.head_dim as i64,
        ];
        for (i, (k, v)) in past.iter().enumerate() {
            if k.size() != expected || v.size() != expected {
                bail!(
                    "past K/V of layer {i}: K {:?} and V {:?} must both be [batch, kv_heads, slots, head_dim] = {expected:?}",
                    k.size(),
                    v.size()
                );
            }
            if k.device() != self.device() || v.device() != self.device() {
                bail!(
                    "past K/V of layer {i} must be on the model's device {:?}",
                    self.device()
                );
            }
        }
        Ok(slots)
    }
}
