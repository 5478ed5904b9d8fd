//! The durable-call store (`CallStore`): claims, answers and their expiry,
//! the same on every backend. Run by each backend's test file with
//! `calls_suite!(harness)`.

use bytes::Bytes;
use ratepool::domain::{IdempotencyKey, Micros, OrgName, TenantId};
use ratepool::storage::{AnswerKind, CallClaim, ClaimOutcome, RequestHash, StorageError, StoredCall};

use super::{Harness, SEC, T0};

fn claim(tenant: &str, key: &str, request: &str, owner: &str, until: Micros) -> CallClaim {
    CallClaim {
        tenant: TenantId::parse(tenant).expect("tenant"),
        key: IdempotencyKey::parse(key).expect("key"),
        request: RequestHash::from_stored(format!("hash-of-{request}")),
        owner: owner.into(),
        until,
    }
}

fn answer(body: &str) -> StoredCall {
    StoredCall {
        status: 200,
        kind: AnswerKind::Json,
        org: Some(OrgName::parse("org-a").expect("org")),
        body: Bytes::from(body.to_owned()),
        created_at: T0,
    }
}

async fn outcome(h: &Harness, c: &CallClaim, now: Micros) -> ClaimOutcome {
    h.backend.calls.claim(c, now).await.expect("claim")
}

const DAY: Micros = 86_400 * SEC;

pub async fn calls_claim_complete_then_replay(h: &Harness) {
    let first = claim("acme", "job-1/outline", "r1", "owner-1", T0 + 60 * SEC);
    assert_eq!(outcome(h, &first, T0).await, ClaimOutcome::Start);
    h.backend.calls.complete(&first, &answer("{\"id\":\"chatcmpl-1\"}"), T0 + DAY).await.expect("complete");
    let again = claim("acme", "job-1/outline", "r1", "owner-2", T0 + 120 * SEC);
    assert_eq!(outcome(h, &again, T0 + SEC).await, ClaimOutcome::Done(answer("{\"id\":\"chatcmpl-1\"}")));
    // A stream's events and a provider's refusal, with no org, round-trip too.
    let stream = claim("acme", "job-1/stream", "r2", "owner-1", T0 + 60 * SEC);
    assert_eq!(outcome(h, &stream, T0).await, ClaimOutcome::Start);
    let events = StoredCall {
        status: 400,
        kind: AnswerKind::EventStream,
        org: None,
        body: Bytes::from_static(b"data: {\"x\":1}\n\ndata: [DONE]\n\n"),
        created_at: T0 + 5,
    };
    h.backend.calls.complete(&stream, &events, T0 + DAY).await.expect("complete");
    let again = claim("acme", "job-1/stream", "r2", "owner-3", T0 + 60 * SEC);
    assert_eq!(outcome(h, &again, T0 + SEC).await, ClaimOutcome::Done(events));
}

pub async fn calls_same_key_other_request_is_a_mismatch(h: &Harness) {
    let first = claim("acme", "k", "r1", "owner-1", T0 + 60 * SEC);
    assert_eq!(outcome(h, &first, T0).await, ClaimOutcome::Start);
    let other = claim("acme", "k", "r2", "owner-2", T0 + 60 * SEC);
    let err = h.backend.calls.claim(&other, T0 + SEC).await.expect_err("in flight, other body");
    assert!(matches!(&err, StorageError::IdempotencyMismatch { key } if key == "k"), "{err:?}");
    h.backend.calls.complete(&first, &answer("a"), T0 + DAY).await.expect("complete");
    let err = h.backend.calls.claim(&other, T0 + 2 * SEC).await.expect_err("answered, other body");
    assert!(matches!(err, StorageError::IdempotencyMismatch { .. }), "{err:?}");
    // The refused claim changed nothing.
    let same = claim("acme", "k", "r1", "owner-3", T0 + 60 * SEC);
    assert_eq!(outcome(h, &same, T0 + 3 * SEC).await, ClaimOutcome::Done(answer("a")));
}

pub async fn calls_a_duplicate_in_flight_sees_the_claim_then_the_answer(h: &Harness) {
    let first = claim("acme", "k", "r1", "owner-1", T0 + 60 * SEC);
    assert_eq!(outcome(h, &first, T0).await, ClaimOutcome::Start);
    let dup = claim("acme", "k", "r1", "owner-2", T0 + 61 * SEC);
    assert_eq!(outcome(h, &dup, T0 + SEC).await, ClaimOutcome::InFlight { until: T0 + 60 * SEC });
    h.backend.calls.complete(&first, &answer("a"), T0 + DAY).await.expect("complete");
    assert_eq!(outcome(h, &dup, T0 + 2 * SEC).await, ClaimOutcome::Done(answer("a")));
    // The duplicate never held the key: it cannot store over the answer.
    let err = h.backend.calls.complete(&dup, &answer("b"), T0 + DAY).await.expect_err("not the holder");
    assert!(matches!(err, StorageError::LeaseLost), "{err:?}");
    assert_eq!(outcome(h, &dup, T0 + 3 * SEC).await, ClaimOutcome::Done(answer("a")));
}

pub async fn calls_a_lapsed_claim_is_taken_over_and_its_holder_cannot_store(h: &Harness) {
    let dead = claim("acme", "k", "r1", "owner-dead", T0 + 10 * SEC);
    assert_eq!(outcome(h, &dead, T0).await, ClaimOutcome::Start);
    let next = claim("acme", "k", "r1", "owner-next", T0 + 70 * SEC);
    assert_eq!(outcome(h, &next, T0 + 9 * SEC).await, ClaimOutcome::InFlight { until: T0 + 10 * SEC });
    assert_eq!(outcome(h, &next, T0 + 11 * SEC).await, ClaimOutcome::Start, "the lapsed claim is taken over");
    // The old holder, back from the dead, can neither store, renew nor release.
    let err = h.backend.calls.complete(&dead, &answer("late"), T0 + DAY).await.expect_err("lapsed");
    assert!(matches!(err, StorageError::LeaseLost), "{err:?}");
    let err = h.backend.calls.renew(&dead).await.expect_err("lapsed");
    assert!(matches!(err, StorageError::LeaseLost), "{err:?}");
    h.backend.calls.release(&dead).await.expect("a release of nothing held is a no-op");
    let third = claim("acme", "k", "r1", "owner-third", T0 + 80 * SEC);
    assert_eq!(outcome(h, &third, T0 + 12 * SEC).await, ClaimOutcome::InFlight { until: T0 + 70 * SEC });
    h.backend.calls.complete(&next, &answer("next"), T0 + DAY).await.expect("the new holder stores");
    assert_eq!(outcome(h, &third, T0 + 13 * SEC).await, ClaimOutcome::Done(answer("next")));
}

pub async fn calls_a_released_key_is_free_at_once(h: &Harness) {
    let first = claim("acme", "k", "r1", "owner-1", T0 + 60 * SEC);
    assert_eq!(outcome(h, &first, T0).await, ClaimOutcome::Start);
    h.backend.calls.release(&first).await.expect("release");
    // Free before the claim would have lapsed, even for another body.
    let other = claim("acme", "k", "r2", "owner-2", T0 + 60 * SEC);
    assert_eq!(outcome(h, &other, T0 + SEC).await, ClaimOutcome::Start);
    h.backend.calls.complete(&other, &answer("b"), T0 + DAY).await.expect("complete");
    // Releasing after completing does not drop the answer.
    h.backend.calls.release(&other).await.expect("release");
    let again = claim("acme", "k", "r2", "owner-3", T0 + 60 * SEC);
    assert_eq!(outcome(h, &again, T0 + 2 * SEC).await, ClaimOutcome::Done(answer("b")));
}

pub async fn calls_renew_moves_the_lapse(h: &Harness) {
    let mut first = claim("acme", "k", "r1", "owner-1", T0 + 10 * SEC);
    assert_eq!(outcome(h, &first, T0).await, ClaimOutcome::Start);
    first.until = T0 + 100 * SEC;
    h.backend.calls.renew(&first).await.expect("renew");
    let dup = claim("acme", "k", "r1", "owner-2", T0 + 200 * SEC);
    assert_eq!(outcome(h, &dup, T0 + 50 * SEC).await, ClaimOutcome::InFlight { until: T0 + 100 * SEC });
    h.backend.calls.complete(&first, &answer("a"), T0 + DAY).await.expect("complete");
    let err = h.backend.calls.renew(&first).await.expect_err("answered: nothing to renew");
    assert!(matches!(err, StorageError::LeaseLost), "{err:?}");
}

pub async fn calls_keys_are_per_tenant(h: &Harness) {
    let alpha = claim("alpha", "shared-key", "r1", "owner-a", T0 + 60 * SEC);
    assert_eq!(outcome(h, &alpha, T0).await, ClaimOutcome::Start);
    h.backend.calls.complete(&alpha, &answer("alpha's"), T0 + DAY).await.expect("complete");
    // The same key text for another tenant is another record: no mismatch, no replay.
    let beta = claim("beta", "shared-key", "r2", "owner-b", T0 + 60 * SEC);
    assert_eq!(outcome(h, &beta, T0 + SEC).await, ClaimOutcome::Start);
    h.backend.calls.complete(&beta, &answer("beta's"), T0 + DAY).await.expect("complete");
    let alpha_again = claim("alpha", "shared-key", "r1", "owner-c", T0 + 60 * SEC);
    assert_eq!(outcome(h, &alpha_again, T0 + 2 * SEC).await, ClaimOutcome::Done(answer("alpha's")));
    let beta_again = claim("beta", "shared-key", "r2", "owner-d", T0 + 60 * SEC);
    assert_eq!(outcome(h, &beta_again, T0 + 2 * SEC).await, ClaimOutcome::Done(answer("beta's")));
}

pub async fn calls_a_stored_answer_expires(h: &Harness) {
    let first = claim("acme", "k", "r1", "owner-1", T0 + 60 * SEC);
    assert_eq!(outcome(h, &first, T0).await, ClaimOutcome::Start);
    h.backend.calls.complete(&first, &answer("a"), T0 + 100 * SEC).await.expect("complete");
    let again = claim("acme", "k", "r1", "owner-2", T0 + 200 * SEC);
    assert_eq!(outcome(h, &again, T0 + 99 * SEC).await, ClaimOutcome::Done(answer("a")));
    // Expired: the key is free again, for any body.
    let other = claim("acme", "k", "r2", "owner-3", T0 + 200 * SEC);
    assert_eq!(outcome(h, &other, T0 + 100 * SEC).await, ClaimOutcome::Start);
}

/// Every byte value, in a pattern that does not repeat at item-sized
/// strides, so a part stored twice or out of order shows.
fn large_body(len: usize, seed: u8) -> Bytes {
    Bytes::from((0..len).map(|i| (i.wrapping_mul(31) ^ (i >> 10)) as u8 ^ seed).collect::<Vec<u8>>())
}

pub async fn calls_a_large_answer_round_trips(h: &Harness) {
    let first = claim("acme", "big", "r1", "owner-1", T0 + 60 * SEC);
    assert_eq!(outcome(h, &first, T0).await, ClaimOutcome::Start);
    let big = StoredCall { kind: AnswerKind::EventStream, body: large_body(1_500_000, 0), ..answer("") };
    h.backend.calls.complete(&first, &big, T0 + 100 * SEC).await.expect("complete a 1.5 MB answer");
    let again = claim("acme", "big", "r1", "owner-2", T0 + 60 * SEC);
    match outcome(h, &again, T0 + SEC).await {
        ClaimOutcome::Done(got) => {
            assert_eq!(got.body.len(), big.body.len());
            assert!(got.body == big.body, "the body came back byte for byte");
            assert_eq!(got, big);
        }
        other => panic!("expected the stored answer, got {other:?}"),
    }
    // After it expires, a new answer under the same key replaces it whole.
    let next = claim("acme", "big", "r2", "owner-3", T0 + 200 * SEC);
    assert_eq!(outcome(h, &next, T0 + 100 * SEC).await, ClaimOutcome::Start);
    let smaller = StoredCall { body: large_body(700_000, 7), ..answer("") };
    h.backend.calls.complete(&next, &smaller, T0 + DAY).await.expect("complete");
    let last = claim("acme", "big", "r2", "owner-4", T0 + 300 * SEC);
    assert_eq!(outcome(h, &last, T0 + 101 * SEC).await, ClaimOutcome::Done(smaller));
}

/// Runs every durable-call conformance test against a backend, like
/// `conformance_suite!` does for the other roles.
#[macro_export]
macro_rules! calls_suite {
    ($harness:ident) => {
        $crate::calls_suite!(@tests $harness;
        calls_claim_complete_then_replay,
        calls_same_key_other_request_is_a_mismatch,
        calls_a_duplicate_in_flight_sees_the_claim_then_the_answer,
        calls_a_lapsed_claim_is_taken_over_and_its_holder_cannot_store,
        calls_a_released_key_is_free_at_once,
        calls_renew_moves_the_lapse,
        calls_keys_are_per_tenant,
        calls_a_stored_answer_expires,
        calls_a_large_answer_round_trips,
        );
    };
    (@tests $harness:ident; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let h = $harness().await;
                conformance::calls::$name(&h).await;
            }
        )*
    };
}
