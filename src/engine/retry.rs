//! Retrying storage writes that failed for a reason of the backend's (an
//! error, throttling, an answer lost after the write landed), so a blip in
//! the store does not end a job run and drop the calls it paid for.

use std::future::Future;
use std::time::Duration;

use crate::backoff::full_jitter;
use crate::storage::{StorageError, StorageResult};

/// How a write is retried.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteRetry {
    pub attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl WriteRetry {
    /// A write the run needs to go on (a checkpoint): tried for about half
    /// a minute, and only while `go_on` (the lease holds).
    pub const RUN: Self = Self { attempts: 12, base: Duration::from_millis(50), cap: Duration::from_secs(4) };
    /// A write on the call path (a ledger charge): a few quick tries, then
    /// the caller's own failure handling.
    pub const CALL: Self = Self { attempts: 5, base: Duration::from_millis(20), cap: Duration::from_millis(500) };
}

/// Runs `op` (given the attempt number, from 0) until it succeeds, fails
/// for a reason retrying cannot fix, runs out of attempts, or `go_on`
/// says to stop; waits a full-jitter backoff between attempts.
pub(crate) async fn retry_write<T, F, Fut>(
    what: &str,
    policy: WriteRetry,
    go_on: impl Fn() -> bool,
    mut op: F,
) -> StorageResult<T>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = StorageResult<T>>,
{
    let mut attempt = 0u32;
    loop {
        match op(attempt).await {
            Err(e) if e.is_transient() && attempt + 1 < policy.attempts && go_on() => {
                let wait = full_jitter(attempt, policy.base, policy.cap, rand::random::<f64>());
                let throttled = matches!(e, StorageError::Throttled(_));
                tracing::warn!(%what, error = %e, attempt, throttled, ?wait, "storage write failed; retrying");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            done => return done,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const FAST: WriteRetry = WriteRetry { attempts: 4, base: Duration::from_millis(1), cap: Duration::from_millis(2) };

    #[tokio::test]
    async fn transient_errors_are_retried_and_the_rest_are_not() {
        let tries = AtomicU32::new(0);
        let r = retry_write(
            "w",
            FAST,
            || true,
            |n| {
                tries.fetch_add(1, Ordering::Relaxed);
                async move { if n < 2 { Err(StorageError::Throttled("slow".into())) } else { Ok(n) } }
            },
        )
        .await;
        assert_eq!((r.unwrap(), tries.load(Ordering::Relaxed)), (2, 3));

        let r: StorageResult<()> = retry_write("w", FAST, || true, |_| async { Err(StorageError::LeaseLost) }).await;
        assert!(matches!(r, Err(StorageError::LeaseLost)), "not retried");
        let r: StorageResult<()> =
            retry_write("w", FAST, || true, |_| async { Err(StorageError::Backend("down".into())) }).await;
        assert!(matches!(r, Err(StorageError::Backend(_))), "given up after its attempts");
        let tries = AtomicU32::new(0);
        let r: StorageResult<()> = retry_write(
            "w",
            FAST,
            || false,
            |_| {
                tries.fetch_add(1, Ordering::Relaxed);
                async { Err(StorageError::Backend("down".into())) }
            },
        )
        .await;
        assert!(r.is_err() && tries.load(Ordering::Relaxed) == 1, "stopped when told");
    }
}
