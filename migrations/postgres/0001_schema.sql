-- ratepool's PostgreSQL schema, version 1: every storage role in one
-- database (src/postgres/). Times are microseconds since the Unix epoch
-- (the injected clock's `Micros`), counters BIGINT.
--
-- Applied by sqlx's migrator (`ratepool postgres migrate`, or at start):
-- each file runs once, in its own transaction, under an advisory lock, so
-- several processes starting together apply it once. A database that has
-- a migration this binary does not know is refused.

-- Waiting and in-flight queue messages. `lane` 0 is interactive, 1 batch;
-- `ORDER BY lane, id` serves interactive first, oldest first.
CREATE TABLE queue (
    id            BIGSERIAL PRIMARY KEY,
    job_id        TEXT     NOT NULL,
    tenant        TEXT     NOT NULL,
    lane          SMALLINT NOT NULL,
    visible_at    BIGINT   NOT NULL,
    receive_count BIGINT   NOT NULL DEFAULT 0,
    -- Fresh on every receive, so a holder whose visibility lapsed and whose
    -- message was received again cannot extend or delete it.
    receipt       TEXT     UNIQUE,
    created_at    BIGINT   NOT NULL
);
CREATE INDEX queue_order ON queue (lane, id, visible_at);
-- The sweeper looks for queued jobs with no message (`unsent_jobs`).
CREATE INDEX queue_job ON queue (job_id);

CREATE TABLE dead_letters (
    id            BIGSERIAL PRIMARY KEY,
    job_id        TEXT     NOT NULL,
    tenant        TEXT     NOT NULL,
    lane          SMALLINT NOT NULL,
    receive_count BIGINT   NOT NULL,
    created_at    BIGINT   NOT NULL,
    dead_at       BIGINT   NOT NULL
);
CREATE INDEX dead_letters_job ON dead_letters (job_id);

CREATE TABLE jobs (
    id                TEXT    PRIMARY KEY,
    tenant            TEXT    NOT NULL,
    name              TEXT    NOT NULL,
    priority          TEXT    NOT NULL,
    status            TEXT    NOT NULL,
    spec_json         TEXT    NOT NULL,
    steps_total       BIGINT  NOT NULL,
    steps_done        BIGINT  NOT NULL DEFAULT 0,
    calls             BIGINT  NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT  NOT NULL DEFAULT 0,
    completion_tokens BIGINT  NOT NULL DEFAULT 0,
    error             TEXT,
    created_at        BIGINT  NOT NULL,
    updated_at        BIGINT  NOT NULL,
    finished_at       BIGINT,
    lease_owner       TEXT,
    -- Grows on every acquisition; never reset, so an old lease never matches.
    lease_epoch       BIGINT  NOT NULL DEFAULT 0,
    lease_expires_at  BIGINT,
    idempotency_key   TEXT,
    request_hash      TEXT,
    -- Lease acquisitions since the last checkpoint (poison detection).
    stalled_runs      BIGINT  NOT NULL DEFAULT 0
);
-- NULLs are distinct in a unique index, so jobs without a key never collide.
CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant, idempotency_key);
CREATE INDEX jobs_queued ON jobs (created_at) WHERE status = 'queued';

-- The last webhook delivery report of a job (JSON), once one was made.
CREATE TABLE webhook_deliveries (
    job_id     TEXT   PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    report     TEXT   NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE checkpoints (
    job_id            TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step_id           TEXT    NOT NULL,
    -- Choice 0's text, and the rest of the answer (`StepAnswer::split`).
    -- The text as UTF-8 bytes: a model may answer U+0000, which TEXT
    -- cannot hold (the rest is JSON, which escapes it).
    output            BYTEA   NOT NULL,
    answer            TEXT,
    calls             BIGINT  NOT NULL,
    prompt_tokens     BIGINT  NOT NULL,
    completion_tokens BIGINT  NOT NULL,
    org               TEXT    NOT NULL,
    model             TEXT    NOT NULL,
    attempts          BIGINT  NOT NULL,
    started_at        BIGINT  NOT NULL,
    finished_at       BIGINT  NOT NULL,
    -- Write order: a job's checkpoints are read back in it. A job's writes
    -- take its row's lock first, so its checkpoints commit in this order.
    seq               BIGINT  GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (job_id, step_id)
);

-- One row per bucket key (`BucketKey::parts`) holding both GCRA buckets'
-- TATs, and the last charge of each of its CHARGE_SLOTS slots
-- (`storage::ChargeId`; `charges[slot + 1]`, NULL where none yet). A grant
-- is one conditional statement on this row.
CREATE TABLE ledger (
    org          TEXT     NOT NULL,
    model        TEXT     NOT NULL,
    requests_tat BIGINT   NOT NULL,
    tokens_tat   BIGINT   NOT NULL,
    charges      BIGINT[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (org, model)
);

CREATE TABLE usage (
    tenant             TEXT   NOT NULL,
    org                TEXT   NOT NULL,
    calls              BIGINT NOT NULL,
    prompt_tokens      BIGINT NOT NULL,
    completion_tokens  BIGINT NOT NULL,
    rate_limited       BIGINT NOT NULL,
    insufficient_quota BIGINT NOT NULL,
    server_errors      BIGINT NOT NULL,
    timeouts           BIGINT NOT NULL,
    connection_errors  BIGINT NOT NULL,
    request_errors     BIGINT NOT NULL,
    PRIMARY KEY (tenant, org)
);

-- The usage flushes applied, by batch id, so a flush retried after its
-- answer was lost adds nothing; forgotten after USAGE_BATCH_MEMORY.
CREATE TABLE usage_batches (
    id         TEXT   PRIMARY KEY,
    applied_at BIGINT NOT NULL
);
CREATE INDEX usage_batches_age ON usage_batches (applied_at);

-- Per tenant, its jobs queued or running: raised with the job's insert,
-- lowered with the write that finishes it, in one transaction each.
CREATE TABLE tenant_jobs (
    tenant    TEXT   PRIMARY KEY,
    in_flight BIGINT NOT NULL
);

-- The exact-match response cache: the entry as JSON.
CREATE TABLE response_cache (
    key        TEXT   PRIMARY KEY,
    value      TEXT   NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX response_cache_expiry ON response_cache (expires_at);

-- One row per (tenant, idempotency key) of the Calls door
-- (`crate::storage::calls`). While in flight `owner` and `claim_until` are
-- set and `expires_at` is `claim_until`; once answered the answer's columns
-- are set and `expires_at` is when it is forgotten.
CREATE TABLE durable_calls (
    tenant       TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    request_hash TEXT    NOT NULL,
    owner        TEXT,
    claim_until  BIGINT,
    status       INTEGER,
    kind         TEXT,
    org          TEXT,
    body         BYTEA,
    created_at   BIGINT,
    expires_at   BIGINT  NOT NULL,
    PRIMARY KEY (tenant, key)
);
CREATE INDEX durable_calls_expiry ON durable_calls (expires_at);
