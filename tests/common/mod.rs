//! Helpers for end-to-end tests: start `ratepool sim` and `ratepool serve`
//! as real processes on port 0, talk to them over HTTP, kill them.
#![allow(dead_code)]

pub mod pool;
pub mod postgres;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_ratepool");

/// A child process that is killed when dropped.
pub struct Proc {
    pub child: Child,
    pub url: String,
    pub log: PathBuf,
}

impl Proc {
    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        // A failing test's processes say what they were doing: the tail of
        // each log goes to the test's output (shown only on failure).
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("--- last {} lines of {}:\n{}", tail.len(), self.log.display(), tail.join("\n"));
        }
    }
}

/// Starts `ratepool ARGS` and waits for its "listening on http://…" line;
/// stderr goes to `log`, stdout is copied next to it (`.out`).
fn spawn(args: &[&str], envs: &[(&str, &str)], log: &Path) -> Proc {
    spawn_with_log_level(args, envs, "info", log, &log.with_extension("out"))
}

/// One simulated org.
pub struct OrgSpec {
    pub name: &'static str,
    pub rpm: u64,
    pub tpm: u64,
}

pub fn org_key(name: &str) -> String {
    format!("sk-sim-{name}-0123456789")
}

pub fn start_sim(dir: &Path, orgs: &[OrgSpec], latency: (f64, f64, f64)) -> Proc {
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\n[latency]\nbase_ms = {}\nper_token_ms = {}\ntime_scale = {}\n",
        latency.0, latency.1, latency.2
    );
    for o in orgs {
        toml.push_str(&format!(
            "[[orgs]]\nname = \"{}\"\napi_key = \"{}\"\n[orgs.models.\"gpt-4o-mini\"]\nrpm = {}\ntpm = {}\n",
            o.name,
            org_key(o.name),
            o.rpm,
            o.tpm
        ));
    }
    let path = dir.join("sim.toml");
    std::fs::write(&path, toml).unwrap();
    spawn(&["sim", "--config", path.to_str().unwrap()], &[], &dir.join("sim.log"))
}

pub const TENANT_A_KEY: &str = "tenant-a-key-0123456789abcdef";
pub const TENANT_B_KEY: &str = "tenant-b-key-0123456789abcdef";

/// The environment variable holding an org's key in the test configs.
pub fn org_key_env(name: &str) -> String {
    format!("ORG_{}_KEY", name.to_uppercase().replace('-', "_"))
}

/// `[[orgs]]` entries pointing every org at the simulator.
pub fn orgs_toml(sim_url: &str, orgs: &[OrgSpec]) -> String {
    orgs.iter()
        .map(|o| {
            format!(
                "[[orgs]]\nname = \"{}\"\nbase_url = \"{sim_url}/v1\"\napi_key_env = \"{}\"\ntimeout_secs = 20\n[orgs.models.\"gpt-4o-mini\"]\nrpm = {}\ntpm = {}\n",
                o.name,
                org_key_env(o.name),
                o.rpm,
                o.tpm
            )
        })
        .collect()
}

/// Writes a serve config pointing every org at the simulator.
pub fn write_serve_config(dir: &Path, sim_url: &str, orgs: &[OrgSpec], extra: &str) -> PathBuf {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nbackend = \"sqlite\"\npath = \"{}\"\n{extra}\n",
        dir.join("ratepool.db").display()
    );
    toml.push_str(&orgs_toml(sim_url, orgs));
    toml.push_str("[[tenants]]\nname = \"alpha\"\napi_key_env = \"TENANT_A_KEY\"\n[[tenants]]\nname = \"beta\"\napi_key_env = \"TENANT_B_KEY\"\n");
    let path = dir.join("ratepool.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

pub fn start_server(dir: &Path, config: &Path, orgs: &[OrgSpec], log_name: &str) -> Proc {
    start_server_with_env(dir, config, orgs, log_name, &[])
}

/// `start_server` with more environment variables (a database URL).
pub fn start_server_with_env(
    dir: &Path,
    config: &Path,
    orgs: &[OrgSpec],
    log_name: &str,
    extra: &[(&str, &str)],
) -> Proc {
    let keys = server_env(orgs);
    let mut envs: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    envs.extend_from_slice(extra);
    spawn(&["serve", "--config", config.to_str().unwrap()], &envs, &dir.join(log_name))
}

/// A Prometheus sample `name{labels}` from a text exposition.
pub fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
}

pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

pub fn get(url: &str, key: &str) -> (u16, Value) {
    let r = http().get(url).bearer_auth(key).send().expect("GET");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

pub fn submit(base: &str, key: &str, body: &str) -> (u16, Value) {
    let r = http().post(format!("{base}/v1/jobs")).bearer_auth(key).body(body.to_string()).send().expect("POST");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// The screenplay example with its inputs varied by `n`, so jobs differ.
pub fn screenplay(n: usize) -> String {
    let mut v: Value = serde_json::from_str(include_str!("../../examples/screenplay.json")).unwrap();
    let inputs = v["inputs"].as_object_mut().expect("screenplay has inputs");
    let first = inputs.keys().next().cloned().expect("an input");
    let old = inputs[&first].as_str().unwrap_or("").to_string();
    inputs.insert(first, Value::String(format!("{old} (variation {n})")));
    v.to_string()
}

/// Polls until every job is final; returns their status documents.
pub fn wait_all(base: &str, key: &str, ids: &[String], timeout: Duration) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let docs: Vec<Value> = ids.iter().map(|id| get(&format!("{base}/v1/jobs/{id}"), key).1).collect();
        let done = docs.iter().all(|d| matches!(d["status"].as_str(), Some("succeeded" | "failed" | "cancelled")));
        if done {
            return docs;
        }
        if start.elapsed() > timeout {
            let summary: Vec<String> =
                docs.iter().map(|d| format!("{}:{}/{}", d["status"], d["steps_done"], d["steps_total"])).collect();
            panic!("jobs did not finish in {timeout:?}: {summary:?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub fn sim_stats(sim: &Proc) -> Value {
    http().get(format!("{}/_sim/stats", sim.url)).send().unwrap().json().unwrap()
}

pub fn sim_requests(sim: &Proc) -> std::collections::BTreeMap<String, u64> {
    http().get(format!("{}/_sim/requests", sim.url)).send().unwrap().json().unwrap()
}

/// Like `spawn`, but with the given `RUST_LOG` and with the child's stdout
/// also copied to `stdout_log`, so tests can read everything it printed.
pub fn spawn_with_log_level(
    args: &[&str],
    envs: &[(&str, &str)],
    rust_log: &str,
    log: &Path,
    stdout_log: &Path,
) -> Proc {
    let stderr = std::fs::File::create(log).expect("log file");
    let mut out = std::fs::File::create(stdout_log).expect("stdout log file");
    let mut child = Command::new(BIN)
        .args(args)
        .envs(envs.iter().copied())
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start ratepool");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Write;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = writeln!(out, "{line}");
            if let Some(url) = line.split("listening on ").nth(1) {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let url = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(u) => u,
        Err(_) => {
            let _ = child.kill();
            panic!("ratepool {args:?} did not start; log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
    };
    Proc { child, url, log: log.to_path_buf() }
}

/// The org and tenant key variables `start_server` sets, as owned pairs.
pub fn server_env(orgs: &[OrgSpec]) -> Vec<(String, String)> {
    let mut envs: Vec<(String, String)> = orgs.iter().map(|o| (org_key_env(o.name), org_key(o.name))).collect();
    envs.push(("TENANT_A_KEY".into(), TENANT_A_KEY.into()));
    envs.push(("TENANT_B_KEY".into(), TENANT_B_KEY.into()));
    envs
}

/// Like `start_server`, with `RUST_LOG=rust_log`; stderr goes to
/// `dir/log_name`, stdout to `dir/log_name.stdout`.
pub fn start_server_logged(dir: &Path, config: &Path, orgs: &[OrgSpec], log_name: &str, rust_log: &str) -> Proc {
    let envs = server_env(orgs);
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    spawn_with_log_level(
        &["serve", "--config", config.to_str().unwrap()],
        &envs,
        rust_log,
        &dir.join(log_name),
        &dir.join(format!("{log_name}.stdout")),
    )
}

/// A sequential chain of `n` small steps `s0 → s1 → …` (the benchmark's).
#[allow(unused_imports)] // not every test file that includes `common` runs chains
pub use ratepool::bench::chain_spec;

/// Starts `ratepool worker` (text logs to `dir/name.log`) and waits until it
/// says it runs.
#[allow(dead_code)] // only the AWS tests start workers
pub fn start_worker(dir: &Path, config: &Path, orgs: &[OrgSpec], name: &str) -> Proc {
    spawn_worker(dir, config, orgs, name, &[], &[])
}

/// `start_worker` with more environment variables (a database URL).
#[allow(dead_code)] // only the PostgreSQL storm passes any
pub fn start_worker_with_env(dir: &Path, config: &Path, orgs: &[OrgSpec], name: &str, envs: &[(&str, &str)]) -> Proc {
    spawn_worker(dir, config, orgs, name, &[], envs)
}

/// Starts `ratepool worker --listen 127.0.0.1:0` and waits until it both
/// listens (`url` is set) and runs its workers.
#[allow(dead_code)] // only the AWS tests start workers
pub fn start_listening_worker(dir: &Path, config: &Path, orgs: &[OrgSpec], name: &str) -> Proc {
    spawn_worker(dir, config, orgs, name, &["--listen", "127.0.0.1:0"], &[])
}

/// `ratepool worker` with `extra` arguments. Its stdout must say where it
/// listens (only when `--listen` was given) and then that it runs, and
/// nothing else before that.
#[allow(dead_code)] // only the AWS tests start workers
fn spawn_worker(
    dir: &Path,
    config: &Path,
    orgs: &[OrgSpec],
    name: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let mut child = Command::new(BIN)
        .args(["worker", "--config", config.to_str().unwrap(), "--text-logs"])
        .args(extra)
        .envs(server_env(orgs))
        .envs(envs.iter().copied())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let failed = |what: &str| panic!("worker {what}: {}", std::fs::read_to_string(&log).unwrap_or_default());
    let mut url = None;
    loop {
        let line = lines.next().and_then(Result::ok).unwrap_or_default();
        if line.contains("worker running") {
            break;
        }
        match line.strip_prefix("ratepool listening on ") {
            Some(addr) if url.is_none() && extra.contains(&"--listen") => url = Some(addr.trim().to_string()),
            _ => failed("did not start"),
        }
    }
    if extra.contains(&"--listen") && url.is_none() {
        failed("did not start listening");
    }
    std::thread::spawn(move || lines.for_each(drop));
    Proc { child, url: url.unwrap_or_default(), log }
}

/// Sends a real API Gateway REST proxy event (`fixtures/apigw_proxy_event.json`)
/// as tenant A through the Lambda handler serving `app`.
#[allow(dead_code)] // only the AWS tests call the Lambda
pub fn lambda_call(
    rt: &tokio::runtime::Runtime,
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    lambda_call_with(rt, app, method, path, body, &[])
}

/// What a Lambda function may answer (its invocation payload limit).
#[allow(dead_code)] // only the AWS tests call the Lambda
pub const LAMBDA_RESPONSE_LIMIT: usize = 6 * 1024 * 1024;

/// [`lambda_call`] with more request headers.
#[allow(dead_code)] // only the AWS tests call the Lambda
pub fn lambda_call_with(
    rt: &tokio::runtime::Runtime,
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let bearer = format!("Bearer {TENANT_A_KEY}");
    let all: Vec<(&str, &str)> =
        [("Authorization", bearer.as_str())].into_iter().chain(headers.iter().copied()).collect();
    let event = ratepool::lambda::rest_event(method, path, body, &all).unwrap();
    let resp = rt.block_on(ratepool::lambda::invoke(app.clone(), event)).expect("a valid API Gateway proxy event");
    assert_eq!(resp["isBase64Encoded"], false, "the API answers JSON text: {resp}");
    let size = serde_json::to_vec(&resp).map(|v| v.len()).unwrap_or(0);
    assert!(size < LAMBDA_RESPONSE_LIMIT, "{method} {path}: a {size}-byte response is over Lambda's 6 MB");
    let body = resp["body"].as_str().and_then(|t| serde_json::from_str(t).ok()).unwrap_or(Value::Null);
    (resp["statusCode"].as_u64().expect("a status code") as u16, body)
}

/// The AWS backend a test reads and checks through (interactive weight 3).
#[allow(dead_code)] // only the AWS tests open the store
pub fn aws_store(
    rt: &tokio::runtime::Runtime,
    cfg: &ratepool::config::Config,
    visibility: Duration,
) -> ratepool::storage::Backend {
    rt.block_on(async {
        let clients = ratepool::aws::AwsClients::load(&cfg.aws).await;
        ratepool::aws::connect(
            &clients,
            &cfg.aws,
            visibility,
            std::num::NonZeroU64::new(3).expect("non-zero"),
            std::sync::Arc::new(ratepool::domain::SystemClock),
        )
        .await
        .expect("connect to the AWS backend")
    })
}

/// A job whose outline comes back in a shape its fan-out cannot use.
pub fn broken_outline(response_format: Value, for_each: &str, max_fan_out: Option<u32>) -> String {
    let mut v = json!({
        "name": "broken", "defaults": {"model": "gpt-4o-mini", "max_tokens": 300},
        "steps": [
            {"id": "outline", "response_format": response_format,
             "messages": [{"role": "user", "content": "Outline the film as JSON."}]},
            {"id": "scene", "for_each": for_each, "messages": [{"role": "user", "content": "Write {{item}}."}]},
            {"id": "notes", "messages": [{"role": "user", "content": "{{join(steps.scene.outputs, \"\\n\")}}"}]}
        ]
    });
    if let Some(cap) = max_fan_out {
        v["max_fan_out"] = json!(cap);
    }
    v.to_string()
}

/// A json_object outline (no schema to check at submission) answered with
/// an object, and an outline whose schema asks for six scenes in a job
/// capped at four.
pub fn broken_outlines() -> [(String, &'static str); 2] {
    let six = json!({"type": "json_schema", "json_schema": {"name": "outline", "schema": {
        "type": "object", "required": ["scenes"], "properties": {
            "scenes": {"type": "array", "minItems": 6, "maxItems": 6, "items": {"type": "string", "maxLength": 20}}}}}});
    [
        (
            broken_outline(json!({"type": "json_object"}), "steps.outline.json", None),
            "step scene: for_each steps.outline.json: is an object, not an array",
        ),
        (
            broken_outline(six, "steps.outline.json.scenes", Some(4)),
            "step scene: for_each steps.outline.json.scenes: has 6 elements, more than the cap of 4 (max_fan_out)",
        ),
    ]
}
