//! ECS task scale-in protection for `ratepool worker`.
//!
//! Scaling on queue depth may stop a task at any time; a task that holds
//! jobs asks the ECS agent to protect it (`PUT $ECS_AGENT_URI/task-protection/v1/state`)
//! and drops the protection once idle, so scale-in only takes idle tasks.
//! Outside ECS (`ECS_AGENT_URI` unset) nothing is done.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::telemetry::Telemetry;

/// How long one protection lasts; renewed well before it runs out.
const PROTECT_MINUTES: u64 = 60;
const RENEW_AFTER: Duration = Duration::from_secs(30 * 60);
const CHECK_EVERY: Duration = Duration::from_secs(2);

pub struct TaskProtection {
    url: String,
    http: reqwest::Client,
}

impl TaskProtection {
    pub fn from_env() -> Option<Self> {
        let base = std::env::var("ECS_AGENT_URI").ok().filter(|s| !s.is_empty())?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().ok()?;
        Some(Self { url: format!("{}/task-protection/v1/state", base.trim_end_matches('/')), http })
    }

    async fn set(&self, on: bool) -> bool {
        let body = if on {
            serde_json::json!({"ProtectionEnabled": true, "ExpiresInMinutes": PROTECT_MINUTES})
        } else {
            serde_json::json!({"ProtectionEnabled": false})
        };
        match self.http.put(&self.url).json(&body).send().await {
            Ok(r) if r.status().is_success() => {
                tracing::info!(protected = on, "task scale-in protection set");
                true
            }
            Ok(r) => {
                tracing::warn!(status = %r.status(), "ECS agent refused the task protection change");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not reach the ECS agent for task protection");
                false
            }
        }
    }

    /// Follows the in-flight job count until `shutdown`, then until the
    /// jobs are gone, and leaves the task unprotected.
    pub async fn run(self, telemetry: Arc<Telemetry>, shutdown: CancellationToken) {
        let mut protected = false;
        let mut since = tokio::time::Instant::now();
        loop {
            let busy = telemetry.jobs_in_flight().get() > 0;
            let renew = protected && since.elapsed() > RENEW_AFTER;
            if (busy != protected || renew) && self.set(busy).await {
                protected = busy;
                since = tokio::time::Instant::now();
            }
            if shutdown.is_cancelled() && !busy {
                if protected {
                    self.set(false).await;
                }
                return;
            }
            tokio::time::sleep(CHECK_EVERY).await;
        }
    }
}
