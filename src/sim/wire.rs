//! OpenAI's wire format as the simulator speaks it: the chat request it
//! reads, the error bodies and rate-limit headers it writes, and the Go-style
//! durations those headers use.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::domain::Micros;
use crate::provider::Reservation;
use crate::provider::headers::{format_go_duration, retry_after_headers};

use super::limits::{Refusal, Snapshot};
use super::text::ChatCall;

/// max_tokens when the request names none. OpenAI's default is the model's
/// whole output window; a moderate value keeps unbounded demo calls cheap.
pub(super) const DEFAULT_MAX_TOKENS: u64 = 1024;

/// Above every current model's output window; larger values are refused
/// like OpenAI refuses them, and bound the text we generate.
const MAX_MAX_TOKENS: u64 = 131_072;

#[derive(Deserialize)]
struct RawChat {
    model: String,
    messages: Vec<RawMessage>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct RawMessage {
    role: String,
    #[serde(default)]
    content: Option<RawContent>,
}

/// A message's content: a string, or content parts of which only the text
/// ones count toward the prompt.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawContent {
    Text(String),
    Parts(Vec<RawPart>),
}

#[derive(Deserialize)]
struct RawPart {
    #[serde(default)]
    text: Option<String>,
}

/// OpenAI's bounds on `n` and on the number of stop sequences.
const MAX_N: u64 = 128;
const MAX_STOP: usize = 4;

/// The body as a JSON object, or OpenAI's 400 for anything else.
fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid_request(format!("We could not parse the JSON body of your request. ({e})"), None, None)
    })?;
    match value {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::invalid_request("The request body must be a JSON object.".into(), None, None)),
    }
}

fn require(map: &Map<String, Value>, fields: &[&'static str]) -> Result<(), ApiError> {
    for &field in fields {
        if !map.contains_key(field) {
            return Err(ApiError::invalid_request(
                format!("Missing required parameter: '{field}'."),
                Some(field),
                Some("missing_required_parameter"),
            ));
        }
    }
    Ok(())
}

/// Reads a chat completion request; other fields are ignored as OpenAI's
/// optional parameters would be.
pub(super) fn parse_chat(body: &[u8]) -> Result<ChatCall, ApiError> {
    let map = object(body)?;
    require(&map, &["model", "messages"])?;
    let reservation = Reservation::of_chat(&map, DEFAULT_MAX_TOKENS);
    let raw: RawChat = serde_json::from_value(Value::Object(map))
        .map_err(|e| ApiError::invalid_request(format!("Invalid request body: {e}"), None, None))?;
    if raw.messages.is_empty() {
        return Err(ApiError::invalid_request(
            "'messages' must contain at least one message.".into(),
            Some("messages"),
            None,
        ));
    }
    // max_completion_tokens is the newer name; OpenAI honours it first.
    let (param, max_tokens) = match (raw.max_completion_tokens, raw.max_tokens) {
        (Some(n), _) => ("max_completion_tokens", n),
        (None, Some(n)) => ("max_tokens", n),
        (None, None) => ("max_tokens", DEFAULT_MAX_TOKENS),
    };
    if !(1..=MAX_MAX_TOKENS).contains(&max_tokens) {
        return Err(ApiError::invalid_request(
            format!("Invalid '{param}': {max_tokens}. It must be between 1 and {MAX_MAX_TOKENS}."),
            Some(param),
            Some("invalid_value"),
        ));
    }
    let n = raw.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid_request(
            format!("Invalid 'n': {n}. It must be between 1 and {MAX_N}."),
            Some("n"),
            Some("invalid_value"),
        ));
    }
    let stop = match raw.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid_request(
            format!("Invalid 'stop': at most {MAX_STOP} non-empty sequences."),
            Some("stop"),
            Some("invalid_value"),
        ));
    }
    let messages = raw
        .messages
        .into_iter()
        .map(|m| {
            let text = match m.content {
                None => String::new(),
                Some(RawContent::Text(t)) => t,
                Some(RawContent::Parts(parts)) => parts.into_iter().filter_map(|p| p.text).collect(),
            };
            (m.role, text)
        })
        .collect();
    let stream = raw.stream.unwrap_or(false).then(|| raw.stream_options.and_then(|o| o.include_usage).unwrap_or(false));
    Ok(ChatCall {
        model: raw.model,
        messages,
        max_tokens,
        temperature: raw.temperature,
        n,
        stop,
        seed: raw.seed,
        stream,
        reservation,
        response_format: raw.response_format,
        tools: raw.tools,
        tool_choice: raw.tool_choice,
    })
}

/// An embeddings request, as much of it as decides the answer.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct EmbeddingsCall {
    pub model: String,
    /// Each input as text (token-id inputs as their ids, space-separated).
    pub inputs: Vec<String>,
    pub dimensions: usize,
    pub reservation: Reservation,
}

/// The vector size when the request names none: small, so tests move
/// little data; the numbers mean nothing anyway.
const DEFAULT_DIMENSIONS: usize = 64;
const MAX_DIMENSIONS: u64 = 3072;
/// OpenAI's limit on inputs per request.
const MAX_INPUTS: usize = 2048;

pub(super) fn parse_embeddings(body: &[u8]) -> Result<EmbeddingsCall, ApiError> {
    let map = object(body)?;
    require(&map, &["model", "input"])?;
    let reservation = Reservation::of_embeddings(&map);
    let model = match map.get("model") {
        Some(Value::String(m)) => m.clone(),
        _ => return Err(ApiError::invalid_request("'model' must be a string.".into(), Some("model"), None)),
    };
    let bad_input = || {
        ApiError::invalid_request(
            "'input' must be a string, an array of strings, or an array of token arrays.".into(),
            Some("input"),
            Some("invalid_value"),
        )
    };
    let ids = |v: &Value| -> Option<String> {
        let ids: Option<Vec<String>> = v.as_array()?.iter().map(|i| i.as_u64().map(|n| n.to_string())).collect();
        ids.map(|i| i.join(" "))
    };
    let inputs: Vec<String> = match map.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(v @ Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_number) => {
            vec![ids(v).ok_or_else(bad_input)?]
        }
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Some(s.clone()),
                other => ids(other),
            })
            .collect::<Option<_>>()
            .ok_or_else(bad_input)?,
        _ => return Err(bad_input()),
    };
    if inputs.len() > MAX_INPUTS || inputs.iter().any(String::is_empty) {
        return Err(bad_input());
    }
    let dimensions = match map.get("dimensions") {
        None => DEFAULT_DIMENSIONS,
        Some(v) => match v.as_u64() {
            Some(d) if (1..=MAX_DIMENSIONS).contains(&d) => d as usize,
            _ => {
                return Err(ApiError::invalid_request(
                    format!("Invalid 'dimensions': it must be between 1 and {MAX_DIMENSIONS}."),
                    Some("dimensions"),
                    Some("invalid_value"),
                ));
            }
        },
    };
    Ok(EmbeddingsCall { model, inputs, dimensions, reservation })
}

/// An OpenAI-style error answer:
/// `{"error":{"message","type","param","code"}}` with its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub(super) fn invalid_request(message: String, param: Option<&'static str>, code: Option<&'static str>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message, kind: "invalid_request_error", param, code }
    }

    pub(super) fn invalid_api_key(message: String) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message,
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    pub(super) fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist or you do not have access to it."),
            kind: "invalid_request_error",
            param: None,
            code: Some("model_not_found"),
        }
    }

    pub(super) fn insufficient_quota() -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "You exceeded your current quota, please check your plan and billing details.".into(),
            kind: "insufficient_quota",
            param: None,
            code: Some("insufficient_quota"),
        }
    }

    /// OpenAI's 503 "Slow Down": the org asks for a lower request rate.
    pub(super) fn slow_down() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "Slow Down: a sudden increase in your request rate is impacting service reliability. \
                      Please reduce your request rate."
                .into(),
            kind: "slow_down",
            param: None,
            code: Some("slow_down"),
        }
    }

    pub(super) fn server_error(status: StatusCode) -> Self {
        let message = match status {
            StatusCode::BAD_GATEWAY => "Bad gateway.",
            StatusCode::SERVICE_UNAVAILABLE => "The server is overloaded or not ready yet.",
            _ => "The server had an error while processing your request. Sorry about that!",
        };
        Self { status, message: message.into(), kind: "server_error", param: None, code: None }
    }

    /// A per-day limit reached: a 429 like a per-minute one, but it will
    /// not clear within the minute.
    pub(super) fn day_limit_reached(model: &str, org: &str, retry_ms: u64) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "Rate limit reached for {model} in organization {org} on requests per day (RPD): \
                 Limit 10000, Used 10000, Requested 1. Please try again in {retry_ms}ms."
            ),
            kind: "requests",
            param: None,
            code: Some("rate_limit_exceeded"),
        }
    }

    pub(super) fn rate_limited(r: &Refusal, model: &str, org: &str) -> Self {
        let message = match r.retry_after {
            Some(wait) => format!(
                "Rate limit reached for {model} in organization {org} on {}: Limit {}, Used {}, Requested {}. \
                 Please try again in {}.",
                r.kind.label(),
                r.limit,
                r.used,
                r.requested,
                format_go_duration(micros_to_duration(wait)),
            ),
            None => format!(
                "Request too large for {model} in organization {org} on {}: Limit {}, Requested {}. \
                 The input or output tokens must be reduced in order to run successfully.",
                r.kind.label(),
                r.limit,
                r.requested,
            ),
        };
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message,
            kind: r.kind.as_str(),
            param: None,
            code: Some("rate_limit_exceeded"),
        }
    }

    pub(super) fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// OpenAI's `x-ratelimit-*` headers for one (org, model).
pub(super) fn ratelimit_headers(s: &Snapshot) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    put("x-ratelimit-limit-requests", s.limit_requests.to_string());
    put("x-ratelimit-limit-tokens", s.limit_tokens.to_string());
    put("x-ratelimit-remaining-requests", s.remaining_requests.to_string());
    put("x-ratelimit-remaining-tokens", s.remaining_tokens.to_string());
    put("x-ratelimit-reset-requests", format_go_duration(micros_to_duration(s.reset_requests)));
    put("x-ratelimit-reset-tokens", format_go_duration(micros_to_duration(s.reset_tokens)));
    h
}

/// `retry-after-ms` and `retry-after` for a wait of `wait` microseconds.
pub(super) fn retry_headers(wait: Micros) -> HeaderMap {
    retry_after_headers(micros_to_duration(wait))
}

fn micros_to_duration(us: Micros) -> Duration {
    Duration::from_micros(us.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_requests_parse_with_openai_defaults() {
        let c = parse_chat(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{}}]},
                {"role":"assistant","content":null}],"stream":false,"max_tokens":5}"#,
        )
        .unwrap();
        assert_eq!(c.max_tokens, 5);
        assert_eq!(c.messages[1].1, "a");
        assert_eq!(c.messages[2].1, "");
        let c = parse_chat(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":7,"max_tokens":9}"#,
        )
        .unwrap();
        assert_eq!(c.max_tokens, 7);
        let c = parse_chat(br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#).unwrap();
        assert_eq!((c.max_tokens, c.temperature), (DEFAULT_MAX_TOKENS, None));
    }

    #[test]
    fn malformed_requests_are_400_with_the_parameter() {
        let e = parse_chat(b"{nope").unwrap_err();
        assert_eq!((e.status, e.kind), (StatusCode::BAD_REQUEST, "invalid_request_error"));
        let e = parse_chat(br#"{"model":"m"}"#).unwrap_err();
        assert_eq!((e.param, e.code), (Some("messages"), Some("missing_required_parameter")));
        let e = parse_chat(br#"{"model":"m","messages":[]}"#).unwrap_err();
        assert_eq!(e.param, Some("messages"));
        let e = parse_chat(br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#).unwrap_err();
        assert_eq!(e.param, Some("max_tokens"));
        let e = parse_chat(br#"{"model":"m","messages":[{"content":"x"}]}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
