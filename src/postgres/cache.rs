//! The response cache: one row per key holding the entry as JSON and its
//! expiry. Expired rows are misses at once and are deleted a few at a time
//! by later puts, so the table stays near the size of its live entries
//! without a sweeper task.

use std::time::Duration;

use async_trait::async_trait;

use super::{PgBackend, col, db};
use crate::domain::{Micros, duration_micros};
use crate::storage::{CacheKey, CachedResponse, ResponseCache, StorageError, StorageResult};

/// Expired rows deleted per put. More than one, so purging outpaces the one
/// row a put can add and a table full of stale entries drains over time;
/// small, so no put pays for a large delete.
const PURGE_BATCH: i64 = 32;

#[async_trait]
impl ResponseCache for PgBackend {
    async fn get(&self, key: &CacheKey, now: Micros) -> StorageResult<Option<CachedResponse>> {
        let row = sqlx::query("SELECT value FROM response_cache WHERE key = $1 AND expires_at > $2")
            .bind(key.as_str())
            .bind(now)
            .fetch_optional(self.pool())
            .await
            .map_err(db)?;
        row.map(|r| {
            let value: String = col(&r, "value")?;
            serde_json::from_str(&value)
                .map_err(|e| StorageError::Backend(format!("unreadable response cache entry: {e}")))
        })
        .transpose()
    }

    /// One statement for the write and the purge: one round trip, one
    /// commit. The purge leaves out the key being written (one statement
    /// must not touch a row twice) and rows another put is purging or
    /// writing (SKIP LOCKED), so concurrent puts never wait on each other's
    /// purges.
    async fn put(&self, key: &CacheKey, value: &CachedResponse, ttl: Duration, now: Micros) -> StorageResult<()> {
        let value = serde_json::to_string(value)
            .map_err(|e| StorageError::Backend(format!("serializing a response cache entry: {e}")))?;
        let expires_at = now.saturating_add(duration_micros(ttl));
        sqlx::query(
            "WITH purged AS (DELETE FROM response_cache WHERE key IN
                                (SELECT key FROM response_cache WHERE expires_at <= $4 AND key <> $1
                                  ORDER BY expires_at LIMIT $5 FOR UPDATE SKIP LOCKED))
             INSERT INTO response_cache (key, value, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
        )
        .bind(key.as_str())
        .bind(value)
        .bind(expires_at)
        .bind(now)
        .bind(PURGE_BATCH)
        .execute(self.pool())
        .await
        .map_err(db)?;
        Ok(())
    }
}
