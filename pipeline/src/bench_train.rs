//! `overfill bench-train`: times OverFill training steps on random weights for given shapes — the
//! trainer's own step (frozen full-model prefill, decoder forward and backward over the target,
//! global grad-norm clipping, the trainer's AdamW) without data loading or checkpoints.
//!
//! Used three times: `just bench-train` compares it on CPU with a transformers loop on the same rows
//! (`tests/python/bench_train.py`), `scripts/gpu-check.sh` times the real 3B→1B shapes on CUDA
//! and prints the model FLOPs utilisation (MFU) against a given peak, and the memory planner's
//! test (`pipeline/tests/memory_plan_cli.rs`) compares the planner's peak (`train::memory_plan`)
//! with the peak this process really reached: the most bytes of tensors alive at once (on a CPU
//! counted by the shim's allocator wrapper, on CUDA the caching allocator's own peak) and the
//! peak resident set above start-up.
//!
//! `--activation-checkpointing` measures the step with recomputation first, then without, in one
//! process (both peaks are reset in between; the resident set's with Linux `clear_refs`), side
//! by side.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use overfill_model::checkpoint::{parse_device, parse_dtype};
use overfill_model::config::ModelConfig;
use overfill_model::prune::prune_config;
use overfill_model::train::{backward_loss_sum, logits_block_bytes, TrainBatch};
use overfill_model::transformer::{random_tensors, Transformer};
use serde::Deserialize;
use serde_json::json;
use tch::{Device, Kind, Tensor};

use overfill_train::memory::{
    count_cpu_tensors, cpu_tensor_bytes, cuda_tensor_bytes, process_memory, reset_cpu_tensor_peak, reset_cuda_tensor_peak,
    reset_peak_rss,
};
use overfill_train::memory_plan::{plan, MemoryPlan, StepShape};
use overfill_train::optimizer::{clip_coefficient, AdamW, AdamWConfig};
use overfill_train::trainer::keep_freed_memory;
use overfill_train::TrainMode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// config.json of the full model (random weights; no checkpoint is read).
    #[arg(long)]
    pub full_config: PathBuf,
    /// The decoder's hidden size (the full model's when absent).
    #[arg(long)]
    pub hidden_size: Option<usize>,
    /// The decoder's FFN intermediate size (the full model's when absent).
    #[arg(long)]
    pub intermediate_size: Option<usize>,
    /// overfill (full prefill + decoder) or pruned (the decoder alone over context ‖ target).
    #[arg(long, value_enum, default_value = "overfill")]
    pub mode: TrainMode,
    /// JSON list of {"context_ids": [..], "target_ids": [..]}: the batch of every step.
    /// Without it: `--batch` random rows of `--context-len` + `--target-len` tokens.
    #[arg(long)]
    pub rows: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 1024)]
    pub context_len: usize,
    #[arg(long, default_value_t = 1024)]
    pub target_len: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32 or bf16 (bf16: fp32 master weights and optimizer state, as in training).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// libtorch intra-op threads (0 = libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Peak dense TFLOP/s of the device for the compute dtype, to print MFU (e.g. 989 for an
    /// H100/H200 in bf16).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Measure with activation recomputation and without, side by side (step time, peak memory).
    #[arg(long)]
    pub activation_checkpointing: bool,
    /// One JSON line on stdout.
    #[arg(long)]
    pub json: bool,
}

/// What one configuration measured.
struct Measurement {
    activation_checkpointing: bool,
    step_seconds: f64,
    /// Peak resident set above the process's resident set before any model was made.
    measured_peak_bytes: Option<f64>,
    /// Peak bytes of live tensors: CPU, the counting allocator; CUDA, the caching allocator's
    /// `max_memory_allocated` (`None` in a build without CUDA).
    tensor_peak_bytes: Option<f64>,
    plan: MemoryPlan,
}

#[derive(Deserialize)]
struct Row {
    context_ids: Vec<u32>,
    target_ids: Vec<u32>,
}

pub fn run(args: Args) -> Result<()> {
    // As the trainer does: the step's freed tensors stay in the heap for the next step.
    keep_freed_memory();
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let device = parse_device(&args.device)?;
    if let Device::Cuda(i) = device {
        if !tch::Cuda::is_available() || i as i64 >= tch::Cuda::device_count() {
            bail!("--device {}: CUDA device {i} is not available", args.device);
        }
    }
    let dtype = parse_dtype(&args.dtype)?;
    let full_config = ModelConfig::from_file(&args.full_config)?;
    let decoder_config = prune_config(
        &full_config,
        args.hidden_size.unwrap_or(full_config.hidden_size),
        args.intermediate_size.unwrap_or(full_config.intermediate_size),
    )?;
    let rows = load_rows(&args, full_config.vocab_size)?;
    // What libtorch's start-up holds (threads, kernels) is not the step's: measured from here.
    let _ = Tensor::ones([64, 64], (Kind::Float, device)).matmul(&Tensor::ones([64, 64], (Kind::Float, device)));
    let baseline_rss = process_memory().rss_bytes;
    // Exact bytes of the tensors the run allocates from here (CPU; libtorch counts CUDA itself).
    if device == Device::Cpu {
        count_cpu_tensors();
    }

    // The full model is frozen in the compute dtype; the decoder trains in it with fp32 masters.
    let full = match args.mode {
        TrainMode::Overfill => Some(Transformer::from_tensors(
            full_config.clone(),
            random_tensors(&full_config, 0.02, 0, device, dtype)?,
        )?),
        TrainMode::Pruned | TrainMode::Sft => None,
    };
    let decoder = Transformer::from_tensors(
        decoder_config.clone(),
        random_tensors(&decoder_config, 0.02, 1, device, dtype)?,
    )?;
    decoder.set_requires_grad(true);
    let mut optimizer = AdamW::new(
        decoder.parameters(),
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
    )?;
    let row_refs: Vec<(&[u32], &[u32])> =
        rows.iter().map(|r| (r.context_ids.as_slice(), r.target_ids.as_slice())).collect();
    let batch = TrainBatch::from_rows(&row_refs, device)?;
    if batch.predicted_tokens == 0 {
        bail!("the rows predict no token: every target needs at least 2 tokens");
    }

    // With recomputation first: its peak is the lower, so the plain step's peak after it is its own
    // even where the peak cannot be reset.
    let modes: &[bool] = if args.activation_checkpointing { &[true, false] } else { &[false] };
    let mut measurements = Vec::new();
    for &activation_checkpointing in modes {
        reset_peak_rss();
        reset_cpu_tensor_peak();
        if let Device::Cuda(i) = device {
            reset_cuda_tensor_peak(i);
        }
        let step_seconds = time_steps(&args, &decoder, full.as_ref(), &mut optimizer, &batch, activation_checkpointing)?;
        let peak = process_memory().peak_rss_bytes;
        let tensor_peak = match device {
            Device::Cuda(i) => cuda_tensor_bytes(i).map(|b| b.peak as f64),
            _ => Some(cpu_tensor_bytes().peak as f64),
        };
        let shape = StepShape {
            full: full.as_ref().map(|f| &f.config),
            decoder: &decoder_config,
            mode: args.mode,
            half: dtype != Kind::Float,
            rows: rows.len(),
            context_tokens: rows.iter().map(|r| r.context_ids.len()).max().unwrap_or(0),
            target_tokens: rows.iter().map(|r| r.target_ids.len()).max().unwrap_or(0),
            world_size: 1,
            zero_stage: 0,
            activation_checkpointing,
            logits_block_bytes: logits_block_bytes(device) as f64,
        };
        measurements.push(Measurement {
            activation_checkpointing,
            step_seconds,
            measured_peak_bytes: peak.zip(baseline_rss).map(|(p, b)| p.saturating_sub(b) as f64),
            tensor_peak_bytes: tensor_peak,
            plan: plan(&shape),
        });
    }
    report(&args, &full_config, &decoder_config, &rows, batch.predicted_tokens, &measurements);
    Ok(())
}

/// Runs `--warmup` + `--steps` optimizer steps; the median step time of the timed ones.
fn time_steps(
    args: &Args,
    decoder: &Transformer,
    full: Option<&Transformer>,
    optimizer: &mut AdamW,
    batch: &TrainBatch,
    activation_checkpointing: bool,
) -> Result<f64> {
    let scale = 1.0 / batch.predicted_tokens as f64;
    let mut times = Vec::with_capacity(args.steps);
    for i in 0..args.warmup + args.steps {
        let start = Instant::now();
        optimizer.zero_grad();
        let loss = backward_loss_sum(decoder, full, batch, scale, activation_checkpointing).context("forward and backward")?;
        optimizer.accumulate_micro_batch();
        let grad_norm = optimizer.grad_norm();
        optimizer.step(1e-5, clip_coefficient(grad_norm, 1.0));
        let loss = loss.double_value(&[]) * scale; // waits for the device
        if !loss.is_finite() {
            bail!("step {i}: the loss is {loss}");
        }
        if i >= args.warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

const MIB: f64 = 1024.0 * 1024.0;

/// One JSON line (`--json`) or a line per configuration.
fn report(args: &Args, full_config: &ModelConfig, decoder_config: &ModelConfig, rows: &[Row], predicted: i64, measurements: &[Measurement]) {
    let context_tokens: usize = rows.iter().map(|r| r.context_ids.len()).sum();
    let flops = step_flops(full_config, decoder_config, rows, args.mode);
    let configs: Vec<_> = measurements
        .iter()
        .map(|m| {
            let achieved_tflops = flops / m.step_seconds / 1e12;
            json!({
                "activation_checkpointing": m.activation_checkpointing,
                "step_seconds": m.step_seconds,
                "tokens_per_sec": predicted as f64 / m.step_seconds,
                "achieved_tflops": achieved_tflops,
                "mfu": args.peak_tflops.map(|peak| achieved_tflops / peak),
                "measured_peak_mib": m.measured_peak_bytes.map(|b| b / MIB),
                "measured_tensor_peak_mib": m.tensor_peak_bytes.map(|b| b / MIB),
                "planned_peak_mib": m.plan.peak_bytes() / MIB,
                "planned_states_mib": m.plan.states_bytes() / MIB,
                "planned_activations_mib": m.plan.activation_bytes() / MIB,
                "planned_step_mib": m.plan.step_bytes() / MIB,
            })
        })
        .collect();
    // The last configuration (the plain step) at the top level, as before this flag existed.
    let mut report = configs.last().cloned().unwrap_or_default();
    let extra = json!({
        "impl": "overfill",
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "device": args.device,
        "dtype": args.dtype,
        "rows": rows.len(),
        "context_tokens": context_tokens,
        "predicted_tokens": predicted,
        "model_tflops_per_step": flops / 1e12,
        "peak_rss_mib": process_memory().peak_rss_bytes.map(|b| b as f64 / MIB),
        "full_params": full_config.param_count(),
        "decoder_params": decoder_config.param_count(),
        "configurations": configs,
    });
    if let (Some(report), Some(extra)) = (report.as_object_mut(), extra.as_object()) {
        report.extend(extra.clone());
    }
    if args.json {
        println!("{report}");
        return;
    }
    for m in measurements {
        println!(
            "activation checkpointing {}: step {:.1} ms, {:.0} target tokens/s, {:.2} TFLOP/s; peak memory: tensors {}, resident {} (planned {:.0} MiB)",
            if m.activation_checkpointing { "on " } else { "off" },
            m.step_seconds * 1e3,
            predicted as f64 / m.step_seconds,
            flops / m.step_seconds / 1e12,
            m.tensor_peak_bytes.map_or("not counted".to_string(), |b| format!("{:.0} MiB", b / MIB)),
            m.measured_peak_bytes.map_or("unknown".to_string(), |b| format!("{:.0} MiB above start-up", b / MIB)),
            m.plan.peak_bytes() / MIB,
        );
    }
}

fn load_rows(args: &Args, vocab_size: usize) -> Result<Vec<Row>> {
    let rows: Vec<Row> = match &args.rows {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {} (a JSON list of {{context_ids, target_ids}})", path.display()))?
        }
        None => {
            if args.batch == 0 || args.context_len == 0 || args.target_len < 2 {
                bail!("--batch and --context-len must be positive and --target-len at least 2");
            }
            // Deterministic pseudo-random ids (a multiplicative hash), no RNG state to seed.
            let id = |i: usize| ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) as u32 % vocab_size as u32;
            (0..args.batch)
                .map(|b| Row {
                    context_ids: (0..args.context_len).map(|i| id(b * 1_000_003 + i)).collect(),
                    target_ids: (0..args.target_len).map(|i| id(b * 1_000_003 + 500_000 + i)).collect(),
                })
                .collect()
        }
    };
    if rows.is_empty() {
        bail!("no rows to train on");
    }
    if let Some(bad) = rows.iter().flat_map(|r| r.context_ids.iter().chain(&r.target_ids)).find(|&&t| t as usize >= vocab_size) {
        bail!("token id {bad} is outside the model's vocabulary of {vocab_size}");
    }
    Ok(rows)
}

/// Model FLOPs of one step (the usual 2 per multiply-add; backward twice the forward), counting real
/// tokens only: the full model's forward over the contexts (its LM head is not run), and the
/// decoder's forward and backward over the target inputs (OverFill) or over context ‖ target
/// (pruned), with the LM head on the predicted positions. Attention scores count each query
/// against the keys it may see (causal).
fn step_flops(full: &ModelConfig, decoder: &ModelConfig, rows: &[Row], mode: TrainMode) -> f64 {
    let matmul_params = |c: &ModelConfig| -> f64 {
        let (d, i, hd) = (c.hidden_size as f64, c.intermediate_size as f64, c.head_dim as f64);
        let (h, kv) = (c.num_attention_heads as f64, c.num_key_value_heads as f64);
        let per_layer = d * h * hd * 2.0 + d * kv * hd * 2.0 + 3.0 * d * i;
        per_layer * c.num_hidden_layers as f64
    };
    // QK^T and AV for one query attending to `keys` keys.
    let attention = |c: &ModelConfig, keys: f64| -> f64 {
        2.0 * 2.0 * keys * (c.num_attention_heads * c.head_dim) as f64 * c.num_hidden_layers as f64
    };
    let mut flops = 0.0;
    for row in rows {
        let (ctx, n) = (row.context_ids.len() as f64, (row.target_ids.len() - 1) as f64);
        let causal_sum = |start: f64, count: f64| count * start + count * (count + 1.0) / 2.0;
        let head = 2.0 * (decoder.hidden_size * decoder.vocab_size) as f64 * n;
        match mode {
            TrainMode::Overfill => {
                flops += 2.0 * matmul_params(full) * ctx + attention(full, 1.0) * causal_sum(0.0, ctx);
                flops += 3.0 * (2.0 * matmul_params(decoder) * n + attention(decoder, 1.0) * causal_sum(ctx, n) + head);
            }
            TrainMode::Pruned | TrainMode::Sft => {
                let total = ctx + n;
                flops += 3.0 * (2.0 * matmul_params(decoder) * total + attention(decoder, 1.0) * causal_sum(0.0, total) + head);
            }
        }
    }
    flops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_of_a_dense_step_match_the_6nd_rule() {
        // Without attention terms, a decoder-only step is 6 · params · tokens (+ the LM head).
        let config = ModelConfig::from_json_str(
            r#"{"model_type":"llama","vocab_size":100,"hidden_size":64,"intermediate_size":128,
                "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
                "rms_norm_eps":1e-5,"max_position_embeddings":128}"#,
        )
        .unwrap();
        let rows = vec![Row { context_ids: vec![1; 10], target_ids: vec![1; 6] }];
        let flops = step_flops(&config, &config, &rows, TrainMode::Pruned);
        let per_layer = (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) as f64;
        let matmuls = 6.0 * per_layer * 2.0 * 15.0;
        let head = 6.0 * (64 * 100) as f64 * 5.0;
        let attention = 3.0 * 4.0 * 64.0 * 2.0 * (15.0 * 16.0 / 2.0);
        assert!((flops - (matmuls + head + attention)).abs() < 1e-6 * flops);
    }
}
