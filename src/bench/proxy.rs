//! Figure 10: what the calls door adds to a call. The bench process sends the
//! same chat request straight to the simulator and through `ratepool serve`'s
//! `POST /v1/chat/completions`, at several concurrencies, whole and streamed.
//! The simulator answers at once and the limits never bind, so the
//! difference is ratepool's own work: authentication, parsing, the ledger
//! write, the provider call it makes and the relay of the answer.
//!
//! Against the slow provider the same requests also go through a do-nothing
//! relay process ([`super::relay`]): on two cores shared by client, proxy
//! and provider, a third process on the path costs wake-ups of its own, and
//! the relay shows how much of ratepool's added latency that is.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use serde::Serialize;

use super::figures::{Ctx, ProxyCellSize, fixed, instant, unlimited};
use super::harness::{self, MODEL, Proc, Server, ServerSetup, Sim};

/// One side of a cell: where its requests go, with its own connection pool.
struct Target {
    name: &'static str,
    client: reqwest::Client,
    url: String,
    key: String,
}

impl Target {
    fn new(name: &'static str, base: &str, key: &str) -> anyhow::Result<Arc<Self>> {
        // Keep-alive, and as many idle connections as there are clients.
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
        Ok(Arc::new(Self { name, client, url: format!("{base}/v1/chat/completions"), key: key.to_string() }))
    }

    /// One request, timed from sending to the last byte of the answer.
    async fn send(&self, body: &Bytes, streamed: bool) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut resp = self
            .client
            .post(&self.url)
            .bearer_auth(&self.key)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await?;
        let status = resp.status();
        let mut answer = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            answer.extend_from_slice(&chunk);
        }
        let elapsed = started.elapsed();
        if status != reqwest::StatusCode::OK {
            bail!("{} answered {status}: {}", self.name, String::from_utf8_lossy(&answer));
        }
        if streamed && !answer.trim_ascii_end().ends_with(b"data: [DONE]") {
            bail!("{}: a stream ended before its [DONE]", self.name);
        }
        Ok(elapsed)
    }
}

fn request_body(streamed: bool) -> Bytes {
    let mut v = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello to the owls."}],
        "max_tokens": 16,
    });
    if streamed {
        v["stream"] = serde_json::Value::Bool(true);
    }
    Bytes::from(v.to_string())
}

/// `clients` clients, each sending its next request when the last is
/// answered, until `total` requests are answered; every latency in ms.
/// Client `i` starts `i/clients` of `spread` late, so that against a
/// provider taking `spread` to answer the requests arrive spread over it, as
/// from independent callers, rather than all in the same millisecond.
async fn closed_loop(
    target: &Arc<Target>,
    streamed: bool,
    clients: usize,
    total: usize,
    spread: Duration,
) -> anyhow::Result<Vec<f64>> {
    let left = Arc::new(AtomicUsize::new(total));
    let body = request_body(streamed);
    let mut set = tokio::task::JoinSet::new();
    let clients = clients.min(total);
    for i in 0..clients {
        let (target, left, body) = (target.clone(), left.clone(), body.clone());
        let late = spread.mul_f64(i as f64 / clients as f64);
        set.spawn(async move {
            tokio::time::sleep(late).await;
            let mut ms = Vec::new();
            while left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok() {
                ms.push(target.send(&body, streamed).await?.as_secs_f64() * 1e3);
            }
            anyhow::Ok(ms)
        });
    }
    let mut all = Vec::with_capacity(total);
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    Ok(all)
}

/// `clients` clients in a closed loop for `secs`; requests answered and
/// the time until the last of them was.
async fn timed_loop(target: &Arc<Target>, clients: usize, secs: f64) -> anyhow::Result<(usize, f64)> {
    let started = Instant::now();
    let stop = started + Duration::from_secs_f64(secs);
    let body = request_body(false);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (target, body) = (target.clone(), body.clone());
        set.spawn(async move {
            let mut n = 0usize;
            while Instant::now() < stop {
                target.send(&body, false).await?;
                n += 1;
            }
            anyhow::Ok(n)
        });
    }
    let mut n = 0;
    while let Some(r) = set.join_next().await {
        n += r??;
    }
    Ok((n, started.elapsed().as_secs_f64()))
}

/// The `q` quantile of `sorted` by nearest rank: the smallest sample with
/// at least `q` of the samples at or below it.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One concurrency, whole or streamed: the same number of requests sent
/// each way. Added latency is a percentile through ratepool minus the same
/// percentile direct; the ratio is their quotient.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyCell {
    pub concurrency: usize,
    pub streamed: bool,
    /// The simulator's time to answer, in ms (0: at once).
    pub provider_ms: u64,
    /// Requests measured each way (warm-up not included).
    pub requests: usize,
    pub direct_p50_ms: f64,
    pub direct_p99_ms: f64,
    pub through_p50_ms: f64,
    pub through_p99_ms: f64,
    pub added_p50_ms: f64,
    pub added_p99_ms: f64,
    pub ratio_p50: f64,
    pub ratio_p99: f64,
    /// The same requests through the do-nothing relay (slow-provider cells).
    pub relay: Option<RelayFigures>,
}

/// Percentiles through the do-nothing relay, and what it adds over direct.
#[derive(Debug, Clone, Serialize)]
pub struct RelayFigures {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub added_p50_ms: f64,
    pub added_p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProxyRun {
    pub cells: Vec<ProxyCell>,
    /// The sustained loop: clients, seconds, requests per second each way.
    pub sustained_clients: usize,
    pub sustained_secs: f64,
    pub through_rps: f64,
    pub direct_rps: f64,
    /// The server's CPU time (user + system) per request in the sustained
    /// loop through it, and the simulator's per request in the direct loop.
    pub server_cpu_ms_per_request: f64,
    pub sim_cpu_ms_per_request: f64,
    /// Requests the bench sent, warm-ups included: straight to the
    /// simulator, and through ratepool.
    pub direct_requests: u64,
    pub through_requests: u64,
    /// Requests sent through the do-nothing relay, warm-ups included.
    pub relay_requests: u64,
    /// Chat requests the simulator received, and the server's count of
    /// door calls answered `ok` and of provider calls it made.
    pub sim_calls: u64,
    pub door_ok: f64,
    pub provider_calls: f64,
}

impl ProxyRun {
    /// Provider calls per request through ratepool, as the simulator saw them.
    pub fn calls_per_request(&self) -> f64 {
        self.sim_calls.saturating_sub(self.direct_requests + self.relay_requests) as f64
            / self.through_requests.max(1) as f64
    }
}

/// A simulator and a `ratepool serve` in front of it (and, against a slow
/// provider, a do-nothing relay), and a client for each.
struct Pair {
    sim: Sim,
    server: Server,
    direct: Arc<Target>,
    through: Arc<Target>,
    relay: Option<(Proc, Arc<Target>)>,
    /// Requests sent each way, warm-ups included.
    direct_requests: u64,
    through_requests: u64,
    relay_requests: u64,
}

impl Pair {
    async fn start(ctx: &Ctx, name: &str, provider_ms: u64) -> anyhow::Result<Self> {
        let dir = harness::run_dir(&ctx.work, name)?;
        let latency = if provider_ms == 0 { instant() } else { fixed(provider_ms) };
        let sim = Sim::start(&ctx.bin, &dir, &[unlimited()], latency).await?;
        let setup = ServerSetup { orgs: vec![unlimited()], concurrency: 1, header_sync: true, postgres: None };
        let server = Server::start(&ctx.bin, &dir, &sim, &setup).await?;
        let org_key = sim.keys.first().context("one org")?;
        let direct = Target::new("the simulator", &sim.proc.url, org_key)?;
        let through = Target::new("ratepool", &server.proc.url, server.tenant_key())?;
        let relay = if provider_ms > 0 {
            let proc = harness::start_relay(&ctx.bin, &dir, &sim.proc.url).await?;
            let target = Target::new("the do-nothing relay", &proc.url, org_key)?;
            Some((proc, target))
        } else {
            None
        };
        Ok(Self { sim, server, direct, through, relay, direct_requests: 0, through_requests: 0, relay_requests: 0 })
    }

    /// One cell: a warm-up each way, then two alternating rounds each way,
    /// so a drift in the machine's load falls on every side. Against a slow
    /// provider the relay is a third way.
    async fn cell(&mut self, size: ProxyCellSize, warmup: usize) -> anyhow::Result<ProxyCell> {
        let ProxyCellSize { concurrency, requests, streamed, provider_ms } = size;
        let warm = (2 * concurrency).max(warmup);
        let spread = Duration::from_millis(provider_ms);
        let mut ways = vec![self.direct.clone(), self.through.clone()];
        ways.extend(self.relay.as_ref().map(|(_, target)| target.clone()));
        let mut samples = vec![Vec::new(); ways.len()];
        for way in &ways {
            closed_loop(way, streamed, concurrency, warm, spread).await?;
        }
        let half = requests / 2;
        for n in [half, requests - half] {
            for (way, s) in ways.iter().zip(&mut samples) {
                s.extend(closed_loop(way, streamed, concurrency, n, spread).await?);
            }
        }
        self.direct_requests += (warm + requests) as u64;
        self.through_requests += (warm + requests) as u64;
        if self.relay.is_some() {
            self.relay_requests += (warm + requests) as u64;
        }
        for s in &mut samples {
            s.sort_by(f64::total_cmp);
        }
        let (d, t) = (&samples[0], &samples[1]);
        let (d50, d99, t50, t99) = (percentile(d, 0.5), percentile(d, 0.99), percentile(t, 0.5), percentile(t, 0.99));
        let cell = ProxyCell {
            concurrency,
            streamed,
            provider_ms,
            requests,
            direct_p50_ms: d50,
            direct_p99_ms: d99,
            through_p50_ms: t50,
            through_p99_ms: t99,
            added_p50_ms: t50 - d50,
            added_p99_ms: t99 - d99,
            ratio_p50: t50 / d50,
            ratio_p99: t99 / d99,
            relay: samples.get(2).map(|r| {
                let (p50, p99) = (percentile(r, 0.5), percentile(r, 0.99));
                RelayFigures { p50_ms: p50, p99_ms: p99, added_p50_ms: p50 - d50, added_p99_ms: p99 - d99 }
            }),
        };
        eprintln!(
            "  {concurrency} concurrent{}, provider {provider_ms} ms: p50 {d50:.3} → {t50:.3} ms (+{:.3}), p99 {d99:.3} → {t99:.3} ms (+{:.3})",
            if streamed { ", streamed" } else { "" },
            cell.added_p50_ms,
            cell.added_p99_ms
        );
        if let Some(r) = &cell.relay {
            eprintln!("    through the do-nothing relay: p50 +{:.3} ms, p99 +{:.3} ms", r.added_p50_ms, r.added_p99_ms);
        }
        Ok(cell)
    }

    /// `clients` clients in a closed loop for `secs` each way: requests per
    /// second, and the CPU each process spent per request.
    async fn sustained(&mut self, clients: usize, secs: f64) -> anyhow::Result<Sustained> {
        let sim_cpu = self.sim.proc.cpu_time()?;
        let (dn, ds) = timed_loop(&self.direct, clients, secs).await?;
        let sim_cpu = self.sim.proc.cpu_time()?.saturating_sub(sim_cpu);
        let server_cpu = self.server.proc.cpu_time()?;
        let (tn, ts) = timed_loop(&self.through, clients, secs).await?;
        let server_cpu = self.server.proc.cpu_time()?.saturating_sub(server_cpu);
        self.direct_requests += dn as u64;
        self.through_requests += tn as u64;
        Ok(Sustained {
            through_rps: tn as f64 / ts,
            direct_rps: dn as f64 / ds,
            server_cpu_ms_per_request: server_cpu.as_secs_f64() * 1e3 / tn.max(1) as f64,
            sim_cpu_ms_per_request: sim_cpu.as_secs_f64() * 1e3 / dn.max(1) as f64,
        })
    }

    /// Stops both processes, adding what each side saw to `r`'s counts.
    async fn finish(self, r: &mut ProxyRun) -> anyhow::Result<()> {
        let stats = self.sim.stats().await?;
        let m = self.server.metrics().await?;
        r.direct_requests += self.direct_requests;
        r.through_requests += self.through_requests;
        r.relay_requests += self.relay_requests;
        r.sim_calls += stats.total_calls;
        r.door_ok += m.sum("ratepool_calls_total", &[("endpoint", "chat_completions"), ("outcome", "ok")]);
        r.provider_calls += m.sum("ratepool_provider_calls_total", &[]);
        self.server.proc.stop().await;
        if let Some((proc, _)) = self.relay {
            proc.stop().await;
        }
        self.sim.proc.stop().await;
        Ok(())
    }
}

struct Sustained {
    through_rps: f64,
    direct_rps: f64,
    server_cpu_ms_per_request: f64,
    sim_cpu_ms_per_request: f64,
}

pub async fn proxy(ctx: &Ctx, run: usize) -> anyhow::Result<ProxyRun> {
    let s = &ctx.sizes;
    let mut r = ProxyRun {
        cells: Vec::new(),
        sustained_clients: s.proxy_clients,
        sustained_secs: s.proxy_secs,
        through_rps: 0.0,
        direct_rps: 0.0,
        server_cpu_ms_per_request: 0.0,
        sim_cpu_ms_per_request: 0.0,
        direct_requests: 0,
        through_requests: 0,
        relay_requests: 0,
        sim_calls: 0,
        door_ok: 0.0,
        provider_calls: 0.0,
    };
    // One simulator and server per provider latency, in the cells' order;
    // the sustained loop runs against the one that answers at once.
    let mut latencies: Vec<u64> = Vec::new();
    for c in &s.proxy_cells {
        if !latencies.contains(&c.provider_ms) {
            latencies.push(c.provider_ms);
        }
    }
    if !latencies.contains(&0) {
        latencies.push(0);
    }
    for ms in latencies {
        let mut pair = Pair::start(ctx, &format!("proxy-{run}-{ms}ms"), ms).await?;
        for &size in s.proxy_cells.iter().filter(|c| c.provider_ms == ms) {
            r.cells.push(pair.cell(size, s.proxy_warmup).await?);
        }
        if ms == 0 {
            let x = pair.sustained(s.proxy_clients, s.proxy_secs).await?;
            (r.through_rps, r.direct_rps) = (x.through_rps, x.direct_rps);
            (r.server_cpu_ms_per_request, r.sim_cpu_ms_per_request) =
                (x.server_cpu_ms_per_request, x.sim_cpu_ms_per_request);
            eprintln!(
                "  sustained, {} clients: {:.0} requests/s through ratepool ({:.3} ms server CPU each), {:.0} direct",
                s.proxy_clients, x.through_rps, x.server_cpu_ms_per_request, x.direct_rps
            );
        }
        pair.finish(&mut r).await?;
    }
    eprintln!(
        "  {} provider calls for {} requests through ratepool",
        r.sim_calls.saturating_sub(r.direct_requests),
        r.through_requests
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentile_is_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
