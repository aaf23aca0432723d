//! Greedy generation over a left-padded batch: one prefill pass over the prompts, then
//! one-token decode steps through the KV cache.
//!
//! The prefill and decode models may differ (OverFill: the full model prefills, a pruned model
//! with the same layers, KV heads and head_dim decodes from the full model's cache);
//! `greedy` uses one model for both.
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::kv_cache::KvCache;
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
}

impl GenerationOutput {
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
    greedy_two_stage(model, model, prompts, options)
}

/// `prefill_model` runs the prompts and fills the cache; `decode_model` produces every later
/// token from that cache. Both must agree on what `check_compatible` checks.
pub fn greedy_two_stage(
    prefill_model: &Transformer,
    decode_model: &Transformer,
    prompts: &[Vec<i64>],
    options: &GenerateOptions,
) -> Result<GenerationOutput> {
    let p = &prefill_model.config;
    check_compatible(p, &decode_model.config)
        .context("the decode model cannot continue from the prefill model's cache")?;
    if prefill_model.device() != decode_model.device() {
        bail!("prefill and decode models are on different devices");
    }
    let device = prefill_model.device();
    let batch = left_pad(prompts, options.pad_token_id, device)?;
    let rows = prompts.len();
    let mut cache = KvCache::new(p.num_hidden_layers);
    let mut output = GenerationOutput {
        token_ids: vec![vec![]; rows],
        prefill_seconds: 0.0,
        decode_seconds: 0.0,
        decode_steps: 0,
        prompt_logits: None,
    };

    let start = Instant::now();
    let logits = prefill_model.forward(
        &batch.ids,
        &batch.positions,
        &batch.attention_mask,
        Some(&mut cache),
    )?;
    let width = batch.ids.size()[1];
    let mut next = logits.select(1, width - 1).argmax(-1, false); // [B]
    let mut next_ids = Vec::<i64>::try_from(&next)?; // waits for the device
    output.prefill_seconds = start.elapsed().as_secs_f64();
    if options.keep_prompt_logits {
        output.prompt_logits = Some(logits.to_kind(Kind::Float));
    }
    drop(logits);
    if options.max_new_tokens == 0 {
        return Ok(output);
    }

    let mut finished = vec![false; rows];
    let mut mask = batch.attention_mask;
    // Next rope position per row: its real length.
    let mut positions = mask.sum_dim_intlist(1, true, Kind::Int64); // [B, 1]
    let ones = Tensor::ones([rows as i64, 1], (Kind::Int64, device));
    let start = Instant::now();
    loop {
        for (row, &id) in next_ids.iter().enumerate() {
            if !finished[row] {
                output.token_ids[row].push(id);
                if options.eos_token_ids.contains(&id)
                    || output.token_ids[row].len() >= options.max_new_tokens
                {
                    finished[row] = true;
                }
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
        mask = Tensor::cat(&[&mask, &ones], 1);
        let logits = decode_model.forward(
            &next.view([rows as i64, 1]),
            &positions,
            &mask,
            Some(&mut cache),
        )?;
        positions += 1;
        next = logits.select(1, 0).argmax(-1, false);
        next_ids = Vec::<i64>::try_from(&next)?;
        output.decode_steps += 1;
    }
    output.decode_seconds = start.elapsed().as_secs_f64();
    Ok(output)
}
