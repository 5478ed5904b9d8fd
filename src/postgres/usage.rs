//! Durable per-(tenant, org) usage counters, added to in batches.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::{PgBackend, db, int, parsed, ucol};
use crate::domain::{OrgName, TenantId, duration_micros};
use crate::storage::{OrgCounters, StorageResult, USAGE_BATCH_MEMORY, UsageBatch, UsageStore};

#[async_trait]
impl UsageStore for PgBackend {
    /// One transaction: the batch id recorded in `usage_batches` (ids
    /// older than [`USAGE_BATCH_MEMORY`] forgotten) and every delta added,
    /// or nothing if the id is already there. A retry racing its first
    /// attempt waits on the id's insert and then adds nothing.
    async fn add(&self, batch: &UsageBatch) -> StorageResult<()> {
        if batch.deltas.is_empty() {
            return Ok(());
        }
        let now = self.now();
        let forget_before = now.saturating_sub(duration_micros(USAGE_BATCH_MEMORY));
        // One row per (tenant, org), in key order: one upsert cannot touch a
        // row twice, and concurrent flushes lock the counter rows they share
        // in the same order, so they never deadlock on them.
        let mut sums: BTreeMap<(&str, &str), OrgCounters> = BTreeMap::new();
        for (tenant, org, c) in &batch.deltas {
            sums.entry((tenant.as_str(), org.as_str())).or_default().merge(c);
        }
        let column = |f: fn(&OrgCounters) -> u64| sums.values().map(|c| int(f(c))).collect::<Vec<i64>>();

        // Dropped without a commit, the transaction rolls back.
        let mut tx = self.pool().begin().await.map_err(db)?;
        let fresh =
            sqlx::query("INSERT INTO usage_batches (id, applied_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING")
                .bind(&batch.id)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db)?
                .rows_affected();
        if fresh == 0 {
            // Applied before (a retry whose first answer was lost).
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO usage AS u (tenant, org, calls, prompt_tokens, completion_tokens, rate_limited,
                                     insufficient_quota, server_errors, timeouts, connection_errors,
                                     request_errors)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[],
                                  $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[],
                                  $11::bigint[])
             ON CONFLICT (tenant, org) DO UPDATE SET
                calls = u.calls + excluded.calls,
                prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
                completion_tokens = u.completion_tokens + excluded.completion_tokens,
                rate_limited = u.rate_limited + excluded.rate_limited,
                insufficient_quota = u.insufficient_quota + excluded.insufficient_quota,
                server_errors = u.server_errors + excluded.server_errors,
                timeouts = u.timeouts + excluded.timeouts,
                connection_errors = u.connection_errors + excluded.connection_errors,
                request_errors = u.request_errors + excluded.request_errors",
        )
        .bind(sums.keys().map(|&(tenant, _)| tenant).collect::<Vec<_>>())
        .bind(sums.keys().map(|&(_, org)| org).collect::<Vec<_>>())
        .bind(column(|c| c.calls))
        .bind(column(|c| c.prompt_tokens))
        .bind(column(|c| c.completion_tokens))
        .bind(column(|c| c.rate_limited))
        .bind(column(|c| c.insufficient_quota))
        .bind(column(|c| c.server_errors))
        .bind(column(|c| c.timeouts))
        .bind(column(|c| c.connection_errors))
        .bind(column(|c| c.request_errors))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query("DELETE FROM usage_batches WHERE applied_at < $1")
            .bind(forget_before)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    /// Ordered by org name, byte by byte (as `OrgName` orders), whatever
    /// the database's collation.
    async fn usage(&self, tenant: &TenantId) -> StorageResult<Vec<(OrgName, OrgCounters)>> {
        sqlx::query(
            "SELECT org, calls, prompt_tokens, completion_tokens, rate_limited, insufficient_quota,
                    server_errors, timeouts, connection_errors, request_errors
               FROM usage WHERE tenant = $1 ORDER BY org COLLATE \"C\"",
        )
        .bind(tenant.as_str())
        .fetch_all(self.pool())
        .await
        .map_err(db)?
        .iter()
        .map(|r| {
            Ok((
                parsed(r, "org", OrgName::parse)?,
                OrgCounters {
                    calls: ucol(r, "calls")?,
                    prompt_tokens: ucol(r, "prompt_tokens")?,
                    completion_tokens: ucol(r, "completion_tokens")?,
                    rate_limited: ucol(r, "rate_limited")?,
                    insufficient_quota: ucol(r, "insufficient_quota")?,
                    server_errors: ucol(r, "server_errors")?,
                    timeouts: ucol(r, "timeouts")?,
                    connection_errors: ucol(r, "connection_errors")?,
                    request_errors: ucol(r, "request_errors")?,
                },
            ))
        })
        .collect()
    }
}
