//! Figure 11: what one provider call costs on AWS. The example screenplay
//! runs through the deployed shape (the API Lambda's handler, invoked with
//! API Gateway proxy events, and `ratepool worker` processes on SQS and
//! DynamoDB) against the emulator, whose wrapper (`infra/moto_server.py`)
//! counts every request and bills DynamoDB capacity by the documented
//! sizing rules. The figures are those counts over the provider calls the
//! simulator answered.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Ctx;
use super::harness::{self, OrgLimits, Proc, Sim};

const TENANT_KEY: &str = "bench-cost-tenant-key-0123456789";

/// The emulator's account of the requests it served (`GET /_ratepool/usage`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Usage {
    pub requests: BTreeMap<String, BTreeMap<String, u64>>,
    pub dynamodb_capacity: BTreeMap<String, Capacity>,
    #[serde(default)]
    pub dynamodb_items: BTreeMap<String, Items>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Capacity {
    pub write_units: f64,
    pub read_units: f64,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Items {
    pub count: u64,
    pub bytes: u64,
    #[serde(default)]
    pub max_bytes: u64,
}

impl Usage {
    fn requests_of(&self, service: &str) -> u64 {
        self.requests.get(service).map_or(0, |a| a.values().sum())
    }
}

/// One run of one variant: the jobs, the calls, and what they cost.
#[derive(Debug, Clone, Serialize)]
pub struct CostRun {
    /// The example as written, or with its text steps' answers held near
    /// 2 KB (`max_tokens` 500).
    pub variant: String,
    pub jobs: usize,
    pub provider_calls: u64,
    /// Mean completion text per call, in characters (tokens × 4, the
    /// simulator's ratio).
    pub output_chars_per_call: f64,
    pub jobs_table_write_units_per_call: f64,
    pub ledger_write_units_per_call: f64,
    pub write_units_per_call: f64,
    pub read_units_per_call: f64,
    pub dynamodb_requests_per_call: f64,
    pub sqs_requests_per_call: f64,
    pub cloudwatch_requests_per_call: f64,
    pub secretsmanager_requests: u64,
    /// DynamoDB requests by action, per call.
    pub dynamodb_actions_per_call: BTreeMap<String, f64>,
    /// The largest item in the jobs table at the end, in bytes.
    pub largest_job_table_item_bytes: u64,
    pub secs: f64,
}

/// The variants measured: the example as written, and with every text
/// step's `max_tokens` at 500, so answers come near the 2 KB the cost
/// target is stated for (the JSON outline keeps its limit: cut JSON would
/// fail the fan-out it feeds).
pub const VARIANTS: [&str; 2] = ["as written", "text steps at max_tokens 500 (answers up to 2 KB)"];

fn variant_spec(variant: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(example_spec())?;
    if variant == VARIANTS[0] {
        return Ok(text);
    }
    let mut spec: Value = serde_json::from_str(&text)?;
    spec["defaults"]["max_tokens"] = json!(500);
    for step in spec["steps"].as_array_mut().context("steps")? {
        if step.get("response_format").is_none() && step.get("max_tokens").is_some() {
            step["max_tokens"] = json!(500);
        }
    }
    Ok(spec.to_string())
}

/// Runs `ctx.sizes.cost_jobs` example screenplays of each variant; nothing
/// without an emulator.
pub async fn cost(ctx: &Ctx, run: usize) -> anyhow::Result<Vec<CostRun>> {
    let Some(endpoint) = ctx.aws_endpoint.as_deref() else {
        eprintln!("  no AWS_ENDPOINT_URL: figure 11 (cost per call) skipped");
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (i, variant) in VARIANTS.iter().enumerate() {
        out.push(cost_of(ctx, endpoint, &format!("cost-{run}-{i}"), variant).await?);
    }
    Ok(out)
}

async fn cost_of(ctx: &Ctx, endpoint: &str, name: &str, variant: &str) -> anyhow::Result<CostRun> {
    let dir = harness::run_dir(&ctx.work, name)?;
    let orgs = vec![OrgLimits::per_minute(5_000, 5_000_000); 2];
    let sim = Sim::start(&ctx.bin, &dir, &orgs, ctx.sizes.latency).await?;
    let s = uuid::Uuid::new_v4().simple().to_string();
    let s = &s[..8];
    let mut toml = format!(
        "[storage]\nbackend = \"aws\"\n[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\n\
         jobs_table = \"cost-jobs-{s}\"\nledger_table = \"cost-ledger-{s}\"\ninteractive_queue = \"cost-i-{s}\"\n\
         batch_queue = \"cost-b-{s}\"\ndead_letter_queue = \"cost-d-{s}\"\noutputs_bucket = \"cost-outputs-{s}\"\n\
         [workers]\nconcurrency = 16\nstep_parallelism = 8\nvisibility_timeout_secs = 30\nshutdown_grace_secs = 20\n"
    );
    let mut envs = vec![("BENCH_TENANT_KEY".to_string(), TENANT_KEY.to_string())];
    for (i, key) in sim.keys.iter().enumerate() {
        let var = format!("BENCH_ORG_{i}_KEY");
        toml.push_str(&format!(
            "[[orgs]]\nname = \"{}\"\nbase_url = \"{}\"\napi_key_env = \"{var}\"\n[orgs.models.\"{}\"]\nrpm = {}\ntpm = {}\n",
            harness::org_name(i),
            sim.base_url(),
            harness::MODEL,
            orgs[i].rpm,
            orgs[i].tpm
        ));
        envs.push((var, key.clone()));
    }
    toml.push_str("[[tenants]]\nname = \"bench\"\napi_key_env = \"BENCH_TENANT_KEY\"\n");
    let path = dir.join("aws.toml");
    std::fs::write(&path, &toml)?;
    let cfg = crate::config::Config::parse(&toml).map_err(|e| anyhow::anyhow!("cost config: {e}"))?;
    let init = tokio::process::Command::new(&ctx.bin)
        .args(["aws", "init", "--config", &path.to_string_lossy()])
        .envs(envs.iter().cloned())
        .output()
        .await?;
    if !init.status.success() {
        bail!("aws init: {}", String::from_utf8_lossy(&init.stderr));
    }

    let env: BTreeMap<String, String> = envs.iter().cloned().collect();
    let app = crate::api::router(crate::serve::lambda_state(&cfg, Some(&env)).await?);
    let http = reqwest::Client::new();
    let usage_url = format!("{}/_ratepool/usage", endpoint.trim_end_matches('/'));
    http.post(format!("{usage_url}/reset")).send().await?.error_for_status()?;

    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..2 {
        let args = ["worker", "--config", &path.to_string_lossy(), "--listen", "127.0.0.1:0"];
        workers.push(Proc::spawn(&ctx.bin, &args, &envs, &dir.join(format!("worker-{w}.log"))).await?);
    }
    let spec = variant_spec(variant)?;
    let mut ids = Vec::new();
    for _ in 0..ctx.sizes.cost_jobs {
        let (status, body) = lambda_call(&app, "POST", "/v1/jobs", Some(&spec)).await?;
        if status != 202 {
            bail!("submission refused ({status}): {body}");
        }
        ids.push(body["id"].as_str().context("no job id")?.to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    for id in &ids {
        loop {
            let (_, doc) = lambda_call(&app, "GET", &format!("/v1/jobs/{id}"), None).await?;
            match doc["status"].as_str() {
                Some("succeeded") => break,
                Some("failed" | "cancelled") => bail!("job {id} ended {}: {}", doc["status"], doc["error"]),
                _ if Instant::now() > deadline => bail!("job {id} unfinished after 600 s: {doc}"),
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        // The answers, as a client reads them once.
        let (status, _) = lambda_call(&app, "GET", &format!("/v1/jobs/{id}/result"), None).await?;
        if status != 200 {
            bail!("result of {id}: {status}");
        }
    }
    // SIGTERM: each worker writes its last usage and metrics and exits.
    for w in workers {
        w.terminate(Duration::from_secs(60)).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let usage: Usage = http.get(&usage_url).send().await?.error_for_status()?.json().await?;
    let stats = sim.stats().await?;
    sim.proc.stop().await;

    let calls: u64 = stats.orgs.values().map(|o| o.accepted_calls).sum();
    if calls == 0 {
        bail!("no provider call was made");
    }
    let completion: u64 = stats.orgs.values().map(|o| o.accepted_completion_tokens).sum();
    let per = |v: f64| v / calls as f64;
    let table = |name: &str| usage.dynamodb_capacity.get(name).cloned().unwrap_or_default();
    let (jobs, ledger) = (table(&cfg.aws.jobs_table), table(&cfg.aws.ledger_table));
    let writes: f64 = usage.dynamodb_capacity.values().map(|c| c.write_units).sum();
    let reads: f64 = usage.dynamodb_capacity.values().map(|c| c.read_units).sum();
    let actions = usage.requests.get("dynamodb").cloned().unwrap_or_default();
    let r = CostRun {
        variant: variant.to_string(),
        jobs: ids.len(),
        provider_calls: calls,
        output_chars_per_call: per(completion as f64 * 4.0),
        jobs_table_write_units_per_call: per(jobs.write_units),
        ledger_write_units_per_call: per(ledger.write_units),
        write_units_per_call: per(writes),
        read_units_per_call: per(reads),
        dynamodb_requests_per_call: per(usage.requests_of("dynamodb") as f64),
        sqs_requests_per_call: per(usage.requests_of("sqs") as f64),
        cloudwatch_requests_per_call: per(usage.requests_of("cloudwatch") as f64),
        secretsmanager_requests: usage.requests_of("secretsmanager"),
        dynamodb_actions_per_call: actions.into_iter().map(|(a, n)| (a, per(n as f64))).collect(),
        largest_job_table_item_bytes: usage.dynamodb_items.get(&cfg.aws.jobs_table).map_or(0, |i| i.max_bytes),
        secs,
    };
    eprintln!(
        "  {variant}: {} calls: {:.2} write units per call ({:.2} jobs table, {:.2} ledger), {:.2} read units, {:.2} SQS, {:.3} CloudWatch requests",
        r.provider_calls,
        r.write_units_per_call,
        r.jobs_table_write_units_per_call,
        r.ledger_write_units_per_call,
        r.read_units_per_call,
        r.sqs_requests_per_call,
        r.cloudwatch_requests_per_call
    );
    Ok(r)
}

fn example_spec() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/screenplay.json"))
}

/// One request through the Lambda adapter, as API Gateway sends it.
async fn lambda_call(app: &axum::Router, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<(u16, Value)> {
    let bearer = format!("Bearer {TENANT_KEY}");
    let event = crate::lambda::rest_event(method, path, body, &[("Authorization", bearer.as_str())])
        .map_err(|e| anyhow::anyhow!(e))?;
    let resp = crate::lambda::invoke(app.clone(), event).await.map_err(|e| anyhow::anyhow!(e))?;
    let status = resp["statusCode"].as_u64().unwrap_or(0) as u16;
    let body = resp["body"].as_str().and_then(|b| serde_json::from_str(b).ok()).unwrap_or(Value::Null);
    Ok((status, body))
}
