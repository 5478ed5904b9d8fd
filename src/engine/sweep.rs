//! The unsent-jobs sweeper. Submitting stores the job (marked unsent in the
//! same write), then sends its queue message, then marks it sent; a crash,
//! a timeout or a failed send in between would leave a `queued` job that
//! nothing runs. Every worker process looks, every half `resend_after`, for
//! jobs still unsent `resend_after` after their creation and sends them.
//! A message sent twice is harmless: the second delivery finds the job
//! leased (deferred) or finished (deleted).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::domain::Clock;
use crate::storage::{Backend, StorageResult};

/// Jobs sent per look; the next look takes the rest.
const BATCH: usize = 100;

pub(crate) async fn run(backend: Backend, clock: Arc<dyn Clock>, resend_after: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(resend_after / 2) => {}
            _ = stop.cancelled() => return,
        }
        let before = clock.now() - i64::try_from(resend_after.as_micros()).unwrap_or(i64::MAX);
        if let Err(e) = sweep(&backend, before).await {
            tracing::warn!(error = %e, "could not look for unsent jobs; trying again later");
        }
    }
}

/// Sends every job created at or before `before` that is still unsent.
pub(crate) async fn sweep(backend: &Backend, before: crate::domain::Micros) -> StorageResult<usize> {
    let unsent = backend.jobs.unsent_jobs(before, BATCH).await?;
    for m in &unsent {
        tracing::warn!(job = %m.job_id, tenant = %m.tenant, "job stored but its queue message was never sent; sending it");
        backend.queue.send(m).await?;
        backend.jobs.mark_sent(&m.job_id).await?;
    }
    Ok(unsent.len())
}
