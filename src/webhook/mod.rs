//! Job webhooks, the delivery side: when a job finishes, ratepool POSTs a
//! signed JSON summary to the URL the tenant gave.
//!
//! - [`sign`]: `Ratepool-Signature: t={unix seconds},v1={hex HMAC-SHA256 of
//!   "{t}.{body}"}` with the tenant's webhook secret. [`verify`] is the
//!   receiver's side, used by our tests and shown in the README.
//! - [`deliver`]: at-least-once delivery, retried with full-jitter
//!   exponential backoff on 5xx, 408, 429, connection errors and timeouts;
//!   other 4xx and any 3xx are final. The [`DeliveryReport`] is stored on
//!   the job. [`WebhookNotifier`] is the engine's [`JobNotifier`].
//! - Targets pass the SSRF guard ([`crate::ssrf`]) at submission and again,
//!   resolved and pinned, at every delivery. Redirects are never followed.
//!
//! The secret and the signature never reach logs or reports. Nor does the
//! URL's path or query: webhook URLs often carry a token there, so logs name
//! the host only.
//!
//! [`JobNotifier`]: crate::engine::JobNotifier
//! [`DeliveryReport`]: crate::storage::DeliveryReport

mod deliver;
mod sign;

use serde::{Deserialize, Serialize};

use crate::domain::{JobId, Usage};
use crate::storage::JobStatus;
pub use deliver::{DeliveryPolicy, WebhookNotifier, deliver};
pub use sign::{SIGNATURE_HEADER, VerifyError, sign, verify};

/// The body POSTed to the webhook URL: a summary of the finished job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookPayload {
    pub id: JobId,
    pub status: JobStatus,
    pub steps_done: u32,
    pub usage: Usage,
}

#[cfg(test)]
mod testutil {
    use super::*;
    use crate::domain::{Clock, SystemClock};

    pub(crate) const SECRET: &str = "whsec_test";
    pub(crate) const TOLERANCE: std::time::Duration = std::time::Duration::from_secs(300);

    pub(crate) fn now_secs() -> u64 {
        u64::try_from(SystemClock.now() / 1_000_000).unwrap()
    }

    pub(crate) fn payload() -> WebhookPayload {
        WebhookPayload {
            id: JobId::parse("0190b3c4-job").unwrap(),
            status: JobStatus::Succeeded,
            steps_done: 3,
            usage: Usage { calls: 3, prompt_tokens: 120, completion_tokens: 45 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::payload;
    use crate::storage::{DeliveryReport, DeliveryStatus};

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
}
