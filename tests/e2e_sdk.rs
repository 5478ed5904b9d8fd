//! The official OpenAI SDKs against the Calls door: the Python SDK (pinned
//! in `infra/requirements-test.txt`, run from the test venv) and the Node
//! SDK (pinned in `tests/sdk/node/package-lock.json`), each given only a
//! base URL and a tenant key, against `ratepool serve` and `ratepool sim`
//! as real processes. `make test` installs both SDKs (`infra/test.sh`).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::pool::{Pool, PoolSpec};
use common::{OrgSpec, TENANT_A_KEY};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The test venv's Python (`RATEPOOL_VENV`, as `infra/moto.sh` uses it).
fn python() -> PathBuf {
    let venv = std::env::var("RATEPOOL_VENV").map(PathBuf::from).unwrap_or_else(|_| repo().join(".venv"));
    let venv = if venv.is_absolute() { venv } else { repo().join(venv) };
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} does not exist: run `make test` (infra/test.sh installs the test venv with the openai SDK)",
        python.display()
    );
    python
}

fn node_dir() -> PathBuf {
    let dir = repo().join("tests/sdk/node");
    assert!(
        dir.join("node_modules/openai").exists(),
        "the Node SDK is not installed: run `make test` (or `npm ci` in {})",
        dir.display()
    );
    dir
}

enum Sdk {
    Python,
    Node,
}

/// Runs a scenario of the SDK's script against `pool` as tenant alpha and
/// returns its stdout, failing the test with the script's stderr if it
/// exits non-zero.
fn run(sdk: &Sdk, pool: &Pool, args: &[&str]) -> String {
    let mut cmd = match sdk {
        Sdk::Python => {
            let mut c = Command::new(python());
            c.arg(repo().join("tests/sdk/openai_sdk.py"));
            c
        }
        Sdk::Node => {
            let mut c = Command::new("node");
            c.arg(node_dir().join("openai_sdk.mjs"));
            c
        }
    };
    let out = cmd
        .args(args)
        .env("RATEPOOL_BASE_URL", pool.v1())
        .env("RATEPOOL_API_KEY", TENANT_A_KEY)
        // The SDKs must not pick up a developer's own settings.
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_API_KEY")
        .output()
        .expect("run the SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn pool(orgs: &[OrgSpec], latency: (f64, f64)) -> Pool {
    Pool::start(PoolSpec { orgs, latency, extra: "", alpha_quota: "" })
}

fn basic(sdk: Sdk) {
    let orgs = [OrgSpec { name: "org-a", rpm: 600, tpm: 100_000 }, OrgSpec { name: "org-b", rpm: 600, tpm: 100_000 }];
    let pool = pool(&orgs, (10.0, 0.2));
    run(&sdk, &pool, &["basic"]);
    // What the script did reached the pool: 6 calls made (3 chat, 1
    // embeddings), 2 refused before any org.
    assert_eq!(pool.sim_stats()["total_calls"], 4);
    assert_eq!(pool.metric("ratepool_calls_total", &["outcome=\"invalid\""]), 2.0);
}

#[test]
fn the_python_sdk_calls_the_pool() {
    basic(Sdk::Python);
}

#[test]
fn the_node_sdk_calls_the_pool() {
    basic(Sdk::Node);
}

/// One org of 100 tokens a second: the script's second call waits about
/// 3 s for capacity, more than its 0.2 s, so it gets a 429 and the SDK
/// retries after the `retry-after` it was given.
fn retry(sdk: Sdk) {
    let pool = pool(&[OrgSpec { name: "org-a", rpm: 600, tpm: 6_000 }], (10.0, 0.0));
    let out = run(&sdk, &pool, &["retry"]);
    let summary: Value = serde_json::from_str(out.trim()).expect("the script's summary");
    let elapsed = summary["elapsed_s"].as_f64().unwrap();
    assert!(elapsed > 1.5, "the retry waited for capacity: {summary}");
    assert!(pool.metric("ratepool_calls_total", &["outcome=\"no_capacity\""]) >= 1.0);
    assert_eq!(pool.metric("ratepool_calls_total", &["outcome=\"ok\""]), 2.0);
    assert_eq!(pool.provider_429s(), 0, "the provider never refused a call");
}

#[test]
fn the_python_sdk_retries_a_429_from_the_pool_after_its_retry_after() {
    retry(Sdk::Python);
}

#[test]
fn the_node_sdk_retries_a_429_from_the_pool_after_its_retry_after() {
    retry(Sdk::Node);
}

fn steps(stdout: &str) -> Vec<Value> {
    stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line per step")).collect()
}

/// An application runs three calls of a chain, then crashes; ratepool is
/// SIGKILLed too. The application runs its chain again from the start:
/// the three finished calls come back from the store, with no provider
/// call, and the chain goes on.
fn resume(sdk: Sdk, job: &str) {
    let mut pool = pool(&[OrgSpec { name: "org-a", rpm: 600, tpm: 100_000 }], (10.0, 0.2));
    let first = steps(&run(&sdk, &pool, &["chain", job, "3"]));
    assert!(first.iter().all(|s| s["replayed"] == false), "{first:?}");
    pool.kill_and_restart_server();
    let second = steps(&run(&sdk, &pool, &["chain", job, "5"]));
    assert_eq!(second.len(), 5);
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(b["replayed"], true, "step {} was replayed", b["step"]);
        assert_eq!(a["content"], b["content"], "step {} came back as it was", b["step"]);
    }
    assert!(second[3..].iter().all(|s| s["replayed"] == false), "{second:?}");
    let attempts = pool.attempts();
    for step in 1..=5 {
        assert_eq!(attempts.get(&format!("call/alpha/{job}/step-{step}")), Some(&1), "{attempts:?}");
    }
    assert_eq!(pool.sim_stats()["total_calls"], 5, "the replayed calls reached no org");
}

#[test]
fn a_python_chain_resumes_from_the_store_after_a_crash() {
    resume(Sdk::Python, "py-job-1");
}

#[test]
fn a_node_chain_resumes_from_the_store_after_a_crash() {
    resume(Sdk::Node, "node-job-1");
}

/// 20 SDK clients each run a 15-call chain over 3 orgs whose token limits
/// are the scarce resource (the workload of BENCHMARKS.md's figure 1, cut
/// down to finish in about 20 s). No call may fail and at most 0.1% of the
/// provider calls may be answered 429. The makespan is printed beside the
/// lower bound BENCHMARKS.md uses; the benchmark, not this test, judges it.
#[test]
fn twenty_sdk_clients_saturate_three_orgs_and_no_call_fails() {
    let orgs = [
        OrgSpec { name: "org-a", rpm: 1_000, tpm: 6_400 },
        OrgSpec { name: "org-b", rpm: 1_000, tpm: 6_400 },
        OrgSpec { name: "org-c", rpm: 1_000, tpm: 6_400 },
    ];
    // The benchmark's provider: 50 ms + 1 ms per output token.
    let pool = pool(&orgs, (50.0, 1.0));
    let (clients, chain) = (20u64, 15u64);
    let out = run(&Sdk::Node, &pool, &["saturate", &clients.to_string(), &chain.to_string()]);
    let summary: Value = serde_json::from_str(out.trim()).expect("the script's summary");
    assert_eq!(summary["failed"], 0, "{summary}");
    let stats = pool.sim_stats();
    let o = stats["orgs"].as_object().unwrap();
    let sum = |f: &str| o.values().map(|v| v[f].as_u64().unwrap_or(0)).sum::<u64>();
    let (accepted, charged) = (sum("accepted_calls"), sum("charged_tokens"));
    assert_eq!(accepted, clients * chain, "every call reached an org once");
    let refused = pool.provider_429s();
    assert!(refused * 1000 <= accepted, "{refused} of {accepted} provider calls were answered 429");

    // BENCHMARKS.md's lower bound: a whole minute's burst, then the refill.
    let n = orgs.len() as f64;
    let (tpm, rpm) = (6_400.0 * n, 1_000.0 * n);
    let tokens_bound = (charged as f64 - tpm).max(0.0) / (tpm / 60.0);
    let requests_bound = (accepted as f64 - rpm).max(0.0) / (rpm / 60.0);
    let latency_bound = chain as f64 * 0.09;
    let bound = tokens_bound.max(requests_bound).max(latency_bound);
    let makespan = summary["makespan_s"].as_f64().unwrap();
    println!(
        "saturation: {accepted} calls, {charged} tokens charged, {refused} answered 429; makespan {makespan:.2} s, \
         bound {bound:.2} s (tokens {tokens_bound:.2} / requests {requests_bound:.2} / chain {latency_bound:.2}), \
         utilization {:.1}%",
        100.0 * bound / makespan
    );
    assert_eq!(pool.metric("ratepool_calls_total", &["outcome=\"ok\""]), (clients * chain) as f64);
}
