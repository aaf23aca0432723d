//! `overfill train --dry-run --gpus N --gpu-memory GiB`: the per-GPU memory plan of the recipe's
//! real shapes (`memory_plan`: what the trainer allocates, item by item) for every combination of
//! `zero_stage` (0, 1, 2) and `activation_checkpointing`, which of them fit, and, when the
//! recipe's own settings do not, the cheapest that does or the per-device batch that would.
//! Nothing is loaded but the two config.json files.
//!
//! Rows are planned at `max_seq_length` tokens each, at the split of context and target that
//! needs most memory (the upper bound of any batch the loader can form).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use overfill_model::checkpoint::{parse_device, parse_dtype};
use overfill_model::config::ModelConfig;
use overfill_model::prune::{dry_run as prune_dry_run, Width};
use overfill_model::train::logits_block_bytes;
use tch::{Device, Kind};

use crate::config::{TrainMode, TrainSection};
use crate::memory_plan::{plan, MemoryPlan, StepShape};
use crate::settings::Settings;

const GIB: f64 = (1u64 << 30) as f64;

/// Share of each GPU's memory kept free for what the plan does not count there: the CUDA context
/// and the libraries' workspaces (cuBLAS, cuDNN; about 1 GiB), NCCL's buffers, and the caching
/// allocator's fragmentation (PyTorch reports 5-10% in long runs). A margin, not a measurement: no
/// GPU has run `scripts/gpu-check.sh`'s allocator peak yet (README).
const UNPLANNED_SHARE: f64 = 0.10;

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

/// One combination of the two memory levers.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Levers {
    zero_stage: u8,
    activation_checkpointing: bool,
}

/// Every combination, cheapest in time first: no recomputation before recomputation (it costs
/// about one more decoder forward per step), lower ZeRO stages first (fewer collectives).
const ALL_LEVERS: [Levers; 6] = [
    Levers { zero_stage: 0, activation_checkpointing: false },
    Levers { zero_stage: 1, activation_checkpointing: false },
    Levers { zero_stage: 2, activation_checkpointing: false },
    Levers { zero_stage: 0, activation_checkpointing: true },
    Levers { zero_stage: 1, activation_checkpointing: true },
    Levers { zero_stage: 2, activation_checkpointing: true },
];

/// The planning context of a dry run.
struct DryRun<'a> {
    t: &'a TrainSection,
    shapes: &'a Shapes,
    gpus: usize,
    /// `logits_block_bytes` of the recipe's device.
    block_bytes: f64,
}

impl DryRun<'_> {
    /// The plan of `rows` rows per micro-batch at the worst split of `max_seq_length`, and that
    /// split's context tokens.
    fn plan(&self, levers: Levers, rows: usize) -> (MemoryPlan, usize) {
        let total = self.t.max_seq_length.max(3);
        // The plan is linear in the context's share: an end (or the middle) is the worst.
        [1, total / 2, total - 2]
            .into_iter()
            .map(|context| {
                let shape = StepShape {
                    full: self.shapes.full.as_ref(),
                    decoder: &self.shapes.decoder,
                    mode: self.t.mode,
                    half: is_half(&self.t.dtype),
                    rows,
                    context_tokens: context,
                    target_tokens: total - context,
                    world_size: self.gpus,
                    zero_stage: levers.zero_stage,
                    activation_checkpointing: levers.activation_checkpointing,
                    logits_block_bytes: self.block_bytes,
                };
                (plan(&shape), context)
            })
            .max_by(|a, b| a.0.peak_bytes().total_cmp(&b.0.peak_bytes()))
            .expect("three splits")
    }
}

/// Prints the plan of these settings for `gpus` GPUs of `gpu_memory_gib` each: the recipe's own
/// levers item by item, every combination's peak, and what fits.
pub fn run(settings: &Settings, planned: &PlannedWidths, gpus: usize, gpu_memory_gib: f64) -> Result<()> {
    if gpus == 0 {
        bail!("--gpus must be at least 1");
    }
    if !(gpu_memory_gib > 0.0) {
        bail!("--gpu-memory must be a positive number of GiB");
    }
    let shapes = read_shapes(settings, planned)?;
    let device = parse_device(&settings.train.device).unwrap_or(Device::Cuda(0));
    let dry = DryRun { t: &settings.train, shapes: &shapes, gpus, block_bytes: logits_block_bytes(device) as f64 };
    print_plan(settings, &dry, gpu_memory_gib);
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

/// Whether the recipe computes in bf16/f16 (fp32 masters); the recipe's dtype was checked by
/// `parse_dtype` when it was read, an unreadable one plans as half precision.
fn is_half(dtype: &str) -> bool {
    parse_dtype(dtype).map_or(true, |kind| kind != Kind::Float)
}

fn print_plan(settings: &Settings, dry: &DryRun, gpu_memory_gib: f64) {
    let (t, shapes, gpus) = (dry.t, dry.shapes, dry.gpus);
    let decoder = &shapes.decoder;
    let capacity = gpu_memory_gib * GIB * (1.0 - UNPLANNED_SHARE);
    println!("per-GPU memory plan: {gpus} GPU(s) × {gpu_memory_gib} GiB, {} compute, mode {:?}", if is_half(&t.dtype) { "bf16" } else { "f32" }, t.mode);
    println!(
        "  usable for the plan: {:.1} GiB ({:.0}% kept for the CUDA context, library workspaces, NCCL buffers and allocator fragmentation)",
        capacity / GIB,
        100.0 * UNPLANNED_SHARE
    );
    println!(
        "  full model: {}  ({:.2} B parameters)",
        settings.full.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into()),
        shapes.full.as_ref().map_or(0.0, |c| c.param_count() as f64) / 1e9
    );
    println!(
        "  decoder: {}  ({:.2} B parameters; hidden {}, intermediate {}, {} layers)",
        shapes.decoder_source,
        decoder.param_count() as f64 / 1e9,
        decoder.hidden_size,
        decoder.intermediate_size,
        decoder.num_hidden_layers
    );
    let own = Levers { zero_stage: t.zero_stage, activation_checkpointing: t.activation_checkpointing };
    let (plan, context) = dry.plan(own, t.per_device_batch_size);
    println!(
        "  per_device_batch_size {} × max_seq_length {} (worst split: {context} context tokens per row), zero_stage = {}, activation_checkpointing = {}",
        t.per_device_batch_size, t.max_seq_length, own.zero_stage, own.activation_checkpointing
    );
    for (phase, items) in [("kept through the run", &plan.states), ("forward + backward peak", &plan.activations), ("optimizer step peak", &plan.step)] {
        println!("  {phase}:");
        for item in items {
            println!("    {:<56} {:>9.2} GiB", item.what, item.bytes / GIB);
        }
    }
    println!("    {:<56} {:>9.2} GiB", "peak", plan.peak_bytes() / GIB);
    println!("  every combination at this batch (GiB per GPU):");
    let mut first_fit = None;
    for levers in ALL_LEVERS {
        let peak = dry.plan(levers, t.per_device_batch_size).0.peak_bytes();
        let fits = peak <= capacity;
        if fits && first_fit.is_none() {
            first_fit = Some(levers);
        }
        println!(
            "    zero_stage = {}, activation_checkpointing = {:<5}  {:>8.2}  {}",
            levers.zero_stage,
            levers.activation_checkpointing,
            peak / GIB,
            if fits { format!("fits ({:.1} GiB free)", (capacity - peak) / GIB) } else { format!("does NOT fit ({:.1} GiB over)", (peak - capacity) / GIB) }
        );
    }
    match first_fit {
        Some(levers) if levers == own => println!("  the recipe's settings fit"),
        Some(levers) => println!(
            "  fits with: --set train.zero_stage={} --set train.activation_checkpointing={} (the fastest combination that fits)",
            levers.zero_stage, levers.activation_checkpointing
        ),
        None => print_batch_that_fits(dry, capacity),
    }
    println!("  (planned from the code's allocations: within 2% of the tensor bytes of real CPU steps (bench-train); on a GPU not yet measured, see the README)");
}

/// No combination fits the recipe's batch: the largest per-device batch that fits with ZeRO-2
/// and recomputation, keeping the global batch through gradient accumulation.
fn print_batch_that_fits(dry: &DryRun, capacity: f64) {
    let t = dry.t;
    let levers = ALL_LEVERS[5];
    let rows_per_step = t.per_device_batch_size * t.gradient_accumulation_steps;
    let rows = (1..=rows_per_step).rev().find(|&r| rows_per_step % r == 0 && dry.plan(levers, r).0.peak_bytes() <= capacity);
    match rows {
        Some(rows) => println!(
            "  with zero_stage = 2, activation_checkpointing = true, per_device_batch_size = {rows} and gradient_accumulation_steps = {} (the same global batch) it fits: peak {:.1} GiB",
            rows_per_step / rows,
            dry.plan(levers, rows).0.peak_bytes() / GIB
        ),
        None => println!("  no per-device batch fits on this GPU even with ZeRO-2 and recomputation: more GPUs, or a smaller max_seq_length"),
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
