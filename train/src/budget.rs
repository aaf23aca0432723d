//! `overfill train --dry-run --gpus N --gpu-memory GiB`: the per-GPU memory budget of the recipe's
//! real shapes, with the optimizer state replicated (plain data parallelism) and sharded (ZeRO-1),
//! and whether each fits. Nothing is loaded but the two config.json files.
//!
//! Bytes per parameter follow `train::optimizer` (bf16: compute weights 2, their gradients 2, fp32
//! gradient accumulators 4, fp32 masters 4, AdamW moments 8; f32: weights 4 = masters, gradients
//! 4, moments 8) and `dist::zero` (masters and moments divided by the world size; the step
//! all-gathers the updated masters into one fp32 vector of all parameters).
//!
//! Activations are an upper bound without activation checkpointing, at the recipe's per-device
//! batch and `max_seq_length` for every row: the frozen full model's K/V of all its layers (read by
//! the decoder), one layer of its no-grad prefill, the decoder's saved tensors per layer (Llama:
//! in bf16 about 10·hidden + 3·kv_dim + 4·intermediate values per token, plus two fp32 RMSNorm
//! inputs), and the logits with their fp32 log-softmax and its gradient.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use overfill_model::config::ModelConfig;
use overfill_model::prune::{dry_run as prune_dry_run, Width};

use crate::config::{TrainMode, TrainSection};
use crate::settings::Settings;

const GIB: f64 = (1u64 << 30) as f64;

/// One line of the budget.
struct Item {
    what: &'static str,
    replicated: f64,
    sharded: f64,
}

/// The decoder's widths from the recipe's `[prune]` table: its shapes before calibrate-prune has
/// written it.
#[derive(Debug, Clone, Copy)]
pub struct PlannedWidths {
    pub hidden: Width,
    pub intermediate: Width,
    pub round_to: Option<usize>,
}

/// The two models' shapes as the budget reads them.
struct Shapes {
    full: Option<ModelConfig>,
    decoder: ModelConfig,
    /// Where the decoder's shapes came from (its folder, or the planned widths).
    decoder_source: String,
}

/// The per-GPU budget in bytes, line by line, and its peaks.
struct Budget {
    items: [Item; 8],
    half: bool,
    p_full: f64,
    p_dec: f64,
    /// Bytes of the fp32 masters (replicated) and of the AdamW moments.
    masters: f64,
    moments: f64,
    /// ZeRO-1's all-gathered fp32 parameter vector.
    gather_buffer: f64,
    peak_replicated: f64,
    peak_sharded: f64,
}

impl Budget {
    /// Weights, gradients, masters and moments (replicated or sharded).
    fn states(&self, sharded: bool) -> f64 {
        self.items[..5].iter().map(|i| if sharded { i.sharded } else { i.replicated }).sum()
    }

    fn activations(&self) -> f64 {
        self.items[5..].iter().map(|i| i.replicated).sum()
    }
}

/// Prints the budget of these settings for `gpus` GPUs of `gpu_memory_gib` each, whether it fits
/// with the optimizer state replicated and sharded, and, when even ZeRO-1 does not fit, the
/// per-device batch that would.
pub fn run(settings: &Settings, planned: &PlannedWidths, gpus: usize, gpu_memory_gib: f64) -> Result<()> {
    if gpus == 0 {
        bail!("--gpus must be at least 1");
    }
    if !(gpu_memory_gib > 0.0) {
        bail!("--gpu-memory must be a positive number of GiB");
    }
    let shapes = read_shapes(settings, planned)?;
    let budget = plan(&settings.train, &shapes, gpus);
    print_budget(settings, &shapes, &budget, gpus, gpu_memory_gib);
    Ok(())
}

/// The full model's and the decoder's configs; a decoder not pruned yet gets the shapes
/// calibrate-prune will produce from the full model.
fn read_shapes(settings: &Settings, planned: &PlannedWidths) -> Result<Shapes> {
    let full = match (&settings.full, settings.train.mode) {
        (Some(path), TrainMode::Overfill) => Some(read_config(path).context("the full model ([model] path or --full)")?),
        _ => None,
    };
    let (decoder, decoder_source) = match read_config(&settings.decoder) {
        Ok(config) => (config, format!("{}", settings.decoder.display())),
        Err(err) => {
            // Not pruned yet: the shapes calibrate-prune will produce from the full model.
            let Some(full) = &full else { return Err(err.context("the decoder ([prune] out or --decoder)")) };
            let (pruned, _) = prune_dry_run(full, planned.hidden, planned.intermediate, planned.round_to)?;
            (pruned, format!("the recipe's [prune] widths applied to the full model ({} not found)", settings.decoder.display()))
        }
    };
    Ok(Shapes { full, decoder, decoder_source })
}

/// Bytes per GPU of every item at the recipe's dtype, per-device batch and `max_seq_length`.
fn plan(t: &TrainSection, shapes: &Shapes, gpus: usize) -> Budget {
    let (full, decoder) = (&shapes.full, &shapes.decoder);
    let half = match t.dtype.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => false,
        _ => true,
    };
    let compute_bytes = if half { 2.0 } else { 4.0 };
    let p_dec = decoder.param_count() as f64;
    let p_full = full.as_ref().map(|c| c.param_count() as f64).unwrap_or(0.0);
    let n = gpus as f64;
    let (b, s) = (t.per_device_batch_size as f64, t.max_seq_length as f64);

    let kv_dim = |c: &ModelConfig| (c.num_key_value_heads * c.head_dim) as f64;
    let activations_full = full.as_ref().map_or(0.0, |c| {
        let kv_cache = c.num_hidden_layers as f64 * 2.0 * kv_dim(c) * b * s * compute_bytes;
        let one_layer = b * s * (4.0 * c.hidden_size as f64 + 3.0 * c.intermediate_size as f64) * compute_bytes;
        kv_cache + one_layer
    });
    let per_token_layer = compute_bytes * (10.0 * decoder.hidden_size as f64 + 3.0 * kv_dim(decoder) + 4.0 * decoder.intermediate_size as f64)
        + 4.0 * 2.0 * decoder.hidden_size as f64;
    let activations_decoder = decoder.num_hidden_layers as f64 * b * s * per_token_layer;
    let logits = b * s * decoder.vocab_size as f64 * (compute_bytes + 4.0 + 4.0);

    let grads = p_dec * if half { 2.0 + 4.0 } else { 4.0 };
    let masters = if half { p_dec * 4.0 } else { 0.0 };
    let items = [
        Item { what: "full model weights (frozen)", replicated: p_full * compute_bytes, sharded: p_full * compute_bytes },
        Item { what: "decoder weights", replicated: p_dec * compute_bytes, sharded: p_dec * compute_bytes },
        Item { what: "gradients (+ fp32 accumulators)", replicated: grads, sharded: grads },
        Item { what: "fp32 master weights", replicated: masters, sharded: p_dec * 4.0 / n },
        Item { what: "AdamW moments (fp32 m, v)", replicated: p_dec * 8.0, sharded: p_dec * 8.0 / n },
        Item { what: "activations: full model K/V + prefill", replicated: activations_full, sharded: activations_full },
        Item { what: "activations: decoder (saved for backward)", replicated: activations_decoder, sharded: activations_decoder },
        Item { what: "activations: logits + log-softmax + grad", replicated: logits, sharded: logits },
    ];
    let mut budget = Budget {
        items,
        half,
        p_full,
        p_dec,
        masters,
        moments: p_dec * 8.0,
        // ZeRO-1's step runs after backward (activations freed) with one fp32 vector of all parameters.
        gather_buffer: p_dec * 4.0,
        peak_replicated: 0.0,
        peak_sharded: 0.0,
    };
    budget.peak_replicated = budget.states(false) + budget.activations();
    budget.peak_sharded = (budget.states(true) + budget.activations()).max(budget.states(true) + budget.gather_buffer);
    budget
}

fn print_budget(settings: &Settings, shapes: &Shapes, budget: &Budget, gpus: usize, gpu_memory_gib: f64) {
    let (t, decoder) = (&settings.train, &shapes.decoder);
    println!("per-GPU memory budget: {gpus} GPU(s) × {gpu_memory_gib} GiB, {} compute, mode {:?}", if budget.half { "bf16" } else { "f32" }, t.mode);
    println!(
        "  full model: {}  ({:.2} B parameters)",
        settings.full.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into()),
        budget.p_full / 1e9
    );
    println!(
        "  decoder: {}  ({:.2} B parameters; hidden {}, intermediate {}, {} layers)",
        shapes.decoder_source,
        budget.p_dec / 1e9,
        decoder.hidden_size,
        decoder.intermediate_size,
        decoder.num_hidden_layers
    );
    println!(
        "  activations at per_device_batch_size {} × max_seq_length {} (upper bound: every row at full length, no activation checkpointing)",
        t.per_device_batch_size, t.max_seq_length
    );
    println!("  {:<44} {:>14} {:>14}", "GiB per GPU", "replicated", "ZeRO-1");
    for item in &budget.items {
        println!("  {:<44} {:>14.2} {:>14.2}", item.what, item.replicated / GIB, item.sharded / GIB);
    }
    println!("  {:<44} {:>14} {:>14.2}", "ZeRO-1 step: all-gathered fp32 parameters", "-", budget.gather_buffer / GIB);
    println!("  {:<44} {:>14.2} {:>14.2}", "peak", budget.peak_replicated / GIB, budget.peak_sharded / GIB);
    let verdict = |peak: f64| {
        if peak <= gpu_memory_gib * GIB {
            format!("fits ({:.1} GiB free)", gpu_memory_gib - peak / GIB)
        } else {
            format!("does NOT fit ({:.1} GiB over)", peak / GIB - gpu_memory_gib)
        }
    };
    println!("  replicated optimizer (zero_stage = 0): {}", verdict(budget.peak_replicated));
    println!("  sharded optimizer    (zero_stage = 1): {}", verdict(budget.peak_sharded));
    let sharded_states = budget.masters + budget.moments;
    println!(
        "  why: weights, gradients, masters and moments alone take {:.1} GiB per GPU replicated; ZeRO-1 splits the {:.1} GiB of masters and moments over {gpus} GPUs ({:.1} GiB each)",
        budget.states(false) / GIB,
        sharded_states / GIB,
        sharded_states / gpus as f64 / GIB
    );
    if budget.peak_sharded > gpu_memory_gib * GIB {
        print_batch_that_fits(t, budget, gpu_memory_gib);
    }
}

/// The largest per-device batch that fits with ZeRO-1, keeping the global batch through gradient
/// accumulation.
fn print_batch_that_fits(t: &TrainSection, budget: &Budget, gpu_memory_gib: f64) {
    let fits = |peak: f64| peak <= gpu_memory_gib * GIB;
    let states = budget.states(true);
    let per_row = budget.activations() / (t.per_device_batch_size as f64).max(1.0);
    let max_rows = ((gpu_memory_gib * GIB - states) / per_row).floor();
    // A per-device batch dividing this rank's rows per step, so accumulation keeps the global batch.
    let rows_per_step = t.per_device_batch_size * t.gradient_accumulation_steps;
    let rows = (1..=rows_per_step).rev().find(|&r| rows_per_step % r == 0 && (r as f64) <= max_rows);
    if let Some(rows) = rows.filter(|_| fits(states + budget.gather_buffer)) {
        println!(
            "  with zero_stage = 1, per_device_batch_size = {rows} and gradient_accumulation_steps = {} (the same global batch) it fits: peak {:.1} GiB",
            rows_per_step / rows,
            (states + per_row * rows as f64).max(states + budget.gather_buffer) / GIB
        );
    } else {
        println!("  no per-device batch fits with ZeRO-1 on this GPU: more GPUs, or activation checkpointing / ZeRO-2/3 (not implemented)");
    }
}

/// A model's config.json from a checkpoint folder or the file itself.
fn read_config(path: &Path) -> Result<ModelConfig> {
    let file: PathBuf = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
    if !file.is_file() {
        bail!("{} not found (give a checkpoint folder or its config.json)", file.display());
    }
    ModelConfig::from_file(&file)
}
