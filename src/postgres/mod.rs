//! The shared-server backend: every storage role in one PostgreSQL
//! database, so `ratepool serve` and `ratepool worker` processes on several
//! machines share one queue, one job store and one quota ledger.
//!
//! - `queue`: the job queue (visibility timeouts, receive counts, dead
//!   letters, both lanes), taken with `FOR UPDATE SKIP LOCKED`; idle
//!   receivers wait on `LISTEN ratepool_queue`, which every send notifies.
//! - `jobs`: job records, leases and step checkpoints; every write a lease
//!   guards checks it in the same statement.
//! - `ledger`: the GCRA quota ledger; a grant is one conditional statement
//!   on the bucket's row (both buckets and the charge's slot at once).
//! - `usage`, `cache`, `calls`: usage counters, the response cache, the
//!   durable calls.
//!
//! Times are the injected clock's (`Micros`), as on the other backends:
//! leases and the ledger already compare one process's clock with
//! another's, so machines sharing a database keep their clocks in sync
//! (NTP), as they must for SQS's and DynamoDB's too.

mod cache;
mod calls;
mod jobs;
mod ledger;
mod queue;
mod usage;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Row};
use tokio::sync::Notify;

use crate::domain::{Clock, InvalidId, Micros, Priority, SystemClock};
use crate::storage::{Backend, StorageError, StorageResult};

/// `[postgres]`: where the database is and how the backend uses it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// The environment variable holding the connection URL
    /// (`postgres://user:password@host:5432/db?sslmode=verify-full`). The
    /// URL carries a password, so it never comes from the file.
    #[serde(default = "default_url_env")]
    pub url_env: String,
    /// Connections this process keeps open at most.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Apply missing schema migrations at start (under an advisory lock, so
    /// processes starting together apply each once). When false, a process
    /// refuses a database whose schema is not exactly this binary's: run
    /// `ratepool postgres migrate` first.
    #[serde(default = "default_migrate")]
    pub migrate: bool,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self { url_env: default_url_env(), max_connections: default_max_connections(), migrate: default_migrate() }
    }
}

fn default_url_env() -> String {
    "RATEPOOL_POSTGRES_URL".into()
}
fn default_max_connections() -> u32 {
    16
}
fn default_migrate() -> bool {
    true
}

/// Bounds of `[postgres] max_connections`.
const MAX_CONNECTIONS: std::ops::RangeInclusive<u32> = 2..=1000;

impl PostgresConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.url_env.trim().is_empty() {
            return Err("[postgres] url_env: must name an environment variable".into());
        }
        if !MAX_CONNECTIONS.contains(&self.max_connections) {
            return Err(format!(
                "[postgres] max_connections must be {} to {}, got {}",
                MAX_CONNECTIONS.start(),
                MAX_CONNECTIONS.end(),
                self.max_connections
            ));
        }
        Ok(())
    }

    /// The connection URL from the environment.
    pub fn url(&self) -> Result<String, String> {
        match std::env::var(&self.url_env) {
            Ok(url) if !url.trim().is_empty() => Ok(url),
            _ => Err(format!(
                "storage.backend is \"postgres\" but {} is not set: put the database's URL (postgres://...) in it",
                self.url_env
            )),
        }
    }
}

/// The schema migrations, embedded from `migrations/postgres/`.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The channel every send and hand-back notifies.
const QUEUE_CHANNEL: &str = "ratepool_queue";

/// `[workers] interactive_weight`'s default.
const DEFAULT_INTERACTIVE_WEIGHT: u64 = 3;

/// How long a request waits for a free pooled connection before giving up
/// with a retryable error.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the PostgreSQL backend behaves.
#[derive(Clone)]
pub struct PgOptions {
    /// How long a received queue message stays hidden before another worker
    /// may receive it, unless the holder extends or deletes it.
    pub visibility_timeout: Duration,
    /// The backend's notion of "now" for the queue's visibility.
    pub clock: Arc<dyn Clock>,
    pub max_connections: u32,
    /// Apply missing migrations (see [`PostgresConfig::migrate`]).
    pub migrate: bool,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(30),
            clock: Arc::new(SystemClock),
            max_connections: default_max_connections(),
            migrate: true,
        }
    }
}

/// Every storage role over one PostgreSQL database. Cheap to clone; clones
/// share the pool.
#[derive(Clone)]
pub struct PgBackend {
    shared: Arc<Shared>,
}

struct Shared {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    visibility_timeout: Duration,
    /// Woken by the listener on every notification of the queue channel.
    queue_ready: Arc<Notify>,
    /// Every `batch_turn`-th take looks at the batch lane first.
    batch_turn: AtomicU64,
    takes: AtomicU64,
    _listener: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Parses a connection URL, with statement logging off (statements carry
/// job text) and an error that never repeats the URL (it has the password).
pub fn connect_options(url: &str) -> StorageResult<PgConnectOptions> {
    let options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
        StorageError::Backend(format!("the PostgreSQL URL does not parse ({})", redact_url_error(&e)))
    })?;
    Ok(options.disable_statement_logging())
}

/// A URL parse error's kind, without the URL's text.
fn redact_url_error(e: &sqlx::Error) -> &'static str {
    match e {
        sqlx::Error::Configuration(_) => "expected postgres://user:password@host:port/database?options",
        _ => "not a URL",
    }
}

impl PgBackend {
    /// Connects, brings the schema up to date (or checks it, when
    /// `options.migrate` is false) and starts listening for queue sends.
    pub async fn connect(url: &str, options: PgOptions) -> StorageResult<Self> {
        let pool = connect_pool(url, options.max_connections.max(*MAX_CONNECTIONS.start())).await?;
        if options.migrate {
            migrate(&pool).await?;
        } else {
            check_schema(&pool).await?;
        }
        let queue_ready = Arc::new(Notify::new());
        let listener = listen(&pool, queue_ready.clone()).await?;
        Ok(Self {
            shared: Arc::new(Shared {
                pool,
                clock: options.clock,
                visibility_timeout: options.visibility_timeout,
                queue_ready,
                batch_turn: AtomicU64::new(DEFAULT_INTERACTIVE_WEIGHT + 1),
                takes: AtomicU64::new(0),
                _listener: listener,
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

    fn pool(&self) -> &PgPool {
        &self.shared.pool
    }

    fn now(&self) -> Micros {
        self.shared.clock.now()
    }
}

/// A pool of at most `max` connections to `url`.
async fn connect_pool(url: &str, max: u32) -> StorageResult<PgPool> {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(connect_options(url)?)
        .await
        .map_err(|e| StorageError::Backend(format!("connecting to PostgreSQL: {}", describe(&e))))
}

/// Applies the migrations this database lacks. Refuses a database that has
/// one this binary does not know (a newer binary migrated it).
pub async fn migrate(pool: &PgPool) -> StorageResult<()> {
    MIGRATOR.run(pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::VersionMissing(v) => newer_schema(v),
        other => StorageError::Backend(format!("migrating the PostgreSQL schema: {other}")),
    })
}

/// Connects to `url` and applies the missing migrations: `ratepool postgres
/// migrate`. Returns the versions applied now.
pub async fn migrate_url(url: &str) -> StorageResult<Vec<i64>> {
    let pool = connect_pool(url, 1).await?;
    let before = applied_versions(&pool).await?;
    migrate(&pool).await?;
    pool.close().await;
    Ok(MIGRATOR.iter().map(|m| m.version).filter(|v| !before.contains(v)).collect())
}

fn newer_schema(version: i64) -> StorageError {
    StorageError::Backend(format!(
        "the PostgreSQL schema has migration {version}, which this binary does not know: \
         a newer ratepool migrated it; run that version"
    ))
}

/// Migrations applied so far (none if the table is not there yet).
async fn applied_versions(pool: &PgPool) -> StorageResult<Vec<i64>> {
    let exists: bool =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL").fetch_one(pool).await.map_err(db)?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(pool)
        .await
        .map_err(db)
}

/// The schema must be exactly this binary's: nothing newer, nothing missing.
async fn check_schema(pool: &PgPool) -> StorageResult<()> {
    let applied = applied_versions(pool).await?;
    if let Some(&v) = applied.iter().find(|v| MIGRATOR.iter().all(|m| m.version != **v)) {
        return Err(newer_schema(v));
    }
    if let Some(m) = MIGRATOR.iter().find(|m| !applied.contains(&m.version)) {
        return Err(StorageError::Backend(format!(
            "the PostgreSQL schema lacks migration {} ({}): run `ratepool postgres migrate`, \
             or set [postgres] migrate = true",
            m.version, m.description
        )));
    }
    Ok(())
}

/// A task that wakes `ready` on every notification of the queue channel.
/// `PgListener` reconnects on its own after a lost connection; receivers
/// also look every `queue::FALLBACK_POLL`, so a notification missed then
/// delays a message by at most that.
async fn listen(pool: &PgPool, ready: Arc<Notify>) -> StorageResult<AbortOnDrop> {
    let mut listener = PgListener::connect_with(pool).await.map_err(db)?;
    listener.listen(QUEUE_CHANNEL).await.map_err(db)?;
    let task = tokio::spawn(async move {
        loop {
            match listener.recv().await {
                Ok(_) => ready.notify_waiters(),
                Err(e) => {
                    tracing::warn!(error = %describe(&e), "PostgreSQL queue listener lost its connection; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    Ok(AbortOnDrop(task.abort_handle()))
}

/// An sqlx error as the backend reports it: a refused connection or an
/// exhausted server is a throttle (retried after a backoff), every other
/// failure a retryable backend error. Callers that expect a specific
/// failure (a uniqueness conflict) check for it before this.
pub(crate) fn db(e: sqlx::Error) -> StorageError {
    let text = describe(&e);
    match &e {
        sqlx::Error::PoolTimedOut => StorageError::Throttled(text),
        // too_many_connections, cannot_connect_now
        sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("53300" | "57P03")) => {
            StorageError::Throttled(text)
        }
        _ => StorageError::Backend(text),
    }
}

/// An error's text: the server's message and SQLSTATE for a database error.
fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => match d.code() {
            Some(code) => format!("{} (SQLSTATE {code})", d.message()),
            None => d.message().to_owned(),
        },
        other => other.to_string(),
    }
}

/// Whether `e` is a unique-constraint violation.
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// A counter as stored: BIGINT. Counters never reach 2^63; saturating is
/// only a guard.
pub(crate) fn int(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// A column read from `row`, as an sqlx error becomes a backend error.
pub(crate) fn col<'r, T>(row: &'r sqlx::postgres::PgRow, name: &str) -> StorageResult<T>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(name).map_err(db)
}

/// A non-negative BIGINT column as `u64`/`u32`; a negative value is
/// reported as corrupt rather than trusted.
pub(crate) fn ucol<T: TryFrom<i64>>(row: &sqlx::postgres::PgRow, name: &str) -> StorageResult<T> {
    let v: i64 = col(row, name)?;
    T::try_from(v).map_err(|_| StorageError::Backend(format!("column {name} holds {v}, out of range")))
}

/// A validated id from a TEXT column; a stored value that no longer parses
/// is reported as corrupt rather than trusted.
pub(crate) fn parsed<T>(
    row: &sqlx::postgres::PgRow,
    name: &str,
    parse: impl FnOnce(String) -> Result<T, InvalidId>,
) -> StorageResult<T> {
    let s: String = col(row, name)?;
    parse(s).map_err(|e| StorageError::Backend(format!("column {name}: {e}")))
}

/// A queue lane: 0 interactive, 1 batch.
pub(crate) fn lane(p: Priority) -> i16 {
    match p {
        Priority::Interactive => 0,
        Priority::Batch => 1,
    }
}

pub(crate) fn lane_priority(lane: i16) -> StorageResult<Priority> {
    match lane {
        0 => Ok(Priority::Interactive),
        1 => Ok(Priority::Batch),
        other => Err(StorageError::Backend(format!("unknown queue lane {other}"))),
    }
}

pub(crate) fn priority_col(row: &sqlx::postgres::PgRow, name: &str) -> StorageResult<Priority> {
    let s: String = col(row, name)?;
    Priority::parse(&s).ok_or_else(|| StorageError::Backend(format!("unknown priority {s:?}")))
}

/// Creates an empty database on the server at `server_url` and returns its
/// URL: a scratch database for the test suite and the benchmark, each of
/// whose runs gets one of its own.
pub async fn create_database(server_url: &str) -> StorageResult<String> {
    let name = format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let pool = connect_pool(server_url, 1).await?;
    // The name is made here of hex digits: nothing of a caller's reaches it.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&pool).await.map_err(db)?;
    pool.close().await;
    let mut url = url::Url::parse(server_url)
        .map_err(|_| StorageError::Backend("the PostgreSQL server URL does not parse".into()))?;
    url.set_path(&name);
    Ok(url.to_string())
}
