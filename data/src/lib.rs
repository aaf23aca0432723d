//! `overfill-data`: instruction data → chat-templated context/target token shards, and the
//! reader later stages use.
//!
//! - [`source`]: input files (OpenHermes JSON array, JSONL, Infinity-Instruct Parquet).
//! - [`conversation`]: normalised roles and turns.
//! - [`filter`]: per-row processing and the reasons rows are dropped.
//! - [`template`]: chat templates (Llama-3 as in the paper, Qwen ChatML, model or file).
//! - [`tokenize`]: tokenizer loading and the context/target split on token ids.
//! - [`shard`], [`manifest`]: Parquet shards, statistics, `manifest.json`.
//! - [`preprocess`]: the stage itself (streaming, parallel, resumable).
//! - [`out_lock`], [`owned_files`]: one run per output folder at a time, and only files a stage
//!   created are ever deleted or replaced (shared with calibrate-prune and training).
//! - [`distill`]: prompts and the resumable output folder of `overfill distill` (the full model's answers).
//! - [`reader`]: random access, length-grouped batches, rank sharding, calibration samples.
//! - [`synth`]: synthetic datasets and a tiny byte-level tokenizer for tests and the demo.
//! - [`synth_tasks`]: the demo's tasks (answers depend on the prompt), held-out prompts, a trained BPE tokenizer.
//! - [`recipe`]: the data part of `configs/*.toml`.
pub mod conversation;
pub(crate) mod digest;
pub mod distill;
pub mod filter;
pub mod manifest;
pub mod order;
pub mod out_lock;
pub mod owned_files;
pub mod preprocess;
pub mod reader;
pub mod recipe;
pub mod shard;
pub mod source;
pub mod synth;
pub mod synth_tasks;
pub mod template;
pub mod tokenize;
