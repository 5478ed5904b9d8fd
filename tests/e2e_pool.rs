//! End to end: `ratepool sim` with three orgs and `ratepool serve` as
//! separate processes; twenty screenplay jobs at once must all succeed
//! while the provider never sees an org pushed over its limits.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn twenty_screenplays_over_three_orgs_stay_within_limits() {
    let dir = tempfile::tempdir().unwrap();
    // Limits small enough that the workload (≈6.3M tokens) is more than the
    // three orgs' first-minute burst, so the ledger has to pace the calls.
    let orgs = [
        OrgSpec { name: "org-a", rpm: 3_000, tpm: 1_500_000 },
        OrgSpec { name: "org-b", rpm: 3_000, tpm: 1_500_000 },
        OrgSpec { name: "org-c", rpm: 3_000, tpm: 1_500_000 },
    ];
    let sim = start_sim(dir.path(), &orgs, (20.0, 0.2, 1.0));
    let cfg = write_serve_config(dir.path(), &sim.url, &orgs, "[workers]\nconcurrency = 32\nstep_parallelism = 4\n");
    let server = start_server(dir.path(), &cfg, &orgs, "serve.log");

    let ids: Vec<String> = (0..20)
        .map(|n| {
            let (status, body) = submit(&server.url, TENANT_A_KEY, &screenplay(n));
            assert_eq!(status, 202, "{body}");
            assert_eq!(body["status"], "queued");
            body["id"].as_str().unwrap().to_string()
        })
        .collect();
    let docs = wait_all(&server.url, TENANT_A_KEY, &ids, Duration::from_secs(300));
    for d in &docs {
        assert_eq!(d["status"], "succeeded", "{d}");
        assert_eq!(d["steps_done"], d["steps_total"]);
        assert!(d["usage"]["total_tokens"].as_u64().unwrap() > 0);
    }

    let stats = sim_stats(&sim);
    let total = stats["total_calls"].as_u64().unwrap();
    let steps: u64 = docs.iter().map(|d| d["steps_total"].as_u64().unwrap()).sum();
    assert!(total >= steps, "every step makes at least one call: {total} < {steps}");
    let mut rejected = 0;
    let mut charged = 0;
    for o in &orgs {
        let s = &stats["orgs"][o.name];
        rejected += s["rate_limited_requests"].as_u64().unwrap() + s["rate_limited_tokens"].as_u64().unwrap();
        charged += s["charged_tokens"].as_u64().unwrap();
        assert!(s["accepted_calls"].as_u64().unwrap() > steps / 10, "org {} was barely used: {s}", o.name);
        let m = &s["models"]["gpt-4o-mini"];
        assert!(m["peak_60s_requests"].as_u64() <= m["window_bound_requests"].as_u64(), "{}: {m}", o.name);
        assert!(m["peak_60s_tokens"].as_u64() <= m["window_bound_tokens"].as_u64(), "{}: {m}", o.name);
    }
    let peaks: Vec<String> = orgs
        .iter()
        .map(|o| {
            let m = &stats["orgs"][o.name]["models"]["gpt-4o-mini"];
            format!("{}: {} of {} tpm", o.name, m["peak_60s_tokens"], m["tpm"])
        })
        .collect();
    println!(
        "pool: {} jobs, {steps} steps, {total} provider calls, {rejected} answered 429, {charged} tokens charged; peak 60 s use {peaks:?}",
        ids.len()
    );
    let burst: u64 = orgs.iter().map(|o| o.tpm).sum();
    assert!(charged > burst, "workload ({charged} tokens) should exceed the first-minute burst ({burst})");
    assert!(rejected * 1000 <= total, "429s on {rejected} of {total} calls: more than 0.1%");

    // The usage report shows the tenant's calls per org and the headroom.
    let (status, usage) = get(&format!("{}/v1/usage", server.url), TENANT_A_KEY);
    assert_eq!(status, 200, "{usage}");
    let calls: u64 = usage["orgs"].as_array().unwrap().iter().map(|o| o["calls"].as_u64().unwrap()).sum();
    assert_eq!(calls, steps, "one successful call per step: {usage}");
    assert!(usage["orgs"][0]["headroom"]["gpt-4o-mini"]["ratio"].is_number());
    // Full-minute orgs and no 429 with room: the burst stays the configured minute.
    for org in usage["orgs"].as_array().unwrap() {
        assert_eq!(org["headroom"]["gpt-4o-mini"]["burst_secs"], 60.0, "{usage}");
    }
    // The other tenant has used nothing.
    let (_, other) = get(&format!("{}/v1/usage", server.url), TENANT_B_KEY);
    assert!(other["orgs"].as_array().unwrap().iter().all(|o| o["calls"] == 0), "{other}");

    let metrics = http().get(format!("{}/metrics", server.url)).send().unwrap().text().unwrap();
    assert!(metrics.contains("ratepool_jobs_finished_total{status=\"succeeded\"} 20"), "{metrics}");
    assert!(metrics.contains("ratepool_org_burst_seconds{org="), "{metrics}");
}
