//! Connection settings and the database schema, created on open.
//!
//! The schema version lives in `PRAGMA user_version`; a file written by a
//! newer binary is refused rather than misread.
//!
//! Versions: 1 the queue, jobs, checkpoints, ledger and usage; 2 adds
//! `response_cache`; 3 adds `webhook_deliveries`; 4 adds `tenant_jobs`,
//! filled from the jobs already in flight when a file is upgraded; 5 adds
//! `durable_calls` (the Calls door's stored answers); 6 adds
//! `checkpoints.answer` (the answer's message beside its text); 7 adds
//! `usage_batches` (usage flushes applied, so a retried one adds nothing);
//! 8 adds `ledger_charges` (each bucket's recent charges, so an acquisition
//! retried after a lost answer charges once).
//! Tables and indexes are added with `IF NOT EXISTS`, so running the whole
//! schema brings a file of any older version up to date; a change to an
//! existing table is its own step, run when the stored version is below the
//! one that introduced it.

use rusqlite::Connection;

use super::{BUSY_TIMEOUT, OrBackend, STATEMENT_CACHE};
use crate::storage::{StorageError, StorageResult};

/// The version this binary writes and understands.
pub(super) const SCHEMA_VERSION: i64 = 8;

/// Per-connection pragmas.
pub(super) fn configure(conn: &Connection, read_only: bool) -> StorageResult<()> {
    conn.busy_timeout(BUSY_TIMEOUT).db()?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    if read_only {
        conn.pragma_update(None, "query_only", true).db()?;
        return Ok(());
    }
    // WAL: readers do not block the writer and a commit is one append.
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).db()?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StorageError::Backend(format!("sqlite refused WAL mode (journal_mode is {mode})")));
    }
    // NORMAL under WAL syncs only at checkpoints: a committed transaction
    // survives a crash of the process (our failure model: SIGKILL, OOM), and
    // only a power loss or kernel crash can drop the last few commits. FULL
    // would add an fsync to every checkpoint and lease write.
    conn.pragma_update(None, "synchronous", "NORMAL").db()?;
    // No checkpoint inside a commit: it would copy the WAL into the file and
    // fsync on the committing thread, often a tokio worker (`short_write`),
    // stalling every task on it for milliseconds. The backend's own
    // checkpointer thread does it (`Checkpointer`).
    conn.pragma_update(None, "wal_autocheckpoint", 0).db()?;
    conn.pragma_update(None, "foreign_keys", true).db()?;
    Ok(())
}

/// Creates the tables if missing and records the version.
pub(super) fn migrate(conn: &Connection) -> StorageResult<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).db()?;
    if version > SCHEMA_VERSION {
        return Err(StorageError::Backend(format!(
            "database schema version {version} is newer than this binary understands ({SCHEMA_VERSION})"
        )));
    }
    // The counters start from the jobs an older binary left in flight.
    let backfill = if version < 4 { BACKFILL_TENANT_JOBS } else { "" };
    // Checked by column too: a file may have been made by this schema and
    // had its version set back (the upgrade tests do that).
    let checkpoint_answer =
        if version < 6 && !has_column(conn, "checkpoints", "answer")? { CHECKPOINT_ANSWER } else { "" };
    // One batch in one transaction: a crash mid-way leaves no half schema.
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;\n{SCHEMA}\n{DURABLE_CALLS}\n{backfill}\n{checkpoint_answer}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
    ))
    .db()
}

/// Whether `table` exists and has `column`.
fn has_column(conn: &Connection, table: &str, column: &str) -> StorageResult<bool> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)").db()?;
    let names = stmt.query_map([table], |r| r.get::<_, String>(0)).db()?;
    for name in names {
        if name.db()? == column {
            return Ok(true);
        }
    }
    Ok(false)
}

const SCHEMA: &str = r#"
-- Waiting and in-flight queue messages. `lane` 0 is interactive, 1 batch,
-- so `ORDER BY lane, id` serves interactive first, oldest first.
-- A plain rowid is enough for arrival order: a new row gets max(id) + 1.
CREATE TABLE IF NOT EXISTS queue (
    id            INTEGER PRIMARY KEY,
    job_id        TEXT    NOT NULL,
    tenant        TEXT    NOT NULL,
    lane          INTEGER NOT NULL,
    visible_at    INTEGER NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    -- Fresh on every receive, so a holder whose visibility lapsed and whose
    -- message was received again cannot extend or delete it.
    receipt       TEXT,
    created_at    INTEGER NOT NULL
);
-- Covers the receive scan: the in-flight rows it skips are bounded by the
-- number of workers, while the waiting backlog may be long.
CREATE INDEX IF NOT EXISTS queue_order ON queue (lane, id, visible_at);
CREATE UNIQUE INDEX IF NOT EXISTS queue_receipt ON queue (receipt);
-- The sweeper looks for queued jobs with no message (`unsent_jobs`).
CREATE INDEX IF NOT EXISTS queue_job ON queue (job_id);

CREATE TABLE IF NOT EXISTS dead_letters (
    id            INTEGER PRIMARY KEY,
    job_id        TEXT    NOT NULL,
    tenant        TEXT    NOT NULL,
    lane          INTEGER NOT NULL,
    receive_count INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    dead_at       INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS jobs (
    id                TEXT    PRIMARY KEY NOT NULL,
    tenant            TEXT    NOT NULL,
    name              TEXT    NOT NULL,
    priority          TEXT    NOT NULL,
    status            TEXT    NOT NULL,
    spec_json         TEXT    NOT NULL,
    steps_total       INTEGER NOT NULL,
    steps_done        INTEGER NOT NULL DEFAULT 0,
    calls             INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    error             TEXT,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    finished_at       INTEGER,
    lease_owner       TEXT,
    -- Grows on every acquisition; never reset, so an old lease never matches.
    lease_epoch       INTEGER NOT NULL DEFAULT 0,
    lease_expires_at  INTEGER,
    idempotency_key   TEXT,
    request_hash      TEXT,
    -- Lease acquisitions since the last checkpoint (poison detection).
    stalled_runs      INTEGER NOT NULL DEFAULT 0
);
-- NULL keys are distinct in SQLite, so jobs without a key never collide.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (tenant, idempotency_key);
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (created_at) WHERE status = 'queued';

-- The last webhook delivery report of a job (JSON), once one was made.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    job_id            TEXT    PRIMARY KEY NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    report            TEXT    NOT NULL,
    updated_at        INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS checkpoints (
    job_id            TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step_id           TEXT    NOT NULL,
    output            TEXT    NOT NULL,
    calls             INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    org               TEXT    NOT NULL,
    model             TEXT    NOT NULL,
    attempts          INTEGER NOT NULL,
    started_at        INTEGER NOT NULL,
    finished_at       INTEGER NOT NULL,
    PRIMARY KEY (job_id, step_id)
);

-- One row per (org, model) holding both GCRA buckets' TATs.
CREATE TABLE IF NOT EXISTS ledger (
    org          TEXT    NOT NULL,
    model        TEXT    NOT NULL,
    requests_tat INTEGER NOT NULL,
    tokens_tat   INTEGER NOT NULL,
    PRIMARY KEY (org, model)
) WITHOUT ROWID;

-- Since version 8. The last charge of each of a bucket's slots
-- (storage::ChargeId): at most CHARGE_SLOTS rows per bucket.
CREATE TABLE IF NOT EXISTS ledger_charges (
    org    TEXT    NOT NULL,
    model  TEXT    NOT NULL,
    slot   INTEGER NOT NULL,
    charge INTEGER NOT NULL,
    PRIMARY KEY (org, model, slot)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS usage (
    tenant             TEXT    NOT NULL,
    org                TEXT    NOT NULL,
    calls              INTEGER NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    rate_limited       INTEGER NOT NULL,
    insufficient_quota INTEGER NOT NULL,
    server_errors      INTEGER NOT NULL,
    timeouts           INTEGER NOT NULL,
    connection_errors  INTEGER NOT NULL,
    request_errors     INTEGER NOT NULL,
    PRIMARY KEY (tenant, org)
) WITHOUT ROWID;

-- Since version 7. The usage flushes applied, by batch id, so a flush
-- retried after its answer was lost adds nothing; ids are forgotten after
-- a day (`USAGE_BATCH_MEMORY`).
CREATE TABLE IF NOT EXISTS usage_batches (
    id         TEXT    PRIMARY KEY NOT NULL,
    applied_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_batches_age ON usage_batches (applied_at);

-- Since version 3. Per tenant, its jobs queued or running: raised with the
-- job's insert, lowered with the write that finishes it, in one transaction
-- each, so the jobs_in_flight quota is checked against an exact count.
CREATE TABLE IF NOT EXISTS tenant_jobs (
    tenant    TEXT    PRIMARY KEY NOT NULL,
    in_flight INTEGER NOT NULL
) WITHOUT ROWID;

-- Since version 2. `value` is the entry as JSON; `expires_at` in
-- microseconds. A rowid table, since values can be large.
CREATE TABLE IF NOT EXISTS response_cache (
    key        TEXT    PRIMARY KEY NOT NULL,
    value      TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
);
-- The purge deletes the oldest expired rows first.
CREATE INDEX IF NOT EXISTS response_cache_expiry ON response_cache (expires_at);
"#;

/// Since version 5: one row per (tenant, idempotency key) of the Calls
/// door (`crate::storage::calls`). While in flight `owner` and
/// `claim_until` are set and `expires_at` is `claim_until`; once answered
/// the answer's columns are set and `expires_at` is when it is forgotten.
const DURABLE_CALLS: &str = r#"
CREATE TABLE IF NOT EXISTS durable_calls (
    tenant       TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    request_hash TEXT    NOT NULL,
    owner        TEXT,
    claim_until  INTEGER,
    status       INTEGER,
    kind         TEXT,
    org          TEXT,
    body         BLOB,
    created_at   INTEGER,
    expires_at   INTEGER NOT NULL,
    PRIMARY KEY (tenant, key)
);
-- Claims purge the oldest expired rows first.
CREATE INDEX IF NOT EXISTS durable_calls_expiry ON durable_calls (expires_at);
"#;

const BACKFILL_TENANT_JOBS: &str = "
INSERT OR REPLACE INTO tenant_jobs (tenant, in_flight)
    SELECT tenant, count(*) FROM jobs WHERE status IN ('queued', 'running') GROUP BY tenant;
";

/// Version 5: the answer's message beside its text (`StepAnswer::split`'s
/// JSON); NULL in rows written before, which read as the text alone.
const CHECKPOINT_ANSWER: &str = "
ALTER TABLE checkpoints ADD COLUMN answer TEXT;
";
