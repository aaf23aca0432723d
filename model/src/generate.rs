//! Generation over a left-padded batch: one prefill pass over the prompts, then one-token
//! decode steps through the KV cache.
//!
//! The prefill and decode models may differ (OverFill: the full model prefills and its last
//! logit gives the first token, a pruned model with the same layers, KV heads and head_dim decodes
//! every later token from the full model's cache); `greedy` uses one model for both. With
//! `DecodeOptions::speculative` the decode model drafts and the prefill model verifies
//! (`crate::speculative`).
//!
//! Per decode step the only device→host copy is the chosen ids [B] (needed to stop rows and to
//! stream text); prefill runs the LM head on the last position only.
//!
//! Shapes: B rows, T prompt width (left-padded), S cached slots, D hidden, V vocab.
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::kv_cache::KvCache;
use crate::sampling::{Sampler, Sampling};
use crate::speculative::{generate_speculative, SpeculativeStats};
use crate::train::check_compatible;
use crate::transformer::Transformer;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Tokens generated per row at most (the first comes from the prefill pass).
    pub max_new_tokens: usize,
    /// A row stops after producing one of these (the eos token is kept in its output).
    pub eos_token_ids: Vec<i64>,
    /// Fed for padding and for rows that already stopped.
    pub pad_token_id: i64,
    /// Keep the prefill logits [B, T, V] (f32) in the output.
    pub keep_prompt_logits: bool,
}

impl GenerateOptions {
    /// Options for `model`: its config's eos ids, padding with the first eos id (or 0).
    pub fn for_model(model: &Transformer, max_new_tokens: usize) -> Self {
        let eos = model.config.eos_token_ids.clone();
        GenerateOptions {
            max_new_tokens,
            pad_token_id: eos.first().copied().unwrap_or(0),
            eos_token_ids: eos,
            keep_prompt_logits: false,
        }
    }
}

/// The stop ids of chat generation: the model's eos ids and the chat template's end-of-turn
/// token, each once.
pub fn eos_and_end_of_turn(eos_token_ids: &[i64], end_of_turn: Option<i64>) -> Vec<i64> {
    let mut ids = eos_token_ids.to_vec();
    if let Some(id) = end_of_turn.filter(|id| !ids.contains(id)) {
        ids.push(id);
    }
    ids
}

/// How tokens are chosen and whether the full model refreshes the decoder's cache entries.
#[derive(Debug, Clone, Default)]
pub struct DecodeOptions {
    pub sampling: Sampling,
    /// `Some(K)`: after the decode model has written K cache slots, the next step is run by the
    /// prefill (full) model over those K tokens and the newest one: it overwrites their K/V with
    /// its own and its last logit chooses the next token, as at prefill. Beyond the paper (its
    /// suggested remedy for long generations).
    pub refresh_every: Option<usize>,
    /// `Some(K)`: lossless two-stage decoding (`crate::speculative`): the decode model drafts up
    /// to K tokens over the shared cache, the prefill (full) model verifies them in one forward
    /// pass and keeps what it agrees with; the output is the prefill model's own (greedy: token
    /// for token; sampling: in distribution). Excludes `refresh_every`.
    pub speculative: Option<usize>,
}

#[derive(Debug)]
pub struct GenerationOutput {
    /// Generated ids per row (prompt excluded), ending at the first eos or max_new_tokens.
    pub token_ids: Vec<Vec<i64>>,
    /// Wall time of the prefill pass (including choosing the first token).
    pub prefill_seconds: f64,
    /// Wall time of all decode steps.
    pub decode_seconds: f64,
    /// Number of one-token decode forward passes.
    pub decode_steps: usize,
    /// Prefill logits [B, T, V] f32 when asked for (left-padded like the batch).
    pub prompt_logits: Option<Tensor>,
    /// Refresh steps run by the prefill model (`DecodeOptions::refresh_every`); their time is
    /// part of `decode_seconds` and also reported alone in `refresh_seconds`. They are not
    /// counted in `decode_steps`.
    pub refreshes: usize,
    pub refresh_seconds: f64,
    /// With `DecodeOptions::speculative`: what the drafts bought. `decode_steps` then counts the
    /// decode model's draft steps; `decode_seconds` covers drafting and verification.
    pub speculative: Option<SpeculativeStats>,
}

impl GenerationOutput {
    /// No tokens and no time yet, for `rows` rows.
    pub(crate) fn empty(rows: usize) -> Self {
        GenerationOutput {
            token_ids: vec![vec![]; rows],
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
            decode_steps: 0,
            prompt_logits: None,
            refreshes: 0,
            refresh_seconds: 0.0,
            speculative: None,
        }
    }

    pub fn decode_seconds_per_token(&self) -> f64 {
        if self.decode_steps == 0 {
            0.0
        } else {
            self.decode_seconds / self.decode_steps as f64
        }
    }
}

/// A left-padded batch: ids [B, T], attention_mask [B, T] (1 = real) and rope positions [B, T]
/// (cumsum(mask) - 1, padding at 0), as transformers' generate computes them.
pub struct PaddedBatch {
    pub ids: Tensor,
    pub attention_mask: Tensor,
    pub positions: Tensor,
}

pub fn left_pad(prompts: &[Vec<i64>], pad_token_id: i64, device: Device) -> Result<PaddedBatch> {
    if prompts.is_empty() {
        bail!("no prompts to generate from");
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {i} is empty");
    }
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = vec![pad_token_id; prompts.len() * width];
    let mut mask = vec![0i64; prompts.len() * width];
    for (row, prompt) in prompts.iter().enumerate() {
        let start = row * width + width - prompt.len();
        ids[start..start + prompt.len()].copy_from_slice(prompt);
        mask[start..start + prompt.len()]
            .iter_mut()
            .for_each(|m| *m = 1);
    }
    let shape = [prompts.len() as i64, width as i64];
    let ids = Tensor::from_slice(&ids).view(shape).to_device(device);
    let attention_mask = Tensor::from_slice(&mask).view(shape).to_device(device);
    let positions = (attention_mask.cumsum(1, Kind::Int64) - 1).clamp_min(0);
    Ok(PaddedBatch {
        ids,
        attention_mask,
        positions,
    })
}

/// Greedy generation with one model.
pub fn greedy(
    model: &Transformer,
    prompts: &[Vec<i64>],
    options: &GenerateOptions,
) -> Result<GenerationOutput> {
    generate(
        model,
        model,
        prompts,
        options,
        &DecodeOptions::default(),
        None,
    )
}

/// Greedy OverFill generation: `prefill_model` runs the prompts, fills the cache and chooses the
/// first token; `decode_model` produces every later token from that cache.
pub fn greedy_two_stage(
    prefill_model: &Transformer,
    decode_model: &Transformer,
    prompts: &[Vec<i64>],
    options: &GenerateOptions,
) -> Result<GenerationOutput> {
    generate(
        prefill_model,
        decode_model,
        prompts,
        options,
        &DecodeOptions::default(),
        None,
    )
}

/// Refuses a decode model that cannot continue from the prefill model's cache: what
/// `check_compatible` checks (layers, heads, KV heads, head_dim, rope, vocabulary), plus the
/// dtype and device the cache lives in.
pub fn check_two_stage(prefill_model: &Transformer, decode_model: &Transformer) -> Result<()> {
    check_compatible(&prefill_model.config, &decode_model.config)
        .context("the decode model cannot continue from the prefill model's cache")?;
    if prefill_model.kind() != decode_model.kind() {
        bail!(
            "the decode model cannot continue from the prefill model's cache: the full model is {:?}, the decoder {:?} (load both with the same dtype)",
            prefill_model.kind(),
            decode_model.kind()
        );
    }
    if prefill_model.device() != decode_model.device() {
        bail!(
            "the decode model cannot continue from the prefill model's cache: the full model is on {:?}, the decoder on {:?}",
            prefill_model.device(),
            decode_model.device()
        );
    }
    Ok(())
}

/// The prefill pass over a left-padded batch: the filled cache, the final hidden states
/// [B, T, D] and the logits of each row's last prompt token [B, V] (the LM head runs on that
/// position only).
pub struct Prefill {
    pub cache: KvCache,
    pub hidden: Tensor,
    pub last_logits: Tensor,
}

pub fn prefill(model: &Transformer, batch: &PaddedBatch) -> Result<Prefill> {
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let hidden = model
        .forward_hidden(&batch.ids, &batch.positions, &batch.attention_mask, Some(&mut cache))
        .context("prefill")?; // [B, T, D]
    let width = batch.ids.size()[1];
    // Left padding puts every row's last real token in the last column.
    let last_logits = tch::no_grad(|| model.lm_head(&hidden.select(1, width - 1))); // [B, V]
    Ok(Prefill { cache, hidden, last_logits })
}

/// Called with (row, token id) for every token a row generates, as soon as it is chosen.
pub type OnToken<'a> = &'a mut dyn FnMut(usize, i64);

/// Appends `id` to a row's tokens and tells `on_token`; returns whether the row is now finished
/// (it produced a stop id or reached `max_new_tokens`).
pub(crate) fn emit(
    tokens: &mut Vec<i64>,
    row: usize,
    id: i64,
    options: &GenerateOptions,
    on_token: &mut Option<OnToken>,
) -> bool {
    tokens.push(id);
    if let Some(on_token) = on_token.as_mut() {
        on_token(row, id);
    }
    options.eos_token_ids.contains(&id) || tokens.len() >= options.max_new_tokens
}

/// Two-stage generation. `prefill_model` runs the prompts and chooses the first token;
/// `decode_model` (may be the same model) produces every later one; `decode` says how tokens
/// are chosen and how often the prefill model refreshes the cache.
pub fn generate(
    prefill_model: &Transformer,
    decode_model: &Transformer,
    prompts: &[Vec<i64>],
    options: &GenerateOptions,
    decode: &DecodeOptions,
    mut on_token: Option<OnToken>,
) -> Result<GenerationOutput> {
    check_two_stage(prefill_model, decode_model)?;
    if decode.refresh_every == Some(0) {
        bail!("refresh_every must be at least 1");
    }
    if let Some(draft_len) = decode.speculative {
        if draft_len == 0 {
            bail!("speculative decoding needs at least 1 draft token per round");
        }
        if decode.refresh_every.is_some() {
            bail!("speculative decoding already has the full model write every kept cache slot; it excludes refresh_every");
        }
        if options.keep_prompt_logits {
            bail!("speculative decoding does not keep the prompt logits");
        }
        return generate_speculative(
            prefill_model,
            decode_model,
            prompts,
            options,
            std::slice::from_ref(&decode.sampling),
            draft_len,
            on_token,
        );
    }
    let device = prefill_model.device();
    let batch = left_pad(prompts, options.pad_token_id, device)?;
    let rows = prompts.len();
    let mut sampler = Sampler::new(decode.sampling.clone());
    let mut output = GenerationOutput::empty(rows);

    let start = Instant::now();
    let Prefill { mut cache, hidden, last_logits } = prefill(prefill_model, &batch)?;
    let mut next = sampler.choose(&last_logits); // [B]
    let mut next_ids = Vec::<i64>::try_from(&next)?; // waits for the device
    output.prefill_seconds = start.elapsed().as_secs_f64();
    if options.keep_prompt_logits {
        output.prompt_logits =
            Some(tch::no_grad(|| prefill_model.lm_head(&hidden)).to_kind(Kind::Float));
    }
    drop((hidden, last_logits));
    if options.max_new_tokens == 0 {
        return Ok(output);
    }

    let mut finished = vec![false; rows];
    let mut mask = batch.attention_mask;
    // Next rope position per row: its real length.
    let mut positions = mask.sum_dim_intlist(1, true, Kind::Int64); // [B, 1]
    let ones = Tensor::ones([rows as i64, 1], (Kind::Int64, device));
    // Tokens (and their positions) the decode model has fed into the cache since the last
    // refresh, each [B, 1]: the refresh re-runs them with the prefill model.
    let mut fed_since_refresh: Vec<(Tensor, Tensor)> = Vec::new();
    let start = Instant::now();
    loop {
        for (row, &id) in next_ids.iter().enumerate() {
            if !finished[row] {
                finished[row] = emit(&mut output.token_ids[row], row, id, options, &mut on_token);
            }
        }
        if finished.iter().all(|&f| f) {
            break;
        }
        if finished.iter().any(|&f| f) {
            let fed: Vec<i64> = next_ids
                .iter()
                .zip(&finished)
                .map(|(&id, &f)| if f { options.pad_token_id } else { id })
                .collect();
            next = Tensor::from_slice(&fed).to_device(device);
        }
        let next_column = next.view([rows as i64, 1]);
        let refresh = decode
            .refresh_every
            .is_some_and(|k| fed_since_refresh.len() >= k);
        if refresh {
            let step_start = Instant::now();
            // Rewind the cache over the decoder's slots; the prefill model writes them again,
            // then appends the newest token and chooses the next one from its logit.
            let redo = fed_since_refresh.len();
            cache.truncate(cache.len() - redo)?;
            let (mut ids, mut pos): (Vec<Tensor>, Vec<Tensor>) =
                fed_since_refresh.drain(..).unzip();
            ids.push(next_column);
            pos.push(positions.shallow_clone());
            mask = Tensor::cat(&[&mask, &ones], 1);
            let hidden = prefill_model
                .forward_hidden(
                    &Tensor::cat(&ids, 1),
                    &Tensor::cat(&pos, 1),
                    &mask,
                    Some(&mut cache),
                )
                .context("refresh by the prefill model")?;
            let logits = tch::no_grad(|| prefill_model.lm_head(&hidden.select(1, redo as i64)));
            next = sampler.choose(&logits);
            next_ids = Vec::<i64>::try_from(&next)?;
            output.refreshes += 1;
            output.refresh_seconds += step_start.elapsed().as_secs_f64();
        } else {
            mask = Tensor::cat(&[&mask, &ones], 1);
            let logits = decode_model
                .forward_sampled(&next_column, &positions, &mask, &mut cache)
                .context("decode step")?;
            if decode.refresh_every.is_some() {
                fed_since_refresh.push((next_column, positions.shallow_clone()));
            }
            next = sampler.choose(&logits.select(1, 0));
            next_ids = Vec::<i64>::try_from(&next)?;
            output.decode_steps += 1;
        }
        positions = &positions + 1;
    }
    output.decode_seconds = start.elapsed().as_secs_f64();
    Ok(output)
}
