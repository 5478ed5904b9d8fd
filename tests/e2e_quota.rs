//! Tenant quotas end to end: a real `ratepool serve` whose tenant `alpha`
//! may have two jobs in flight refuses a third with a 429 naming the quota
//! and a `Retry-After`, stores and enqueues nothing for it, leaves the
//! other tenant alone, and accepts alpha's job again once earlier ones end.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn counts(db: &std::path::Path) -> (i64, i64) {
    let c = rusqlite::Connection::open(db).unwrap();
    let one = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
    (one("SELECT COUNT(*) FROM jobs"), one("SELECT COUNT(*) FROM queue"))
}

/// POST /v1/jobs, with the answer's `Retry-After` header.
fn submit_full(base: &str, key: &str, body: &str) -> (u16, Option<String>, Value) {
    let (status, headers, body) = submit_keyed(base, key, body, None);
    (status, headers.get("retry-after").map(|v| v.to_str().unwrap().to_string()), body)
}

/// POST /v1/jobs with an optional `Idempotency-Key`, with the answer's headers.
fn submit_keyed(base: &str, key: &str, body: &str, idem: Option<&str>) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = http().post(format!("{base}/v1/jobs")).bearer_auth(key).body(body.to_string());
    if let Some(idem) = idem {
        req = req.header("Idempotency-Key", idem);
    }
    let r = req.send().expect("POST");
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.json().unwrap_or(Value::Null))
}

/// A serve config whose tenant alpha has `quota` (TOML lines) and beta none.
fn write_config(dir: &std::path::Path, sim_url: &str, orgs: &[OrgSpec], quota: &str) -> std::path::PathBuf {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nbackend = \"sqlite\"\npath = \"{}\"\n{}\
         [[tenants]]\nname = \"alpha\"\napi_key_env = \"TENANT_A_KEY\"\n[tenants.quota]\n{quota}\n\
         [[tenants]]\nname = \"beta\"\napi_key_env = \"TENANT_B_KEY\"\n",
        dir.join("ratepool.db").display(),
        orgs_toml(sim_url, orgs)
    );
    let path = dir.join("ratepool.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn job(n: usize) -> String {
    chain_spec(&format!("quota-{n}"), 2, 20)
}

#[test]
fn jobs_in_flight_quota_refuses_with_429_stores_nothing_and_frees_up() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [OrgSpec { name: "org-a", rpm: 10_000, tpm: 10_000_000 }];
    // Every call takes about a second, so jobs stay in flight for a while.
    let sim = start_sim(dir.path(), &orgs, (1_000.0, 0.0, 1.0));
    let db = dir.path().join("ratepool.db");
    let cfg = write_config(dir.path(), &sim.url, &orgs, "jobs_in_flight = 2");
    let server = start_server(dir.path(), &cfg, &orgs, "serve.log");
    let base = server.url.as_str();

    let mut ids = Vec::new();
    for n in 0..2 {
        let (status, _, body) = submit_full(base, TENANT_A_KEY, &job(n));
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    let before = counts(&db);

    // The third is refused while the first two are queued or running.
    let (status, retry_after, body) = submit_full(base, TENANT_A_KEY, &job(2));
    assert_eq!(status, 429, "{body}");
    let retry_after: u64 = retry_after.expect("a Retry-After header").parse().expect("seconds");
    assert!(retry_after >= 1, "{retry_after}");
    assert_eq!(body["error"]["type"], "quota_exceeded", "{body}");
    assert_eq!(body["error"]["quota"], "jobs_in_flight", "{body}");
    assert_eq!(body["error"]["limit"], 2, "{body}");
    assert_eq!(body["error"]["retry_after_secs"], retry_after, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("jobs_in_flight") && message.contains("alpha"), "{message}");
    assert_eq!(counts(&db), before, "a refused job is neither stored nor enqueued");
    let metrics = http().get(format!("{base}/metrics")).send().unwrap().text().unwrap();
    assert!(
        metrics.contains(r#"ratepool_tenant_quota_refusals_total{tenant="alpha",quota="jobs_in_flight"} 1"#),
        "{metrics}"
    );

    // `/v1/usage` shows alpha what is left of its quota.
    let (status, usage) = get(&format!("{base}/v1/usage"), TENANT_A_KEY);
    assert_eq!(status, 200, "{usage}");
    assert_eq!(usage["quota"], serde_json::json!({"jobs_in_flight": {"limit": 2, "remaining": 0}}), "{usage}");

    // The other tenant has no quota and is not held by alpha's.
    let (status, _, body) = submit_full(base, TENANT_B_KEY, &job(3));
    assert_eq!(status, 202, "{body}");
    let (status, usage) = get(&format!("{base}/v1/usage"), TENANT_B_KEY);
    assert_eq!(status, 200, "{usage}");
    assert!(usage.get("quota").is_none(), "beta has no quota: {usage}");

    // Once alpha's jobs have finished, it may submit again.
    let docs = wait_all(base, TENANT_A_KEY, &ids, Duration::from_secs(60));
    assert!(docs.iter().all(|d| d["status"] == "succeeded"), "{docs:?}");
    let (status, _, body) = submit_full(base, TENANT_A_KEY, &job(2));
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let docs = wait_all(base, TENANT_A_KEY, &[id], Duration::from_secs(60));
    assert_eq!(docs[0]["status"], "succeeded", "{docs:?}");
}

#[test]
fn a_spent_calls_per_minute_quota_refuses_submissions_until_it_refills() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [OrgSpec { name: "org-a", rpm: 10_000, tpm: 10_000_000 }];
    let sim = start_sim(dir.path(), &orgs, (0.0, 0.0, 0.0));
    let db = dir.path().join("ratepool.db");
    let cfg = write_config(dir.path(), &sim.url, &orgs, "calls_per_minute = 2");
    let server = start_server(dir.path(), &cfg, &orgs, "serve.log");
    let base = server.url.as_str();

    // One job of two calls spends the minute's burst.
    let (status, _, body) = submit_keyed(base, TENANT_A_KEY, &job(0), Some("first"));
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let docs = wait_all(base, TENANT_A_KEY, std::slice::from_ref(&id), Duration::from_secs(30));
    assert_eq!(docs[0]["status"], "succeeded", "{docs:?}");
    let before = counts(&db);

    let (status, retry_after, body) = submit_full(base, TENANT_A_KEY, &job(1));
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["quota"], "calls_per_minute", "{body}");
    assert_eq!(body["error"]["limit"], 2, "{body}");
    // Two calls a minute: the next one fits 30 s after the first.
    let retry_after: u64 = retry_after.expect("a Retry-After header").parse().expect("seconds");
    assert!((20..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(counts(&db), before, "a refused job is neither stored nor enqueued");
    assert_eq!(sim_stats(&sim)["total_calls"], 2, "{}", sim_stats(&sim));
    let (status, usage) = get(&format!("{base}/v1/usage"), TENANT_A_KEY);
    assert_eq!(status, 200, "{usage}");
    assert_eq!(usage["quota"], serde_json::json!({"calls_per_minute": {"limit": 2, "remaining": 0}}), "{usage}");

    // A retry of the accepted request (its answer lost) gets its job, not a
    // 429; a new key is refused like any new job.
    let (status, headers, replay) = submit_keyed(base, TENANT_A_KEY, &job(0), Some("first"));
    assert_eq!(status, 202, "{replay}");
    assert_eq!(headers.get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    assert_eq!(replay["id"], id.as_str(), "{replay}");
    let (status, _, body) = submit_keyed(base, TENANT_A_KEY, &job(0), Some("second"));
    assert_eq!(status, 429, "{body}");
    let (status, _, body) = submit_keyed(base, TENANT_A_KEY, &job(1), Some("first"));
    assert_eq!((status, &body["error"]["field"]), (422, &Value::from("Idempotency-Key")), "{body}");
    assert_eq!(counts(&db), before, "replays and refusals store nothing");

    // The other tenant is not held by alpha's quota.
    let (status, _, body) = submit_full(base, TENANT_B_KEY, &job(2));
    assert_eq!(status, 202, "{body}");
}
