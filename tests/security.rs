//! Security, end to end against a real `ratepool serve`: tenants are
//! isolated on every route (another tenant's job is a 404 indistinguishable
//! from a missing one, and cannot be cancelled; usage and idempotency keys
//! are per tenant); no API key — tenant or provider, accepted or refused —
//! appears in any log line, response, `/metrics`, `/v1/usage` or the
//! database, even at debug level and on failing requests; and the server
//! refuses to start with an empty or placeholder tenant key, naming the
//! variable but never printing the value.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const ORGS: [OrgSpec; 2] = [
    OrgSpec { name: "org-a", rpm: 100_000, tpm: 100_000_000 },
    OrgSpec { name: "org-b", rpm: 100_000, tpm: 100_000_000 },
];

/// Every answer the server gave, as text, for the key grep.
#[derive(Default)]
struct Transcript(Vec<String>);

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

impl Transcript {
    /// Sends a request and records the whole answer (status, headers, body).
    fn send(&mut self, req: reqwest::blocking::RequestBuilder) -> Answer {
        let r = req.send().expect("request");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.text().unwrap_or_default();
        self.0.push(format!("{status} {headers:?} {body}"));
        Answer { status, headers, body }
    }

    fn get(&mut self, url: &str, key: &str) -> Answer {
        self.send(http().get(url).bearer_auth(key))
    }

    fn post(&mut self, url: &str, key: &str, body: &str) -> Answer {
        self.send(http().post(url).bearer_auth(key).body(body.to_string()))
    }
}

fn wait_status(t: &mut Transcript, url: &str, id: &str, want: &[&str], timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        let doc = t.get(&format!("{url}/v1/jobs/{id}"), TENANT_A_KEY).json();
        if want.contains(&doc["status"].as_str().unwrap_or("")) {
            return doc;
        }
        assert!(start.elapsed() < timeout, "job {id} never reached {want:?}: {doc}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `not_found` answer with the job id masked, so two of them can be
/// compared for everything but the id they name.
fn masked(a: &Answer, id: &str) -> (u16, String) {
    (a.status, a.body.replace(id, "<ID>"))
}

/// A syntactically valid job id no job has: the last hex digit changed.
fn missing_id(id: &str) -> String {
    let (head, last) = id.split_at(id.len() - 1);
    format!("{head}{}", if last == "0" { "1" } else { "0" })
}

#[test]
fn another_tenants_job_is_a_404_on_every_route_and_usage_and_idempotency_are_per_tenant() {
    let dir = tempfile::tempdir().unwrap();
    // 150 ms a call: a 6-step chain runs for about a second, long enough to
    // try cancelling it while it runs.
    let sim = start_sim(dir.path(), &ORGS, (150.0, 0.0, 1.0));
    let cfg = write_serve_config(dir.path(), &sim.url, &ORGS, "");
    let server = start_server(dir.path(), &cfg, &ORGS, "serve.log");
    let url = server.url.as_str();
    let mut t = Transcript::default();

    let spec = chain_spec("isolated", 6, 16);
    let first = t.send(
        http()
            .post(format!("{url}/v1/jobs"))
            .bearer_auth(TENANT_A_KEY)
            .header("idempotency-key", "shared")
            .body(spec.clone()),
    );
    assert_eq!(first.status, 202, "{}", first.body);
    let id = first.json()["id"].as_str().unwrap().to_string();
    let ghost = missing_id(&id);

    // While A's job is queued or running, B tries every route on it. Each
    // answer must be the 404 a job that does not exist gets, byte for byte
    // apart from the id, so B cannot even learn that the id is taken.
    let routes: [(&str, &str); 3] = [("GET", ""), ("GET", "/result"), ("POST", "/cancel")];
    for (method, suffix) in routes {
        let on = |job: &str| {
            let u = format!("{url}/v1/jobs/{job}{suffix}");
            if method == "GET" { http().get(u) } else { http().post(u) }
        };
        let theirs = t.send(on(&id).bearer_auth(TENANT_B_KEY));
        let nobodys = t.send(on(&ghost).bearer_auth(TENANT_B_KEY));
        assert_eq!(theirs.status, 404, "{method} {suffix}: tenant B got {} {}", theirs.status, theirs.body);
        assert_eq!(theirs.json()["error"]["type"], "not_found");
        assert_eq!(masked(&theirs, &id), masked(&nobodys, &ghost), "{method} {suffix}: B can tell A's job from none");
        // The owner gets a real answer on the same route (200, or 409 for a
        // result that is not ready yet); the cancel is tried by A below.
        if method == "GET" {
            let mine = t.send(on(&id).bearer_auth(TENANT_A_KEY));
            assert!(matches!(mine.status, 200 | 409), "{method} {suffix}: owner got {} {}", mine.status, mine.body);
        }
    }
    // No route lists jobs: `GET /v1/jobs` is not a listing for anyone.
    let list = t.get(&format!("{url}/v1/jobs"), TENANT_B_KEY);
    assert!(matches!(list.status, 404 | 405), "GET /v1/jobs answered {} {}", list.status, list.body);
    assert!(!list.body.contains(&id));

    // B's cancel did nothing: A's job runs to success.
    let done = wait_status(&mut t, url, &id, &["succeeded", "failed", "cancelled"], Duration::from_secs(60));
    assert_eq!(done["status"], "succeeded", "tenant B's cancel reached A's job: {done}");
    assert_eq!(done["steps_done"], 6);
    // Finished, the job is still a 404 for B on every route (a 409 "already
    // succeeded" on cancel would leak it).
    for (method, suffix) in routes {
        let u = format!("{url}/v1/jobs/{id}{suffix}");
        let req = if method == "GET" { http().get(u) } else { http().post(u) };
        assert_eq!(t.send(req.bearer_auth(TENANT_B_KEY)).status, 404, "{method} {suffix} after success");
    }
    assert_eq!(t.get(&format!("{url}/v1/jobs/{id}/result"), TENANT_A_KEY).status, 200);

    // Usage is per tenant: A's six calls are in A's report and none is in
    // B's, which has run nothing yet.
    let a_usage = t.get(&format!("{url}/v1/usage"), TENANT_A_KEY).json();
    let b_usage = t.get(&format!("{url}/v1/usage"), TENANT_B_KEY).json();
    let calls = |u: &Value| u["orgs"].as_array().unwrap().iter().map(|o| o["calls"].as_u64().unwrap()).sum::<u64>();
    assert_eq!(a_usage["tenant"], "alpha");
    assert_eq!(b_usage["tenant"], "beta");
    assert_eq!(calls(&a_usage), 6, "A ran one 6-step job: {a_usage}");
    assert_eq!(calls(&b_usage), 0, "B's report includes A's calls: {b_usage}");

    // The same idempotency key under another tenant is another job: B's
    // submission neither replays A's job nor conflicts with it.
    let b_job = t.send(
        http()
            .post(format!("{url}/v1/jobs"))
            .bearer_auth(TENANT_B_KEY)
            .header("idempotency-key", "shared")
            .body(spec.clone()),
    );
    assert_eq!(b_job.status, 202, "{}", b_job.body);
    let b_id = b_job.json()["id"].as_str().unwrap().to_string();
    assert_ne!(b_id, id, "tenant B's idempotency key replayed tenant A's job");
    assert!(b_job.headers.get("idempotent-replayed").is_none());
    // And A's retry with that key still gets A's own job.
    let a_retry = t.send(
        http().post(format!("{url}/v1/jobs")).bearer_auth(TENANT_A_KEY).header("idempotency-key", "shared").body(spec),
    );
    assert_eq!((a_retry.status, a_retry.json()["id"].as_str()), (202, Some(id.as_str())));
    assert_eq!(a_retry.headers["idempotent-replayed"], "true");
    // A cannot cancel B's job either.
    let cancel = t.post(&format!("{url}/v1/jobs/{b_id}/cancel"), TENANT_A_KEY, "");
    assert_eq!(cancel.status, 404, "{}", cancel.body);
    let cancel = t.post(&format!("{url}/v1/jobs/{b_id}/cancel"), TENANT_B_KEY, "");
    assert_eq!(cancel.status, 200, "the owner's cancel: {}", cancel.body);

    println!("isolation: 3 job routes x 2 states, list, usage, idempotency keys checked; {} requests", t.0.len());
}

#[test]
fn no_key_reaches_logs_responses_metrics_usage_or_the_database() {
    let dir = tempfile::tempdir().unwrap();
    // org-b first: routing breaks ties by config order, so the very first
    // call goes to org-b, whose key is one the simulator refuses — the
    // refused-provider-key path (org out of rotation, logged) always runs.
    let orgs = [
        OrgSpec { name: "org-b", rpm: 100_000, tpm: 100_000_000 },
        OrgSpec { name: "org-a", rpm: 100_000, tpm: 100_000_000 },
    ];
    let sim = start_sim(dir.path(), &orgs, (5.0, 0.0, 1.0));
    let cfg = write_serve_config(dir.path(), &sim.url, &orgs, "[limits]\nmax_body_bytes = 4096\n");
    let wrong_org_key = "sk-wrong-org-b-key-5f3a9c1e7d";
    let mut env = server_env(&orgs);
    for (k, v) in env.iter_mut() {
        if *k == org_key_env("org-b") {
            *v = wrong_org_key.to_string();
        }
    }
    let envs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (log, stdout_log) = (dir.path().join("serve.log"), dir.path().join("serve.stdout"));
    let server = spawn_with_log_level(&["serve", "--config", cfg.to_str().unwrap()], &envs, "debug", &log, &stdout_log);
    let url = server.url.as_str();
    let jobs = format!("{url}/v1/jobs");
    let mut t = Transcript::default();

    // Keys presented and refused must not be logged either.
    let near_miss = format!("{TENANT_A_KEY}X");
    let refused: [&str; 3] = ["refused-tenant-key-77e1c0ffee", &near_miss, &TENANT_B_KEY[..20]];
    let good = chain_spec("leakcheck", 3, 8);

    // Successful paths: jobs on both tenants (the ones of A run on org-a
    // after org-b's key is refused), results, status, usage, cancel.
    let mut ids = Vec::new();
    for (n, key) in [TENANT_A_KEY, TENANT_A_KEY, TENANT_B_KEY].into_iter().enumerate() {
        let a =
            t.send(http().post(&jobs).bearer_auth(key).header("idempotency-key", format!("k{n}")).body(good.clone()));
        assert_eq!(a.status, 202, "{}", a.body);
        ids.push((key, a.json()["id"].as_str().unwrap().to_string()));
    }
    for (key, id) in &ids {
        let start = Instant::now();
        loop {
            let doc = t.get(&format!("{url}/v1/jobs/{id}"), key).json();
            if doc["status"] == "succeeded" {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "job did not succeed: {doc}");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(t.get(&format!("{url}/v1/jobs/{id}/result"), key).status, 200);
    }

    // Failing paths, each with its expected status.
    let (a_id, b_id) = (&ids[0].1, &ids[2].1);
    let mut failures: Vec<(&str, Answer, u16)> = Vec::new();
    for bad in refused {
        failures.push(("refused key, submit", t.post(&jobs, bad, &good), 401));
        failures.push(("refused key, status", t.get(&format!("{jobs}/{a_id}"), bad), 401));
        failures.push(("refused key, usage", t.get(&format!("{url}/v1/usage"), bad), 401));
    }
    failures.push(("no key", t.send(http().post(&jobs).body(good.clone())), 401));
    failures.push((
        "basic auth with a real key",
        t.send(http().get(format!("{url}/v1/usage")).header("authorization", format!("Basic {TENANT_A_KEY}"))),
        401,
    ));
    failures.push(("key in the query string", t.send(http().get(format!("{url}/v1/usage?key={TENANT_A_KEY}"))), 401));
    failures.push(("bad body", t.post(&jobs, TENANT_A_KEY, "{\"name\": "), 400));
    failures.push((
        "a key inside the spec",
        t.post(&jobs, TENANT_A_KEY, &json!({"name": "x", "steps": [], "api_key": TENANT_B_KEY}).to_string()),
        400,
    ));
    failures.push(("body over the limit", t.post(&jobs, TENANT_A_KEY, &"x".repeat(10_000)), 413));
    failures.push((
        "idempotency key reused",
        t.send(
            http()
                .post(&jobs)
                .bearer_auth(TENANT_A_KEY)
                .header("idempotency-key", "k0")
                .body(chain_spec("other", 1, 8)),
        ),
        422,
    ));
    failures.push((
        "bad idempotency key",
        t.send(http().post(&jobs).bearer_auth(TENANT_A_KEY).header("idempotency-key", "").body(good.clone())),
        400,
    ));
    failures.push(("other tenant's job", t.get(&format!("{jobs}/{a_id}"), TENANT_B_KEY), 404));
    failures.push(("not a job id", t.get(&format!("{jobs}/..%2F..%2Fetc"), TENANT_A_KEY), 404));
    failures.push(("cancel a finished job", t.post(&format!("{jobs}/{b_id}/cancel"), TENANT_B_KEY, ""), 409));
    failures.push(("no such route", t.get(&format!("{url}/v1/secrets"), TENANT_A_KEY), 404));
    for (what, a, want) in &failures {
        assert_eq!(a.status, *want, "{what}: {}", a.body);
    }
    // A result before success: a long job, asked for at once.
    let slow = t.post(&jobs, TENANT_A_KEY, &chain_spec("slow", 40, 8));
    let slow_id = slow.json()["id"].as_str().unwrap().to_string();
    let early = t.get(&format!("{jobs}/{slow_id}/result"), TENANT_A_KEY);
    assert!(matches!(early.status, 200 | 409), "{}", early.body);
    assert_eq!(t.post(&format!("{jobs}/{slow_id}/cancel"), TENANT_A_KEY, "").status, 200);

    // What an operator sees: usage (which reports org-b's refused key),
    // metrics, health.
    let usage = t.get(&format!("{url}/v1/usage"), TENANT_A_KEY);
    assert_eq!(usage.status, 200);
    let metrics = t.send(http().get(format!("{url}/metrics")));
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("org-a"), "metrics name the orgs: {}", metrics.body.len());
    assert_eq!(t.send(http().get(format!("{url}/healthz"))).status, 200);
    // Let the server write its last log lines, then stop it so the database
    // files are complete.
    std::thread::sleep(Duration::from_millis(300));
    drop(server);

    let stderr = std::fs::read_to_string(&log).unwrap();
    let stdout = std::fs::read_to_string(&stdout_log).unwrap();
    assert!(stderr.contains("DEBUG"), "RUST_LOG=debug did not reach the server");
    // The refused provider key really was tried and reported (so its path
    // is among those grepped), without the key.
    assert!(
        stderr.lines().any(|l| l.contains("org taken out of rotation") && l.contains("org-b")),
        "org-b's refused key was never reported: {:?}",
        stderr.lines().filter(|l| l.contains("org-b") && !l.contains("DEBUG")).take(5).collect::<Vec<_>>()
    );
    let mut places: Vec<(String, String)> =
        vec![("server stderr (debug log)".into(), stderr), ("server stdout".into(), stdout)];
    for (i, answer) in t.0.iter().enumerate() {
        places.push((format!("response #{i}"), answer.clone()));
    }
    for f in ["ratepool.db", "ratepool.db-wal"] {
        if let Ok(bytes) = std::fs::read(dir.path().join(f)) {
            places.push((f.to_string(), String::from_utf8_lossy(&bytes).into_owned()));
        }
    }

    let mut keys: Vec<String> =
        vec![TENANT_A_KEY.into(), TENANT_B_KEY.into(), org_key("org-a"), org_key("org-b"), wrong_org_key.into()];
    keys.extend(refused.iter().map(|s| s.to_string()));
    for key in &keys {
        // Most of a key leaks it too (a key with its last 4 characters masked).
        let most = &key[..key.len() - 4];
        for (place, text) in &places {
            assert!(!text.contains(most), "{place} contains (most of) a key: {}", key.len());
        }
    }
    println!(
        "key grep: {} key values (and their first n-4 characters) absent from {} places: 2 server logs, {} responses, {} database files",
        keys.len(),
        places.len(),
        t.0.len(),
        places.len() - 2 - t.0.len()
    );
}

/// Runs `serve` with a clean environment and `TENANT_A_KEY=value`; it must
/// exit non-zero within 10 s. Returns its exit code and everything it printed.
fn serve_with_tenant_key(dir: &Path, cfg: &Path, value: &str) -> (Option<i32>, String) {
    let mut env = server_env(&ORGS);
    env.retain(|(k, _)| k != "TENANT_A_KEY");
    let out = dir.join("refused.out");
    let err = dir.join("refused.err");
    let mut child = Command::new(BIN)
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env_clear()
        .env("RUST_LOG", "debug")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("TENANT_A_KEY", value)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve kept running with TENANT_A_KEY={value:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "serve exited 0 with TENANT_A_KEY={value:?}");
    let printed = std::fs::read_to_string(&err).unwrap() + &std::fs::read_to_string(&out).unwrap();
    (status.code(), printed)
}

#[test]
fn serve_refuses_empty_and_placeholder_tenant_keys_naming_the_variable_not_the_value() {
    let dir = tempfile::tempdir().unwrap();
    // The simulator URL is never called: serve must stop before that.
    let cfg = write_serve_config(dir.path(), "http://127.0.0.1:9", &ORGS, "");
    // (value, whether it is distinctive enough to grep the output for)
    let cases = [
        ("", false),
        ("   ", false),
        ("changeme", true),
        ("CHANGEME", true),
        ("Password", true),
        ("  changeme  ", true),
        ("short-key-42", true),
    ];
    for (value, greppable) in cases {
        let (code, printed) = serve_with_tenant_key(dir.path(), &cfg, value);
        assert_ne!(code, Some(0));
        assert!(printed.contains("TENANT_A_KEY"), "{value:?}: the message does not name the variable: {printed}");
        assert!(printed.contains("tenant alpha"), "{value:?}: the message does not name the tenant: {printed}");
        assert!(!printed.contains("listening"), "{value:?}: serve started: {printed}");
        if greppable {
            let shown = value.trim();
            assert!(!printed.contains(shown), "{value:?}: the refused value was printed: {printed}");
        }
    }
    // The control: a real key starts (and is then stopped).
    let server = start_server(dir.path(), &cfg, &ORGS, "ok.log");
    assert!(server.url.starts_with("http://"));
}
