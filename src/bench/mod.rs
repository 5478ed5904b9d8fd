//! `ratepool bench` (`make bench`): how much of the pooled capacity ratepool
//! really uses, and what it costs. Every figure is measured against its bound
//! on real processes — `ratepool sim` and `ratepool serve` on loopback — and
//! repeated; the report quotes medians, and ratios taken within one run.
//!
//! The figures: capacity use at saturation; scaling with organizations;
//! against one org called one job after another; engine overhead per step;
//! resident memory with 1,000 jobs in flight; ledger requests per call and
//! acquisitions per second; header sync against a client spending the quota
//! behind ratepool's back; interactive latency under a batch flood; a
//! provider enforcing shorter windows than it advertises; the latency the
//! OpenAI-compatible calls door adds to a call, and the requests per second
//! it sustains; what a call costs on AWS; the saturation figure on
//! PostgreSQL beside SQLite. See `BENCHMARKS.md`.

pub mod cost;
pub mod figures;
pub mod harness;
pub mod proxy;
pub mod relay;

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

pub use figures::{Ctx, Sizes, chain_spec};

/// The figures, by the names `--only` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Figure {
    Scaling,
    Baseline,
    Overhead,
    Memory,
    Ledger,
    Headers,
    Priority,
    Window,
    Proxy,
    Cost,
    /// 12: the saturation figure on SQLite and on PostgreSQL.
    Backends,
}

impl Figure {
    pub const ALL: [Figure; 11] = [
        Figure::Scaling,
        Figure::Baseline,
        Figure::Overhead,
        Figure::Memory,
        Figure::Ledger,
        Figure::Headers,
        Figure::Priority,
        Figure::Window,
        Figure::Proxy,
        Figure::Cost,
        Figure::Backends,
    ];
}

pub struct Options {
    pub runs: usize,
    pub figures: Vec<Figure>,
    pub ctx: Ctx,
}

/// Every run of every figure, as measured.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub quick: bool,
    pub scaling: Vec<figures::ScalingRun>,
    pub baseline: Vec<figures::BaselineRun>,
    pub overhead: Vec<figures::OverheadRun>,
    pub memory: Vec<figures::MemoryRun>,
    pub ledger: Vec<figures::LedgerRun>,
    pub headers: Vec<Vec<figures::HeaderRun>>,
    pub priority: Vec<figures::PriorityRun>,
    pub window: Vec<figures::WindowRun>,
    pub proxy: Vec<proxy::ProxyRun>,
    pub cost: Vec<cost::CostRun>,
    pub backends: Vec<figures::BackendsRun>,
}

/// Runs the chosen figures `runs` times each.
pub async fn run(opts: &Options, quick: bool) -> anyhow::Result<Results> {
    let mut r = Results { quick, ..Results::default() };
    for fig in &opts.figures {
        for run in 0..opts.runs {
            eprintln!("== {fig:?}, run {} of {}", run + 1, opts.runs);
            let ctx = &opts.ctx;
            match fig {
                Figure::Scaling => r.scaling.push(figures::scaling(ctx, run).await?),
                Figure::Baseline => r.baseline.push(figures::baseline(ctx, run).await?),
                Figure::Overhead => r.overhead.push(figures::overhead(ctx, run).await?),
                Figure::Memory => r.memory.push(figures::memory(ctx, run).await?),
                Figure::Ledger => r.ledger.push(figures::ledger(ctx, run).await?),
                Figure::Headers => r.headers.push(figures::header_sync(ctx, run).await?),
                Figure::Priority => r.priority.push(figures::priority(ctx, run).await?),
                Figure::Window => r.window.push(figures::window(ctx, run).await?),
                Figure::Proxy => r.proxy.push(proxy::proxy(ctx, run).await?),
                Figure::Cost => r.cost.extend(cost::cost(ctx, run).await?),
                Figure::Backends => r.backends.extend(figures::backends(ctx, run).await?),
            }
        }
    }
    Ok(r)
}

/// The median of `v` (the mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Reads one number off an overhead run.
type OverheadField = fn(&figures::OverheadRun) -> f64;
/// Reads one number off a proxy run.
type ProxyField = fn(&proxy::ProxyRun) -> f64;

fn med<T>(runs: &[T], f: impl Fn(&T) -> f64) -> f64 {
    median(runs.iter().map(f).collect())
}

fn all<T>(runs: &[T], f: impl Fn(&T) -> f64, digits: usize) -> String {
    runs.iter().map(|r| format!("{:.*}", digits, f(r))).collect::<Vec<_>>().join(", ")
}

/// The results as the Markdown tables of `BENCHMARKS.md`: medians, with
/// every run's value in brackets.
pub fn report(r: &Results) -> String {
    let mut s = String::new();
    let n = |v: usize| v.to_string();
    if !r.scaling.is_empty() {
        let counts: Vec<usize> = r.scaling[0].runs.iter().map(|p| p.orgs).collect();
        let _ = writeln!(s, "### 1 + 2. Capacity use at saturation, and scaling with organizations\n");
        let _ = writeln!(
            s,
            "| orgs | jobs × steps | calls | makespan s | bound s (tokens / requests / chain) | utilization | 429 share | calls/s | × one org | ledger ops/call |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
        for (i, orgs) in counts.iter().enumerate() {
            let runs: Vec<&figures::PoolRun> = r.scaling.iter().filter_map(|x| x.runs.get(i)).collect();
            let ratios: Vec<f64> = r.scaling.iter().filter_map(|x| x.ratios.get(orgs).copied()).collect();
            let p = runs[0];
            let _ = writeln!(
                s,
                "| {} | {} × {} | {} | {:.2} [{}] | {:.2} ({:.2} / {:.2} / {:.2}) | **{:.1}%** [{}] | {:.3}% [{}] | {:.1} | **{:.2}** [{}] | {:.2} |",
                n(*orgs),
                p.jobs,
                p.steps_per_job,
                p.sim.accepted_calls,
                med(&runs, |x| x.makespan_s),
                all(&runs, |x| x.makespan_s, 2),
                med(&runs, |x| x.bound_s),
                med(&runs, |x| x.token_bound_s),
                med(&runs, |x| x.request_bound_s),
                med(&runs, |x| x.chain_bound_s),
                100.0 * med(&runs, |x| x.utilization),
                all(&runs, |x| 100.0 * x.utilization, 1),
                100.0 * med(&runs, |x| x.share_429),
                all(&runs, |x| 100.0 * x.share_429, 3),
                med(&runs, |x| x.calls_per_s),
                median(ratios.clone()),
                all(&ratios, |x| *x, 2),
                med(&runs, |x| x.ledger_ops_per_call),
            );
        }
        let _ = writeln!(s);
    }
    if !r.baseline.is_empty() {
        let b = &r.baseline;
        let _ = writeln!(s, "### 3. Against one org, one job after another\n");
        let _ =
            writeln!(s, "| workload | baseline s | baseline 429s | ratepool s ({} orgs) | speed-up |", b[0].pool_orgs);
        let _ = writeln!(s, "|---|---|---|---|---|");
        let _ = writeln!(
            s,
            "| {} × {} | {:.1} [{}] | {} | {:.1} [{}] | **{:.1}×** [{}] |\n",
            b[0].jobs,
            b[0].steps_per_job,
            med(b, |x| x.baseline_s),
            all(b, |x| x.baseline_s, 1),
            all(b, |x| x.baseline_429 as f64, 0),
            med(b, |x| x.pool_s),
            all(b, |x| x.pool_s, 1),
            med(b, |x| x.speedup),
            all(b, |x| x.speedup, 1),
        );
    }
    if !r.overhead.is_empty() {
        let o = &r.overhead;
        let _ = writeln!(s, "### 4. Engine overhead (simulator answering at once, no limits)\n");
        let _ = writeln!(s, "| measure | median | runs |");
        let _ = writeln!(s, "|---|---|---|");
        let rows: [(&str, OverheadField, usize); 9] = [
            ("one chain: makespan s", |x| x.chain_makespan_s, 3),
            ("one chain: sum of provider latencies s", |x| x.chain_provider_s, 3),
            ("one chain: overhead per step ms", |x| x.chain_overhead_per_step_ms, 2),
            ("one chain: step overhead p50 ms", |x| x.chain_p50_ms, 2),
            ("one chain: step overhead p99 ms", |x| x.chain_p99_ms, 2),
            ("concurrent chains: step overhead p50 ms", |x| x.concurrent_p50_ms, 2),
            ("concurrent chains: step overhead p99 ms", |x| x.concurrent_p99_ms, 2),
            ("concurrent chains: steps per second", |x| x.concurrent_steps_per_s, 0),
            ("concurrent chains: server CPU ms per step", |x| x.server_cpu_ms_per_step, 3),
        ];
        for (label, f, d) in rows {
            let _ = writeln!(s, "| {label} | **{:.*}** | {} |", d, med(o, f), all(o, f, d));
        }
        let _ = writeln!(
            s,
            "\nOne chain has {} steps; the concurrent run is {} chains of {} steps in one server.\n",
            o[0].chain_steps, o[0].concurrent_chains, o[0].chain_steps
        );
    }
    if !r.memory.is_empty() {
        let m = &r.memory;
        let _ = writeln!(s, "### 5. Memory\n");
        let _ = writeln!(s, "| jobs in flight | calls open | RSS idle MB | RSS loaded MB | peak RSS MB |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | **{:.1}** [{}] | {:.1} [{}] |\n",
            m[0].jobs_in_flight,
            m[0].calls_open,
            med(m, |x| x.idle_rss_mb),
            med(m, |x| x.loaded_rss_mb),
            all(m, |x| x.loaded_rss_mb, 1),
            med(m, |x| x.peak_rss_mb),
            all(m, |x| x.peak_rss_mb, 1),
        );
    }
    if !r.ledger.is_empty() {
        let l = &r.ledger;
        let _ = writeln!(s, "### 6. Ledger\n");
        let _ = writeln!(s, "| backend | tasks | keys | acquisitions/s |");
        let _ = writeln!(s, "|---|---|---|---|");
        for (i, t) in l[0].throughput.iter().enumerate() {
            let runs: Vec<f64> = l.iter().filter_map(|x| x.throughput.get(i).map(|t| t.per_s)).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | **{:.0}** [{}] |",
                t.backend,
                t.tasks,
                t.keys,
                median(runs.clone()),
                all(&runs, |x| *x, 0)
            );
        }
        let alone: Vec<f64> = l.iter().filter_map(|x| x.dynamo_requests_per_call_alone).collect();
        let cont: Vec<f64> = l.iter().filter_map(|x| x.dynamo_requests_per_call_contended).collect();
        if !alone.is_empty() {
            let _ = writeln!(
                s,
                "\nDynamoDB requests per provider call: **{:.2}** alone [{}], **{:.2}** with four routers on one binding bucket [{}].",
                median(alone.clone()),
                all(&alone, |x| *x, 2),
                median(cont.clone()),
                all(&cont, |x| *x, 2)
            );
        }
        let _ = writeln!(s);
    }
    if !r.headers.is_empty() {
        let _ = writeln!(s, "### 7. Header sync, with another client spending half the org's quota\n");
        let _ = writeln!(s, "| header sync | calls | 429s | 429 share | makespan s |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        for i in 0..r.headers[0].len() {
            let runs: Vec<&figures::HeaderRun> = r.headers.iter().filter_map(|x| x.get(i)).collect();
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.0} | **{:.2}%** [{}] | {:.1} |",
                if runs[0].header_sync { "on" } else { "off" },
                med(&runs, |x| x.calls),
                med(&runs, |x| x.answered_429),
                100.0 * med(&runs, |x| x.share_429),
                all(&runs, |x| 100.0 * x.share_429, 2),
                med(&runs, |x| x.makespan_s),
            );
        }
        let _ = writeln!(s);
    }
    if !r.priority.is_empty() {
        let p = &r.priority[0];
        let _ = writeln!(
            s,
            "### 8. Priorities: {} interactive jobs behind {} batch jobs ({} steps each, {} jobs at once)\n",
            p.interactive_jobs, p.flood_jobs, p.steps_per_job, p.concurrency
        );
        let _ = writeln!(s, "| probes submitted as | p50 submit → done s | max s | batch jobs done meanwhile |");
        let _ = writeln!(s, "|---|---|---|---|");
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let runs = &r.priority;
        let _ = writeln!(
            s,
            "| interactive | **{:.2}** [{}] | {:.2} | {:.0} |",
            med(runs, |x| x.interactive_p50_s),
            all(runs, |x| x.interactive_p50_s, 2),
            med(runs, |x| max(&x.interactive_s)),
            med(runs, |x| x.batch_done_meanwhile as f64),
        );
        let _ = writeln!(
            s,
            "| batch (FIFO reference) | {:.2} [{}] | {:.2} | |",
            med(runs, |x| x.fifo_p50_s),
            all(runs, |x| x.fifo_p50_s, 2),
            med(runs, |x| max(&x.fifo_s)),
        );
        let _ = writeln!(
            s,
            "\nInteractive is **{:.1}×** faster than FIFO [{}] (ratio within each run).\n",
            med(runs, |x| x.speedup),
            all(runs, |x| x.speedup, 1)
        );
    }
    if !r.window.is_empty() {
        let w = &r.window;
        let p = &w[0].runs[0];
        let _ = writeln!(
            s,
            "### 9. A provider enforcing a shorter window than it advertises ({} orgs at {} rpm / {} tpm each)\n",
            p.orgs, p.per_org_rpm, p.per_org_tpm
        );
        let _ = writeln!(
            s,
            "| real bucket s | ratepool's burst_secs | jobs × steps | calls | 429s | 429 share | makespan s | bound s (tokens / requests / chain) | makespan ÷ bound | utilization | learned burst s |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
        for i in 0..w[0].runs.len() {
            let runs: Vec<&figures::PoolRun> = w.iter().filter_map(|x| x.runs.get(i)).collect();
            let p = runs[0];
            let _ = writeln!(
                s,
                "| {:.0} | {:.0} | {} × {} | {} | {:.0} [{}] | **{:.3}%** [{}] | {:.2} [{}] | {:.2} ({:.2} / {:.2} / {:.2}) | **{:.3}** [{}] | {:.1}% [{}] | {:.1} [{}] |",
                p.real_burst_s,
                p.told_burst_s,
                p.jobs,
                p.steps_per_job,
                p.sim.accepted_calls,
                med(&runs, |x| x.sim.answered_429 as f64),
                all(&runs, |x| x.sim.answered_429 as f64, 0),
                100.0 * med(&runs, |x| x.share_429),
                all(&runs, |x| 100.0 * x.share_429, 3),
                med(&runs, |x| x.makespan_s),
                all(&runs, |x| x.makespan_s, 2),
                med(&runs, |x| x.bound_s),
                med(&runs, |x| x.token_bound_s),
                med(&runs, |x| x.request_bound_s),
                med(&runs, |x| x.chain_bound_s),
                med(&runs, |x| x.makespan_s / x.bound_s),
                all(&runs, |x| x.makespan_s / x.bound_s, 3),
                100.0 * med(&runs, |x| x.utilization),
                all(&runs, |x| 100.0 * x.utilization, 1),
                med(&runs, |x| x.learned_burst_s),
                all(&runs, |x| x.learned_burst_s, 1),
            );
        }
        let _ = writeln!(s);
    }
    if !r.proxy.is_empty() {
        proxy_report(&mut s, &r.proxy);
    }
    if !r.cost.is_empty() {
        cost_report(&mut s, &r.cost);
    }
    if !r.backends.is_empty() {
        backends_report(&mut s, &r.backends);
    }
    s
}

/// Figure 12's table: one row per backend, medians over the runs.
fn backends_report(s: &mut String, runs: &[figures::BackendsRun]) {
    let first = &runs[0].sqlite;
    let _ = writeln!(
        s,
        "### 12. Saturation on PostgreSQL beside SQLite ({} orgs, {} jobs × {} steps, one `ratepool serve` each, same run)\n",
        first.orgs, first.jobs, first.steps_per_job
    );
    let _ = writeln!(s, "| backend | makespan s | utilization | 429 share | calls/s | ledger ops/call |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    type Pick = fn(&figures::BackendsRun) -> &figures::PoolRun;
    let rows: [(&str, Pick); 2] = [("sqlite", |x| &x.sqlite), ("postgres", |x| &x.postgres)];
    for (name, pick) in rows {
        let _ = writeln!(
            s,
            "| {name} | {:.2} [{}] | **{:.1}%** [{}] | {:.3}% [{}] | {:.2} | {:.2} |",
            med(runs, |x| pick(x).makespan_s),
            all(runs, |x| pick(x).makespan_s, 2),
            100.0 * med(runs, |x| pick(x).utilization),
            all(runs, |x| 100.0 * pick(x).utilization, 1),
            100.0 * med(runs, |x| pick(x).share_429),
            all(runs, |x| 100.0 * pick(x).share_429, 3),
            med(runs, |x| pick(x).calls_per_s),
            med(runs, |x| pick(x).ledger_ops_per_call),
        );
    }
    let ratio: Vec<f64> = runs.iter().map(|x| x.postgres.calls_per_s / x.sqlite.calls_per_s).collect();
    let _ = writeln!(
        s,
        "\nCalls per second, PostgreSQL ÷ SQLite within a run: **{:.2}** [{}].\n",
        median(ratio.clone()),
        all(&ratio, |x| *x, 2)
    );
}

/// Figure 10's tables: one row per concurrency and body, then the sustained loop.
fn cost_report(s: &mut String, all_runs: &[cost::CostRun]) {
    let _ = writeln!(
        s,
        "### 11. What a provider call costs on AWS: the example screenplay through the Lambda handler and 2 workers\n"
    );
    let _ = writeln!(
        s,
        "Counted by the emulator's wrapper (`infra/moto_server.py`): every request, and DynamoDB capacity by the documented sizing rules (item size rounded up to 1 KB per write unit, the larger of before and after; twice in a transaction; 4 KB per read unit, half for eventually consistent reads).\n"
    );
    for variant in cost::VARIANTS {
        let runs: Vec<&cost::CostRun> = all_runs.iter().filter(|r| r.variant == variant).collect();
        let Some(first) = runs.first() else { continue };
        let _ = writeln!(
            s,
            "**{variant}** ({} job(s) per run, {} provider calls in the first run)\n",
            first.jobs, first.provider_calls
        );
        let _ = writeln!(s, "| per provider call | median | runs |");
        let _ = writeln!(s, "|---|---|---|");
        type Field = fn(&&cost::CostRun) -> f64;
        let rows: [(&str, Field, usize); 9] = [
            ("completion characters", |x| x.output_chars_per_call, 0),
            ("DynamoDB write units, all tables", |x| x.write_units_per_call, 2),
            ("of which the jobs table", |x| x.jobs_table_write_units_per_call, 2),
            ("of which the quota ledger", |x| x.ledger_write_units_per_call, 2),
            ("DynamoDB read units", |x| x.read_units_per_call, 2),
            ("DynamoDB requests", |x| x.dynamodb_requests_per_call, 2),
            ("SQS requests", |x| x.sqs_requests_per_call, 2),
            ("CloudWatch requests", |x| x.cloudwatch_requests_per_call, 3),
            ("largest jobs-table item at the end, bytes (the spec)", |x| x.largest_job_table_item_bytes as f64, 0),
        ];
        for (label, f, d) in rows {
            let _ = writeln!(s, "| {label} | **{:.*}** | {} |", d, med(&runs, f), all(&runs, f, d));
        }
        let actions: std::collections::BTreeSet<&String> =
            runs.iter().flat_map(|r| r.dynamodb_actions_per_call.keys()).collect();
        for a in actions {
            let f = |x: &&cost::CostRun| x.dynamodb_actions_per_call.get(a).copied().unwrap_or(0.0);
            let _ = writeln!(s, "| DynamoDB {a} requests | {:.2} | {} |", med(&runs, f), all(&runs, f, 2));
        }
        let _ = writeln!(s);
    }
}

fn proxy_report(s: &mut String, runs: &[proxy::ProxyRun]) {
    let _ = writeln!(
        s,
        "### 10. Proxy overhead: the calls door against the simulator called directly
"
    );
    let _ = writeln!(
        s,
        "| concurrent | answer | provider ms | requests each way | direct p50 ms | through p50 ms | added p50 ms | direct p99 ms | through p99 ms | added p99 ms | p99 ratio |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, c) in runs[0].cells.iter().enumerate() {
        let cells: Vec<&proxy::ProxyCell> = runs.iter().filter_map(|r| r.cells.get(i)).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.3} | {:.3} | {:.3} [{}] | {:.3} | {:.3} | **{:.3}** [{}] | {:.2}× [{}] |",
            c.concurrency,
            if c.streamed { "streamed" } else { "whole" },
            c.provider_ms,
            c.requests,
            med(&cells, |x| x.direct_p50_ms),
            med(&cells, |x| x.through_p50_ms),
            med(&cells, |x| x.added_p50_ms),
            all(&cells, |x| x.added_p50_ms, 3),
            med(&cells, |x| x.direct_p99_ms),
            med(&cells, |x| x.through_p99_ms),
            med(&cells, |x| x.added_p99_ms),
            all(&cells, |x| x.added_p99_ms, 3),
            med(&cells, |x| x.ratio_p99),
            all(&cells, |x| x.ratio_p99, 2),
        );
    }
    let _ = writeln!(
        s,
        "\nAdded = a percentile through ratepool minus the same percentile direct, each over its own samples.\n"
    );
    let _ = writeln!(
        s,
        "| concurrent | answer | provider ms | added p50 ms: ratepool | added p50 ms: do-nothing relay | added p99 ms: ratepool | added p99 ms: do-nothing relay |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for (i, c) in runs[0].cells.iter().enumerate().filter(|(_, c)| c.relay.is_some()) {
        let cells: Vec<&proxy::ProxyCell> = runs.iter().filter_map(|r| r.cells.get(i)).collect();
        let relay =
            |f: fn(&proxy::RelayFigures) -> f64| move |x: &&proxy::ProxyCell| x.relay.as_ref().map_or(f64::NAN, f);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} [{}] | {:.3} [{}] | **{:.3}** [{}] | **{:.3}** [{}] |",
            c.concurrency,
            if c.streamed { "streamed" } else { "whole" },
            c.provider_ms,
            med(&cells, |x| x.added_p50_ms),
            all(&cells, |x| x.added_p50_ms, 3),
            med(&cells, relay(|r| r.added_p50_ms)),
            all(&cells, relay(|r| r.added_p50_ms), 3),
            med(&cells, |x| x.added_p99_ms),
            all(&cells, |x| x.added_p99_ms, 3),
            med(&cells, relay(|r| r.added_p99_ms)),
            all(&cells, relay(|r| r.added_p99_ms), 3),
        );
    }
    let _ = writeln!(
        s,
        "\nThe do-nothing relay (`ratepool relay`) takes each request and sends it on, nothing else: what a third process on the path costs.\n"
    );
    let _ = writeln!(
        s,
        "| sustained, {} clients for {:.0} s | median | runs |",
        runs[0].sustained_clients, runs[0].sustained_secs
    );
    let _ = writeln!(s, "|---|---|---|");
    let rows: [(&str, ProxyField, usize); 5] = [
        ("through ratepool: requests/s", |x| x.through_rps, 0),
        ("direct to the simulator: requests/s", |x| x.direct_rps, 0),
        ("server CPU ms per request", |x| x.server_cpu_ms_per_request, 3),
        ("simulator CPU ms per request (direct)", |x| x.sim_cpu_ms_per_request, 3),
        ("provider calls per request through ratepool", proxy::ProxyRun::calls_per_request, 2),
    ];
    for (label, f, d) in rows {
        let _ = writeln!(s, "| {label} | **{:.*}** | {} |", d, med(runs, f), all(runs, f, d));
    }
    let _ = writeln!(s);
}

/// Where `make bench` keeps its work and results.
pub fn default_work_dir() -> PathBuf {
    PathBuf::from("target/bench")
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(vec![]).is_nan());
        assert_eq!(median(vec![f64::NAN, 5.0]), 5.0);
    }
}
