//! The quota ledger: one row per bucket key (an org's model, or a tenant,
//! see [`BucketKey::parts`]) holding both buckets' TATs.
//!
//! `acquire` reads, decides with [`gcra::decide`] and writes in one
//! IMMEDIATE transaction, writing nothing when it denies; its charge's slot
//! in `ledger_charges` is read and written in the same transaction.

use async_trait::async_trait;
use rusqlite::OptionalExtension;

use super::{OrBackend, SqliteBackend};
use crate::domain::Micros;
use crate::storage::gcra::{self, Decision};
use crate::storage::{Acquisition, BucketKey, BucketParams, BucketState, ChargeId, Cost, QuotaLedger, StorageResult};

const READ_STATE: &str = "SELECT requests_tat, tokens_tat FROM ledger WHERE org = ?1 AND model = ?2";

/// The `(org, model)` columns of a key, owned for the blocking pool.
fn owned_parts(key: &BucketKey) -> (String, String) {
    let (org, model) = key.parts();
    (org.to_owned(), model.to_owned())
}

fn state_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BucketState> {
    Ok(BucketState { requests_tat: r.get(0)?, tokens_tat: r.get(1)? })
}

#[async_trait]
impl QuotaLedger for SqliteBackend {
    async fn acquire(
        &self,
        key: &BucketKey,
        params: &BucketParams,
        cost: Cost,
        now: Micros,
        charge: ChargeId,
    ) -> StorageResult<Acquisition> {
        let (org, model) = owned_parts(key);
        let params = *params;
        // As SQLite stores it: the same 64 bits, read as signed.
        let (slot, mark) = (charge.slot() as i64, charge.raw() as i64);
        // IMMEDIATE takes the write lock before the read, so another
        // process cannot change the row between decide and write.
        self.short_write(move |tx| {
            let state = tx
                .prepare_cached(READ_STATE)
                .db()?
                .query_row([&org, &model], state_from_row)
                .optional()
                .db()?
                .unwrap_or_default();
            let marked: Option<i64> = tx
                .prepare_cached("SELECT charge FROM ledger_charges WHERE org = ?1 AND model = ?2 AND slot = ?3")
                .db()?
                .query_row(rusqlite::params![org, model, slot], |r| r.get(0))
                .optional()
                .db()?;
            if marked == Some(mark) {
                return Ok(Acquisition::Granted(state));
            }
            match gcra::decide(state, &params, cost, now) {
                Decision::Allow(after) => {
                    tx.prepare_cached(
                        "INSERT INTO ledger (org, model, requests_tat, tokens_tat) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (org, model) DO UPDATE
                            SET requests_tat = excluded.requests_tat, tokens_tat = excluded.tokens_tat",
                    )
                    .db()?
                    .execute(rusqlite::params![org, model, after.requests_tat, after.tokens_tat])
                    .db()?;
                    tx.prepare_cached(
                        "INSERT INTO ledger_charges (org, model, slot, charge) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (org, model, slot) DO UPDATE SET charge = excluded.charge",
                    )
                    .db()?
                    .execute(rusqlite::params![org, model, slot, mark])
                    .db()?;
                    tx.commit().db()?;
                    Ok(Acquisition::Granted(after))
                }
                // Nothing written; dropping `tx` just ends the read.
                Decision::Deny { retry_at } => Ok(Acquisition::Denied { retry_at, state }),
                Decision::Never => Ok(Acquisition::Never),
            }
        })
        .await
    }

    async fn raise(&self, key: &BucketKey, floor: BucketState) -> StorageResult<BucketState> {
        let (org, model) = owned_parts(key);
        self.short_write(move |tx| {
            // `max` per column is `gcra::raise` written as one UPSERT, so the
            // raise can never lower a TAT.
            let raised = tx
                .prepare_cached(
                    "INSERT INTO ledger (org, model, requests_tat, tokens_tat) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (org, model) DO UPDATE
                        SET requests_tat = max(requests_tat, excluded.requests_tat),
                            tokens_tat = max(tokens_tat, excluded.tokens_tat)
                     RETURNING requests_tat, tokens_tat",
                )
                .db()?
                .query_row(rusqlite::params![org, model, floor.requests_tat, floor.tokens_tat], state_from_row)
                .db()?;
            tx.commit().db()?;
            Ok(raised)
        })
        .await
    }

    async fn state(&self, key: &BucketKey) -> StorageResult<BucketState> {
        let (org, model) = owned_parts(key);
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(READ_STATE)
                .db()?
                .query_row([&org, &model], state_from_row)
                .optional()
                .db()?
                .unwrap_or_default())
        })
        .await
    }
}
