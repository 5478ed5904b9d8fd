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
    /// A Secrets Manager secret holding the tenants' API keys: a JSON
    /// object of `api_key_env` names to keys. Read by the API (the Lambda,
    /// its authorizer, and workers serving the calls door), again at most
    /// every [`TENANT_KEYS_MAX_AGE`](crate::api::TENANT_KEYS_MAX_AGE), so a
    /// rotated or revoked key takes effect without a restart. Consulted
    /// before the process environment.
    #[serde(default)]
    pub tenant_keys_secret_arn: Option<String>,
    /// A Secrets Manager secret holding what only workers read: the orgs'
    /// provider keys and the tenants' webhook signing secrets (a JSON object
    /// of `api_key_env` / `webhook_secret_env` names to values). Read once
    /// at start and consulted before the process environment.
    #[serde(default)]
    pub worker_keys_secret_arn: Option<String>,
    /// Days a finished job's items are kept (DynamoDB TTL).
    #[serde(default = "default_retention_days")]
    pub retention_days: NonZeroU64,
    /// An S3 bucket for step answers too large for a DynamoDB item (over
    /// `jobs::MAX_PAYLOAD_BYTES`); the checkpoint keeps a pointer. Without
    /// one, such a step fails its job. Its objects should expire like the
    /// step items do (a lifecycle rule; the CDK app sets one).
    #[serde(default)]
    pub outputs_bucket: Option<String>,
}

impl AwsConfig {
    /// What serde cannot check: a bucket name S3 would take.
    pub fn validate(&self) -> Result<(), String> {
        match &self.outputs_bucket {
            Some(b) if !valid_bucket_name(b) => Err(format!(
                "[aws] outputs_bucket {b:?} is not an S3 bucket name: 3 to 63 lowercase letters, digits, \
                 '-' and '.', starting and ending with a letter or digit"
            )),
            _ => Ok(()),
        }
    }
}

/// S3's rules for a general purpose bucket's name, less the reserved
/// prefixes and suffixes, which S3 names in its own refusal.
fn valid_bucket_name(name: &str) -> bool {
    let b = name.as_bytes();
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (3..=63).contains(&b.len())
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
        && b.iter().all(|c| edge(c) || *c == b'-' || *c == b'.')
        && !name.contains("..")
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
            tenant_keys_secret_arn: None,
            worker_keys_secret_arn: None,
            retention_days: default_retention_days(),
            outputs_bucket: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_bucket_names_follow_s3s_rules() {
        let with = |b: &str| AwsConfig { outputs_bucket: Some(b.into()), ..AwsConfig::default() }.validate();
        for good in ["ratepool-outputs", "abc", "my.bucket-2", &"a".repeat(63)] {
            assert_eq!(with(good), Ok(()), "{good}");
        }
        for bad in ["ab", "Ratepool", "-lead", "trail-", "a..b", "under_score", &"a".repeat(64), ""] {
            let err = with(bad).expect_err(bad);
            assert!(err.contains("outputs_bucket"), "{err}");
        }
        assert_eq!(AwsConfig::default().validate(), Ok(()), "no bucket is valid");
    }
}
