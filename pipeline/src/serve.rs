//! `overfill serve`: an OpenAI-compatible HTTP server for one model or a two-stage pair
//! (`--decoder`: the full model prefills, the pruned decoder decodes from its KV cache); the server
//! itself is the `overfill-serve` crate.
use anyhow::{bail, Result};
use overfill_model::checkpoint::{load_config, parse_device, parse_dtype, resolve_model_dir};
use overfill_serve::{ApiKey, BodyLimits, ConnectionTimeouts, Limits, ServeOptions};

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
    /// Lossless two-stage serving (needs --decoder): the decoder drafts up to K tokens per step
    /// and the model verifies them in one pass, so every answer is the model's own (as
    /// `overfill generate --speculative K`): greedy requests token for token, sampled ones (each
    /// with its own sampler) in distribution, by the speculative-sampling rule.
    #[arg(long, value_name = "K", requires = "decoder")]
    pub speculative: Option<usize>,
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
    /// Chat template of /v1/chat/completions: auto (the model's own; llama3 when its tokenizer
    /// has none), llama3, chatml, model or a Jinja file; as `overfill generate --template`.
    #[arg(long, default_value = "auto")]
    pub template: String,
    /// Intra-op threads for libtorch (default: libtorch's own choice).
    #[arg(long, value_name = "N")]
    pub threads: Option<i32>,
    /// The model name listed by /v1/models and put in responses. Default: --model as given.
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Every /v1 endpoint then needs `Authorization: Bearer KEY` (401 otherwise); /health,
    /// /metrics and the tokenizer endpoints stay open. Better given as OVERFILL_API_KEY, which
    /// other users cannot read in `ps`.
    #[arg(long, env = "OVERFILL_API_KEY", hide_env_values = true, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Seconds a connection may take to send a request's headers, counted from when it opens or
    /// its previous response ends: so also how long an idle keep-alive connection stays open.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub header_timeout: f64,
    /// Seconds a request's body may take to arrive after its headers (408 after that).
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub body_timeout: f64,
    /// Seconds from SIGTERM/Ctrl-C until the server stops: requests in flight finish within this,
    /// connections still open after it are closed.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub shutdown_timeout: f64,
}

/// Seconds from a flag as a duration; refuses 0, negatives and non-numbers.
fn seconds(value: f64, flag: &str) -> Result<std::time::Duration> {
    match std::time::Duration::try_from_secs_f64(value) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        _ => bail!("{flag} must be a positive number of seconds, got {value}"),
    }
}

/// `overfill serve`: the flags checked and resolved (model folder, config, decoder, limits), then
/// the server until SIGTERM or Ctrl-C.
pub fn run(args: Args) -> Result<()> {
    if args.max_batch_size == 0 {
        bail!("--max-batch-size must be at least 1");
    }
    if args.max_queue == 0 {
        bail!("--max-queue must be at least 1");
    }
    if args.speculative == Some(0) {
        bail!("--speculative needs at least 1 draft token per step");
    }
    let timeouts = ConnectionTimeouts {
        header: seconds(args.header_timeout, "--header-timeout")?,
        shutdown: seconds(args.shutdown_timeout, "--shutdown-timeout")?,
    };
    let body_limits = BodyLimits { max_bytes: args.max_body_bytes, timeout: seconds(args.body_timeout, "--body-timeout")? };
    let api_key = match args.api_key.clone() {
        Some(key) if key.is_empty() => bail!("--api-key (or OVERFILL_API_KEY) is empty"),
        key => key.map(ApiKey::new),
    };
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
    let decoder_note = match (&args.decoder, args.speculative) {
        (Some(d), Some(k)) => format!(", decoder {d} drafting {k} tokens for it to verify (speculative)"),
        (Some(d), None) => format!(", decoder {d}"),
        (None, _) => String::new(),
    };
    overfill_serve::serve(ServeOptions {
        banner: format!(
            "model {}{decoder_note}, {}, {}, max batch {}, max queue {}",
            dir.display(),
            args.device,
            args.dtype,
            args.max_batch_size,
            args.max_queue
        ),
        model_name: args.served_model_name.clone().unwrap_or_else(|| args.model.clone()),
        model_dir: dir,
        config,
        decoder_dir,
        speculative: args.speculative,
        device,
        dtype,
        threads: args.threads,
        template: args.template,
        max_batch_size: args.max_batch_size,
        max_queue: args.max_queue,
        limits,
        host: args.host,
        port: args.port,
        api_key,
        body_limits,
        timeouts,
    })
}
