//! The client for OpenAI-compatible endpoints (chat completions,
//! embeddings).
//!
//! It makes one call and classifies the answer; what to do about it (route
//! elsewhere, back off, fail the step) is the router's decision
//! (`crate::engine::router`). [`request`] builds what is sent and what it
//! reserves against an org's limits.

pub mod headers;
pub mod request;

use std::time::Duration;

use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::domain::{OrgName, Usage};
pub use headers::RateLimitHeaders;
pub use request::{Endpoint, InvalidRequest, ProviderRequest, Reservation, StreamMode};

/// One organization's endpoint. The key is a `SecretString`: it prints as
/// `[REDACTED]` and is exposed only to build the `Authorization` header.
#[derive(Debug, Clone)]
pub struct OrgEndpoint {
    pub name: OrgName,
    /// Base URL up to and including `/v1`, without trailing slash.
    pub base_url: String,
    pub api_key: SecretString,
    pub timeout: Duration,
}

/// A whole successful answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The provider's JSON body, as it sent it.
    pub body: Bytes,
    pub usage: Usage,
    pub limits: RateLimitHeaders,
}

/// A successful answer whose body has not been read: a stream's chunks
/// arrive on `response`.
#[derive(Debug)]
pub struct Opened {
    pub response: reqwest::Response,
    pub limits: RateLimitHeaders,
}

/// Why a call did not produce an answer, in the classes the router acts on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderFailure {
    /// 429 rate limit: this org is out of capacity for now.
    #[error("rate limited: {message}")]
    RateLimited { retry_after: Option<Duration>, limits: RateLimitHeaders, message: String },
    /// 429 insufficient_quota: billing; the org leaves the rotation.
    #[error("insufficient quota: {message}")]
    InsufficientQuota { message: String },
    /// 401/403: the org's key is refused; the org leaves the rotation.
    #[error("org credentials refused ({status}): {message}")]
    Unauthorized { status: u16, message: String },
    /// Another 4xx: the request itself is wrong; retrying will not help.
    /// `body` is the provider's answer as it sent it.
    #[error("request rejected by provider ({status}): {message}")]
    Request { status: u16, message: String, body: Bytes },
    /// 503 "Slow Down": the org is healthy but wants fewer requests; the
    /// router lowers its admitted rate for a while instead of backing off.
    #[error("provider asked to slow down: {message}")]
    SlowDown { retry_after: Option<Duration>, limits: RateLimitHeaders, message: String },
    /// 5xx: transient on the provider's side.
    #[error("provider error ({status}): {message}")]
    Server { status: u16, retry_after: Option<Duration>, limits: RateLimitHeaders, message: String },
    #[error("provider call timed out")]
    Timeout,
    /// The connection failed or was dropped before a whole answer arrived.
    #[error("connection error: {0}")]
    Connection(String),
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<String>,
}

/// The part of any answer body (a completion, an embeddings list, a
/// stream's usage chunk) that counts tokens.
#[derive(Deserialize)]
struct UsageOnly {
    #[serde(default)]
    usage: Option<UsageBody>,
}

#[derive(Deserialize)]
struct UsageBody {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

/// The usage of one answer body, if it has one (`None` also for a body that
/// is not JSON). `calls` is 1: the body is one call's.
pub fn usage_of(body: &[u8]) -> Option<Usage> {
    let u = serde_json::from_slice::<UsageOnly>(body).ok()?.usage?;
    Some(Usage { calls: 1, prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens })
}

/// The text of a chat completion's first choice (empty when it has none,
/// e.g. a tool call); an error if the body is not a completion.
pub fn first_choice_content(body: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Completion {
        choices: Vec<Choice>,
    }
    #[derive(Deserialize)]
    struct Choice {
        message: Message,
    }
    #[derive(Deserialize)]
    struct Message {
        #[serde(default)]
        content: Option<String>,
    }
    let c: Completion = serde_json::from_slice(body).map_err(|e| format!("unreadable completion: {e}"))?;
    Ok(c.choices.into_iter().next().and_then(|c| c.message.content).unwrap_or_default())
}

/// Error bodies are capped when quoted back to users.
const MAX_ERROR_MESSAGE: usize = 2_000;

/// One HTTP client shared by every org (connection pools are per host).
#[derive(Debug, Clone)]
pub struct ProviderClient {
    http: reqwest::Client,
}

impl ProviderClient {
    pub fn new() -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("ratepool/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self { http })
    }

    /// Makes one call and reads the whole answer. `client_request_id` is
    /// sent as `X-Client-Request-Id` (OpenAI's tracing header) so a call
    /// can be matched to its job step. The org's timeout covers the whole
    /// call; a 2xx body that is not JSON is a server error.
    pub async fn call(
        &self,
        org: &OrgEndpoint,
        req: &ProviderRequest,
        client_request_id: &str,
    ) -> Result<Answer, ProviderFailure> {
        let sent = self.post(org, req, client_request_id).timeout(org.timeout).send().await;
        let Opened { response, limits } = self.classify(sent).await?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(|e| transport_failure(&e))?;
        if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
            return Err(ProviderFailure::Server {
                status,
                retry_after: None,
                limits,
                message: "the answer is not JSON".into(),
            });
        }
        let usage = usage_of(&body).unwrap_or(Usage { calls: 1, ..Usage::default() });
        Ok(Answer { body, usage, limits })
    }

    /// Makes one call and returns once a successful answer's headers have
    /// arrived, its body unread: a stream is relayed as it comes. The org's
    /// timeout bounds the wait for the headers; the caller bounds the gaps
    /// between chunks.
    pub async fn open(
        &self,
        org: &OrgEndpoint,
        req: &ProviderRequest,
        client_request_id: &str,
    ) -> Result<Opened, ProviderFailure> {
        let answer = async { self.classify(self.post(org, req, client_request_id).send().await).await };
        tokio::time::timeout(org.timeout, answer).await.map_err(|_| ProviderFailure::Timeout)?
    }

    fn post(&self, org: &OrgEndpoint, req: &ProviderRequest, client_request_id: &str) -> reqwest::RequestBuilder {
        let url = format!("{}{}", org.base_url.trim_end_matches('/'), req.endpoint.path());
        self.http
            .post(url)
            .bearer_auth(org.api_key.expose_secret())
            .header("x-client-request-id", client_request_id)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(req.body.clone())
    }

    /// A 2xx answer with its headers read; any other status, read whole
    /// and sorted into the router's classes.
    async fn classify(&self, sent: Result<reqwest::Response, reqwest::Error>) -> Result<Opened, ProviderFailure> {
        let response = sent.map_err(|e| transport_failure(&e))?;
        let limits = RateLimitHeaders::from_headers(response.headers());
        if response.status().is_success() {
            return Ok(Opened { response, limits });
        }
        let status = response.status().as_u16();
        let retry_after = headers::retry_after(response.headers());
        let body = response.bytes().await.map_err(|e| transport_failure(&e))?;
        Err(classify_error(status, &body, retry_after, limits))
    }
}

/// An error and its whole source chain: reqwest's top-level message alone
/// ("error sending request") does not say whether the peer reset or closed.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

fn transport_failure(e: &reqwest::Error) -> ProviderFailure {
    if e.is_timeout() { ProviderFailure::Timeout } else { ProviderFailure::Connection(error_chain(e)) }
}

/// Sorts a non-2xx answer into the router's classes.
pub fn classify_error(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
    limits: RateLimitHeaders,
) -> ProviderFailure {
    let parsed: Option<ErrorBody> = serde_json::from_slice::<ErrorEnvelope>(body).ok().map(|e| e.error);
    let mut message = match &parsed {
        Some(b) if !b.message.is_empty() => b.message.clone(),
        _ => String::from_utf8_lossy(body).trim().to_string(),
    };
    if message.is_empty() {
        message = format!("HTTP {status}");
    }
    if message.len() > MAX_ERROR_MESSAGE {
        let mut cut = MAX_ERROR_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    let kind = parsed.as_ref().and_then(|b| b.kind.as_deref()).unwrap_or("");
    let code = parsed.as_ref().and_then(|b| b.code.as_deref()).unwrap_or("");
    match status {
        429 if kind == "insufficient_quota" || code == "insufficient_quota" => {
            ProviderFailure::InsufficientQuota { message }
        }
        // One request above the org's whole per-minute limit: no wait
        // makes it fit, so it is the request's fault, not the org's load.
        429 if is_request_too_large(&message) => {
            ProviderFailure::Request { status, message, body: Bytes::copy_from_slice(body) }
        }
        429 => ProviderFailure::RateLimited { retry_after, limits, message },
        401 | 403 => ProviderFailure::Unauthorized { status, message },
        408 => ProviderFailure::Timeout,
        503 if is_slow_down(kind, code, &message) => ProviderFailure::SlowDown { retry_after, limits, message },
        400..=499 => ProviderFailure::Request { status, message, body: Bytes::copy_from_slice(body) },
        _ => ProviderFailure::Server { status, retry_after, limits, message },
    }
}

/// OpenAI's 429 for a request larger than the org's limit allows at all:
/// "Request too large for gpt-4o in organization org-… on tokens per min
/// (TPM): Limit 30000, Requested 45000. …".
fn is_request_too_large(message: &str) -> bool {
    message.trim_start().to_ascii_lowercase().starts_with("request too large")
}

/// OpenAI's 503 "Slow Down" (a sudden rise in request rate): marked by a
/// `slow_down` type or code, or by the words in the message, whatever the
/// case. A plain 503 ("overloaded or not ready") stays a server error.
fn is_slow_down(kind: &str, code: &str, message: &str) -> bool {
    kind.eq_ignore_ascii_case("slow_down")
        || code.eq_ignore_ascii_case("slow_down")
        || message.to_ascii_lowercase().contains("slow down")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(status: u16, body: &str) -> ProviderFailure {
        classify_error(status, body.as_bytes(), None, RateLimitHeaders::default())
    }

    #[test]
    fn error_bodies_sort_into_router_classes() {
        let rl =
            r#"{"error":{"message":"Rate limit reached","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
        assert!(matches!(classify(429, rl), ProviderFailure::RateLimited { .. }));
        let iq = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        assert!(matches!(classify(429, iq), ProviderFailure::InsufficientQuota { .. }));
        let too_large = r#"{"error":{"message":"Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Requested 45000. The input or output tokens must be reduced in order to run successfully.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
        assert!(
            matches!(classify(429, too_large), ProviderFailure::Request { status: 429, .. }),
            "a request no wait can fit is the request's error"
        );
        let bad = r#"{"error":{"message":"'messages' is required","type":"invalid_request_error"}}"#;
        assert_eq!(
            classify(400, bad),
            ProviderFailure::Request {
                status: 400,
                message: "'messages' is required".into(),
                body: Bytes::copy_from_slice(bad.as_bytes())
            }
        );
        assert!(matches!(classify(401, "{}"), ProviderFailure::Unauthorized { status: 401, .. }));
        assert!(matches!(classify(503, "upstream overloaded"), ProviderFailure::Server { status: 503, .. }));
        assert!(
            matches!(classify(502, ""), ProviderFailure::Server { status: 502, ref message, .. } if message == "HTTP 502")
        );
    }

    #[test]
    fn slow_down_is_told_apart_from_other_503s() {
        let typed = r#"{"error":{"message":"Please reduce your rate of requests","type":"slow_down","code":null}}"#;
        assert!(matches!(classify(503, typed), ProviderFailure::SlowDown { .. }));
        let coded = r#"{"error":{"message":"x","type":"server_error","code":"SLOW_DOWN"}}"#;
        assert!(matches!(classify(503, coded), ProviderFailure::SlowDown { .. }));
        assert!(matches!(classify(503, "503 - Slow Down"), ProviderFailure::SlowDown { .. }));
        let overloaded = r#"{"error":{"message":"The server is overloaded or not ready yet.","type":"server_error"}}"#;
        assert!(matches!(classify(503, overloaded), ProviderFailure::Server { status: 503, .. }));
        // Only a 503 asks to slow down; the words elsewhere are just a server error.
        assert!(matches!(classify(500, "slow down"), ProviderFailure::Server { status: 500, .. }));
    }

    #[test]
    fn long_error_messages_are_capped_on_a_char_boundary() {
        let long = "é".repeat(5_000);
        match classify(400, &long) {
            ProviderFailure::Request { message, .. } => assert!(message.len() <= MAX_ERROR_MESSAGE),
            other => panic!("{other:?}"),
        }
    }
}
