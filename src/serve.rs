//! `ratepool serve`: the one-machine mode. The HTTP API and the workers in
//! one process on the embedded SQLite backend, and — when no provider keys
//! are configured — the built-in simulator standing in for the provider.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState, PoolOrg};
use crate::config::{self, Config, Env, StorageKind};
use crate::domain::{Clock, SystemClock};
use crate::engine::router::{OrgSettings, RetryPolicy};
use crate::engine::{Engine, EngineConfig, Router};
use crate::local::{SqliteBackend, SqliteOptions};
use crate::provider::ProviderClient;
use crate::sim::{LatencyConfig, SimConfig, SimLimits, SimOrg, Simulator};
use crate::storage::Backend;
use crate::telemetry::Telemetry;

/// Whether to stand the simulator in for the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simulate {
    /// Only when no org key is in the environment.
    Auto,
    Always,
}

/// How often in-memory usage counters are written to storage.
const USAGE_FLUSH_EVERY: Duration = Duration::from_secs(5);

/// The engine's settings from the config file.
pub fn engine_config(cfg: &Config) -> EngineConfig {
    EngineConfig {
        concurrency: cfg.workers.concurrency.get() as usize,
        step_parallelism: cfg.workers.step_parallelism.get() as usize,
        lease_ttl: cfg.workers.visibility_timeout(),
        max_receives: cfg.workers.max_receives.get().min(u64::from(u32::MAX)) as u32,
        poll_wait: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(10),
        spec_limits: cfg.limits.spec_limits(),
        owner: EngineConfig::default_owner(),
    }
}

fn open_backend(cfg: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<Backend> {
    match cfg.storage.backend {
        StorageKind::Sqlite => {
            let db = SqliteBackend::open(&cfg.storage.path, SqliteOptions { visibility_timeout: cfg.workers.visibility_timeout(), clock })
                .with_context(|| format!("opening SQLite database {}", cfg.storage.path.display()))?;
            Ok(db.backend())
        }
    }
}

/// The org endpoints: from the config and the environment, or pointing at
/// a simulator started here.
async fn org_settings(cfg: &Config, env: &dyn Env, simulate: Simulate, shutdown: &CancellationToken) -> anyhow::Result<Vec<OrgSettings>> {
    let keys = match simulate {
        Simulate::Always => None,
        Simulate::Auto => config::org_keys(cfg, env)?,
    };
    if let Some(keys) = keys {
        return Ok(cfg.orgs.iter().zip(keys).map(|(o, k)| OrgSettings::from_config(o, o.base_url.clone(), k)).collect());
    }
    tracing::warn!("no provider API keys in the environment: calls go to the built-in simulator (set the orgs' api_key_env variables to use the real provider)");
    let sim_orgs: Vec<SimOrg> = cfg
        .orgs
        .iter()
        .map(|o| SimOrg {
            name: o.name.get_ref().to_string(),
            api_key: format!("sim-{}", uuid::Uuid::new_v4().simple()),
            models: o.models.iter().map(|(m, l)| (m.to_string(), SimLimits { rpm: l.rpm.get(), tpm: l.tpm.get() })).collect(),
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
        .map(|(o, s)| OrgSettings::from_config(o, format!("http://{addr}/v1"), SecretString::from(s.api_key)))
        .collect())
}

/// Runs the server until `shutdown` fires. Prints
/// `ratepool listening on http://ADDR` on stdout once it accepts requests.
pub async fn run(cfg: Config, simulate: Simulate, shutdown: CancellationToken) -> anyhow::Result<()> {
    let env = config::ProcessEnv;
    let tenants = config::tenant_keys(&cfg, &env)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let backend = open_backend(&cfg, clock.clone())?;
    let telemetry = Arc::new(Telemetry::new());
    let orgs = org_settings(&cfg, &env, simulate, &shutdown).await?;
    let pool: Vec<PoolOrg> = orgs.iter().map(|o| PoolOrg { name: o.endpoint.name.clone(), models: o.models.clone() }).collect();
    let router = Arc::new(Router::new(
        orgs,
        backend.ledger.clone(),
        ProviderClient::new()?,
        clock.clone(),
        telemetry.clone(),
        RetryPolicy { max_transient_failures: cfg.workers.step_max_attempts.get().min(1000) as u32, ..RetryPolicy::default() },
    ));
    let engine_cfg = engine_config(&cfg);
    let state = Arc::new(ApiState {
        jobs: backend.jobs.clone(),
        queue: backend.queue.clone(),
        ledger: backend.ledger.clone(),
        usage: backend.usage.clone(),
        tenants,
        pool,
        limits: engine_cfg.spec_limits,
        clock: clock.clone(),
        telemetry: telemetry.clone(),
        org_status: Some(router.clone()),
    });
    let engine = Arc::new(Engine::new(backend.clone(), router, telemetry.clone(), clock, engine_cfg));

    let listener = tokio::net::TcpListener::bind(cfg.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.server.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, workers = cfg.workers.concurrency.get(), "ratepool serving");
    println!("ratepool listening on http://{addr}");

    let workers = tokio::spawn(engine.run(shutdown.clone()));
    let flusher = {
        let (telemetry, usage, stop) = (telemetry.clone(), backend.usage.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(USAGE_FLUSH_EVERY) => {}
                    _ = stop.cancelled() => return,
                }
                if let Err(e) = telemetry.flush(usage.as_ref()).await {
                    tracing::warn!(error = %e, "usage flush failed; will retry");
                }
            }
        })
    };
    let stop = shutdown.clone();
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await?;
    workers.await?;
    flusher.abort();
    telemetry.flush(backend.usage.as_ref()).await?;
    tracing::info!("ratepool stopped");
    Ok(())
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
