//! The simulator's configuration: the organizations it impersonates, their
//! per-model limits, and the latency and faults it injects.
//!
//! Read from TOML by [`SimConfig::from_toml`], which also checks the values
//! that would otherwise make the simulator misbehave silently (duplicate
//! keys, probabilities outside `[0, 1]`).
//!
//! ```toml
//! listen = "127.0.0.1:9100"
//! seed = 7
//! [latency]            # (base_ms + per_token_ms × completion tokens) × time_scale
//! base_ms = 200
//! per_token_ms = 5
//! time_scale = 0.1
//! [faults]             # exclusive per-request probabilities
//! server_error_rate = 0.01
//! drop_rate = 0.005
//! stall_rate = 0.001
//! stall_ms = 30000
//! [[orgs]]
//! name = "org-a"
//! api_key = "sk-sim-a"
//! models."gpt-4o-mini" = { rpm = 500, tpm = 200000 }
//! # enforce_burst_secs = 10 in a model's table: a 10 s bucket behind
//! # headers that still show the per-minute one
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::domain::{ModelName, OrgName};

/// Where `ratepool sim` listens when the config does not say.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9100";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Address to bind; [`DEFAULT_LISTEN`] when absent.
    #[serde(default)]
    pub listen: Option<String>,
    /// Seed of the fault-injection RNG, so a faulty run can be replayed.
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default)]
    pub latency: LatencyConfig,
    #[serde(default)]
    pub faults: FaultConfig,
    /// Prompt estimate = ceil(characters of all message contents / this),
    /// the same rule OpenAI documents for what it charges at arrival.
    #[serde(default = "default_chars_per_token")]
    pub chars_per_token: f64,
    #[serde(default)]
    pub orgs: Vec<SimOrg>,
}

fn default_seed() -> u64 {
    1
}

fn default_chars_per_token() -> f64 {
    4.0
}

/// How long an accepted call takes: `(base_ms + per_token_ms × completion
/// tokens) × time_scale`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LatencyConfig {
    pub base_ms: f64,
    pub per_token_ms: f64,
    /// Multiplies every latency; 0 answers at once (tests), 0.1 runs a demo
    /// ten times faster than the real provider would.
    pub time_scale: f64,
}

impl Default for LatencyConfig {
    fn default() -> Self {
        Self { base_ms: 200.0, per_token_ms: 5.0, time_scale: 1.0 }
    }
}

/// Probabilities of each injected fault, drawn once per request from the
/// seeded RNG. They are exclusive outcomes, so their sum must be ≤ 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    /// Answer 500, 502 or 503 and charge nothing.
    pub server_error_rate: f64,
    /// Close the connection without any HTTP response.
    pub drop_rate: f64,
    /// Hang `stall_ms` before handling the request normally.
    pub stall_rate: f64,
    /// Not multiplied by `time_scale`: a stall exists to outlast the client's
    /// timeout, which does not scale.
    pub stall_ms: u64,
}

/// A partial [`FaultConfig`], as `POST /_sim/faults` accepts it.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FaultPatch {
    server_error_rate: Option<f64>,
    drop_rate: Option<f64>,
    stall_rate: Option<f64>,
    stall_ms: Option<u64>,
}

impl FaultConfig {
    /// `self` with the fields the patch names replaced, if the result is valid.
    pub(super) fn patched(&self, p: &FaultPatch) -> anyhow::Result<Self> {
        let next = Self {
            server_error_rate: p.server_error_rate.unwrap_or(self.server_error_rate),
            drop_rate: p.drop_rate.unwrap_or(self.drop_rate),
            stall_rate: p.stall_rate.unwrap_or(self.stall_rate),
            stall_ms: p.stall_ms.unwrap_or(self.stall_ms),
        };
        next.validate()?;
        Ok(next)
    }

    fn validate(&self) -> anyhow::Result<()> {
        for (name, v) in [
            ("server_error_rate", self.server_error_rate),
            ("drop_rate", self.drop_rate),
            ("stall_rate", self.stall_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("faults.{name} must be between 0 and 1, got {v}");
            }
        }
        let sum = self.server_error_rate + self.drop_rate + self.stall_rate;
        if sum > 1.0 {
            bail!("faults: server_error_rate + drop_rate + stall_rate must be at most 1, got {sum}");
        }
        Ok(())
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimOrg {
    pub name: String,
    /// The bearer token that selects this org. A fake key, but still kept out
    /// of `Debug` so it never lands in logs next to real ones.
    pub api_key: String,
    pub models: BTreeMap<String, SimLimits>,
    /// Answer 503 to everything (an outage).
    #[serde(default)]
    pub down: bool,
    /// Answer 429 `insufficient_quota` (billing exhausted).
    #[serde(default)]
    pub insufficient_quota: bool,
}

impl fmt::Debug for SimOrg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimOrg")
            .field("name", &self.name)
            .field("api_key", &"***")
            .field("models", &self.models)
            .field("down", &self.down)
            .field("insufficient_quota", &self.insufficient_quota)
            .finish()
    }
}

/// One (org, model)'s limits, per minute, as OpenAI states them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimLimits {
    pub rpm: u64,
    pub tpm: u64,
    /// Enforce the limits over a bucket of this many seconds of refill
    /// instead of a whole minute (Azure OpenAI counts RPM in 10-second
    /// slices), while the headers still advertise the per-minute bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforce_burst_secs: Option<u64>,
}

impl SimConfig {
    /// Parses and checks a TOML config; parse errors name line and column.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text).context("invalid simulator config")?;
        config.validate()?;
        Ok(config)
    }

    /// The address to bind.
    pub fn listen_addr(&self) -> &str {
        self.listen.as_deref().unwrap_or(DEFAULT_LISTEN)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !(self.chars_per_token.is_finite() && self.chars_per_token > 0.0) {
            bail!("chars_per_token must be a positive number, got {}", self.chars_per_token);
        }
        let l = &self.latency;
        for (name, v) in [("base_ms", l.base_ms), ("per_token_ms", l.per_token_ms), ("time_scale", l.time_scale)] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("latency.{name} must be a non-negative number, got {v}");
            }
        }
        self.faults.validate()?;
        let mut names = HashSet::new();
        let mut keys = HashSet::new();
        for org in &self.orgs {
            OrgName::parse(org.name.as_str()).with_context(|| format!("orgs: bad name {:?}", org.name))?;
            if !names.insert(org.name.as_str()) {
                bail!("orgs: duplicate org name {:?}", org.name);
            }
            if org.api_key.is_empty() {
                bail!("orgs.{}: api_key must not be empty", org.name);
            }
            if !keys.insert(org.api_key.as_str()) {
                // Two orgs with one key would make the key→org lookup ambiguous.
                bail!("orgs.{}: api_key is already used by another org", org.name);
            }
            for (model, limits) in &org.models {
                ModelName::parse(model.as_str()).with_context(|| format!("orgs.{}.models", org.name))?;
                if limits.enforce_burst_secs.is_some_and(|b| !(1..=60).contains(&b)) {
                    bail!("orgs.{}.models.{model}: enforce_burst_secs must be between 1 and 60", org.name);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_with_defaults_parses() {
        let c = SimConfig::from_toml(
            r#"
            [[orgs]]
            name = "org-a"
            api_key = "sk-a"
            models."gpt-4o-mini" = { rpm = 500, tpm = 200000 }
            "#,
        )
        .unwrap();
        assert_eq!(c.seed, 1);
        assert_eq!(c.listen_addr(), DEFAULT_LISTEN);
        assert_eq!(c.latency, LatencyConfig::default());
        assert_eq!(c.chars_per_token, 4.0);
        assert_eq!(c.orgs[0].models["gpt-4o-mini"], SimLimits { rpm: 500, tpm: 200_000, enforce_burst_secs: None });
        assert!(!format!("{c:?}").contains("sk-a"), "api keys must not be printed");
    }

    #[test]
    fn integers_are_accepted_for_float_fields() {
        let c = SimConfig::from_toml("chars_per_token = 3\n[latency]\nbase_ms = 50\ntime_scale = 0\n").unwrap();
        assert_eq!(c.chars_per_token, 3.0);
        assert_eq!(c.latency.base_ms, 50.0);
        assert_eq!(c.latency.per_token_ms, 5.0);
        assert_eq!(c.latency.time_scale, 0.0);
    }

    #[test]
    fn errors_name_the_place_and_the_rule() {
        let e = format!("{:#}", SimConfig::from_toml("seed = 1\nbogus = 2\n").unwrap_err());
        assert!(e.contains("bogus") && e.contains("line 2"), "{e}");
        let e = format!("{:#}", SimConfig::from_toml("[faults]\ndrop_rate = 1.5\n").unwrap_err());
        assert!(e.contains("drop_rate"), "{e}");
        let dup = r#"
            [[orgs]]
            name = "a"
            api_key = "k"
            models = {}
            [[orgs]]
            name = "b"
            api_key = "k"
            models = {}
        "#;
        let e = format!("{:#}", SimConfig::from_toml(dup).unwrap_err());
        assert!(e.contains("api_key"), "{e}");
    }

    #[test]
    fn fault_patch_replaces_only_named_fields() {
        let f = FaultConfig { stall_ms: 10, ..FaultConfig::default() };
        let p: FaultPatch = serde_json::from_str(r#"{"drop_rate": 0.5}"#).unwrap();
        assert_eq!(f.patched(&p).unwrap(), FaultConfig { drop_rate: 0.5, stall_ms: 10, ..FaultConfig::default() });
        let p: FaultPatch = serde_json::from_str(r#"{"drop_rate": 0.6, "stall_rate": 0.6}"#).unwrap();
        assert!(f.patched(&p).is_err());
        assert!(serde_json::from_str::<FaultPatch>(r#"{"nope": 1}"#).is_err());
    }
}
