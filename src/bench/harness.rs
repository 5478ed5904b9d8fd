//! The benchmark's moving parts, as a user would run them: `ratepool sim`
//! and `ratepool serve` as child processes on loopback ports, jobs submitted
//! over the HTTP API, and what the processes report about themselves (the
//! simulator's stats, the server's Prometheus text, `/proc` memory).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::sim::{LatencyConfig, SimStats};

/// The one model every benchmark org serves.
pub const MODEL: &str = "gpt-4o-mini";
const TENANT_KEY_ENV: &str = "RATEPOOL_BENCH_TENANT_KEY";

/// One simulated organization and the limits both sides agree on.
#[derive(Debug, Clone, Copy)]
pub struct OrgLimits {
    pub rpm: u64,
    pub tpm: u64,
    /// The simulator's real bucket in seconds of refill, if shorter than
    /// the minute its headers advertise (ratepool is not told).
    pub enforce_burst_secs: Option<u64>,
    /// The `burst_secs` ratepool is configured with for the org (its
    /// default, 60, when `None`).
    pub told_burst_secs: Option<u64>,
}

impl OrgLimits {
    pub fn per_minute(rpm: u64, tpm: u64) -> Self {
        Self { rpm, tpm, enforce_burst_secs: None, told_burst_secs: None }
    }
}

pub fn org_name(i: usize) -> String {
    format!("org-{i}")
}

pub fn org_key(i: usize) -> String {
    format!("sk-bench-{i}-{}", uuid::Uuid::new_v4().simple())
}

/// A child process, killed when dropped.
pub struct Proc {
    child: Child,
    pub url: String,
    pub pid: u32,
}

impl Proc {
    /// Starts `bin args…` and waits for the `listening on URL` line it prints.
    pub(crate) async fn spawn(
        bin: &Path,
        args: &[&str],
        envs: &[(String, String)],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let stderr = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = Command::new(bin)
            .args(args)
            .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} {args:?}", bin.display()))?;
        let pid = child.id().context("child has no pid")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.split("listening on ").nth(1) {
                    return Ok(url.trim().to_string());
                }
            }
            anyhow::Ok(String::new())
        })
        .await
        .context("timed out waiting for the process to listen")??;
        if url.is_empty() {
            bail!("{args:?} exited before listening; see {}", log.display());
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { child, url, pid })
    }

    /// Resident and peak resident memory in bytes (`VmRSS`, `VmHWM`).
    pub fn memory(&self) -> anyhow::Result<(u64, u64)> {
        let status = procfs::process::Process::new(self.pid as i32)?.status()?;
        let kib = |v: Option<u64>, name: &str| v.map(|k| k * 1024).with_context(|| format!("no {name}"));
        Ok((kib(status.vmrss, "VmRSS")?, kib(status.vmhwm, "VmHWM")?))
    }

    /// CPU time the process has used so far (user + system).
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        let stat = procfs::process::Process::new(self.pid as i32)?.stat()?;
        Ok(Duration::from_secs_f64((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64))
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then waits up to `within` for a clean exit.
    pub async fn terminate(mut self, within: Duration) -> anyhow::Result<()> {
        let sent = Command::new("kill").args(["-TERM", &self.pid.to_string()]).status().await?;
        if !sent.success() {
            bail!("could not signal {}", self.pid);
        }
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .with_context(|| format!("{} still running {within:?} after SIGTERM", self.pid))??;
        if !status.success() {
            bail!("{} exited {status} after SIGTERM", self.pid);
        }
        Ok(())
    }
}

/// `ratepool relay --to upstream`: a do-nothing relay (figure 10).
pub async fn start_relay(bin: &Path, dir: &Path, upstream: &str) -> anyhow::Result<Proc> {
    Proc::spawn(bin, &["relay", "--to", upstream], &[], &dir.join("relay.log")).await
}

/// `ratepool sim` with one model per org.
pub struct Sim {
    pub proc: Proc,
    pub keys: Vec<String>,
    http: reqwest::Client,
}

impl Sim {
    pub async fn start(bin: &Path, dir: &Path, orgs: &[OrgLimits], latency: LatencyConfig) -> anyhow::Result<Self> {
        let keys: Vec<String> = (0..orgs.len()).map(org_key).collect();
        let mut toml = format!(
            "listen = \"127.0.0.1:0\"\n[latency]\nbase_ms = {}\nper_token_ms = {}\ntime_scale = {}\n",
            latency.base_ms, latency.per_token_ms, latency.time_scale
        );
        for (i, o) in orgs.iter().enumerate() {
            toml.push_str(&format!(
                "[[orgs]]\nname = \"{}\"\napi_key = \"{}\"\n[orgs.models.\"{MODEL}\"]\nrpm = {}\ntpm = {}\n",
                org_name(i),
                keys[i],
                o.rpm,
                o.tpm
            ));
            if let Some(secs) = o.enforce_burst_secs {
                toml.push_str(&format!("enforce_burst_secs = {secs}\n"));
            }
        }
        let path = dir.join("sim.toml");
        std::fs::write(&path, toml)?;
        let proc = Proc::spawn(bin, &["sim", "--config", &path.to_string_lossy()], &[], &dir.join("sim.log")).await?;
        Ok(Self { proc, keys, http: reqwest::Client::new() })
    }

    pub fn base_url(&self) -> String {
        format!("{}/v1", self.proc.url)
    }

    pub async fn stats(&self) -> anyhow::Result<SimStats> {
        Ok(self.http.get(format!("{}/_sim/stats", self.proc.url)).send().await?.error_for_status()?.json().await?)
    }
}

/// How the server under test is set up.
#[derive(Debug, Clone)]
pub struct ServerSetup {
    pub orgs: Vec<OrgLimits>,
    pub concurrency: usize,
    pub header_sync: bool,
    /// A PostgreSQL database's URL to store in, instead of SQLite in `dir`.
    pub postgres: Option<String>,
}

/// `ratepool serve` on SQLite in `dir` (or on PostgreSQL), calling the
/// simulator's orgs.
pub struct Server {
    pub proc: Proc,
    key: String,
    http: reqwest::Client,
}

/// The part of a job's status document the benchmark reads.
#[derive(Debug, Clone, Deserialize)]
pub struct JobDoc {
    pub id: String,
    pub status: String,
    pub steps_done: u32,
    pub steps_total: u32,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub error: Option<String>,
}

impl JobDoc {
    pub fn is_final(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "cancelled")
    }
}

#[derive(Deserialize)]
struct Accepted {
    id: String,
}

/// The variable a PostgreSQL-backed server reads its database URL from.
const POSTGRES_URL_ENV: &str = "RATEPOOL_BENCH_POSTGRES_URL";

impl Server {
    pub async fn start(bin: &Path, dir: &Path, sim: &Sim, setup: &ServerSetup) -> anyhow::Result<Self> {
        let mut envs = Vec::new();
        let storage = match &setup.postgres {
            None => format!("[storage]\nbackend = \"sqlite\"\npath = \"{}\"\n", dir.join("ratepool.db").display()),
            Some(url) => {
                envs.push((POSTGRES_URL_ENV.to_string(), url.clone()));
                format!("[storage]\nbackend = \"postgres\"\n[postgres]\nurl_env = \"{POSTGRES_URL_ENV}\"\n")
            }
        };
        let mut toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{storage}\
             [workers]\nconcurrency = {}\nstep_parallelism = 8\nvisibility_timeout_secs = 60\n",
            setup.concurrency.max(1)
        );
        for (i, o) in setup.orgs.iter().enumerate() {
            let var = format!("RATEPOOL_BENCH_ORG_{i}_KEY");
            // `burst_secs` is the org's, before its model table.
            let burst = o.told_burst_secs.map(|b| format!("burst_secs = {b}\n")).unwrap_or_default();
            toml.push_str(&format!(
                "[[orgs]]\nname = \"{}\"\nbase_url = \"{}\"\napi_key_env = \"{var}\"\nheader_sync = {}\n{burst}\
                 [orgs.models.\"{MODEL}\"]\nrpm = {}\ntpm = {}\n",
                org_name(i),
                sim.base_url(),
                setup.header_sync,
                o.rpm,
                o.tpm
            ));
            envs.push((var, sim.keys[i].clone()));
        }
        toml.push_str(&format!("[[tenants]]\nname = \"bench\"\napi_key_env = \"{TENANT_KEY_ENV}\"\n"));
        let key = format!("bench-{}", uuid::Uuid::new_v4().simple());
        envs.push((TENANT_KEY_ENV.to_string(), key.clone()));
        let path = dir.join("ratepool.toml");
        std::fs::write(&path, toml)?;
        let proc =
            Proc::spawn(bin, &["serve", "--config", &path.to_string_lossy()], &envs, &dir.join("server.log")).await?;
        Ok(Self { proc, key, http: reqwest::Client::builder().timeout(Duration::from_secs(60)).build()? })
    }

    /// The tenant key its API takes.
    pub fn tenant_key(&self) -> &str {
        &self.key
    }

    pub async fn submit(&self, spec: &str) -> anyhow::Result<String> {
        let resp = self
            .http
            .post(format!("{}/v1/jobs", self.proc.url))
            .bearer_auth(&self.key)
            .header("content-type", "application/json")
            .body(spec.to_string())
            .send()
            .await?;
        let status = resp.status();
        if status.as_u16() != 202 {
            bail!("submission refused ({status}): {}", resp.text().await.unwrap_or_default());
        }
        Ok(resp.json::<Accepted>().await?.id)
    }

    pub async fn job(&self, id: &str) -> anyhow::Result<JobDoc> {
        let url = format!("{}/v1/jobs/{id}", self.proc.url);
        Ok(self.http.get(url).bearer_auth(&self.key).send().await?.error_for_status()?.json().await?)
    }

    /// Polls every `every` until all jobs are final, or fails after `timeout`.
    pub async fn wait_all(&self, ids: &[String], every: Duration, timeout: Duration) -> anyhow::Result<Vec<JobDoc>> {
        let start = Instant::now();
        let mut done: HashMap<String, JobDoc> = HashMap::new();
        loop {
            let pending: Vec<&String> = ids.iter().filter(|id| !done.contains_key(*id)).collect();
            for id in pending {
                let doc = self.job(id).await?;
                if doc.is_final() {
                    done.insert(id.clone(), doc);
                }
            }
            if done.len() == ids.len() {
                return Ok(ids.iter().filter_map(|id| done.remove(id)).collect());
            }
            if start.elapsed() > timeout {
                bail!("{} of {} jobs unfinished after {timeout:?}", ids.len() - done.len(), ids.len());
            }
            tokio::time::sleep(every).await;
        }
    }

    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let text = self.http.get(format!("{}/metrics", self.proc.url)).send().await?.error_for_status()?.text().await?;
        Metrics::parse(&text)
    }
}

/// The server's `/metrics`, parsed.
pub struct Metrics(prometheus_parse::Scrape);

impl Metrics {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        Ok(Self(prometheus_parse::Scrape::parse(lines)?))
    }

    /// Sum over the samples named `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        use prometheus_parse::Value;
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                _ => 0.0,
            })
            // From +0.0: an empty float sum is -0.0, which prints as "-0".
            .fold(0.0, |a, b| a + b)
    }

    /// The `q` quantile of histogram `name`, interpolated linearly inside its
    /// bucket as Prometheus' `histogram_quantile` does.
    pub fn quantile(&self, name: &str, q: f64) -> Option<f64> {
        let buckets = self.0.samples.iter().find_map(|s| match &s.value {
            prometheus_parse::Value::Histogram(b) if s.metric == name => Some(b.clone()),
            _ => None,
        })?;
        let total = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
        if total == 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for b in &buckets {
            if b.count >= rank {
                if b.less_than.is_infinite() {
                    return Some(lower);
                }
                let inside = b.count - below;
                let frac = if inside > 0.0 { (rank - below) / inside } else { 1.0 };
                return Some(lower + (b.less_than - lower) * frac);
            }
            lower = b.less_than;
            below = b.count;
        }
        Some(lower)
    }
}

/// Seconds since the epoch of an RFC 3339 time the API printed.
pub fn epoch_secs(rfc3339: &str) -> anyhow::Result<f64> {
    let t = humantime::parse_rfc3339(rfc3339).with_context(|| format!("bad time {rfc3339:?}"))?;
    Ok(t.duration_since(SystemTime::UNIX_EPOCH)?.as_secs_f64())
}

/// First submission to last finish, from the server's own timestamps.
pub fn makespan(docs: &[JobDoc]) -> anyhow::Result<f64> {
    let mut first = f64::INFINITY;
    let mut last = f64::NEG_INFINITY;
    for d in docs {
        first = first.min(epoch_secs(&d.created_at)?);
        let end = d.finished_at.as_deref().with_context(|| format!("job {} has no finish time", d.id))?;
        last = last.max(epoch_secs(end)?);
    }
    Ok(last - first)
}

/// A fresh directory for one run under the benchmark's work directory.
pub fn run_dir(root: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let dir = root.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let text = "# TYPE x histogram\nx_bucket{le=\"1\"} 50\nx_bucket{le=\"2\"} 90\nx_bucket{le=\"4\"} 100\nx_bucket{le=\"+Inf\"} 100\nx_sum 150\nx_count 100\n";
        let m = Metrics::parse(text).unwrap();
        assert_eq!(m.quantile("x", 0.5), Some(1.0));
        assert!((m.quantile("x", 0.7).unwrap() - 1.5).abs() < 1e-9);
        assert!((m.quantile("x", 0.95).unwrap() - 3.0).abs() < 1e-9);
        assert_eq!(m.sum("x_sum", &[]), 150.0);
        assert_eq!(m.quantile("y", 0.5), None);
    }

    #[test]
    fn makespan_runs_from_first_submission_to_last_finish() {
        let doc = |c: &str, f: &str| JobDoc {
            id: "j".into(),
            status: "succeeded".into(),
            steps_done: 1,
            steps_total: 1,
            created_at: c.into(),
            finished_at: Some(f.into()),
            error: None,
        };
        let docs = [
            doc("2026-01-01T00:00:00.000Z", "2026-01-01T00:00:01.500Z"),
            doc("2026-01-01T00:00:00.250Z", "2026-01-01T00:00:03.000Z"),
        ];
        assert!((makespan(&docs).unwrap() - 3.0).abs() < 1e-9);
    }
}
