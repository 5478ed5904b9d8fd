//! Lifecycle, end to end with real processes: cancelling jobs (running and
//! queued) stops their calls; the CLI submits, waits and reads results;
//! SIGTERM hands running jobs back and exits 0, and a restart finishes them
//! without repeating a step; bad configs stop `serve` at once with a message
//! naming the line or variable; and no key ever reaches a log.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ratepool::domain::{JobId, SystemClock};
use ratepool::local::{SqliteBackend, SqliteOptions};
use serde_json::Value;

const ORG: [OrgSpec; 1] = [OrgSpec { name: "org-a", rpm: 100_000, tpm: 100_000_000 }];

fn job(url: &str, id: &str) -> Value {
    let (status, body) = get(&format!("{url}/v1/jobs/{id}"), TENANT_A_KEY);
    assert_eq!(status, 200, "{body}");
    body
}

fn submit_ok(url: &str, spec: &str) -> String {
    let (status, body) = submit(url, TENANT_A_KEY, spec);
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().unwrap().to_string()
}

fn cancel(url: &str, id: &str) -> (u16, Value) {
    let r = http().post(format!("{url}/v1/jobs/{id}/cancel")).bearer_auth(TENANT_A_KEY).send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// Calls the simulator admitted for `job`'s steps.
fn calls_for(sim: &Proc, job: &str) -> BTreeMap<String, u64> {
    let prefix = format!("{job}/");
    sim_requests(sim).into_iter().filter(|(k, _)| k.starts_with(&prefix)).collect()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the database holds for each job: its checkpointed step ids.
fn checkpointed(db: &Path, ids: &[String]) -> BTreeMap<String, Vec<String>> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let db = SqliteBackend::open(
            db,
            SqliteOptions { visibility_timeout: Duration::from_secs(3), clock: Arc::new(SystemClock) },
        )
        .unwrap()
        .backend();
        let mut out = BTreeMap::new();
        for id in ids {
            let cps = db.jobs.checkpoints(&JobId::parse(id.as_str()).unwrap()).await.unwrap();
            out.insert(id.clone(), cps.into_iter().map(|c| c.step.to_string()).collect());
        }
        out
    })
}

#[test]
fn cancelling_stops_a_running_job_and_a_queued_one_and_results_wait_for_success() {
    let dir = tempfile::tempdir().unwrap();
    // 300 ms per call: a 40-step chain is mid-way for ~12 s.
    let sim = start_sim(dir.path(), &ORG, (300.0, 0.0, 1.0));
    // One job at a time, so a second one stays queued; heartbeat every 1 s.
    let cfg =
        write_serve_config(dir.path(), &sim.url, &ORG, "[workers]\nconcurrency = 1\nvisibility_timeout_secs = 3\n");
    let server = start_server(dir.path(), &cfg, &ORG, "serve.log");
    let url = &server.url;

    // A short job succeeds: its result has every step; it cannot be cancelled.
    let short = submit_ok(url, &chain_spec("short", 2, 8));
    let docs = wait_all(url, TENANT_A_KEY, std::slice::from_ref(&short), Duration::from_secs(20));
    assert_eq!(docs[0]["status"], "succeeded", "{}", docs[0]);
    let (status, result) = get(&format!("{url}/v1/jobs/{short}/result"), TENANT_A_KEY);
    assert_eq!(status, 200, "{result}");
    let outputs = result["outputs"].as_object().unwrap();
    assert_eq!(outputs.keys().cloned().collect::<Vec<_>>(), ["s0", "s1"], "{result}");
    assert!(outputs.values().all(|v| !v.as_str().unwrap().is_empty()), "{result}");
    let (status, body) = cancel(url, &short);
    assert_eq!(status, 409, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("succeeded"), "{body}");
    assert_eq!(job(url, &short)["status"], "succeeded");

    // A long job runs; a second one waits behind it in the queue.
    let long = submit_ok(url, &chain_spec("long", 40, 8));
    let queued = submit_ok(url, &chain_spec("queued", 2, 8));
    wait_for("the long job to be mid-chain", Duration::from_secs(20), || {
        job(url, &long)["steps_done"].as_u64().unwrap() >= 2
    });
    let (status, body) = get(&format!("{url}/v1/jobs/{long}/result"), TENANT_A_KEY);
    assert_eq!(status, 409, "result of an unfinished job: {body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("running"), "{body}");
    assert_eq!(job(url, &queued)["status"], "queued");

    // Cancel the queued job: it never runs.
    let (status, body) = cancel(url, &queued);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled", "{body}");
    // Cancelling again is idempotent (a retry whose answer was lost).
    let (status, body) = cancel(url, &queued);
    assert_eq!((status, body["status"].as_str()), (200, Some("cancelled")), "cancelling twice: {body}");

    // Cancel the running job.
    let (status, body) = cancel(url, &long);
    let cancelled_at = Instant::now();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled", "{body}");
    let doc = job(url, &long);
    assert_eq!(doc["status"], "cancelled", "{doc}");
    let done_at_cancel = doc["steps_done"].as_u64().unwrap();
    assert!(done_at_cancel < 40, "{doc}");

    // Within about one heartbeat (1 s) plus the call in flight the worker stops.
    std::thread::sleep(Duration::from_millis(2000).saturating_sub(cancelled_at.elapsed()));
    let calls_then = calls_for(&sim, &long);
    assert!(
        calls_then.len() as u64 <= done_at_cancel + 1,
        "{} steps called, {done_at_cancel} done at the cancel: more than the one in flight",
        calls_then.len()
    );
    std::thread::sleep(Duration::from_secs(3));
    let doc = job(url, &long);
    assert_eq!(doc["status"], "cancelled", "{doc}");
    assert_eq!(doc["steps_done"].as_u64().unwrap(), done_at_cancel, "steps kept finishing after the cancel: {doc}");
    assert_eq!(calls_for(&sim, &long), calls_then, "the cancelled job kept calling the provider");
    let (status, body) = get(&format!("{url}/v1/jobs/{long}/result"), TENANT_A_KEY);
    assert_eq!(status, 409, "result of a cancelled job: {body}");

    // The queued job was taken from the queue by now (the worker is free)
    // and never called anything.
    let doc = job(url, &queued);
    assert_eq!(doc["status"], "cancelled", "{doc}");
    assert_eq!(doc["steps_done"], 0, "{doc}");
    assert!(calls_for(&sim, &queued).is_empty(), "a job cancelled while queued was run");

    // The worker is free again: new work still runs.
    let after = submit_ok(url, &chain_spec("after", 2, 8));
    let docs = wait_all(url, TENANT_A_KEY, &[after], Duration::from_secs(20));
    assert_eq!(docs[0]["status"], "succeeded", "{}", docs[0]);
}

fn cli(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RATEPOOL_API_KEY")
        .env_remove("RATEPOOL_API_KEY_FILE")
        .env_remove("RATEPOOL_URL")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run ratepool")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_cli_submits_waits_and_reads_status_and_results() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(dir.path(), &ORG, (20.0, 0.0, 1.0));
    let cfg = write_serve_config(dir.path(), &sim.url, &ORG, "");
    let server = start_server(dir.path(), &cfg, &ORG, "serve.log");
    let env = [("RATEPOOL_URL", server.url.as_str()), ("RATEPOOL_API_KEY", TENANT_A_KEY)];
    let spec = dir.path().join("spec.json");
    std::fs::write(&spec, chain_spec("cli", 3, 8)).unwrap();
    let spec = spec.to_str().unwrap();

    let out = cli(&["submit", spec, "--wait"], &env);
    assert!(out.status.success(), "submit --wait failed: {}\n{}", text(&out.stdout), text(&out.stderr));
    let final_doc: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(&out.stdout)));
    assert_eq!(final_doc["status"], "succeeded", "{final_doc}");
    assert_eq!(final_doc["steps_done"], 3, "{final_doc}");
    let id = final_doc["id"].as_str().unwrap();

    let out = cli(&["status", id], &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["id"], id);
    assert_eq!(status["status"], "succeeded");

    let out = cli(&["result", id], &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        result["outputs"].as_object().unwrap().keys().cloned().collect::<Vec<_>>(),
        ["s0", "s1", "s2"],
        "{result}"
    );

    // Without --wait: the accepted document.
    let out = cli(&["submit", spec], &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let accepted: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(accepted["status"], "queued", "{accepted}");

    // A bad spec: non-zero, the field named on stderr, nothing on stdout.
    let bad = dir.path().join("bad.json");
    let mut v: Value = serde_json::from_str(&chain_spec("bad", 2, 8)).unwrap();
    v["steps"][1]["messages"][0]["content"] = "{{steps.nope.output}}".into();
    std::fs::write(&bad, v.to_string()).unwrap();
    let out = cli(&["submit", bad.to_str().unwrap(), "--wait"], &env);
    assert!(!out.status.success(), "a bad spec was accepted: {}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("steps[1].messages[0].content"), "stderr does not name the field: {err}");
    assert!(err.contains("400"), "{err}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));

    // A missing spec file.
    let out = cli(&["submit", dir.path().join("nope.json").to_str().unwrap()], &env);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("nope.json"), "{}", text(&out.stderr));

    // No key in the environment: a clear message, no request made.
    let out = cli(&["status", id], &[("RATEPOOL_URL", server.url.as_str())]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("RATEPOOL_API_KEY"), "{err}");

    // A wrong key: refused, and the key is not echoed.
    let wrong = "wrong-key-0123456789abcdef";
    let out = cli(&["status", id], &[("RATEPOOL_URL", server.url.as_str()), ("RATEPOOL_API_KEY", wrong)]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("401"), "{err}");
    assert!(!err.contains(wrong), "{err}");

    // Cancelling a finished job fails with the reason.
    let out = cli(&["cancel", id], &env);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("succeeded"), "{}", text(&out.stderr));
}

#[test]
fn sigterm_hands_running_jobs_back_exits_0_and_a_restart_finishes_them() {
    const JOBS: usize = 4;
    const STEPS: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(dir.path(), &ORG, (100.0, 0.0, 1.0));
    // A long visibility timeout: if the jobs were not handed back, the
    // restarted server could not take them for 30 s and the wait below fails.
    let cfg =
        write_serve_config(dir.path(), &sim.url, &ORG, "[workers]\nconcurrency = 8\nvisibility_timeout_secs = 30\n");
    let mut server = start_server(dir.path(), &cfg, &ORG, "serve-1.log");
    let ids: Vec<String> =
        (0..JOBS).map(|n| submit_ok(&server.url, &chain_spec(&format!("term{n}"), STEPS, 8))).collect();
    wait_for("every job to be mid-chain", Duration::from_secs(20), || {
        ids.iter().all(|id| job(&server.url, id)["steps_done"].as_u64().unwrap() >= 3)
    });

    let pid = server.child.id().to_string();
    let sent = Instant::now();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    // Grace is 10 s; running calls take 100 ms, so the stop is quick.
    let exit = wait_exit(&mut server.child, Duration::from_secs(13));
    let log = std::fs::read_to_string(dir.path().join("serve-1.log")).unwrap_or_default();
    let exit = exit.unwrap_or_else(|| panic!("server still running {:?} after SIGTERM; log:\n{log}", sent.elapsed()));
    assert!(exit.success(), "exit status {exit:?} after SIGTERM; log:\n{log}");
    assert!(log.contains("handed back"), "no job was handed back; log:\n{log}");

    let at_stop = checkpointed(&dir.path().join("ratepool.db"), &ids);
    let total: usize = at_stop.values().map(Vec::len).sum();
    assert!((JOBS * 3..JOBS * STEPS).contains(&total), "checkpoints at the stop: {total}");

    let restart = Instant::now();
    let server = start_server(dir.path(), &cfg, &ORG, "serve-2.log");
    let docs = wait_all(&server.url, TENANT_A_KEY, &ids, Duration::from_secs(20));
    for d in &docs {
        assert_eq!(d["status"], "succeeded", "{d}");
        assert_eq!(d["steps_done"], STEPS, "{d}");
    }
    assert!(restart.elapsed() < Duration::from_secs(20), "jobs resumed only after their visibility timeout");

    // A graceful stop repeats nothing: the steps running at the signal were
    // finished and checkpointed before the hand-back.
    let counts = sim_requests(&sim);
    for (job, steps) in &at_stop {
        for step in steps {
            assert_eq!(
                counts.get(&format!("{job}/{step}")),
                Some(&1),
                "step {job}/{step} was checkpointed before the stop and called again"
            );
        }
    }
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(repeated.is_empty(), "steps called more than once across a graceful stop: {repeated:?}");
    assert_eq!(counts.len(), JOBS * STEPS);
}

/// Runs `serve --config` on `toml` with `envs`; it must fail within 10 s.
/// Returns its stderr and stdout.
fn serve_must_fail(dir: &Path, name: &str, toml: &str, envs: &[(String, String)]) -> (String, String) {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    let err_path = dir.join(format!("{name}.err"));
    let out_path = dir.join(format!("{name}.out"));
    let mut child = Command::new(BIN)
        .args(["serve", "--config", path.to_str().unwrap()])
        .env_clear()
        .env("RUST_LOG", "debug")
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let exit = wait_exit(&mut child, Duration::from_secs(10));
    if exit.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (stderr, stdout) = (std::fs::read_to_string(&err_path).unwrap(), std::fs::read_to_string(&out_path).unwrap());
    let exit = exit.unwrap_or_else(|| panic!("{name}: serve kept running; stderr:\n{stderr}"));
    assert!(!exit.success(), "{name}: serve exited 0; stderr:\n{stderr}");
    assert!(!stdout.contains("listening"), "{name}: serve started: {stdout}");
    for (_, v) in envs {
        assert!(
            !stderr.contains(v.as_str()) && !stdout.contains(v.as_str()),
            "{name}: a key value was printed: {stderr}"
        );
    }
    (stderr, stdout)
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn bad_configs_stop_serve_at_once_naming_the_line_or_variable_never_the_key() {
    let dir = tempfile::tempdir().unwrap();
    // Written by the helper (to ratepool.toml); the sim URL is never called.
    let good = std::fs::read_to_string(write_serve_config(dir.path(), "http://127.0.0.1:9", &ORG, "")).unwrap();
    let env = server_env(&ORG);
    let start = Instant::now();

    // (a) TOML syntax error.
    let syntax = good.replace("tpm = 100000000", "tpm = = 100000000");
    assert_ne!(syntax, good);
    let (err, _) = serve_must_fail(dir.path(), "syntax", &syntax, &env);
    let line = line_of(&syntax, "tpm = =");
    assert!(err.contains(&format!("line {line}")), "(a) stderr does not name line {line}: {err}");

    // (b) rpm = 0.
    let zero = good.replace("rpm = 100000", "rpm = 0");
    assert_ne!(zero, good);
    let (err, _) = serve_must_fail(dir.path(), "rpm0", &zero, &env);
    let line = line_of(&zero, "rpm = 0");
    assert!(err.contains(&format!("line {line}")), "(b) stderr does not name line {line}: {err}");
    assert!(err.contains("rpm"), "(b) {err}");

    // (c) A tenant's key variable unset.
    let without_b: Vec<(String, String)> = env.iter().filter(|(k, _)| k != "TENANT_B_KEY").cloned().collect();
    let (err, _) = serve_must_fail(dir.path(), "unset", &good, &without_b);
    assert!(err.contains("TENANT_B_KEY"), "(c) stderr does not name the variable: {err}");

    // (d) A placeholder tenant key.
    let mut placeholder: Vec<(String, String)> = without_b.clone();
    placeholder.push(("TENANT_B_KEY".into(), "changeme".into()));
    let (err, _) = serve_must_fail(dir.path(), "changeme", &good, &placeholder);
    assert!(err.contains("TENANT_B_KEY"), "(d) stderr does not name the variable: {err}");

    assert!(start.elapsed() < Duration::from_secs(15), "config errors took {:?}", start.elapsed());
}

#[test]
fn no_key_reaches_the_logs_even_at_debug_level() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [
        OrgSpec { name: "org-a", rpm: 100_000, tpm: 100_000_000 },
        OrgSpec { name: "org-b", rpm: 100_000, tpm: 100_000_000 },
    ];
    let sim = start_sim(dir.path(), &orgs, (10.0, 0.0, 1.0));
    let cfg = write_serve_config(dir.path(), &sim.url, &orgs, "");
    let server = start_server_logged(dir.path(), &cfg, &orgs, "serve.log", "debug");
    let url = &server.url;

    let ids: Vec<String> = (0..2).map(|n| submit_ok(url, &chain_spec(&format!("secret{n}"), 4, 8))).collect();
    let docs = wait_all(url, TENANT_A_KEY, &ids, Duration::from_secs(20));
    assert!(docs.iter().all(|d| d["status"] == "succeeded"), "{docs:?}");
    // The other paths that see keys: a result, a refused key, usage, metrics.
    assert_eq!(get(&format!("{url}/v1/jobs/{}/result", ids[0]), TENANT_A_KEY).0, 200);
    assert_eq!(get(&format!("{url}/v1/jobs/{}", ids[0]), "not-a-tenant-key-0123456789").0, 401);
    assert_eq!(get(&format!("{url}/v1/usage"), TENANT_B_KEY).0, 200);
    let metrics = http().get(format!("{url}/metrics")).send().unwrap().text().unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    let stdout = std::fs::read_to_string(dir.path().join("serve.log.stdout")).unwrap();
    assert!(log.contains("DEBUG"), "RUST_LOG=debug did not reach the server: {log}");
    assert!(log.contains("job succeeded"), "{log}");
    let secrets = [TENANT_A_KEY.to_string(), TENANT_B_KEY.to_string(), org_key("org-a"), org_key("org-b")];
    for s in &secrets {
        for (what, text) in [("log", &log), ("stdout", &stdout), ("/metrics", &metrics)] {
            // Also a recognisable piece of the key (a partly masked key leaks too).
            assert!(!text.contains(s.as_str()), "{what} contains a key");
            assert!(!text.contains(&s[..s.len() - 4]), "{what} contains most of a key");
        }
    }
    assert!(!log.contains("not-a-tenant-key"), "a refused key was logged");
}

#[test]
fn sigterm_during_a_call_longer_than_the_grace_hands_the_job_back_at_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    // 100 ms per completion token: a 2-token step is quick, a 400-token
    // one takes 20 s or more — longer than the 10 s shutdown grace.
    let slow_dir = dir.path().join("slow");
    std::fs::create_dir(&slow_dir).unwrap();
    let slow = start_sim(&slow_dir, &ORG, (0.0, 100.0, 1.0));
    let workers = "[workers]\nvisibility_timeout_secs = 30\n";
    let cfg = write_serve_config(dir.path(), &slow.url, &ORG, workers);
    let mut server = start_server(dir.path(), &cfg, &ORG, "serve-1.log");
    let mut spec: Value = serde_json::from_str(&chain_spec("grace", 3, 2)).unwrap();
    spec["steps"][1]["max_tokens"] = 400.into();
    let id = submit_ok(&server.url, &spec.to_string());
    wait_for("the long step to be called", Duration::from_secs(10), || {
        calls_for(&slow, &id).contains_key(&format!("{id}/s1"))
    });

    let sent = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap().success());
    let exit = wait_exit(&mut server.child, Duration::from_secs(14));
    let log = std::fs::read_to_string(dir.path().join("serve-1.log")).unwrap_or_default();
    let exit = exit.unwrap_or_else(|| panic!("server still running {:?} after SIGTERM; log:\n{log}", sent.elapsed()));
    assert!(exit.success(), "exit status {exit:?} after SIGTERM; log:\n{log}");
    assert!(log.contains("handed back"), "the job was not handed back; log:\n{log}");

    // Handed back: unleased, still running (it has started), its message visible.
    let db = rusqlite::Connection::open(dir.path().join("ratepool.db")).unwrap();
    let (status, owner, done): (String, Option<String>, i64) = db
        .query_row("SELECT status, lease_owner, steps_done FROM jobs WHERE id = ?1", [&id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!((status.as_str(), owner, done), ("running", None, 1));
    let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64;
    let visible_at: i64 = db.query_row("SELECT visible_at FROM queue WHERE job_id = ?1", [&id], |r| r.get(0)).unwrap();
    assert!(visible_at <= now_us, "the message is still hidden for {} ms", (visible_at - now_us) / 1000);
    drop(db);

    // A restart against a fast provider finishes the job at once (not after
    // the 30 s visibility timeout) and does not call the checkpointed step.
    let fast_dir = dir.path().join("fast");
    std::fs::create_dir(&fast_dir).unwrap();
    let fast = start_sim(&fast_dir, &ORG, (0.0, 0.0, 1.0));
    let cfg = write_serve_config(dir.path(), &fast.url, &ORG, workers);
    let server = start_server(dir.path(), &cfg, &ORG, "serve-2.log");
    let docs = wait_all(&server.url, TENANT_A_KEY, std::slice::from_ref(&id), Duration::from_secs(10));
    assert_eq!(docs[0]["status"], "succeeded", "{}", docs[0]);
    let calls = calls_for(&fast, &id);
    assert_eq!(calls.get(&format!("{id}/s0")), None, "the checkpointed step was called again");
    assert_eq!(calls.get(&format!("{id}/s1")), Some(&1));
    assert_eq!(calls.get(&format!("{id}/s2")), Some(&1));
}
