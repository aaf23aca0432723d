//! Checking a request and turning it into a job for the engine: its prompts as token ids
//! (completions as `generate --raw` encodes text, chat as `generate --prompt/--messages`
//! renders it), the server's limits (prompt length, max_tokens, context length, body size) and
//! the generation parameters (sampling, stop strings and ids, max_tokens).
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use overfill_data::conversation::{Message, Role};
use overfill_model::sampling::Sampling;
use serde_json::Value;

use super::api::{
    message_text, parse_body, read_prompts, read_stop, ApiError, ChatMessage, Endpoint,
    GenerationRequest, Prompts,
};
use super::engine::GenerationParams;
use super::state::{AppState, Limits};

/// A checked request, ready for the engine.
pub struct Job {
    pub prompts: Vec<Vec<i64>>,
    pub params: GenerationParams,
    pub stream: bool,
    pub include_usage: bool,
}

pub fn body_error(rejection: BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        super::guards::body_too_large(limit)
    } else {
        ApiError::invalid(
            format!("cannot read the request body: {}", rejection.body_text()),
            None,
        )
    }
}

/// The checked job of a request's body, or the 400 that says what is wrong with it.
pub fn prepare(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Job, ApiError> {
    let bytes = body.map_err(|e| body_error(e, state.limits.max_body_bytes))?;
    let request: GenerationRequest = parse_body(&bytes)?;
    refuse_unsupported(&request)?;
    let stop_strings = read_stop(&request.stop)?;
    let (prompts, param) = checked_prompts(state, &request, endpoint)?;
    let max_tokens = max_tokens(&state.limits, &request, endpoint, &prompts, param)?;
    let sampling = sampling(state, &request)?;
    let stop_ids = stop_ids(state, &request, endpoint);
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

/// OpenAI parameters this server does not implement: n > 1, echo, logprobs.
fn refuse_unsupported(request: &GenerationRequest) -> Result<(), ApiError> {
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
    Ok(())
}

/// The request's prompts as token ids, each non-empty and within --max-prompt-tokens, with the
/// name of the parameter they came from (for errors).
fn checked_prompts(
    state: &AppState,
    request: &GenerationRequest,
    endpoint: Endpoint,
) -> Result<(Vec<Vec<i64>>, &'static str), ApiError> {
    let limits = &state.limits;
    let (prompts, param) = match endpoint {
        Endpoint::Completions => (completion_prompts(state, request)?, "prompt"),
        Endpoint::Chat => (vec![chat_prompt(state, request)?], "messages"),
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
    Ok((prompts, param))
}

/// max_tokens (or max_completion_tokens) within --max-tokens-limit and the room the longest
/// prompt leaves in the context; OpenAI's defaults when not given.
fn max_tokens(
    limits: &Limits,
    request: &GenerationRequest,
    endpoint: Endpoint,
    prompts: &[Vec<i64>],
    param: &'static str,
) -> Result<usize, ApiError> {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let room = limits.context_length.saturating_sub(longest);
    Ok(match request.max_tokens.or(request.max_completion_tokens) {
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
    })
}

/// Temperature, top-k, top-p and the seed (an unseeded request gets its own).
fn sampling(state: &AppState, request: &GenerationRequest) -> Result<Sampling, ApiError> {
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
    Sampling::new(temperature, top_k, request.top_p.unwrap_or(1.0), seed)
        .map_err(|e| ApiError::invalid(format!("{e:#}"), None))
}

/// The model's end-of-sequence ids (and, for chat, the end of turn) unless ignore_eos, plus the
/// request's stop_token_ids.
fn stop_ids(state: &AppState, request: &GenerationRequest, endpoint: Endpoint) -> Vec<i64> {
    let mut stop_ids = Vec::new();
    if request.ignore_eos != Some(true) {
        stop_ids.extend(&state.eos_token_ids);
        if endpoint == Endpoint::Chat {
            stop_ids.push(state.codec.end_of_turn_id());
        }
    }
    stop_ids.extend(request.stop_token_ids.iter().flatten());
    stop_ids
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
    let messages = chat_messages(messages)?;
    state
        .codec
        .encode_chat(&messages)
        .map_err(|e| ApiError::invalid(format!("{e:#}"), Some("messages")))
}

/// The turns of a chat request (roles as preprocess reads them: user/human, ...).
pub fn chat_messages(messages: &[ChatMessage]) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("`messages` is empty", Some("messages")));
    }
    messages
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
        .collect()
}
