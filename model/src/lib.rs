//! The Llama 3.x / Qwen2.5 transformer on libtorch: configs, checkpoint IO, KV cache,
//! forward pass, generation (two-stage and speculative), (width) pruning, and the training loss.
pub mod calibrate;
pub mod checkpoint;
pub mod config;
pub mod file_digests;
pub mod generate;
pub mod kv_cache;
pub mod prune;
pub mod sampling;
pub mod speculative;
pub mod train;
pub mod transformer;
