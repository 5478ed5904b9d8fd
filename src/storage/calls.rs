//! Durable calls: the stored answers of OpenAI-compatible calls made with an
//! `Idempotency-Key`, and the claim that makes one request the only one
//! calling the provider for a key.
//!
//! A key's record is a small state machine, moved only by [`CallStore`]:
//!
//! ```text
//!   (none) ──claim──► in flight (owner, until) ──complete──► done (answer, expiry)
//!                        │  ▲          │
//!              release ──┘  └─ renew   └─ lapses at `until`: the next claim takes it over
//! ```
//!
//! A done record past its expiry, and a claim past its `until`, count as
//! absent. The request that holds the claim calls the provider and stores
//! the answer before returning it; every other request with the same key
//! and body gets that answer (or waits for it), and one with another body
//! is refused with `IdempotencyMismatch`.

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{StorageError, StorageResult, write_canonical_object};
use crate::domain::{IdempotencyKey, Micros, OrgName, TenantId};

/// What the hashed bytes start with; bump it when the encoding changes.
const REQUEST_HASH_VERSION: &[u8] = b"ratepool.durable-call.v1\n";

/// The identity of a request for its idempotency key: the hex SHA-256 of
/// the endpoint and the canonical JSON of the body (object keys sorted at
/// every depth, no whitespace), so a client that re-serializes the same
/// request in another key order is still the same request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestHash(String);

impl RequestHash {
    /// `endpoint` is the path the request came to (`/v1/chat/completions`).
    pub fn of(endpoint: &str, body: &Map<String, Value>) -> Self {
        let mut bytes = REQUEST_HASH_VERSION.to_vec();
        bytes.extend_from_slice(endpoint.as_bytes());
        bytes.push(b'\n');
        write_canonical_object(body, &mut bytes);
        Self(hex::encode(Sha256::digest(&bytes)))
    }

    /// A hash as a backend stored it.
    pub fn from_stored(hex: String) -> Self {
        Self(hex)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One request's hold on a key: it alone calls the provider until it
/// completes, releases, or `until` passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallClaim {
    pub tenant: TenantId,
    pub key: IdempotencyKey,
    pub request: RequestHash,
    /// Fresh for every request, so a request whose claim lapsed and was
    /// taken over can neither store nor release the new holder's.
    pub owner: String,
    /// When the claim lapses unless renewed: the longest the call can take.
    pub until: Micros,
}

/// How a stored answer is sent back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    /// One JSON body.
    Json,
    /// Server-sent events, as the client saw them, `[DONE]` included.
    EventStream,
}

impl AnswerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::EventStream => "event-stream",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "json" => Some(Self::Json),
            "event-stream" => Some(Self::EventStream),
            _ => None,
        }
    }
}

/// An answer as it was first returned: a provider's success, or its
/// refusal of the request itself (a 4xx), which a retry would get again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCall {
    pub status: u16,
    pub kind: AnswerKind,
    /// The org that answered, when known.
    pub org: Option<OrgName>,
    pub body: Bytes,
    pub created_at: Micros,
}

impl StoredCall {
    /// The answer a record's columns hold, if it has one (status, kind and
    /// body all set); a stored value that no longer parses is reported as
    /// corrupt rather than trusted. For the SQL backends, whose rows keep
    /// an answer's parts in nullable columns.
    pub fn from_columns(
        status: Option<i64>,
        kind: Option<String>,
        org: Option<String>,
        body: Option<Vec<u8>>,
        created_at: Option<Micros>,
    ) -> StorageResult<Option<Self>> {
        let (Some(status), Some(kind), Some(body)) = (status, kind, body) else { return Ok(None) };
        let corrupt = |what: &str| StorageError::Backend(format!("stored durable call has a bad {what}"));
        Ok(Some(Self {
            status: u16::try_from(status).map_err(|_| corrupt("status"))?,
            kind: AnswerKind::parse(&kind).ok_or_else(|| corrupt("kind"))?,
            org: org.map(OrgName::parse).transpose().map_err(|_| corrupt("org"))?,
            body: Bytes::from(body),
            created_at: created_at.unwrap_or_default(),
        }))
    }
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The claim is the caller's: it makes the call.
    Start,
    /// Another request with the same body holds the key until `until`
    /// (or until it completes or releases it first).
    InFlight { until: Micros },
    /// The answer an earlier request with the same body stored.
    Done(StoredCall),
}

/// The durable-call records, one per (tenant, key). Keys are per tenant:
/// another tenant's key of the same text is another record.
#[async_trait]
pub trait CallStore: Send + Sync + 'static {
    /// Takes the key for `claim` if it is free at `now` (no record, an
    /// expired answer, or a lapsed claim); otherwise reports what holds it.
    /// `IdempotencyMismatch` if a live record was made by another request.
    async fn claim(&self, claim: &CallClaim, now: Micros) -> StorageResult<ClaimOutcome>;
    /// Moves a held claim's lapse to `claim.until` (a long stream);
    /// `LeaseLost` if the claim is no longer `claim.owner`'s.
    async fn renew(&self, claim: &CallClaim) -> StorageResult<()>;
    /// Stores the answer, kept until `expires_at`, if the claim is still
    /// `claim.owner`'s (`LeaseLost` otherwise, and nothing is written).
    /// Any size up to what the caller allows is stored whole.
    async fn complete(&self, claim: &CallClaim, answer: &StoredCall, expires_at: Micros) -> StorageResult<()>;
    /// Gives the key up without an answer (the call failed for a reason
    /// that is not the request's own), so the next request calls again.
    /// Nothing happens if the claim is no longer `claim.owner`'s.
    async fn release(&self, claim: &CallClaim) -> StorageResult<()>;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_request_hash_ignores_key_order_and_tells_endpoints_and_bodies_apart() {
        let a = obj(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 1}));
        let b = obj(json!({"n": 1, "messages": [{"content": "hi", "role": "user"}], "model": "m"}));
        let chat = "/v1/chat/completions";
        assert_eq!(RequestHash::of(chat, &a), RequestHash::of(chat, &b));
        assert_ne!(RequestHash::of(chat, &a), RequestHash::of("/v1/embeddings", &a));
        let c = obj(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}));
        assert_ne!(RequestHash::of(chat, &a), RequestHash::of(chat, &c));
        assert_eq!(RequestHash::of(chat, &a).as_str().len(), 64);
    }
}
