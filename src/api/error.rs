//! API errors: each variant is one HTTP status and a JSON body
//! `{"error": {"type", "message", "field"?}}` that names what was wrong.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::engine::quota::QuotaKind;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    NotReady(String),
    /// The request's `Idempotency-Key` was first used with another body.
    #[error("{0}")]
    IdempotencyMismatch(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("storage unavailable")]
    Unavailable(String),
    /// One of the tenant's quotas refuses the request; `retry_after_secs`
    /// goes out as the `Retry-After` header too.
    #[error("{message}")]
    QuotaExceeded { quota: QuotaKind, limit: u64, retry_after_secs: u64, message: String },
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid { field: field.into(), message: message.into() }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            e @ StorageError::IdempotencyMismatch { .. } => Self::IdempotencyMismatch(e.to_string()),
            StorageError::TooLarge(m) => Self::TooLarge(m),
            other => Self::Unavailable(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            Self::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::NotReady(_) => (StatusCode::CONFLICT, "conflict"),
            Self::IdempotencyMismatch(_) => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_conflict"),
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::QuotaExceeded { .. } => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
        };
        let message = match &self {
            Self::Invalid { message, .. } => message.clone(),
            Self::Unavailable(detail) => {
                // Details stay in our logs, not in the answer.
                tracing::error!(error = %detail, "storage error while answering a request");
                "storage is unavailable; retry later".to_string()
            }
            other => other.to_string(),
        };
        let mut body = serde_json::json!({"error": {"type": kind, "message": message}});
        match &self {
            Self::Invalid { field, .. } => body["error"]["field"] = field.clone().into(),
            Self::TooLarge(_) => body["error"]["field"] = "body".into(),
            Self::IdempotencyMismatch(_) => body["error"]["field"] = "Idempotency-Key".into(),
            Self::QuotaExceeded { quota, limit, retry_after_secs, .. } => {
                body["error"]["quota"] = quota.as_str().into();
                body["error"]["limit"] = (*limit).into();
                body["error"]["retry_after_secs"] = (*retry_after_secs).into();
            }
            _ => {}
        }
        let mut resp = (status, Json(body)).into_response();
        match &self {
            Self::Unauthorized => {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            }
            Self::QuotaExceeded { retry_after_secs, .. } => {
                resp.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(*retry_after_secs));
            }
            _ => {}
        }
        resp
    }
}
