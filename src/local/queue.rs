//! The job queue: a table of messages with visibility timeouts, like SQS.
//!
//! A receive hides a message until `now + visibility_timeout` (by the
//! injected clock) and gives it a fresh receipt; extend, delete and
//! dead-letter name that receipt, so a worker whose visibility lapsed and
//! whose message went to another worker gets `StaleReceipt`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{OrBackend, SqliteBackend, int, parsed, uint};
use crate::domain::Priority;
use crate::domain::{JobId, Micros, TenantId, duration_micros};
use crate::storage::{
    DeadLetter, Delivery, JobQueue, QueueMessage, QueueStats, StorageError, StorageResult, receive_woken,
};
use async_trait::async_trait;

/// How often an idle receiver looks again even without a wake-up: messages
/// whose visibility expires, or that another process sent, signal nothing.
const FALLBACK_POLL: Duration = Duration::from_millis(200);

fn lane(p: Priority) -> i64 {
    match p {
        Priority::Interactive => 0,
        Priority::Batch => 1,
    }
}

fn priority_of(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Priority> {
    match row.get::<_, i64>(idx)? {
        0 => Ok(Priority::Interactive),
        1 => Ok(Priority::Batch),
        other => Err(rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Integer,
            format!("unknown queue lane {other}").into(),
        )),
    }
}

/// A message from columns `job_id, tenant, lane` (0, 1, 2).
fn message_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<QueueMessage> {
    Ok(QueueMessage {
        job_id: parsed(r, 0, JobId::parse)?,
        tenant: parsed(r, 1, TenantId::parse)?,
        priority: priority_of(r, 2)?,
    })
}

impl SqliteBackend {
    /// One look at the queue: takes up to `max` visible messages.
    async fn take_visible(&self, max: usize) -> StorageResult<Vec<Delivery>> {
        let now = self.now();
        let hidden_until = now.saturating_add(duration_micros(self.shared.visibility_timeout));
        let turn = self.shared.takes.fetch_add(1, Ordering::Relaxed);
        let batch_turn = self.shared.batch_turn.load(Ordering::Relaxed).max(1);
        // Lane order for this take: batch first on its turn.
        let batch_first = i64::from(turn % batch_turn == batch_turn - 1);
        self.write(move |conn| {
            // One statement picks, hides and re-receipts the messages; the
            // receipt is random per row (randomblob is evaluated per row).
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE queue
                        SET visible_at = ?1,
                            receive_count = receive_count + 1,
                            receipt = lower(hex(randomblob(16)))
                      WHERE id IN (SELECT id FROM queue WHERE visible_at <= ?2
                                    ORDER BY lane <> ?4, id LIMIT ?3)
                  RETURNING lane, id, job_id, tenant, receipt, receive_count",
                )
                .db()?;
            let mut rows = stmt
                .query_map(rusqlite::params![hidden_until, now, int(max), batch_first], |r| {
                    let key: (i64, i64) = (r.get(0)?, r.get(1)?);
                    let delivery = Delivery {
                        message: QueueMessage {
                            job_id: parsed(r, 2, JobId::parse)?,
                            tenant: parsed(r, 3, TenantId::parse)?,
                            priority: priority_of(r, 0)?,
                        },
                        receipt: r.get(4)?,
                        receive_count: r.get(5)?,
                    };
                    Ok((key, delivery))
                })
                .db()?
                .collect::<rusqlite::Result<Vec<_>>>()
                .db()?;
            // RETURNING does not promise an order; restore the take's.
            rows.sort_by_key(|&((lane, id), _)| (lane != batch_first, id));
            Ok(rows.into_iter().map(|(_, d)| d).collect())
        })
        .await
    }
}

#[async_trait]
impl JobQueue for SqliteBackend {
    async fn send(&self, message: &QueueMessage) -> StorageResult<()> {
        let now = self.now();
        let m = message.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO queue (job_id, tenant, lane, visible_at, created_at) VALUES (?1, ?2, ?3, ?4, ?4)",
            )
            .db()?
            .execute(rusqlite::params![m.job_id.as_str(), m.tenant.as_str(), lane(m.priority), now])
            .db()?;
            Ok(())
        })
        .await?;
        self.shared.queue_ready.notify_waiters();
        Ok(())
    }

    /// If dropped while a look is running, the messages it took stay hidden
    /// until their visibility ends, as with a lost SQS response.
    async fn receive(&self, max: usize, wait: Duration) -> StorageResult<Vec<Delivery>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        receive_woken(&self.shared.queue_ready, wait, FALLBACK_POLL, || self.take_visible(max)).await
    }

    /// Extending a message whose visibility already lapsed but that nobody
    /// received again succeeds (the receipt is still the latest); SQS would
    /// refuse that, but no other worker can hold it, so it is safe.
    async fn extend(&self, receipt: &str, timeout: Duration) -> StorageResult<()> {
        let visible_at = self.now().saturating_add(duration_micros(timeout));
        let receipt = receipt.to_owned();
        let changed = self
            .write(move |conn| {
                conn.prepare_cached("UPDATE queue SET visible_at = ?1 WHERE receipt = ?2")
                    .db()?
                    .execute(rusqlite::params![visible_at, receipt])
                    .db()
            })
            .await?;
        if changed == 0 {
            return Err(StorageError::StaleReceipt);
        }
        if timeout.is_zero() {
            self.shared.queue_ready.notify_waiters();
        }
        Ok(())
    }

    async fn delete(&self, receipt: &str) -> StorageResult<()> {
        let receipt = receipt.to_owned();
        let changed = self
            .write(move |conn| {
                conn.prepare_cached("DELETE FROM queue WHERE receipt = ?1").db()?.execute([receipt]).db()
            })
            .await?;
        if changed == 0 { Err(StorageError::StaleReceipt) } else { Ok(()) }
    }

    /// One statement: the row is hidden, re-receipted and its count reset,
    /// so there is never a moment with two copies or none.
    async fn defer(&self, delivery: &Delivery, delay: Duration) -> StorageResult<()> {
        let visible_at = self.now().saturating_add(duration_micros(delay));
        let receipt = delivery.receipt.clone();
        let changed = self
            .write(move |conn| {
                conn.prepare_cached(
                    "UPDATE queue SET visible_at = ?1, receive_count = 0, receipt = lower(hex(randomblob(16)))
                      WHERE receipt = ?2",
                )
                .db()?
                .execute(rusqlite::params![visible_at, receipt])
                .db()
            })
            .await?;
        if changed == 0 { Err(StorageError::StaleReceipt) } else { Ok(()) }
    }

    /// Moves the row itself (not `delivery.message`), so what is
    /// dead-lettered is exactly what was queued.
    async fn dead_letter(&self, delivery: &Delivery) -> StorageResult<()> {
        let now = self.now();
        let receipt = delivery.receipt.clone();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).db()?;
            let moved = tx
                .prepare_cached(
                    "INSERT INTO dead_letters (job_id, tenant, lane, receive_count, created_at, dead_at)
                     SELECT job_id, tenant, lane, receive_count, created_at, ?2 FROM queue WHERE receipt = ?1",
                )
                .db()?
                .execute(rusqlite::params![receipt, now])
                .db()?;
            if moved == 0 {
                return Err(StorageError::StaleReceipt);
            }
            tx.prepare_cached("DELETE FROM queue WHERE receipt = ?1").db()?.execute([&receipt]).db()?;
            tx.commit().db()
        })
        .await
    }

    async fn dead_letters(&self, max: usize) -> StorageResult<Vec<DeadLetter>> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT job_id, tenant, lane, receive_count, dead_at FROM dead_letters ORDER BY id LIMIT ?1",
            )
            .db()?
            .query_map([int(max)], |r| {
                Ok(DeadLetter { message: message_of(r)?, receive_count: r.get(3)?, since: r.get(4)? })
            })
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()
        })
        .await
    }

    /// One transaction: the rows move, so there is never a moment with the
    /// message in both tables or in neither.
    async fn redrive_dead_letters(&self, job: Option<&JobId>) -> StorageResult<Vec<QueueMessage>> {
        let now = self.now();
        let job = job.map(|j| j.as_str().to_owned());
        let moved = self
            .write(move |conn| {
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).db()?;
                let moved = tx
                    .prepare_cached(
                        "DELETE FROM dead_letters WHERE ?1 IS NULL OR job_id = ?1
                         RETURNING job_id, tenant, lane, created_at",
                    )
                    .db()?
                    .query_map([&job], |r| Ok((message_of(r)?, r.get::<_, Micros>(3)?)))
                    .db()?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .db()?;
                for (m, created_at) in &moved {
                    tx.prepare_cached(
                        "INSERT INTO queue (job_id, tenant, lane, visible_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .db()?
                    .execute(rusqlite::params![m.job_id.as_str(), m.tenant.as_str(), lane(m.priority), now, created_at])
                    .db()?;
                }
                tx.commit().db()?;
                Ok(moved.into_iter().map(|(m, _)| m).collect::<Vec<_>>())
            })
            .await?;
        if !moved.is_empty() {
            self.shared.queue_ready.notify_waiters();
        }
        Ok(moved)
    }

    async fn remove_dead_letters(&self, job: Option<&JobId>) -> StorageResult<Vec<QueueMessage>> {
        let job = job.map(|j| j.as_str().to_owned());
        self.write(move |conn| {
            conn.prepare_cached(
                "DELETE FROM dead_letters WHERE ?1 IS NULL OR job_id = ?1 RETURNING job_id, tenant, lane",
            )
            .db()?
            .query_map([&job], message_of)
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()
        })
        .await
    }

    async fn stats(&self) -> StorageResult<QueueStats> {
        let now: Micros = self.now();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT (SELECT count(*) FROM queue WHERE visible_at <= ?1),
                        (SELECT count(*) FROM queue WHERE visible_at > ?1),
                        (SELECT count(*) FROM dead_letters)",
            )
            .db()?
            .query_row([now], |r| Ok(QueueStats { visible: uint(r, 0)?, in_flight: uint(r, 1)?, dead: uint(r, 2)? }))
            .db()
        })
        .await
    }
}
