//! What `overfill bench-latency` measures: the systems, the timed runs of one point and their
//! statistics, and the device's copy bandwidth (the decode ceiling).
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use overfill_model::generate::{generate, DecodeOptions, GenerateOptions};
use overfill_model::transformer::Transformer;
use tch::{Device, Kind, Tensor};

/// One of the systems compared: full, pruned, overfill, and `speculative-kK` (the pruned model
/// drafts K tokens, the full model verifies: the full model's output).
pub struct System<'a> {
    pub name: String,
    pub prefill: &'a Transformer,
    pub decode: &'a Transformer,
    /// Draft tokens per verification (`DecodeOptions::speculative`).
    pub speculative: Option<usize>,
    /// Weight bytes one decode step of `decode` reads.
    pub decode_bytes: u64,
}

/// One measured point of a sweep.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    pub sweep: &'static str,
    pub batch: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
}

/// How each point is timed, and the bandwidth that sets its decode ceiling.
pub struct Timing {
    pub vocab_size: usize,
    /// Seed of the random prompts.
    pub seed: i64,
    pub warmup: usize,
    pub runs: usize,
    /// Device copy bandwidth in bytes/s.
    pub bandwidth: f64,
}

/// A measured point: batch, prompt and generation length, and the timings of every run.
#[derive(Debug, Clone)]
pub struct Row {
    pub sweep: &'static str,
    pub system: String,
    pub batch: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub prefill: Stats,
    pub decode: Stats,
    pub total: Stats,
    /// batch × decode steps ÷ mean decode seconds.
    pub decode_tokens_per_second: f64,
    /// batch ÷ (weight bytes a decode step reads ÷ copy bandwidth).
    pub ceiling_tokens_per_second: f64,
    /// Speculative systems: accepted ÷ proposed draft tokens over the timed runs.
    pub acceptance_rate: Option<f64>,
}

/// What the timed runs of one system at one point measured.
struct Runs {
    prefill: Vec<f64>,
    decode: Vec<f64>,
    /// Draft tokens proposed and accepted (speculative systems).
    proposed: usize,
    accepted: usize,
}

/// Mean and (sample) standard deviation in seconds.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub mean: f64,
    pub std: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Stats {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = if values.len() > 1 {
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Stats {
            mean,
            std: var.sqrt(),
        }
    }
}

/// Weight bytes one decode step reads: every parameter, except that the embedding table of an
/// untied model is only gathered (B rows), not read whole.
pub fn decode_weight_bytes(model: &Transformer) -> u64 {
    let tensors = model.tensors();
    let mut bytes: u64 = tensors
        .values()
        .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
        .sum();
    if !model.config.tie_word_embeddings {
        let embed = &tensors["model.embed_tokens.weight"];
        bytes -= (embed.numel() * embed.kind().elt_size_in_bytes()) as u64;
    }
    bytes
}

fn synchronize(device: Device) {
    if let Device::Cuda(n) = device {
        tch::Cuda::synchronize(n as i64);
    }
}

/// Device copy bandwidth in bytes/s (bytes read + bytes written per second), the median of 5
/// copies of a buffer larger than any cache.
pub fn copy_bandwidth(device: Device) -> Result<f64> {
    let bytes: i64 = if device.is_cuda() { 1 << 30 } else { 256 << 20 };
    let src = Tensor::f_ones([bytes / 4], (Kind::Float, device))?;
    let mut dst = Tensor::f_zeros([bytes / 4], (Kind::Float, device))?;
    dst.f_copy_(&src)?;
    synchronize(device);
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        dst.f_copy_(&src)?;
        synchronize(device);
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(2.0 * bytes as f64 / times[2])
}

/// `batch` random prompts of `len` tokens (seeded).
fn random_prompts(batch: usize, len: usize, vocab: usize, seed: i64) -> Vec<Vec<i64>> {
    tch::manual_seed(seed);
    let ids = Tensor::randint_low(
        0,
        vocab as i64,
        [batch as i64, len as i64],
        (Kind::Int64, Device::Cpu),
    );
    (0..batch as i64)
        .map(|r| Vec::<i64>::try_from(ids.get(r)).unwrap_or_default())
        .collect()
}

/// Prefill and decode seconds of each timed run of one system at one point.
fn time_runs(system: &System, prompts: &[Vec<i64>], gen_len: usize, warmup: usize, runs: usize) -> Result<Runs> {
    let options = GenerateOptions {
        max_new_tokens: gen_len,
        eos_token_ids: vec![],
        pad_token_id: 0,
        keep_prompt_logits: false,
    };
    let decode_options = DecodeOptions { speculative: system.speculative, ..DecodeOptions::default() };
    let mut measured = Runs { prefill: Vec::new(), decode: Vec::new(), proposed: 0, accepted: 0 };
    for run in 0..warmup + runs {
        let out = generate(system.prefill, system.decode, prompts, &options, &decode_options, None)
            .with_context(|| format!("{} generation", system.name))?;
        if out.token_ids.iter().any(|t| t.len() != gen_len) {
            bail!("{}: a row stopped before {gen_len} tokens", system.name);
        }
        if run >= warmup {
            measured.prefill.push(out.prefill_seconds);
            measured.decode.push(out.decode_seconds);
            if let Some(stats) = &out.speculative {
                measured.proposed += stats.proposed;
                measured.accepted += stats.accepted;
            }
        }
    }
    Ok(measured)
}

/// Every system at every point: a row of timings each, with a progress bar.
pub fn measure_points(points: &[Point], systems: &[System], timing: &Timing) -> Result<Vec<Row>> {
    let progress = ProgressBar::new((points.len() * systems.len()) as u64);
    progress.set_style(
        ProgressStyle::with_template(
            "bench-latency {bar:30} {pos}/{len} {msg} [{elapsed_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    for &Point { sweep, batch, prompt_len, gen_len } in points {
        let prompts = random_prompts(batch, prompt_len, timing.vocab_size, timing.seed);
        for system in systems {
            progress.set_message(format!(
                "{sweep}: {} batch {batch} prompt {prompt_len} gen {gen_len}",
                system.name
            ));
            let runs = time_runs(system, &prompts, gen_len, timing.warmup, timing.runs)?;
            let total: Vec<f64> = runs.prefill.iter().zip(&runs.decode).map(|(p, d)| p + d).collect();
            let decode = Stats::of(&runs.decode);
            let prefill = Stats::of(&runs.prefill);
            rows.push(Row {
                sweep,
                system: system.name.clone(),
                batch,
                prompt_len,
                gen_len,
                prefill,
                decode,
                total: Stats::of(&total),
                decode_tokens_per_second: (batch * (gen_len - 1)) as f64 / decode.mean.max(1e-12),
                ceiling_tokens_per_second: batch as f64 * timing.bandwidth / system.decode_bytes as f64,
                acceptance_rate: system.speculative.map(|_| runs.accepted as f64 / runs.proposed.max(1) as f64),
            });
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    Ok(rows)
}
