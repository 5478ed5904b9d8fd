//! The benchmark's smoke test: `ratepool bench --quick` runs every figure
//! once on tiny workloads, as `make bench` would on big ones. It measures
//! nothing worth quoting; it checks the benchmark still works and that what
//! it counts adds up (every call made once, every step's overhead recorded,
//! one provider call per request through the calls door), so `make bench`
//! does not break unnoticed. Needs the moto emulator and the PostgreSQL
//! server that `make test` starts, for the DynamoDB and PostgreSQL figures.

use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ratepool");

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn quick_benchmark_runs_every_figure_and_its_counts_add_up() {
    let endpoint = std::env::var("AWS_ENDPOINT_URL")
        .unwrap_or_else(|_| panic!("AWS_ENDPOINT_URL is not set: run through `make test`, which starts moto"));
    let postgres = std::env::var("RATEPOOL_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!("RATEPOOL_TEST_POSTGRES_URL is not set: run through `make test`, which starts PostgreSQL")
    });
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("results.json");
    let out = Command::new(BIN)
        .args(["bench", "--quick", "--runs", "1", "--work-dir"])
        .arg(dir.path().join("work"))
        .arg("--json")
        .arg(&json)
        .env("AWS_ENDPOINT_URL", &endpoint)
        .env("RATEPOOL_TEST_POSTGRES_URL", &postgres)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed:\n{}\n{}", report, String::from_utf8_lossy(&out.stderr));
    for heading in [
        "### 1 + 2.",
        "### 3.",
        "### 4.",
        "### 5.",
        "### 6.",
        "### 7.",
        "### 8.",
        "### 9.",
        "### 10.",
        "### 11.",
        "### 12.",
    ] {
        assert!(report.contains(heading), "report lacks {heading}:\n{report}");
    }
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["quick"], true);

    // 1 + 2: every step called exactly once, against a bound that makes sense.
    let scaling = &r["scaling"][0];
    let runs = scaling["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for p in runs {
        let calls = f(&p["jobs"]) * f(&p["steps_per_job"]);
        assert_eq!(f(&p["sim"]["accepted_calls"]), calls, "{p}");
        assert_eq!(f(&p["sim"]["answered_429"]), 0.0, "{p}");
        let u = f(&p["utilization"]);
        assert!(u > 0.0 && u <= 1.5, "utilization {u} is not plausible: {p}");
        assert!(f(&p["bound_s"]) >= f(&p["chain_bound_s"]));
        assert!(f(&p["ledger_ops_per_call"]) >= 1.0, "every call takes a ledger write: {p}");
    }
    assert_eq!(f(&scaling["ratios"]["1"]), 1.0);
    assert!(f(&scaling["ratios"]["2"]) > 0.0);

    // 3: the baseline ran the same workload.
    let b = &r["baseline"][0];
    assert!(f(&b["baseline_s"]) > 0.0 && f(&b["pool_s"]) > 0.0);
    assert!((f(&b["speedup"]) - f(&b["baseline_s"]) / f(&b["pool_s"])).abs() < 1e-9);

    // 4: one overhead sample per step, quantiles in order.
    let o = &r["overhead"][0];
    assert_eq!(f(&o["concurrent_steps"]), f(&o["concurrent_chains"]) * f(&o["chain_steps"]), "{o}");
    assert!(f(&o["chain_p50_ms"]) <= f(&o["chain_p99_ms"]), "{o}");
    assert!(f(&o["chain_provider_s"]) < f(&o["chain_makespan_s"]), "{o}");

    // 5: the jobs were really in flight when memory was read.
    let m = &r["memory"][0];
    assert_eq!(f(&m["jobs_in_flight"]), 40.0, "{m}");
    assert!(f(&m["calls_open"]) >= 40.0, "{m}");
    assert!(f(&m["idle_rss_mb"]) > 0.0 && f(&m["peak_rss_mb"]) >= f(&m["loaded_rss_mb"]), "{m}");

    // 6: every backend measured; DynamoDB needs at least one write per call.
    let l = &r["ledger"][0];
    let backends: Vec<&str> =
        l["throughput"].as_array().unwrap().iter().map(|t| t["backend"].as_str().unwrap()).collect();
    assert_eq!(
        backends,
        ["sqlite", "sqlite", "sqlite", "postgres", "postgres", "postgres", "dynamodb", "dynamodb", "dynamodb"]
    );
    assert!(l["throughput"].as_array().unwrap().iter().all(|t| f(&t["acquisitions"]) > 0.0));
    let alone = f(&l["dynamo_requests_per_call_alone"]);
    assert!((1.0..4.0).contains(&alone), "{alone}");

    // 12: the same saturating workload ran on each backend, every step
    // called once, none answered 429.
    let b = &r["backends"][0];
    for side in ["sqlite", "postgres"] {
        let p = &b[side];
        assert_eq!(f(&p["sim"]["accepted_calls"]), f(&p["jobs"]) * f(&p["steps_per_job"]), "{side}: {p}");
        assert_eq!(f(&p["sim"]["answered_429"]), 0.0, "{side}: {p}");
        assert!(f(&p["utilization"]) > 0.0 && f(&p["ledger_ops_per_call"]) >= 1.0, "{side}: {p}");
    }

    // 7: both modes ran every step.
    let h = r["headers"][0].as_array().unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!((h[0]["header_sync"].as_bool(), h[1]["header_sync"].as_bool()), (Some(false), Some(true)));
    for x in h {
        assert!(f(&x["calls"]) >= 10.0, "{x}");
    }

    // 8: every probe measured both ways; the flood all finished (checked
    // by the figure); the ratio is the medians'.
    let p = &r["priority"][0];
    for k in ["interactive_s", "fifo_s"] {
        let v = p[k].as_array().unwrap();
        assert_eq!(v.len() as f64, f(&p["interactive_jobs"]), "{p}");
        assert!(v.iter().all(|x| f(x) > 0.0), "{p}");
    }
    assert!((f(&p["speedup"]) - f(&p["fifo_p50_s"]) / f(&p["interactive_p50_s"])).abs() < 1e-9, "{p}");

    // 9: each real bucket ran every step once, its bound uses that bucket,
    // and the server reports a burst no larger than the one it was told
    // (the minute, or the real bucket in the last row).
    let w = r["window"][0]["runs"].as_array().unwrap();
    let buckets: Vec<f64> = w.iter().map(|x| f(&x["real_burst_s"])).collect();
    assert_eq!(buckets, [10.0, 60.0, 10.0]);
    let told: Vec<f64> = w.iter().map(|x| f(&x["told_burst_s"])).collect();
    assert_eq!(told, [60.0, 60.0, 10.0]);
    for x in w {
        assert_eq!(f(&x["sim"]["accepted_calls"]), f(&x["jobs"]) * f(&x["steps_per_job"]), "{x}");
        assert!(f(&x["bound_s"]) >= f(&x["chain_bound_s"]), "{x}");
        let learned = f(&x["learned_burst_s"]);
        assert!(learned > 0.0 && learned <= f(&x["told_burst_s"]), "{x}");
    }
    // 10: every request answered 200 (the figure fails on any other), every
    // one through ratepool made exactly one call at the simulator, and the
    // door counted each as answered.
    let x = &r["proxy"][0];
    assert_eq!(
        f(&x["sim_calls"]),
        f(&x["direct_requests"]) + f(&x["through_requests"]) + f(&x["relay_requests"]),
        "{x}"
    );
    assert!(f(&x["relay_requests"]) > 0.0, "the slow cell went through the relay too: {x}");
    assert_eq!(f(&x["provider_calls"]), f(&x["through_requests"]), "{x}");
    assert_eq!(f(&x["door_ok"]), f(&x["through_requests"]), "{x}");
    let cells = x["cells"].as_array().unwrap();
    assert_eq!(cells.iter().filter(|c| c["streamed"] == true).count(), 1, "{x}");
    // The cell against a slow provider: every answer took at least its time.
    let slow: Vec<_> = cells.iter().filter(|c| f(&c["provider_ms"]) > 0.0).collect();
    assert_eq!(slow.len(), 1, "{x}");
    assert!(f(&slow[0]["direct_p50_ms"]) >= f(&slow[0]["provider_ms"]), "{x}");
    let relay = &slow[0]["relay"];
    assert!(f(&relay["p50_ms"]) >= f(&slow[0]["provider_ms"]) && f(&relay["p50_ms"]) <= f(&relay["p99_ms"]), "{x}");
    for c in cells {
        assert!(f(&c["requests"]) > 0.0, "{c}");
        for side in ["direct", "through"] {
            assert!(f(&c[format!("{side}_p50_ms")]) <= f(&c[format!("{side}_p99_ms")]), "{c}");
        }
    } // 11: both variants ran on the emulator's accounting; every call paid
    // the ledger at least one write unit and a checkpoint, and the spec, the
    // largest jobs-table item, is far over any job item.
    let cost = r["cost"].as_array().unwrap();
    assert_eq!(cost.len(), 2, "{cost:?}");
    for c in cost {
        assert!(f(&c["provider_calls"]) >= 12.0, "at least the example's 12 steps: {c}");
        assert!(f(&c["ledger_write_units_per_call"]) >= 1.0, "{c}");
        assert!(f(&c["jobs_table_write_units_per_call"]) >= 2.0, "a checkpoint transaction: {c}");
        assert!(f(&c["write_units_per_call"]) >= f(&c["jobs_table_write_units_per_call"]), "{c}");
        assert!(f(&c["sqs_requests_per_call"]) > 0.0 && f(&c["read_units_per_call"]) > 0.0, "{c}");
        assert_eq!(f(&c["cloudwatch_requests_per_call"]), 0.0, "metrics leave as EMF: {c}");
        assert!(f(&c["largest_job_table_item_bytes"]) > 10_000.0, "the example's spec item: {c}");
    }

    assert!(f(&x["through_rps"]) > 0.0 && f(&x["direct_rps"]) > 0.0, "{x}");
}
