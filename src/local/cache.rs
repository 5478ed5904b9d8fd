//! The response cache: one row per key holding the entry as JSON and its
//! expiry. Expired rows are misses at once and are deleted a few at a time
//! by later puts, so the table stays near the size of its live entries
//! without a sweeper task.

use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, TransactionBehavior};

use super::{OrBackend, SqliteBackend};
use crate::domain::{Micros, duration_micros};
use crate::storage::{CacheKey, CachedResponse, ResponseCache, StorageError, StorageResult};

/// Expired rows deleted per put. More than one, so purging outpaces the one
/// row a put can add and a table full of stale entries drains over time;
/// small, so no put pays for a large delete.
const PURGE_BATCH: i64 = 32;

#[async_trait]
impl ResponseCache for SqliteBackend {
    async fn get(&self, key: &CacheKey, now: Micros) -> StorageResult<Option<CachedResponse>> {
        let key = key.as_str().to_owned();
        let value: Option<String> = self
            .read(move |conn| {
                conn.prepare_cached("SELECT value FROM response_cache WHERE key = ?1 AND expires_at > ?2")
                    .db()?
                    .query_row(rusqlite::params![key, now], |r| r.get(0))
                    .optional()
                    .db()
            })
            .await?;
        value
            .map(|v| {
                serde_json::from_str(&v)
                    .map_err(|e| StorageError::Backend(format!("unreadable response cache entry: {e}")))
            })
            .transpose()
    }

    async fn put(&self, key: &CacheKey, value: &CachedResponse, ttl: Duration, now: Micros) -> StorageResult<()> {
        let key = key.as_str().to_owned();
        let value = serde_json::to_string(value)
            .map_err(|e| StorageError::Backend(format!("serializing a response cache entry: {e}")))?;
        let expires_at = now.saturating_add(duration_micros(ttl));
        self.write(move |conn| {
            // One transaction: one commit for the write and the purge.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).db()?;
            tx.prepare_cached(
                "INSERT INTO response_cache (key, value, expires_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
            )
            .db()?
            .execute(rusqlite::params![key, value, expires_at])
            .db()?;
            tx.prepare_cached(
                "DELETE FROM response_cache WHERE key IN
                    (SELECT key FROM response_cache WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
            )
            .db()?
            .execute(rusqlite::params![now, PURGE_BATCH])
            .db()?;
            tx.commit().db()
        })
        .await
    }
}
