//! What one training process allocates, item by item, for given shapes: the planner behind
//! `overfill train --dry-run` and the `planned_*` figures of `overfill bench-train`, which
//! measures it against the process's real peak.
//!
//! Every item follows the code that allocates it:
//! - states (`optimizer`, `dist::zero`): the frozen full model and the decoder in the compute
//!   dtype; the decoder's `.grad` (kept between steps: `zero_grad` zeroes it in place); with a
//!   replicated optimizer in bf16 fp32 masters and fp32 gradient accumulators, in f32 neither (the
//!   parameters are the masters, `.grad` the accumulator); AdamW's two fp32 moments. ZeRO-1: a
//!   padded fp32 accumulator of all parameters, and this rank's fp32 slices of the summed
//!   gradients, masters, moments and weight-decay mask. ZeRO-2: the slices only, plus one bucket
//!   while a micro-batch's gradients are reduce-scattered.
//! - activations (`overfill_model::train::backward_loss_sum`): the full model's K/V of every
//!   layer (the prefill runs without grad, one layer's temporaries at a time); what autograd
//!   keeps of each decoder layer per computed slot — both RMSNorms' fp32 input, normalised value
//!   and output, the queries before RoPE, their rotated half and the result, the keys before RoPE
//!   and rotated, the attention's output, its contiguous copy for o_proj and its log-sum-exp, and
//!   the keys and values attended over (in OverFill mode concatenated with the full model's, so
//!   every layer keeps a copy of the context's K/V), the MLP's gate, SiLU, up and product. The LM
//!   head and loss run in blocks with each block's backward at once, so one block's log-softmax
//!   and two gradients of its size exist at a time. The peak is the larger of the loss phase and
//!   a layer's backward (its input and output gradients and temporaries). With activation
//!   recomputation the layers keep only their inputs: the loss phase runs over those, and the
//!   layer phase holds one layer's recomputed activations.
//!
//! Checked against libtorch's counted CPU tensor bytes by `pipeline/tests/memory_plan_cli.rs`
//! (three shapes, two batch sizes, with and without recomputation: within 1.6%).
//! - the optimizer step (after the backward has freed the activations): AdamW's temporaries of
//!   the largest parameter (replicated) or of the slice, and ZeRO's gather bucket.
//!
//! Not counted: the data batch (a few integers per token), the CUDA context and the caching
//! allocator's fragmentation (on a GPU: `budget` keeps a margin for them), libtorch's own buffers
//! and glibc's free lists (on a CPU the resident set is 1.3–1.6× the planned peak).
use overfill_model::config::ModelConfig;

use crate::config::TrainMode;

/// One step's shapes and the trainer's memory settings.
#[derive(Debug, Clone, Copy)]
pub struct StepShape<'a> {
    /// The frozen full model (OverFill mode only).
    pub full: Option<&'a ModelConfig>,
    pub decoder: &'a ModelConfig,
    pub mode: TrainMode,
    /// Compute dtype bf16/f16 (2 bytes, fp32 masters) rather than f32.
    pub half: bool,
    /// Rows per micro-batch, and each row's context and target tokens (y0..yN: N + 1 tokens).
    pub rows: usize,
    pub context_tokens: usize,
    pub target_tokens: usize,
    pub world_size: usize,
    pub zero_stage: u8,
    pub activation_checkpointing: bool,
    /// `overfill_model::train::logits_block_bytes` of the device.
    pub logits_block_bytes: f64,
}

/// One line of the plan.
#[derive(Debug, Clone)]
pub struct PlanItem {
    pub what: &'static str,
    pub bytes: f64,
}

/// The plan: what lives through the whole run, the forward/backward's peak on top of it, and the
/// optimizer step's.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub states: Vec<PlanItem>,
    pub activations: Vec<PlanItem>,
    pub step: Vec<PlanItem>,
}

impl MemoryPlan {
    pub fn states_bytes(&self) -> f64 {
        self.states.iter().map(|i| i.bytes).sum()
    }
    pub fn activation_bytes(&self) -> f64 {
        self.activations.iter().map(|i| i.bytes).sum()
    }
    pub fn step_bytes(&self) -> f64 {
        self.step.iter().map(|i| i.bytes).sum()
    }
    /// The process's peak: the states plus the larger of the backward's and the step's peaks.
    pub fn peak_bytes(&self) -> f64 {
        self.states_bytes() + self.activation_bytes().max(self.step_bytes())
    }
}

/// The ZeRO bucket of `dist::zero` (elements of all ranks' pieces together).
const ZERO_BUCKET_ELEMENTS: f64 = (1u64 << 25) as f64;

/// Plans one training process of these shapes.
pub fn plan(s: &StepShape) -> MemoryPlan {
    MemoryPlan { states: states(s), activations: activations(s), step: step_temporaries(s) }
}

fn states(s: &StepShape) -> Vec<PlanItem> {
    let cb = compute_bytes(s);
    let p = s.decoder.param_count() as f64;
    let n = s.world_size.max(1) as f64;
    let p_full = s.full.map_or(0.0, |c| c.param_count() as f64);
    let shard = (p / n).ceil();
    let mut items = vec![
        PlanItem { what: "full model weights (frozen)", bytes: p_full * cb },
        PlanItem { what: "decoder weights", bytes: p * cb },
        PlanItem { what: "decoder gradients (.grad)", bytes: p * cb },
    ];
    match s.zero_stage {
        0 => {
            if s.half {
                items.push(PlanItem { what: "fp32 gradient accumulators", bytes: 4.0 * p });
                items.push(PlanItem { what: "fp32 master weights", bytes: 4.0 * p });
            }
            items.push(PlanItem { what: "AdamW moments (fp32 m, v)", bytes: 8.0 * p });
        }
        stage => {
            if stage == 1 {
                items.push(PlanItem { what: "fp32 gradient accumulators (all parameters)", bytes: 4.0 * shard * n });
            }
            items.push(PlanItem { what: "fp32 summed-gradient slice", bytes: 4.0 * shard });
            items.push(PlanItem { what: "fp32 master slice + weight-decay mask", bytes: 8.0 * shard });
            items.push(PlanItem { what: "AdamW moment slices (fp32 m, v)", bytes: 8.0 * shard });
        }
    }
    items
}

/// Bytes autograd keeps per computed slot of one decoder layer, besides the keys and values it
/// attends over (see the module's documentation). Counted against libtorch's CPU allocator
/// (`overfill bench-train`): f32 on CPU, so the half-precision terms follow the same code by
/// reading, unmeasured.
fn saved_per_slot(c: &ModelConfig, s: &StepShape) -> f64 {
    let cb = compute_bytes(s);
    let (d, q, kv, i) = (
        c.hidden_size as f64,
        (c.num_attention_heads * c.head_dim) as f64,
        (c.num_key_value_heads * c.head_dim) as f64,
        c.intermediate_size as f64,
    );
    let norm = norm_saved_per_slot(d, cb);
    // Queries before RoPE, their rotated half and the result; the attention's output and its
    // log-sum-exp; the output made contiguous for o_proj; the keys before RoPE and rotated.
    let attention = 5.0 * cb * q + 4.0 * c.num_attention_heads as f64 + 2.0 * cb * kv;
    // gate, SiLU(gate), up, and their product.
    let mlp = 4.0 * cb * i;
    2.0 * norm + attention + mlp
}

/// Bytes an RMSNorm keeps per slot: its input in fp32 (in f32 the input itself), the normalised
/// x·rsqrt(mean x²) in the compute dtype, and the scaled output the next matmuls read.
fn norm_saved_per_slot(d: f64, cb: f64) -> f64 {
    4.0 * d + 2.0 * cb * d
}

/// Bytes of the temporaries of one decoder layer's backward (the larger of the MLP's and the
/// attention's): the gradients of its inputs and the weight gradient of its largest matrix.
fn layer_backward_bytes(c: &ModelConfig, cb: f64, slots: f64, attended: f64) -> f64 {
    let (d, q, kv, i) = (
        c.hidden_size as f64,
        (c.num_attention_heads * c.head_dim) as f64,
        (c.num_key_value_heads * c.head_dim) as f64,
        c.intermediate_size as f64,
    );
    let mlp = slots * 3.0 * cb * i + cb * i * d;
    let attention = slots * 3.0 * cb * q + attended * 2.0 * cb * kv + cb * q * d;
    mlp.max(attention)
}

fn activations(s: &StepShape) -> Vec<PlanItem> {
    let cb = compute_bytes(s);
    let c = s.decoder;
    let rows = s.rows as f64;
    let kv_dim = |m: &ModelConfig| (m.num_key_value_heads * m.head_dim) as f64;
    let (layers, d, vocab) = (c.num_hidden_layers as f64, c.hidden_size as f64, c.vocab_size as f64);
    let (context, predicted) = (s.context_tokens as f64, s.target_tokens.saturating_sub(1) as f64);
    // The decoder's slots, and the keys/values each of its layers attends over.
    let (slots, attended) = match s.mode {
        TrainMode::Overfill => (rows * predicted, rows * (context + predicted)),
        TrainMode::Pruned | TrainMode::Sft => (rows * (context + predicted), rows * (context + predicted)),
    };
    let scored = rows * predicted;
    let mut items = Vec::new();
    if let (TrainMode::Overfill, Some(full)) = (s.mode, s.full) {
        let kv = full.num_hidden_layers as f64 * 2.0 * kv_dim(full) * rows * context * cb;
        items.push(PlanItem { what: "full model K/V of the context", bytes: kv });
    }
    let layer_saved = slots * saved_per_slot(c, s) + 2.0 * attended * kv_dim(c) * cb;
    let hidden = slots * d * cb;

    // The loss phase: the final norm (as a layer's norm), the scored hidden states and their
    // gradient, and one block of the loss at its fullest — [rows, V] fp32 log-softmax, the
    // gradient of the NLL and of the logits at once — or later the LM head's weight gradient.
    let block_rows = (s.logits_block_bytes / (4.0 * vocab)).floor().max(1.0).min(scored.max(1.0));
    let loss_block = (12.0 * block_rows * vocab).max((4.0 + if s.half { cb } else { 0.0 }) * block_rows * vocab + vocab * d * cb);
    let final_norm = slots * norm_saved_per_slot(d, cb) + 2.0 * scored * d * cb;
    // The layer phase: the gradient arriving at a layer and the one it sends down, and the
    // layer's backward temporaries.
    let layer_backward = 2.0 * hidden + layer_backward_bytes(c, cb, slots, attended);

    if s.activation_checkpointing {
        // Each layer's input (and the last one's output while the loss runs); the activations of
        // one layer at a time, recomputed in the backward (its input is among the kept ones).
        let kept = layers * hidden;
        let recomputed = layer_saved - if s.half { 0.0 } else { slots * 4.0 * d };
        items.push(PlanItem { what: "decoder layer inputs (recomputation)", bytes: kept });
        // In f32 the last output is the final norm's fp32 input, counted there.
        let last_output = if s.half { hidden } else { 0.0 };
        if last_output + final_norm + loss_block >= recomputed + hidden + layer_backward {
            items.push(PlanItem { what: "last layer's output, final norm, scored hidden states", bytes: last_output + final_norm });
            items.push(PlanItem { what: "one block of logits, log-softmax and their gradients", bytes: loss_block });
        } else {
            items.push(PlanItem { what: "one decoder layer's activations (recomputed) and output", bytes: recomputed + hidden });
            items.push(PlanItem { what: "one layer's backward temporaries", bytes: layer_backward });
        }
    } else {
        items.push(PlanItem { what: "decoder activations (all layers)", bytes: layers * layer_saved });
        items.push(PlanItem { what: "final norm, scored hidden states", bytes: final_norm });
        if loss_block >= layer_backward {
            items.push(PlanItem { what: "one block of logits, log-softmax and their gradients", bytes: loss_block });
        } else {
            items.push(PlanItem { what: "one layer's backward temporaries", bytes: layer_backward });
        }
    }
    items
}

fn step_temporaries(s: &StepShape) -> Vec<PlanItem> {
    let p = s.decoder.param_count() as f64;
    let n = s.world_size.max(1) as f64;
    match s.zero_stage {
        // Per parameter: the scaled update's two fp32 temporaries (and its fp32 cast in bf16).
        0 => vec![PlanItem { what: "AdamW temporaries of the largest parameter", bytes: largest_matrix(s.decoder) * 4.0 * 3.0 }],
        _ => {
            // ZeRO-2's reduce-scatter after each micro-batch uses a bucket of the same size (its
            // phase is the step's, after the backward freed the activations).
            let shard = (p / n).ceil();
            let bucket = (ZERO_BUCKET_ELEMENTS / n).floor().max(1.0).min(shard) * n;
            vec![
                PlanItem { what: "AdamW temporaries of the slice", bytes: 5.0 * 4.0 * shard },
                PlanItem { what: "ZeRO bucket (fp32, gather or reduce-scatter)", bytes: 4.0 * bucket },
            ]
        }
    }
}

fn compute_bytes(s: &StepShape) -> f64 {
    if s.half {
        2.0
    } else {
        4.0
    }
}

/// Elements of the decoder's largest parameter (the embedding or LM head, usually).
fn largest_matrix(c: &ModelConfig) -> f64 {
    c.parameter_shapes().iter().map(|(_, shape)| shape.iter().product::<i64>() as f64).fold(0.0, f64::max)
}
