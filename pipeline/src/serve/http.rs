//! The HTTP side: routes, request checking, and turning engine events into OpenAI responses
//! (one JSON object, or server-sent events ending with `data: [DONE]`).
//!
//! Handlers never run a model: they tokenize, check limits, queue the sequences with the engine
//! and wait on a channel of events. Dropping that channel (the client went away, so axum drops
//! the handler or the stream) is how the engine learns to free the sequence's batch row.
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use overfill_data::conversation::{Message, Role};
use overfill_model::sampling::Sampling;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::api::{
    message_text, parse_body, read_prompts, read_stop, usage, ApiError, GenerationRequest, Prompts,
};
use super::engine::{EngineHandle, Event, FinishReason, GenerationParams, Sequence, SubmitError};
use super::metrics::Metrics;
use super::text::TextCodec;

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

pub fn router(state: Arc<AppState>) -> Router {
    let max_body = state.limits.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generation(state, body, Endpoint::Completions).await
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generation(state, body, Endpoint::Chat).await
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    Json(json!({"object": "list", "data": [{
        "id": state.model_name,
        "object": "model",
        "created": state.started,
        "owned_by": "overfill",
        "max_model_len": state.limits.context_length,
    }]}))
    .into_response()
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.engine.is_alive() {
        Json(json!({"status": "ok", "queued": state.engine.queued()})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "engine stopped"})),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> Response {
    let mut error = ApiError::invalid("no such endpoint", None);
    error.status = StatusCode::NOT_FOUND;
    error.into_response()
}

/// A checked request, ready for the engine.
struct Job {
    prompts: Vec<Vec<i64>>,
    params: GenerationParams,
    stream: bool,
    include_usage: bool,
}

async fn generation(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Response {
    let arrived = Instant::now();
    let result = match prepare(&state, body, endpoint) {
        Ok(job) => run(&state, job, endpoint, arrived).await,
        Err(e) => Err(e),
    };
    let (response, streaming) = match result {
        Ok(answer) => answer,
        Err(e) => (e.into_response(), false),
    };
    let status = response.status();
    state
        .metrics
        .requests
        .with_label_values(&[endpoint.name(), status.as_str()])
        .inc();
    // A stream's latency is recorded when it ends.
    if !streaming {
        state
            .metrics
            .request_latency
            .with_label_values(&[endpoint.name()])
            .observe(arrived.elapsed().as_secs_f64());
    }
    response
}

fn body_error(rejection: BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::invalid(
            format!("the request body is larger than the server's limit of {limit} bytes"),
            None,
        )
        .with_code("request_too_large")
    } else {
        ApiError::invalid(
            format!("cannot read the request body: {}", rejection.body_text()),
            None,
        )
    }
}

fn prepare(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Job, ApiError> {
    let limits = &state.limits;
    let bytes = body.map_err(|e| body_error(e, limits.max_body_bytes))?;
    let request: GenerationRequest = parse_body(&bytes)?;
    if request.n.unwrap_or(1) != 1 {
        return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
    }
    if request.echo == Some(true) {
        return Err(ApiError::invalid("echo is not supported", Some("echo")));
    }
    match &request.logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Number(n)) if n.as_u64() == Some(0) => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "logprobs are not supported",
                Some("logprobs"),
            ))
        }
    }
    let stop_strings = read_stop(&request.stop)?;

    let (prompts, param) = match endpoint {
        Endpoint::Completions => (completion_prompts(state, &request)?, "prompt"),
        Endpoint::Chat => (vec![chat_prompt(state, &request)?], "messages"),
    };
    for prompt in &prompts {
        if prompt.is_empty() {
            return Err(ApiError::invalid(
                format!("`{param}` has no tokens"),
                Some(param),
            ));
        }
        if prompt.len() > limits.max_prompt_tokens {
            return Err(ApiError::invalid(
                format!(
                    "the prompt has {} tokens, more than the server's limit of {} (--max-prompt-tokens)",
                    prompt.len(),
                    limits.max_prompt_tokens
                ),
                Some(param),
            )
            .with_code("context_length_exceeded"));
        }
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let room = limits.context_length.saturating_sub(longest);
    let max_tokens = match request.max_tokens.or(request.max_completion_tokens) {
        Some(0) => return Err(ApiError::invalid("max_tokens must be at least 1", Some("max_tokens"))),
        Some(m) if m > limits.max_tokens as u64 => {
            return Err(ApiError::invalid(
                format!(
                    "max_tokens is {m}, more than the server's limit of {} (--max-tokens-limit)",
                    limits.max_tokens
                ),
                Some("max_tokens"),
            ))
        }
        Some(m) if m as usize > room => {
            return Err(ApiError::invalid(
                format!(
                    "the prompt ({longest} tokens) plus max_tokens {m} is more than the model's context length {}",
                    limits.context_length
                ),
                Some("max_tokens"),
            )
            .with_code("context_length_exceeded"))
        }
        Some(m) => m as usize,
        // OpenAI's defaults: 16 for completions, as much as fits for chat.
        None => {
            let wanted = match endpoint {
                Endpoint::Completions => 16,
                Endpoint::Chat => limits.max_tokens,
            };
            if room == 0 {
                return Err(ApiError::invalid(
                    format!("the prompt fills the model's context length {}", limits.context_length),
                    Some(param),
                )
                .with_code("context_length_exceeded"));
            }
            wanted.min(room)
        }
    };

    let temperature = request.temperature.unwrap_or(1.0);
    let top_k = request
        .top_k
        .and_then(|k| usize::try_from(k).ok())
        .filter(|&k| k > 0);
    let seed = match request.seed {
        Some(seed) => seed as u64,
        // Unseeded sampling differs from request to request.
        None => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            nanos
                ^ state
                    .next_id
                    .fetch_add(1, Ordering::Relaxed)
                    .rotate_left(32)
        }
    };
    let sampling = Sampling::new(temperature, top_k, request.top_p.unwrap_or(1.0), seed)
        .map_err(|e| ApiError::invalid(format!("{e:#}"), None))?;

    let mut stop_ids = Vec::new();
    if request.ignore_eos != Some(true) {
        stop_ids.extend(&state.eos_token_ids);
        if endpoint == Endpoint::Chat {
            stop_ids.push(state.codec.end_of_turn_id());
        }
    }
    stop_ids.extend(request.stop_token_ids.iter().flatten());

    let stream = request.stream.unwrap_or(false);
    let include_usage = request
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    Ok(Job {
        prompts,
        params: GenerationParams {
            max_tokens,
            sampling,
            stop_strings,
            stop_ids,
        },
        stream,
        include_usage,
    })
}

fn completion_prompts(
    state: &AppState,
    request: &GenerationRequest,
) -> Result<Vec<Vec<i64>>, ApiError> {
    let Some(prompt) = &request.prompt else {
        return Err(ApiError::invalid("`prompt` is required", Some("prompt")));
    };
    match read_prompts(prompt)? {
        Prompts::Texts(texts) => texts
            .iter()
            .map(|text| {
                state
                    .codec
                    .encode_text(text)
                    .map_err(|e| ApiError::invalid(format!("{e:#}"), Some("prompt")))
            })
            .collect(),
        Prompts::Ids(prompts) => {
            let vocab = state.limits.vocab_size as i64;
            for ids in &prompts {
                if let Some(&id) = ids.iter().find(|&&id| id < 0 || id >= vocab) {
                    return Err(ApiError::invalid(
                        format!("token id {id} is outside the model's vocabulary 0..{vocab}"),
                        Some("prompt"),
                    ));
                }
            }
            Ok(prompts)
        }
    }
}

fn chat_prompt(state: &AppState, request: &GenerationRequest) -> Result<Vec<i64>, ApiError> {
    let Some(messages) = &request.messages else {
        return Err(ApiError::invalid(
            "`messages` is required",
            Some("messages"),
        ));
    };
    if messages.is_empty() {
        return Err(ApiError::invalid("`messages` is empty", Some("messages")));
    }
    let messages = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = Role::parse(&m.role).ok_or_else(|| {
                let param = format!("messages[{i}].role");
                ApiError::invalid(
                    format!("`{param}` is {:?}: system, user or assistant", m.role),
                    Some(&param),
                )
            })?;
            Ok(Message::new(role, message_text(&m.content, i)?))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    state
        .codec
        .encode_chat(&messages)
        .map_err(|e| ApiError::invalid(format!("{e:#}"), Some("messages")))
}

/// Queues the job and answers: the whole response, or a stream (`true`).
async fn run(
    state: &Arc<AppState>,
    job: Job,
    endpoint: Endpoint,
    arrived: Instant,
) -> Result<(Response, bool), ApiError> {
    if job.prompts.len() > state.engine.max_queue() {
        // Would be refused with 429 however long the client waited.
        return Err(ApiError::invalid(
            format!(
                "the request has {} prompts; the server queues at most {} (--max-queue)",
                job.prompts.len(),
                state.engine.max_queue()
            ),
            Some("prompt"),
        ));
    }
    let (sender, mut events) = mpsc::unbounded_channel();
    let sequences: Vec<Sequence> = job
        .prompts
        .iter()
        .enumerate()
        .map(|(index, prompt)| Sequence {
            index,
            prompt_ids: prompt.clone(),
            params: job.params.clone(),
            events: sender.clone(),
            arrived,
        })
        .collect();
    drop(sender);
    state.engine.submit(sequences).map_err(|e| match e {
        SubmitError::QueueFull { queued, max } => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "the server's queue is full ({queued} of {max} sequences waiting); retry later"
            ),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
        },
        SubmitError::Stopped => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the server is shutting down".into(),
            kind: "server_error",
            param: None,
            code: None,
        },
    })?;
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match endpoint {
        Endpoint::Completions => format!("cmpl-{:x}-{id}", state.started),
        Endpoint::Chat => format!("chatcmpl-{:x}-{id}", state.started),
    };
    let n = job.prompts.len();
    if job.stream {
        let response = stream(
            state.clone(),
            events,
            endpoint,
            id,
            n,
            job.include_usage,
            arrived,
        );
        return Ok((response, true));
    }

    let mut texts = vec![String::new(); n];
    let mut finish: Vec<Option<FinishReason>> = vec![None; n];
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    while finish.iter().any(Option::is_none) {
        match events.recv().await {
            Some(Event::Text { index, delta }) => texts[index].push_str(&delta),
            Some(Event::Done {
                index,
                finish_reason,
                prompt_tokens: p,
                completion_tokens: c,
            }) => {
                finish[index] = Some(finish_reason);
                prompt_tokens += p;
                completion_tokens += c;
            }
            Some(Event::Failed { message }) => return Err(server_error(message)),
            None => {
                return Err(server_error(
                    "the engine stopped before the answer was complete".into(),
                ))
            }
        }
    }
    let choices: Vec<Value> = texts
        .into_iter()
        .zip(finish)
        .enumerate()
        .map(|(index, (text, finish))| {
            let reason = finish.map(FinishReason::as_str);
            match endpoint {
                Endpoint::Completions => json!({
                    "index": index, "text": text, "logprobs": null, "finish_reason": reason,
                }),
                Endpoint::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": reason,
                }),
            }
        })
        .collect();
    let object = match endpoint {
        Endpoint::Completions => "text_completion",
        Endpoint::Chat => "chat.completion",
    };
    let body = json!({
        "id": id,
        "object": object,
        "created": unix_now(),
        "model": state.model_name,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    });
    Ok((Json(body).into_response(), false))
}

fn server_error(message: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message,
        kind: "server_error",
        param: None,
        code: None,
    }
}

/// Server-sent events in OpenAI's format: one chunk per piece of text, a chunk with each
/// choice's finish_reason, the usage chunk when asked for (`stream_options.include_usage`),
/// then `data: [DONE]`. A forwarding task turns engine events into chunks; when the client
/// disconnects, axum drops the stream, the task sees its channel closed and drops the engine
/// events, which frees the sequences' batch rows.
fn stream(
    state: Arc<AppState>,
    mut events: mpsc::UnboundedReceiver<Event>,
    endpoint: Endpoint,
    id: String,
    n: usize,
    include_usage: bool,
    arrived: Instant,
) -> Response {
    let (out, out_stream) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let created = unix_now();
    let object = match endpoint {
        Endpoint::Completions => "text_completion",
        Endpoint::Chat => "chat.completion.chunk",
    };
    let chunk = {
        let state = state.clone();
        move |choice: Option<Value>, usage: Option<Value>| {
            let mut body = json!({
                "id": id, "object": object, "created": created, "model": state.model_name,
                "choices": choice.map_or_else(|| json!([]), |c| json!([c])),
            });
            if let Some(usage) = usage {
                body["usage"] = usage;
            }
            Ok(SseEvent::default().data(body.to_string()))
        }
    };
    let text_choice = move |index: usize, text: Option<&str>, finish: Option<FinishReason>| {
        let reason = finish.map(FinishReason::as_str);
        match endpoint {
            Endpoint::Completions => json!({
                "index": index, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": reason,
            }),
            Endpoint::Chat => {
                let delta = match text {
                    Some(text) => json!({"content": text}),
                    None => json!({}),
                };
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": reason})
            }
        }
    };
    tokio::spawn(async move {
        if endpoint == Endpoint::Chat {
            // The role comes first, as OpenAI sends it.
            let first = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
            if out.send(chunk(Some(first), None)).await.is_err() {
                return;
            }
        }
        let (mut done, mut prompt_tokens, mut completion_tokens) = (0, 0, 0);
        while done < n {
            let event = tokio::select! {
                _ = out.closed() => return, // the client went away; `events` is dropped
                event = events.recv() => event,
            };
            let sent = match event {
                Some(Event::Text { index, delta }) => {
                    out.send(chunk(Some(text_choice(index, Some(&delta), None)), None))
                        .await
                }
                Some(Event::Done {
                    index,
                    finish_reason,
                    prompt_tokens: p,
                    completion_tokens: c,
                }) => {
                    done += 1;
                    prompt_tokens += p;
                    completion_tokens += c;
                    let text = (endpoint == Endpoint::Completions).then_some("");
                    out.send(chunk(
                        Some(text_choice(index, text, Some(finish_reason))),
                        None,
                    ))
                    .await
                }
                Some(Event::Failed { message }) => {
                    let _ = out
                        .send(Ok(
                            SseEvent::default().data(server_error(message).body().to_string())
                        ))
                        .await;
                    break;
                }
                None => break,
            };
            if sent.is_err() {
                return;
            }
        }
        if done == n && include_usage {
            let _ = out
                .send(chunk(None, Some(usage(prompt_tokens, completion_tokens))))
                .await;
        }
        let _ = out.send(Ok(SseEvent::default().data("[DONE]"))).await;
        state
            .metrics
            .request_latency
            .with_label_values(&[endpoint.name()])
            .observe(arrived.elapsed().as_secs_f64());
    });
    Sse::new(ReceiverStream::new(out_stream)).into_response()
}
