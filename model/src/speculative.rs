//! Lossless two-stage decoding: the OverFill decoder drafts, the full model verifies
//! (speculative decoding with a drafter that reads the full model's own KV cache).
//!
//! One round: the decoder proposes up to K tokens, one forward step each, over the shared cache;
//! the cache is cut back over the decoder's slots and the full model runs the newest token and
//! the K drafts in one forward pass (as a `--refresh-every` refresh: its own K/V replace the
//! decoder's); it keeps the longest prefix of drafts it agrees with and adds one token of its
//! own; the cache is cut back to what was kept. Greedy: a draft is kept while it is the full
//! model's argmax, so the output is the full model's greedy output. Sampling: the acceptance
//! rule of speculative sampling (Leviathan et al. 2023, Chen et al. 2023) — keep draft x with
//! probability min(1, p(x)/q(x)), else draw from norm(max(0, p - q)) and stop; when all are
//! kept, draw one more from p — so every token is distributed as the full model's sampler
//! (p and q both after temperature, top-k and top-p).
//!
//! Batches: rows keep different numbers of drafts. The cache's slots are shared by the batch, so
//! a round keeps as many slots as the row that kept most, and masks out (attention mask 0) the
//! slots the other rows rejected; each row's rope positions count its own tokens only.
//!
//! Shapes: B rows, K drafts this round, V vocab.
use std::time::Instant;

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use crate::generate::{
    emit, left_pad, prefill, GenerateOptions, GenerationOutput, OnToken, Prefill,
};
use crate::kv_cache::KvCache;
use crate::sampling::{Sampler, Sampling};
use crate::transformer::Transformer;

/// What the drafts bought in one generation.
#[derive(Debug, Clone, Default)]
pub struct SpeculativeStats {
    /// Drafts proposed per round at most (K).
    pub draft_len: usize,
    /// Full-model forward passes that verified drafts (the prefill is not counted).
    pub verifications: usize,
    /// Rows verified, summed over the verifications (rows that had stopped are not counted).
    pub row_verifications: usize,
    /// Draft tokens proposed to the full model, summed over rows.
    pub proposed: usize,
    /// Draft tokens the full model kept, summed over rows.
    pub accepted: usize,
    /// Wall time of the decoder's draft steps and of the full model's verification passes
    /// (together `decode_seconds`, up to bookkeeping). On CUDA the split is approximate: drafting
    /// never waits for the device, the verification's host copy does.
    pub draft_seconds: f64,
    pub verify_seconds: f64,
}

impl SpeculativeStats {
    /// Adds another generation's counts and times (same `draft_len`), e.g. over batches.
    pub fn add(&mut self, other: &SpeculativeStats) {
        self.verifications += other.verifications;
        self.row_verifications += other.row_verifications;
        self.proposed += other.proposed;
        self.accepted += other.accepted;
        self.draft_seconds += other.draft_seconds;
        self.verify_seconds += other.verify_seconds;
    }

    /// Accepted / proposed draft tokens (0 when none were proposed).
    pub fn acceptance_rate(&self) -> f64 {
        ratio(self.accepted, self.proposed)
    }

    /// Drafts kept per row and verification; each verification adds one token of the full model's
    /// own besides.
    pub fn mean_accepted_per_verification(&self) -> f64 {
        ratio(self.accepted, self.row_verifications)
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// The decoder's proposals of one round.
struct Drafts {
    /// [B, K] i64
    ids: Tensor,
    /// [B, K, V] f32: the distributions the drafts were drawn from (sampling only).
    probs: Option<Tensor>,
}

/// The full model's verdict on one round's drafts.
struct Verdict {
    /// [B] i64: drafts kept per row (a prefix).
    accepted: Tensor,
    /// [B] i64: the full model's own token after the kept drafts.
    next: Tensor,
}

/// How a round chooses tokens: one sampler for the whole batch (`generate`: one seed, one
/// generator), or one per row (`overfill serve`: every request has its own temperature, top-k,
/// top-p and seed). A greedy row among sampled ones goes through the sampling rule with one-hot
/// distributions, which keeps a draft exactly when it is the full model's argmax and otherwise
/// takes the argmax: the greedy answer, token for token.
pub enum RowSamplers<'a> {
    Batch(&'a mut Sampler),
    PerRow(Vec<&'a mut Sampler>),
}

impl RowSamplers<'_> {
    fn all_greedy(&self) -> bool {
        match self {
            RowSamplers::Batch(s) => *s.sampling() == Sampling::Greedy,
            RowSamplers::PerRow(rows) => rows.iter().all(|s| *s.sampling() == Sampling::Greedy),
        }
    }

    /// logits [B, N, V] -> each row's distributions [B, N, V] f32 (`Sampler::probabilities`).
    fn probabilities(&self, logits: &Tensor) -> Tensor {
        let (rows, n, vocab) = logits.size3().expect("logits [B, N, V]");
        match self {
            RowSamplers::Batch(s) => s.probabilities(&logits.reshape([rows * n, vocab])).view([rows, n, vocab]),
            RowSamplers::PerRow(samplers) => {
                Tensor::stack(&samplers.iter().enumerate().map(|(b, s)| s.probabilities(&logits.get(b as i64))).collect::<Vec<_>>(), 0)
            }
        }
    }

    /// One token per row from weights [B, V] -> [B] i64, each row with its own generator.
    fn draw(&mut self, weights: &Tensor) -> Tensor {
        self.each_row(weights, Sampler::draw)
    }

    /// The first token after the prefill: logits [B, V] -> [B] i64 (`Sampler::choose`).
    fn choose(&mut self, logits: &Tensor) -> Tensor {
        self.each_row(logits, Sampler::choose)
    }

    /// `pick` over [B, V] -> [B]: with the batch's sampler at once, or row b ([1, V]) with row b's.
    fn each_row(&mut self, rows: &Tensor, mut pick: impl FnMut(&mut Sampler, &Tensor) -> Tensor) -> Tensor {
        match self {
            RowSamplers::Batch(s) => pick(s, rows),
            RowSamplers::PerRow(samplers) => {
                Tensor::cat(&samplers.iter_mut().enumerate().map(|(b, s)| pick(s, &rows.narrow(0, b as i64, 1))).collect::<Vec<_>>(), 0)
            }
        }
    }

    /// [B, K] uniforms, row b from row b's generator.
    fn uniforms(&mut self, rows: i64, k: i64, device: tch::Device) -> Tensor {
        match self {
            RowSamplers::Batch(s) => s.uniforms(rows, k, device),
            RowSamplers::PerRow(samplers) => Tensor::cat(&samplers.iter_mut().map(|s| s.uniforms(1, k, device)).collect::<Vec<_>>(), 0),
        }
    }
}

/// Speculative generation: `full` prefills and verifies, `drafter` proposes up to `draft_len`
/// tokens per round over the same cache. Called by `generate::generate` for
/// `DecodeOptions::speculative` (which checks that the two models fit together first; callers
/// of this function check with `generate::check_two_stage`).
/// `samplings`: one for the whole batch (its one generator draws for every row, as plain
/// `generate`), or one per row (each row with its own generator, as `overfill serve`).
pub fn generate_speculative(
    full: &Transformer,
    drafter: &Transformer,
    prompts: &[Vec<i64>],
    options: &GenerateOptions,
    samplings: &[Sampling],
    draft_len: usize,
    mut on_token: Option<OnToken>,
) -> Result<GenerationOutput> {
    let device = full.device();
    let batch = left_pad(prompts, options.pad_token_id, device)?;
    let rows = prompts.len();
    if samplings.len() != 1 && samplings.len() != rows {
        anyhow::bail!("{} samplings for {rows} prompts: give one for all or one per prompt", samplings.len());
    }
    let mut samplers: Vec<Sampler> = samplings.iter().cloned().map(Sampler::new).collect();
    let mut sampler = match samplers.as_mut_slice() {
        [one] => RowSamplers::Batch(one),
        per_row => RowSamplers::PerRow(per_row.iter_mut().collect()),
    };
    let mut output = GenerationOutput::empty(rows);
    let mut stats = SpeculativeStats {
        draft_len,
        ..SpeculativeStats::default()
    };

    let start = Instant::now();
    let Prefill {
        mut cache,
        last_logits,
        ..
    } = prefill(full, &batch)?;
    // The newest token of each row [B, 1]: chosen, not yet in the cache.
    let mut pending = sampler.choose(&last_logits).view([rows as i64, 1]);
    let first_ids = Vec::<i64>::try_from(&pending.view([-1]))?;
    output.prefill_seconds = start.elapsed().as_secs_f64();
    drop(last_logits);
    if options.max_new_tokens == 0 {
        output.speculative = Some(stats);
        return Ok(output);
    }
    let mut finished = vec![false; rows];
    for (row, &id) in first_ids.iter().enumerate() {
        finished[row] = emit(&mut output.token_ids[row], row, id, options, &mut on_token);
    }

    let mut mask = batch.attention_mask;
    // Next rope position per row: its real length.
    let mut positions = mask.sum_dim_intlist(1, true, Kind::Int64); // [B, 1]
    let start = Instant::now();
    while finished.iter().any(|&f| !f) {
        // A row with r tokens still to generate can use r - 1 drafts (the full model adds one).
        let k = (0..rows)
            .filter(|&row| !finished[row])
            .map(|row| options.max_new_tokens - output.token_ids[row].len() - 1)
            .max()
            .unwrap_or(0)
            .min(draft_len);
        let active: Vec<bool> = finished.iter().map(|&f| !f).collect();
        let round = round(full, drafter, &mut cache, &mut sampler, &pending, &positions, &mask, k, &active)?;
        output.decode_steps += k;
        stats.draft_seconds += round.draft_seconds;
        stats.verify_seconds += round.verify_seconds;
        stats.verifications += 1;
        for (row, tokens) in round.tokens.iter().enumerate() {
            if finished[row] {
                continue;
            }
            stats.row_verifications += 1;
            stats.proposed += k;
            stats.accepted += tokens.len() - 1;
            for &id in tokens {
                finished[row] = emit(&mut output.token_ids[row], row, id, options, &mut on_token);
                if finished[row] {
                    break;
                }
            }
        }
        mask = round.mask;
        positions = positions + round.accepted.view([-1, 1]) + 1;
        pending = round.next.view([-1, 1]);
    }
    output.decode_seconds = start.elapsed().as_secs_f64();
    output.speculative = Some(stats);
    Ok(output)
}

/// One round's outcome.
pub struct Round {
    /// Per row: the drafts the full model kept, then its own next token (1 to K + 1 tokens).
    pub tokens: Vec<Vec<i64>>,
    /// [B] i64: drafts kept per row.
    pub accepted: Tensor,
    /// [B] i64: the full model's own token after the kept drafts (not yet in the cache: the next
    /// round's newest token).
    pub next: Tensor,
    /// [B, slots] the cache's attention mask after the round (rejected slots masked out).
    pub mask: Tensor,
    pub draft_seconds: f64,
    pub verify_seconds: f64,
}

/// One round of speculative decoding over a running batch: `drafter` proposes `k` tokens after
/// each row's newest token `pending` [B, 1] (at rope positions `positions` [B, 1], attending to
/// the cache under `mask` [B, slots]), `full` verifies them in one pass and keeps, per row, the
/// prefix it agrees with (greedy) or accepts by the speculative-sampling rule, plus its own next
/// token. The cache ends holding the newest tokens and the kept drafts (rows that kept fewer than
/// the most have the difference masked out). Only `active` rows decide how many slots are kept;
/// the others' tokens are computed but meaningless to the caller. Used by `generate` and by
/// `overfill serve --speculative`.
#[allow(clippy::too_many_arguments)]
pub fn round(
    full: &Transformer,
    drafter: &Transformer,
    cache: &mut KvCache,
    sampler: &mut RowSamplers,
    pending: &Tensor,
    positions: &Tensor,
    mask: &Tensor,
    k: usize,
    active: &[bool],
) -> Result<Round> {
    let device = full.device();
    let base = cache.len();
    let step = Instant::now();
    let drafts = draft(drafter, cache, sampler, pending, positions, mask, k)?;
    let draft_seconds = step.elapsed().as_secs_f64();

    let step = Instant::now();
    cache.truncate(base)?;
    let tokens = Tensor::cat(&[pending, &drafts.ids], 1); // [B, K + 1]
    let logits = full
        .forward_sampled(
            &tokens,
            &(positions + Tensor::arange(k as i64 + 1, (Kind::Int64, device))),
            &Tensor::cat(&[mask, &tokens.ones_like()], 1),
            cache,
        )
        .context("verification by the full model")?; // [B, K + 1, V]
    let verdict = verify(sampler, &logits, &drafts)?;
    // One device→host copy per round: the drafts, the counts kept and the next tokens.
    let host = Vec::<i64>::try_from(
        &Tensor::cat(&[&drafts.ids, &verdict.accepted.view([-1, 1]), &verdict.next.view([-1, 1])], 1).view([-1]),
    )?;
    let verify_seconds = step.elapsed().as_secs_f64();

    // Each row's new tokens: its kept drafts, then the full model's own.
    let mut kept_slots = 1;
    let mut new_tokens = Vec::with_capacity(active.len());
    for (row, row_host) in host.chunks(k + 2).enumerate() {
        let accepted = row_host[k] as usize;
        if active.get(row).copied().unwrap_or(true) {
            kept_slots = kept_slots.max(accepted + 1);
        }
        new_tokens.push(row_host[..accepted].iter().chain([&row_host[k + 1]]).copied().collect());
    }
    // Row b keeps its newest token and its accepted drafts: slots base..=base+accepted[b].
    let mask = keep_accepted_slots(cache, mask, base, kept_slots, &verdict.accepted)?;
    Ok(Round {
        tokens: new_tokens,
        accepted: verdict.accepted,
        next: verdict.next,
        mask,
        draft_seconds,
        verify_seconds,
    })
}

/// The decoder's `k` proposals after `pending` [B, 1], one forward step each: it writes `k` cache
/// slots (the caller cuts them off again) and does not wait for the device.
fn draft(
    drafter: &Transformer,
    cache: &mut KvCache,
    sampler: &mut RowSamplers,
    pending: &Tensor,
    positions: &Tensor,
    mask: &Tensor,
    k: usize,
) -> Result<Drafts> {
    let sample = !sampler.all_greedy();
    let (mut ids, mut probs) = (Vec::with_capacity(k), Vec::with_capacity(k));
    let mut mask = mask.shallow_clone();
    let mut fed = pending.shallow_clone();
    for i in 0..k {
        mask = Tensor::cat(&[&mask, &fed.ones_like()], 1);
        let logits = drafter
            .forward_sampled(&fed, &(positions + i as i64), &mask, cache)
            .context("draft step by the decoder")?
            .select(1, 0); // [B, V]
        let next = if sample {
            let q = sampler.probabilities(&logits.unsqueeze(1)).squeeze_dim(1); // [B, V]
            let next = sampler.draw(&q);
            probs.push(q);
            next
        } else {
            logits.argmax(-1, false)
        };
        fed = next.view([-1, 1]);
        ids.push(fed.shallow_clone());
    }
    let ids = if ids.is_empty() {
        pending.narrow(1, 0, 0)
    } else {
        Tensor::cat(&ids, 1)
    };
    let probs = (!probs.is_empty()).then(|| Tensor::stack(&probs, 1));
    Ok(Drafts { ids, probs })
}

/// The full model's logits [B, K + 1, V] over the newest token and the drafts -> which drafts it
/// keeps and its own next token.
fn verify(sampler: &mut RowSamplers, logits: &Tensor, drafts: &Drafts) -> Result<Verdict> {
    let (rows, k) = (drafts.ids.size()[0], drafts.ids.size()[1]);
    let vocab = logits.size()[2];
    if sampler.all_greedy() {
        let choices = logits.argmax(-1, false); // [B, K + 1]
        let agree = drafts.ids.eq_tensor(&choices.narrow(1, 0, k));
        let accepted = kept_prefix(&agree);
        let next = choices.gather(1, &accepted.view([-1, 1]), false).view([-1]);
        return Ok(Verdict { accepted, next });
    }
    let p = sampler.probabilities(logits); // [B, K + 1, V]
    // Without drafts (k = 0) the full model just samples its next token.
    let q = match &drafts.probs {
        Some(q) => Tensor::cat(&[q, &p.narrow(1, 0, 1).zeros_like()], 1),
        None => p.zeros_like(),
    }; // [B, K + 1, V], zeros after the last draft
    let at_drafts = |probs: &Tensor| {
        probs
            .narrow(1, 0, k)
            .gather(2, &drafts.ids.unsqueeze(-1), false)
            .squeeze_dim(-1)
    }; // [B, K]
       // Keep draft x with probability min(1, p(x) / q(x)): u < p/q, with q(x) > 0 (x was drawn).
    let u = sampler.uniforms(rows, k, logits.device());
    let accepted = kept_prefix(&(u * at_drafts(&q)).lt_tensor(&at_drafts(&p)));
    let at_accepted = |probs: &Tensor| {
        probs
            .gather(
                1,
                &accepted.view([-1, 1, 1]).expand([rows, 1, vocab], false),
                false,
            )
            .squeeze_dim(1)
    }; // [B, V]
       // After a rejection: norm(max(0, p - q)); after all K drafts: p (q is zero there). A residual
       // with no mass (p = q up to rounding, so rejecting had probability ~0) falls back to p.
    let residual = at_accepted(&(&p - &q).clamp_min(0.0));
    let has_mass = residual.sum_dim_intlist(-1, true, Kind::Float).gt(0.0);
    let weights = residual.where_self(&has_mass, &at_accepted(&p));
    let next = sampler.draw(&weights);
    Ok(Verdict { accepted, next })
}

/// agree [B, K] bool -> [B] i64: the number of leading trues per row.
fn kept_prefix(agree: &Tensor) -> Tensor {
    agree
        .to_kind(Kind::Int64)
        .cumprod(1, Kind::Int64)
        .sum_dim_intlist(1, false, Kind::Int64)
}

/// After a verification wrote slots base..base+K+1: keeps `kept_slots` of them and masks out,
/// per row, those beyond its newest token and accepted drafts. Returns the new attention mask
/// [B, base + kept_slots] (also the cache's).
fn keep_accepted_slots(
    cache: &mut KvCache,
    mask: &Tensor,
    base: usize,
    kept_slots: usize,
    accepted: &Tensor,
) -> Result<Tensor> {
    cache.truncate(base + kept_slots)?;
    let slot = Tensor::arange(kept_slots as i64, (Kind::Int64, mask.device())).view([1, -1]);
    let real = slot.le_tensor(&accepted.view([-1, 1])).to_kind(Kind::Int64); // [B, kept_slots]
    let mask = Tensor::cat(&[mask, &real], 1);
    cache.set_attention_mask(&mask);
    Ok(mask)
}
