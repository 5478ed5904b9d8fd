//! End to end on the AWS emulator: the Lambda handler (invoked in-process
//! with real API Gateway proxy events) submits screenplay jobs; worker
//! processes run them on SQS + DynamoDB against `ratepool sim`; a worker is
//! SIGKILLed mid-job. Also: a poison job ends in the dead-letter queue.
//! Needs the moto emulator `make test` starts (`AWS_ENDPOINT_URL`).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ratepool::aws::AwsClients;
use ratepool::config::Config;
use ratepool::domain::JobId;
use serde_json::{Value, json};

fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| {
        panic!("AWS_ENDPOINT_URL is not set: run through `make test`, which starts the moto emulator")
    })
}

/// A config on fresh, uniquely named tables, queues and outputs bucket.
fn write_aws_config(dir: &Path, sim_url: &str, orgs: &[OrgSpec], workers: &str) -> (std::path::PathBuf, Config) {
    write_aws_config_with(dir, sim_url, orgs, workers, true)
}

/// [`write_aws_config`], with or without `[aws] outputs_bucket`.
fn write_aws_config_with(
    dir: &Path,
    sim_url: &str,
    orgs: &[OrgSpec],
    workers: &str,
    bucket: bool,
) -> (std::path::PathBuf, Config) {
    let s = uuid::Uuid::new_v4().simple().to_string();
    let s = &s[..10];
    let bucket = if bucket { format!("outputs_bucket = \"outputs-{s}\"\n") } else { String::new() };
    let mut toml = format!(
        "[storage]\nbackend = \"aws\"\n[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\njobs_table = \"jobs-{s}\"\nledger_table = \"ledger-{s}\"\ninteractive_queue = \"i-{s}\"\nbatch_queue = \"b-{s}\"\ndead_letter_queue = \"d-{s}\"\nmetrics_namespace = \"Ratepool-{s}\"\n{bucket}{workers}\n",
        endpoint()
    );
    toml.push_str(&orgs_toml(sim_url, orgs));
    toml.push_str("[[tenants]]\nname = \"alpha\"\napi_key_env = \"TENANT_A_KEY\"\n");
    let path = dir.join("aws.toml");
    std::fs::write(&path, &toml).unwrap();
    let out = Command::new(BIN).args(["aws", "init", "--config", path.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "aws init failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("created"), "aws init created nothing");
    (path, Config::parse(&toml).unwrap())
}

/// The API as the Lambda runs it.
struct Lambda {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
}

impl Lambda {
    fn new(cfg: &Config) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let env = BTreeMap::from([("TENANT_A_KEY".to_string(), TENANT_A_KEY.to_string())]);
        let app =
            rt.block_on(async { ratepool::api::router(ratepool::serve::lambda_state(cfg, Some(&env)).await.unwrap()) });
        Self { rt, app }
    }

    /// Sends a real API Gateway REST proxy event through the handler.
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        lambda_call(&self.rt, &self.app, method, path, body)
    }

    fn wait_all(&self, ids: &[String], timeout: Duration) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let docs: Vec<Value> = ids.iter().map(|id| self.call("GET", &format!("/v1/jobs/{id}"), None).1).collect();
            if docs.iter().all(|d| matches!(d["status"].as_str(), Some("succeeded" | "failed" | "cancelled"))) {
                return docs;
            }
            if start.elapsed() > timeout {
                let s: Vec<String> =
                    docs.iter().map(|d| format!("{}:{}/{}", d["status"], d["steps_done"], d["steps_total"])).collect();
                panic!("jobs did not finish in {timeout:?}: {s:?}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn backend(rt: &tokio::runtime::Runtime, cfg: &Config) -> ratepool::storage::Backend {
    aws_store(rt, cfg, Duration::from_secs(3))
}

/// The queues end empty (within 30 s of the jobs finishing: a message
/// deferred while a lease was held comes back once that lease would have
/// ended, and the worker that receives it finds the job finished and
/// deletes it) and no job is left leased.
fn nothing_left_behind(rt: &tokio::runtime::Runtime, store: &ratepool::storage::Backend, ids: &[String]) {
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let q = store.queue.stats().await.unwrap();
            if (q.visible, q.in_flight, q.dead) == (0, 0, 0) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "queue not empty 30 s after the jobs finished: {q:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        for id in ids {
            let j = store.jobs.get_job(&JobId::parse(id.as_str()).unwrap()).await.unwrap().unwrap();
            assert_eq!(j.lease_owner, None, "{id} still leased");
        }
    });
}

#[test]
fn lambda_submits_workers_run_and_a_killed_worker_loses_no_step() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [
        OrgSpec { name: "org-a", rpm: 2_000, tpm: 1_500_000 },
        OrgSpec { name: "org-b", rpm: 2_000, tpm: 1_500_000 },
        OrgSpec { name: "org-c", rpm: 2_000, tpm: 1_500_000 },
    ];
    let sim = start_sim(dir.path(), &orgs, (60.0, 0.2, 1.0));
    let workers = "[workers]\nconcurrency = 8\nstep_parallelism = 4\nvisibility_timeout_secs = 4\n";
    let (cfg_path, cfg) = write_aws_config(dir.path(), &sim.url, &orgs, workers);
    let lambda = Lambda::new(&cfg);
    let mut w1 = start_worker(dir.path(), &cfg_path, &orgs, "worker-1");
    let _w2 = start_worker(dir.path(), &cfg_path, &orgs, "worker-2");

    let ids: Vec<String> = (0..10)
        .map(|n| {
            let (status, body) = lambda.call("POST", "/v1/jobs", Some(&screenplay(n)));
            assert_eq!(status, 202, "{body}");
            body["id"].as_str().unwrap().to_string()
        })
        .collect();
    // Bad input gets the same answer through the Lambda as from the server.
    let (status, body) = lambda.call("POST", "/v1/jobs", Some("{\"name\": 1}"));
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("name")), "{body}");

    // Kill worker 1 once the jobs are well under way.
    let start = Instant::now();
    loop {
        let done: u64 = ids
            .iter()
            .map(|id| lambda.call("GET", &format!("/v1/jobs/{id}"), None).1["steps_done"].as_u64().unwrap_or(0))
            .sum();
        if done >= 60 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(180), "no progress: {done} steps");
        std::thread::sleep(Duration::from_millis(200));
    }
    w1.kill();
    let store = backend(&lambda.rt, &cfg);
    let at_kill: BTreeMap<String, Vec<String>> = lambda.rt.block_on(async {
        let mut out = BTreeMap::new();
        for id in &ids {
            let cps = store.jobs.checkpoints(&JobId::parse(id.as_str()).unwrap()).await.unwrap();
            out.insert(id.clone(), cps.into_iter().map(|c| c.step.to_string()).collect());
        }
        out
    });

    let docs = lambda.wait_all(&ids, Duration::from_secs(300));
    for d in &docs {
        assert_eq!(d["status"], "succeeded", "{d}");
    }
    let counts = sim_requests(&sim);
    for (job, steps) in &at_kill {
        for step in steps {
            assert_eq!(
                counts.get(&format!("{job}/{step}")),
                Some(&1),
                "{job}/{step} was finished before the kill and called again"
            );
        }
    }
    let stats = sim_stats(&sim);
    let total = stats["total_calls"].as_u64().unwrap();
    let mut rejected = 0;
    for o in &orgs {
        let s = &stats["orgs"][o.name];
        rejected += s["rate_limited_requests"].as_u64().unwrap() + s["rate_limited_tokens"].as_u64().unwrap();
        let m = &s["models"]["gpt-4o-mini"];
        assert!(m["peak_60s_tokens"].as_u64() <= m["window_bound_tokens"].as_u64(), "{}: {m}", o.name);
    }
    assert!(rejected * 1000 <= total, "429s on {rejected} of {total} calls");
    // Nothing left behind: queues empty, no lease held.
    nothing_left_behind(&lambda.rt, &store, &ids);
}

#[test]
fn a_poison_job_is_dead_lettered_and_failed_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [OrgSpec { name: "org-a", rpm: 1_000, tpm: 1_000_000 }];
    // Calls take a minute: no step ever finishes before the worker dies.
    let sim = start_sim(dir.path(), &orgs, (60_000.0, 0.0, 1.0));
    let workers = "[workers]\nvisibility_timeout_secs = 2\nmax_receives = 2\n";
    let (cfg_path, cfg) = write_aws_config(dir.path(), &sim.url, &orgs, workers);
    let lambda = Lambda::new(&cfg);
    let (status, body) = lambda.call("POST", "/v1/jobs", Some(&screenplay(0)));
    assert_eq!(status, 202, "{body}");
    let id = JobId::parse(body["id"].as_str().unwrap()).unwrap();
    let store = backend(&lambda.rt, &cfg);
    let job = |store: &ratepool::storage::Backend| lambda.rt.block_on(store.jobs.get_job(&id)).unwrap().unwrap();

    // Each worker dies (SIGKILL) as soon as it has taken the job, until one
    // finds the job has stalled more than `max_receives` runs and gives up.
    let failed = |store: &ratepool::storage::Backend| job(store).status == ratepool::storage::JobStatus::Failed;
    let wait_for = |what: &dyn Fn() -> bool, secs: u64| {
        let t = Instant::now();
        while !what() && t.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut kills = 0;
    // The last worker lives on: it moves the message after failing the job.
    let _last = loop {
        assert!(kills <= 5, "job never failed: {:?}", job(&store));
        let runs = job(&store).stalled_runs;
        let mut w = start_worker(dir.path(), &cfg_path, &orgs, &format!("worker-{kills}"));
        wait_for(&|| job(&store).stalled_runs != runs || failed(&store), 30);
        if job(&store).stalled_runs > 2 {
            wait_for(&|| failed(&store), 30);
            break w;
        }
        w.kill();
        kills += 1;
    };
    let j = job(&store);
    assert_eq!(j.status, ratepool::storage::JobStatus::Failed, "{j:?}");
    assert!(j.error.as_deref().unwrap_or("").contains("dead-lettered"), "{j:?}");
    assert_eq!(kills, 2, "max_receives = 2: the third run finds two stalled runs before it and gives up");
    // The worker marks the job failed, then moves its message: give the
    // move a moment on a slow emulator.
    let dead = lambda.rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let dead = store.queue.dead_letters(10).await.unwrap();
            if !dead.is_empty() || tokio::time::Instant::now() >= deadline {
                break dead;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].message.job_id, id);
    let (status, body) = lambda.call("GET", &format!("/v1/jobs/{id}"), None);
    assert_eq!((status, body["status"].as_str()), (200, Some("failed")), "{body}");
}

/// A stand-in for the ECS agent's task-protection endpoint that records
/// every state it is asked to set.
fn fake_ecs_agent(rt: &tokio::runtime::Runtime) -> (String, Arc<std::sync::Mutex<Vec<Value>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/task-protection/v1/state",
        axum::routing::put(move |axum::Json(body): axum::Json<Value>| {
            let record = record.clone();
            async move {
                record.lock().unwrap().push(body);
                axum::Json(json!({"protection": {"ProtectionEnabled": true}}))
            }
        }),
    );
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

#[test]
fn sigterm_hands_jobs_back_drops_task_protection_and_publishes_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [OrgSpec { name: "org-a", rpm: 10_000, tpm: 10_000_000 }];
    // Slow calls: the worker is mid-job when it is told to stop.
    let sim = start_sim(dir.path(), &orgs, (400.0, 0.5, 1.0));
    let workers = "[workers]\nvisibility_timeout_secs = 30\nshutdown_grace_secs = 1\n";
    let (cfg_path, cfg) = write_aws_config(dir.path(), &sim.url, &orgs, workers);
    let lambda = Lambda::new(&cfg);
    let (agent, protection) = fake_ecs_agent(&lambda.rt);

    let log = dir.path().join("worker-term.log");
    let out = dir.path().join("worker-term.out");
    let mut child = Command::new(BIN)
        .args(["worker", "--config", cfg_path.to_str().unwrap()])
        .envs(server_env(&orgs))
        .env("ECS_AGENT_URI", &agent)
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let (status, body) = lambda.call("POST", "/v1/jobs", Some(&screenplay(0)));
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();

    let start = Instant::now();
    while lambda.call("GET", &format!("/v1/jobs/{id}"), None).1["steps_done"].as_u64().unwrap_or(0) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no progress; log:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let asked = Instant::now();
    while protection.lock().unwrap().is_empty() && asked.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(protection.lock().unwrap().first().map(|b| b["ProtectionEnabled"].clone()), Some(json!(true)));

    let stopped = Instant::now();
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(stopped.elapsed() < Duration::from_secs(100), "worker still running 100 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "exit {exit:?}; log:\n{}", std::fs::read_to_string(&log).unwrap());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.lines().all(|l| l.trim().is_empty() || l.starts_with('{')), "worker logs are JSON lines:\n{logged}");
    assert_eq!(protection.lock().unwrap().last().map(|b| b["ProtectionEnabled"].clone()), Some(json!(false)));

    // Handed back, not left hidden for the 30 s visibility timeout: a new
    // worker finishes it well before that.
    let store = backend(&lambda.rt, &cfg);
    let job = lambda.rt.block_on(store.jobs.get_job(&JobId::parse(id.as_str()).unwrap())).unwrap().unwrap();
    assert_eq!(job.lease_owner, None, "lease released on SIGTERM: {job:?}");
    let _w = start_worker(dir.path(), &cfg_path, &orgs, "worker-after");
    let docs = lambda.wait_all(std::slice::from_ref(&id), Duration::from_secs(25));
    assert_eq!(docs[0]["status"], "succeeded");

    // The stopped worker's last window left as CloudWatch embedded metric
    // format documents on its stdout (the log driver ships them).
    let emf = std::fs::read_to_string(&out).unwrap();
    let docs: Vec<Value> =
        emf.lines().filter(|l| l.contains("\"_aws\"")).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!docs.is_empty(), "no EMF document on stdout:\n{emf}");
    for d in &docs {
        assert_eq!(d["_aws"]["CloudWatchMetrics"][0]["Namespace"], json!(cfg.aws.metrics_namespace), "{d}");
    }
    let calls: f64 = docs.iter().filter(|d| d["Org"] == "org-a").filter_map(|d| d["Calls"].as_f64()).sum();
    assert!(calls >= 2.0, "EMF Calls for org-a: {calls}");
}

/// `ratepool worker --listen`, as the Fargate task runs it behind the load
/// balancer: it answers health checks and OpenAI calls on the pool, a
/// durable call is stored in DynamoDB and replayed with no provider call,
/// and SIGTERM stops it cleanly.
#[test]
fn a_listening_worker_serves_the_calls_door_from_dynamodb() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [OrgSpec { name: "org-a", rpm: 2_000, tpm: 1_500_000 }];
    let sim = start_sim(dir.path(), &orgs, (5.0, 0.0, 1.0));
    let (path, _cfg) = write_aws_config(dir.path(), &sim.url, &orgs, "[workers]\nvisibility_timeout_secs = 5\n");
    let mut worker = start_listening_worker(dir.path(), &path, &orgs, "worker");

    let health: Value = http().get(format!("{}/healthz", worker.url)).send().unwrap().json().unwrap();
    assert_eq!(health["status"], "ok", "{health}");

    let body = json!({"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hello"}]});
    let call = || {
        http()
            .post(format!("{}/v1/chat/completions", worker.url))
            .bearer_auth(TENANT_A_KEY)
            .header("Idempotency-Key", "aws-listener-1")
            .json(&body)
            .send()
            .unwrap()
    };
    let first = call();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-ratepool-org"], "org-a");
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().unwrap();
    let again = call();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().unwrap(), first, "the stored answer");
    let accepted = sim_stats(&sim)["orgs"]["org-a"]["accepted_calls"].as_u64().unwrap();
    assert_eq!(accepted, 1, "the replay reached no org");

    let refused = http()
        .post(format!("{}/v1/chat/completions", worker.url))
        .bearer_auth("not-a-tenant-key-0000")
        .json(&body)
        .send();
    assert_eq!(refused.unwrap().status(), 401);

    // SIGTERM: the worker stops its listener and its workers and exits 0.
    let pid = worker.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = worker.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the worker did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
}

/// Steps that speak the whole chat API, on SQS + DynamoDB: a bad request
/// field is a 400 naming it with nothing stored or enqueued; the screenplay
/// example's scenes fan out from its `json_schema` outline, a worker is
/// SIGKILLed mid-fan-out and no instance it finished is called again; an
/// outline that is not an array, or is longer than the job's cap, fails
/// its job naming the step and the path.
#[test]
fn fan_out_on_aws_resumes_after_a_killed_worker_and_fails_bad_outlines_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [
        OrgSpec { name: "org-a", rpm: 100_000, tpm: 100_000_000 },
        OrgSpec { name: "org-b", rpm: 100_000, tpm: 100_000_000 },
    ];
    // Scenes take about half a second each, so the kill lands among them.
    let sim = start_sim(dir.path(), &orgs, (50.0, 0.5, 1.0));
    let workers = "[workers]\nconcurrency = 4\nstep_parallelism = 4\nvisibility_timeout_secs = 4\n";
    let (cfg_path, cfg) = write_aws_config(dir.path(), &sim.url, &orgs, workers);
    let lambda = Lambda::new(&cfg);
    let store = backend(&lambda.rt, &cfg);
    let alpha = ratepool::domain::TenantId::parse("alpha").unwrap();

    let mut bad: Value = serde_json::from_str(&screenplay(0)).unwrap();
    bad["defaults"]["top_p"] = json!(1.5);
    let (status, body) = lambda.call("POST", "/v1/jobs", Some(&bad.to_string()));
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("defaults.top_p")), "{body}");
    assert_eq!(lambda.rt.block_on(store.jobs.jobs_in_flight(&alpha)).unwrap(), 0, "nothing stored");
    let q = lambda.rt.block_on(store.queue.stats()).unwrap();
    assert_eq!((q.visible, q.in_flight), (0, 0), "nothing enqueued: {q:?}");

    let mut w1 = start_worker(dir.path(), &cfg_path, &orgs, "worker-1");
    let submit = |body: &str| {
        let (status, b) = lambda.call("POST", "/v1/jobs", Some(body));
        assert_eq!(status, 202, "{b}");
        b["id"].as_str().unwrap().to_string()
    };
    let id = submit(&screenplay(0));
    let broken = broken_outlines();
    let broken_ids: Vec<String> = broken.iter().map(|(body, _)| submit(body)).collect();

    let doc = |id: &str| lambda.call("GET", &format!("/v1/jobs/{id}"), None).1;
    let start = Instant::now();
    let total_known = loop {
        let d = doc(&id);
        if d["steps_done"].as_u64().unwrap_or(0) >= 10 {
            break d["steps_total"].as_u64().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(180), "no progress: {d}");
        std::thread::sleep(Duration::from_millis(50));
    };
    w1.kill();
    let job = JobId::parse(id.as_str()).unwrap();
    let at_kill: Vec<String> =
        lambda.rt.block_on(store.jobs.checkpoints(&job)).unwrap().into_iter().map(|c| c.step.to_string()).collect();
    let scenes = total_known as usize - 11;
    let scenes_at_kill = at_kill.iter().filter(|k| k.starts_with("scene[")).count();
    assert!(
        scenes_at_kill >= 1 && scenes_at_kill < scenes,
        "the kill must land mid-fan-out: {scenes_at_kill} of {scenes} scenes were done"
    );

    let _w2 = start_worker(dir.path(), &cfg_path, &orgs, "worker-2");
    let mut all = vec![id.clone()];
    all.extend(broken_ids.iter().cloned());
    let docs = lambda.wait_all(&all, Duration::from_secs(300));
    assert_eq!(docs[0]["status"], "succeeded", "{}", docs[0]);
    assert_eq!(
        (docs[0]["steps_total"].as_u64(), docs[0]["steps_done"].as_u64()),
        (Some(total_known), Some(total_known))
    );
    let counts = sim_requests(&sim);
    for key in &at_kill {
        assert_eq!(counts.get(&format!("{id}/{key}")), Some(&1), "{key} was finished before the kill and called again");
    }
    for ((_, reason), (d, bid)) in broken.iter().zip(docs[1..].iter().zip(&broken_ids)) {
        assert_eq!((d["status"].as_str(), d["error"].as_str()), (Some("failed"), Some(*reason)), "{d}");
        assert!(counts.keys().all(|k| !k.starts_with(&format!("{bid}/scene"))), "no instance was called");
    }
    let (status, result) = lambda.call("GET", &format!("/v1/jobs/{id}/result"), None);
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["messages"]["outline"]["parsed"]["scenes"].as_array().map(Vec::len), Some(scenes));
    assert_eq!(result["outputs"].as_object().map(|o| o.len()), Some(total_known as usize));
}

/// A job whose first step answers about 1 MB (two choices of 65,536 to
/// 131,072 tokens, four characters each), read whole by the next step's
/// template; a third step is small.
fn large_answer_job() -> String {
    json!({
        "name": "large answer",
        "defaults": {"model": "gpt-4o-mini"},
        "steps": [
            {"id": "draft", "max_tokens": 131_072, "n": 2,
             "messages": [{"role": "user", "content": "Write the whole novel."}]},
            {"id": "blurb", "max_tokens": 64,
             "messages": [{"role": "user", "content": "Blurb for: {{steps.draft.output}}"}]},
            {"id": "title", "max_tokens": 16,
             "messages": [{"role": "user", "content": "A title."}]}
        ]
    })
    .to_string()
}

/// Issue 15, item 7: a step's answer over DynamoDB's 400 KB item limit is
/// stored in S3 behind a pointer, the job succeeds, the next step's
/// template reads it, and `/result` through the Lambda serves it whole in
/// pages under Lambda's 6 MB response limit.
#[test]
fn an_answer_over_the_item_limit_is_stored_in_s3_and_read_back_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [OrgSpec { name: "org-a", rpm: 1_000, tpm: 100_000_000 }];
    let sim = start_sim(dir.path(), &orgs, (20.0, 0.0, 1.0));
    let workers = "[workers]\nconcurrency = 2\nvisibility_timeout_secs = 4\n";
    let (cfg_path, cfg) = write_aws_config(dir.path(), &sim.url, &orgs, workers);
    let lambda = Lambda::new(&cfg);
    let _worker = start_worker(dir.path(), &cfg_path, &orgs, "worker-1");
    let (status, body) = lambda.call("POST", "/v1/jobs", Some(&large_answer_job()));
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let doc = &lambda.wait_all(std::slice::from_ref(&id), Duration::from_secs(25))[0];
    assert_eq!(doc["status"], "succeeded", "{doc}");
    let requests: u64 = sim_requests(&sim).values().sum();
    assert_eq!(requests, 3, "each step called once: {:?}", sim_requests(&sim));

    let store = backend(&lambda.rt, &cfg);
    let stored = lambda.rt.block_on(store.jobs.checkpoints(&JobId::parse(id.as_str()).unwrap())).unwrap();
    let draft = stored.iter().find(|c| c.step.to_string() == "draft").expect("the draft step");
    assert!(draft.answer_bytes() > 400 * 1024, "over the item limit: {} bytes", draft.answer_bytes());
    assert_eq!(draft.answer.choices().len(), 2);

    // One step a page: three pages, each naming the next.
    let mut pages = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let query = match &next {
            None => "?limit=1".to_string(),
            Some(after) => format!("?limit=1&after={after}"),
        };
        let (status, page) = lambda.call("GET", &format!("/v1/jobs/{id}/result{query}"), None);
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["outputs"].as_object().map(|o| o.len()), Some(1), "{query}");
        next = page["next"].as_str().map(str::to_owned);
        pages.push(page);
        if next.is_none() {
            break;
        }
        assert!(pages.len() < 3, "three steps, three pages");
    }
    assert_eq!(pages.len(), 3);
    let page_of = |step: &str| pages.iter().find(|p| p["outputs"].get(step).is_some()).expect(step);
    assert_eq!(page_of("draft")["outputs"]["draft"].as_str(), Some(draft.output()));
    assert_eq!(page_of("draft")["messages"]["draft"]["choices"].as_array().map(Vec::len), Some(2));

    // Without a limit the byte budget pages it; together the pages are the
    // whole result.
    let (status, first) = lambda.call("GET", &format!("/v1/jobs/{id}/result"), None);
    assert_eq!(status, 200, "{first}");
    let mut seen: Vec<String> = first["outputs"].as_object().unwrap().keys().cloned().collect();
    let mut after = first["next"].as_str().map(str::to_owned);
    while let Some(a) = after {
        let (status, page) = lambda.call("GET", &format!("/v1/jobs/{id}/result?after={a}"), None);
        assert_eq!(status, 200, "{page}");
        seen.extend(page["outputs"].as_object().unwrap().keys().cloned());
        after = page["next"].as_str().map(str::to_owned);
    }
    seen.sort();
    assert_eq!(seen, ["blurb", "draft", "title"]);
    let (status, bad) = lambda.call("GET", &format!("/v1/jobs/{id}/result?after=nope"), None);
    assert_eq!((status, bad["error"]["field"].as_str()), (400, Some("after")), "{bad}");
}

/// Without `[aws] outputs_bucket`, a step whose answer is over the item
/// limit fails its job at once with a reason naming the setting, instead
/// of being called again on every run until the job is dead-lettered.
#[test]
fn without_a_bucket_an_answer_over_the_item_limit_fails_the_job_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [OrgSpec { name: "org-a", rpm: 1_000, tpm: 100_000_000 }];
    let sim = start_sim(dir.path(), &orgs, (20.0, 0.0, 1.0));
    let workers = "[workers]\nconcurrency = 2\nvisibility_timeout_secs = 2\nmax_receives = 2\n";
    let (cfg_path, cfg) = write_aws_config_with(dir.path(), &sim.url, &orgs, workers, false);
    let lambda = Lambda::new(&cfg);
    let _worker = start_worker(dir.path(), &cfg_path, &orgs, "worker-1");
    let (status, body) = lambda.call("POST", "/v1/jobs", Some(&large_answer_job()));
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let doc = &lambda.wait_all(std::slice::from_ref(&id), Duration::from_secs(20))[0];
    assert_eq!(doc["status"], "failed", "{doc}");
    let error = doc["error"].as_str().unwrap_or_default();
    assert!(error.contains("[aws] outputs_bucket") && error.contains("step draft"), "{doc}");
    // The draft, and perhaps the title beside it; neither twice.
    let requests = sim_requests(&sim);
    assert!(requests.values().all(|n| *n == 1) && requests.len() <= 2, "no step called again: {requests:?}");
}

/// Issue 15's storm on SQS + DynamoDB: two `ratepool worker`s whose own
/// storage calls fail, are throttled, lose their answers and stall past the
/// lease's renewal time (`[drill.storage_faults]`, the same plan as the
/// drill through `serve` in `e2e_faults`); the API (the Lambda) runs
/// without the drill. Every job succeeds, every step reaches the provider
/// once, the queues end empty and no lease is left. Both workers read the
/// same plan and seed; 30 jobs give each a few hundred storage calls, so
/// every kind of fault is drawn.
#[test]
fn a_storage_fault_drill_on_sqs_and_dynamodb_strands_nothing_and_calls_nothing_twice() {
    const JOBS: usize = 30;
    const STEPS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let orgs = [OrgSpec { name: "org-a", rpm: 100_000, tpm: 100_000_000 }];
    let sim = start_sim(dir.path(), &orgs, (20.0, 0.0, 1.0));
    let workers = "[workers]\nconcurrency = 8\nvisibility_timeout_secs = 4\n\
                   [drill.storage_faults]\nwrite_error = 0.03\nthrottle = 0.015\nlost_response = 0.015\n\
                   slow = 0.02\nslow_ms = 2000\nseed = 15\n";
    let (cfg_path, cfg) = write_aws_config(dir.path(), &sim.url, &orgs, workers);
    let mut api_cfg = cfg.clone();
    api_cfg.drill.storage_faults = None;
    let lambda = Lambda::new(&api_cfg);
    let w1 = start_listening_worker(dir.path(), &cfg_path, &orgs, "worker-1");
    let w2 = start_listening_worker(dir.path(), &cfg_path, &orgs, "worker-2");
    let started = Instant::now();
    let ids: Vec<String> = (0..JOBS)
        .map(|n| {
            let (status, body) = lambda.call("POST", "/v1/jobs", Some(&chain_spec(&format!("drill-{n}"), STEPS, 16)));
            assert_eq!(status, 202, "{body}");
            body["id"].as_str().unwrap().to_string()
        })
        .collect();
    let docs = lambda.wait_all(&ids, Duration::from_secs(240));
    let took = started.elapsed();
    for d in &docs {
        assert_eq!((d["status"].as_str(), d["steps_done"].as_u64()), (Some("succeeded"), Some(STEPS as u64)), "{d}");
    }
    let accepted = sim_requests(&sim);
    let twice: Vec<_> = accepted.iter().filter(|(_, n)| **n > 1).collect();
    assert_eq!(accepted.len(), JOBS * STEPS, "every step reached the provider");
    assert!(twice.is_empty(), "steps called again: {twice:?}");
    let store = backend(&lambda.rt, &cfg);
    nothing_left_behind(&lambda.rt, &store, &ids);
    let kinds = ["write_error", "throttled", "lost_response", "slow", "writes_applied"];
    let mut injected = [0u64; 5];
    for w in [&w1, &w2] {
        let text = http().get(format!("{}/metrics", w.url)).send().unwrap().text().unwrap();
        for (i, kind) in kinds.iter().enumerate() {
            injected[i] +=
                sample(&text, "ratepool_drill_storage_faults", &format!("kind=\"{kind}\"")).unwrap_or(0.0) as u64;
        }
    }
    println!(
        "drill on SQS + DynamoDB: {JOBS} jobs x {STEPS} steps in {took:?} on 2 workers; injected {} errors, {} \
         throttled, {} lost answers, {} stalls of 2 s over {} writes applied",
        injected[0], injected[1], injected[2], injected[3], injected[4]
    );
    for (kind, n) in kinds.iter().zip(injected).take(4) {
        assert!(n > 0, "no {kind} injected");
    }
}

/// Tenant keys live in their own Secrets Manager secret: the API (here the
/// gateway authorizer, as the Lambda runs it) reads them at start and again
/// once they are stale, so a rotated key works and the revoked one is
/// refused without a restart; org keys are in the workers' secret, which
/// the API never reads.
#[test]
fn a_tenant_key_rotated_in_its_secret_takes_effect_in_a_running_authorizer() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [OrgSpec { name: "org-a", rpm: 100, tpm: 100_000 }];
    let (_path, mut cfg) = write_aws_config(dir.path(), "http://127.0.0.1:9", &orgs, "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let clients = rt.block_on(AwsClients::load(&cfg.aws));
    let (old, new) = ("tenant-key-old-0123456789", "tenant-key-new-0123456789");
    let secret = |name: String, value: Value| {
        let out =
            rt.block_on(clients.secrets.create_secret().name(name).secret_string(value.to_string()).send()).unwrap();
        out.arn().unwrap().to_string()
    };
    let s = uuid::Uuid::new_v4().simple().to_string();
    let tenant_arn = secret(format!("tenants-{s}"), json!({"TENANT_A_KEY": old}));
    cfg.aws.tenant_keys_secret_arn = Some(tenant_arn.clone());
    cfg.aws.worker_keys_secret_arn = Some(secret(format!("workers-{s}"), json!({"ORG_A_KEY": "sk-org"})));

    let keys = rt.block_on(ratepool::serve::tenant_keyring(&cfg, Some(&clients), Duration::from_secs(1))).unwrap();
    let event = |key: &str| {
        serde_json::from_value::<lambda_http::aws_lambda_events::apigw::ApiGatewayCustomAuthorizerRequestTypeRequest>(
            json!({"type": "REQUEST", "methodArn": "arn:aws:execute-api:us-east-1:111122223333:api1/prod/GET/v1/usage",
                   "headers": {"Authorization": format!("Bearer {key}")}, "requestContext": {}}),
        )
        .unwrap()
    };
    let tenant = |key: &str| {
        rt.block_on(ratepool::lambda::authorize(&keys, "usage-", &event(key))).ok().map(|v| v["principalId"].clone())
    };
    assert_eq!(tenant(old), Some(json!("alpha")));
    assert_eq!(tenant(new), None);

    rt.block_on(
        clients
            .secrets
            .put_secret_value()
            .secret_id(&tenant_arn)
            .secret_string(json!({"TENANT_A_KEY": new}).to_string())
            .send(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1_100));
    assert_eq!(tenant(new), Some(json!("alpha")), "the rotated key is read again once the keys are stale");
    assert_eq!(tenant(old), None, "the revoked key is refused");

    // The org key is not among what the API reads.
    let env = rt.block_on(ratepool::aws::SecretEnv::load(&clients, &tenant_arn)).unwrap();
    assert_eq!(ratepool::domain::Env::var(&env, "ORG_A_KEY"), None);
}
