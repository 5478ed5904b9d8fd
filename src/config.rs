//! The configuration file (TOML) and its validation.
//!
//! The file names environment variables for every secret, never the secret
//! itself. Field-level mistakes are caught while deserializing, so the error
//! carries the file's line and column; cross-field mistakes (duplicate
//! names) use the span of the offending value for the same reason.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use toml::Spanned;

use crate::aws::AwsConfig;
use crate::domain::{Env, ModelName, OrgName, TenantId};
use crate::engine::quota::{TenantQuota, TenantQuotas};
use crate::engine::router::OrgSettings;
use crate::engine::window::{WindowModel, WindowSettings};
use crate::provider::OrgEndpoint;
use crate::spec::SpecLimits;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0}")]
    Secret(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub workers: WorkersConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub orgs: Vec<OrgConfig>,
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    #[serde(default)]
    pub webhooks: WebhooksConfig,
    /// Settings of the built-in simulator used by `serve --simulate`.
    #[serde(default)]
    pub simulator: SimulatorConfig,
    /// Resource names for `storage.backend = "aws"`.
    #[serde(default)]
    pub aws: AwsConfig,
    /// The server for `storage.backend = "postgres"`.
    #[serde(default)]
    pub postgres: crate::postgres::PostgresConfig,
    /// The Calls door: `/v1/chat/completions` and `/v1/embeddings`.
    #[serde(default)]
    pub calls: CallsConfig,
    /// Failure drills: faults injected on purpose. Never set in production.
    #[serde(default)]
    pub drill: DrillConfig,
}

/// `[drill]`: a game day's faults, injected by this process into its own
/// storage calls (on any backend), so a staging deployment can show that
/// jobs ride them out. Each fault is counted in `/metrics`
/// (`ratepool_drill_storage_faults_total{kind}`), and the server warns at
/// start while a drill is configured.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillConfig {
    /// Per-call probabilities of a failed, throttled or answer-lost write
    /// and of a stall (`storage::faults::FaultPlan`).
    #[serde(default)]
    pub storage_faults: Option<crate::storage::faults::FaultPlan>,
}

fn default_interactive_weight() -> NonZeroU64 {
    nz(3)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { listen: default_listen() }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    Sqlite,
    /// SQS + DynamoDB (+ CloudWatch metrics), named in `[aws]`.
    Aws,
    /// One PostgreSQL database shared by every process, set in `[postgres]`.
    Postgres,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default = "default_backend")]
    pub backend: StorageKind,
    /// The SQLite file; relative paths are taken from the working directory.
    #[serde(default = "default_db_path")]
    pub path: PathBuf,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { backend: default_backend(), path: default_db_path() }
    }
}

fn default_backend() -> StorageKind {
    StorageKind::Sqlite
}
fn default_db_path() -> PathBuf {
    PathBuf::from("ratepool.db")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    /// Jobs in flight in this process.
    #[serde(default = "default_concurrency")]
    pub concurrency: NonZeroU64,
    /// Steps of one job run at once, unless the job asks for fewer.
    #[serde(default = "default_step_parallelism")]
    pub step_parallelism: NonZeroU64,
    /// How long a received job stays hidden from other workers without a
    /// heartbeat; a dead worker's job is picked up after about this long.
    #[serde(default = "default_visibility")]
    pub visibility_timeout_secs: NonZeroU64,
    /// Runs in a row without a finished step after which a job (that keeps
    /// killing its worker) is dead-lettered and failed.
    #[serde(default = "default_max_receives")]
    pub max_receives: NonZeroU64,
    /// Provider calls one step may make on transient errors (5xx, timeouts,
    /// dropped connections) before the job fails. Rate limits do not count.
    #[serde(default = "default_step_attempts")]
    pub step_max_attempts: NonZeroU64,
    /// On SIGTERM, how long running steps may take to finish before their
    /// jobs are handed back to the queue (keep it under the platform's stop
    /// timeout: Fargate kills 120 s after SIGTERM).
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// Interactive jobs taken per batch job when both wait (batch jobs
    /// still get 1 in `weight + 1`, so a steady interactive load cannot
    /// starve them). Both backends.
    #[serde(default = "default_interactive_weight")]
    pub interactive_weight: NonZeroU64,
    /// How long a call waits for a primary org before fallback orgs may
    /// take it, unless the job sets `fallback_after_secs`.
    #[serde(default = "default_fallback_after")]
    pub fallback_after_secs: u64,
    /// How long a cached answer (a step with `"cache": true`) is served,
    /// unless the job sets `cache_ttl_secs`.
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl_secs: NonZeroU64,
    /// How long after submission a job may take before it fails with the
    /// reason (waiting for capacity that never comes back, a worker, or
    /// retries), unless the job sets `deadline_secs`. 0: no deadline.
    #[serde(default = "default_deadline")]
    pub default_deadline_secs: u64,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            concurrency: default_concurrency(),
            step_parallelism: default_step_parallelism(),
            visibility_timeout_secs: default_visibility(),
            max_receives: default_max_receives(),
            step_max_attempts: default_step_attempts(),
            shutdown_grace_secs: default_grace(),
            cache_ttl_secs: default_cache_ttl(),
            interactive_weight: default_interactive_weight(),
            fallback_after_secs: default_fallback_after(),
            default_deadline_secs: default_deadline(),
        }
    }
}

fn nz(v: u64) -> NonZeroU64 {
    NonZeroU64::new(v).unwrap_or(NonZeroU64::MIN)
}
fn default_concurrency() -> NonZeroU64 {
    nz(64)
}
fn default_step_parallelism() -> NonZeroU64 {
    nz(4)
}
fn default_visibility() -> NonZeroU64 {
    nz(30)
}
fn default_max_receives() -> NonZeroU64 {
    nz(5)
}
fn default_step_attempts() -> NonZeroU64 {
    nz(12)
}
fn default_grace() -> u64 {
    10
}
fn default_fallback_after() -> u64 {
    30
}
fn default_deadline() -> u64 {
    24 * 3600
}
fn default_cache_ttl() -> NonZeroU64 {
    nz(24 * 3600)
}

impl WorkersConfig {
    pub fn visibility_timeout(&self) -> Duration {
        Duration::from_secs(self.visibility_timeout_secs.get())
    }
}

/// The largest `[limits] max_fan_out`: every instance is a call and a
/// checkpoint, and a job's steps are counted in a `u32`.
const MAX_FAN_OUT: u32 = 10_000;

/// Size limits on submissions (see `crate::spec::SpecLimits`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_body")]
    pub max_body_bytes: usize,
    #[serde(default = "default_steps")]
    pub max_steps: usize,
    #[serde(default = "default_rendered")]
    pub max_prompt_bytes: usize,
    /// Instances one `for_each` step may expand to; a job may set a
    /// lower `max_fan_out` of its own.
    #[serde(default = "default_fan_out")]
    pub max_fan_out: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: default_body(),
            max_steps: default_steps(),
            max_prompt_bytes: default_rendered(),
            max_fan_out: default_fan_out(),
        }
    }
}

fn default_fan_out() -> u32 {
    256
}

fn default_body() -> usize {
    1 << 20
}
fn default_steps() -> usize {
    500
}
fn default_rendered() -> usize {
    2 << 20
}

impl LimitsConfig {
    pub fn spec_limits(&self) -> SpecLimits {
        SpecLimits {
            max_body_bytes: self.max_body_bytes,
            max_steps: self.max_steps,
            max_rendered_bytes: self.max_prompt_bytes,
            max_fan_out: self.max_fan_out,
            ..SpecLimits::default()
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelLimits {
    pub rpm: NonZeroU64,
    pub tpm: NonZeroU64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgConfig {
    pub name: Spanned<OrgName>,
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// The environment variable holding this org's API key.
    pub api_key_env: String,
    pub models: BTreeMap<ModelName, ModelLimits>,
    /// Characters per token of the provider's prompt estimate (OpenAI
    /// counts roughly 4) — the ledger charges what the provider will.
    #[serde(default = "default_chars_per_token")]
    pub chars_per_token: f64,
    /// Fraction of each limit left unused, for traffic the ledger cannot see.
    #[serde(default)]
    pub safety_margin: f64,
    /// Pull the ledger toward the provider's `x-ratelimit-*` headers.
    #[serde(default = "default_true")]
    pub header_sync: bool,
    #[serde(default = "default_timeout")]
    pub timeout_secs: NonZeroU64,
    /// A self-hosted or otherwise secondary endpoint (vLLM, Ollama, any
    /// OpenAI-compatible server): used only for steps with `"tier":
    /// "cheap"`, or when the primary orgs have had no capacity for the
    /// job's `fallback_after_secs`.
    #[serde(default)]
    pub fallback: bool,
    /// The burst the ledger allows, in seconds of refill (1 to 60): a
    /// whole minute by default, as OpenAI documents; 10 for Azure OpenAI,
    /// which enforces RPM in 10-second slices. A continuous window learns
    /// a smaller one from 429s by itself.
    #[serde(default = "default_burst_secs")]
    pub burst_secs: u64,
    /// How the provider counts: `"continuous"` (a refilling bucket) or
    /// `"fixed"` (windows of `burst_secs` of unknown alignment: paced).
    #[serde(default)]
    pub window: WindowModel,
}

impl OrgConfig {
    /// The router's settings for this org, calling `base_url` with `api_key`
    /// (the configured URL, or a simulator standing in for it).
    pub fn settings(&self, base_url: String, api_key: SecretString) -> OrgSettings {
        let endpoint = OrgEndpoint {
            name: self.name.get_ref().clone(),
            base_url,
            api_key,
            timeout: Duration::from_secs(self.timeout_secs.get()),
        };
        let limits = self.models.iter().map(|(m, l)| (m.clone(), (l.rpm.get(), l.tpm.get()))).collect();
        OrgSettings {
            chars_per_token: self.chars_per_token,
            header_sync: self.header_sync,
            fallback: self.fallback,
            window: WindowSettings { burst_secs: self.burst_secs, model: self.window },
            ..OrgSettings::new(endpoint, limits, self.safety_margin)
        }
    }
}

fn default_base_url() -> String {
    "https://api.openai.com/v1".into()
}
fn default_chars_per_token() -> f64 {
    4.0
}
fn default_burst_secs() -> u64 {
    60
}
fn default_true() -> bool {
    true
}
fn default_timeout() -> NonZeroU64 {
    nz(120)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: Spanned<TenantId>,
    pub api_key_env: String,
    /// The variable holding the secret this tenant's webhooks are signed
    /// with; a tenant without one cannot ask for webhooks.
    #[serde(default)]
    pub webhook_secret_env: Option<String>,
    /// Limits on this tenant's use of the pool; no section is unlimited.
    #[serde(default)]
    pub quota: TenantQuotaConfig,
}

/// A tenant's `[tenants.quota]`: each limit is optional, and an absent one
/// is unlimited. Zero is refused (a tenant that may do nothing should not
/// have a key).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuotaConfig {
    /// Tokens (prompt estimate + max_tokens, as the ledger charges an org)
    /// per rolling day.
    #[serde(default)]
    pub tokens_per_day: Option<NonZeroU64>,
    /// Provider calls (attempts, retries included) per rolling minute.
    #[serde(default)]
    pub calls_per_minute: Option<NonZeroU64>,
    /// Jobs queued or running at once.
    #[serde(default)]
    pub jobs_in_flight: Option<NonZeroU64>,
}

impl TenantQuotaConfig {
    pub fn quota(&self) -> TenantQuota {
        TenantQuota {
            tokens_per_day: self.tokens_per_day.map(NonZeroU64::get),
            calls_per_minute: self.calls_per_minute.map(NonZeroU64::get),
            jobs_in_flight: self.jobs_in_flight.map(NonZeroU64::get),
        }
    }
}

/// How job webhooks are delivered (`[webhooks]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Lets webhook URLs point at loopback, private and link-local
    /// addresses. Off: a webhook must not become a way into the network
    /// ratepool runs in (the cloud metadata address included).
    #[serde(default)]
    pub allow_private: bool,
    /// Attempts per delivery, the first included.
    #[serde(default = "default_webhook_attempts")]
    pub max_attempts: NonZeroU64,
    /// Ceiling of the first retry's backoff (doubling, with full jitter,
    /// capped at 60 s).
    #[serde(default = "default_webhook_backoff")]
    pub backoff_ms: NonZeroU64,
    /// Per attempt.
    #[serde(default = "default_webhook_timeout")]
    pub timeout_secs: NonZeroU64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            allow_private: false,
            max_attempts: default_webhook_attempts(),
            backoff_ms: default_webhook_backoff(),
            timeout_secs: default_webhook_timeout(),
        }
    }
}

impl WebhooksConfig {
    pub fn policy(&self) -> crate::webhook::DeliveryPolicy {
        crate::webhook::DeliveryPolicy {
            max_attempts: self.max_attempts.get().min(100) as u32,
            base_delay: Duration::from_millis(self.backoff_ms.get()),
            max_delay: Duration::from_secs(60).max(Duration::from_millis(self.backoff_ms.get())),
            timeout: Duration::from_secs(self.timeout_secs.get()),
            allow_private: self.allow_private,
        }
    }
}

fn default_webhook_attempts() -> NonZeroU64 {
    nz(8)
}
fn default_webhook_backoff() -> NonZeroU64 {
    nz(1_000)
}
fn default_webhook_timeout() -> NonZeroU64 {
    nz(10)
}

/// The Calls door (`[calls]`): OpenAI-compatible calls that wait for
/// pooled capacity and, with an `Idempotency-Key`, are stored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallsConfig {
    /// How long a call waits for capacity when it sends no
    /// `Ratepool-Max-Wait` header; 0 answers 429 at once.
    #[serde(default = "default_call_wait")]
    pub max_wait_secs: Spanned<u64>,
    /// The most a `Ratepool-Max-Wait` header may ask for; larger values
    /// are cut to it. Wait plus the provider's timeout should stay under
    /// the SDKs' own 10-minute timeout.
    #[serde(default = "default_call_wait_cap")]
    pub max_wait_cap_secs: Spanned<u64>,
    /// Largest request body; larger ones are refused with 413.
    #[serde(default = "default_call_body")]
    pub max_body_bytes: Spanned<usize>,
    /// What the ledger reserves for a request that sets neither
    /// `max_completion_tokens` nor `max_tokens`.
    #[serde(default = "default_call_max_tokens")]
    pub default_max_tokens: NonZeroU64,
    /// How long a durable call's answer is kept for replays.
    #[serde(default = "default_idempotency_ttl")]
    pub idempotency_ttl_secs: Spanned<u64>,
}

impl Default for CallsConfig {
    fn default() -> Self {
        Self {
            max_wait_secs: default_call_wait(),
            max_wait_cap_secs: default_call_wait_cap(),
            max_body_bytes: default_call_body(),
            default_max_tokens: default_call_max_tokens(),
            idempotency_ttl_secs: default_idempotency_ttl(),
        }
    }
}

/// A default that is not in the file: no span (it cannot be the culprit
/// of an error unless another, spanned, value is).
fn unspanned<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}
fn default_call_wait() -> Spanned<u64> {
    unspanned(60)
}
fn default_call_wait_cap() -> Spanned<u64> {
    unspanned(300)
}
fn default_call_body() -> Spanned<usize> {
    unspanned(8 << 20)
}
fn default_call_max_tokens() -> NonZeroU64 {
    nz(4096)
}
fn default_idempotency_ttl() -> Spanned<u64> {
    unspanned(24 * 3600)
}

/// Limits on `[calls]` values.
const MAX_WAIT_CAP_SECS: u64 = 3600;
const MAX_IDEMPOTENCY_TTL_SECS: u64 = 365 * 86_400;
const MAX_CALL_BODY_BYTES: usize = 256 << 20;

impl CallsConfig {
    fn validate(&self, at: &dyn Fn(std::ops::Range<usize>, String) -> String) -> Result<(), String> {
        let (wait, cap) = (&self.max_wait_secs, &self.max_wait_cap_secs);
        if !(1..=MAX_WAIT_CAP_SECS).contains(cap.get_ref()) {
            return Err(at(cap.span(), format!("[calls] max_wait_cap_secs must be 1 to {MAX_WAIT_CAP_SECS}")));
        }
        if wait.get_ref() > cap.get_ref() {
            // The wait's line, or the cap's when the wait is the default.
            let span = if wait.span().is_empty() { cap.span() } else { wait.span() };
            return Err(at(
                span,
                format!(
                    "[calls] max_wait_secs ({}) must not exceed max_wait_cap_secs ({})",
                    wait.get_ref(),
                    cap.get_ref()
                ),
            ));
        }
        let body = &self.max_body_bytes;
        if !(1024..=MAX_CALL_BODY_BYTES).contains(body.get_ref()) {
            return Err(at(body.span(), format!("[calls] max_body_bytes must be 1024 to {MAX_CALL_BODY_BYTES}")));
        }
        let ttl = &self.idempotency_ttl_secs;
        if !(1..=MAX_IDEMPOTENCY_TTL_SECS).contains(ttl.get_ref()) {
            return Err(at(
                ttl.span(),
                format!("[calls] idempotency_ttl_secs must be 1 to {MAX_IDEMPOTENCY_TTL_SECS} (a year)"),
            ));
        }
        Ok(())
    }
}

/// The built-in simulator's behaviour under `serve --simulate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorConfig {
    #[serde(default = "default_sim_base")]
    pub latency_base_ms: u64,
    #[serde(default = "default_sim_per_token")]
    pub latency_per_token_ms: f64,
    #[serde(default = "default_sim_scale")]
    pub time_scale: f64,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            latency_base_ms: default_sim_base(),
            latency_per_token_ms: default_sim_per_token(),
            time_scale: default_sim_scale(),
        }
    }
}

fn default_sim_base() -> u64 {
    300
}
fn default_sim_per_token() -> f64 {
    4.0
}
fn default_sim_scale() -> f64 {
    1.0
}

/// Tenant keys that are placeholders, not secrets; the server refuses them.
const PLACEHOLDER_KEYS: &[&str] = &["changeme", "change-me", "default", "secret", "password", "test", "key", "xxx"];

/// Minimum tenant key length: short keys are guessable.
const MIN_TENANT_KEY_LEN: usize = 16;

impl Config {
    /// Reads and validates a file; the error names the line and the reason.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid { path: path.to_path_buf(), message })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate(text)?;
        Ok(cfg)
    }

    fn validate(&self, text: &str) -> Result<(), String> {
        let at = |span: std::ops::Range<usize>, msg: String| {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {msg}")
        };
        if self.orgs.is_empty() {
            return Err("no [[orgs]]: at least one provider organization is needed".into());
        }
        let mut seen = BTreeSet::new();
        for org in &self.orgs {
            if !seen.insert(org.name.get_ref().clone()) {
                return Err(at(org.name.span(), format!("duplicate org name {:?}", org.name.get_ref().as_str())));
            }
            let bad = |m: String| at(org.name.span(), format!("org {}: {m}", org.name.get_ref()));
            if org.models.is_empty() {
                return Err(bad("no models: add [orgs.models.\"MODEL\"] with rpm and tpm".into()));
            }
            if !(org.chars_per_token.is_finite() && org.chars_per_token >= 0.5) {
                return Err(bad("chars_per_token must be a number of at least 0.5".into()));
            }
            if !(1..=60).contains(&org.burst_secs) {
                return Err(bad(format!("burst_secs must be between 1 and 60, got {}", org.burst_secs)));
            }
            if !(0.0..0.9).contains(&org.safety_margin) {
                return Err(bad("safety_margin must be in [0, 0.9)".into()));
            }
            if !(org.base_url.starts_with("http://") || org.base_url.starts_with("https://")) {
                return Err(bad(format!("base_url {:?} must start with http:// or https://", org.base_url)));
            }
            check_env_name(&org.api_key_env).map_err(bad)?;
        }
        if self.tenants.is_empty() {
            return Err("no [[tenants]]: at least one tenant is needed to submit jobs".into());
        }
        let mut seen = BTreeSet::new();
        let mut envs = BTreeSet::new();
        for t in &self.tenants {
            let bad = |m: String| at(t.name.span(), m);
            if !seen.insert(t.name.get_ref().clone()) {
                return Err(bad(format!("duplicate tenant name {:?}", t.name.get_ref().as_str())));
            }
            check_env_name(&t.api_key_env).map_err(|m| bad(format!("tenant {}: {m}", t.name.get_ref())))?;
            if !envs.insert(t.api_key_env.clone()) {
                return Err(bad(format!(
                    "tenant {}: api_key_env {} is shared with another tenant",
                    t.name.get_ref(),
                    t.api_key_env
                )));
            }
        }
        if self.limits.max_body_bytes < 1024 || self.limits.max_steps == 0 {
            return Err("[limits]: max_body_bytes must be at least 1024 and max_steps at least 1".into());
        }
        if !(1..=MAX_FAN_OUT).contains(&self.limits.max_fan_out) {
            return Err(format!("[limits]: max_fan_out must be between 1 and {MAX_FAN_OUT}"));
        }
        if self.workers.default_deadline_secs > crate::spec::MAX_DEADLINE_SECS {
            return Err(format!(
                "[workers]: default_deadline_secs must be at most {} (7 days), or 0 for no deadline",
                crate::spec::MAX_DEADLINE_SECS
            ));
        }
        if !(self.simulator.time_scale.is_finite() && self.simulator.time_scale >= 0.0) {
            return Err("[simulator]: time_scale must be a number >= 0".into());
        }
        self.calls.validate(&at)?;
        self.aws.validate()?;
        self.postgres.validate()?;
        if let Some(plan) = &self.drill.storage_faults {
            plan.check().map_err(|m| format!("[drill.storage_faults]: {m}"))?;
        }
        Ok(())
    }

    /// Every model some org serves.
    /// Every tenant's quota (a tenant without `[tenants.quota]` is unlimited).
    pub fn tenant_quotas(&self) -> TenantQuotas {
        TenantQuotas::new(self.tenants.iter().map(|t| (t.name.get_ref().clone(), t.quota.quota())).collect())
    }

    pub fn models(&self) -> BTreeSet<ModelName> {
        self.orgs.iter().flat_map(|o| o.models.keys().cloned()).collect()
    }
}

fn check_env_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "api_key_env {name:?} is not an environment variable name (the key itself goes in the environment, not in this file)"
        ))
    }
}

/// A tenant with its resolved key.
#[derive(Debug, Clone)]
pub struct TenantKey {
    pub tenant: TenantId,
    pub key: SecretString,
}

/// Resolves every tenant's key, refusing empty, placeholder or short keys.
pub fn tenant_keys(cfg: &Config, env: &dyn Env) -> Result<Vec<TenantKey>, ConfigError> {
    let mut out = Vec::new();
    for t in &cfg.tenants {
        let name = t.name.get_ref();
        let key = env.var(&t.api_key_env).unwrap_or_default();
        let trimmed = key.trim();
        if trimmed.is_empty() {
            return Err(ConfigError::Secret(format!(
                "tenant {name}: environment variable {} is not set or empty; set it to a random key (e.g. `openssl rand -hex 24`)",
                t.api_key_env
            )));
        }
        if trimmed.len() < MIN_TENANT_KEY_LEN || PLACEHOLDER_KEYS.contains(&trimmed.to_ascii_lowercase().as_str()) {
            return Err(ConfigError::Secret(format!(
                "tenant {name}: the key in {} is a placeholder or shorter than {MIN_TENANT_KEY_LEN} characters; use a random key",
                t.api_key_env
            )));
        }
        out.push(TenantKey { tenant: name.clone(), key: SecretString::from(trimmed.to_string()) });
    }
    for (i, a) in out.iter().enumerate() {
        if out[i + 1..].iter().any(|b| b.key.expose_secret() == a.key.expose_secret()) {
            return Err(ConfigError::Secret(format!("tenant {}: its key is also another tenant's key", a.tenant)));
        }
    }
    Ok(out)
}

/// The webhook signing secret of every tenant that has one configured,
/// refusing an empty one: a worker must not sign with nothing.
pub fn webhook_secrets(cfg: &Config, env: &dyn Env) -> Result<HashMap<TenantId, SecretString>, ConfigError> {
    let mut out = HashMap::new();
    for t in &cfg.tenants {
        let Some(var) = &t.webhook_secret_env else { continue };
        let secret = env.var(var).unwrap_or_default();
        let trimmed = secret.trim();
        if trimmed.len() < MIN_TENANT_KEY_LEN {
            return Err(ConfigError::Secret(format!(
                "tenant {}: webhook secret variable {var} is not set or shorter than {MIN_TENANT_KEY_LEN} characters",
                t.name.get_ref()
            )));
        }
        out.insert(t.name.get_ref().clone(), SecretString::from(trimmed.to_string()));
    }
    Ok(out)
}

/// Org keys: `Ok(None)` when none of them is in the environment (the caller
/// may then use the simulator); an error when only some are.
pub fn org_keys(cfg: &Config, env: &dyn Env) -> Result<Option<Vec<SecretString>>, ConfigError> {
    let keys: Vec<Option<String>> =
        cfg.orgs.iter().map(|o| env.var(&o.api_key_env).filter(|k| !k.trim().is_empty())).collect();
    if keys.iter().all(Option::is_none) {
        return Ok(None);
    }
    let mut out = Vec::new();
    for (org, key) in cfg.orgs.iter().zip(keys) {
        match key {
            Some(k) => out.push(SecretString::from(k.trim().to_string())),
            None => {
                return Err(ConfigError::Secret(format!(
                    "org {}: environment variable {} is not set (other orgs' keys are)",
                    org.name.get_ref(),
                    org.api_key_env
                )));
            }
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files the CDK app renders as `RATEPOOL_CONFIG_TOML` (its jest
    /// test keeps them equal to what it renders): a setting this binary
    /// does not know, or a value it refuses, fails here instead of in a
    /// deployed task.
    #[test]
    fn the_cdk_apps_rendered_configs_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cdk/test/fixtures/config");
        for (file, calls) in [("calls.toml", true), ("jobs-only.toml", false)] {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            let cfg = Config::parse(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(cfg.orgs.iter().filter(|o| !o.fallback).count(), 3, "{file}");
            assert!(cfg.orgs.iter().all(|o| o.timeout_secs.get() == 120), "{file}");
            assert_eq!(cfg.aws.jobs_table, "Ratepool-JobsTable-1", "{file}");
            // The bucket's lifecycle rule is computed from this retention.
            assert_eq!(cfg.aws.retention_days.get(), 30, "{file}");
            assert_eq!(cfg.aws.outputs_bucket.as_deref(), Some("ratepool-outputsbucket-6"), "{file}");
            assert_eq!(cfg.workers.shutdown_grace_secs, 70, "{file}");
            if calls {
                assert_eq!(*cfg.calls.max_wait_secs.get_ref(), 60, "{file}");
            }
        }
    }

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8080"
[storage]
backend = "sqlite"
path = "ratepool.db"
[workers]
concurrency = 64
[[orgs]]
name = "org-a"
base_url = "https://api.openai.com/v1"
api_key_env = "ORG_A_KEY"
[orgs.models."gpt-4o-mini"]
rpm = 10000
tpm = 10000000
[[tenants]]
name = "screenplays"
api_key_env = "SCREENPLAYS_API_KEY"
"#;

    #[test]
    fn the_documented_example_parses_with_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.workers.concurrency.get(), 64);
        assert_eq!(c.workers.step_parallelism.get(), 4);
        assert_eq!(c.orgs[0].chars_per_token, 4.0);
        assert!(c.orgs[0].header_sync);
        assert_eq!((c.orgs[0].burst_secs, c.orgs[0].window), (60, WindowModel::Continuous));
        assert_eq!(c.models().len(), 1);
    }

    #[test]
    fn the_window_settings_parse_and_bad_ones_name_the_org() {
        let azure = GOOD
            .replace("api_key_env = \"ORG_A_KEY\"", "api_key_env = \"ORG_A_KEY\"\nburst_secs = 10\nwindow = \"fixed\"");
        let c = Config::parse(&azure).unwrap();
        assert_eq!((c.orgs[0].burst_secs, c.orgs[0].window), (10, WindowModel::Fixed));
        let e =
            Config::parse(&GOOD.replace("api_key_env = \"ORG_A_KEY\"", "api_key_env = \"ORG_A_KEY\"\nburst_secs = 0"))
                .unwrap_err();
        assert!(e.contains("org-a") && e.contains("burst_secs"), "{e}");
        let e = Config::parse(
            &GOOD.replace("api_key_env = \"ORG_A_KEY\"", "api_key_env = \"ORG_A_KEY\"\nwindow = \"sliding\""),
        )
        .unwrap_err();
        assert!(e.contains("window") || e.contains("sliding"), "{e}");
    }

    #[test]
    fn errors_name_the_line_and_reason() {
        let cases = [
            (GOOD.replace("rpm = 10000", "rpm = 0"), "line 14"),
            (GOOD.replace("concurrency = 64", "concurrency = \"many\""), "line 8"),
            (GOOD.replace("name = \"org-a\"", "name = \"org a\""), "line 10"),
            (GOOD.replace("[workers]", "[workers]\ncolour = 1"), "unknown field"),
            (
                format!(
                    "{GOOD}\n[[orgs]]\nname = \"org-a\"\napi_key_env = \"B\"\n[orgs.models.\"m\"]\nrpm = 1\ntpm = 1\n"
                ),
                "line 21: duplicate org name",
            ),
            (GOOD.replace("ORG_A_KEY", "sk-live-abc def"), "not an environment variable name"),
            (GOOD.replace("backend = \"sqlite\"", "backend = \"mysql\""), "line 5"),
        ];
        for (text, want) in cases {
            let err = Config::parse(&text).unwrap_err();
            assert!(err.contains(want), "expected {want:?} in {err:?}");
        }
    }

    const QUOTA: &str = "[tenants.quota]\ntokens_per_day = 2000000\ncalls_per_minute = 600\njobs_in_flight = 20\n";

    #[test]
    fn the_default_deadline_is_a_day_zero_is_none_and_more_than_a_week_is_refused() {
        assert_eq!(Config::parse(GOOD).unwrap().workers.default_deadline_secs, 86_400);
        let with = |v: &str| {
            Config::parse(&GOOD.replace("concurrency = 64", &format!("concurrency = 64\ndefault_deadline_secs = {v}")))
        };
        assert_eq!(with("0").unwrap().workers.default_deadline_secs, 0);
        let err = with("604801").unwrap_err();
        assert!(err.contains("default_deadline_secs must be at most 604800"), "{err}");
    }

    #[test]
    fn a_tenant_quota_parses_and_its_absence_is_unlimited() {
        let c = Config::parse(&format!("{GOOD}{QUOTA}")).unwrap();
        let q = c.tenants[0].quota;
        assert_eq!(q.tokens_per_day.map(NonZeroU64::get), Some(2_000_000));
        assert_eq!(q.calls_per_minute.map(NonZeroU64::get), Some(600));
        assert_eq!(q.jobs_in_flight.map(NonZeroU64::get), Some(20));
        // Every limit is optional.
        let c = Config::parse(&format!("{GOOD}[tenants.quota]\njobs_in_flight = 2\n")).unwrap();
        assert_eq!(
            c.tenants[0].quota,
            TenantQuotaConfig { jobs_in_flight: NonZeroU64::new(2), ..TenantQuotaConfig::default() }
        );
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.tenants[0].quota, TenantQuotaConfig::default(), "no section: unlimited");
    }

    #[test]
    fn bad_tenant_quotas_name_the_line_and_reason() {
        // The quota section starts on line 19 of GOOD + QUOTA.
        let with = |from: &str, to: &str| format!("{GOOD}{}", QUOTA.replace(from, to));
        let cases = [
            (with("jobs_in_flight = 20", "jobs_in_flight = 0"), "line 22"),
            (with("jobs_in_flight = 20", "jobs_in_flight = 0"), "nonzero"),
            (with("calls_per_minute = 600", "calls_per_minute = -5"), "line 21"),
            (with("tokens_per_day = 2000000", "tokens_per_day = 0"), "line 20"),
            (with("tokens_per_day = 2000000", "tokens_per_day = \"lots\""), "line 20"),
            (with("jobs_in_flight = 20", "jobs_in_flight = 1.5"), "line 22"),
            (with("jobs_in_flight", "jobs_in_fligth"), "unknown field `jobs_in_fligth`"),
            (with("calls_per_minute", "requests_per_minute"), "line 21"),
        ];
        for (text, want) in cases {
            let err = Config::parse(&text).unwrap_err();
            assert!(err.contains(want), "expected {want:?} in {err:?}");
        }
    }

    #[test]
    fn the_calls_section_has_defaults_and_its_mistakes_name_the_line() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!((*c.calls.max_wait_secs.get_ref(), *c.calls.max_wait_cap_secs.get_ref()), (60, 300));
        assert_eq!(*c.calls.max_body_bytes.get_ref(), 8 << 20);
        assert_eq!(c.calls.default_max_tokens.get(), 4096);
        assert_eq!(*c.calls.idempotency_ttl_secs.get_ref(), 86_400);
        let set = "[calls]\nmax_wait_secs = 5\nmax_wait_cap_secs = 30\nmax_body_bytes = 65536\n\
                   default_max_tokens = 256\nidempotency_ttl_secs = 3600\n";
        let c = Config::parse(&format!("{GOOD}{set}")).unwrap();
        assert_eq!((*c.calls.max_wait_secs.get_ref(), *c.calls.max_wait_cap_secs.get_ref()), (5, 30));
        assert_eq!((*c.calls.max_body_bytes.get_ref(), c.calls.default_max_tokens.get()), (65_536, 256));
        // [calls] starts on line 19 of GOOD + the section.
        let with = |from: &str, to: &str| format!("{GOOD}{}", set.replace(from, to));
        let cases = [
            (with("max_wait_secs = 5", "max_wait_secs = 31"), "line 20: [calls] max_wait_secs (31) must not exceed"),
            (format!("{GOOD}[calls]\nmax_wait_cap_secs = 30\n"), "line 20: [calls] max_wait_secs (60)"),
            (with("max_wait_cap_secs = 30", "max_wait_cap_secs = 0"), "line 21"),
            (with("max_body_bytes = 65536", "max_body_bytes = 10"), "line 22: [calls] max_body_bytes"),
            (with("default_max_tokens = 256", "default_max_tokens = 0"), "line 23"),
            (with("idempotency_ttl_secs = 3600", "idempotency_ttl_secs = 0"), "line 24"),
            (with("max_wait_secs = 5", "max_wait_secs = -1"), "line 20"),
            (with("max_wait_secs", "max_wiat_secs"), "unknown field `max_wiat_secs`"),
        ];
        for (text, want) in cases {
            let err = Config::parse(&text).unwrap_err();
            assert!(err.contains(want), "expected {want:?} in {err:?}");
        }
    }

    #[test]
    fn tenant_keys_refuse_empty_placeholder_and_short_keys() {
        let c = Config::parse(GOOD).unwrap();
        let env = |v: &str| BTreeMap::from([("SCREENPLAYS_API_KEY".to_string(), v.to_string())]);
        assert!(tenant_keys(&c, &BTreeMap::new()).is_err());
        assert!(tenant_keys(&c, &env("   ")).is_err());
        assert!(tenant_keys(&c, &env("changeme")).is_err());
        assert!(tenant_keys(&c, &env("short")).is_err());
        let keys = tenant_keys(&c, &env("0123456789abcdef0123")).unwrap();
        assert_eq!(keys[0].key.expose_secret(), "0123456789abcdef0123");
        // The key never shows in Debug output.
        assert!(!format!("{keys:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn org_keys_all_or_none() {
        let mut c = Config::parse(GOOD).unwrap();
        assert!(org_keys(&c, &BTreeMap::new()).unwrap().is_none());
        let env = BTreeMap::from([("ORG_A_KEY".to_string(), "sk-1".to_string())]);
        assert_eq!(org_keys(&c, &env).unwrap().unwrap().len(), 1);
        let mut second = c.orgs[0].clone();
        second.api_key_env = "ORG_B_KEY".into();
        c.orgs.push(second);
        assert!(org_keys(&c, &env).is_err());
    }
}
