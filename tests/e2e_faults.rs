//! Provider faults, end to end: `ratepool serve` runs jobs against
//! `ratepool sim` while the simulator answers 5% of calls with 5xx, drops
//! connections, stalls calls for 10 s (past the 4 s client timeout) and
//! takes one org down for 30 s. Every job must finish; the org's circuit
//! breaker must open and close again (sampled from `/metrics` during the
//! run); the provider must see few 429s and no retry storm (calls per step
//! bounded by the retry policy, the dead org asked only a handful of times).
//!
//! A storage drill through `ratepool serve` (`[drill.storage_faults]`):
//! 40 chained jobs while the server's own storage calls fail, are
//! throttled, lose their answers and stall past the lease's renewal time;
//! every job succeeds, every step reaches the provider once, nothing is
//! left queued, running or dead-lettered.
//!
//! Also: an org that starts answering `insufficient_quota` mid-run leaves
//! the rotation and is reported while the jobs finish elsewhere; and an org
//! that answers 503 "Slow Down" gets a lower admitted rate that recovers
//! once it stops (router in-process, with a fast recovery policy).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ratepool::config::Config;
use ratepool::domain::{Clock, ModelName, SystemClock, TenantId};
use ratepool::engine::breaker::SlowDownPolicy;
use ratepool::engine::router::{CallRequest, OrgSettings, RetryPolicy, Router};
use ratepool::local::{SqliteBackend, SqliteOptions};
use ratepool::provider::{ProviderClient, ProviderRequest};
use ratepool::sim::{SimConfig, Simulator};
use ratepool::telemetry::Telemetry;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const MODEL: &str = "gpt-4o-mini";

fn metrics(server: &Proc) -> String {
    http().get(format!("{}/metrics", server.url)).send().unwrap().text().unwrap()
}

fn control(sim: &Proc, path: &str, body: Value) {
    let r = http().post(format!("{}{path}", sim.url)).json(&body).send().unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.text().unwrap_or_default());
}

fn sim_attempts(sim: &Proc) -> BTreeMap<String, u64> {
    http().get(format!("{}/_sim/attempts", sim.url)).send().unwrap().json().unwrap()
}

/// The serve config's `[[orgs]]` with a short client timeout, so a 10 s
/// stall is a timeout and a retry rather than just a slow call.
fn serve_config(
    dir: &std::path::Path,
    sim_url: &str,
    orgs: &[OrgSpec],
    workers: &str,
    timeout_secs: u64,
) -> std::path::PathBuf {
    let path = write_serve_config(dir, sim_url, orgs, workers);
    let text =
        std::fs::read_to_string(&path).unwrap().replace("timeout_secs = 20", &format!("timeout_secs = {timeout_secs}"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Keeps `keep` jobs of `steps` steps unfinished by submitting more as
/// others finish (`finished` remembers which did).
fn top_up(server: &Proc, ids: &mut Vec<String>, finished: &mut BTreeSet<String>, keep: usize, steps: usize) {
    for id in ids.iter() {
        if finished.contains(id) {
            continue;
        }
        let d = get(&format!("{}/v1/jobs/{id}", server.url), TENANT_A_KEY).1;
        if matches!(d["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            finished.insert(id.clone());
        }
    }
    for _ in ids.len() - finished.len()..keep {
        let (status, body) =
            submit(&server.url, TENANT_A_KEY, &chain_spec(&format!("faults-{}", ids.len()), steps, 16));
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
}

/// Samples `/metrics` every 200 ms on a thread until dropped.
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(Duration, String)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, out) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let client = http();
            while !s.load(Ordering::Relaxed) {
                if let Ok(text) = client.get(format!("{url}/metrics")).send().and_then(|r| r.text()) {
                    out.lock().unwrap().push((t0.elapsed(), text));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Self { stop, samples, thread: Some(thread) }
    }

    /// The value of one series in every sample so far.
    fn series(&self, name: &str, labels: &str) -> Vec<(Duration, f64)> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(t, text)| sample(text, name, labels).map(|v| (*t, v)))
            .collect()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An unlabelled Prometheus sample `name` from a text exposition.
fn plain_sample(text: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
}

/// Submits `body` with `Idempotency-Key: key` until it is accepted: a
/// storage fault answers 503, and the client sends the same request again.
fn submit_until_accepted(server: &Proc, key: &str, body: &str) -> (String, u32) {
    for tries in 1..=30 {
        let r = http()
            .post(format!("{}/v1/jobs", server.url))
            .bearer_auth(TENANT_A_KEY)
            .header("Idempotency-Key", key)
            .body(body.to_owned())
            .send()
            .expect("POST");
        let status = r.status().as_u16();
        let doc: Value = r.json().unwrap_or(Value::Null);
        match status {
            200 | 202 => return (doc["id"].as_str().expect("an id").to_string(), tries),
            503 => std::thread::sleep(Duration::from_millis(50)),
            _ => panic!("submission {key}: {status} {doc}"),
        }
    }
    panic!("submission {key} was refused 30 times")
}

/// Issue 15's storm through a real `ratepool serve`: the drill setting
/// wraps its SQLite store in the fault injector (2 % of writes failing,
/// 1.5 % throttled, 1.5 % landing and losing their answer, 2 % of calls
/// stalling 1.5 s, longer than the 1 s renewal of a 3 s lease). 40 chains
/// of 3 steps, submitted with an `Idempotency-Key` and sent again on 503.
#[test]
fn a_storage_fault_drill_through_serve_strands_nothing_and_calls_nothing_twice() {
    const JOBS: usize = 40;
    const STEPS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let orgs = [OrgSpec { name: "org-a", rpm: 100_000, tpm: 100_000_000 }];
    let sim = start_sim(dir.path(), &orgs, (20.0, 0.0, 1.0));
    let extra = "[workers]\nconcurrency = 8\nvisibility_timeout_secs = 3\n\
                 [drill.storage_faults]\nwrite_error = 0.02\nthrottle = 0.015\nlost_response = 0.015\n\
                 slow = 0.02\nslow_ms = 1500\nseed = 15\n";
    let cfg = write_serve_config(dir.path(), &sim.url, &orgs, extra);
    let server = start_server(dir.path(), &cfg, &orgs, "serve.log");
    let started = Instant::now();
    let mut ids = Vec::new();
    let mut resubmitted = 0;
    for n in 0..JOBS {
        let (id, tries) =
            submit_until_accepted(&server, &format!("drill-{n}"), &chain_spec(&format!("drill-{n}"), STEPS, 16));
        resubmitted += tries - 1;
        ids.push(id);
    }
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), JOBS, "one job per submission, however often it was sent");
    let docs = wait_all(&server.url, TENANT_A_KEY, &ids, Duration::from_secs(120));
    let took = started.elapsed();
    let mut usage_calls = 0;
    for d in &docs {
        assert_eq!((d["status"].as_str(), d["steps_done"].as_u64()), (Some("succeeded"), Some(STEPS as u64)), "{d}");
        usage_calls += d["usage"]["calls"].as_u64().unwrap_or(0);
    }
    let attempts = sim_attempts(&sim);
    let calls: u64 = attempts.values().sum();
    let twice: Vec<_> = attempts.iter().filter(|(_, n)| **n > 1).collect();
    assert_eq!(attempts.len(), JOBS * STEPS, "every step reached the provider");
    assert!(twice.is_empty(), "steps called again: {twice:?}");
    assert_eq!(usage_calls, calls, "the jobs' usage counts each call once");
    // The queue gauges are refreshed every few seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = metrics(&server);
        let queue: Vec<_> = ["ratepool_queue_visible", "ratepool_queue_in_flight", "ratepool_queue_dead_letters"]
            .iter()
            .map(|m| plain_sample(&text, m))
            .collect();
        if queue.iter().all(|v| *v == Some(0.0)) {
            break text;
        }
        assert!(Instant::now() < deadline, "left in the queue: {queue:?}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let injected =
        |kind: &str| sample(&text, "ratepool_drill_storage_faults", &format!("kind=\"{kind}\"")).unwrap_or(0.0) as u64;
    println!(
        "drill through serve: {JOBS} jobs x {STEPS} steps in {took:?}; {calls} provider calls; {resubmitted} \
         submissions sent again after a 503; injected {} errors, {} throttled, {} lost answers, {} stalls of 1.5 s \
         over {} writes applied",
        injected("write_error"),
        injected("throttled"),
        injected("lost_response"),
        injected("slow"),
        injected("writes_applied"),
    );
    for kind in ["write_error", "throttled", "lost_response", "slow"] {
        assert!(injected(kind) > 0, "no {kind} injected:\n{text}");
    }
}

#[test]
fn faults_stalls_and_an_outage_are_ridden_out_without_a_retry_storm() {
    const KEEP: usize = 20;
    const STEPS: usize = 10;
    const STEP_MAX_ATTEMPTS: u64 = 12;
    let dir = tempfile::tempdir().unwrap();
    let orgs = [
        OrgSpec { name: "org-a", rpm: 600, tpm: 1_000_000 },
        OrgSpec { name: "org-b", rpm: 600, tpm: 1_000_000 },
        OrgSpec { name: "org-c", rpm: 600, tpm: 1_000_000 },
    ];
    let sim = start_sim(dir.path(), &orgs, (50.0, 0.0, 1.0));
    let workers = format!(
        "[workers]\nconcurrency = 32\nstep_parallelism = 4\nvisibility_timeout_secs = 30\nstep_max_attempts = {STEP_MAX_ATTEMPTS}\n"
    );
    let cfg = serve_config(dir.path(), &sim.url, &orgs, &workers, 4);
    let server = start_server(dir.path(), &cfg, &orgs, "serve.log");
    control(
        &sim,
        "/_sim/faults",
        json!({"server_error_rate": 0.05, "drop_rate": 0.01, "stall_rate": 0.01, "stall_ms": 10_000}),
    );
    let sampler = Sampler::start(server.url.clone());
    let started = Instant::now();
    let breaker = |s: &Sampler| s.series("ratepool_org_breaker_state", "org=\"org-c\"");

    let (mut ids, mut finished) = (Vec::new(), BTreeSet::new());
    // Faults only, for a while; then org-c down for 30 s.
    while started.elapsed() < Duration::from_secs(8) {
        top_up(&server, &mut ids, &mut finished, KEEP, STEPS);
        std::thread::sleep(Duration::from_millis(500));
    }
    control(&sim, "/_sim/orgs/org-c", json!({"down": true}));
    let down_at = started.elapsed();
    while started.elapsed() < down_at + Duration::from_secs(30) {
        top_up(&server, &mut ids, &mut finished, KEEP, STEPS);
        std::thread::sleep(Duration::from_millis(500));
    }
    control(&sim, "/_sim/orgs/org-c", json!({"down": false}));
    let up_at = started.elapsed();

    // Traffic goes on until the breaker's probe finds org-c back (the
    // cool-down doubles up to 60 s while it fails). A probe sent after the
    // outage can still meet one of the injected faults (5 % 5xx, 1 % drops,
    // 1 % stalls), which doubles the cool-down once more: the last probe
    // before closing may come two 60 s cool-downs after org-c is back.
    // (Seen once on a loaded run: open 8.6 s to 128 s.)
    let closed_at = loop {
        top_up(&server, &mut ids, &mut finished, KEEP, STEPS);
        let s = breaker(&sampler);
        if let Some(&(t, _)) = s.iter().find(|(t, v)| *t > up_at && *v == 0.0) {
            break t;
        }
        assert!(started.elapsed() < up_at + Duration::from_secs(150), "org-c's breaker never closed: {s:?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let docs = wait_all(&server.url, TENANT_A_KEY, &ids, Duration::from_secs(120));
    for d in &docs {
        assert_eq!(d["status"], "succeeded", "{d}");
    }
    let text = metrics(&server);
    let series = breaker(&sampler);
    drop(sampler);

    // The breaker opened during the outage and closed after it.
    let open_at = series.iter().find(|(t, v)| *t >= down_at && *v == 2.0).map(|(t, _)| *t);
    assert!(open_at.is_some_and(|t| t <= up_at), "org-c's breaker was not seen open during the outage: {series:?}");
    let opened = sample(&text, "ratepool_org_breaker_opened_total", "org=\"org-c\"").unwrap_or(0.0);
    assert!(opened >= 1.0, "org-c's breaker never opened:\n{text}");
    assert_eq!(sample(&text, "ratepool_org_breaker_state", "org=\"org-c\""), Some(0.0), "closed at the end");

    // The provider's view: faults injected, 429s, calls per step.
    let stats = sim_stats(&sim);
    let total = stats["total_calls"].as_u64().unwrap();
    let sum =
        |field: &str| -> u64 { stats["orgs"].as_object().unwrap().values().map(|o| o[field].as_u64().unwrap()).sum() };
    let (server_errors, dropped, stalled, rate_limited) = (
        sum("server_errors"),
        sum("dropped"),
        sum("stalled"),
        sum("rate_limited_requests") + sum("rate_limited_tokens"),
    );
    let unavailable_total = stats["orgs"]["org-c"]["unavailable"].as_u64().unwrap();
    assert!(server_errors > 0 && dropped > 0 && stalled > 0, "faults not injected: {stats}");
    assert!(rate_limited * 200 <= total, "429s on {rate_limited} of {total} calls (over 0.5%)");

    let steps = (ids.len() * STEPS) as u64;
    let attempts = sim_attempts(&sim);
    let accepted = sim_requests(&sim);
    let max_attempts = attempts.values().copied().max().unwrap_or(0);
    let max_accepted = accepted.values().copied().max().unwrap_or(0);
    let mean = total as f64 / steps as f64;
    // A step makes at most `step_max_attempts` transient failures; 429s
    // (re-routes) come on top.
    assert!(max_attempts <= STEP_MAX_ATTEMPTS + rate_limited, "a step was sent {max_attempts} times");
    assert!(mean <= 1.3, "{total} calls for {steps} steps: a retry storm");
    // The dead org was asked by the calls already on their way when it went
    // down (≤ one per running job), the breaker's threshold (5) and one
    // probe per cool-down (2, 4, 8, 16, 32 s: ≤ 6 in 30 s and after).
    assert!(unavailable_total <= (KEEP + 5 + 6) as u64, "org-c was asked {unavailable_total} times while down");
    let timeouts: f64 = ["org-a", "org-b", "org-c"]
        .iter()
        .filter_map(|o| {
            sample(
                &text,
                "ratepool_provider_calls_total",
                &format!("org=\"{o}\",model=\"{MODEL}\",outcome=\"timeout\""),
            )
        })
        .sum();
    assert!(timeouts >= 1.0 || stalled == 0, "stalls past the client timeout must show as timeouts:\n{text}");

    println!(
        "faults: {} jobs, {steps} steps, {total} calls ({mean:.3} per step; max {max_attempts} sent and {max_accepted} accepted for one step); \
         injected: {server_errors} 5xx, {dropped} dropped, {stalled} stalls of 10 s ({timeouts} client timeouts), \
         {unavailable_total} 503s from org-c while down; 429s: {rate_limited} ({:.3}%); \
         org-c breaker opened {opened} times, down at {:.1}s, back at {:.1}s, breaker closed at {:.1}s ({:.1}s after)",
        ids.len(),
        rate_limited as f64 * 100.0 / total as f64,
        down_at.as_secs_f64(),
        up_at.as_secs_f64(),
        closed_at.as_secs_f64(),
        (closed_at - up_at).as_secs_f64(),
    );
}

#[test]
fn an_org_out_of_quota_mid_run_leaves_the_rotation_and_the_jobs_finish_elsewhere() {
    const JOBS: usize = 16;
    // Long enough (about 4 s of chains) that the flip after org-b's 20th
    // call lands well before the last step: with 12 steps a loaded machine
    // could see the 20th call only as the jobs finished, and no call was
    // left to meet the billing error.
    const STEPS: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let orgs = [
        OrgSpec { name: "org-a", rpm: 100_000, tpm: 10_000_000 },
        OrgSpec { name: "org-b", rpm: 100_000, tpm: 10_000_000 },
        OrgSpec { name: "org-c", rpm: 100_000, tpm: 10_000_000 },
    ];
    let sim = start_sim(dir.path(), &orgs, (100.0, 0.0, 1.0));
    let cfg = serve_config(dir.path(), &sim.url, &orgs, "[workers]\nconcurrency = 32\n", 20);
    let server = start_server(dir.path(), &cfg, &orgs, "serve.log");
    let ids: Vec<String> = (0..JOBS)
        .map(|n| {
            let (status, body) = submit(&server.url, TENANT_A_KEY, &chain_spec(&format!("quota-{n}"), STEPS, 16));
            assert_eq!(status, 202, "{body}");
            body["id"].as_str().unwrap().to_string()
        })
        .collect();
    let gauge = |text: &str| sample(text, "ratepool_org_out_of_rotation", "org=\"org-b\"");
    assert_eq!(gauge(&metrics(&server)), Some(0.0));

    // Well into the chains, org-b's billing runs out.
    let start = Instant::now();
    while sim_stats(&sim)["orgs"]["org-b"]["accepted_calls"].as_u64().unwrap() < 20 {
        assert!(start.elapsed() < Duration::from_secs(60), "no traffic on org-b");
        std::thread::sleep(Duration::from_millis(50));
    }
    control(&sim, "/_sim/orgs/org-b", json!({"insufficient_quota": true}));
    let accepted_at_flip = sim_stats(&sim)["orgs"]["org-b"]["accepted_calls"].as_u64().unwrap();
    let start = Instant::now();
    while gauge(&metrics(&server)) != Some(1.0) {
        assert!(start.elapsed() < Duration::from_secs(30), "org-b never reported out of rotation");
        std::thread::sleep(Duration::from_millis(100));
    }

    let docs = wait_all(&server.url, TENANT_A_KEY, &ids, Duration::from_secs(120));
    for d in &docs {
        assert_eq!(d["status"], "succeeded", "{d}");
    }
    let stats = sim_stats(&sim);
    let b = &stats["orgs"]["org-b"];
    // Nothing was admitted on org-b after the flip; only calls already on
    // their way (one per running job at most) met the billing error.
    assert_eq!(b["accepted_calls"].as_u64(), Some(accepted_at_flip), "{b}");
    let refused = b["insufficient_quota"].as_u64().unwrap();
    assert!((1..=JOBS as u64).contains(&refused), "org-b answered insufficient_quota {refused} times");
    let elsewhere: u64 = ["org-a", "org-c"].iter().map(|o| stats["orgs"][o]["accepted_calls"].as_u64().unwrap()).sum();
    assert_eq!(elsewhere + accepted_at_flip, (JOBS * STEPS) as u64, "{stats}");

    // Reported: the gauge, `/v1/usage` with the reason, and the log.
    assert_eq!(gauge(&metrics(&server)), Some(1.0));
    let (status, usage) = get(&format!("{}/v1/usage", server.url), TENANT_A_KEY);
    assert_eq!(status, 200, "{usage}");
    let org_b = usage["orgs"].as_array().unwrap().iter().find(|o| o["org"] == "org-b").unwrap();
    assert_eq!(org_b["state"], "out_of_rotation", "{org_b}");
    assert!(org_b["out_of_rotation"]["reason"].as_str().unwrap().contains("insufficient_quota"), "{org_b}");
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("org taken out of rotation")
            && l.contains("org-b")
            && l.contains("insufficient_quota")),
        "no log line for org-b leaving the rotation"
    );
    println!(
        "insufficient quota: org-b out of rotation after {accepted_at_flip} calls, {refused} calls refused, \
         the other {elsewhere} calls on org-a and org-c; {JOBS} jobs succeeded"
    );
}

/// A router over an in-process simulator, on the system clock, with a
/// SQLite ledger: two orgs, `org-s` the one that will be told to slow down.
async fn slow_down_harness(
    rpm: u64,
    policy: SlowDownPolicy,
) -> (Simulator, String, Arc<Router>, Arc<Telemetry>, tempfile::TempDir, tokio::sync::oneshot::Sender<()>) {
    let names = ["org-a", "org-s"];
    let key = |n: &str| format!("sk-test-{n}-0123456789");
    let mut sim_toml = String::from("[latency]\ntime_scale = 0\n");
    let mut cfg = String::new();
    for n in names {
        sim_toml.push_str(&format!(
            "[[orgs]]\nname = \"{n}\"\napi_key = \"{}\"\nmodels.\"{MODEL}\" = {{ rpm = {rpm}, tpm = 10000000 }}\n",
            key(n)
        ));
        cfg.push_str(&format!(
            "[[orgs]]\nname = \"{n}\"\napi_key_env = \"UNUSED\"\ntimeout_secs = 5\nmodels.\"{MODEL}\" = {{ rpm = {rpm}, tpm = 10000000 }}\n"
        ));
    }
    cfg.push_str("[[tenants]]\nname = \"t\"\napi_key_env = \"UNUSED_TENANT\"\n");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let sim = Simulator::new(SimConfig::from_toml(&sim_toml).unwrap(), clock.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(ratepool::sim::serve(listener, sim.clone(), async move {
        let _ = stopped.await;
    }));
    let cfg = Config::parse(&cfg).unwrap();
    let orgs: Vec<OrgSettings> = cfg
        .orgs
        .iter()
        .map(|o| o.settings(format!("{base}/v1"), SecretString::from(key(o.name.get_ref().as_str()))))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let ledger = SqliteBackend::open(
        &dir.path().join("ledger.db"),
        SqliteOptions { visibility_timeout: Duration::from_secs(30), clock: clock.clone() },
    )
    .unwrap()
    .backend()
    .ledger;
    let telemetry = Arc::new(Telemetry::new());
    let router =
        Router::new(orgs, ledger, ProviderClient::new().unwrap(), clock, telemetry.clone(), RetryPolicy::default())
            .with_slow_down(policy);
    (sim, base, Arc::new(router), telemetry, dir, stop)
}

/// Calls sent to org-s (accepted + slowed down).
fn sent_to_org_s(sim: &Simulator) -> u64 {
    let o = &sim.stats().orgs["org-s"];
    o.accepted_calls + o.slowed_down
}

/// Calls per second sent to org-s over the next `secs` seconds.
async fn rate_over(sim: &Simulator, secs: u64) -> f64 {
    let before = sent_to_org_s(sim);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    (sent_to_org_s(sim) - before) as f64 / secs as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_org_that_says_slow_down_gets_a_lower_rate_that_recovers() {
    // 300 a minute per org: 5 calls/s each once the first minute's burst is
    // spent. org-s is then told to slow down to 60 a minute.
    const RPM: u64 = 300;
    let policy = SlowDownPolicy {
        decrease: 0.5,
        floor: 0.1,
        hold: Duration::from_secs(1),
        increase: 0.1,
        increase_every: Duration::from_secs(1),
    };
    let (sim, base, router, telemetry, _dir, _stop) = slow_down_harness(RPM, policy).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let control = |body: Value| {
        let (http, url) = (http.clone(), format!("{base}/_sim/orgs/org-s"));
        async move { assert!(http.post(url).json(&body).send().await.unwrap().status().is_success()) }
    };

    // Saturating demand: eight callers, each sending its next call as soon
    // as the last one returns.
    let done = CancellationToken::new();
    let mut callers = Vec::new();
    for c in 0..8 {
        let (router, done) = (router.clone(), done.clone());
        callers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !done.is_cancelled() {
                let req = CallRequest {
                    tenant: TenantId::parse("t").unwrap(),
                    request: ProviderRequest::user_prompt(
                        &ModelName::parse(MODEL).unwrap(),
                        &format!("caller {c} call {n}"),
                        10,
                    ),
                    request_id: format!("c{c}/n{n}"),
                    gate: None,
                    yield_to_tenant_quota: false,
                    routing: Default::default(),
                    max_wait: None,
                };
                tokio::select! {
                    r = router.call(&req, &done) => if !done.is_cancelled() { r.unwrap(); },
                    _ = done.cancelled() => {}
                }
                n += 1;
            }
        }));
    }
    let factor = || {
        sample(&telemetry.render(), "ratepool_org_rate_factor", &format!("org=\"org-s\",model=\"{MODEL}\""))
            .unwrap_or(-1.0)
    };

    // The first minute's burst goes at once; then the steady rate.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let full = rate_over(&sim, 5).await;
    assert_eq!(factor(), 1.0);

    control(json!({"slow_down_rpm": 60})).await;
    let t = Instant::now();
    let mut lowest: f64 = 1.0;
    while t.elapsed() < Duration::from_secs(4) {
        lowest = lowest.min(factor());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let slowed_before = sim.stats().orgs["org-s"].slowed_down;
    let accepted_before = sim.stats().orgs["org-s"].accepted_calls;
    let slowed_rate = rate_over(&sim, 10).await;
    let org_s = sim.stats().orgs["org-s"].clone();
    let (slow_downs, accepted_slowed) = (org_s.slowed_down - slowed_before, org_s.accepted_calls - accepted_before);
    lowest = lowest.min(factor());

    control(json!({"slow_down_rpm": null})).await;
    let cleared = Instant::now();
    while factor() < 1.0 {
        assert!(cleared.elapsed() < Duration::from_secs(30), "the rate factor stayed at {}", factor());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovery = cleared.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let recovered = rate_over(&sim, 5).await;
    done.cancel();
    for c in callers {
        c.await.unwrap();
    }

    println!(
        "slow-down: org-s sent {full:.1} calls/s at the full rate, {slowed_rate:.1}/s while slowed to 1/s \
         ({slow_downs} slow-down answers, {accepted_slowed} accepted in 10 s), {recovered:.1}/s after; \
         factor down to {lowest:.3}, back to 1 in {:.1} s",
        recovery.as_secs_f64()
    );
    assert!(full >= 3.5, "org-s not saturated at the start: {full:.1}/s");
    assert!(lowest <= 0.5, "the factor never dropped: {lowest}");
    assert!(slowed_rate <= full * 0.5, "org-s still sent {slowed_rate:.1}/s of {full:.1}/s while slowed");
    // At the full rate org-s would have had ~4/5 of its calls refused: the
    // router must not keep sending them, only probe now and then.
    assert!(
        slow_downs as f64 <= full * 10.0 * 0.3,
        "{slow_downs} slow-down answers in 10 s ({accepted_slowed} accepted): still hammering"
    );
    assert!(recovered >= full * 0.7, "org-s back at only {recovered:.1}/s of {full:.1}/s");
    assert_eq!(sim.stats().orgs["org-a"].slowed_down, 0);
}
