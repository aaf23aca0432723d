//! `overfill serve`: an OpenAI-compatible HTTP server for one model or a two-stage pair
//! (`--decoder`: the full model prefills, the pruned decoder decodes from its KV cache).
//!
//! - `http`: axum routes (`/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`,
//!   `/metrics`), JSON and server-sent-event responses.
//! - `request`: request checks and limits, prompts to token ids, generation parameters.
//! - `api`: the OpenAI request/response/error shapes.
//! - `engine`: the continuous-batching engine on its own OS thread, owning the models.
//! - `batch_cache`: KV cache rows joining and leaving the running batch.
//! - `text`: prompts to ids as `overfill generate` encodes them, ids to text, stop strings.
//! - `metrics`: Prometheus counters, gauges and histograms.
//!
//! SIGTERM (or Ctrl-C) stops accepting connections, lets every request in flight finish, then
//! the engine thread ends and the process exits 0.
mod api;
mod batch_cache;
mod engine;
mod http;
mod metrics;
mod request;
mod text;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use overfill_model::checkpoint::{load_config, parse_device, parse_dtype, resolve_model_dir};
use overfill_model::generate::check_two_stage;
use overfill_model::transformer::Transformer;

use engine::Models;
use http::AppState;
use metrics::Metrics;
use request::Limits;
use text::TextCodec;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory (config.json + safetensors + tokenizer.json) or a hub id in the local
    /// HF cache. With --decoder it is the full model, which prefills every prompt.
    #[arg(long)]
    pub model: String,
    /// Two-stage serving: this (pruned) model decodes every token after the first from the full
    /// model's KV cache. It must agree with --model on layers, heads, KV heads, head_dim, rope
    /// and vocabulary.
    #[arg(long, value_name = "DIR")]
    pub decoder: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// TCP port; 0 picks a free one (the address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Sequences decoded together at most (each prompt of a request is one sequence).
    #[arg(long, default_value_t = 32)]
    pub max_batch_size: usize,
    /// Sequences waiting for a batch row at most; more are answered 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Longest prompt accepted, in tokens. Default: the model's max_position_embeddings.
    #[arg(long, value_name = "N")]
    pub max_prompt_tokens: Option<usize>,
    /// Largest max_tokens a request may ask for. Default: the model's max_position_embeddings.
    #[arg(long, value_name = "N")]
    pub max_tokens_limit: Option<usize>,
    /// Largest request body accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Chat template of /v1/chat/completions: llama3 (the recipes' default), chatml, model (the
    /// tokenizer_config.json's chat_template) or a Jinja file; as `overfill generate --template`.
    #[arg(long, default_value = "llama3")]
    pub template: String,
    /// Intra-op threads for libtorch (default: libtorch's own choice).
    #[arg(long, value_name = "N")]
    pub threads: Option<i32>,
    /// The model name listed by /v1/models and put in responses. Default: --model as given.
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    if args.max_batch_size == 0 {
        bail!("--max-batch-size must be at least 1");
    }
    if args.max_queue == 0 {
        bail!("--max-queue must be at least 1");
    }
    let dir = resolve_model_dir(&args.model)?;
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let config = load_config(&dir)?;
    crate::init_model::warn_unread_keys(&config, &dir.join("config.json"));
    let decoder_dir = crate::generate::resolve_decoder(args.decoder.as_deref(), &config, &dir)?;
    let context_length = config.max_position_embeddings;
    let limits = Limits {
        max_prompt_tokens: args.max_prompt_tokens.unwrap_or(context_length),
        max_tokens: args.max_tokens_limit.unwrap_or(context_length),
        context_length,
        max_body_bytes: args.max_body_bytes,
        vocab_size: config.vocab_size,
    };
    if limits.max_prompt_tokens == 0 || limits.max_tokens == 0 {
        bail!("--max-prompt-tokens and --max-tokens-limit must be at least 1");
    }
    let codec = Arc::new(TextCodec::load(&dir, &args.template, config.vocab_size)?);
    let metrics = Arc::new(Metrics::new()?);

    let load_dir = dir.clone();
    if let Some(n) = args.threads {
        if n < 1 {
            bail!("--threads must be at least 1");
        }
    }
    let threads = args.threads;
    let load = move || -> Result<Models> {
        if let Some(n) = threads {
            tch::set_num_threads(n);
        }
        let prefill = Transformer::load(&load_dir, device, dtype)
            .with_context(|| format!("loading model {}", load_dir.display()))?;
        let decode = match &decoder_dir {
            Some(d) => {
                let decoder = Transformer::load(d, device, dtype)
                    .with_context(|| format!("loading decoder {}", d.display()))?;
                check_two_stage(&prefill, &decoder)?;
                Some(decoder)
            }
            None => None,
        };
        Ok(Models { prefill, decode })
    };
    let engine_stopped = Arc::new(tokio::sync::Notify::new());
    let (engine, engine_thread) = engine::spawn(
        load,
        codec.clone(),
        args.max_batch_size,
        args.max_queue,
        metrics.clone(),
        engine_stopped.clone(),
    )?;
    let state = Arc::new(AppState {
        engine,
        codec,
        metrics,
        limits,
        model_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| args.model.clone()),
        eos_token_ids: config.eos_token_ids.clone(),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        next_id: AtomicU64::new(0),
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served: Result<()> = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let address = listener.local_addr()?;
        eprintln!(
            "overfill serve: listening on http://{address} (model {}{}, {}, {}, max batch {}, max queue {})",
            dir.display(),
            args.decoder
                .as_ref()
                .map(|d| format!(", decoder {d}"))
                .unwrap_or_default(),
            args.device,
            args.dtype,
            args.max_batch_size,
            args.max_queue,
        );
        axum::serve(listener, http::router(state))
            .with_graceful_shutdown(shutdown_signal(engine_stopped))
            .await
            .context("serving HTTP")?;
        Ok(())
    });
    // The last handles to the engine go with the runtime; the engine finishes what it holds.
    drop(runtime);
    served?;
    if engine_thread.join().is_err() {
        bail!("the engine thread panicked");
    }
    eprintln!("overfill serve: stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT), or when the engine thread has died (the exit status
/// then says so).
async fn shutdown_signal(engine_stopped: Arc<tokio::sync::Notify>) {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
        _ = engine_stopped.notified() => {
            eprintln!("overfill serve: the engine thread stopped; shutting down");
            return;
        }
    }
    eprintln!("overfill serve: shutting down (finishing requests in flight)");
}
