//! Load on the submit path of the one-machine server (`ratepool serve` as a
//! real process, workers running the jobs meanwhile): 2,000 one-step jobs
//! from 32 concurrent clients, each with an `Idempotency-Key`. Every key is
//! accepted exactly once although clients retry: all 32 clients race on the
//! same 16 keys, and each client re-sends about 10% of its submissions
//! (same key, same body → the first job, replayed) and reuses some keys with
//! another body (422 naming `Idempotency-Key`, nothing stored). At the end
//! the server holds exactly 2,000 distinct jobs, each readable by its id.
//!
//! Prints p50/p99 submit latency (not asserted: this is a shared debug
//! build) and the server's resident memory after 500 and 2,000 accepted
//! jobs, whose growth is bounded generously to catch a leak.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const JOBS: usize = 2_000;
const CLIENTS: usize = 32;
/// Keys every client submits at the same moment.
const RACED: usize = 16;
/// RSS growth between 500 and 2,000 accepted jobs that counts as a leak.
const MAX_GROWTH_KB: u64 = 50 * 1024;

fn spec(i: usize) -> String {
    json!({
        "name": format!("load-{i}"),
        "defaults": {"model": "gpt-4o-mini", "max_tokens": 4},
        "steps": [{"id": "s", "messages": [{"role": "user", "content": format!("Say {i}.")}]}]
    })
    .to_string()
}

fn key(i: usize) -> String {
    format!("load-{i:05}")
}

fn vm_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One submission's answer.
struct Sent {
    status: u16,
    id: Option<String>,
    replayed: bool,
    field: Option<String>,
    latency: Duration,
}

fn send(client: &reqwest::blocking::Client, url: &str, i: usize, body: &str) -> Sent {
    let start = Instant::now();
    let r = client
        .post(url)
        .bearer_auth(TENANT_A_KEY)
        .header("idempotency-key", key(i))
        .body(body.to_string())
        .send()
        .expect("POST /v1/jobs");
    let status = r.status().as_u16();
    let replayed = r.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    let v: Value = r.json().unwrap_or(Value::Null);
    let latency = start.elapsed();
    Sent {
        status,
        id: v["id"].as_str().map(String::from),
        replayed,
        field: v["error"]["field"].as_str().map(String::from),
        latency,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[test]
fn two_thousand_submissions_from_32_clients_are_each_accepted_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [OrgSpec { name: "org-a", rpm: 10_000_000, tpm: 10_000_000_000 }];
    let sim = start_sim(dir.path(), &orgs, (1.0, 0.0, 1.0));
    let cfg = write_serve_config(dir.path(), &sim.url, &orgs, "");
    let server = start_server(dir.path(), &cfg, &orgs, "serve.log");
    let pid = server.child.id();
    let url = format!("{}/v1/jobs", server.url);
    let rss_start = vm_rss_kb(pid);

    // Every answer, by job index: (first id seen, answers).
    let ids: Arc<Mutex<BTreeMap<usize, Vec<Sent>>>> = Arc::default();
    let accepted = Arc::new(AtomicUsize::new(0));
    let rss_at = Arc::new(Mutex::new(BTreeMap::new()));
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let started = Instant::now();

    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (url, ids, accepted, rss_at, barrier) =
                (url.clone(), ids.clone(), accepted.clone(), rss_at.clone(), barrier.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
                let record = |i: usize, s: Sent| {
                    if s.status == 202 && !s.replayed {
                        // The n-th new job: sample the server's memory at 500 and 2,000.
                        let n = accepted.fetch_add(1, Ordering::SeqCst) + 1;
                        if n == 500 || n == JOBS {
                            rss_at.lock().unwrap().insert(n, vm_rss_kb(pid));
                        }
                    }
                    ids.lock().unwrap().entry(i).or_default().push(s);
                };
                // Phase 1: all clients submit the same few keys at once.
                barrier.wait();
                for i in 0..RACED {
                    record(i, send(&client, &url, i, &spec(i)));
                }
                // Phase 2: this client's share of the rest, with retries.
                for i in (RACED..JOBS).filter(|i| i % CLIENTS == c) {
                    let body = spec(i);
                    record(i, send(&client, &url, i, &body));
                    if i % 10 == 3 {
                        // The answer "was lost": the same request again.
                        record(i, send(&client, &url, i, &body));
                    }
                    if i % 50 == 7 {
                        // A client bug: the key reused for another job.
                        record(i, send(&client, &url, i, &spec(i + 1_000_000)));
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    let elapsed = started.elapsed();
    let rss_end = vm_rss_kb(pid);

    let answers = Arc::try_unwrap(ids).ok().unwrap().into_inner().unwrap();
    assert_eq!(answers.len(), JOBS, "every job index was submitted");
    let mut distinct = BTreeSet::new();
    let (mut created, mut replays, mut conflicts, mut posts) = (0, 0, 0, 0);
    let mut latencies = Vec::new();
    for (i, sent) in &answers {
        let mut first_id: Option<&str> = None;
        let mut new_here = 0;
        for s in sent {
            posts += 1;
            latencies.push(s.latency);
            match s.status {
                202 => {
                    let id = s.id.as_deref().expect("202 has an id");
                    assert!(first_id.is_none_or(|f| f == id), "key {} gave two jobs: {first_id:?} and {id}", key(*i));
                    first_id = Some(id);
                    if s.replayed {
                        replays += 1;
                    } else {
                        new_here += 1;
                    }
                }
                422 => {
                    assert_eq!(s.field.as_deref(), Some("Idempotency-Key"), "key {}", key(*i));
                    conflicts += 1;
                }
                other => panic!("key {}: status {other}", key(*i)),
            }
        }
        assert_eq!(new_here, 1, "key {}: {new_here} answers claimed to create the job", key(*i));
        created += 1;
        distinct.insert(first_id.expect("an id").to_string());
    }
    assert_eq!(distinct.len(), JOBS, "distinct job ids");
    assert_eq!(created, JOBS);
    let expected_retries = (RACED..JOBS).filter(|i| i % 10 == 3).count() + RACED * (CLIENTS - 1);
    assert_eq!(replays, expected_retries, "every retry replayed the first job");
    assert_eq!(conflicts, (RACED..JOBS).filter(|i| i % 50 == 7).count());

    // The server's own view: 2,000 jobs, one per key, each readable.
    let db = rusqlite::Connection::open(dir.path().join("ratepool.db")).unwrap();
    let one = |sql: &str| db.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
    assert_eq!(one("SELECT COUNT(*) FROM jobs"), JOBS as i64, "jobs stored");
    assert_eq!(one("SELECT COUNT(DISTINCT idempotency_key) FROM jobs"), JOBS as i64);
    let client = http();
    for id in &distinct {
        let r = client.get(format!("{}/v1/jobs/{id}", server.url)).bearer_auth(TENANT_A_KEY).send().unwrap();
        assert_eq!(r.status().as_u16(), 200, "job {id}");
        assert_eq!(r.json::<Value>().unwrap()["id"], id.as_str());
    }

    latencies.sort();
    let (p50, p99) = (percentile(&latencies, 0.50), percentile(&latencies, 0.99));
    let rss = rss_at.lock().unwrap().clone();
    let (at_500, at_2000) = (rss[&500], rss[&JOBS]);
    println!(
        "load_submit: {posts} POSTs ({JOBS} created, {replays} idempotent replays, {conflicts} key-reuse 422s) \
         from {CLIENTS} clients in {:.1} s ({:.0}/s); submit latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
         server VmRSS {} MB at start, {} MB at 500 jobs, {} MB at {JOBS}, {} MB after; growth 500→{JOBS}: {:+} kB",
        elapsed.as_secs_f64(),
        posts as f64 / elapsed.as_secs_f64(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
        rss_start / 1024,
        at_500 / 1024,
        at_2000 / 1024,
        rss_end / 1024,
        at_2000 as i64 - at_500 as i64,
    );
    assert!(
        at_2000.saturating_sub(at_500) < MAX_GROWTH_KB,
        "server memory grew {} kB between 500 and {JOBS} jobs",
        at_2000 - at_500
    );
    drop(sim);
}
