//! Crash: the server is SIGKILLed while jobs are mid-chain and started
//! again. Every job must succeed, no checkpointed step may be called again,
//! and the outputs must equal those of a run without a crash.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ratepool::domain::{JobId, SystemClock};
use ratepool::local::{SqliteBackend, SqliteOptions};
use serde_json::Value;

const JOBS: usize = 6;

fn submit_all(url: &str) -> Vec<String> {
    (0..JOBS)
        .map(|n| {
            let (status, body) = submit(url, TENANT_A_KEY, &screenplay(n));
            assert_eq!(status, 202, "{body}");
            body["id"].as_str().unwrap().to_string()
        })
        .collect()
}

fn outputs(url: &str, ids: &[String]) -> Vec<Value> {
    ids.iter()
        .map(|id| {
            let (status, body) = get(&format!("{url}/v1/jobs/{id}/result"), TENANT_A_KEY);
            assert_eq!(status, 200, "{body}");
            body["outputs"].clone()
        })
        .collect()
}

#[test]
fn a_killed_server_resumes_every_job_without_repeating_finished_steps() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [
        OrgSpec { name: "org-a", rpm: 100_000, tpm: 100_000_000 },
        OrgSpec { name: "org-b", rpm: 100_000, tpm: 100_000_000 },
    ];
    // Slow enough calls that the kill lands mid-chain.
    let sim = start_sim(dir.path(), &orgs, (100.0, 0.5, 1.0));
    // Short visibility/lease so the restarted server picks the jobs up fast.
    let workers = "[workers]\nconcurrency = 16\nstep_parallelism = 4\nvisibility_timeout_secs = 3\n";
    let cfg = write_serve_config(dir.path(), &sim.url, &orgs, workers);
    let mut server = start_server(dir.path(), &cfg, &orgs, "serve-1.log");
    let ids = submit_all(&server.url);

    // Wait until the jobs are well into their chains, then kill -9.
    let start = Instant::now();
    loop {
        let done: u64 = ids
            .iter()
            .map(|id| get(&format!("{}/v1/jobs/{id}", server.url), TENANT_A_KEY).1["steps_done"].as_u64().unwrap_or(0))
            .sum();
        if done >= (JOBS * 12) as u64 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "jobs made no progress");
        std::thread::sleep(Duration::from_millis(100));
    }
    server.kill();

    // What was checkpointed at the moment of the kill.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let checkpointed: BTreeMap<String, Vec<String>> = rt.block_on(async {
        let db = SqliteBackend::open(
            &dir.path().join("ratepool.db"),
            SqliteOptions { visibility_timeout: Duration::from_secs(3), clock: Arc::new(SystemClock) },
        )
        .unwrap()
        .backend();
        let mut out = BTreeMap::new();
        for id in &ids {
            let cps = db.jobs.checkpoints(&JobId::parse(id.as_str()).unwrap()).await.unwrap();
            out.insert(id.clone(), cps.into_iter().map(|c| c.step.to_string()).collect());
        }
        out
    });
    let at_kill: usize = checkpointed.values().map(Vec::len).sum();
    assert!(at_kill >= JOBS * 12, "checkpoints at kill: {at_kill}");

    let server = start_server(dir.path(), &cfg, &orgs, "serve-2.log");
    let docs = wait_all(&server.url, TENANT_A_KEY, &ids, Duration::from_secs(240));
    for d in &docs {
        assert_eq!(d["status"], "succeeded", "{d}");
    }
    assert!(
        docs.iter().any(|d| d["steps_done"].as_u64().unwrap() as usize > checkpointed[d["id"].as_str().unwrap()].len()),
        "the kill must have happened before the jobs finished"
    );

    let counts = sim_requests(&sim);
    for (job, steps) in &checkpointed {
        for step in steps {
            assert_eq!(
                counts.get(&format!("{job}/{step}")),
                Some(&1),
                "step {job}/{step} was finished before the kill and called again"
            );
        }
    }
    let crashed = outputs(&server.url, &ids);
    for (job, outs) in ids.iter().zip(&crashed) {
        for step in outs.as_object().unwrap().keys() {
            assert!(counts.get(&format!("{job}/{step}")).copied().unwrap_or(0) >= 1);
        }
    }
    // At most the calls in flight at the kill were repeated.
    let repeated = counts.values().filter(|&&n| n > 1).count();
    println!("crash: {at_kill} steps checkpointed at the kill, none called again; {repeated} in-flight calls repeated");
    assert!(repeated <= JOBS * 4, "{repeated} steps called twice");

    // A calm run of the same jobs, on a fresh database, gives the same outputs.
    let calm_dir = tempfile::tempdir().unwrap();
    let calm_cfg = write_serve_config(calm_dir.path(), &sim.url, &orgs, workers);
    let calm = start_server(calm_dir.path(), &calm_cfg, &orgs, "serve-calm.log");
    let calm_ids = submit_all(&calm.url);
    let calm_docs = wait_all(&calm.url, TENANT_A_KEY, &calm_ids, Duration::from_secs(240));
    assert!(calm_docs.iter().all(|d| d["status"] == "succeeded"));
    assert_eq!(outputs(&calm.url, &calm_ids), crashed, "outputs after a crash differ from a calm run");
}
