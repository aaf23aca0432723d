//! The engine's decode step under `--speculative K`: one round of lossless two-stage decoding
//! for every running row, each verified with its own sampler (see the engine's module
//! documentation).
use std::time::Instant;

use anyhow::{bail, Context, Result};
use overfill_model::speculative::{self, RowSamplers};
use super::Engine;

impl Engine {
    /// One round of speculative decoding for the running rows: each gets its kept drafts and the
    /// full model's own token, 1 to K + 1 tokens.
    pub(super) fn speculative_step(&mut self, draft_len: usize) -> Result<()> {
        let Some(decoder) = self.models.decode.as_ref() else {
            bail!("internal: --speculative without a decoder");
        };
        let start = Instant::now();
        let (pending, positions) = self.newest_tokens();
        // A row with r tokens still to generate can use r - 1 drafts (the full model adds one).
        let k = self
            .rows
            .iter()
            .map(|r| r.sequence.params.max_tokens.saturating_sub(r.generated.len() + 1))
            .max()
            .unwrap_or(0)
            .min(draft_len);
        let Some(cache) = self.cache.as_mut() else {
            bail!("internal: running rows without a KV cache");
        };
        let Some(mask) = cache.attention_mask().map(|m| m.shallow_clone()) else {
            bail!("internal: a KV cache that was never written");
        };
        let active = vec![true; self.rows.len()];
        let mut samplers = RowSamplers::PerRow(self.rows.iter_mut().map(|r| &mut r.sampler).collect());
        let round = speculative::round(&self.models.prefill, decoder, cache, &mut samplers, &pending, &positions, &mask, k, &active)
            .context("speculative decode step")?;
        drop(samplers);
        let tokens: usize = round.tokens.iter().map(Vec::len).sum();
        self.record_decode_step(self.rows.len(), tokens, start);
        self.metrics.speculative_proposed.inc_by((k * self.rows.len()) as u64);
        self.metrics.speculative_accepted.inc_by((tokens - self.rows.len()) as u64);
        let mut batch = std::mem::take(&mut self.rows);
        for (row, new_tokens) in batch.iter_mut().zip(&round.tokens) {
            for &id in new_tokens {
                row.position += 1;
                self.accept_token(row, id);
                if row.finished {
                    break;
                }
            }
        }
        self.rows = batch;
        self.remove_done_rows()
    }
}
