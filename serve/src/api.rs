//! The OpenAI API's shapes: requests as clients send them, responses and stream chunks as
//! clients read them, and errors as `{"error": {"message", "type", "param", "code"}}`.
//!
//! Requests accept unknown fields (lm-evaluation-harness always sends `seed` and forwards its
//! task's `generation_kwargs` verbatim), but a known field of the wrong type is a 400 naming the
//! field. `prompt`, `stop` and message `content` take several shapes, so they are read as JSON
//! values and checked by hand, with messages that say what is accepted.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

/// An error answered to the client (never a crash of the server).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Reads a request body as `T`; a syntax error or a field of the wrong type is a 400 naming
/// the field (`param`).
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid(format!("the request body is not valid JSON: {inner}"), None)
        } else if path == "." {
            ApiError::invalid(format!("invalid request body: {inner}"), None)
        } else {
            ApiError::invalid(format!("invalid value for `{path}`: {inner}"), Some(&path))
        }
    })?;
    deserializer
        .end()
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    Ok(value)
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// A request to either endpoint: `/v1/completions` needs `prompt`, `/v1/chat/completions`
/// `messages` (one struct, so that a wrong type is reported with its field's path).
#[derive(Debug, Deserialize)]
pub struct GenerationRequest {
    /// Any name is served by the one model; read so that a non-string is refused.
    #[allow(dead_code)]
    pub model: Option<String>,
    /// Completions: a string, a list of strings, a list of token ids or a list of lists of ids.
    pub prompt: Option<Value>,
    /// Chat completions.
    pub messages: Option<Vec<ChatMessage>>,
    /// Completions; not supported (a 400 when true).
    pub echo: Option<bool>,
    pub max_tokens: Option<u64>,
    /// The chat API's newer name for max_tokens.
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// vLLM's extension; absent, 0 or -1 = no limit.
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    /// A string or a list of strings.
    pub stop: Option<Value>,
    /// vLLM's extension: more ids that end a sequence.
    pub stop_token_ids: Option<Vec<i64>>,
    /// vLLM's extension: do not stop at the model's end-of-sequence ids.
    pub ignore_eos: Option<bool>,
    pub n: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Not supported (a 400 unless absent, null, false or 0).
    pub logprobs: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// A string, null, or a list of `{"type": "text", "text": ...}` parts.
    #[serde(default)]
    pub content: Value,
}

/// `POST /tokenize` (vLLM's): `prompt` text or chat `messages`.
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    /// Text only; default true (as vLLM). lm-evaluation-harness sends false.
    pub add_special_tokens: Option<bool>,
}

/// `POST /detokenize` (vLLM's).
#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub tokens: Vec<i64>,
}

/// The prompts of a completion request.
pub enum Prompts {
    Texts(Vec<String>),
    Ids(Vec<Vec<i64>>),
}

pub fn read_prompts(prompt: &Value) -> Result<Prompts, ApiError> {
    let bad = || {
        ApiError::invalid(
            "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids",
            Some("prompt"),
        )
    };
    let ids = |v: &Value| -> Option<Vec<i64>> { v.as_array()?.iter().map(Value::as_i64).collect() };
    let prompts = match prompt {
        Value::String(s) => Prompts::Texts(vec![s.clone()]),
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid(
                "`prompt` is an empty list",
                Some("prompt"),
            ))
        }
        Value::Array(items) if items.iter().all(Value::is_string) => Prompts::Texts(
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
        ),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            Prompts::Ids(vec![ids(prompt).ok_or_else(bad)?])
        }
        Value::Array(items) if items.iter().all(Value::is_array) => Prompts::Ids(
            items
                .iter()
                .map(ids)
                .collect::<Option<_>>()
                .ok_or_else(bad)?,
        ),
        _ => return Err(bad()),
    };
    Ok(prompts)
}

/// `stop`: absent, null, a string or a list of strings.
pub fn read_stop(stop: &Option<Value>) -> Result<Vec<String>, ApiError> {
    match stop {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::invalid("`stop` must be a string or a list of strings", Some("stop"))
            }),
        Some(_) => Err(ApiError::invalid(
            "`stop` must be a string or a list of strings",
            Some("stop"),
        )),
    }
}

/// A message's text: a string, null (empty), or the text parts of a list.
pub fn message_text(content: &Value, i: usize) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match content {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                (Some("text"), Some(text)) => Ok(text.to_string()),
                _ => Err(ApiError::invalid(
                    format!("`{param}`: only parts of type \"text\" with a string \"text\" are supported"),
                    Some(&param),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.concat()),
        _ => Err(ApiError::invalid(
            format!("`{param}` must be a string, null or a list of text parts"),
            Some(&param),
        )),
    }
}

/// Token counts of a response.
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// The two generation endpoints (their request shapes and responses differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}
