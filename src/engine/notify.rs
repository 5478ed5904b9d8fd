//! How the engine tells a job's client that the job finished. The engine
//! decides when (once the job is final, before its queue message is
//! deleted, so a crash delivers again) and stores the report; how the
//! client is told (a signed webhook POST) is `crate::webhook`'s business.

use async_trait::async_trait;

use crate::storage::{DeliveryReport, JobRecord};

#[async_trait]
pub trait JobNotifier: std::fmt::Debug + Send + Sync + 'static {
    /// Tells `url` that `job` (final) finished, retrying as the notifier
    /// sees fit, and reports how it went. It never fails: the report is
    /// what gets stored, a failed delivery included.
    async fn notify(&self, job: &JobRecord, url: &str) -> DeliveryReport;
}
