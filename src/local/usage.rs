//! Durable per-(tenant, org) usage counters, added to in batches.

use async_trait::async_trait;
use rusqlite::TransactionBehavior;

use super::{OrBackend, SqliteBackend, int, parsed, uint};
use crate::domain::{OrgName, TenantId};
use crate::storage::{OrgCounters, StorageResult, USAGE_BATCH_MEMORY, UsageBatch, UsageStore};

#[async_trait]
impl UsageStore for SqliteBackend {
    /// One transaction: the batch id recorded in `usage_batches` (ids
    /// older than [`USAGE_BATCH_MEMORY`] forgotten) and every delta added,
    /// or nothing if the id is already there.
    async fn add(&self, batch: &UsageBatch) -> StorageResult<()> {
        if batch.deltas.is_empty() {
            return Ok(());
        }
        let batch = batch.clone();
        let now = self.now();
        let forget_before = now - USAGE_BATCH_MEMORY.as_micros() as i64;
        self.write(move |conn| {
            // One transaction for the batch: one commit, and a flush is
            // either counted whole or not at all.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).db()?;
            tx.prepare_cached("DELETE FROM usage_batches WHERE applied_at < ?1").db()?.execute([forget_before]).db()?;
            let fresh = tx
                .prepare_cached("INSERT OR IGNORE INTO usage_batches (id, applied_at) VALUES (?1, ?2)")
                .db()?
                .execute(rusqlite::params![batch.id, now])
                .db()?;
            if fresh == 0 {
                // Applied before (a retry whose first answer was lost).
                return Ok(());
            }
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO usage (tenant, org, calls, prompt_tokens, completion_tokens, rate_limited,
                                            insufficient_quota, server_errors, timeouts, connection_errors,
                                            request_errors)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                         ON CONFLICT (tenant, org) DO UPDATE SET
                            calls = calls + excluded.calls,
                            prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                            completion_tokens = completion_tokens + excluded.completion_tokens,
                            rate_limited = rate_limited + excluded.rate_limited,
                            insufficient_quota = insufficient_quota + excluded.insufficient_quota,
                            server_errors = server_errors + excluded.server_errors,
                            timeouts = timeouts + excluded.timeouts,
                            connection_errors = connection_errors + excluded.connection_errors,
                            request_errors = request_errors + excluded.request_errors",
                    )
                    .db()?;
                for (tenant, org, c) in &batch.deltas {
                    stmt.execute(rusqlite::params![
                        tenant.as_str(),
                        org.as_str(),
                        int(c.calls),
                        int(c.prompt_tokens),
                        int(c.completion_tokens),
                        int(c.rate_limited),
                        int(c.insufficient_quota),
                        int(c.server_errors),
                        int(c.timeouts),
                        int(c.connection_errors),
                        int(c.request_errors),
                    ])
                    .db()?;
                }
            }
            tx.commit().db()
        })
        .await
    }

    /// Ordered by org name.
    async fn usage(&self, tenant: &TenantId) -> StorageResult<Vec<(OrgName, OrgCounters)>> {
        let tenant = tenant.clone();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT org, calls, prompt_tokens, completion_tokens, rate_limited, insufficient_quota,
                        server_errors, timeouts, connection_errors, request_errors
                   FROM usage WHERE tenant = ?1 ORDER BY org",
            )
            .db()?
            .query_map([tenant.as_str()], |r| {
                Ok((
                    parsed(r, 0, OrgName::parse)?,
                    OrgCounters {
                        calls: uint(r, 1)?,
                        prompt_tokens: uint(r, 2)?,
                        completion_tokens: uint(r, 3)?,
                        rate_limited: uint(r, 4)?,
                        insufficient_quota: uint(r, 5)?,
                        server_errors: uint(r, 6)?,
                        timeouts: uint(r, 7)?,
                        connection_errors: uint(r, 8)?,
                        request_errors: uint(r, 9)?,
                    },
                ))
            })
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()
        })
        .await
    }
}
