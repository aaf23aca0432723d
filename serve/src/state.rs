//! What every request handler shares: the engine's handle, the text codec, the metrics and the
//! server's limits.
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::text::TextCodec;

/// What requests may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_prompt_tokens: usize,
    pub max_tokens: usize,
    /// The model's max_position_embeddings: prompt + max_tokens must fit.
    pub context_length: usize,
    pub max_body_bytes: usize,
    pub vocab_size: usize,
}

/// The state behind every route.
pub struct AppState {
    pub engine: EngineHandle,
    pub codec: Arc<TextCodec>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// The name `/v1/models` lists and responses carry (requests may name any model).
    pub model_name: String,
    /// The model's end-of-sequence ids (generation_config.json / config.json).
    pub eos_token_ids: Vec<i64>,
    pub started: u64,
    pub next_id: AtomicU64,
}
