//! A pool for the Calls door's tests: `ratepool sim` serving a chat and an
//! embeddings model per org, and `ratepool serve` in front of it, both real
//! processes on port 0, with helpers to call, count and kill.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{OrgSpec, Proc, TENANT_A_KEY, http, org_key, org_key_env, spawn_with_log_level};

pub const CHAT_MODEL: &str = "gpt-4o-mini";
pub const EMBEDDING_MODEL: &str = "text-embedding-3-small";

/// What the sim and the server are started with.
pub struct PoolSpec<'a> {
    pub orgs: &'a [OrgSpec],
    /// The simulator's latency: base ms, ms per output token.
    pub latency: (f64, f64),
    /// Extra TOML for the server config (a `[calls]` section, quotas…).
    pub extra: &'a str,
    /// Extra TOML for tenant alpha (its `[tenants.quota]`).
    pub alpha_quota: &'a str,
}

pub struct Pool {
    pub dir: tempfile::TempDir,
    pub sim: Proc,
    pub server: Proc,
    config: PathBuf,
    orgs: Vec<(String, String)>,
    starts: usize,
}

impl Pool {
    pub fn start(spec: PoolSpec<'_>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut sim_toml = format!(
            "listen = \"127.0.0.1:0\"\n[latency]\nbase_ms = {}\nper_token_ms = {}\ntime_scale = 1.0\n",
            spec.latency.0, spec.latency.1
        );
        for o in spec.orgs {
            sim_toml.push_str(&format!(
                "[[orgs]]\nname = \"{n}\"\napi_key = \"{k}\"\n[orgs.models.\"{CHAT_MODEL}\"]\nrpm = {r}\ntpm = {t}\n\
                 [orgs.models.\"{EMBEDDING_MODEL}\"]\nrpm = {r}\ntpm = {te}\n",
                n = o.name,
                k = org_key(o.name),
                r = o.rpm,
                t = o.tpm,
                te = o.tpm * 10,
            ));
        }
        let sim_path = dir.path().join("sim.toml");
        std::fs::write(&sim_path, sim_toml).expect("write sim config");
        let sim = spawn_with_log_level(
            &["sim", "--config", sim_path.to_str().expect("utf-8 path")],
            &[],
            "info",
            &dir.path().join("sim.log"),
            &dir.path().join("sim.out"),
        );
        let mut toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nbackend = \"sqlite\"\npath = \"{}\"\n{}\n",
            dir.path().join("ratepool.db").display(),
            spec.extra
        );
        for o in spec.orgs {
            toml.push_str(&format!(
                "[[orgs]]\nname = \"{n}\"\nbase_url = \"{u}/v1\"\napi_key_env = \"{e}\"\ntimeout_secs = 20\n\
                 [orgs.models.\"{CHAT_MODEL}\"]\nrpm = {r}\ntpm = {t}\n[orgs.models.\"{EMBEDDING_MODEL}\"]\nrpm = {r}\ntpm = {te}\n",
                n = o.name,
                u = sim.url,
                e = org_key_env(o.name),
                r = o.rpm,
                t = o.tpm,
                te = o.tpm * 10,
            ));
        }
        toml.push_str(&format!(
            "[[tenants]]\nname = \"alpha\"\napi_key_env = \"TENANT_A_KEY\"\n{}\n\
             [[tenants]]\nname = \"beta\"\napi_key_env = \"TENANT_B_KEY\"\n",
            spec.alpha_quota
        ));
        let config = dir.path().join("ratepool.toml");
        std::fs::write(&config, toml).expect("write server config");
        let orgs: Vec<(String, String)> = spec.orgs.iter().map(|o| (org_key_env(o.name), org_key(o.name))).collect();
        let server = Self::spawn_server(dir.path(), &config, &orgs, 0);
        Self { dir, sim, server, config, orgs, starts: 1 }
    }

    fn spawn_server(dir: &std::path::Path, config: &std::path::Path, orgs: &[(String, String)], n: usize) -> Proc {
        let mut envs: Vec<(&str, &str)> = orgs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        envs.push(("TENANT_A_KEY", TENANT_A_KEY));
        envs.push(("TENANT_B_KEY", super::TENANT_B_KEY));
        spawn_with_log_level(
            &["serve", "--config", config.to_str().expect("utf-8 path")],
            &envs,
            "info,ratepool=debug",
            &dir.join(format!("serve-{n}.log")),
            &dir.join(format!("serve-{n}.out")),
        )
    }

    /// SIGKILLs the server and starts it again on the same database (on a
    /// new port).
    pub fn kill_and_restart_server(&mut self) {
        self.server.kill();
        self.server = Self::spawn_server(self.dir.path(), &self.config, &self.orgs, self.starts);
        self.starts += 1;
    }

    /// The base URL an OpenAI SDK is given.
    pub fn v1(&self) -> String {
        format!("{}/v1", self.server.url)
    }

    /// POSTs `body` to `/v1/PATH` as `key` with extra `headers`.
    pub fn post(&self, path: &str, key: &str, body: &str, headers: &[(&str, &str)]) -> reqwest::blocking::Response {
        let mut req = http()
            .post(format!("{}/v1/{path}", self.server.url))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body.to_owned());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().expect("POST")
    }

    pub fn sim_stats(&self) -> Value {
        super::sim_stats(&self.sim)
    }

    /// Every request the simulator received, per `X-Client-Request-Id`.
    pub fn attempts(&self) -> BTreeMap<String, u64> {
        http().get(format!("{}/_sim/attempts", self.sim.url)).send().expect("attempts").json().expect("json")
    }

    /// Provider calls the simulator answered 429, over every org.
    pub fn provider_429s(&self) -> u64 {
        let stats = self.sim_stats();
        stats["orgs"]
            .as_object()
            .map(|orgs| {
                orgs.values()
                    .map(|o| {
                        o["rate_limited_requests"].as_u64().unwrap_or(0)
                            + o["rate_limited_tokens"].as_u64().unwrap_or(0)
                    })
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The server's `/metrics` text.
    pub fn metrics(&self) -> String {
        http().get(format!("{}/metrics", self.server.url)).send().expect("metrics").text().expect("text")
    }

    /// The sum of every sample of metric `name` whose labels contain all of `labels`.
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }

    /// Waits until `cond` holds, for at most `within`.
    pub fn eventually(&self, within: Duration, what: &str, mut cond: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while !cond(self) {
            assert!(start.elapsed() < within, "{what} did not happen within {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
