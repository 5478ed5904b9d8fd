//! The response cache and job webhooks, end to end with a real `ratepool
//! serve` (SQLite), the simulator, and a webhook receiver in this process.
//!
//! - Cache: a job repeated with `"cache": true` is answered without a
//!   provider call (the simulator sees nothing new), costs no usage, and is
//!   counted as hits in `/metrics`; a step that opts out, and another
//!   tenant's identical job, still call the provider.
//! - Webhooks: a finished job is POSTed, signed so that
//!   `ratepool::webhook::verify` accepts it; a receiver answering 500 is
//!   retried; a failed job is reported as failed; a server killed while the
//!   receiver holds the first delivery delivers again after its restart (at
//!   least once); URLs to private addresses and tenants without a secret
//!   are refused at submission, naming `webhook_url`, with nothing stored.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::*;
use serde_json::{Value, json};

const ORGS: [OrgSpec; 1] = [OrgSpec { name: "org-a", rpm: 100_000, tpm: 100_000_000 }];
const WEBHOOK_SECRET: &str = "whsec-0123456789abcdef0123456789";

/// One server config: alpha has a webhook secret, beta has none. The org
/// also claims a model the simulator does not serve, so a job can fail.
fn config(dir: &Path, sim_url: &str, allow_private: bool) -> PathBuf {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nbackend = \"sqlite\"\npath = \"{}\"\n\
         [workers]\nvisibility_timeout_secs = 3\n\
         [webhooks]\nallow_private = {allow_private}\nbackoff_ms = 50\ntimeout_secs = 30\n",
        dir.join("ratepool.db").display()
    );
    toml.push_str(&orgs_toml(sim_url, &ORGS));
    toml.push_str("[orgs.models.\"gpt-ghost\"]\nrpm = 1000\ntpm = 1000000\n");
    toml.push_str(
        "[[tenants]]\nname = \"alpha\"\napi_key_env = \"TENANT_A_KEY\"\nwebhook_secret_env = \"ALPHA_WEBHOOK_SECRET\"\n\
         [[tenants]]\nname = \"beta\"\napi_key_env = \"TENANT_B_KEY\"\n",
    );
    let path = dir.join("ratepool.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn serve(dir: &Path, config: &Path, log: &str) -> Proc {
    let mut envs = server_env(&ORGS);
    envs.push(("ALPHA_WEBHOOK_SECRET".into(), WEBHOOK_SECRET.into()));
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    spawn_with_log_level(
        &["serve", "--config", config.to_str().unwrap()],
        &envs,
        "info",
        &dir.join(log),
        &dir.join(format!("{log}.stdout")),
    )
}

fn accepted(base: &str, key: &str, spec: &Value) -> String {
    let (status, body) = submit(base, key, &spec.to_string());
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().unwrap().to_string()
}

fn three_steps(name: &str, cache: bool) -> Value {
    json!({
        "name": name,
        "inputs": {"topic": "owls"},
        "defaults": {"model": "gpt-4o-mini", "max_tokens": 20},
        "cache": cache,
        "steps": [
            {"id": "a", "messages": [{"role": "user", "content": "Pitch a film about {{inputs.topic}}."}]},
            {"id": "b", "messages": [{"role": "user", "content": "Outline: {{steps.a.output}}"}]},
            {"id": "c", "messages": [{"role": "user", "content": "Title for: {{steps.b.output}}"}], "cache": false},
        ],
    })
}

fn accepted_calls(sim: &Proc) -> u64 {
    sim_stats(sim)["orgs"]["org-a"]["accepted_calls"].as_u64().unwrap()
}

fn metric(base: &str, line_prefix: &str) -> f64 {
    let text = http().get(format!("{base}/metrics")).send().unwrap().text().unwrap();
    text.lines().find_map(|l| l.strip_prefix(line_prefix).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

fn outputs(base: &str, key: &str, id: &str) -> Value {
    let (status, body) = get(&format!("{base}/v1/jobs/{id}/result"), key);
    assert_eq!(status, 200, "{body}");
    body["outputs"].clone()
}

#[test]
fn cached_steps_skip_the_provider_and_cost_nothing_per_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(dir.path(), &ORGS, (0.0, 0.0, 0.0));
    let server = serve(dir.path(), &config(dir.path(), &sim.url, true), "serve.log");
    let base = &server.url;

    let first = accepted(base, TENANT_A_KEY, &three_steps("first", true));
    let done = wait_all(base, TENANT_A_KEY, std::slice::from_ref(&first), Duration::from_secs(60));
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    assert_eq!(accepted_calls(&sim), 3);
    assert_eq!(metric(base, "ratepool_response_cache_lookups_total{result=\"miss\"} "), 2.0);

    // The same job again: a and b come from the cache, c opted out.
    let again = accepted(base, TENANT_A_KEY, &three_steps("again", true));
    let done = wait_all(base, TENANT_A_KEY, std::slice::from_ref(&again), Duration::from_secs(60));
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    assert_eq!(accepted_calls(&sim), 4, "only the step with cache: false was called again");
    assert_eq!(done[0]["usage"]["calls"], 1, "cache hits cost nothing: {}", done[0]);
    assert_eq!(metric(base, "ratepool_response_cache_lookups_total{result=\"hit\"} "), 2.0);
    let (a, b) = (outputs(base, TENANT_A_KEY, &first), outputs(base, TENANT_A_KEY, &again));
    assert_eq!((&a["a"], &a["b"]), (&b["a"], &b["b"]), "a hit answers with the cached output");

    // Another tenant's identical job is not served alpha's answers.
    let beta = accepted(base, TENANT_B_KEY, &three_steps("beta", true));
    let done = wait_all(base, TENANT_B_KEY, std::slice::from_ref(&beta), Duration::from_secs(60));
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    assert_eq!(accepted_calls(&sim), 7, "beta's three steps all reached the provider");
    assert_eq!(metric(base, "ratepool_response_cache_lookups_total{result=\"hit\"} "), 2.0);

    // Without "cache", nothing is looked up or stored.
    let plain = accepted(base, TENANT_A_KEY, &three_steps("plain", false));
    wait_all(base, TENANT_A_KEY, std::slice::from_ref(&plain), Duration::from_secs(60));
    assert_eq!(accepted_calls(&sim), 10);
    assert_eq!(metric(base, "ratepool_response_cache_lookups_total{result=\"miss\"} "), 4.0);
}

// ------------------------------------------------------------------ webhooks

/// What the receiver got, and how it answers.
#[derive(Default)]
struct Receiver {
    got: Vec<(HeaderMap, String)>,
    /// Answer 500 to this many requests first.
    fail_first: usize,
    /// Hold the first request unanswered (the server is killed meanwhile).
    hold_first: bool,
}

async fn receive(State(r): State<Arc<Mutex<Receiver>>>, headers: HeaderMap, body: String) -> StatusCode {
    let (n, fail, hold) = {
        let mut r = r.lock().unwrap();
        r.got.push((headers, body));
        (r.got.len(), r.fail_first, r.hold_first)
    };
    if hold && n == 1 {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if n <= fail { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::NO_CONTENT }
}

/// Starts a receiver on loopback; returns its URL and the shared state.
fn start_receiver(rt: &tokio::runtime::Runtime, setup: Receiver) -> (String, Arc<Mutex<Receiver>>) {
    let state = Arc::new(Mutex::new(setup));
    let app = axum::Router::new().route("/hooks/job", axum::routing::post(receive)).with_state(state.clone());
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}/hooks/job", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, app).await });
    (url, state)
}

fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks every delivery's signature as a receiver would, and returns the
/// bodies.
fn verified_bodies(state: &Mutex<Receiver>) -> Vec<Value> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let r = state.lock().unwrap();
    r.got
        .iter()
        .map(|(headers, body)| {
            let sig = headers.get("ratepool-signature").expect("signature header").to_str().unwrap();
            ratepool::webhook::verify(WEBHOOK_SECRET.as_bytes(), sig, body.as_bytes(), now, Duration::from_secs(300))
                .unwrap_or_else(|e| panic!("signature {sig:?} refused: {e}"));
            assert!(
                ratepool::webhook::verify(
                    b"another-secret-0123456789",
                    sig,
                    body.as_bytes(),
                    now,
                    Duration::from_secs(300)
                )
                .is_err(),
                "a signature must not verify under another secret"
            );
            serde_json::from_str(body).unwrap()
        })
        .collect()
}

fn job_doc(base: &str, id: &str) -> Value {
    let (status, body) = get(&format!("{base}/v1/jobs/{id}"), TENANT_A_KEY);
    assert_eq!(status, 200, "{body}");
    body
}

#[test]
fn finished_and_failed_jobs_are_posted_signed_and_retried() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (url, state) = start_receiver(&rt, Receiver { fail_first: 2, ..Default::default() });
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(dir.path(), &ORGS, (0.0, 0.0, 0.0));
    let server = serve(dir.path(), &config(dir.path(), &sim.url, true), "serve.log");
    let base = &server.url;

    let mut spec = three_steps("hooked", false);
    spec["webhook_url"] = json!(url);
    let ok = accepted(base, TENANT_A_KEY, &spec);
    wait_for("the webhook to be delivered", Duration::from_secs(60), || {
        job_doc(base, &ok)["webhook"]["status"] == "delivered"
    });
    let doc = job_doc(base, &ok);
    assert_eq!(doc["status"], "succeeded");
    assert_eq!(doc["webhook"]["attempts"], 3, "two 500s, then delivered: {doc}");
    let bodies = verified_bodies(&state);
    assert_eq!(bodies.len(), 3);
    for b in &bodies {
        assert_eq!(b["id"], ok.as_str());
        assert_eq!(b["status"], "succeeded");
        assert_eq!(b["steps_done"], 3);
        assert_eq!(b["usage"]["calls"], doc["usage"]["calls"]);
    }
    assert_eq!(metric(base, "ratepool_webhook_deliveries_total{result=\"delivered\"} "), 1.0);

    // A job that fails (the provider does not serve the model) is reported.
    let mut failing = json!({
        "name": "doomed",
        "webhook_url": url,
        "steps": [{"id": "a", "model": "gpt-ghost", "messages": [{"role": "user", "content": "hi"}]}],
    });
    let bad = accepted(base, TENANT_A_KEY, &failing);
    wait_for("the failure's webhook", Duration::from_secs(60), || {
        job_doc(base, &bad)["webhook"]["status"] == "delivered"
    });
    let last = verified_bodies(&state).pop().unwrap();
    assert_eq!((last["id"].as_str(), last["status"].as_str()), (Some(bad.as_str()), Some("failed")));

    // A job without a webhook shows none.
    failing.as_object_mut().unwrap().remove("webhook_url");
    failing["steps"][0]["model"] = json!("gpt-4o-mini");
    let plain = accepted(base, TENANT_A_KEY, &failing);
    wait_all(base, TENANT_A_KEY, std::slice::from_ref(&plain), Duration::from_secs(60));
    assert!(job_doc(base, &plain).get("webhook").is_none());
    assert_eq!(state.lock().unwrap().got.len(), 4, "no delivery for a job without webhook_url");
}

#[test]
fn a_server_killed_during_delivery_delivers_again_after_restart() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (url, state) = start_receiver(&rt, Receiver { hold_first: true, ..Default::default() });
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(dir.path(), &ORGS, (0.0, 0.0, 0.0));
    let cfg = config(dir.path(), &sim.url, true);
    let mut server = serve(dir.path(), &cfg, "serve-1.log");

    let mut spec = three_steps("crashy", false);
    spec["webhook_url"] = json!(url);
    let id = accepted(&server.url, TENANT_A_KEY, &spec);
    wait_for("the first delivery", Duration::from_secs(60), || !state.lock().unwrap().got.is_empty());
    assert_eq!(job_doc(&server.url, &id)["webhook"]["status"], "pending");
    server.kill();

    // The job is finished but its message is still queued: the restarted
    // server receives it after the visibility timeout and delivers again.
    let server = serve(dir.path(), &cfg, "serve-2.log");
    wait_for("the second delivery to be recorded", Duration::from_secs(60), || {
        job_doc(&server.url, &id)["webhook"]["status"] == "delivered"
    });
    let bodies = verified_bodies(&state);
    assert_eq!(bodies.len(), 2, "delivered at least once: the held attempt and the one after restart");
    assert!(bodies.iter().all(|b| b["id"] == id.as_str() && b["status"] == "succeeded"));
    assert_eq!(accepted_calls(&sim), 3, "the finished job's steps were not run again");
}

#[test]
fn webhook_urls_into_the_private_network_or_without_a_secret_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(dir.path(), &ORGS, (0.0, 0.0, 0.0));
    let server = serve(dir.path(), &config(dir.path(), &sim.url, false), "serve.log");
    let base = &server.url;
    let cases: [(&str, &str); 6] = [
        (TENANT_A_KEY, "http://127.0.0.1:9/hook"),
        (TENANT_A_KEY, "http://169.254.169.254/latest/meta-data/"),
        (TENANT_A_KEY, "http://10.0.0.7/hook"),
        (TENANT_A_KEY, "http://[::ffff:192.168.1.1]/hook"),
        (TENANT_A_KEY, "file:///etc/passwd"),
        (TENANT_B_KEY, "https://hooks.example.com/job"),
    ];
    for (key, url) in cases {
        let mut spec = three_steps("nosy", false);
        spec["webhook_url"] = json!(url);
        let (status, body) = submit(base, key, &spec.to_string());
        assert_eq!(status, 400, "{url}: {body}");
        assert_eq!(body["error"]["field"], "webhook_url", "{url}: {body}");
    }
    // Nothing was stored or queued: the simulator saw no call, and the
    // database holds no job.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(accepted_calls(&sim), 0);
    let db = rusqlite::Connection::open(dir.path().join("ratepool.db")).unwrap();
    let jobs: i64 = db.query_row("SELECT count(*) FROM jobs", [], |r| r.get(0)).unwrap();
    let queued: i64 = db.query_row("SELECT count(*) FROM queue", [], |r| r.get(0)).unwrap();
    assert_eq!((jobs, queued), (0, 0));
}
