//! Where the AWS backend's resources are: `[aws]` in the config file.

use std::num::NonZeroU64;

use serde::Deserialize;

/// Where the AWS backend's resources are. Every name has a default so a dev
/// account or the emulator needs only `region` (and `endpoint_url`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Region; else the SDK's usual sources (`AWS_REGION`, profile).
    #[serde(default)]
    pub region: Option<String>,
    /// An emulator or VPC endpoint; else `AWS_ENDPOINT_URL` or AWS itself.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Jobs, step checkpoints and per-tenant usage (PK/SK).
    #[serde(default = "default_jobs_table")]
    pub jobs_table: String,
    /// The quota ledger: one item per (org, model).
    #[serde(default = "default_ledger_table")]
    pub ledger_table: String,
    #[serde(default = "default_interactive_queue")]
    pub interactive_queue: String,
    #[serde(default = "default_batch_queue")]
    pub batch_queue: String,
    #[serde(default = "default_dead_letter_queue")]
    pub dead_letter_queue: String,
    /// CloudWatch namespace for metrics.
    #[serde(default = "default_namespace")]
    pub metrics_namespace: String,
    /// A Secrets Manager secret holding a JSON object of environment
    /// variable names to values (the org and tenant keys); read once at
    /// start and consulted before the process environment.
    #[serde(default)]
    pub secret_arn: Option<String>,
    /// Days a finished job's items are kept (DynamoDB TTL).
    #[serde(default = "default_retention_days")]
    pub retention_days: NonZeroU64,
}

impl Default for AwsConfig {
    fn default() -> Self {
        Self {
            region: None,
            endpoint_url: None,
            jobs_table: default_jobs_table(),
            ledger_table: default_ledger_table(),
            interactive_queue: default_interactive_queue(),
            batch_queue: default_batch_queue(),
            dead_letter_queue: default_dead_letter_queue(),
            metrics_namespace: default_namespace(),
            secret_arn: None,
            retention_days: default_retention_days(),
        }
    }
}

fn default_jobs_table() -> String {
    "ratepool-jobs".into()
}
fn default_ledger_table() -> String {
    "ratepool-ledger".into()
}
fn default_interactive_queue() -> String {
    "ratepool-interactive".into()
}
fn default_batch_queue() -> String {
    "ratepool-batch".into()
}
fn default_dead_letter_queue() -> String {
    "ratepool-dlq".into()
}
fn default_namespace() -> String {
    "Ratepool".into()
}
fn default_retention_days() -> NonZeroU64 {
    NonZeroU64::new(30).unwrap_or(NonZeroU64::MIN)
}
