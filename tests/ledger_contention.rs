//! Ledger contention: eight workers — each its own router with its own
//! ledger client (DynamoDB on the emulator, or a PostgreSQL pool) and
//! cache, as separate processes would be — hammer one org's bucket at once.
//! The provider (the simulator, which enforces the same limits itself) must
//! never see more than the bucket allows: no 429, no 60-second window over
//! the bound. On DynamoDB the requests the ledger made per provider call
//! are reported.
//! Needs the moto emulator and the PostgreSQL server `make test` starts
//! (`AWS_ENDPOINT_URL`, `RATEPOOL_TEST_POSTGRES_URL`).

#[path = "common/postgres.rs"]
mod pg;

use std::sync::Arc;
use std::time::Duration;

use ratepool::aws::AwsConfig;
use ratepool::aws::ledger::DynamoLedger;
use ratepool::aws::{self, AwsClients};
use ratepool::config::Config;
use ratepool::domain::{ModelName, SystemClock, TenantId};
use ratepool::engine::router::{CallRequest, RetryPolicy, Router};
use ratepool::postgres::{PgBackend, PgOptions};
use ratepool::provider::{ProviderClient, ProviderRequest};
use ratepool::sim::{SimConfig, Simulator};
use ratepool::storage::QuotaLedger;
use ratepool::telemetry::Telemetry;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

const WORKERS: usize = 8;
const CALLS_PER_WORKER: usize = 48;
const RPM: u64 = 300;

/// Runs the calls through one router per ledger, all on one bucket, and
/// checks what the provider saw. Returns the calls made.
async fn contend(ledgers: Vec<Arc<dyn QuotaLedger>>) -> u64 {
    // The provider: one org whose request limit is the scarce one.
    let sim_cfg = SimConfig::from_toml(&format!(
        "[latency]\nbase_ms = 5\nper_token_ms = 0\ntime_scale = 1\n[[orgs]]\nname = \"org-a\"\napi_key = \"sk-a-contention\"\n[orgs.models.\"m\"]\nrpm = {RPM}\ntpm = 100000000\n"
    ))
    .unwrap();
    let sim = Simulator::new(sim_cfg, Arc::new(SystemClock));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let sim_stop = stop.clone();
    let served = sim.clone();
    tokio::spawn(
        async move { ratepool::sim::serve(listener, served, async move { sim_stop.cancelled().await }).await },
    );

    let cfg = Config::parse(&format!(
        "[[orgs]]\nname = \"org-a\"\napi_key_env = \"K\"\n[orgs.models.\"m\"]\nrpm = {RPM}\ntpm = 100000000\n[[tenants]]\nname = \"t\"\napi_key_env = \"T\"\n"
    ))
    .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    let started = std::time::Instant::now();
    for (w, ledger) in ledgers.into_iter().enumerate() {
        let org = cfg.orgs[0].settings(base.clone(), SecretString::from("sk-a-contention".to_string()));
        let router = Arc::new(Router::new(
            vec![org],
            ledger,
            ProviderClient::new().unwrap(),
            Arc::new(SystemClock),
            Arc::new(Telemetry::new()),
            RetryPolicy::default(),
        ));
        for c in 0..4 {
            let router = router.clone();
            tasks.spawn(async move {
                for i in 0..CALLS_PER_WORKER / 4 {
                    let req = CallRequest {
                        tenant: TenantId::parse("t").unwrap(),
                        request: ProviderRequest::user_prompt(
                            &ModelName::parse("m").unwrap(),
                            &format!("w{w} c{c} i{i}"),
                            5,
                        ),
                        request_id: format!("w{w}/c{c}/{i}"),
                        gate: None,
                        yield_to_tenant_quota: false,
                        routing: Default::default(),
                        max_wait: None,
                    };
                    router.call(&req, &CancellationToken::new()).await.expect("every call succeeds");
                }
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let elapsed = started.elapsed();
    stop.cancel();

    let calls = (WORKERS * CALLS_PER_WORKER) as u64;
    let stats = sim.stats();
    let org = &stats.orgs["org-a"];
    let m = &org.models["m"];
    assert_eq!(org.accepted_calls, calls);
    assert_eq!(
        org.rate_limited_requests + org.rate_limited_tokens,
        0,
        "the ledger admitted more than the bucket allows: {org:?}"
    );
    assert!(m.peak_60s_requests <= m.window_bound_requests, "{m:?}");
    // More calls than the burst: the workers really had to share the refill.
    assert!(calls > RPM);
    let min = Duration::from_secs_f64((calls - RPM) as f64 * 60.0 / RPM as f64);
    assert!(elapsed >= min.mul_f64(0.95), "{calls} calls in {elapsed:?}, faster than the limit allows ({min:?})");
    println!("ledger contention: {WORKERS} workers, {calls} calls in {elapsed:.1?}");
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_workers_on_one_dynamodb_bucket_never_overrun_the_provider() {
    let endpoint = std::env::var("AWS_ENDPOINT_URL")
        .unwrap_or_else(|_| panic!("AWS_ENDPOINT_URL is not set: run through `make test`, which starts moto"));
    let s = uuid::Uuid::new_v4().simple().to_string();
    let aws_cfg = AwsConfig {
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint),
        jobs_table: format!("jobs-{}", &s[..10]),
        ledger_table: format!("ledger-{}", &s[..10]),
        ..AwsConfig::default()
    };
    let clients = AwsClients::load(&aws_cfg).await;
    aws::jobs::ensure_tables(&clients.dynamodb, &aws_cfg).await.unwrap();
    let mut ledgers = Vec::new();
    for _ in 0..WORKERS {
        // A client of its own per worker: nothing shared but the table.
        let clients = AwsClients::load(&aws_cfg).await;
        ledgers.push(Arc::new(
            DynamoLedger::connect(clients.dynamodb.clone(), &aws_cfg, Arc::new(SystemClock)).await.unwrap(),
        ));
    }
    let calls = contend(ledgers.iter().map(|l| l.clone() as Arc<dyn QuotaLedger>).collect()).await;

    let total: u64 = ledgers.iter().map(|l| l.requests().total()).sum();
    let writes: u64 = ledgers.iter().map(|l| l.requests().acquire_writes).sum();
    let refused: u64 = ledgers.iter().map(|l| l.requests().acquire_refused).sum();
    let per_call = total as f64 / calls as f64;
    println!(
        "DynamoDB requests {total} ({per_call:.2} per provider call), conditional writes {writes}, refused {refused}"
    );
    assert_eq!(writes - refused, calls, "exactly one successful ledger write per admitted call");
    assert!(per_call < 4.0, "{per_call:.2} DynamoDB requests per call");
}

/// The same on one PostgreSQL database, each worker with a pool of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_workers_on_one_postgres_bucket_never_overrun_the_provider() {
    let url = pg::fresh_database().await;
    let mut ledgers: Vec<Arc<dyn QuotaLedger>> = Vec::new();
    for _ in 0..WORKERS {
        let options = PgOptions { max_connections: 4, ..PgOptions::default() };
        ledgers.push(Arc::new(PgBackend::connect(&url, options).await.expect("connect to postgres")));
    }
    contend(ledgers).await;
}
