//! Delivering a webhook: resolve and check the target, pin the connection,
//! sign, POST, and retry with backoff; and the engine's notifier built on it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use url::{Host, Url};

use super::{SIGNATURE_HEADER, WebhookPayload, sign};
use crate::backoff::full_jitter;
use crate::domain::{Clock, TenantId};
use crate::engine::JobNotifier;
use crate::ssrf::{WebhookUrlError, check_addr, check_url};
use crate::storage::{DeliveryReport, DeliveryStatus, JobRecord};

/// Resolves the URL's host and checks every address: one bad answer among
/// good ones refuses the whole target, since the connector may pick any.
async fn resolve_checked(url: &Url, policy: &DeliveryPolicy) -> Result<Vec<SocketAddr>, AttemptError> {
    let host = url.host_str().ok_or(AttemptError::Refused(WebhookUrlError::NoHost))?;
    let port = url.port_or_known_default().unwrap_or(443);
    let name = host.trim_start_matches('[').trim_end_matches(']');
    let lookup = tokio::time::timeout(policy.timeout, tokio::net::lookup_host((name, port)))
        .await
        .map_err(|_| AttemptError::Retry(format!("resolving {host} timed out")))?
        .map_err(|e| AttemptError::Retry(format!("resolving {host} failed: {e}")))?;
    let addrs: Vec<SocketAddr> = lookup.collect();
    if addrs.is_empty() {
        return Err(AttemptError::Retry(format!("{host} resolved to no address")));
    }
    if !policy.allow_private {
        for a in &addrs {
            check_addr(host, a.ip()).map_err(AttemptError::Refused)?;
        }
    }
    Ok(addrs)
}

/// How hard to try. Attempts are spaced by full-jitter exponential backoff
/// (`crate::backoff::full_jitter`) so a receiver coming back from an
/// outage is not hit by every pending delivery at once.
#[derive(Debug, Clone)]
pub struct DeliveryPolicy {
    /// Attempts in all, the first included (at least 1 is made).
    pub max_attempts: u32,
    /// Ceiling of the first backoff; doubles per retry.
    pub base_delay: Duration,
    /// Ceiling of any one backoff.
    pub max_delay: Duration,
    /// Per attempt: DNS, and then connect, send and response headers.
    pub timeout: Duration,
    /// Lets deliveries reach loopback and private networks: for tests and
    /// on-prem installs whose receivers live inside the network.
    pub allow_private: bool,
}

impl Default for DeliveryPolicy {
    /// About 4 minutes of retries at most (1 + 2 + … + 64 s ceilings, then
    /// capped at 60 s), which outlasts a receiver's restart or deploy.
    fn default() -> Self {
        Self {
            max_attempts: 8,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            allow_private: false,
        }
    }
}

/// One attempt's failure, sorted by whether another attempt can help.
#[derive(Debug)]
enum AttemptError {
    /// The target is refused by the SSRF policy: never retried.
    Refused(WebhookUrlError),
    /// The receiver answered with a final refusal (3xx, 4xx but 408/429).
    Permanent {
        status: u16,
        message: String,
    },
    /// Worth another attempt: 5xx, 408, 429, DNS, connect, timeout.
    Retry(String),
    RetryStatus {
        status: u16,
        message: String,
    },
}

impl AttemptError {
    fn status(&self) -> Option<u16> {
        match self {
            Self::Permanent { status, .. } | Self::RetryStatus { status, .. } => Some(*status),
            Self::Refused(_) | Self::Retry(_) => None,
        }
    }
    fn retryable(&self) -> bool {
        matches!(self, Self::Retry(_) | Self::RetryStatus { .. })
    }
    fn message(&self) -> String {
        match self {
            Self::Refused(e) => e.to_string(),
            Self::Permanent { message, .. } | Self::RetryStatus { message, .. } | Self::Retry(message) => {
                message.clone()
            }
        }
    }
}

/// Sorts an answer's status: `Ok` is delivered.
fn classify_status(status: u16) -> Result<(), AttemptError> {
    match status {
        200..=299 => Ok(()),
        300..=399 => Err(AttemptError::Permanent {
            status,
            message: format!("HTTP {status}: redirects are not followed; configure the final URL"),
        }),
        408 | 429 => Err(AttemptError::RetryStatus { status, message: format!("HTTP {status}") }),
        400..=499 => {
            Err(AttemptError::Permanent { status, message: format!("HTTP {status}: refused by the receiver") })
        }
        _ => Err(AttemptError::RetryStatus { status, message: format!("HTTP {status}") }),
    }
}

/// Delivers `payload` to `target`, retrying per `policy`, and reports the
/// outcome; it never returns early with an error, because the report is what
/// gets stored on the job. The signature timestamp is taken from `clock` on
/// every attempt, so a late retry is still within the receiver's tolerance.
pub async fn deliver(
    target: &str,
    secret: &SecretString,
    payload: &WebhookPayload,
    policy: &DeliveryPolicy,
    clock: &dyn Clock,
) -> DeliveryReport {
    let failed = |attempts, last_error: String, last_status| DeliveryReport {
        status: DeliveryStatus::Failed,
        attempts,
        last_error: Some(last_error),
        last_status,
    };
    let url = match check_url(target, policy.allow_private) {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(job_id = %payload.id, error = %e, "webhook URL refused");
            return failed(0, e.to_string(), None);
        }
    };
    let host = url.host_str().unwrap_or_default().to_string();
    let body = match serde_json::to_vec(payload) {
        Ok(b) => b,
        Err(e) => return failed(0, format!("cannot serialize the payload: {e}"), None),
    };
    let max_attempts = policy.max_attempts.max(1);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let timestamp = u64::try_from(clock.now() / 1_000_000).unwrap_or_default();
        match attempt_once(&url, secret, timestamp, &body, policy).await {
            Ok(status) => {
                tracing::info!(job_id = %payload.id, host = %host, attempt, status, "webhook delivered");
                return DeliveryReport {
                    status: DeliveryStatus::Delivered,
                    attempts: attempt,
                    last_error: None,
                    last_status: Some(status),
                };
            }
            Err(e) => {
                let will_retry = e.retryable() && attempt < max_attempts;
                tracing::warn!(
                    job_id = %payload.id,
                    host = %host,
                    attempt,
                    status = e.status(),
                    error = %e.message(),
                    will_retry,
                    "webhook attempt failed"
                );
                if !will_retry {
                    return failed(attempt, e.message(), e.status());
                }
            }
        }
        tokio::time::sleep(full_jitter(attempt - 1, policy.base_delay, policy.max_delay, rand::random())).await;
    }
}

/// The engine's [`JobNotifier`]: signed webhooks with each tenant's secret.
pub struct WebhookNotifier {
    policy: DeliveryPolicy,
    secrets: HashMap<TenantId, SecretString>,
    clock: Arc<dyn Clock>,
}

impl WebhookNotifier {
    pub fn new(policy: DeliveryPolicy, secrets: HashMap<TenantId, SecretString>, clock: Arc<dyn Clock>) -> Self {
        Self { policy, secrets, clock }
    }
}

impl std::fmt::Debug for WebhookNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Which tenants have a secret, never the secrets.
        f.debug_struct("WebhookNotifier")
            .field("policy", &self.policy)
            .field("tenants", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[async_trait::async_trait]
impl JobNotifier for WebhookNotifier {
    async fn notify(&self, job: &JobRecord, url: &str) -> DeliveryReport {
        let Some(secret) = self.secrets.get(&job.tenant) else {
            return DeliveryReport {
                status: DeliveryStatus::Failed,
                attempts: 0,
                last_error: Some(format!(
                    "this worker has no webhook secret for tenant {} (webhook_secret_env)",
                    job.tenant
                )),
                last_status: None,
            };
        };
        let payload =
            WebhookPayload { id: job.id.clone(), status: job.status, steps_done: job.steps_done, usage: job.usage };
        deliver(url, secret, &payload, &self.policy, self.clock.as_ref()).await
    }
}

/// One POST: resolve and check, pin, sign, send. `Ok` carries the 2xx status.
async fn attempt_once(
    url: &Url,
    secret: &SecretString,
    timestamp: u64,
    body: &[u8],
    policy: &DeliveryPolicy,
) -> Result<u16, AttemptError> {
    let addrs = resolve_checked(url, policy).await?;
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("ratepool-webhook/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        // A proxy would resolve the host itself and undo the pinning below.
        .no_proxy()
        .timeout(policy.timeout);
    if let Some(Host::Domain(name)) = url.host() {
        // Pinned to the addresses just checked: the connector must not ask
        // DNS again and get a different (internal) answer.
        builder = builder.resolve_to_addrs(name, &addrs);
    }
    // A client per attempt, since the pinning is per client; webhooks are
    // few next to provider calls, so the lost connection reuse is cheap.
    let client = builder.build().map_err(|e| AttemptError::Retry(error_chain(&e)))?;
    let signature = sign(secret.expose_secret().as_bytes(), timestamp, body);
    let sent = client
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, signature)
        .body(body.to_vec())
        .send()
        .await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return Err(AttemptError::Retry("timed out".into())),
        Err(e) => return Err(AttemptError::Retry(error_chain(&e))),
    };
    let status = resp.status().as_u16();
    classify_status(status).map(|()| status)
}

/// The error and its sources, without the URL (whose path may hold a
/// token): reqwest's top-level message alone does not say what failed.
fn error_chain(e: &reqwest::Error) -> String {
    let mut msg = crate::provider::error_chain(e);
    if let Some(url) = e.url() {
        msg = msg.replace(url.as_str(), "<webhook url>");
    }
    msg
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode, Uri, header};
    use axum::response::{IntoResponse, Response};

    use super::*;
    use crate::domain::SystemClock;
    use crate::webhook::testutil::{SECRET, TOLERANCE, now_secs, payload};
    use crate::webhook::verify;

    #[tokio::test]
    async fn hosts_resolving_to_private_addresses_are_refused() {
        // resolve_checked judges only what a name resolves to (check_url's
        // localhost-name rule is not involved); localhost goes through the
        // system resolver (/etc/hosts) to loopback like any rebinding name.
        let url = Url::parse("http://localhost:9/hook").unwrap();
        let policy = DeliveryPolicy::default();
        match resolve_checked(&url, &policy).await {
            Err(AttemptError::Refused(WebhookUrlError::Forbidden { reason, .. })) => {
                assert!(reason.contains("loopback"), "{reason}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let allowed = DeliveryPolicy { allow_private: true, ..DeliveryPolicy::default() };
        let addrs = resolve_checked(&url, &allowed).await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 9), "{addrs:?}");
    }

    #[test]
    fn status_classes() {
        for s in [200, 201, 202, 204, 299] {
            assert!(classify_status(s).is_ok(), "{s}");
        }
        for s in [301, 302, 303, 307, 308, 400, 401, 403, 404, 410, 413, 422] {
            let e = classify_status(s).unwrap_err();
            assert!(matches!(e, AttemptError::Permanent { status, .. } if status == s), "{s}: {e:?}");
        }
        for s in [408, 429, 500, 502, 503, 504] {
            let e = classify_status(s).unwrap_err();
            assert!(e.retryable() && e.status() == Some(s), "{s}: {e:?}");
        }
    }

    // ------------------------------------------------------------ delivery

    #[derive(Debug, Clone)]
    struct Hit {
        path: String,
        signature: Option<String>,
        body: Bytes,
    }

    /// A receiver on 127.0.0.1:0. `/hook` verifies the signature (401 if it
    /// does not verify), then answers the scripted statuses in turn and 200
    /// once they run out; `/redirect` sends a 307 to `/target`.
    #[derive(Clone)]
    struct Receiver {
        hits: Arc<Mutex<Vec<Hit>>>,
        script: Arc<Mutex<VecDeque<u16>>>,
    }

    async fn receive(State(r): State<Receiver>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
        let signature = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        r.hits.lock().unwrap().push(Hit {
            path: uri.path().to_string(),
            signature: signature.clone(),
            body: body.clone(),
        });
        match uri.path() {
            "/redirect" => return (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, "/target")]).into_response(),
            "/target" => return StatusCode::OK.into_response(),
            _ => {}
        }
        let verified = signature.is_some_and(|s| verify(SECRET.as_bytes(), &s, &body, now_secs(), TOLERANCE).is_ok());
        if !verified {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        let status = r.script.lock().unwrap().pop_front().unwrap_or(200);
        StatusCode::from_u16(status).unwrap().into_response()
    }

    async fn start_receiver(script: &[u16]) -> (SocketAddr, Receiver) {
        let r = Receiver { hits: Arc::default(), script: Arc::new(Mutex::new(script.iter().copied().collect())) };
        let app = axum::Router::new().fallback(receive).with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, r)
    }

    fn fast_policy() -> DeliveryPolicy {
        DeliveryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
            allow_private: true,
        }
    }

    async fn send(url: &str, policy: &DeliveryPolicy) -> DeliveryReport {
        deliver(url, &SecretString::from(SECRET), &payload(), policy, &SystemClock).await
    }

    #[tokio::test]
    async fn delivers_first_try_with_a_valid_signature() {
        let (addr, r) = start_receiver(&[]).await;
        let report = send(&format!("http://{addr}/hook"), &fast_policy()).await;
        assert_eq!(
            report,
            DeliveryReport { status: DeliveryStatus::Delivered, attempts: 1, last_error: None, last_status: Some(200) }
        );
        let hits = r.hits.lock().unwrap().clone();
        assert_eq!(hits.len(), 1);
        let sig = hits[0].signature.as_deref().unwrap();
        assert_eq!(verify(SECRET.as_bytes(), sig, &hits[0].body, now_secs(), TOLERANCE), Ok(()));
        let got: WebhookPayload = serde_json::from_slice(&hits[0].body).unwrap();
        assert_eq!(got, payload());
    }

    #[tokio::test]
    async fn retries_server_errors_then_delivers() {
        let (addr, r) = start_receiver(&[500, 503, 429]).await;
        let report = send(&format!("http://{addr}/hook"), &fast_policy()).await;
        assert_eq!(report.status, DeliveryStatus::Delivered, "{report:?}");
        assert_eq!(report.attempts, 4);
        assert_eq!(report.last_status, Some(200));
        assert_eq!(r.hits.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts() {
        let (addr, r) = start_receiver(&[500, 502, 504, 500, 500]).await;
        let report = send(&format!("http://{addr}/hook"), &fast_policy()).await;
        assert_eq!(
            report,
            DeliveryReport {
                status: DeliveryStatus::Failed,
                attempts: 4,
                last_error: Some("HTTP 500".into()),
                last_status: Some(500)
            }
        );
        assert_eq!(r.hits.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn client_error_is_permanent() {
        let (addr, r) = start_receiver(&[400]).await;
        let report = send(&format!("http://{addr}/hook"), &fast_policy()).await;
        assert_eq!(report.status, DeliveryStatus::Failed);
        assert_eq!(report.attempts, 1);
        assert_eq!(report.last_status, Some(400));
        assert_eq!(r.hits.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn redirect_is_not_followed() {
        let (addr, r) = start_receiver(&[]).await;
        let report = send(&format!("http://{addr}/redirect"), &fast_policy()).await;
        assert_eq!(report.status, DeliveryStatus::Failed);
        assert_eq!(report.attempts, 1);
        assert_eq!(report.last_status, Some(307));
        assert!(report.last_error.as_deref().unwrap().contains("redirects are not followed"), "{report:?}");
        let paths: Vec<String> = r.hits.lock().unwrap().iter().map(|h| h.path.clone()).collect();
        assert_eq!(paths, ["/redirect"], "the redirect target must receive nothing");
    }

    #[tokio::test]
    async fn connection_errors_are_retried() {
        // A port nobody listens on: bind, note the port, close.
        let addr = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let url = format!("http://{addr}/hook?token=s3cr3t");
        let report = send(&url, &DeliveryPolicy { max_attempts: 2, ..fast_policy() }).await;
        assert_eq!(report.status, DeliveryStatus::Failed);
        assert_eq!(report.attempts, 2);
        assert_eq!(report.last_status, None);
        let error = report.last_error.unwrap();
        assert!(!error.contains("s3cr3t") && !error.contains("/hook"), "the URL leaked into {error:?}");
    }

    #[tokio::test]
    async fn private_target_refused_without_allow_private() {
        let (addr, r) = start_receiver(&[]).await;
        let policy = DeliveryPolicy { allow_private: false, ..fast_policy() };
        for url in [format!("http://{addr}/hook"), format!("http://localhost:{}/hook", addr.port())] {
            let report = send(&url, &policy).await;
            assert_eq!(report.status, DeliveryStatus::Failed, "{url}");
            assert_eq!(report.attempts, 0, "{url}");
            let error = report.last_error.unwrap();
            assert!(error.contains("loopback") || error.contains("localhost"), "{url}: {error}");
        }
        assert!(r.hits.lock().unwrap().is_empty(), "the receiver must not be reached");
    }
}
