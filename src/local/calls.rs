//! Durable calls (`crate::storage::calls`) in one SQLite table: each key's
//! record is read and changed in one `IMMEDIATE` transaction, so claims of
//! the same key are decided one after the other. Expired rows are deleted
//! a few at a time by later claims, like the response cache's.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, TransactionBehavior};

use super::{OrBackend, SqliteBackend};
use crate::domain::{Micros, OrgName};
use crate::storage::{CallClaim, CallStore, ClaimOutcome, RequestHash, StorageError, StorageResult, StoredCall};

/// Expired rows deleted per claim; see `super::cache`'s purge for why a few.
const PURGE_BATCH: i64 = 32;

/// A row as the claim decides on it.
struct Row {
    request_hash: String,
    claim_until: Option<Micros>,
    status: Option<i64>,
    kind: Option<String>,
    org: Option<String>,
    body: Option<Vec<u8>>,
    created_at: Option<Micros>,
    expires_at: Micros,
}

impl Row {
    /// The stored answer, if the row has one.
    fn answer(self) -> StorageResult<Option<StoredCall>> {
        StoredCall::from_columns(self.status, self.kind, self.org, self.body, self.created_at)
    }
}

#[async_trait]
impl CallStore for SqliteBackend {
    async fn claim(&self, claim: &CallClaim, now: Micros) -> StorageResult<ClaimOutcome> {
        let claim = claim.clone();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).db()?;
            tx.prepare_cached(
                "DELETE FROM durable_calls WHERE rowid IN
                    (SELECT rowid FROM durable_calls WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
            )
            .db()?
            .execute(rusqlite::params![now, PURGE_BATCH])
            .db()?;
            let row = tx
                .prepare_cached(
                    "SELECT request_hash, claim_until, status, kind, org, body, created_at, expires_at
                     FROM durable_calls WHERE tenant = ?1 AND key = ?2",
                )
                .db()?
                .query_row(rusqlite::params![claim.tenant.as_str(), claim.key.as_str()], |r| {
                    Ok(Row {
                        request_hash: r.get(0)?,
                        claim_until: r.get(1)?,
                        status: r.get(2)?,
                        kind: r.get(3)?,
                        org: r.get(4)?,
                        body: r.get(5)?,
                        created_at: r.get(6)?,
                        expires_at: r.get(7)?,
                    })
                })
                .optional()
                .db()?;
            // A live record answers the claim; an expired one is free.
            let outcome = match row.filter(|r| r.expires_at > now) {
                Some(row) if RequestHash::from_stored(row.request_hash.clone()) != claim.request => {
                    return Err(StorageError::IdempotencyMismatch { key: claim.key.to_string() });
                }
                Some(row) => {
                    let until = row.claim_until.unwrap_or(now);
                    match row.answer()? {
                        Some(answer) => ClaimOutcome::Done(answer),
                        None => ClaimOutcome::InFlight { until },
                    }
                }
                None => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO durable_calls
                            (tenant, key, request_hash, owner, claim_until, expires_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                    )
                    .db()?
                    .execute(rusqlite::params![
                        claim.tenant.as_str(),
                        claim.key.as_str(),
                        claim.request.as_str(),
                        claim.owner,
                        claim.until
                    ])
                    .db()?;
                    ClaimOutcome::Start
                }
            };
            // Committed on every path: the purge above is kept too.
            tx.commit().db()?;
            Ok(outcome)
        })
        .await
    }

    async fn renew(&self, claim: &CallClaim) -> StorageResult<()> {
        let claim = claim.clone();
        self.write(move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE durable_calls SET claim_until = ?4, expires_at = ?4
                     WHERE tenant = ?1 AND key = ?2 AND owner = ?3 AND status IS NULL",
                )
                .db()?
                .execute(rusqlite::params![claim.tenant.as_str(), claim.key.as_str(), claim.owner, claim.until])
                .db()?;
            if changed == 0 { Err(StorageError::LeaseLost) } else { Ok(()) }
        })
        .await
    }

    async fn complete(&self, claim: &CallClaim, answer: &StoredCall, expires_at: Micros) -> StorageResult<()> {
        let claim = claim.clone();
        let answer = answer.clone();
        self.write(move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE durable_calls
                     SET owner = NULL, claim_until = NULL, status = ?4, kind = ?5, org = ?6, body = ?7,
                         created_at = ?8, expires_at = ?9
                     WHERE tenant = ?1 AND key = ?2 AND owner = ?3 AND status IS NULL",
                )
                .db()?
                .execute(rusqlite::params![
                    claim.tenant.as_str(),
                    claim.key.as_str(),
                    claim.owner,
                    i64::from(answer.status),
                    answer.kind.as_str(),
                    answer.org.as_ref().map(OrgName::as_str),
                    answer.body.as_ref(),
                    answer.created_at,
                    expires_at
                ])
                .db()?;
            if changed == 0 { Err(StorageError::LeaseLost) } else { Ok(()) }
        })
        .await
    }

    async fn release(&self, claim: &CallClaim) -> StorageResult<()> {
        let claim = claim.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "DELETE FROM durable_calls WHERE tenant = ?1 AND key = ?2 AND owner = ?3 AND status IS NULL",
            )
            .db()?
            .execute(rusqlite::params![claim.tenant.as_str(), claim.key.as_str(), claim.owner])
            .db()?;
            Ok(())
        })
        .await
    }
}
