//! One function per figure of `BENCHMARKS.md`. Each starts its own
//! simulator and server (fresh SQLite file, fresh buckets), so runs do not
//! leak capacity or state into each other.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use secrecy::SecretString;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::harness::{self, JobDoc, MODEL, OrgLimits, Server, ServerSetup, Sim};
use crate::answer::StepAnswer;
use crate::backoff::full_jitter;
use crate::domain::{Clock, ModelName, OrgName, SystemClock, TenantId};
use crate::engine::router::{CallRequest, RetryPolicy, Router};
use crate::provider::{OrgEndpoint, ProviderClient, ProviderFailure, ProviderRequest};
use crate::sim::{LatencyConfig, SimStats};
use crate::spec::StepOutput;
use crate::spec::template::Steps;
use crate::spec::{JobSpec, SpecLimits};
use crate::storage::gcra::Rate;
use crate::storage::{BucketKey, BucketParams, ChargeId, Cost, QuotaLedger};
use crate::telemetry::Telemetry;

/// A sequential chain of `n` steps, each continuing the previous output.
pub fn chain_spec(name: &str, n: usize, max_tokens: u32) -> String {
    let steps: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let content = if i == 0 {
                "Write about {{inputs.topic}}.".to_string()
            } else {
                format!("Continue: {{{{steps.s{}.output}}}}", i - 1)
            };
            serde_json::json!({"id": format!("s{i}"), "messages": [{"role": "user", "content": content}]})
        })
        .collect();
    serde_json::json!({
        "name": name,
        "inputs": {"topic": format!("{name} owls")},
        "defaults": {"model": MODEL, "max_tokens": max_tokens},
        "steps": steps,
    })
    .to_string()
}

/// Where and how big: everything a figure needs besides its own knobs.
pub struct Ctx {
    pub bin: PathBuf,
    pub work: PathBuf,
    pub sizes: Sizes,
    /// The emulator for the DynamoDB ledger figures, if one is running.
    pub aws_endpoint: Option<String>,
    /// A PostgreSQL server for the PostgreSQL figures, if one is running;
    /// each run makes a database of its own on it.
    pub postgres_server: Option<String>,
}

/// Workload sizes; [`Sizes::full`] for `make bench`, [`Sizes::quick`] for
/// the smoke test in `make test`.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub per_org: OrgLimits,
    pub latency: LatencyConfig,
    pub jobs_per_org: usize,
    pub steps: usize,
    pub max_tokens: u32,
    pub org_counts: Vec<usize>,
    pub overhead_steps: usize,
    pub overhead_chains: usize,
    pub memory_jobs: usize,
    pub header_org: OrgLimits,
    pub header_jobs: usize,
    pub ledger_secs: f64,
    /// Calls through one uncontended router on DynamoDB.
    pub alone_calls: usize,
    /// Calls by four routers through a bucket of two thirds as many
    /// requests per minute; 0 skips it (a binding bucket takes a minute).
    pub contention_calls: usize,
    /// Figure 11: example screenplays run on the emulator.
    pub cost_jobs: usize,
    /// Figure 8: batch jobs flooding the queue, interactive jobs submitted
    /// behind them, jobs one server runs at once, and chain length.
    pub flood_jobs: usize,
    pub interactive_jobs: usize,
    pub flood_concurrency: usize,
    pub flood_steps: usize,
    /// Figure 9: orgs per run, and the real buckets (seconds of refill) of
    /// their simulator behind per-minute headers; 60 is the whole minute.
    pub window_orgs: usize,
    pub window_buckets: Vec<u64>,
    /// The real buckets run again with ratepool told them (`burst_secs`).
    pub window_told: Vec<u64>,
    /// Figure 10: the cells (concurrency, requests measured each way,
    /// streamed, the provider's latency); the least warm-up requests each
    /// way before a cell; clients and seconds of the sustained loop.
    pub proxy_cells: Vec<ProxyCellSize>,
    pub proxy_warmup: usize,
    pub proxy_clients: usize,
    pub proxy_secs: f64,
}

/// One cell of figure 10.
#[derive(Debug, Clone, Copy)]
pub struct ProxyCellSize {
    pub concurrency: usize,
    /// Requests measured each way.
    pub requests: usize,
    pub streamed: bool,
    /// How long the simulator takes to answer (0: at once).
    pub provider_ms: u64,
}

impl ProxyCellSize {
    const fn at_once(concurrency: usize, requests: usize, streamed: bool) -> Self {
        Self { concurrency, requests, streamed, provider_ms: 0 }
    }
}

impl Sizes {
    pub fn full() -> Self {
        Self {
            per_org: OrgLimits::per_minute(1_000, 30_000),
            latency: LatencyConfig { base_ms: 50.0, per_token_ms: 1.0, time_scale: 1.0 },
            jobs_per_org: 20,
            steps: 40,
            max_tokens: 40,
            org_counts: vec![1, 3, 5],
            overhead_steps: 100,
            overhead_chains: 20,
            memory_jobs: 1_000,
            header_org: OrgLimits::per_minute(10_000, 20_000),
            header_jobs: 10,
            ledger_secs: 5.0,
            alone_calls: 200,
            contention_calls: 90,
            cost_jobs: 3,
            flood_jobs: 300,
            interactive_jobs: 10,
            flood_concurrency: 8,
            flood_steps: 3,
            window_orgs: 3,
            window_buckets: vec![10, 20, 60],
            window_told: vec![10],
            proxy_cells: vec![
                ProxyCellSize::at_once(1, 1_000, false),
                ProxyCellSize::at_once(64, 4_000, false),
                ProxyCellSize::at_once(512, 8_192, false),
                ProxyCellSize::at_once(1, 1_000, true),
                ProxyCellSize::at_once(64, 4_000, true),
                ProxyCellSize::at_once(512, 8_192, true),
                // 64 calls in flight at a provider that takes 100 ms: the
                // load of 64 concurrent LLM calls, below the cores' ceiling.
                ProxyCellSize { concurrency: 64, requests: 4_000, streamed: false, provider_ms: 100 },
                ProxyCellSize { concurrency: 64, requests: 4_000, streamed: true, provider_ms: 100 },
            ],
            proxy_warmup: 200,
            proxy_clients: 64,
            proxy_secs: 10.0,
        }
    }

    pub fn quick() -> Self {
        Self {
            per_org: OrgLimits::per_minute(1_000, 30_000),
            latency: LatencyConfig { base_ms: 5.0, per_token_ms: 0.0, time_scale: 1.0 },
            jobs_per_org: 3,
            steps: 5,
            max_tokens: 20,
            org_counts: vec![1, 2],
            overhead_steps: 10,
            overhead_chains: 3,
            memory_jobs: 40,
            header_org: OrgLimits::per_minute(10_000, 4_000),
            header_jobs: 2,
            ledger_secs: 0.3,
            alone_calls: 16,
            contention_calls: 0,
            cost_jobs: 1,
            flood_jobs: 16,
            interactive_jobs: 3,
            flood_concurrency: 2,
            flood_steps: 2,
            window_orgs: 1,
            window_buckets: vec![10, 60],
            window_told: vec![10],
            proxy_cells: vec![
                ProxyCellSize::at_once(1, 10, false),
                ProxyCellSize::at_once(4, 40, false),
                ProxyCellSize::at_once(4, 40, true),
                ProxyCellSize { concurrency: 4, requests: 40, streamed: false, provider_ms: 20 },
            ],
            proxy_warmup: 4,
            proxy_clients: 4,
            proxy_secs: 0.3,
        }
    }
}

pub(super) fn unlimited() -> OrgLimits {
    OrgLimits::per_minute(10_000_000, 1_000_000_000)
}

pub(super) fn instant() -> LatencyConfig {
    LatencyConfig { base_ms: 0.0, per_token_ms: 0.0, time_scale: 0.0 }
}

/// A simulator that takes `ms` for every answer, whatever its length.
pub(super) fn fixed(ms: u64) -> LatencyConfig {
    LatencyConfig { base_ms: ms as f64, per_token_ms: 0.0, time_scale: 1.0 }
}

/// Submits `specs` from a few concurrent clients; returns the job ids.
async fn submit_all(server: &Arc<Server>, specs: Vec<String>) -> anyhow::Result<Vec<String>> {
    let mut set = tokio::task::JoinSet::new();
    let chunk = specs.len().div_ceil(8).max(1);
    for (c, part) in specs.chunks(chunk).enumerate() {
        let (server, part) = (server.clone(), part.to_vec());
        set.spawn(async move {
            let mut ids = Vec::new();
            for s in part {
                ids.push(server.submit(&s).await?);
            }
            anyhow::Ok((c, ids))
        });
    }
    let mut parts = Vec::new();
    while let Some(r) = set.join_next().await {
        parts.push(r??);
    }
    parts.sort_by_key(|(c, _)| *c);
    Ok(parts.into_iter().flat_map(|(_, ids)| ids).collect())
}

fn all_succeeded(docs: &[JobDoc]) -> anyhow::Result<()> {
    if let Some(d) = docs.iter().find(|d| d.status != "succeeded") {
        bail!("job {} ended {}: {:?}", d.id, d.status, d.error);
    }
    Ok(())
}

/// Totals the simulator saw, over every org.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SimTotals {
    pub accepted_calls: u64,
    pub charged_tokens: u64,
    pub answered_429: u64,
}

fn totals(stats: &SimStats) -> SimTotals {
    let mut t = SimTotals::default();
    for o in stats.orgs.values() {
        t.accepted_calls += o.accepted_calls;
        t.charged_tokens += o.charged_tokens;
        t.answered_429 += o.rate_limited_requests + o.rate_limited_tokens;
    }
    t
}

// ------------------------------------------------- 1 + 2: saturation, scaling

/// One pool run at saturation.
#[derive(Debug, Clone, Serialize)]
pub struct PoolRun {
    pub orgs: usize,
    pub jobs: usize,
    pub steps_per_job: usize,
    pub sim: SimTotals,
    pub makespan_s: f64,
    /// The fastest any client could finish: the largest of the token,
    /// request and chain bounds below.
    pub bound_s: f64,
    /// (charged − one minute's burst) ÷ combined refill per second.
    pub token_bound_s: f64,
    pub request_bound_s: f64,
    /// Steps of one chain × the mean provider latency.
    pub chain_bound_s: f64,
    /// Charged tokens ÷ combined TPM, ignoring the burst (the issue's
    /// formula; a run can beat it, so it is reported, not used).
    pub refill_only_bound_s: f64,
    pub utilization: f64,
    pub share_429: f64,
    pub calls_per_s: f64,
    pub ledger_ops_per_call: f64,
    /// The provider's real bucket in seconds of refill (60: the minute),
    /// the burst the bounds allow.
    pub real_burst_s: f64,
    /// The `burst_secs` ratepool was configured with.
    pub told_burst_s: f64,
    /// Each org's advertised limits.
    pub per_org_rpm: u64,
    pub per_org_tpm: u64,
    /// The burst the server admitted with at the end, averaged over orgs.
    pub learned_burst_s: f64,
}

pub async fn pool_run(ctx: &Ctx, name: &str, orgs: usize, jobs: usize) -> anyhow::Result<PoolRun> {
    pool_run_on(ctx, name, ctx.sizes.per_org, orgs, jobs, None).await
}

/// [`pool_run`] on `orgs` orgs of limits `per_org`, stored in the
/// PostgreSQL database `postgres` if given (else SQLite).
async fn pool_run_on(
    ctx: &Ctx,
    name: &str,
    per_org: OrgLimits,
    orgs: usize,
    jobs: usize,
    postgres: Option<String>,
) -> anyhow::Result<PoolRun> {
    let s = &ctx.sizes;
    let dir = harness::run_dir(&ctx.work, name)?;
    let limits = vec![per_org; orgs];
    let sim = Sim::start(&ctx.bin, &dir, &limits, s.latency).await?;
    let setup = ServerSetup { orgs: limits.clone(), concurrency: jobs, header_sync: true, postgres };
    let server = Arc::new(Server::start(&ctx.bin, &dir, &sim, &setup).await?);
    let specs = (0..jobs).map(|j| chain_spec(&format!("{name}-{j}"), s.steps, s.max_tokens)).collect();
    let ids = submit_all(&server, specs).await?;
    let docs = server.wait_all(&ids, Duration::from_millis(500), Duration::from_secs(1800)).await?;
    all_succeeded(&docs)?;
    let makespan_s = harness::makespan(&docs)?;
    let stats = totals(&sim.stats().await?);
    let m = server.metrics().await?;
    let calls = m.sum("ratepool_provider_calls_total", &[]);
    let mean_latency =
        m.sum("ratepool_provider_latency_seconds_sum", &[]) / m.sum("ratepool_provider_latency_seconds_count", &[]);
    let ledger_ops = m.sum("ratepool_ledger_operations_total", &[]);

    let learned_burst_s = m.sum("ratepool_org_burst_seconds", &[]) / orgs.max(1) as f64;

    let n = orgs as f64;
    let (tpm, rpm) = (per_org.tpm as f64 * n, per_org.rpm as f64 * n);
    // The real bucket's burst, then its refill.
    let real_burst_s = per_org.enforce_burst_secs.unwrap_or(60) as f64;
    let told_burst_s = per_org.told_burst_secs.unwrap_or(60) as f64;
    let burst = real_burst_s / 60.0;
    let token_bound_s = ((stats.charged_tokens as f64 - tpm * burst) / (tpm / 60.0)).max(0.0);
    let request_bound_s = ((stats.accepted_calls as f64 - rpm * burst) / (rpm / 60.0)).max(0.0);
    let chain_bound_s = s.steps as f64 * mean_latency;
    let bound_s = token_bound_s.max(request_bound_s).max(chain_bound_s);
    server_stop(server).await;
    sim.proc.stop().await;
    Ok(PoolRun {
        orgs,
        jobs,
        steps_per_job: s.steps,
        sim: stats,
        makespan_s,
        bound_s,
        token_bound_s,
        request_bound_s,
        chain_bound_s,
        refill_only_bound_s: stats.charged_tokens as f64 / (tpm / 60.0),
        utilization: bound_s / makespan_s,
        share_429: stats.answered_429 as f64 / calls.max(1.0),
        calls_per_s: stats.accepted_calls as f64 / makespan_s,
        ledger_ops_per_call: ledger_ops / calls.max(1.0),
        real_burst_s,
        told_burst_s,
        per_org_rpm: per_org.rpm,
        per_org_tpm: per_org.tpm,
        learned_burst_s,
    })
}

async fn server_stop(server: Arc<Server>) {
    if let Ok(s) = Arc::try_unwrap(server) {
        s.proc.stop().await;
    }
}

/// Figures 1 and 2 of one run: the same per-org workload with each org count.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingRun {
    pub runs: Vec<PoolRun>,
    /// Throughput with N orgs ÷ throughput with the first count, per count.
    pub ratios: BTreeMap<usize, f64>,
}

pub async fn scaling(ctx: &Ctx, run: usize) -> anyhow::Result<ScalingRun> {
    let mut runs = Vec::new();
    for &n in &ctx.sizes.org_counts {
        let r = pool_run(ctx, &format!("scaling-{run}-{n}orgs"), n, n * ctx.sizes.jobs_per_org).await?;
        eprintln!(
            "  {n} org(s): {} calls in {:.1} s (bound {:.1} s, utilization {:.1}%), 429 share {:.3}%",
            r.sim.accepted_calls,
            r.makespan_s,
            r.bound_s,
            100.0 * r.utilization,
            100.0 * r.share_429
        );
        runs.push(r);
    }
    let base = runs.first().map(|r| r.calls_per_s).unwrap_or(1.0);
    let ratios = runs.iter().map(|r| (r.orgs, r.calls_per_s / base)).collect();
    Ok(ScalingRun { runs, ratios })
}

// ------------------------------------------------------------- 3: baseline

/// Today's way: one org, one job after another, each step waiting for the
/// last, 429s retried with exponential backoff and full jitter.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineRun {
    pub jobs: usize,
    pub steps_per_job: usize,
    pub baseline_s: f64,
    pub baseline_429: u64,
    pub pool_orgs: usize,
    pub pool_s: f64,
    pub speedup: f64,
}

pub async fn baseline(ctx: &Ctx, run: usize) -> anyhow::Result<BaselineRun> {
    let s = &ctx.sizes;
    let jobs = s.jobs_per_org;
    let dir = harness::run_dir(&ctx.work, &format!("baseline-{run}"))?;
    let sim = Sim::start(&ctx.bin, &dir, &[s.per_org], s.latency).await?;
    let org = OrgEndpoint {
        name: OrgName::parse(harness::org_name(0))?,
        base_url: sim.base_url(),
        api_key: SecretString::from(sim.keys[0].clone()),
        timeout: Duration::from_secs(120),
    };
    let client = ProviderClient::new()?;
    let limits = SpecLimits::default();
    let started = Instant::now();
    let mut answered_429 = 0;
    for j in 0..jobs {
        let text = chain_spec(&format!("baseline-{run}-{j}"), s.steps, s.max_tokens);
        let spec = JobSpec::parse(text.as_bytes(), &limits, &|_| true).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut outputs: BTreeMap<crate::domain::StepId, StepAnswer> = BTreeMap::new();
        for step in &spec.steps {
            let scope = Steps {
                inputs: &spec.inputs,
                steps: |id: &crate::domain::StepId| outputs.get(id).map(StepOutput::One),
            };
            let mut budget = limits.max_rendered_bytes;
            let mut messages = Vec::new();
            for m in &step.messages {
                messages.push(m.render(&scope, &mut budget)?);
            }
            let request = ProviderRequest::chat(step.body(messages), u64::from(step.params.allowance()))?;
            let mut attempt = 0;
            let answer = loop {
                match client.call(&org, &request, &format!("baseline-{j}/{}", step.id)).await {
                    Ok(a) => break a,
                    Err(ProviderFailure::RateLimited { .. }) => {
                        answered_429 += 1;
                        let wait =
                            full_jitter(attempt, Duration::from_secs(1), Duration::from_secs(60), rand::random());
                        attempt += 1;
                        tokio::time::sleep(wait).await;
                    }
                    Err(e) => bail!("baseline call failed: {e}"),
                }
            };
            outputs.insert(step.id.clone(), StepAnswer::from_completion(&answer.body)?);
        }
    }
    let baseline_s = started.elapsed().as_secs_f64();
    sim.proc.stop().await;
    let pool_orgs = 3;
    let pool = pool_run(ctx, &format!("baseline-{run}-pool"), pool_orgs, jobs).await?;
    eprintln!(
        "  baseline {baseline_s:.1} s ({answered_429} 429s), ratepool on {pool_orgs} orgs {:.1} s",
        pool.makespan_s
    );
    Ok(BaselineRun {
        jobs,
        steps_per_job: s.steps,
        baseline_s,
        baseline_429: answered_429,
        pool_orgs,
        pool_s: pool.makespan_s,
        speedup: baseline_s / pool.makespan_s,
    })
}

// ------------------------------------------------------------- 4: overhead

#[derive(Debug, Clone, Serialize)]
pub struct OverheadRun {
    pub chain_steps: usize,
    pub chain_makespan_s: f64,
    pub chain_provider_s: f64,
    /// (makespan − provider time) ÷ steps, for the single chain.
    pub chain_overhead_per_step_ms: f64,
    pub chain_p50_ms: f64,
    pub chain_p99_ms: f64,
    pub concurrent_chains: usize,
    pub concurrent_steps: f64,
    pub concurrent_p50_ms: f64,
    pub concurrent_p99_ms: f64,
    pub concurrent_steps_per_s: f64,
    /// The server's CPU time (user + system) per step in the concurrent run:
    /// what one step costs when the cores, not the engine, are the limit.
    pub server_cpu_ms_per_step: f64,
}

pub async fn overhead(ctx: &Ctx, run: usize) -> anyhow::Result<OverheadRun> {
    let s = &ctx.sizes;
    let mut out = Vec::new();
    for (label, chains) in [("single", 1), ("concurrent", s.overhead_chains)] {
        let dir = harness::run_dir(&ctx.work, &format!("overhead-{run}-{label}"))?;
        let sim = Sim::start(&ctx.bin, &dir, &[unlimited()], instant()).await?;
        let setup = ServerSetup { orgs: vec![unlimited()], concurrency: chains, header_sync: true, postgres: None };
        let server = Arc::new(Server::start(&ctx.bin, &dir, &sim, &setup).await?);
        let specs = (0..chains).map(|c| chain_spec(&format!("overhead-{c}"), s.overhead_steps, 16)).collect();
        let cpu_before = server.proc.cpu_time()?;
        let ids = submit_all(&server, specs).await?;
        let docs = server.wait_all(&ids, Duration::from_millis(20), Duration::from_secs(600)).await?;
        let cpu = server.proc.cpu_time()?.saturating_sub(cpu_before);
        all_succeeded(&docs)?;
        let m = server.metrics().await?;
        let q = |p| m.quantile("ratepool_step_overhead_seconds", p).map(|v| v * 1e3).unwrap_or(f64::NAN);
        out.push((
            harness::makespan(&docs)?,
            m.sum("ratepool_provider_latency_seconds_sum", &[]),
            m.sum("ratepool_step_overhead_seconds_count", &[]),
            q(0.5),
            q(0.99),
            cpu.as_secs_f64(),
        ));
        server_stop(server).await;
        sim.proc.stop().await;
    }
    let (single, conc) = (out[0], out[1]);
    let r = OverheadRun {
        chain_steps: s.overhead_steps,
        chain_makespan_s: single.0,
        chain_provider_s: single.1,
        chain_overhead_per_step_ms: (single.0 - single.1) * 1e3 / s.overhead_steps as f64,
        chain_p50_ms: single.3,
        chain_p99_ms: single.4,
        concurrent_chains: s.overhead_chains,
        concurrent_steps: conc.2,
        concurrent_p50_ms: conc.3,
        concurrent_p99_ms: conc.4,
        concurrent_steps_per_s: conc.2 / conc.0,
        server_cpu_ms_per_step: conc.5 * 1e3 / conc.2.max(1.0),
    };
    eprintln!(
        "  chain of {}: {:.3} s, provider {:.3} s, p50 {:.2} ms p99 {:.2} ms; {} chains: p50 {:.2} ms p99 {:.2} ms, {:.0} steps/s, server CPU {:.2} ms/step",
        r.chain_steps,
        r.chain_makespan_s,
        r.chain_provider_s,
        r.chain_p50_ms,
        r.chain_p99_ms,
        r.concurrent_chains,
        r.concurrent_p50_ms,
        r.concurrent_p99_ms,
        r.concurrent_steps_per_s,
        r.server_cpu_ms_per_step
    );
    Ok(r)
}

// --------------------------------------------------------------- 5: memory

#[derive(Debug, Clone, Serialize)]
pub struct MemoryRun {
    pub jobs_in_flight: f64,
    pub calls_open: u64,
    pub idle_rss_mb: f64,
    pub loaded_rss_mb: f64,
    pub peak_rss_mb: f64,
}

pub async fn memory(ctx: &Ctx, run: usize) -> anyhow::Result<MemoryRun> {
    let jobs = ctx.sizes.memory_jobs;
    let dir = harness::run_dir(&ctx.work, &format!("memory-{run}"))?;
    // Every call hangs for 100 s: the jobs stay in flight while we look.
    let slow = LatencyConfig { base_ms: 100_000.0, per_token_ms: 0.0, time_scale: 1.0 };
    let sim = Sim::start(&ctx.bin, &dir, &[unlimited()], slow).await?;
    let setup = ServerSetup { orgs: vec![unlimited()], concurrency: jobs, header_sync: true, postgres: None };
    let server = Arc::new(Server::start(&ctx.bin, &dir, &sim, &setup).await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = server.proc.memory()?.0;
    let specs = (0..jobs).map(|j| chain_spec(&format!("memory-{j}"), 2, 64)).collect();
    submit_all(&server, specs).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let (in_flight, open) = loop {
        let in_flight = server.metrics().await?.sum("ratepool_jobs_in_flight", &[]);
        let open = sim.stats().await?.total_calls;
        if (in_flight as usize >= jobs && open as usize >= jobs) || Instant::now() > deadline {
            break (in_flight, open);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if (in_flight as usize) < jobs {
        bail!("only {in_flight} of {jobs} jobs in flight after 120 s");
    }
    let mut loaded = 0;
    for _ in 0..10 {
        loaded = loaded.max(server.proc.memory()?.0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let peak = server.proc.memory()?.1;
    server_stop(server).await;
    sim.proc.stop().await;
    let mb = |b: u64| b as f64 / 1e6;
    let r = MemoryRun {
        jobs_in_flight: in_flight,
        calls_open: open,
        idle_rss_mb: mb(idle),
        loaded_rss_mb: mb(loaded),
        peak_rss_mb: mb(peak),
    };
    eprintln!(
        "  {} jobs in flight, {} calls open: RSS idle {:.1} MB, loaded {:.1} MB, peak {:.1} MB",
        r.jobs_in_flight, r.calls_open, r.idle_rss_mb, r.loaded_rss_mb, r.peak_rss_mb
    );
    Ok(r)
}

// --------------------------------------------------------------- 6: ledger

#[derive(Debug, Clone, Serialize)]
pub struct LedgerThroughput {
    pub backend: &'static str,
    pub tasks: usize,
    pub keys: usize,
    pub acquisitions: u64,
    pub per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LedgerRun {
    pub throughput: Vec<LedgerThroughput>,
    /// DynamoDB requests per provider call: one router, no contention.
    pub dynamo_requests_per_call_alone: Option<f64>,
    /// The same with four routers (processes) on one binding bucket.
    pub dynamo_requests_per_call_contended: Option<f64>,
}

async fn hammer(ledger: Arc<dyn QuotaLedger>, tasks: usize, keys: usize, secs: f64) -> anyhow::Result<u64> {
    let params = BucketParams { requests: Rate::per_minute(1_000_000_000), tokens: Rate::per_minute(1_000_000_000) };
    let model = ModelName::parse(MODEL)?;
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let ledger = ledger.clone();
        let key = BucketKey::new(&OrgName::parse(format!("bench-{}", t % keys))?, &model);
        set.spawn(async move {
            let clock = SystemClock;
            let mut n = 0u64;
            while Instant::now() < stop {
                ledger.acquire(&key, &params, Cost { requests: 1, tokens: 100 }, clock.now(), ChargeId::new()).await?;
                n += 1;
            }
            anyhow::Ok(n)
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r??;
    }
    Ok(total)
}

async fn throughput(
    backend: &'static str,
    ledger: Arc<dyn QuotaLedger>,
    secs: f64,
    out: &mut Vec<LedgerThroughput>,
) -> anyhow::Result<()> {
    for (tasks, keys) in [(1, 1), (8, 1), (8, 8)] {
        let started = Instant::now();
        let acquisitions = hammer(ledger.clone(), tasks, keys, secs).await?;
        let per_s = acquisitions as f64 / started.elapsed().as_secs_f64();
        eprintln!("  {backend}: {tasks} task(s) on {keys} key(s): {per_s:.0} acquisitions/s");
        out.push(LedgerThroughput { backend, tasks, keys, acquisitions, per_s });
    }
    Ok(())
}

pub async fn ledger(ctx: &Ctx, run: usize) -> anyhow::Result<LedgerRun> {
    let dir = harness::run_dir(&ctx.work, &format!("ledger-{run}"))?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let db = crate::local::SqliteBackend::open(
        &dir.join("ledger.db"),
        crate::local::SqliteOptions { visibility_timeout: Duration::from_secs(30), clock: clock.clone() },
    )?;
    let mut out = Vec::new();
    throughput("sqlite", db.backend().ledger, ctx.sizes.ledger_secs, &mut out).await?;
    if let Some(server) = &ctx.postgres_server {
        let url = crate::postgres::create_database(server).await?;
        let options = crate::postgres::PgOptions { clock: clock.clone(), ..Default::default() };
        let pg = crate::postgres::PgBackend::connect(&url, options).await?;
        throughput("postgres", pg.backend().ledger, ctx.sizes.ledger_secs, &mut out).await?;
    }
    let (mut alone, mut contended) = (None, None);
    if let Some(endpoint) = &ctx.aws_endpoint {
        let aws_cfg = aws_config(endpoint, run);
        let clients = crate::aws::AwsClients::load(&aws_cfg).await;
        crate::aws::jobs::ensure_tables(&clients.dynamodb, &aws_cfg).await?;
        let l = crate::aws::ledger::DynamoLedger::connect(clients.dynamodb.clone(), &aws_cfg, clock.clone()).await?;
        throughput("dynamodb", Arc::new(l), ctx.sizes.ledger_secs, &mut out).await?;
        alone = Some(requests_per_call(&aws_cfg, 1, ctx.sizes.alone_calls, 1_000_000).await?);
        if ctx.sizes.contention_calls > 0 {
            // A bucket the calls overrun: 4 routers share its refill.
            let rpm = (ctx.sizes.contention_calls * 2 / 3) as u64;
            contended = Some(requests_per_call(&aws_cfg, 4, ctx.sizes.contention_calls, rpm).await?);
        }
        eprintln!(
            "  dynamodb requests per provider call: {:.2} alone, {:.2} with 4 routers on one bucket",
            alone.unwrap_or(f64::NAN),
            contended.unwrap_or(f64::NAN)
        );
    }
    Ok(LedgerRun {
        throughput: out,
        dynamo_requests_per_call_alone: alone,
        dynamo_requests_per_call_contended: contended,
    })
}

fn aws_config(endpoint: &str, run: usize) -> crate::aws::AwsConfig {
    let s = uuid::Uuid::new_v4().simple().to_string();
    crate::aws::AwsConfig {
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint.to_string()),
        jobs_table: format!("bench-jobs-{run}-{}", &s[..8]),
        ledger_table: format!("bench-ledger-{run}-{}", &s[..8]),
        ..crate::aws::AwsConfig::default()
    }
}

/// `routers` routers, each with its own DynamoDB client, make `calls` calls
/// in all through one org limited to `rpm`; DynamoDB requests per call.
async fn requests_per_call(
    aws_cfg: &crate::aws::AwsConfig,
    routers: usize,
    calls: usize,
    rpm: u64,
) -> anyhow::Result<f64> {
    let key = "sk-bench-ledger".to_string();
    let sim_cfg = crate::sim::SimConfig::from_toml(&format!(
        "[latency]\ntime_scale = 0\n[[orgs]]\nname = \"org-0\"\napi_key = \"{key}\"\n[orgs.models.\"{MODEL}\"]\nrpm = {rpm}\ntpm = 1000000000\n"
    ))?;
    let sim = crate::sim::Simulator::new(sim_cfg, Arc::new(SystemClock));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/v1", listener.local_addr()?);
    let stop = CancellationToken::new();
    let sim_stop = stop.clone();
    tokio::spawn(crate::sim::serve(listener, sim.clone(), async move { sim_stop.cancelled().await }));
    let cfg = crate::config::Config::parse(&format!(
        "[[orgs]]\nname = \"org-0\"\napi_key_env = \"K\"\n[orgs.models.\"{MODEL}\"]\nrpm = {rpm}\ntpm = 1000000000\n[[tenants]]\nname = \"t\"\napi_key_env = \"T\"\n"
    ))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let org_cfg = cfg.orgs.first().context("one org")?;
    let mut ledgers = Vec::new();
    let mut set = tokio::task::JoinSet::new();
    for r in 0..routers {
        let clients = crate::aws::AwsClients::load(aws_cfg).await;
        let ledger = Arc::new(
            crate::aws::ledger::DynamoLedger::connect(clients.dynamodb.clone(), aws_cfg, Arc::new(SystemClock)).await?,
        );
        ledgers.push(ledger.clone());
        let settings = org_cfg.settings(base.clone(), SecretString::from(key.clone()));
        let router = Arc::new(Router::new(
            vec![settings],
            ledger,
            ProviderClient::new()?,
            Arc::new(SystemClock),
            Arc::new(Telemetry::new()),
            RetryPolicy::default(),
        ));
        for c in 0..4 {
            let router = router.clone();
            let per_task = calls / routers / 4;
            set.spawn(async move {
                for i in 0..per_task {
                    let req = CallRequest {
                        tenant: TenantId::parse("t")?,
                        request: ProviderRequest::user_prompt(&ModelName::parse(MODEL)?, &format!("r{r} c{c} i{i}"), 5),
                        request_id: format!("r{r}/c{c}/{i}"),
                        gate: None,
                        yield_to_tenant_quota: false,
                        routing: Default::default(),
                        max_wait: None,
                    };
                    router.call(&req, &CancellationToken::new()).await?;
                }
                anyhow::Ok(())
            });
        }
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    stop.cancel();
    let provider_calls = sim.stats().orgs.values().map(|o| o.accepted_calls).sum::<u64>();
    let requests: u64 = ledgers.iter().map(|l| l.requests().total()).sum();
    Ok(requests as f64 / provider_calls.max(1) as f64)
}

// ---------------------------------------------------------- 7: header sync

#[derive(Debug, Clone, Serialize)]
pub struct HeaderRun {
    pub header_sync: bool,
    pub calls: f64,
    pub answered_429: f64,
    pub share_429: f64,
    pub other_client_tokens: u64,
    pub makespan_s: f64,
}

/// Another client with the same org key spends half of its token limit:
/// half a minute's burst up front, then half the refill, all run long.
async fn other_client(base_url: String, key: String, org: OrgLimits, stop: CancellationToken) -> anyhow::Result<u64> {
    let endpoint = OrgEndpoint {
        name: OrgName::parse(harness::org_name(0))?,
        base_url,
        api_key: SecretString::from(key),
        timeout: Duration::from_secs(30),
    };
    let client = ProviderClient::new()?;
    // One call charges about `per_call` tokens (a short prompt + max_tokens).
    let per_call = (org.tpm / 20).max(8);
    let chat = ProviderRequest::user_prompt(&ModelName::parse(MODEL)?, "hi", (per_call - 1) as u32);
    let mut spent = 0;
    let mut n = 0u64;
    for _ in 0..10 {
        if client.call(&endpoint, &chat, &format!("other/{n}")).await.is_ok() {
            spent += per_call;
        }
        n += 1;
    }
    // Half the refill: 10 calls of tpm/20 per minute.
    let every = Duration::from_secs(6);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return Ok(spent),
        }
        if client.call(&endpoint, &chat, &format!("other/{n}")).await.is_ok() {
            spent += per_call;
        }
        n += 1;
    }
}

pub async fn header_sync(ctx: &Ctx, run: usize) -> anyhow::Result<Vec<HeaderRun>> {
    let s = &ctx.sizes;
    let mut out = Vec::new();
    for sync in [false, true] {
        let dir = harness::run_dir(&ctx.work, &format!("headers-{run}-{sync}"))?;
        let sim = Sim::start(&ctx.bin, &dir, &[s.header_org], s.latency).await?;
        let setup =
            ServerSetup { orgs: vec![s.header_org], concurrency: s.header_jobs, header_sync: sync, postgres: None };
        let server = Arc::new(Server::start(&ctx.bin, &dir, &sim, &setup).await?);
        let stop = CancellationToken::new();
        let other = tokio::spawn(other_client(sim.base_url(), sim.keys[0].clone(), s.header_org, stop.clone()));
        // Let the other client take its half of the burst first.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let specs = (0..s.header_jobs).map(|j| chain_spec(&format!("headers-{j}"), s.steps, s.max_tokens)).collect();
        let ids = submit_all(&server, specs).await?;
        let docs = server.wait_all(&ids, Duration::from_millis(500), Duration::from_secs(900)).await?;
        stop.cancel();
        let other_client_tokens = other.await??;
        all_succeeded(&docs)?;
        let m = server.metrics().await?;
        let calls = m.sum("ratepool_provider_calls_total", &[]);
        let limited = m.sum("ratepool_provider_calls_total", &[("outcome", "rate_limited")]);
        let r = HeaderRun {
            header_sync: sync,
            calls,
            answered_429: limited,
            share_429: limited / calls.max(1.0),
            other_client_tokens,
            makespan_s: harness::makespan(&docs)?,
        };
        eprintln!(
            "  header sync {}: {} of {} calls answered 429 ({:.2}%), {:.1} s",
            if sync { "on" } else { "off" },
            r.answered_429,
            r.calls,
            100.0 * r.share_429,
            r.makespan_s
        );
        out.push(r);
        server_stop(server).await;
        sim.proc.stop().await;
    }
    Ok(out)
}

// ----------------------------------------------------------- 8: priorities

/// Interactive latency under a batch flood: the same jobs submitted as
/// `interactive` behind a queue of `batch` jobs, and (the FIFO reference)
/// as `batch` themselves, in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct PriorityRun {
    pub flood_jobs: usize,
    pub interactive_jobs: usize,
    pub concurrency: usize,
    pub steps_per_job: usize,
    /// Submission to finish of each probe job, seconds.
    pub interactive_s: Vec<f64>,
    pub fifo_s: Vec<f64>,
    pub interactive_p50_s: f64,
    pub fifo_p50_s: f64,
    /// fifo p50 ÷ interactive p50.
    pub speedup: f64,
    /// Batch jobs that finished while the interactive probes were waiting
    /// or running: batch is served, not starved.
    pub batch_done_meanwhile: usize,
}

fn with_priority(spec: &str, priority: &str) -> anyhow::Result<String> {
    let mut v: serde_json::Value = serde_json::from_str(spec)?;
    v["priority"] = serde_json::Value::from(priority);
    Ok(v.to_string())
}

/// One flood, then the probes as `probe_priority`; returns the probes'
/// latencies and how many flood jobs finished while they were in the system.
async fn flood_and_probe(ctx: &Ctx, name: &str, probe_priority: &str) -> anyhow::Result<(Vec<f64>, usize)> {
    let s = &ctx.sizes;
    let dir = harness::run_dir(&ctx.work, name)?;
    let sim = Sim::start(&ctx.bin, &dir, &[unlimited()], s.latency).await?;
    let setup =
        ServerSetup { orgs: vec![unlimited()], concurrency: s.flood_concurrency, header_sync: true, postgres: None };
    let server = Arc::new(Server::start(&ctx.bin, &dir, &sim, &setup).await?);
    let flood: Vec<String> = (0..s.flood_jobs)
        .map(|j| with_priority(&chain_spec(&format!("{name}-flood-{j}"), s.flood_steps, s.max_tokens), "batch"))
        .collect::<anyhow::Result<_>>()?;
    let flood_ids = submit_all(&server, flood).await?;
    let mut probe_ids = Vec::new();
    for j in 0..s.interactive_jobs {
        let spec = chain_spec(&format!("{name}-probe-{j}"), s.flood_steps, s.max_tokens);
        probe_ids.push(server.submit(&with_priority(&spec, probe_priority)?).await?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let timeout = Duration::from_secs(600);
    let probes = server.wait_all(&probe_ids, Duration::from_millis(20), timeout).await?;
    let flood_docs = server.wait_all(&flood_ids, Duration::from_millis(200), timeout).await?;
    all_succeeded(&probes)?;
    all_succeeded(&flood_docs)?;
    let mut latencies = Vec::new();
    let (mut first_in, mut last_out) = (f64::INFINITY, 0.0f64);
    for d in &probes {
        let created = harness::epoch_secs(&d.created_at)?;
        let finished = harness::epoch_secs(d.finished_at.as_deref().unwrap_or_default())?;
        latencies.push(finished - created);
        first_in = first_in.min(created);
        last_out = last_out.max(finished);
    }
    let mut meanwhile = 0;
    for d in &flood_docs {
        let finished = harness::epoch_secs(d.finished_at.as_deref().unwrap_or_default())?;
        if finished >= first_in && finished <= last_out {
            meanwhile += 1;
        }
    }
    server_stop(server).await;
    sim.proc.stop().await;
    Ok((latencies, meanwhile))
}

pub async fn priority(ctx: &Ctx, run: usize) -> anyhow::Result<PriorityRun> {
    let s = &ctx.sizes;
    let (interactive_s, batch_done_meanwhile) = flood_and_probe(ctx, &format!("priority-{run}"), "interactive").await?;
    let (fifo_s, _) = flood_and_probe(ctx, &format!("priority-{run}-fifo"), "batch").await?;
    let (interactive_p50_s, fifo_p50_s) = (super::median(interactive_s.clone()), super::median(fifo_s.clone()));
    eprintln!(
        "  interactive p50 {interactive_p50_s:.2} s behind {} batch jobs, as batch {fifo_p50_s:.2} s; {batch_done_meanwhile} batch jobs done meanwhile",
        s.flood_jobs
    );
    Ok(PriorityRun {
        flood_jobs: s.flood_jobs,
        interactive_jobs: s.interactive_jobs,
        concurrency: s.flood_concurrency,
        steps_per_job: s.flood_steps,
        interactive_s,
        fifo_s,
        interactive_p50_s,
        fifo_p50_s,
        speedup: fifo_p50_s / interactive_p50_s,
        batch_done_meanwhile,
    })
}

// ------------------------------------------- 9: a shorter window than advertised

/// Figure 9 of one run: the scaling workload on orgs whose simulator
/// enforces each of `window_buckets` while advertising the minute.
#[derive(Debug, Clone, Serialize)]
pub struct WindowRun {
    pub runs: Vec<PoolRun>,
}

pub async fn window(ctx: &Ctx, run: usize) -> anyhow::Result<WindowRun> {
    let s = &ctx.sizes;
    let mut runs = Vec::new();
    let learned = s.window_buckets.iter().map(|&b| (b, false));
    for (bucket, told) in learned.chain(s.window_told.iter().map(|&b| (b, true))) {
        let per_org = OrgLimits {
            enforce_burst_secs: (bucket < 60).then_some(bucket),
            told_burst_secs: told.then_some(bucket),
            ..s.per_org
        };
        let n = s.window_orgs;
        let name = format!("window-{run}-{bucket}s{}", if told { "-told" } else { "" });
        let r = pool_run_on(ctx, &name, per_org, n, n * s.jobs_per_org, None).await?;
        eprintln!(
            "  {bucket} s bucket{}: {} calls, {} answered 429 ({:.3}%), {:.1} s (bound {:.1} s, utilization {:.1}%), learned burst {:.1} s",
            if told { ", burst_secs told" } else { "" },
            r.sim.accepted_calls,
            r.sim.answered_429,
            100.0 * r.share_429,
            r.makespan_s,
            r.bound_s,
            100.0 * r.utilization,
            r.learned_burst_s
        );
        runs.push(r);
    }
    Ok(WindowRun { runs })
}

// ----------------------------------------------------------- 12: postgres

/// Figure 12 of one run: the same saturating pool workload as figure 1's
/// with one `ratepool serve` on each backend, in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct BackendsRun {
    pub sqlite: PoolRun,
    pub postgres: PoolRun,
}

pub async fn backends(ctx: &Ctx, run: usize) -> anyhow::Result<Option<BackendsRun>> {
    let Some(server) = &ctx.postgres_server else {
        eprintln!("  no PostgreSQL server (--postgres-server): figure 12 skipped");
        return Ok(None);
    };
    let s = &ctx.sizes;
    let orgs = s.org_counts.last().copied().unwrap_or(1);
    let jobs = orgs * s.jobs_per_org;
    let sqlite = pool_run_on(ctx, &format!("backends-{run}-sqlite"), s.per_org, orgs, jobs, None).await?;
    let url = crate::postgres::create_database(server).await?;
    let postgres = pool_run_on(ctx, &format!("backends-{run}-postgres"), s.per_org, orgs, jobs, Some(url)).await?;
    for (name, r) in [("sqlite", &sqlite), ("postgres", &postgres)] {
        eprintln!(
            "  {name}: {} orgs, utilization {:.3}, 429 share {:.4}, {:.2} calls/s",
            r.orgs, r.utilization, r.share_429, r.calls_per_s
        );
    }
    Ok(Some(BackendsRun { sqlite, postgres }))
}
