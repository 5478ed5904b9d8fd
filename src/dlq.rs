//! `ratepool dlq`: what an operator does with the dead-letter queue. The
//! engine fails a poison job itself before it dead-letters it; what else
//! lands there (SQS's own redrive, the backstop after many receives; an
//! unreadable message) is listed here, and either re-driven to its work
//! queue or failed with a reason and deleted, so no job stays `queued` or
//! `running` with no message to run it. On SQLite the dead letters are the
//! `dead_letters` table, which only the engine's poison handling fills.

use serde::Serialize;

use crate::domain::{Clock, JobId, TenantId};
use crate::storage::{Backend, JobStatus, StorageResult};

/// The most dead letters listed at once.
pub const LIST_MAX: usize = 1000;

/// One dead letter as `ratepool dlq list` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterRow {
    pub job: JobId,
    pub tenant: TenantId,
    /// The job's status; `None` if the job record is gone (retention).
    pub status: Option<JobStatus>,
    pub receives: u32,
    /// Seconds since it was sent to the dead-letter queue.
    pub age_secs: u64,
}

/// The dead letters, oldest first, with their jobs' status.
pub async fn list(backend: &Backend, clock: &dyn Clock) -> StorageResult<Vec<DeadLetterRow>> {
    let now = clock.now();
    let mut rows = Vec::new();
    for d in backend.queue.dead_letters(LIST_MAX).await? {
        let status = backend.jobs.get_job(&d.message.job_id).await?.map(|j| j.status);
        rows.push(DeadLetterRow {
            job: d.message.job_id,
            tenant: d.message.tenant,
            status,
            receives: d.receive_count,
            age_secs: u64::try_from((now - d.since).max(0) / 1_000_000).unwrap_or(0),
        });
    }
    Ok(rows)
}

/// Moves the dead letters of `job` (every one if `None`) back to their work
/// queue; a worker runs the job on, or settles it if it is final. Returns
/// the jobs re-driven.
pub async fn redrive(backend: &Backend, job: Option<&JobId>) -> StorageResult<Vec<JobId>> {
    Ok(backend.queue.redrive_dead_letters(job).await?.into_iter().map(|m| m.job_id).collect())
}

/// Fails the jobs of the dead letters of `job` (every one if `None`) with
/// `dead-lettered: {reason}`, then deletes those dead letters. A job that
/// is already final is left as it is. Failing first: a crash in between
/// leaves the dead letter of a failed job, and running the command again
/// finishes the work. Returns the jobs whose dead letters were deleted.
pub async fn fail(
    backend: &Backend,
    clock: &dyn Clock,
    job: Option<&JobId>,
    reason: &str,
) -> StorageResult<Vec<JobId>> {
    let reason = format!("dead-lettered: {reason}");
    let dead = backend.queue.dead_letters(LIST_MAX).await?;
    let mut failed = Vec::new();
    for d in dead.iter().filter(|d| job.is_none_or(|j| *j == d.message.job_id)) {
        backend.jobs.fail_unleased(&d.message.job_id, &reason, clock.now()).await?;
        if !failed.contains(&d.message.job_id) {
            failed.push(d.message.job_id.clone());
        }
    }
    let mut deleted = Vec::new();
    for id in &failed {
        for m in backend.queue.remove_dead_letters(Some(id)).await? {
            if !deleted.contains(&m.job_id) {
                deleted.push(m.job_id);
            }
        }
    }
    Ok(deleted)
}
