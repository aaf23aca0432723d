//! The `[train]` table of a recipe: every hyper-parameter of `overfill train`, with the paper's
//! values as defaults (OverFill, Kim et al., Appendix: lr 2e-5, cosine, warmup 0.01, 2048 tokens,
//! per-device batch 4, accumulation 2, one epoch, bf16, seed 42). Unknown keys are errors.
use serde::{Deserialize, Serialize};

/// What is trained (issue 8): see `overfill train --help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TrainMode {
    /// The frozen full model prefills the context; the decoder is trained on the target span
    /// reading the full model's KV cache.
    Overfill,
    /// The paper's Pruned baseline: the pruned model alone over context ‖ target.
    Pruned,
    /// Any single model over context ‖ target (the Tuned baselines, or a model from scratch).
    Sft,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Linear warmup (peak × step / warmup steps, so never 0 at step 1), then cosine decay towards
    /// 0: Hugging Face's `get_cosine_schedule_with_warmup` at the 0-based step.
    Cosine,
    /// Linear warmup, then constant.
    Constant,
}

/// `[train]`. Paths are relative to the directory the command runs in (the repo root for `just`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub mode: TrainMode,
    /// The frozen full model (overfill mode). Default: the recipe's `[model] path`.
    pub full: Option<String>,
    /// The trainable model. Default: the recipe's `[prune] out`.
    pub decoder: Option<String>,
    /// Token shards. Default: the recipe's `[data] shards`.
    pub data: Option<String>,
    /// The run folder (checkpoints, final decoder, TensorBoard events, resolved recipe).
    pub out: Option<String>,
    pub learning_rate: f64,
    pub lr_schedule: LrSchedule,
    /// Share of the optimizer steps spent in linear warmup.
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub max_grad_norm: f64,
    /// Context + target tokens per row at most; longer rows are truncated from the target's end.
    pub max_seq_length: usize,
    /// Rows per micro-batch on each device.
    pub per_device_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub num_epochs: usize,
    /// Stop after this many optimizer steps (default: the whole `num_epochs`).
    pub max_steps: Option<u64>,
    /// Compute dtype: bf16 (fp32 master weights and optimizer state) or f32.
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    pub device: String,
    pub seed: u64,
    /// Optimizer steps between console/TensorBoard logs.
    pub logging_steps: u64,
    /// Optimizer steps between validation losses (0 = only at the end).
    pub eval_steps: u64,
    /// Validation rows used per evaluation at most (0 = the whole split).
    pub eval_max_rows: usize,
    /// Optimizer steps between checkpoints (0 = only the final decoder).
    pub save_steps: u64,
    /// Checkpoints kept (the newest).
    pub save_total_limit: usize,
    /// Abort after this many consecutive steps with a non-finite loss or gradient.
    pub max_bad_steps: u64,
    /// Rows are sorted by length within windows of this many global batches.
    pub length_group_batches: usize,
    /// Batches prepared ahead by the loader thread.
    pub prefetch_batches: usize,
    /// Intra-op threads for libtorch (0 = libtorch's default).
    pub threads: usize,
    /// Data parallelism: 0 = every rank keeps the whole optimizer state; 1 = ZeRO stage 1 (fp32
    /// master weights and AdamW moments sharded over the ranks; same results); 2 = ZeRO stage 2
    /// (also the fp32 gradient accumulators, reduce-scattered after every micro-batch). Resume
    /// needs the same world size (1 and 2 write the same optimizer files).
    pub zero_stage: u8,
    /// Each decoder layer keeps only its input in the forward and recomputes its activations in
    /// the backward: the same gradients for less activation memory and about one more forward
    /// of the decoder per step.
    pub activation_checkpointing: bool,
    /// Seconds a collective waits for the other ranks before this rank fails, naming them.
    pub collective_timeout_secs: u64,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            mode: TrainMode::Overfill,
            full: None,
            decoder: None,
            data: None,
            out: None,
            learning_rate: 2e-5,
            lr_schedule: LrSchedule::Cosine,
            warmup_ratio: 0.01,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            max_seq_length: 2048,
            per_device_batch_size: 4,
            gradient_accumulation_steps: 2,
            num_epochs: 1,
            max_steps: None,
            dtype: "bf16".into(),
            device: "cuda".into(),
            seed: 42,
            logging_steps: 10,
            eval_steps: 500,
            eval_max_rows: 0,
            save_steps: 500,
            save_total_limit: 2,
            max_bad_steps: 10,
            length_group_batches: 64,
            prefetch_batches: 4,
            threads: 0,
            zero_stage: 0,
            activation_checkpointing: false,
            collective_timeout_secs: 600,
        }
    }
}
