//! The quota ledger: one row per bucket key (an org's model, or a tenant,
//! see [`BucketKey::parts`]) holding both buckets' TATs and the charge of
//! each slot.
//!
//! `acquire` reads the row, decides with [`gcra::decide`], and writes the
//! grant as one conditional statement: an UPDATE that holds only if both
//! TATs are still the ones it decided on (an INSERT that holds only if the
//! row is still absent). A process that lost the race to another reads
//! again and decides again, so no grant is ever made on a stale state, and
//! no row lock is held across a round trip.

use async_trait::async_trait;
use sqlx::postgres::PgRow;

use super::{PgBackend, col, db};
use crate::domain::Micros;
use crate::storage::gcra::{self, Decision};
use crate::storage::{
    Acquisition, BucketKey, BucketParams, BucketState, CHARGE_SLOTS, ChargeId, Cost, QuotaLedger, StorageError,
    StorageResult,
};

/// Decisions lost to other writers before `acquire` gives up with a
/// retryable error. Each loss means another acquisition was granted, so the
/// bucket is moving; 64 losses in a row would take 64 grants in between.
const MAX_RACES: u32 = 64;

fn state_of(row: &PgRow) -> StorageResult<BucketState> {
    Ok(BucketState { requests_tat: col(row, "requests_tat")?, tokens_tat: col(row, "tokens_tat")? })
}

#[async_trait]
impl QuotaLedger for PgBackend {
    async fn acquire(
        &self,
        key: &BucketKey,
        params: &BucketParams,
        cost: Cost,
        now: Micros,
        charge: ChargeId,
    ) -> StorageResult<Acquisition> {
        let (org, model) = key.parts();
        // PostgreSQL arrays count from 1; the same 64 bits, read as signed.
        let (index, mark) = (charge.slot() as i32 + 1, charge.raw() as i64);
        debug_assert!(charge.slot() < CHARGE_SLOTS);
        for race in 0..MAX_RACES {
            let row = sqlx::query(
                "SELECT requests_tat, tokens_tat, charges[$3] AS marked FROM ledger WHERE org = $1 AND model = $2",
            )
            .bind(org)
            .bind(model)
            .bind(index)
            .fetch_optional(self.pool())
            .await
            .map_err(db)?;
            let (state, marked) = match &row {
                Some(r) => (Some(state_of(r)?), col::<Option<i64>>(r, "marked")?),
                None => (None, None),
            };
            if marked == Some(mark) {
                // Granted before; that answer was lost.
                return Ok(Acquisition::Granted(state.unwrap_or_default()));
            }
            let before = state.unwrap_or_default();
            let after = match gcra::decide(before, params, cost, now) {
                Decision::Allow(after) => after,
                Decision::Deny { retry_at } => return Ok(Acquisition::Denied { retry_at, state: before }),
                Decision::Never => return Ok(Acquisition::Never),
            };
            let written = match state {
                Some(before) => sqlx::query(
                    "UPDATE ledger SET requests_tat = $5, tokens_tat = $6, charges[$7] = $8
                      WHERE org = $1 AND model = $2 AND requests_tat = $3 AND tokens_tat = $4",
                )
                .bind(org)
                .bind(model)
                .bind(before.requests_tat)
                .bind(before.tokens_tat)
                .bind(after.requests_tat)
                .bind(after.tokens_tat)
                .bind(index)
                .bind(mark),
                None => sqlx::query(
                    "INSERT INTO ledger (org, model, requests_tat, tokens_tat, charges)
                     VALUES ($1, $2, $3, $4, array_fill(NULL::bigint, ARRAY[$5::int]) || ARRAY[$6::bigint])
                     ON CONFLICT (org, model) DO NOTHING",
                )
                .bind(org)
                .bind(model)
                .bind(after.requests_tat)
                .bind(after.tokens_tat)
                .bind(index - 1)
                .bind(mark),
            }
            .execute(self.pool())
            .await
            .map_err(db)?
            .rows_affected();
            if written == 1 {
                return Ok(Acquisition::Granted(after));
            }
            tracing::trace!(%key, race, "ledger row changed under the decision; deciding again");
        }
        Err(StorageError::Backend(format!("ledger row for {key} changed under {MAX_RACES} decisions in a row")))
    }

    async fn raise(&self, key: &BucketKey, floor: BucketState) -> StorageResult<BucketState> {
        let (org, model) = key.parts();
        // GREATEST per column is `gcra::raise` as one upsert: a raise never
        // lowers a TAT, whatever ran in between.
        let row = sqlx::query(
            "INSERT INTO ledger (org, model, requests_tat, tokens_tat) VALUES ($1, $2, $3, $4)
             ON CONFLICT (org, model) DO UPDATE
                SET requests_tat = GREATEST(ledger.requests_tat, excluded.requests_tat),
                    tokens_tat = GREATEST(ledger.tokens_tat, excluded.tokens_tat)
             RETURNING requests_tat, tokens_tat",
        )
        .bind(org)
        .bind(model)
        .bind(floor.requests_tat)
        .bind(floor.tokens_tat)
        .fetch_one(self.pool())
        .await
        .map_err(db)?;
        state_of(&row)
    }

    async fn state(&self, key: &BucketKey) -> StorageResult<BucketState> {
        let (org, model) = key.parts();
        let row = sqlx::query("SELECT requests_tat, tokens_tat FROM ledger WHERE org = $1 AND model = $2")
            .bind(org)
            .bind(model)
            .fetch_optional(self.pool())
            .await
            .map_err(db)?;
        row.as_ref().map(state_of).transpose().map(Option::unwrap_or_default)
    }
}
