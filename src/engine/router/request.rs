//! What a caller asks the router for, and what it gets back.

use std::sync::Arc;
use std::time::Duration;

use crate::domain::{OrgName, TenantId, Usage};
use crate::provider::ChatRequest;
use crate::storage::StorageError;

/// What the caller wants called.
#[derive(Clone)]
pub struct CallRequest {
    pub tenant: TenantId,
    pub chat: ChatRequest,
    /// Sent as `X-Client-Request-Id`: `{job}/{step}`.
    pub request_id: String,
    /// Asked before each attempt is sent, after its quota is charged.
    pub gate: Option<Arc<dyn SendGate>>,
    pub routing: Routing,
}

/// Which orgs a call may use: primary orgs, fallback orgs (`fallback =
/// true`, e.g. a self-hosted vLLM) or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routing {
    /// A cheap step goes to the fallback orgs (to the primaries only if no
    /// fallback org serves its model).
    pub cheap: bool,
    /// A standard call waits this long for a primary org before fallback
    /// orgs may take it too.
    pub fallback_after: Duration,
}

impl Default for Routing {
    fn default() -> Self {
        Self { cheap: false, fallback_after: Duration::from_secs(30) }
    }
}

impl std::fmt::Debug for CallRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallRequest")
            .field("tenant", &self.tenant)
            .field("chat", &self.chat)
            .field("request_id", &self.request_id)
            .field("gate", &self.gate.is_some())
            .field("routing", &self.routing)
            .finish()
    }
}

/// The caller's last word on an attempt, between charging its quota and
/// sending it. A job run uses it to hold calls while its lease renewal is
/// overdue: the lease may lapse and another worker make the same call.
#[async_trait::async_trait]
pub trait SendGate: Send + Sync {
    /// Returns once the attempt may be sent; false abandons the call
    /// (`CallError::Cancelled`).
    async fn ready(&self) -> bool;
}

#[derive(Debug, Clone)]
pub struct CallResult {
    pub content: String,
    pub usage: Usage,
    pub org: OrgName,
    pub attempts: u32,
    /// Time spent in provider calls (the rest of the step is our overhead).
    pub provider_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The provider refused the request itself; the step fails with this.
    #[error("{0}")]
    Request(String),
    /// Transient failures exceeded the retry budget.
    #[error("gave up after {attempts} attempts: {last}")]
    Exhausted { attempts: u32, last: String },
    /// No org can ever admit this call (cost above every org's limit, or
    /// no org serves the model).
    #[error("{0}")]
    Unroutable(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cancelled")]
    Cancelled,
}
