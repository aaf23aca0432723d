//! The HTTP side: routes, and turning engine events into OpenAI responses (one JSON object,
//! or server-sent events ending with `data: [DONE]`); request checks live in `request`.
//!
//! Handlers never run a model: they tokenize, check limits, queue the sequences with the engine
//! and wait on a channel of events. Dropping that channel (the client went away, so axum drops
//! the handler or the stream) is how the engine learns to free the sequence's batch row.
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::api::{parse_body, usage, ApiError, DetokenizeRequest, Endpoint, TokenizeRequest};
use super::engine::{Event, FinishReason, Sequence, SubmitError};
use super::request::{body_error, chat_messages, prepare, Job};
use super::state::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    let max_body = state.limits.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/tokenizer_info", get(tokenizer_info))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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

/// vLLM's tokenizer endpoints, with which lm-evaluation-harness's default
/// `tokenizer_backend=auto` uses the server's own tokenizer (prompts then arrive as ids).
async fn tokenizer_info(State(state): State<Arc<AppState>>) -> Response {
    let codec = &state.codec;
    Json(json!({
        "eos_token": codec.eos_token,
        "bos_token": codec.bos_token,
        "pad_token": null,
        "chat_template": codec.chat_template(),
        "model_max_length": state.limits.context_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    .into_response()
}

async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let answer = || -> Result<Value, ApiError> {
        let bytes = body.map_err(|e| body_error(e, state.limits.max_body_bytes))?;
        let request: TokenizeRequest = parse_body(&bytes)?;
        let ids = match (&request.prompt, &request.messages) {
            (Some(text), None) => state
                .codec
                .encode_text_with(text, request.add_special_tokens.unwrap_or(true))
                .map_err(|e| ApiError::invalid(format!("{e:#}"), Some("prompt")))?,
            (None, Some(messages)) => state
                .codec
                .encode_chat(&chat_messages(messages)?)
                .map_err(|e| ApiError::invalid(format!("{e:#}"), Some("messages")))?,
            _ => {
                return Err(ApiError::invalid(
                    "give either `prompt` (text) or `messages`",
                    None,
                ))
            }
        };
        Ok(json!({
            "tokens": ids,
            "count": ids.len(),
            "max_model_len": state.limits.context_length,
        }))
    };
    match answer() {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let answer = || -> Result<Value, ApiError> {
        let bytes = body.map_err(|e| body_error(e, state.limits.max_body_bytes))?;
        let request: DetokenizeRequest = parse_body(&bytes)?;
        let vocab = state.limits.vocab_size as i64;
        if let Some(&id) = request.tokens.iter().find(|&&id| id < 0 || id >= vocab) {
            return Err(ApiError::invalid(
                format!("token id {id} is outside the model's vocabulary 0..{vocab}"),
                Some("tokens"),
            ));
        }
        Ok(json!({"prompt": state.codec.decode_with(&request.tokens, false)}))
    };
    match answer() {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn not_found() -> Response {
    let mut error = ApiError::invalid("no such endpoint", None);
    error.status = StatusCode::NOT_FOUND;
    error.into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let mut error = ApiError::invalid(format!("{method} is not allowed on {}", uri.path()), None);
    error.status = StatusCode::METHOD_NOT_ALLOWED;
    error.into_response()
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

/// Queues the job and answers: the whole response, or a stream (`true`).
async fn run(
    state: &Arc<AppState>,
    job: Job,
    endpoint: Endpoint,
    arrived: Instant,
) -> Result<(Response, bool), ApiError> {
    let events = submit(state, &job, arrived)?;
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
    let body = whole_response(state, events, endpoint, id, n).await?;
    Ok((Json(body).into_response(), false))
}

/// Hands the job's prompts to the engine as sequences; their events arrive on the returned
/// channel (429 when the queue is full).
fn submit(state: &AppState, job: &Job, arrived: Instant) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
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
    let (sender, events) = mpsc::unbounded_channel();
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
    Ok(events)
}

/// Waits for every sequence of a non-streaming request to finish; the response body.
async fn whole_response(
    state: &AppState,
    mut events: mpsc::UnboundedReceiver<Event>,
    endpoint: Endpoint,
    id: String,
    n: usize,
) -> Result<Value, ApiError> {
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
    Ok(json!({
        "id": id,
        "object": object,
        "created": unix_now(),
        "model": state.model_name,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }))
}

pub fn server_error(message: String) -> ApiError {
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
