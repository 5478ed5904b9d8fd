//! Durable calls on the request's side: the next action for a request with
//! an `Idempotency-Key` (`Start` the call holding the key's claim, or
//! `Replay` the stored answer), waiting for a duplicate in flight, and the
//! claim's holder, which stores the answer or gives the key back.
//!
//! A claim lapses at the longest a call can last (its wait, the provider's
//! timeout and a margin), so a holder that died frees its key by itself;
//! a stream renews its claim while events keep coming.

use std::sync::Arc;
use std::time::Duration;

use super::error::OpenAiError;
use crate::domain::{Clock, Micros};
use crate::storage::{CallClaim, CallStore, ClaimOutcome, StorageError, StoredCall};

/// Time added to a claim beyond the call's own bound, for the answer to be
/// stored after the provider's last byte.
pub const CLAIM_MARGIN: Duration = Duration::from_secs(30);
/// First and longest pause between looks at a duplicate in flight.
const POLL_FIRST: Duration = Duration::from_millis(25);
const POLL_MAX: Duration = Duration::from_secs(1);
/// The `retry-after` of a 409 for a duplicate that waited its whole wait.
const IN_FLIGHT_RETRY_MAX: Duration = Duration::from_secs(10);

/// What a request with a key does next.
pub enum NextAction {
    /// Make the call; the claim is held.
    Start(Held),
    /// Answer with what was stored, calling nothing.
    Replay(StoredCall),
}

fn micros(d: Duration) -> Micros {
    Micros::try_from(d.as_micros()).unwrap_or(Micros::MAX)
}

/// Claims `claim`'s key, waiting while another request with the same body
/// holds it, until `give_up` has passed (then a 409 the SDKs retry).
pub async fn next_action(
    store: &Arc<dyn CallStore>,
    clock: &Arc<dyn Clock>,
    claim: CallClaim,
    give_up: tokio::time::Instant,
) -> Result<NextAction, OpenAiError> {
    let mut pause = POLL_FIRST;
    loop {
        let now = clock.now();
        match store.claim(&claim, now).await {
            Ok(ClaimOutcome::Start) => {
                return Ok(NextAction::Start(Held { store: store.clone(), claim, settled: false }));
            }
            Ok(ClaimOutcome::Done(answer)) => return Ok(NextAction::Replay(answer)),
            Ok(ClaimOutcome::InFlight { until }) => {
                let left = give_up.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    let lapses_in = Duration::from_micros((until - now).max(0) as u64);
                    return Err(OpenAiError::in_flight(lapses_in.clamp(Duration::from_secs(1), IN_FLIGHT_RETRY_MAX)));
                }
                // A lapsed claim is taken over at the next look.
                let lapse = Duration::from_micros((until - now).max(0) as u64) + Duration::from_millis(1);
                tokio::time::sleep(pause.min(left).min(lapse)).await;
                pause = (pause * 2).min(POLL_MAX);
            }
            Err(e @ StorageError::IdempotencyMismatch { .. }) => {
                return Err(OpenAiError::key_reused(format!(
                    "{e}: an Idempotency-Key names one request; send a new key for a different body"
                )));
            }
            Err(e) => return Err(OpenAiError::storage(&e.to_string())),
        }
    }
}

/// A held claim. Settled by [`Held::complete`] or [`Held::release`];
/// dropped unsettled (the client went away, the handler was cancelled) it
/// releases the key in the background, so a retry need not wait for the
/// claim to lapse.
pub struct Held {
    store: Arc<dyn CallStore>,
    claim: CallClaim,
    settled: bool,
}

impl Held {
    /// Stores the answer until `expires_at`. An error means it is not
    /// stored (the caller still answers the client).
    pub async fn complete(mut self, answer: &StoredCall, expires_at: Micros) -> Result<(), StorageError> {
        self.settled = true;
        let stored = self.store.complete(&self.claim, answer, expires_at).await;
        if stored.is_err() {
            // Not stored: the next request must be free to call.
            let _ = self.store.release(&self.claim).await;
        }
        stored
    }

    /// Gives the key back, storing nothing.
    pub async fn release(mut self) {
        self.settled = true;
        if let Err(e) = self.store.release(&self.claim).await {
            tracing::warn!(error = %e, "could not release a durable call's claim; it lapses by itself");
        }
    }

    /// Moves the claim's lapse to `span` from `now` when less than half of
    /// `span` is left (a stream that is still coming).
    pub async fn renew_if_due(&mut self, now: Micros, span: Duration) {
        let span = micros(span);
        if self.claim.until - now >= span / 2 {
            return;
        }
        self.claim.until = now.saturating_add(span);
        if let Err(e) = self.store.renew(&self.claim).await {
            tracing::warn!(error = %e, "could not renew a durable call's claim");
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let (store, claim) = (self.store.clone(), self.claim.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.release(&claim).await {
                    tracing::warn!(error = %e, "could not release an abandoned durable call's claim; it lapses by itself");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use bytes::Bytes;

    use super::*;
    use crate::domain::{IdempotencyKey, ManualClock, TenantId};
    use crate::storage::{AnswerKind, RequestHash, StorageResult};

    /// A store whose claims answer from a script, recording every call.
    struct Scripted {
        claims: Mutex<Vec<StorageResult<ClaimOutcome>>>,
        log: Mutex<Vec<&'static str>>,
    }

    #[async_trait]
    impl CallStore for Scripted {
        async fn claim(&self, _: &CallClaim, _: Micros) -> StorageResult<ClaimOutcome> {
            self.log.lock().unwrap().push("claim");
            self.claims.lock().unwrap().remove(0)
        }
        async fn renew(&self, _: &CallClaim) -> StorageResult<()> {
            self.log.lock().unwrap().push("renew");
            Ok(())
        }
        async fn complete(&self, _: &CallClaim, _: &StoredCall, _: Micros) -> StorageResult<()> {
            self.log.lock().unwrap().push("complete");
            Err(StorageError::LeaseLost)
        }
        async fn release(&self, _: &CallClaim) -> StorageResult<()> {
            self.log.lock().unwrap().push("release");
            Ok(())
        }
    }

    fn setup(
        script: Vec<StorageResult<ClaimOutcome>>,
    ) -> (Arc<Scripted>, Arc<dyn CallStore>, Arc<dyn Clock>, CallClaim) {
        let store = Arc::new(Scripted { claims: Mutex::new(script), log: Mutex::new(Vec::new()) });
        let claim = CallClaim {
            tenant: TenantId::parse("alpha").unwrap(),
            key: IdempotencyKey::parse("job-1/step-1").unwrap(),
            request: RequestHash::from_stored("h".into()),
            owner: "me".into(),
            until: 10_000_000,
        };
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(1_000_000));
        (store.clone(), store, clock, claim)
    }

    fn answer() -> StoredCall {
        StoredCall { status: 200, kind: AnswerKind::Json, org: None, body: Bytes::from_static(b"{}"), created_at: 0 }
    }

    #[tokio::test]
    async fn a_duplicate_waits_for_the_answer_in_flight_then_replays_it() {
        let in_flight = || Ok(ClaimOutcome::InFlight { until: 50_000_000 });
        let (log, store, clock, claim) = setup(vec![in_flight(), in_flight(), Ok(ClaimOutcome::Done(answer()))]);
        let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
        match next_action(&store, &clock, claim, give_up).await {
            Ok(NextAction::Replay(a)) => assert_eq!(a, answer()),
            _ => panic!("expected a replay"),
        }
        assert_eq!(*log.log.lock().unwrap(), ["claim", "claim", "claim"]);
    }

    #[tokio::test]
    async fn a_duplicate_that_waited_its_whole_wait_gets_a_409_to_retry() {
        let script = (0..100).map(|_| Ok(ClaimOutcome::InFlight { until: 4_000_000 })).collect();
        let (_, store, clock, claim) = setup(script);
        let give_up = tokio::time::Instant::now() + Duration::from_millis(300);
        let e = match next_action(&store, &clock, claim, give_up).await {
            Err(e) => e,
            Ok(_) => panic!("expected a 409"),
        };
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (409, Some("Idempotency-Key")));
        assert_eq!(e.retry_after, Some(Duration::from_secs(3)), "until the claim lapses");
    }

    #[tokio::test]
    async fn a_mismatch_is_422_and_an_unsettled_claim_is_released_when_dropped() {
        let mismatch = Err(StorageError::IdempotencyMismatch { key: "job-1/step-1".into() });
        let (_, store, clock, claim) = setup(vec![mismatch]);
        let e = next_action(&store, &clock, claim.clone(), tokio::time::Instant::now()).await.err().unwrap();
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (422, Some("Idempotency-Key")));

        let (log, store, clock, claim) = setup(vec![Ok(ClaimOutcome::Start)]);
        let Ok(NextAction::Start(held)) = next_action(&store, &clock, claim, tokio::time::Instant::now()).await else {
            panic!("expected the claim")
        };
        drop(held);
        for _ in 0..100 {
            if log.log.lock().unwrap().contains(&"release") {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(*log.log.lock().unwrap(), ["claim", "release"]);
    }

    #[tokio::test]
    async fn a_completion_that_was_not_stored_gives_the_key_back() {
        let (log, store, clock, claim) = setup(vec![Ok(ClaimOutcome::Start)]);
        let Ok(NextAction::Start(held)) = next_action(&store, &clock, claim, tokio::time::Instant::now()).await else {
            panic!("expected the claim")
        };
        assert!(held.complete(&answer(), 0).await.is_err());
        assert_eq!(*log.log.lock().unwrap(), ["claim", "complete", "release"]);
    }
}
