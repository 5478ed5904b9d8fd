//! Errors of the Calls door in OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`, which the official
//! SDKs turn into their exception classes (`BadRequestError`,
//! `RateLimitError`, …), with the headers that steer their retries:
//! `retry-after-ms` / `retry-after` (both SDKs wait exactly that long) and
//! `x-should-retry: false` where a retry cannot help.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::api::ApiError;
use crate::provider::headers::retry_after_headers;

/// One error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    /// The request field (or header) that was wrong.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after: Option<Duration>,
    /// Sent as `x-should-retry: false`: the SDK's automatic retry would
    /// only repeat what ratepool already tried within the call's wait.
    pub final_answer: bool,
    /// How the call ended, for `ratepool_calls_total{outcome}`.
    pub outcome: &'static str,
}

impl OpenAiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>, outcome: &'static str) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
            final_answer: false,
            outcome,
        }
    }

    /// A 400 naming the wrong `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            code: Some("invalid_value"),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message, "invalid")
        }
    }

    /// A 400 for a required `param` that is absent.
    pub fn missing(param: &str) -> Self {
        Self {
            code: Some("missing_required_parameter"),
            ..Self::invalid(param, format!("Missing required parameter: '{param}'."))
        }
    }

    /// A 400 for a body that is not a JSON object.
    pub fn not_json(message: impl Into<String>) -> Self {
        Self { param: None, code: None, ..Self::invalid("", message) }
    }

    pub fn model_not_served(model: &str, served: &[String]) -> Self {
        Self {
            code: Some("model_not_found"),
            ..Self::invalid(
                "model",
                format!("The model `{model}` is not served by this pool; it serves: {}.", served.join(", ")),
            )
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self {
            code: Some("request_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("The request body is larger than {limit} bytes ([calls] max_body_bytes)."),
                "invalid",
            )
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "Missing or incorrect API key: send a tenant key as `Authorization: Bearer KEY`.",
                "unauthorized",
            )
        }
    }

    /// The pool had no capacity for the call within its wait.
    pub fn no_capacity(waited_for: Duration, retry_in: Duration) -> Self {
        Self {
            code: Some("rate_limit_exceeded"),
            retry_after: Some(retry_in),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                format!(
                    "The pool had no capacity for this call within its wait of {:.3} s (the orgs' rate limits \
                     or this tenant's quota); capacity returns in {:.3} s. Retry then, or send a longer \
                     Ratepool-Max-Wait.",
                    waited_for.as_secs_f64(),
                    retry_in.as_secs_f64()
                ),
                "no_capacity",
            )
        }
    }

    /// Every org serving the model is unhealthy until `retry_in` has passed.
    pub fn unavailable(retry_in: Duration, reason: &str) -> Self {
        Self {
            code: Some("pool_unavailable"),
            retry_after: Some(retry_in),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", format!("{reason}."), "unavailable")
        }
    }

    /// The provider kept failing until the call's wait ran out.
    pub fn upstream(message: impl Into<String>) -> Self {
        Self {
            code: Some("upstream_failed"),
            final_answer: true,
            ..Self::new(StatusCode::BAD_GATEWAY, "upstream_error", message, "upstream_failed")
        }
    }

    /// Another request with the same key is still being answered.
    pub fn in_flight(retry_in: Duration) -> Self {
        Self {
            param: Some("Idempotency-Key".into()),
            code: Some("request_in_flight"),
            retry_after: Some(retry_in),
            ..Self::new(
                StatusCode::CONFLICT,
                "idempotency_error",
                "A request with this Idempotency-Key is still in flight; retry to get its answer.",
                "in_flight",
            )
        }
    }

    pub fn key_reused(message: impl Into<String>) -> Self {
        Self {
            param: Some("Idempotency-Key".into()),
            code: Some("idempotency_key_reused"),
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_error", message, "key_reused")
        }
    }

    /// Storage failed; the details go to the log, not to the client.
    pub fn storage(detail: &str) -> Self {
        tracing::error!(error = %detail, "storage error while answering a call");
        Self {
            retry_after: Some(Duration::from_secs(1)),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "Storage is unavailable; retry.", "error")
        }
    }

    /// The API in front of this deployment has no router (the Lambda).
    pub fn not_served_here() -> Self {
        Self {
            code: Some("calls_not_served"),
            final_answer: true,
            ..Self::new(
                StatusCode::NOT_IMPLEMENTED,
                "invalid_request_error",
                "This API endpoint (API Gateway / Lambda) does not make provider calls; send OpenAI-compatible \
                 calls to a `ratepool serve` process.",
                "not_served",
            )
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl From<ApiError> for OpenAiError {
    /// The shared request checks (authentication, body size, the key
    /// header) in this door's shape.
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Unauthorized => Self::unauthorized(),
            ApiError::Invalid { field, message } if field == "body" => Self::not_json(message),
            ApiError::Invalid { field, message } => Self::invalid(field, message),
            ApiError::TooLarge(message) => Self { message, ..Self::too_large(0) },
            other => Self::storage(&other.to_string()),
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        let headers = resp.headers_mut();
        if let Some(wait) = self.retry_after {
            headers.extend(retry_after_headers(wait));
        }
        if self.final_answer {
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(axum::http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn answer(e: OpenAiError) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let resp = e.into_response();
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn errors_have_openais_shape_and_name_the_field() {
        let (status, _, body) = answer(OpenAiError::missing("messages")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            body,
            json!({"error": {"message": "Missing required parameter: 'messages'.", "type": "invalid_request_error",
                             "param": "messages", "code": "missing_required_parameter"}})
        );
        let (_, _, body) = answer(OpenAiError::not_json("The request body is not valid JSON.")).await;
        assert_eq!(body["error"]["param"], serde_json::Value::Null);
        let (status, _, body) = answer(OpenAiError::model_not_served("gpt-typo", &["gpt-4o-mini".into()])).await;
        assert_eq!((status, body["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("model")));
        assert!(body["error"]["message"].as_str().unwrap().contains("gpt-4o-mini"));
    }

    #[tokio::test]
    async fn a_429_carries_exact_retry_headers() {
        let (status, headers, body) =
            answer(OpenAiError::no_capacity(Duration::from_millis(500), Duration::from_micros(7_250_400))).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["retry-after-ms"], "7251");
        assert_eq!(headers["retry-after"], "8");
        assert!(!headers.contains_key("x-should-retry"), "the SDK retries a 429 itself");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    }

    #[tokio::test]
    async fn a_502_tells_the_sdk_not_to_retry_and_401_asks_for_bearer() {
        let (status, headers, body) = answer(OpenAiError::upstream("gave up after 3 attempts: org-a: down")).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(headers["x-should-retry"], "false");
        assert_eq!(body["error"]["message"], "gave up after 3 attempts: org-a: down");
        let (status, headers, body) = answer(OpenAiError::from(ApiError::Unauthorized)).await;
        assert_eq!(
            (status, &headers["www-authenticate"]),
            (StatusCode::UNAUTHORIZED, &HeaderValue::from_static("Bearer"))
        );
        assert_eq!(body["error"]["code"], "invalid_api_key");
    }
}
