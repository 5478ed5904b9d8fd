//! Job webhooks, the delivery side: when a job finishes, ratepool POSTs a
//! signed JSON summary to the URL the tenant gave.
//!
//! - Signing: `Ratepool-Signature: t={unix seconds},v1={hex HMAC-SHA256 of
//!   "{t}.{body}"}` with the tenant's webhook secret. [`verify`] is the
//!   receiver's side, used by our tests and shown in the README.
//! - Delivery is at-least-once: retried with full-jitter exponential backoff
//!   on 5xx, 408, 429, connection errors and timeouts; other 4xx and any 3xx
//!   are final. The [`DeliveryReport`] is stored on the job.
//! - SSRF guard: the URL is a tenant's input, and the request leaves from
//!   inside our network. [`check_url`] refuses bad schemes, credentials and
//!   private address literals when the job is submitted; at delivery the host
//!   is resolved, every address checked, and the connection pinned to the
//!   checked addresses so a second DNS answer (rebinding) cannot redirect it.
//!   Redirects are never followed, for the same reason.
//!
//! The secret and the signature never reach logs or reports. Nor does the
//! URL's path or query: webhook URLs often carry a token there, so logs name
//! the host only.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hmac::{KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::{Host, Url};

use crate::domain::{Clock, JobId, Usage};
use crate::engine::breaker::full_jitter;
use crate::storage::JobStatus;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The header carrying the timestamp and signature.
pub const SIGNATURE_HEADER: &str = "Ratepool-Signature";

/// The body POSTed to the webhook URL: a summary of the finished job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookPayload {
    pub id: JobId,
    pub status: JobStatus,
    pub steps_done: u32,
    pub usage: Usage,
}

// ---------------------------------------------------------------- signing

/// Why a signature header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("signature header is malformed: {0}")]
    Malformed(&'static str),
    /// Outside the tolerance either way: an old request replayed, or a clock
    /// far off. A fresh timestamp is signed on every attempt, so retries pass.
    #[error("signature timestamp {timestamp} is more than {tolerance_secs}s away from now ({now})")]
    Stale { timestamp: u64, now: u64, tolerance_secs: u64 },
    #[error("signature does not match the body")]
    Mismatch,
}

fn mac(secret: &[u8], timestamp: u64, body: &[u8]) -> HmacSha256 {
    // HMAC hashes keys longer than a block and pads shorter ones, so
    // new_from_slice cannot fail; the trait just has one signature for all MACs.
    #[allow(clippy::expect_used)]
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `Ratepool-Signature` header value for `body` sent at `timestamp`
/// (Unix seconds): `t={timestamp},v1={hex}`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let tag = mac(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(tag))
}

/// Checks a `Ratepool-Signature` header against the raw body, as a receiver
/// does. `now` is Unix seconds; timestamps further than `tolerance` from it
/// either way are refused so a captured request cannot be replayed later.
/// Several `v1=` entries are accepted (any may match) so a sender can sign
/// with an old and a new secret while one is rotated; unknown keys are
/// ignored for later schemes.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now: u64, tolerance: Duration) -> Result<(), VerifyError> {
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        let (key, value) = part.trim().split_once('=').ok_or(VerifyError::Malformed("expected key=value pairs"))?;
        match key {
            "t" => {
                let t = value.parse::<u64>().map_err(|_| VerifyError::Malformed("t is not a Unix timestamp"))?;
                timestamp = Some(t);
            }
            "v1" => candidates.push(hex::decode(value).map_err(|_| VerifyError::Malformed("v1 is not hex"))?),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(VerifyError::Malformed("no t="))?;
    if candidates.is_empty() {
        return Err(VerifyError::Malformed("no v1="));
    }
    if timestamp.abs_diff(now) > tolerance.as_secs() {
        return Err(VerifyError::Stale { timestamp, now, tolerance_secs: tolerance.as_secs() });
    }
    let expected = mac(secret, timestamp, body);
    // verify_slice compares in constant time, so timing does not reveal how
    // many leading bytes of a forged tag were right.
    if candidates.iter().any(|c| expected.clone().verify_slice(c).is_ok()) {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

// ---------------------------------------------------------------- URL policy

/// Why a webhook URL is refused. Messages name the host, never the path or
/// query, which may hold the receiver's token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookUrlError {
    #[error("webhook URL is not a valid absolute URL: {0}")]
    Parse(#[from] url::ParseError),
    #[error("webhook URL scheme {0:?} is not allowed; use http or https")]
    Scheme(String),
    #[error("webhook URL must not contain a user name or password")]
    Userinfo,
    #[error("webhook URL has no host")]
    NoHost,
    #[error("webhook host {0} is a localhost name; private targets are not allowed")]
    Localhost(String),
    #[error("webhook host {host} is {reason} address {addr}; private targets are not allowed")]
    Forbidden { host: String, addr: IpAddr, reason: &'static str },
}

/// Checks a webhook URL's shape when a job is submitted: http(s), no
/// credentials, a host, and no private address literal (unless
/// `allow_private`). Host names are only checked for `localhost`; what they
/// resolve to is checked again at every delivery, since DNS answers change.
pub fn check_url(raw: &str, allow_private: bool) -> Result<Url, WebhookUrlError> {
    let url = Url::parse(raw)?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(WebhookUrlError::Scheme(url.scheme().to_string()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(WebhookUrlError::Userinfo);
    }
    // The url crate has already normalised IPv4 spellings such as
    // `0x7f.1` or `2130706433` into 127.0.0.1, so literals cannot slip by.
    match url.host() {
        None => return Err(WebhookUrlError::NoHost),
        Some(_) if allow_private => {}
        Some(Host::Ipv4(v4)) => check_addr(&v4.to_string(), IpAddr::V4(v4))?,
        Some(Host::Ipv6(v6)) => check_addr(&v6.to_string(), IpAddr::V6(v6))?,
        Some(Host::Domain(name)) => {
            let name = name.trim_end_matches('.');
            if name.is_empty() {
                return Err(WebhookUrlError::NoHost);
            }
            // RFC 6761: these always mean this machine.
            if name == "localhost" || name.ends_with(".localhost") {
                return Err(WebhookUrlError::Localhost(name.to_string()));
            }
        }
    }
    Ok(url)
}

fn check_addr(host: &str, addr: IpAddr) -> Result<(), WebhookUrlError> {
    match forbidden_reason(addr) {
        Some(reason) => Err(WebhookUrlError::Forbidden { host: host.to_string(), addr, reason }),
        None => Ok(()),
    }
}

/// Why a delivery must not go to `addr`, or `None` if it is a public address.
fn forbidden_reason(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(a: Ipv4Addr) -> Option<&'static str> {
    let [o0, o1, ..] = a.octets();
    Some(if a.is_unspecified() || o0 == 0 {
        "an unspecified (0.0.0.0/8)"
    } else if a.is_loopback() {
        "a loopback"
    } else if a.is_private() {
        "a private (RFC 1918)"
    } else if a.is_link_local() {
        // Includes 169.254.169.254, the cloud metadata service.
        "a link-local (169.254.0.0/16, cloud metadata)"
    } else if o0 == 100 && (o1 & 0xc0) == 64 {
        "a carrier-grade NAT (100.64.0.0/10)"
    } else if a.is_broadcast() {
        "the broadcast"
    } else if a.is_multicast() {
        "a multicast"
    } else if o0 >= 240 {
        "a reserved (240.0.0.0/4)"
    } else {
        return None;
    })
}

fn forbidden_v6(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    if a.is_unspecified() {
        return Some("an unspecified (::)");
    }
    if a.is_loopback() {
        return Some("a loopback");
    }
    // IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d) and NAT64
    // (64:ff9b::a.b.c.d) addresses reach the embedded IPv4 address.
    let embedded = a.to_ipv4_mapped().or_else(|| {
        let compatible = s[..6] == [0; 6];
        let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
        (compatible || nat64).then(|| Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32))
    });
    if let Some(v4) = embedded {
        return forbidden_v4(v4);
    }
    Some(if (s[0] & 0xfe00) == 0xfc00 {
        "a unique-local (fc00::/7)"
    } else if (s[0] & 0xffc0) == 0xfe80 {
        "a link-local (fe80::/10)"
    } else if (s[0] & 0xffc0) == 0xfec0 {
        "a site-local (fec0::/10)"
    } else if a.is_multicast() {
        "a multicast"
    } else {
        return None;
    })
}

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

// ---------------------------------------------------------------- delivery

/// How hard to try. Attempts are spaced by full-jitter exponential backoff
/// (`crate::engine::breaker::full_jitter`) so a receiver coming back from an
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    Delivered,
    Failed,
}

/// The outcome of one delivery, stored on the job as its webhook status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryReport {
    pub status: DeliveryStatus,
    /// Attempts made, failed DNS lookups and connects included; 0 if the
    /// URL was refused before the first.
    pub attempts: u32,
    /// Why the last attempt failed; `None` once delivered.
    pub last_error: Option<String>,
    /// HTTP status of the last answer, if there was one.
    pub last_status: Option<u16>,
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
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode, Uri, header};
    use axum::response::{IntoResponse, Response};

    use super::*;
    use crate::domain::SystemClock;

    const SECRET: &str = "whsec_test";
    const TOLERANCE: Duration = Duration::from_secs(300);

    fn now_secs() -> u64 {
        u64::try_from(SystemClock.now() / 1_000_000).unwrap()
    }

    #[test]
    fn sign_verify_round_trip() {
        let body = br#"{"id":"job-1"}"#;
        let header = sign(SECRET.as_bytes(), 1_700_000_000, body);
        assert!(header.starts_with("t=1700000000,v1="), "{header}");
        assert_eq!(verify(SECRET.as_bytes(), &header, body, 1_700_000_000, TOLERANCE), Ok(()));
        // Within the tolerance either way.
        assert_eq!(verify(SECRET.as_bytes(), &header, body, 1_700_000_300, TOLERANCE), Ok(()));
        assert_eq!(verify(SECRET.as_bytes(), &header, body, 1_699_999_700, TOLERANCE), Ok(()));
        // Order of the pairs, extra keys and a second (rotated) v1 do not matter.
        let v1 = header.split_once(",v1=").unwrap().1;
        let reordered = format!("v0=abc, v1={}, v1={v1}, t=1700000000", "00".repeat(32));
        assert_eq!(verify(SECRET.as_bytes(), &reordered, body, 1_700_000_000, TOLERANCE), Ok(()));
    }

    #[test]
    fn verify_rejects_tampering_and_bad_headers() {
        let body = br#"{"id":"job-1","status":"succeeded"}"#;
        let t = 1_700_000_000;
        let header = sign(SECRET.as_bytes(), t, body);
        let tampered = br#"{"id":"job-1","status":"failed"}"#;
        assert_eq!(verify(SECRET.as_bytes(), &header, tampered, t, TOLERANCE), Err(VerifyError::Mismatch));
        assert_eq!(verify(b"other", &header, body, t, TOLERANCE), Err(VerifyError::Mismatch));
        // The timestamp is signed too: moving it breaks the signature.
        let moved = header.replace("t=1700000000", "t=1700000001");
        assert_eq!(verify(SECRET.as_bytes(), &moved, body, t, TOLERANCE), Err(VerifyError::Mismatch));
        let truncated = &header[..header.len() - 2];
        assert_eq!(verify(SECRET.as_bytes(), truncated, body, t, TOLERANCE), Err(VerifyError::Mismatch));
        for bad in ["", "t=1700000000", "v1=00", "t=abc,v1=00", "t=1700000000,v1=zz", "garbage"] {
            assert!(
                matches!(verify(SECRET.as_bytes(), bad, body, t, TOLERANCE), Err(VerifyError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn verify_rejects_old_and_future_timestamps() {
        let body = b"{}";
        let header = sign(SECRET.as_bytes(), 1_700_000_000, body);
        let stale = verify(SECRET.as_bytes(), &header, body, 1_700_000_301, TOLERANCE);
        assert_eq!(
            stale,
            Err(VerifyError::Stale { timestamp: 1_700_000_000, now: 1_700_000_301, tolerance_secs: 300 })
        );
        assert!(matches!(
            verify(SECRET.as_bytes(), &header, body, 1_699_999_699, TOLERANCE),
            Err(VerifyError::Stale { .. })
        ));
    }

    #[test]
    fn sign_matches_an_independent_hmac() {
        // Computed with Python's standard library, not with this crate:
        // python3 -c 'import hmac,hashlib; print(hmac.new(b"whsec_test",
        //   b"1700000000.{\"id\":\"job-1\",\"status\":\"succeeded\"}", hashlib.sha256).hexdigest())'
        let expected = "d41f3e9ebfd7ec624e57532a3c8d774a9067c43b2f43357753a04ca744a610a1";
        let header = sign(SECRET.as_bytes(), 1_700_000_000, br#"{"id":"job-1","status":"succeeded"}"#);
        assert_eq!(header, format!("t=1700000000,v1={expected}"));
    }

    fn payload() -> WebhookPayload {
        WebhookPayload {
            id: JobId::parse("0190b3c4-job").unwrap(),
            status: JobStatus::Succeeded,
            steps_done: 3,
            usage: Usage { calls: 3, prompt_tokens: 120, completion_tokens: 45 },
        }
    }

    #[test]
    fn payload_has_the_documented_shape() {
        let json: serde_json::Value = serde_json::to_value(payload()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "0190b3c4-job",
                "status": "succeeded",
                "steps_done": 3,
                "usage": {"calls": 3, "prompt_tokens": 120, "completion_tokens": 45}
            })
        );
        let report = DeliveryReport {
            status: DeliveryStatus::Failed,
            attempts: 2,
            last_error: Some("HTTP 400".into()),
            last_status: Some(400),
        };
        assert_eq!(
            serde_json::to_value(&report).unwrap(),
            serde_json::json!({"status": "failed", "attempts": 2, "last_error": "HTTP 400", "last_status": 400})
        );
    }

    #[test]
    fn url_policy_table() {
        let refused = [
            ("http://127.0.0.1/hook", "loopback"),
            ("http://127.8.9.10:8080/hook", "loopback"),
            ("http://0x7f.1/hook", "loopback"),
            ("http://2130706433/hook", "loopback"),
            ("http://10.1.2.3/hook", "private"),
            ("http://172.16.0.1/hook", "private"),
            ("http://172.31.255.255/hook", "private"),
            ("http://192.168.1.1/hook", "private"),
            ("http://169.254.169.254/latest/meta-data/", "link-local"),
            ("http://100.64.0.1/hook", "carrier-grade NAT"),
            ("http://100.127.255.255/hook", "carrier-grade NAT"),
            ("http://0.0.0.0/hook", "unspecified"),
            ("http://255.255.255.255/hook", "broadcast"),
            ("http://[::1]/hook", "loopback"),
            ("http://[::]/hook", "unspecified"),
            ("http://[fe80::1]/hook", "link-local"),
            ("http://[fc00::1]/hook", "unique-local"),
            ("http://[fd12:3456::1]/hook", "unique-local"),
            ("http://[::ffff:127.0.0.1]/hook", "loopback"),
            ("http://[::ffff:10.0.0.1]/hook", "private"),
            ("http://[::ffff:169.254.169.254]/hook", "link-local"),
            ("http://[64:ff9b::a9fe:a9fe]/hook", "link-local"),
            ("http://localhost/hook", "localhost"),
            ("http://api.localhost./hook", "localhost"),
            ("file:///etc/passwd", "scheme"),
            ("ftp://example.com/hook", "scheme"),
            ("gopher://example.com/", "scheme"),
            ("https://user:pass@example.com/hook", "user name or password"),
            ("https://token@example.com/hook", "user name or password"),
            ("not a url", "not a valid"),
            ("/relative/path", "not a valid"),
        ];
        for (raw, why) in refused {
            let err = check_url(raw, false).expect_err(raw).to_string();
            assert!(err.contains(why), "{raw}: {err:?} should say {why:?}");
            assert!(!err.contains("/hook"), "{raw}: the error must not quote the path: {err}");
        }
        for ok in [
            "https://93.184.215.14/hook",
            "http://8.8.8.8:8080/hook?token=x",
            "https://[2606:4700:4700::1111]/hook",
            "https://hooks.example.com/ratepool",
            "http://100.128.0.1/hook",
            "http://172.32.0.1/hook",
        ] {
            assert!(check_url(ok, false).is_ok(), "{ok} should be accepted");
        }
        // allow_private lets private targets through, but not bad schemes or credentials.
        for ok in ["http://127.0.0.1:9000/hook", "http://[::1]/hook", "http://localhost/hook", "http://10.0.0.1/"] {
            assert!(check_url(ok, true).is_ok(), "{ok} should be accepted with allow_private");
        }
        assert!(matches!(check_url("file:///etc/passwd", true), Err(WebhookUrlError::Scheme(_))));
        assert_eq!(check_url("http://u:p@127.0.0.1/", true), Err(WebhookUrlError::Userinfo));
    }

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
