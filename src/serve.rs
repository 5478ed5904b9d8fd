//! How the processes are put together from the config: `ratepool serve`
//! (the HTTP API and the workers in one process; on SQLite the one-machine
//! mode, with the built-in simulator standing in for the provider when no
//! keys are configured), `ratepool worker` (workers only: the Fargate task)
//! and the Lambda's API state.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::api::calls::{CallSettings, CallsDoor};
use crate::api::{self, ApiState, PoolOrg, TENANT_KEYS_MAX_AGE, TenantKeySource, TenantKeyring};
use crate::aws::AwsClients;
use crate::config::{self, Config, StorageKind};
use crate::domain::{Clock, Env, ProcessEnv, SystemClock};
use crate::engine::router::{OrgSettings, RetryPolicy};
use crate::engine::{Engine, EngineConfig, Router};
use crate::local::{SqliteBackend, SqliteOptions};
use crate::postgres::{PgBackend, PgOptions};
use crate::provider::ProviderClient;
use crate::sim::{LatencyConfig, SimConfig, SimLimits, SimOrg, Simulator};
use crate::storage::Backend;
use crate::storage::faults::Faulty;
use crate::telemetry::Telemetry;
use crate::webhook::WebhookNotifier;

/// Whether to stand the simulator in for the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simulate {
    /// Only when no org key is in the environment.
    Auto,
    Always,
}

/// How long after its creation a job whose queue message is not known to
/// be sent is sent again by the workers (see `engine::sweep`). Longer than
/// a submission's store-then-send takes, even on a slow store.
const RESEND_AFTER: Duration = Duration::from_secs(60);

/// How often in-memory usage counters are written to storage.
const USAGE_FLUSH_EVERY: Duration = Duration::from_secs(5);

/// The engine's settings from the config file.
pub fn engine_config(cfg: &Config) -> EngineConfig {
    EngineConfig {
        concurrency: cfg.workers.concurrency.get() as usize,
        step_parallelism: cfg.workers.step_parallelism.get() as usize,
        lease_ttl: cfg.workers.visibility_timeout(),
        max_receives: cfg.workers.max_receives.get().min(u64::from(u32::MAX)) as u32,
        // SQLite waits on an in-process notification, so a short look is
        // free; on SQS every look is a request, so idle workers long-poll
        // for SQS's maximum. A stopping worker finishes its current look
        // first (see `Engine::run`), so SIGTERM to exit is at most this
        // plus `shutdown_grace_secs` plus the hand-back.
        poll_wait: match cfg.storage.backend {
            StorageKind::Sqlite => Duration::from_secs(1),
            StorageKind::Aws => Duration::from_secs(20),
            // A look waits on LISTEN/NOTIFY, so a long one costs nothing.
            StorageKind::Postgres => Duration::from_secs(5),
        },
        shutdown_grace: Duration::from_secs(cfg.workers.shutdown_grace_secs),
        spec_limits: cfg.limits.spec_limits(),
        owner: EngineConfig::default_owner(),
        cache_ttl: Duration::from_secs(cfg.workers.cache_ttl_secs.get()),
        fallback_after: Duration::from_secs(cfg.workers.fallback_after_secs),
        deadline: Some(cfg.workers.default_deadline_secs).filter(|&s| s > 0).map(Duration::from_secs),
        // No tenant secrets: `start_workers` puts in the notifier that has them.
        notifier: Arc::new(WebhookNotifier::new(cfg.webhooks.policy(), Default::default(), Arc::new(SystemClock))),
        resend_after: RESEND_AFTER,
    }
}

/// The configured backend, wrapped in the fault injector when a storage
/// drill is configured (its counts then go to `telemetry`). For AWS also
/// the SDK clients (for metrics and secrets), built once here.
pub async fn open_backend(
    cfg: &Config,
    clock: Arc<dyn Clock>,
    telemetry: &Telemetry,
) -> anyhow::Result<(Backend, Option<AwsClients>)> {
    let (backend, aws) = open_store(cfg, clock).await?;
    let Some(plan) = cfg.drill.storage_faults else { return Ok((backend, aws)) };
    tracing::warn!(
        ?plan,
        "[drill.storage_faults] is set: this process fails, throttles, stalls and loses the answers of its own storage calls on purpose"
    );
    let (faulty, counts) = Faulty::wrap(backend, plan);
    telemetry.watch_drill(counts);
    Ok((faulty, aws))
}

/// The configured backend as it is, without a drill's faults (for operator
/// commands).
pub async fn open_store(cfg: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<(Backend, Option<AwsClients>)> {
    match cfg.storage.backend {
        StorageKind::Sqlite => {
            let db = SqliteBackend::open(
                &cfg.storage.path,
                SqliteOptions { visibility_timeout: cfg.workers.visibility_timeout(), clock },
            )
            .with_context(|| format!("opening SQLite database {}", cfg.storage.path.display()))?;
            db.set_interactive_weight(cfg.workers.interactive_weight);
            Ok((db.backend(), None))
        }
        StorageKind::Aws => {
            let clients = AwsClients::load(&cfg.aws).await;
            let backend = crate::aws::connect(
                &clients,
                &cfg.aws,
                cfg.workers.visibility_timeout(),
                cfg.workers.interactive_weight,
                clock,
            )
            .await
            .context("connecting to the AWS backend (run `ratepool aws init` to create missing tables and queues)")?;
            Ok((backend, Some(clients)))
        }
        StorageKind::Postgres => {
            let url = cfg.postgres.url().map_err(anyhow::Error::msg)?;
            let db = PgBackend::connect(
                &url,
                PgOptions {
                    visibility_timeout: cfg.workers.visibility_timeout(),
                    clock,
                    max_connections: cfg.postgres.max_connections,
                    migrate: cfg.postgres.migrate,
                },
            )
            .await
            .context("opening the PostgreSQL backend")?;
            db.set_interactive_weight(cfg.workers.interactive_weight);
            Ok((db.backend(), None))
        }
    }
}

/// The org endpoints: from the config and the environment, or pointing at
/// a simulator started here.
async fn org_settings(
    cfg: &Config,
    env: &(dyn Env + Send + Sync),
    simulate: Simulate,
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<OrgSettings>> {
    let keys = match simulate {
        Simulate::Always => None,
        Simulate::Auto => config::org_keys(cfg, env)?,
    };
    if let Some(keys) = keys {
        return Ok(cfg.orgs.iter().zip(keys).map(|(o, k)| o.settings(o.base_url.clone(), k)).collect());
    }
    tracing::warn!(
        "no provider API keys in the environment: calls go to the built-in simulator (set the orgs' api_key_env variables to use the real provider)"
    );
    let sim_orgs: Vec<SimOrg> = cfg
        .orgs
        .iter()
        .map(|o| SimOrg {
            name: o.name.get_ref().to_string(),
            api_key: format!("sim-{}", uuid::Uuid::new_v4().simple()),
            models: o
                .models
                .iter()
                .map(|(m, l)| {
                    (m.to_string(), SimLimits { rpm: l.rpm.get(), tpm: l.tpm.get(), enforce_burst_secs: None })
                })
                .collect(),
            down: false,
            insufficient_quota: false,
        })
        .collect();
    let sim_cfg = SimConfig {
        listen: None,
        seed: 1,
        latency: LatencyConfig {
            base_ms: cfg.simulator.latency_base_ms as f64,
            per_token_ms: cfg.simulator.latency_per_token_ms,
            time_scale: cfg.simulator.time_scale,
        },
        faults: Default::default(),
        chars_per_token: 4.0,
        orgs: sim_orgs.clone(),
    };
    let sim = Simulator::new(sim_cfg, Arc::new(SystemClock));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::sim::serve(listener, sim, async move { stop.cancelled().await }).await {
            tracing::error!(error = %e, "built-in simulator stopped");
        }
    });
    tracing::info!(%addr, "built-in simulator listening");
    Ok(cfg
        .orgs
        .iter()
        .zip(sim_orgs)
        .map(|(o, s)| o.settings(format!("http://{addr}/v1"), SecretString::from(s.api_key)))
        .collect())
}

/// Where workers read the org keys and webhook secrets: `[aws]
/// worker_keys_secret_arn` (then the environment), or the environment alone.
async fn worker_env(cfg: &Config, aws: Option<&AwsClients>) -> anyhow::Result<Box<dyn Env + Send + Sync>> {
    match (&cfg.aws.worker_keys_secret_arn, aws) {
        (Some(arn), Some(clients)) => Ok(Box::new(crate::aws::SecretEnv::load(clients, arn).await?)),
        _ => Ok(Box::new(ProcessEnv)),
    }
}

/// The tenants' keys in `[aws] tenant_keys_secret_arn`, read again by the
/// keyring when stale.
struct SecretTenantKeys {
    clients: AwsClients,
    arn: String,
    cfg: Config,
}

#[async_trait::async_trait]
impl TenantKeySource for SecretTenantKeys {
    async fn load(&self) -> anyhow::Result<Vec<config::TenantKey>> {
        let env = crate::aws::SecretEnv::load(&self.clients, &self.arn).await?;
        Ok(config::tenant_keys(&self.cfg, &env)?)
    }
}

/// The API's tenant keys: from `[aws] tenant_keys_secret_arn`, read again
/// once older than `max_age`; else from the environment, once.
pub async fn tenant_keyring(
    cfg: &Config,
    aws: Option<&AwsClients>,
    max_age: Duration,
) -> anyhow::Result<Arc<TenantKeyring>> {
    match (&cfg.aws.tenant_keys_secret_arn, aws) {
        (Some(arn), Some(clients)) => {
            let source = SecretTenantKeys { clients: clients.clone(), arn: arn.clone(), cfg: cfg.clone() };
            let keys = source.load().await.context("reading the tenant keys ([aws] tenant_keys_secret_arn)")?;
            Ok(Arc::new(TenantKeyring::reloading(keys, Box::new(source), max_age)))
        }
        _ => Ok(Arc::new(TenantKeyring::fixed(config::tenant_keys(cfg, &ProcessEnv)?))),
    }
}

fn pool_of(orgs: &[OrgSettings]) -> Vec<PoolOrg> {
    orgs.iter().map(|o| PoolOrg { name: o.endpoint.name.clone(), models: o.models.clone() }).collect()
}

fn pool_from_config(cfg: &Config) -> Vec<PoolOrg> {
    // Only the ledger parameters matter for the API; key and URL do not.
    let settings: Vec<OrgSettings> =
        cfg.orgs.iter().map(|o| o.settings(o.base_url.clone(), SecretString::from(String::new()))).collect();
    pool_of(&settings)
}

/// The Calls door's settings from `[calls]` and `[workers]`.
pub fn call_settings(cfg: &Config) -> CallSettings {
    let c = &cfg.calls;
    CallSettings {
        default_wait: Duration::from_secs(*c.max_wait_secs.get_ref()),
        wait_cap: Duration::from_secs(*c.max_wait_cap_secs.get_ref()),
        max_body_bytes: *c.max_body_bytes.get_ref(),
        default_max_tokens: c.default_max_tokens.get(),
        idempotency_ttl: Duration::from_secs(*c.idempotency_ttl_secs.get_ref()),
        fallback_after: Duration::from_secs(cfg.workers.fallback_after_secs),
    }
}

/// The API's state; `router` is `None` where no provider calls are made
/// (the Lambda).
fn api_state(
    cfg: &Config,
    backend: &Backend,
    tenants: Arc<TenantKeyring>,
    pool: Vec<PoolOrg>,
    clock: Arc<dyn Clock>,
    telemetry: Arc<Telemetry>,
    router: Option<Arc<Router>>,
) -> Arc<ApiState> {
    let org_status = router.clone().map(|r| r as Arc<dyn api::OrgStatusSource>);
    Arc::new(ApiState {
        jobs: backend.jobs.clone(),
        queue: backend.queue.clone(),
        ledger: backend.ledger.clone(),
        usage: backend.usage.clone(),
        tenants,
        pool,
        limits: cfg.limits.spec_limits(),
        quotas: cfg.tenant_quotas(),
        clock,
        telemetry,
        org_status,
        webhooks: api::WebhookRules {
            allow_private: cfg.webhooks.allow_private,
            tenants: cfg
                .tenants
                .iter()
                .filter(|t| t.webhook_secret_env.is_some())
                .map(|t| t.name.get_ref().clone())
                .collect(),
        },
        calls: CallsDoor { router, store: backend.calls.clone(), settings: call_settings(cfg) },
    })
}

/// Workers: the router over `orgs` and the engine, plus the background
/// tasks that publish what they do (usage to storage; CloudWatch on AWS).
struct Workers {
    engine: Arc<Engine>,
    router: Arc<Router>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

#[allow(clippy::too_many_arguments)] // one call site per command, each naming its parts
fn start_workers(
    cfg: &Config,
    backend: &Backend,
    aws: Option<&AwsClients>,
    orgs: Vec<OrgSettings>,
    clock: Arc<dyn Clock>,
    telemetry: Arc<Telemetry>,
    env: &dyn Env,
    shutdown: &CancellationToken,
) -> anyhow::Result<Workers> {
    let router = Arc::new(
        Router::new(
            orgs,
            backend.ledger.clone(),
            ProviderClient::new()?,
            clock.clone(),
            telemetry.clone(),
            RetryPolicy {
                max_transient_failures: cfg.workers.step_max_attempts.get().min(1000) as u32,
                ..RetryPolicy::default()
            },
        )
        .with_tenant_quotas(cfg.tenant_quotas()),
    );
    let mut engine_cfg = engine_config(cfg);
    engine_cfg.notifier =
        Arc::new(WebhookNotifier::new(cfg.webhooks.policy(), config::webhook_secrets(cfg, env)?, clock.clone()));
    let engine = Arc::new(Engine::new(backend.clone(), router.clone(), telemetry.clone(), clock, engine_cfg));
    let mut background = Vec::new();
    let (t, usage, stop) = (telemetry.clone(), backend.usage.clone(), shutdown.clone());
    background.push(tokio::spawn(async move {
        loop {
            let done = tokio::select! {
                _ = tokio::time::sleep(USAGE_FLUSH_EVERY) => false,
                _ = stop.cancelled() => true,
            };
            if let Err(e) = t.flush(usage.as_ref()).await {
                tracing::warn!(error = %e, "usage flush failed; will retry");
            }
            if done {
                return;
            }
        }
    }));
    if aws.is_some() {
        background.push(tokio::spawn(crate::aws::metrics::run_publisher(
            cfg.aws.metrics_namespace.clone(),
            telemetry,
            Duration::from_secs(60),
            shutdown.clone(),
        )));
    }
    Ok(Workers { engine, router, background })
}

impl Workers {
    /// Runs the engine until `shutdown` and its drain end, then lets the
    /// background tasks write their last batch.
    async fn run(self, shutdown: CancellationToken) {
        self.engine.run(shutdown).await;
        for task in self.background {
            let _ = task.await;
        }
    }
}

/// Runs the server until `shutdown` fires. Prints
/// `ratepool listening on http://ADDR` on stdout once it accepts requests.
pub async fn run(cfg: Config, simulate: Simulate, shutdown: CancellationToken) -> anyhow::Result<()> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let telemetry = Arc::new(Telemetry::new());
    let (backend, aws) = open_backend(&cfg, clock.clone(), &telemetry).await?;
    let env = worker_env(&cfg, aws.as_ref()).await?;
    let tenants = tenant_keyring(&cfg, aws.as_ref(), TENANT_KEYS_MAX_AGE).await?;
    let orgs = org_settings(&cfg, env.as_ref(), simulate, &shutdown).await?;
    let pool = pool_of(&orgs);
    let workers =
        start_workers(&cfg, &backend, aws.as_ref(), orgs, clock.clone(), telemetry.clone(), env.as_ref(), &shutdown)?;
    let state = api_state(&cfg, &backend, tenants, pool, clock, telemetry.clone(), Some(workers.router.clone()));

    let listener = listen(cfg.server.listen).await?;
    tracing::info!(workers = cfg.workers.concurrency.get(), "ratepool serving");
    let running = tokio::spawn(workers.run(shutdown.clone()));
    serve_api(listener, state, shutdown).await?;
    running.await?;
    tracing::info!("ratepool stopped");
    Ok(())
}

/// Binds `addr` and says where it listens: `ratepool listening on
/// http://ADDR` on stdout, which the tests and scripts wait for.
async fn listen(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "API listening");
    println!("ratepool listening on http://{addr}");
    Ok(listener)
}

/// Serves the API until `shutdown`; then stops taking connections and lets
/// the requests in flight (a call's wait, a stream) finish.
async fn serve_api(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use axum::serve::ListenerExt as _;
    // Without TCP_NODELAY, Nagle's algorithm holds each small write (a
    // streamed call's next event) until the client ACKs the last one, and
    // clients delay their ACKs by up to 40 ms: a relayed stream would stall
    // on every event after the first.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
    });
    axum::serve(listener, api::router(state)).with_graceful_shutdown(async move { shutdown.cancelled().await }).await?;
    Ok(())
}

/// `ratepool worker`: workers (the Fargate task), and with `listen` the API
/// on that address too, so the OpenAI-compatible calls door is served by the
/// processes that hold the router and the provider keys (on AWS, behind a
/// load balancer). Stops taking jobs on `shutdown`, finishes or hands back
/// the running ones within the grace period, and keeps ECS from scaling the
/// task in while it holds jobs.
pub async fn worker(
    cfg: Config,
    listen_on: Option<std::net::SocketAddr>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let telemetry = Arc::new(Telemetry::new());
    let (backend, aws) = open_backend(&cfg, clock.clone(), &telemetry).await?;
    let env = worker_env(&cfg, aws.as_ref()).await?;
    let keys = config::org_keys(&cfg, env.as_ref())?.ok_or_else(|| {
        anyhow::anyhow!("no org API keys found (set the orgs' api_key_env variables, or [aws] worker_keys_secret_arn)")
    })?;
    let orgs: Vec<OrgSettings> = cfg.orgs.iter().zip(keys).map(|(o, k)| o.settings(o.base_url.clone(), k)).collect();
    let pool = pool_of(&orgs);
    let workers =
        start_workers(&cfg, &backend, aws.as_ref(), orgs, clock.clone(), telemetry.clone(), env.as_ref(), &shutdown)?;
    // The API first: with a listener it must be able to read tenant keys,
    // and a worker that cannot is refused at start, not at the first call.
    let api = match listen_on {
        Some(addr) => {
            let tenants = tenant_keyring(&cfg, aws.as_ref(), TENANT_KEYS_MAX_AGE).await?;
            let state =
                api_state(&cfg, &backend, tenants, pool, clock, telemetry.clone(), Some(workers.router.clone()));
            Some(tokio::spawn(serve_api(listen(addr).await?, state, shutdown.clone())))
        }
        None => None,
    };
    let protection =
        crate::worker::TaskProtection::from_env().map(|p| tokio::spawn(p.run(telemetry.clone(), shutdown.clone())));
    tracing::info!(workers = cfg.workers.concurrency.get(), "ratepool worker running");
    println!("ratepool worker running");
    workers.run(shutdown).await;
    if let Some(api) = api {
        api.await??;
    }
    if let Some(p) = protection {
        let _ = p.await;
    }
    tracing::info!("ratepool worker stopped");
    Ok(())
}

/// The API state the Lambda serves: the same routes as `serve`, on the
/// configured backend, without workers. Tenant keys come from `[aws]
/// tenant_keys_secret_arn` (read again every [`TENANT_KEYS_MAX_AGE`]) or the
/// environment, unless `env` is given.
pub async fn lambda_state(cfg: &Config, env: Option<&(dyn Env + Send + Sync)>) -> anyhow::Result<Arc<ApiState>> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let telemetry = Arc::new(Telemetry::new());
    let (backend, aws) = open_backend(cfg, clock.clone(), &telemetry).await?;
    let tenants = match env {
        Some(env) => Arc::new(TenantKeyring::fixed(config::tenant_keys(cfg, env)?)),
        None => tenant_keyring(cfg, aws.as_ref(), TENANT_KEYS_MAX_AGE).await?,
    };
    Ok(api_state(cfg, &backend, tenants, pool_from_config(cfg), clock, telemetry, None))
}

/// Reads the configuration from `path`, else from the `RATEPOOL_CONFIG_TOML`
/// environment variable (how the Lambda and the Fargate task get it).
pub fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None => {
            let text = std::env::var("RATEPOOL_CONFIG_TOML")
                .context("no --config given and RATEPOOL_CONFIG_TOML is not set")?;
            Config::parse(&text).map_err(|m| anyhow::anyhow!("RATEPOOL_CONFIG_TOML: {m}"))
        }
    }
}

/// Cancels the token on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("signal received; shutting down");
        token.cancel();
    });
}
