//! How the engine tells a job's client that the job finished. The engine
//! decides when (once the job is final, before its queue message is
//! deleted, so a crash delivers again) and stores the report; how the
//! client is told (a signed webhook POST) is `crate::webhook`'s business.
//!
//! Deliveries run in their own bounded pool ([`DeliveryPool`]), not in the
//! job's worker slot: a receiver that is slow or hangs holds a delivery
//! slot for up to its retries, never a slot another job could run in.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::storage::{DeliveryReport, JobRecord};

#[async_trait]
pub trait JobNotifier: std::fmt::Debug + Send + Sync + 'static {
    /// Tells `url` that `job` (final) finished, retrying as the notifier
    /// sees fit, and reports how it went. It never fails: the report is
    /// what gets stored, a failed delivery included.
    async fn notify(&self, job: &JobRecord, url: &str) -> DeliveryReport;
}

/// The webhook deliveries of one process: `size` at once, and up to
/// `3 × size` more waiting for a slot (their queue messages kept hidden
/// meanwhile). A delivery that finds the pool full runs in its worker slot,
/// as before, so the pool's memory is bounded and a flood of slow receivers
/// slows the workers down rather than piling up.
pub(crate) struct DeliveryPool {
    running: Arc<Semaphore>,
    admitted: Arc<Semaphore>,
    capacity: u32,
    /// Fired when the process stops and its grace is spent: deliveries not
    /// done by then give their messages back for another process.
    abort: CancellationToken,
}

impl DeliveryPool {
    pub(crate) fn new(size: usize) -> Self {
        let size = size.max(1);
        let capacity = u32::try_from(size * 4).unwrap_or(u32::MAX);
        Self {
            running: Arc::new(Semaphore::new(size)),
            admitted: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            abort: CancellationToken::new(),
        }
    }

    /// A place in the pool, if it has one.
    pub(crate) fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.admitted.clone().try_acquire_owned().ok()
    }

    /// Waits for a delivery slot.
    pub(crate) async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.running.clone().acquire_owned().await.ok()
    }

    pub(crate) fn aborted(&self) -> &CancellationToken {
        &self.abort
    }

    /// On shutdown: waits up to `grace` for the deliveries admitted, then
    /// aborts the rest (they hand their messages back) and waits for that.
    pub(crate) async fn drain(&self, grace: Duration) {
        let all = self.admitted.acquire_many(self.capacity);
        tokio::pin!(all);
        if tokio::time::timeout(grace, &mut all).await.is_err() {
            tracing::info!("stopping: webhook deliveries still running are handed back");
            self.abort.cancel();
            let _ = all.await;
        }
    }
}
