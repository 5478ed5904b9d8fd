//! The storage conformance suite against a real PostgreSQL server (the one
//! `make test` starts), each test on a database of its own.

mod conformance;
#[path = "common/postgres.rs"]
mod pg;

use std::sync::Arc;
use std::time::Duration;

use conformance::{Harness, QueueTime, T0};
use ratepool::domain::ManualClock;
use ratepool::postgres::{PgBackend, PgOptions};

const VISIBILITY: Duration = Duration::from_secs(30);

async fn harness() -> Harness {
    let url = pg::fresh_database().await;
    let clock = Arc::new(ManualClock::new(T0));
    let options = PgOptions { visibility_timeout: VISIBILITY, clock: clock.clone(), max_connections: 8, migrate: true };
    let db = PgBackend::connect(&url, options).await.expect("connect to postgres");
    Harness {
        backend: db.backend(),
        clock,
        visibility_timeout: VISIBILITY,
        queue_time: QueueTime::Manual,
        keep_alive: Box::new(()),
    }
}

conformance_suite!(harness);
calls_suite!(harness);

fn options(migrate: bool) -> PgOptions {
    PgOptions { max_connections: 2, migrate, ..PgOptions::default() }
}

/// A process that may not migrate refuses a database without the schema,
/// naming the command that applies it; after `migrate_url` it opens.
#[tokio::test]
async fn without_migrate_a_missing_schema_is_refused_until_migrated() {
    let url = pg::fresh_database().await;
    let err = PgBackend::connect(&url, options(false)).await.err().expect("refused").to_string();
    assert!(err.contains("lacks migration 1") && err.contains("ratepool postgres migrate"), "{err}");
    assert_eq!(ratepool::postgres::migrate_url(&url).await.expect("migrate"), vec![1]);
    assert_eq!(ratepool::postgres::migrate_url(&url).await.expect("again"), Vec::<i64>::new(), "nothing twice");
    PgBackend::connect(&url, options(false)).await.expect("the schema is this binary's");
}

/// A database a newer binary migrated is refused, whether this process
/// would migrate or not, and nothing of it is changed.
#[tokio::test]
async fn a_schema_newer_than_the_binary_is_refused() {
    let url = pg::fresh_database().await;
    PgBackend::connect(&url, options(true)).await.expect("migrate");
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (9999, 'from the future', true, '\\x00', 0)",
    )
    .execute(&pool)
    .await
    .expect("a newer migration");
    for migrate in [true, false] {
        let err = PgBackend::connect(&url, options(migrate)).await.err().expect("refused").to_string();
        assert!(err.contains("migration 9999") && err.contains("newer"), "migrate = {migrate}: {err}");
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations").fetch_one(&pool).await.expect("count");
    assert_eq!(n, 2);
}

/// The URL holds the password: no error repeats it, whether the URL does
/// not parse or the server cannot be reached.
#[tokio::test]
async fn errors_never_repeat_the_password_in_the_url() {
    let secret = "pw-0f3c9a7d1e";
    let unreachable = format!("postgres://ratepool:{secret}@127.0.0.1:1/db");
    let malformed = format!("postgres://ratepool:{secret}@127.0.0.1:notaport/db");
    for url in [unreachable, malformed] {
        let err = PgBackend::connect(&url, options(true)).await.err().expect("refused").to_string();
        assert!(!err.contains(secret), "{err}");
        assert!(err.contains("PostgreSQL"), "says what failed: {err}");
    }
}

/// PostgreSQL's TEXT cannot hold U+0000, which a model's answer may carry:
/// the step's text comes back whole, and a job name with it is stored with
/// U+FFFD instead of failing every retry.
#[tokio::test]
async fn a_nul_character_in_an_answer_or_a_name_does_not_fail_the_write() {
    use ratepool::answer::StepAnswer;
    use ratepool::domain::{JobId, ModelName, OrgName, Priority, StepId, StepKey, TenantId, Usage};
    use ratepool::storage::{Checkpoint, CreateOutcome, LeaseOutcome, NewJob};

    let h = harness().await;
    let job = NewJob {
        id: JobId::generate(),
        tenant: TenantId::parse("acme").unwrap(),
        name: "nul\0name".into(),
        priority: Priority::Interactive,
        spec_json: "{}".into(),
        steps_total: 1,
        idempotency: None,
        created_at: T0,
        in_flight_limit: None,
    };
    let CreateOutcome::Created(stored) = h.backend.jobs.create_job(&job).await.expect("create") else {
        panic!("not created")
    };
    assert_eq!(stored.name, "nul\u{fffd}name");
    let LeaseOutcome::Acquired(lease) =
        h.backend.jobs.acquire_lease(&job.id, "w", Duration::from_secs(30), T0).await.expect("lease")
    else {
        panic!("no lease")
    };
    let answer = "before\0after";
    let checkpoint = Checkpoint {
        step: StepKey::Step(StepId::parse("s").unwrap()),
        answer: StepAnswer::text(answer.to_string()),
        usage: Usage { calls: 1, prompt_tokens: 1, completion_tokens: 1 },
        org: OrgName::parse("org-a").unwrap(),
        model: ModelName::parse("m").unwrap(),
        attempts: 1,
        started_at: T0,
        finished_at: T0,
    };
    h.backend.jobs.put_checkpoint(&lease, &checkpoint, T0).await.expect("checkpoint");
    let read = h.backend.jobs.checkpoints(&job.id).await.expect("read");
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].output(), answer);
    assert_eq!(h.backend.jobs.get_job(&job.id).await.unwrap().unwrap().name, "nul\u{fffd}name");
}

/// TLS is what the URL asks for: the test server has no certificate, so a
/// URL that requires TLS is refused and one that disables it connects.
#[tokio::test]
async fn the_url_decides_whether_tls_is_required() {
    let url = pg::fresh_database().await;
    let with = |mode: &str| format!("{url}?sslmode={mode}");
    let err = PgBackend::connect(&with("require"), options(true)).await.err().expect("refused").to_string();
    assert!(err.to_lowercase().contains("tls") || err.to_lowercase().contains("ssl"), "{err}");
    PgBackend::connect(&with("disable"), options(true)).await.expect("plain connection");
}
