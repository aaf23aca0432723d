//! What every request passes before a handler sees it: the API key of `/v1` endpoints, and its
//! body read whole within the size limit and the body deadline. Refusals are OpenAI-style
//! errors (401, 408, 413).
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use subtle::ConstantTimeEq;
use tokio_stream::StreamExt;

use super::api::ApiError;

/// The key clients must send as `Authorization: Bearer KEY` on `/v1` endpoints.
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: String) -> ApiKey {
        ApiKey(key)
    }

    /// The request carries the key; compared in constant time (the time taken does not say how
    /// much of a guess was right).
    fn accepts(&self, headers: &HeaderMap) -> bool {
        let Some(sent) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        sent.as_bytes().ct_eq(self.0.as_bytes()).into()
    }
}

/// The OpenAI API's paths need the key; `/health`, `/metrics` and the tokenizer endpoints stay
/// open, as in vLLM.
fn needs_key(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

async fn require_api_key(State(key): State<Arc<ApiKey>>, request: Request, next: Next) -> Response {
    if !needs_key(request.uri().path()) || key.accepts(request.headers()) {
        return next.run(request).await;
    }
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: "missing or incorrect API key: send the server's key (--api-key) as `Authorization: Bearer KEY`".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"),
    }
    .into_response()
}

#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    /// From the end of the headers until the whole body has arrived.
    pub timeout: Duration,
}

/// The 413 of a body over the server's limit.
pub fn body_too_large(limit: usize) -> ApiError {
    let mut error = ApiError::invalid(format!("the request body is larger than the server's limit of {limit} bytes (--max-body-bytes)"), None)
        .with_code("request_too_large");
    error.status = StatusCode::PAYLOAD_TOO_LARGE;
    error
}

/// Reads the whole body before the handler runs: over the limit is a 413 (at once when
/// Content-Length says so), not all there by the deadline is a 408 (and hyper then closes the
/// connection, so a stalled client is gone).
async fn read_body(State(limits): State<BodyLimits>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        return body_too_large(limits.max_bytes).into_response();
    }
    let deadline = tokio::time::Instant::now() + limits.timeout;
    let mut chunks = body.into_data_stream();
    let mut bytes = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, chunks.next()).await {
            Ok(None) => break,
            Ok(Some(Ok(chunk))) => {
                if bytes.len() + chunk.len() > limits.max_bytes {
                    return body_too_large(limits.max_bytes).into_response();
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(Some(Err(e))) => {
                return ApiError::invalid(format!("cannot read the request body: {e}"), None)
                    .into_response()
            }
            Err(_) => {
                let mut error = ApiError::invalid(
                    format!(
                        "the request body did not arrive within {} s ({} bytes came; --body-timeout)",
                        limits.timeout.as_secs_f64(),
                        bytes.len()
                    ),
                    None,
                )
                .with_code("request_timeout");
                error.status = StatusCode::REQUEST_TIMEOUT;
                return error.into_response();
            }
        }
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The router with the guards around it: the key (when there is one) first, then the body.
pub fn guard(router: Router, key: Option<ApiKey>, body: BodyLimits) -> Router {
    let router = router.layer(from_fn_with_state(body, read_body));
    match key {
        Some(key) => router.layer(from_fn_with_state(Arc::new(key), require_api_key)),
        None => router,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_needed_on_v1_paths_only() {
        assert!(needs_key("/v1/completions"));
        assert!(needs_key("/v1/models"));
        assert!(needs_key("/v1"));
        assert!(!needs_key("/v10"));
        assert!(!needs_key("/health"));
        assert!(!needs_key("/metrics"));
    }

    #[test]
    fn only_the_exact_bearer_key_is_accepted() {
        let key = ApiKey::new("sk-test".into());
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
            key.accepts(&headers)
        };
        assert!(with("Bearer sk-test"));
        assert!(!with("Bearer sk-tes"));
        assert!(!with("Bearer sk-test2"));
        assert!(!with("Bearer "));
        assert!(!with("sk-test"));
        assert!(!key.accepts(&HeaderMap::new()));
    }
}
