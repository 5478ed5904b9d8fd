//! The one-machine backend: every storage role in one SQLite file.
//!
//! One writer connection behind a `std::sync::Mutex` and one read-only
//! connection beside it (WAL lets readers run while the writer commits, so a
//! client polling job status never waits behind a worker's checkpoint). Every
//! call runs on tokio's blocking pool, never on the async runtime, and uses
//! cached prepared statements so an operation costs tens of microseconds.
//!
//! - `queue`: the job queue with visibility timeouts and a dead-letter table.
//! - `jobs`: job records, leases and step checkpoints.
//! - `ledger`: the GCRA quota ledger (the math is [`crate::storage::gcra`]).
//! - `usage`: per-tenant, per-org usage counters.
//! - `cache`: the exact-match response cache.
//! - `calls`: the durable calls' claims and stored answers.

mod cache;
mod calls;
mod jobs;
mod ledger;
mod queue;
mod schema;
mod usage;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rusqlite::{Connection, Transaction, TransactionBehavior};
use tokio::sync::Notify;

use crate::domain::{Clock, InvalidId, Micros, Priority, SystemClock};
use crate::storage::{Backend, StorageError, StorageResult};

/// How the SQLite backend behaves; the defaults suit production.
#[derive(Clone)]
pub struct SqliteOptions {
    /// How long a received queue message stays hidden before another worker
    /// may receive it, unless the holder extends it (heartbeat) or deletes it.
    pub visibility_timeout: Duration,
    /// The queue's notion of "now" for visibility; injected so tests move
    /// time with `ManualClock` instead of sleeping.
    pub clock: Arc<dyn Clock>,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self { visibility_timeout: Duration::from_secs(30), clock: Arc::new(SystemClock) }
    }
}

/// Every storage role over one SQLite database file. Cheap to clone;
/// clones share the connections.
#[derive(Clone)]
pub struct SqliteBackend {
    shared: Arc<Shared>,
}

struct Shared {
    /// The only connection that writes, so in-process writers never meet
    /// `SQLITE_BUSY`; the mutex is the write lock.
    writer: Mutex<Connection>,
    /// `query_only`: reads that need no transaction with a write.
    reader: Mutex<Connection>,
    clock: Arc<dyn Clock>,
    visibility_timeout: Duration,
    /// Wakes receivers waiting on an empty queue when a message is sent or
    /// handed back, so they need not poll often.
    queue_ready: Notify,
    /// Every `batch_turn`-th take looks at the batch lane first
    /// (`interactive_weight + 1`), so batch jobs are never starved.
    batch_turn: AtomicU64,
    takes: AtomicU64,
    _checkpointer: Checkpointer,
}

/// How often the checkpointer copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// A thread with its own connection that checkpoints the WAL
/// (`PRAGMA wal_checkpoint(PASSIVE)`: it waits for no reader or writer)
/// every `CHECKPOINT_EVERY`, in place of SQLite's automatic checkpoint,
/// which runs inside a commit on the committing thread (schema::configure).
/// Stops and closes its connection when the backend is dropped.
struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: &Path) -> StorageResult<Self> {
        let conn = Connection::open(path).db()?;
        conn.busy_timeout(BUSY_TIMEOUT).db()?;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
                    // Busy only while another process checkpoints: next time.
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        tracing::debug!(error = %e, "sqlite WAL checkpoint did not run");
                    }
                }
            })
            .map_err(|e| StorageError::Backend(format!("starting the sqlite checkpointer: {e}")))?;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waiting on a lock held by another process (a second `ratepool` on the same
/// file) before giving up with a retryable backend error.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Enough for every distinct statement this backend prepares, so none is
/// ever re-parsed.
const STATEMENT_CACHE: usize = 64;

/// `[workers] interactive_weight`'s default.
const DEFAULT_INTERACTIVE_WEIGHT: u64 = 3;

impl SqliteBackend {
    /// Opens (creating if needed) the database at `path` and brings its schema
    /// up to date. Blocking: call it at startup, before serving.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<Self, StorageError> {
        let writer = Connection::open(path).db()?;
        schema::configure(&writer, false)?;
        schema::migrate(&writer)?;
        // Opened after the writer switched the file to WAL, so the reader
        // finds the WAL index already in place.
        let reader = Connection::open(path).db()?;
        schema::configure(&reader, true)?;
        let checkpointer = Checkpointer::start(path)?;
        Ok(Self {
            shared: Arc::new(Shared {
                writer: Mutex::new(writer),
                reader: Mutex::new(reader),
                clock: options.clock,
                visibility_timeout: options.visibility_timeout,
                queue_ready: Notify::new(),
                batch_turn: AtomicU64::new(DEFAULT_INTERACTIVE_WEIGHT + 1),
                takes: AtomicU64::new(0),
                _checkpointer: checkpointer,
            }),
        })
    }

    /// Interactive jobs taken per batch job when both lanes wait (default 3).
    pub fn set_interactive_weight(&self, weight: std::num::NonZeroU64) {
        self.shared.batch_turn.store(weight.get().saturating_add(1), Ordering::Relaxed);
    }

    /// Every role, all backed by this one database.
    pub fn backend(&self) -> Backend {
        Backend::all(self.clone())
    }

    fn now(&self) -> Micros {
        self.shared.clock.now()
    }

    /// Runs `f` on the writer connection on the blocking pool.
    async fn write<T, F>(&self, f: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StorageResult<T> + Send + 'static,
    {
        let shared = self.shared.clone();
        run_blocking(move || {
            let mut conn = shared.writer.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut conn)
        })
        .await
    }

    /// Runs a short write transaction `f` (a ledger decision: tens of µs)
    /// on the calling thread when it can start at once, that is when the
    /// writer connection is free in this process and SQLite's write lock is
    /// free in every process; otherwise on the blocking pool like any write.
    /// Handing a write to the blocking pool and back costs two thread
    /// wake-ups, more than the write itself: it was half of the server's CPU
    /// per call through the calls door (BENCHMARKS.md, figure 10).
    async fn short_write<T, F>(&self, f: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce(Transaction<'_>) -> StorageResult<T> + Send + 'static,
    {
        if let Ok(mut conn) = self.shared.writer.try_lock() {
            conn.busy_timeout(Duration::ZERO).db()?;
            let failed = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
                Ok(tx) => {
                    tx.busy_timeout(BUSY_TIMEOUT).db()?;
                    return f(tx);
                }
                // Another process is writing: wait for it off this thread.
                Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DatabaseBusy => None,
                Err(e) => Some(StorageError::Backend(e.to_string())),
            };
            conn.busy_timeout(BUSY_TIMEOUT).db()?;
            if let Some(e) = failed {
                return Err(e);
            }
        }
        self.write(move |conn| f(conn.transaction_with_behavior(TransactionBehavior::Immediate).db()?)).await
    }

    /// Runs `f` on the read-only connection on the blocking pool.
    async fn read<T, F>(&self, f: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StorageResult<T> + Send + 'static,
    {
        let shared = self.shared.clone();
        run_blocking(move || {
            let conn = shared.reader.lock().unwrap_or_else(|e| e.into_inner());
            f(&conn)
        })
        .await
    }
}

async fn run_blocking<T, F>(f: F) -> StorageResult<T>
where
    T: Send + 'static,
    F: FnOnce() -> StorageResult<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| StorageError::Backend(format!("sqlite task failed: {e}")))?
}

/// `rusqlite` errors become retryable backend errors; callers that expect a
/// specific failure (a uniqueness conflict) check for it before this.
trait OrBackend<T> {
    fn db(self) -> StorageResult<T>;
}

impl<T> OrBackend<T> for rusqlite::Result<T> {
    fn db(self) -> StorageResult<T> {
        self.map_err(|e| StorageError::Backend(e.to_string()))
    }
}

/// Reads a validated id from column `idx`; a stored value that no longer
/// parses is reported as a conversion failure rather than trusted.
fn parsed<T>(
    row: &rusqlite::Row<'_>,
    idx: usize,
    parse: impl FnOnce(String) -> Result<T, InvalidId>,
) -> rusqlite::Result<T> {
    let s: String = row.get(idx)?;
    parse(s).map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e)))
}

/// SQLite integers are `i64`; counters never reach 2^63, so saturating is
/// only a guard. (rusqlite's own `u64` support needs its `fallible_uint`
/// feature, which this crate does not enable.)
fn int(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// Reads a non-negative integer column as `u64`/`u32`, refusing negatives.
fn uint<T: TryFrom<i64>>(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<T>
where
    T::Error: std::error::Error + Send + Sync + 'static,
{
    let v: i64 = row.get(idx)?;
    T::try_from(v)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Integer, Box::new(e)))
}

fn parse_priority(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Priority> {
    let s: String = row.get(idx)?;
    Priority::parse(&s).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Text,
            format!("unknown priority {s:?}").into(),
        )
    })
}

#[cfg(test)]
mod tests;
