//! Durable calls (`crate::storage::calls`) in one PostgreSQL table, one row
//! per (tenant, key).
//!
//! A claim is one conditional upsert: it inserts a new record, or takes
//! over one that expired (a lapsed claim, an answer past its expiry), and
//! matches nothing while a live record holds the key, so of two processes
//! claiming the same key at once only one starts (the other waits for the
//! row and then finds it live). A claim that matched nothing reads the
//! record to tell what holds it. Every other change is one statement
//! conditional on the claim's owner. Expired rows are deleted a few at a
//! time by later claims, like the response cache's.

use async_trait::async_trait;
use sqlx::postgres::PgRow;

use super::{PgBackend, col, db};
use crate::domain::{Micros, OrgName};
use crate::storage::{CallClaim, CallStore, ClaimOutcome, RequestHash, StorageError, StorageResult, StoredCall};

/// Expired rows deleted per claim: enough to keep up with the claims, few
/// enough that no claim pays for a backlog.
const PURGE_BATCH: i64 = 32;

/// Times a claim is tried again because the record it found holding the
/// key was released or lapsed before it was read. Each retry means another
/// request moved the key meanwhile, so a handful never runs out in practice.
const MAX_RACES: u32 = 8;

/// A record as the claim decides on it.
struct Record {
    request_hash: String,
    claim_until: Option<Micros>,
    status: Option<i32>,
    kind: Option<String>,
    org: Option<String>,
    /// Only read for the claim's own request: a mismatch is not sent it.
    body: Option<Vec<u8>>,
    created_at: Option<Micros>,
    expires_at: Micros,
}

impl Record {
    fn from_row(r: &PgRow) -> StorageResult<Self> {
        Ok(Self {
            request_hash: col(r, "request_hash")?,
            claim_until: col(r, "claim_until")?,
            status: col(r, "status")?,
            kind: col(r, "kind")?,
            org: col(r, "org")?,
            body: col(r, "body")?,
            created_at: col(r, "created_at")?,
            expires_at: col(r, "expires_at")?,
        })
    }

    /// The stored answer, if the record has one.
    fn answer(self) -> StorageResult<Option<StoredCall>> {
        StoredCall::from_columns(self.status.map(i64::from), self.kind, self.org, self.body, self.created_at)
    }
}

#[async_trait]
impl CallStore for PgBackend {
    async fn claim(&self, claim: &CallClaim, now: Micros) -> StorageResult<ClaimOutcome> {
        // SKIP LOCKED: claims on several processes purge different rows
        // rather than queue behind each other; the expiry is checked again
        // on the row deleted, so a record taken over meanwhile stays.
        sqlx::query(
            "DELETE FROM durable_calls d
              USING (SELECT tenant, key FROM durable_calls WHERE expires_at <= $1
                      ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED) old
              WHERE d.tenant = old.tenant AND d.key = old.key AND d.expires_at <= $1",
        )
        .bind(now)
        .bind(PURGE_BATCH)
        .execute(self.pool())
        .await
        .map_err(db)?;
        for _ in 0..MAX_RACES {
            // A new record, or an expired one taken over (its answer's
            // columns cleared); a live record matches nothing.
            let taken = sqlx::query(
                "INSERT INTO durable_calls (tenant, key, request_hash, owner, claim_until, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $5)
                 ON CONFLICT (tenant, key) DO UPDATE
                    SET request_hash = excluded.request_hash, owner = excluded.owner,
                        claim_until = excluded.claim_until, status = NULL, kind = NULL, org = NULL,
                        body = NULL, created_at = NULL, expires_at = excluded.expires_at
                  WHERE durable_calls.expires_at <= $6",
            )
            .bind(claim.tenant.as_str())
            .bind(claim.key.as_str())
            .bind(claim.request.as_str())
            .bind(&claim.owner)
            .bind(claim.until)
            .bind(now)
            .execute(self.pool())
            .await
            .map_err(db)?
            .rows_affected();
            if taken > 0 {
                return Ok(ClaimOutcome::Start);
            }
            let row = sqlx::query(
                "SELECT request_hash, claim_until, status, kind, org, created_at, expires_at,
                        CASE WHEN request_hash = $3 THEN body END AS body
                   FROM durable_calls WHERE tenant = $1 AND key = $2",
            )
            .bind(claim.tenant.as_str())
            .bind(claim.key.as_str())
            .bind(claim.request.as_str())
            .fetch_optional(self.pool())
            .await
            .map_err(db)?;
            // A live record answers the claim; one gone or expired since
            // the upsert looked leaves the key free: claim again.
            let Some(record) = row.as_ref().map(Record::from_row).transpose()?.filter(|r| r.expires_at > now) else {
                continue;
            };
            if RequestHash::from_stored(record.request_hash.clone()) != claim.request {
                return Err(StorageError::IdempotencyMismatch { key: claim.key.to_string() });
            }
            let until = record.claim_until.unwrap_or(now);
            return Ok(match record.answer()? {
                Some(answer) => ClaimOutcome::Done(answer),
                None => ClaimOutcome::InFlight { until },
            });
        }
        Err(StorageError::Backend(format!(
            "durable call {} changed under {MAX_RACES} claims in a row",
            claim.key.as_str()
        )))
    }

    /// No lapse check, as on SQLite: a claim that lapsed but that nobody
    /// took over is still its owner's.
    async fn renew(&self, claim: &CallClaim) -> StorageResult<()> {
        let changed = sqlx::query(
            "UPDATE durable_calls SET claim_until = $4, expires_at = $4
              WHERE tenant = $1 AND key = $2 AND owner = $3 AND status IS NULL",
        )
        .bind(claim.tenant.as_str())
        .bind(claim.key.as_str())
        .bind(&claim.owner)
        .bind(claim.until)
        .execute(self.pool())
        .await
        .map_err(db)?
        .rows_affected();
        if changed == 0 { Err(StorageError::LeaseLost) } else { Ok(()) }
    }

    async fn complete(&self, claim: &CallClaim, answer: &StoredCall, expires_at: Micros) -> StorageResult<()> {
        let changed = sqlx::query(
            "UPDATE durable_calls
                SET owner = NULL, claim_until = NULL, status = $4, kind = $5, org = $6, body = $7,
                    created_at = $8, expires_at = $9
              WHERE tenant = $1 AND key = $2 AND owner = $3 AND status IS NULL",
        )
        .bind(claim.tenant.as_str())
        .bind(claim.key.as_str())
        .bind(&claim.owner)
        .bind(i32::from(answer.status))
        .bind(answer.kind.as_str())
        .bind(answer.org.as_ref().map(OrgName::as_str))
        .bind(answer.body.as_ref())
        .bind(answer.created_at)
        .bind(expires_at)
        .execute(self.pool())
        .await
        .map_err(db)?
        .rows_affected();
        if changed == 0 { Err(StorageError::LeaseLost) } else { Ok(()) }
    }

    async fn release(&self, claim: &CallClaim) -> StorageResult<()> {
        sqlx::query("DELETE FROM durable_calls WHERE tenant = $1 AND key = $2 AND owner = $3 AND status IS NULL")
            .bind(claim.tenant.as_str())
            .bind(claim.key.as_str())
            .bind(&claim.owner)
            .execute(self.pool())
            .await
            .map_err(db)?;
        Ok(())
    }
}
