//! The OpenAI-compatible HTTP server of `overfill serve` for one model or a two-stage pair
//! (`--decoder`: the full model prefills, the pruned decoder decodes from its KV cache).
//!
//! - `http`: axum routes (`/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`,
//!   `/metrics`), JSON and server-sent-event responses.
//! - `request`: request checks, prompts to token ids, generation parameters.
//! - `state`: what every handler shares (engine handle, codec, metrics, limits).
//! - `api`: the OpenAI request/response/error shapes and the generation endpoints.
//! - `engine`: the continuous-batching engine on its own OS thread, owning the models.
//! - `batch_cache`: KV cache rows joining and leaving the running batch.
//! - `text`: prompts to ids as `overfill generate` encodes them, ids to text, stop strings.
//! - `metrics`: Prometheus counters, gauges and histograms.
//! - `connections`: HTTP/1.1 connections with the header timeout, and the shutdown deadline.
//! - `guards`: the API key of `/v1` endpoints, the body's size limit and deadline.
//!
//! SIGTERM (or Ctrl-C) stops accepting connections, lets every request in flight finish (for at
//! most `--shutdown-timeout`), then the engine thread ends and the process exits 0.
mod api;
mod batch_cache;
mod connections;
mod engine;
mod guards;
mod http;
mod metrics;
mod request;
mod state;
mod text;

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use overfill_model::config::ModelConfig;
use overfill_model::generate::check_two_stage;
use overfill_model::transformer::Transformer;
use tch::{Device, Kind};

pub use connections::ConnectionTimeouts;
pub use guards::{ApiKey, BodyLimits};
pub use state::Limits;

use engine::Models;
use metrics::Metrics;
use state::AppState;
use text::TextCodec;

/// What `serve` runs, resolved and checked by the command line.
pub struct ServeOptions {
    /// The model that prefills every prompt (and decodes without a decoder), and its config.
    pub model_dir: PathBuf,
    pub config: ModelConfig,
    /// Two-stage serving: the pruned decoder, checked against the model when loaded.
    pub decoder_dir: Option<PathBuf>,
    /// Lossless two-stage serving (`--speculative K`, needs the decoder): the decoder drafts up to
    /// K tokens, the model verifies them; every answer is the model's own.
    pub speculative: Option<usize>,
    pub device: Device,
    pub dtype: Kind,
    /// Intra-op threads for libtorch (default: libtorch's own choice).
    pub threads: Option<i32>,
    /// Chat template of /v1/chat/completions (as `overfill generate --template`).
    pub template: String,
    pub max_batch_size: usize,
    pub max_queue: usize,
    pub limits: Limits,
    /// The name `/v1/models` lists and responses carry.
    pub model_name: String,
    pub host: String,
    pub port: u16,
    /// Every /v1 endpoint needs `Authorization: Bearer KEY` when set.
    pub api_key: Option<ApiKey>,
    pub body_limits: BodyLimits,
    pub timeouts: ConnectionTimeouts,
    /// What the "listening on" line says about the set-up.
    pub banner: String,
}

/// Loads the models on the engine thread and serves HTTP until SIGTERM or Ctrl-C; requests in
/// flight finish first.
pub fn serve(options: ServeOptions) -> Result<()> {
    let ServeOptions {
        model_dir,
        config,
        decoder_dir,
        speculative,
        device,
        dtype,
        threads,
        template,
        max_batch_size,
        max_queue,
        limits,
        model_name,
        host,
        port,
        api_key,
        body_limits,
        timeouts,
        banner,
    } = options;
    let codec = Arc::new(TextCodec::load(&model_dir, &template, config.vocab_size)?);
    let metrics = Arc::new(Metrics::new()?);

    let load_dir = model_dir;
    if let Some(n) = threads {
        if n < 1 {
            bail!("--threads must be at least 1");
        }
    }
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
        Ok(Models { prefill, decode, speculative })
    };
    let engine_stopped = Arc::new(tokio::sync::Notify::new());
    let (engine, engine_thread) = engine::spawn(
        load,
        codec.clone(),
        max_batch_size,
        max_queue,
        metrics.clone(),
        engine_stopped.clone(),
    )?;
    let state = Arc::new(AppState {
        engine,
        codec,
        metrics,
        limits,
        model_name,
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
        let listener = tokio::net::TcpListener::bind((host.as_str(), port))
            .await
            .with_context(|| format!("cannot listen on {host}:{port}"))?;
        let address = listener.local_addr()?;
        if api_key.is_none() && !address.ip().is_loopback() {
            eprintln!(
                "warning: listening on {} without an API key: anyone who can reach this address can use the model; \
                 set OVERFILL_API_KEY (or --api-key)",
                address.ip()
            );
        }
        eprintln!("overfill serve: listening on http://{address} ({banner})");
        let app = guards::guard(http::router(state), api_key, body_limits);
        connections::serve(listener, app, timeouts, shutdown_signal(engine_stopped)).await
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
