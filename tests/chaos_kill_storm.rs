//! Kill storm, on every backend: while jobs run, a random process is
//! SIGKILLed and started again every few seconds — the one `ratepool serve`
//! on SQLite, one of three `ratepool worker` processes on SQS + DynamoDB
//! (moto), one of a `ratepool serve` and three `ratepool worker` processes
//! sharing one PostgreSQL database. Jobs are topped up after every kill so that `JOBS` are always in
//! the system. Afterwards: every job succeeded with the outputs of a calm
//! run, the queue and the dead-letter queue are empty, no lease is held,
//! and the simulator's per-request counts show that no checkpointed step
//! was called again and that every repeated call was in flight in a killed
//! process.
//!
//! How the repeats are checked. Right after each kill (the process is dead)
//! the test reads which jobs the dead process leased, every checkpoint, and
//! then the simulator's accepted-call counts per `{job}/{step}`. At the end:
//! - a step checkpointed at kill k has exactly the count it had then: it
//!   was never called after it was checkpointed;
//! - a job's repeated calls are fewer than its runs (from the logs): a new
//!   run repeats at most the call the previous one had in flight;
//! - on SQLite (one process, so a job changes hands only when it dies) a
//!   step accepted n > 1 times was "open" (accepted, not checkpointed, in a
//!   job the killed process leased or ran) at ≥ n − 1 kills. On AWS and PostgreSQL a slow
//!   but live worker can also lose a job to another when its heartbeat
//!   comes too late (moto under load); the per-run bound covers that;
//! - no kill left more open calls than one process runs at once.
//!
//! Sizes come from the environment so `make chaos` runs a long storm:
//! `RATEPOOL_CHAOS_KILLS` (kills, default 20), `RATEPOOL_CHAOS_JOBS` (jobs
//! kept in the system, 50), `RATEPOOL_CHAOS_STEPS` (chain length, 12),
//! `RATEPOOL_CHAOS_SEED` (which process dies when; printed by every run).
//! The AWS test needs the moto emulator `make test` starts (`AWS_ENDPOINT_URL`),
//! the PostgreSQL one the server it starts (`RATEPOOL_TEST_POSTGRES_URL`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ratepool::config::Config;
use ratepool::domain::{JobId, SystemClock};
use ratepool::local::{SqliteBackend, SqliteOptions};
use ratepool::storage::{Backend, JobRecord, JobStatus};
use serde_json::Value;

struct Knobs {
    kills: usize,
    jobs: usize,
    steps: usize,
    seed: u64,
}

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn knobs() -> Knobs {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    Knobs {
        kills: env_num("RATEPOOL_CHAOS_KILLS", 20) as usize,
        jobs: env_num("RATEPOOL_CHAOS_JOBS", 50) as usize,
        steps: env_num("RATEPOOL_CHAOS_STEPS", 12) as usize,
        seed: env_num("RATEPOOL_CHAOS_SEED", now.as_nanos() as u64 | 1),
    }
}

/// xorshift64: which process dies when, replayable from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn between_ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// The processes under test, whichever the backend.
trait Cluster {
    fn submit(&mut self, spec: &str) -> String;
    /// SIGKILLs one process and returns its pid and log.
    fn kill_one(&mut self, rng: &mut Rng) -> (u32, PathBuf);
    /// Starts again what `kill_one` killed.
    fn restart(&mut self);
    fn outputs(&self, id: &str) -> Value;
    /// Where the processes' logs are (`*.log`).
    fn log_dir(&self) -> &Path;
    fn store(&self) -> (&tokio::runtime::Runtime, &Backend);
}

/// What was true just after one kill.
struct Kill {
    pid: u32,
    /// Unfinished jobs: the steps checkpointed.
    checkpointed: BTreeMap<String, BTreeSet<String>>,
    /// Jobs whose lease the killed process held.
    held: BTreeSet<String>,
    /// Jobs finished by now (every step checkpointed).
    finished: BTreeSet<String>,
    /// Accepted calls per `{job}/{step}`, read after the checkpoints.
    counts: BTreeMap<String, u64>,
}

impl Kill {
    /// Accepted, not checkpointed, in a job the killed process held: calls
    /// the kill may have cut short.
    fn open(&self) -> BTreeSet<String> {
        let mut open = BTreeSet::new();
        for job in &self.held {
            let done = self.checkpointed.get(job);
            let prefix = format!("{job}/");
            for (id, _) in self.counts.range(prefix.clone()..).take_while(|(id, _)| id.starts_with(&prefix)) {
                let step = &id[prefix.len()..];
                if !done.is_some_and(|d| d.contains(step)) {
                    open.insert(id.clone());
                }
            }
        }
        open
    }
}

/// Per job, how many runs of it the processes' logs show started.
fn job_runs(dir: &Path) -> BTreeMap<String, u64> {
    let mut runs = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "log") || path.file_name().is_some_and(|n| n == "sim.log") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap_or_default().lines() {
            let line = strip_ansi(line);
            if line.contains("job started")
                && let Some(job) = line.split("job=").nth(1).and_then(|rest| rest.split_whitespace().next())
            {
                *runs.entry(job.to_string()).or_insert(0) += 1;
            }
        }
    }
    runs
}

/// The jobs a process's log shows started and not yet ended.
fn running_jobs(log: &Path) -> BTreeSet<String> {
    let mut running = BTreeSet::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let line = strip_ansi(line);
        let Some(job) = line.split("job=").nth(1).and_then(|rest| rest.split_whitespace().next()) else { continue };
        if line.contains("job started") {
            running.insert(job.to_string());
        } else if ["job succeeded", "job failed", "job lease lost", "job handed back"].iter().any(|m| line.contains(m))
        {
            running.remove(job);
        }
    }
    running
}

/// Text logs colour their fields; the ids are what matters here.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn step_ids(steps: usize) -> Vec<String> {
    (0..steps).map(|i| format!("s{i}")).collect()
}

/// Reads the store and the simulator just after `pid` died. Jobs known to
/// be finished are not read again.
fn snapshot(
    cluster: &dyn Cluster,
    sim: &Proc,
    ids: &[String],
    known_finished: &BTreeSet<String>,
    pid: u32,
    log: &Path,
) -> Kill {
    // What the dead process was running by its own log: a job whose lease
    // another worker took over meanwhile is no longer leased to it, but its
    // call may still have been in flight.
    let running_by_log = running_jobs(log);
    let (rt, store) = cluster.store();
    let unfinished: Vec<&String> = ids.iter().filter(|id| !known_finished.contains(*id)).collect();
    let owner_mark = format!(":{pid}:");
    // Records first, then the dead process's jobs' checkpoints, then the
    // rest: what a takeover could change (after the visibility timeout) is
    // read soonest.
    let records = read_records(rt, store, unfinished.iter().map(|id| id.as_str()));
    let mut kill = Kill {
        pid,
        checkpointed: BTreeMap::new(),
        held: BTreeSet::new(),
        finished: known_finished.clone(),
        counts: BTreeMap::new(),
    };
    let mut running = Vec::new();
    for (id, record) in records {
        match record.status {
            JobStatus::Succeeded => {
                kill.finished.insert(id);
            }
            JobStatus::Failed | JobStatus::Cancelled => {
                panic!("job {id} ended {:?}: {:?}", record.status, record.error)
            }
            JobStatus::Queued | JobStatus::Running => {
                if record.lease_owner.as_deref().is_some_and(|o| o.contains(&owner_mark))
                    || running_by_log.contains(&id)
                {
                    kill.held.insert(id.clone());
                }
                running.push(id);
            }
        }
    }
    running.sort_by_key(|id| !kill.held.contains(id));
    let (held, rest) = running.split_at(kill.held.len());
    for ids in [held, rest] {
        let cps = rt.block_on(bounded(ids, |id| async move {
            let job = JobId::parse(id.as_str()).unwrap();
            let cps = patiently(|| store.jobs.checkpoints(&job)).await;
            (id.clone(), cps.into_iter().map(|c| c.step.to_string()).collect::<BTreeSet<String>>())
        }));
        kill.checkpointed.extend(cps);
    }
    kill.counts = sim_requests(sim);
    kill
}

/// Runs `f` over `items` at most 16 at a time, in order: hundreds of
/// requests at once make moto time out connections.
async fn bounded<'a, T: 'a, R, Fut: std::future::Future<Output = R>>(
    items: impl IntoIterator<Item = &'a T>,
    f: impl FnMut(&'a T) -> Fut,
) -> Vec<R> {
    use futures::StreamExt;
    futures::stream::iter(items).map(f).buffered(16).collect().await
}

/// The test's own reads retry a backend error (an emulator stall): they
/// check the system, they are not the system under test.
async fn patiently<T, Fut: std::future::Future<Output = Result<T, ratepool::storage::StorageError>>>(
    mut read: impl FnMut() -> Fut,
) -> T {
    let mut tries = 0;
    loop {
        match read().await {
            Ok(v) => return v,
            Err(e) if tries < 10 => {
                tries += 1;
                eprintln!("storage read failed ({e}); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("storage read failed 10 times: {e}"),
        }
    }
}

fn read_records<'a>(
    rt: &tokio::runtime::Runtime,
    store: &Backend,
    ids: impl IntoIterator<Item = &'a str>,
) -> Vec<(String, JobRecord)> {
    let ids: Vec<&str> = ids.into_iter().collect();
    rt.block_on(bounded(&ids, |id| async move {
        let job = JobId::parse(*id).unwrap();
        let record = patiently(|| store.jobs.get_job(&job)).await.expect("job record");
        (id.to_string(), record)
    }))
}

struct Figures {
    kills: usize,
    kills_mid_call: usize,
    jobs: usize,
    steps: u64,
    repeated_steps: usize,
    repeated_calls: u64,
    not_at_kills: u64,
    open_at_kills: usize,
    max_open_at_a_kill: usize,
}

/// Runs the storm and checks everything the module doc promises.
fn storm(
    cluster: &mut dyn Cluster,
    sim: &Proc,
    k: &Knobs,
    pace_ms: (u64, u64),
    in_flight_bound: usize,
    one_owner: bool,
) -> Figures {
    let mut rng = Rng(k.seed);
    let mut specs: Vec<String> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    let top_up = |cluster: &mut dyn Cluster, specs: &mut Vec<String>, ids: &mut Vec<String>, unfinished: usize| {
        for _ in unfinished..k.jobs {
            let spec = chain_spec(&format!("storm-{}", specs.len()), k.steps, 16);
            ids.push(cluster.submit(&spec));
            specs.push(spec);
        }
    };
    top_up(cluster, &mut specs, &mut ids, 0);

    let mut kills: Vec<Kill> = Vec::new();
    let mut finished = BTreeSet::new();
    while kills.len() < k.kills {
        std::thread::sleep(rng.between_ms(pace_ms.0, pace_ms.1));
        let (pid, log) = cluster.kill_one(&mut rng);
        let t = Instant::now();
        let kill = snapshot(cluster, sim, &ids, &finished, pid, &log);
        let read_in = t.elapsed();
        cluster.restart();
        finished = kill.finished.clone();
        let open = kill.open().len();
        println!(
            "kill {:>3}: pid {pid}, {} jobs held, {open} calls open, {}/{} jobs done (read in {read_in:?})",
            kills.len() + 1,
            kill.held.len(),
            finished.len(),
            ids.len(),
        );
        kills.push(kill);
        let unfinished = ids.len() - finished.len();
        top_up(cluster, &mut specs, &mut ids, unfinished);
    }

    // The storm is over: everything finishes.
    let (rt, store) = cluster.store();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut left: Vec<&str> = ids.iter().map(String::as_str).filter(|id| !finished.contains(*id)).collect();
    loop {
        let records = read_records(rt, store, left.iter().copied());
        for (id, r) in &records {
            assert!(!r.status.is_terminal() || r.status == JobStatus::Succeeded, "job {id} ended {:?}", r.status);
        }
        left.retain(|id| records.iter().any(|(r_id, r)| r_id == id && !r.status.is_terminal()));
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{} jobs still unfinished 300 s after the storm", left.len());
        std::thread::sleep(Duration::from_millis(500));
    }

    // Nothing left behind: queue and dead letters empty, no lease held.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let q = rt.block_on(store.queue.stats()).unwrap();
        if (q.visible, q.in_flight, q.dead) == (0, 0, 0) {
            break;
        }
        assert!(Instant::now() < deadline, "queue not empty after every job finished: {q:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(rt.block_on(store.queue.dead_letters(10)).unwrap(), Vec::new(), "dead letters");
    let records = read_records(rt, store, ids.iter().map(String::as_str));
    for (id, r) in &records {
        assert_eq!(r.status, JobStatus::Succeeded, "job {id}");
    }
    let leased: Vec<String> =
        records.into_iter().filter_map(|(id, r)| r.lease_owner.map(|o| format!("{id} leased by {o}"))).collect();
    assert!(leased.is_empty(), "leases left held: {leased:?}");

    // Every step was called; none after its checkpoint; every repeat was
    // in flight in a killed process.
    let counts = sim_requests(sim);
    let steps = step_ids(k.steps);
    for id in &ids {
        for s in &steps {
            assert!(counts.get(&format!("{id}/{s}")).is_some_and(|&n| n >= 1), "{id}/{s} never called");
        }
    }
    for (n, kill) in kills.iter().enumerate() {
        let done = kill.checkpointed.iter().flat_map(|(job, ss)| ss.iter().map(move |s| format!("{job}/{s}")));
        let finished = kill.finished.iter().flat_map(|job| steps.iter().map(move |s| format!("{job}/{s}")));
        for id in done.chain(finished) {
            let (then, now) = (kill.counts.get(&id).copied().unwrap_or(0), counts.get(&id).copied().unwrap_or(0));
            assert!(then >= 1, "{id} was checkpointed at kill {} but never accepted by the provider", n + 1);
            assert_eq!(now, then, "{id} was checkpointed at kill {} and called again afterwards", n + 1);
        }
    }
    let opens: Vec<BTreeSet<String>> = kills.iter().map(Kill::open).collect();
    for (n, (open, kill)) in opens.iter().zip(&kills).enumerate() {
        assert!(
            open.len() <= in_flight_bound,
            "kill {} (pid {}) left {} calls open; one process runs at most {in_flight_bound}",
            n + 1,
            kill.pid,
            open.len()
        );
    }
    // A new run of a job loads its checkpoints and repeats at most the one
    // call (chains) the previous run had in flight when it stopped: killed,
    // or (AWS) overtaken by another worker after its heartbeat came too late.
    // So a job's repeats are bounded by its runs, counted from the logs.
    // With one process (`one_owner`) a job changes hands only when that
    // process dies: then every repeat must also have been open at a kill.
    let runs = job_runs(cluster.log_dir());
    let mut repeats_of: BTreeMap<&str, u64> = BTreeMap::new();
    let mut repeated_steps = 0;
    let mut repeated_calls = 0;
    let mut not_at_kills = 0;
    for (id, &n) in &counts {
        if n <= 1 {
            continue;
        }
        let at_kills = opens.iter().filter(|o| o.contains(id)).count() as u64;
        if one_owner {
            assert!(n - 1 <= at_kills, "{id} was accepted {n} times but was open at only {at_kills} kills");
        }
        let job = id.rsplit_once('/').map_or(id.as_str(), |(job, _)| job);
        *repeats_of.entry(job).or_default() += n - 1;
        repeated_steps += 1;
        repeated_calls += n - 1;
        not_at_kills += (n - 1).saturating_sub(at_kills);
    }
    for (job, repeats) in &repeats_of {
        let runs = runs.get(*job).copied().unwrap_or(0);
        assert!(*repeats < runs.max(1), "job {job}: {repeats} repeated calls in {runs} runs");
    }
    let open_at_kills: usize = opens.iter().map(BTreeSet::len).sum();
    assert!(repeated_calls - not_at_kills <= open_at_kills as u64);
    let kills_mid_call = opens.iter().filter(|o| !o.is_empty()).count();
    assert!(
        kills_mid_call * 2 >= kills.len(),
        "only {kills_mid_call} of {} kills found a call in flight: the storm did not test much",
        kills.len()
    );

    // Same outputs as a calm run of the same jobs.
    let storm_outputs: Vec<Value> = ids.iter().map(|id| cluster.outputs(id)).collect();
    assert_eq!(calm_outputs(&specs), storm_outputs, "outputs after the storm differ from a calm run");

    Figures {
        kills: kills.len(),
        kills_mid_call,
        jobs: ids.len(),
        steps: (ids.len() * k.steps) as u64,
        repeated_steps,
        repeated_calls,
        not_at_kills,
        open_at_kills,
        max_open_at_a_kill: opens.iter().map(BTreeSet::len).max().unwrap_or(0),
    }
}

fn report(backend: &str, k: &Knobs, f: &Figures, took: Duration) {
    println!(
        "kill storm ({backend}): {} kills ({} mid-call), {} jobs of {} steps ({} kept running), {} steps; \
         {} calls repeated on {} steps ({} not open at a kill: a live worker overtaken), {} calls were open at the kills (max {} at one); \
         seed {}; {:.0} s",
        f.kills,
        f.kills_mid_call,
        f.jobs,
        k.steps,
        k.jobs,
        f.steps,
        f.repeated_calls,
        f.repeated_steps,
        f.not_at_kills,
        f.open_at_kills,
        f.max_open_at_a_kill,
        k.seed,
        took.as_secs_f64()
    );
}

const ORGS: [OrgSpec; 2] = [
    OrgSpec { name: "org-a", rpm: 100_000, tpm: 100_000_000 },
    OrgSpec { name: "org-b", rpm: 100_000, tpm: 100_000_000 },
];

/// The outputs of `specs` run without disturbance: on a fresh server and a
/// fresh simulator with no latency (answers depend on the request only).
fn calm_outputs(specs: &[String]) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(dir.path(), &ORGS, (0.0, 0.0, 0.0));
    let cfg = write_serve_config(dir.path(), &sim.url, &ORGS, "[workers]\nconcurrency = 64\n");
    let server = start_server(dir.path(), &cfg, &ORGS, "serve-calm.log");
    let ids: Vec<String> = specs
        .iter()
        .map(|s| {
            let (status, body) = submit(&server.url, TENANT_A_KEY, s);
            assert_eq!(status, 202, "{body}");
            body["id"].as_str().unwrap().to_string()
        })
        .collect();
    for d in wait_all(&server.url, TENANT_A_KEY, &ids, Duration::from_secs(300)) {
        assert_eq!(d["status"], "succeeded", "{d}");
    }
    ids.iter()
        .map(|id| get(&format!("{}/v1/jobs/{id}/result", server.url), TENANT_A_KEY).1["outputs"].clone())
        .collect()
}

/// A finished job's outputs, from the API at `url`.
fn outputs_at(url: &str, id: &str) -> Value {
    let (status, body) = get(&format!("{url}/v1/jobs/{id}/result"), TENANT_A_KEY);
    assert_eq!(status, 200, "{body}");
    body["outputs"].clone()
}

/// Calls take long enough that most kills land mid-call.
const STORM_LATENCY: (f64, f64, f64) = (1_000.0, 0.0, 1.0);

// ------------------------------------------------------------------ SQLite

struct Local {
    dir: PathBuf,
    config: PathBuf,
    server: Option<Proc>,
    url: String,
    starts: usize,
    rt: tokio::runtime::Runtime,
    store: Backend,
}

impl Local {
    fn start(&mut self) {
        self.starts += 1;
        let server = start_server(&self.dir, &self.config, &ORGS, &format!("serve-{}.log", self.starts));
        self.url = server.url.clone();
        self.server = Some(server);
    }
}

impl Cluster for Local {
    fn submit(&mut self, spec: &str) -> String {
        let (status, body) = submit(&self.url, TENANT_A_KEY, spec);
        assert_eq!(status, 202, "{body}");
        body["id"].as_str().unwrap().to_string()
    }
    fn kill_one(&mut self, _: &mut Rng) -> (u32, PathBuf) {
        let mut server = self.server.take().expect("a running server");
        let pid = server.child.id();
        server.kill();
        (pid, server.log.clone())
    }
    fn restart(&mut self) {
        self.start();
    }
    fn outputs(&self, id: &str) -> Value {
        outputs_at(&self.url, id)
    }
    fn store(&self) -> (&tokio::runtime::Runtime, &Backend) {
        (&self.rt, &self.store)
    }
    fn log_dir(&self) -> &Path {
        &self.dir
    }
}

#[test]
fn sqlite_server_killed_again_and_again_loses_and_repeats_nothing_finished() {
    let k = knobs();
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(dir.path(), &ORGS, STORM_LATENCY);
    // Short visibility/lease: a restarted server takes the jobs back fast.
    let workers = "[workers]\nconcurrency = 64\nstep_parallelism = 4\nvisibility_timeout_secs = 2\n";
    let config = write_serve_config(dir.path(), &sim.url, &ORGS, workers);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut local = Local {
        dir: dir.path().to_path_buf(),
        config,
        server: None,
        url: String::new(),
        starts: 0,
        store: SqliteBackend::open(
            &dir.path().join("ratepool.db"),
            SqliteOptions { visibility_timeout: Duration::from_secs(2), clock: Arc::new(SystemClock) },
        )
        .unwrap()
        .backend(),
        rt,
    };
    local.start();
    // One process runs at most `concurrency` jobs, one step each (chains).
    let f = storm(&mut local, &sim, &k, (3_000, 5_000), 64, true);
    report("sqlite", &k, &f, started.elapsed());
}

// --------------------------------------------------------------------- AWS

const WORKERS: usize = 3;

fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| {
        panic!("AWS_ENDPOINT_URL is not set: run through `make test`, which starts the moto emulator")
    })
}

/// A config on fresh, uniquely named tables and queues.
fn write_aws_config(dir: &Path, sim_url: &str, workers: &str) -> (PathBuf, Config) {
    let s = uuid::Uuid::new_v4().simple().to_string();
    let s = &s[..10];
    let mut toml = format!(
        "[storage]\nbackend = \"aws\"\n[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\njobs_table = \"storm-jobs-{s}\"\nledger_table = \"storm-ledger-{s}\"\ninteractive_queue = \"storm-i-{s}\"\nbatch_queue = \"storm-b-{s}\"\ndead_letter_queue = \"storm-d-{s}\"\nmetrics_namespace = \"Ratepool-{s}\"\n{workers}\n",
        endpoint()
    );
    toml.push_str(&orgs_toml(sim_url, &ORGS));
    toml.push_str("[[tenants]]\nname = \"alpha\"\napi_key_env = \"TENANT_A_KEY\"\n");
    let path = dir.join("aws.toml");
    std::fs::write(&path, &toml).unwrap();
    let out = Command::new(BIN).args(["aws", "init", "--config", path.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "aws init failed: {}", String::from_utf8_lossy(&out.stderr));
    (path, Config::parse(&toml).unwrap())
}

struct Aws {
    dir: PathBuf,
    config: PathBuf,
    workers: Vec<Option<Proc>>,
    killed: Option<usize>,
    starts: usize,
    rt: tokio::runtime::Runtime,
    /// The API as the Lambda runs it.
    api: axum::Router,
    store: Backend,
}

impl Aws {
    fn start(&mut self, slot: usize) {
        self.starts += 1;
        self.workers[slot] = Some(start_worker(&self.dir, &self.config, &ORGS, &format!("worker-{}", self.starts)));
    }

    /// Sends a real API Gateway REST proxy event through the Lambda handler.
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        lambda_call(&self.rt, &self.api, method, path, body)
    }
}

impl Cluster for Aws {
    /// As a client should: a 503 (the emulator too slow to answer within
    /// the SDK's timeouts on a loaded machine) is retried with the same
    /// `Idempotency-Key`, so a submission that was stored is not stored
    /// twice.
    fn submit(&mut self, spec: &str) -> String {
        let key = uuid::Uuid::new_v4().to_string();
        for _ in 0..5 {
            let (status, body) =
                lambda_call_with(&self.rt, &self.api, "POST", "/v1/jobs", Some(spec), &[("Idempotency-Key", &key)]);
            if status == 503 {
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            assert_eq!(status, 202, "{body}");
            return body["id"].as_str().unwrap().to_string();
        }
        panic!("five submissions in a row answered 503");
    }
    fn kill_one(&mut self, rng: &mut Rng) -> (u32, PathBuf) {
        let slot = rng.below(self.workers.len() as u64) as usize;
        let mut w = self.workers[slot].take().expect("a running worker");
        let pid = w.child.id();
        w.kill();
        self.killed = Some(slot);
        (pid, w.log.clone())
    }
    fn restart(&mut self) {
        let slot = self.killed.take().expect("a killed worker");
        self.start(slot);
    }
    fn outputs(&self, id: &str) -> Value {
        let (status, body) = self.call("GET", &format!("/v1/jobs/{id}/result"), None);
        assert_eq!(status, 200, "{body}");
        body["outputs"].clone()
    }
    fn store(&self) -> (&tokio::runtime::Runtime, &Backend) {
        (&self.rt, &self.store)
    }
    fn log_dir(&self) -> &Path {
        &self.dir
    }
}

/// Three workers on moto. Leases and visibility last 10 s: every job in
/// flight renews both every third of that, and on the emulator (one Python
/// process on the same two cores) those heartbeats are most of the load.
#[test]
fn aws_workers_killed_at_random_lose_and_repeat_nothing_finished() {
    let k = knobs();
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(dir.path(), &ORGS, STORM_LATENCY);
    let workers = "[workers]\nconcurrency = 32\nstep_parallelism = 4\nvisibility_timeout_secs = 10\n";
    let (config, cfg) = write_aws_config(dir.path(), &sim.url, workers);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let env = BTreeMap::from([("TENANT_A_KEY".to_string(), TENANT_A_KEY.to_string())]);
    let api =
        rt.block_on(async { ratepool::api::router(ratepool::serve::lambda_state(&cfg, Some(&env)).await.unwrap()) });
    let store = aws_store(&rt, &cfg, Duration::from_secs(10));
    let mut cluster = Aws {
        dir: dir.path().to_path_buf(),
        config,
        workers: (0..WORKERS).map(|_| None).collect(),
        killed: None,
        starts: 0,
        rt,
        api,
        store,
    };
    for slot in 0..WORKERS {
        cluster.start(slot);
    }
    // One worker runs at most `concurrency` jobs, one step each (chains).
    let f = storm(&mut cluster, &sim, &k, (3_000, 5_000), 32, false);
    report("aws", &k, &f, started.elapsed());
}

// --------------------------------------------------------------- PostgreSQL

/// The environment variable the PostgreSQL storm's processes read their
/// database's URL from.
const STORM_DB_ENV: &str = "RATEPOOL_STORM_POSTGRES_URL";

/// A server (API and workers) and three workers on one PostgreSQL database,
/// as on several machines: any of the four may be the one killed.
struct Postgres {
    dir: PathBuf,
    config: PathBuf,
    db_url: String,
    /// Slot 0 is `ratepool serve`, the others `ratepool worker`.
    procs: Vec<Option<Proc>>,
    url: String,
    killed: Option<usize>,
    starts: usize,
    rt: tokio::runtime::Runtime,
    store: Backend,
}

impl Postgres {
    fn start(&mut self, slot: usize) {
        self.starts += 1;
        let envs = [(STORM_DB_ENV, self.db_url.as_str())];
        let proc = if slot == 0 {
            let p = start_server_with_env(&self.dir, &self.config, &ORGS, &format!("serve-{}.log", self.starts), &envs);
            self.url = p.url.clone();
            p
        } else {
            start_worker_with_env(&self.dir, &self.config, &ORGS, &format!("worker-{}", self.starts), &envs)
        };
        self.procs[slot] = Some(proc);
    }
}

impl Cluster for Postgres {
    fn submit(&mut self, spec: &str) -> String {
        let (status, body) = submit(&self.url, TENANT_A_KEY, spec);
        assert_eq!(status, 202, "{body}");
        body["id"].as_str().unwrap().to_string()
    }
    fn kill_one(&mut self, rng: &mut Rng) -> (u32, PathBuf) {
        let slot = rng.below(self.procs.len() as u64) as usize;
        let mut p = self.procs[slot].take().expect("a running process");
        let pid = p.child.id();
        p.kill();
        self.killed = Some(slot);
        (pid, p.log.clone())
    }
    fn restart(&mut self) {
        let slot = self.killed.take().expect("a killed process");
        self.start(slot);
    }
    fn outputs(&self, id: &str) -> Value {
        outputs_at(&self.url, id)
    }
    fn store(&self) -> (&tokio::runtime::Runtime, &Backend) {
        (&self.rt, &self.store)
    }
    fn log_dir(&self) -> &Path {
        &self.dir
    }
}

/// A server and three workers on the PostgreSQL server `make test` starts
/// (`RATEPOOL_TEST_POSTGRES_URL`), one of the four SIGKILLed at a time.
#[test]
fn postgres_server_and_workers_killed_at_random_lose_and_repeat_nothing_finished() {
    let k = knobs();
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(dir.path(), &ORGS, STORM_LATENCY);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db_url = rt.block_on(common::postgres::fresh_database());
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nbackend = \"postgres\"\n[postgres]\nurl_env = \"{STORM_DB_ENV}\"\n\
         max_connections = 8\n[workers]\nconcurrency = 32\nstep_parallelism = 4\nvisibility_timeout_secs = 4\n"
    );
    toml.push_str(&orgs_toml(&sim.url, &ORGS));
    toml.push_str("[[tenants]]\nname = \"alpha\"\napi_key_env = \"TENANT_A_KEY\"\n");
    let config = dir.path().join("postgres.toml");
    std::fs::write(&config, &toml).unwrap();
    let store = rt.block_on(async {
        let options = ratepool::postgres::PgOptions {
            visibility_timeout: Duration::from_secs(4),
            max_connections: 4,
            ..Default::default()
        };
        ratepool::postgres::PgBackend::connect(&db_url, options).await.expect("connect to postgres").backend()
    });
    let mut cluster = Postgres {
        dir: dir.path().to_path_buf(),
        config,
        db_url,
        procs: (0..=WORKERS).map(|_| None).collect(),
        url: String::new(),
        killed: None,
        starts: 0,
        rt,
        store,
    };
    for slot in 0..=WORKERS {
        cluster.start(slot);
    }
    // One process runs at most `concurrency` jobs, one step each (chains).
    let f = storm(&mut cluster, &sim, &k, (3_000, 5_000), 32, false);
    report("postgres", &k, &f, started.elapsed());
}
