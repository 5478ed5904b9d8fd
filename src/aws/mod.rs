//! The production backend: SQS queues, DynamoDB tables, CloudWatch metrics,
//! Secrets Manager for keys. Implements the same storage traits as
//! `crate::local` and passes the same conformance suite (against the moto
//! emulator in tests).

pub mod cache;
mod config;
pub mod jobs;
pub mod ledger;
pub mod metrics;
pub mod queue;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};

use crate::domain::{Clock, Env};
use crate::storage::{Backend, StorageError, StorageResult};
pub use config::AwsConfig;

/// SDK clients, built once at start and shared.
#[derive(Clone, Debug)]
pub struct AwsClients {
    pub sqs: aws_sdk_sqs::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub cloudwatch: aws_sdk_cloudwatch::Client,
    pub secrets: aws_sdk_secretsmanager::Client,
}

impl AwsClients {
    /// From the usual SDK sources, overridden by `[aws] region` and
    /// `endpoint_url` when set.
    pub async fn load(cfg: &AwsConfig) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(r) = &cfg.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some(e) = &cfg.endpoint_url {
            loader = loader.endpoint_url(e.clone());
        }
        let sdk = loader.load().await;
        Self {
            sqs: aws_sdk_sqs::Client::new(&sdk),
            dynamodb: aws_sdk_dynamodb::Client::new(&sdk),
            cloudwatch: aws_sdk_cloudwatch::Client::new(&sdk),
            secrets: aws_sdk_secretsmanager::Client::new(&sdk),
        }
    }
}

/// Maps any SDK error to a retryable backend error, keeping the service's
/// code and message (never request contents).
pub(crate) fn sdk_err<E: std::error::Error + Send + Sync + 'static>(what: &str, e: E) -> StorageError {
    let mut msg = format!("{what}: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    StorageError::Backend(msg)
}

/// Opens the AWS backend: resolves queue URLs and checks the tables exist.
pub async fn connect(
    clients: &AwsClients,
    cfg: &AwsConfig,
    visibility_timeout: Duration,
    interactive_weight: std::num::NonZeroU64,
    clock: Arc<dyn Clock>,
) -> StorageResult<Backend> {
    let queue =
        Arc::new(queue::SqsQueue::connect(clients.sqs.clone(), cfg, visibility_timeout, interactive_weight).await?);
    let jobs = Arc::new(jobs::DynamoJobs::connect(clients.dynamodb.clone(), cfg, clock.clone()).await?);
    let ledger = Arc::new(ledger::DynamoLedger::connect(clients.dynamodb.clone(), cfg, clock).await?);
    let cache = Arc::new(cache::DynamoCache::new(clients.dynamodb.clone(), &cfg.jobs_table));
    Ok(Backend { queue, jobs: jobs.clone(), ledger, usage: jobs, cache })
}

/// Creates the tables and queues that do not exist yet (`ratepool aws
/// init`: for the emulator and dev accounts; production gets them from the
/// CDK app). Returns what it created.
pub async fn init(clients: &AwsClients, cfg: &AwsConfig, visibility_timeout: Duration) -> StorageResult<Vec<String>> {
    let mut created = jobs::ensure_tables(&clients.dynamodb, cfg).await?;
    created.extend(queue::ensure_queues(&clients.sqs, cfg, visibility_timeout).await?);
    Ok(created)
}

/// Environment variables from a Secrets Manager secret (a JSON object of
/// name → value), consulted before the process environment.
pub struct SecretEnv {
    values: BTreeMap<String, String>,
}

impl SecretEnv {
    pub async fn load(clients: &AwsClients, secret_arn: &str) -> StorageResult<Self> {
        let out = clients
            .secrets
            .get_secret_value()
            .secret_id(secret_arn)
            .send()
            .await
            .map_err(|e| sdk_err("reading the keys secret", e))?;
        let text = out.secret_string().unwrap_or_default();
        let values: BTreeMap<String, String> = serde_json::from_str(text).map_err(|e| {
            // serde's message names the position, never the content.
            StorageError::Backend(format!("the keys secret is not a JSON object of strings: {e}"))
        })?;
        Ok(Self { values })
    }
}

impl Env for SecretEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.values.get(name).cloned().or_else(|| std::env::var(name).ok())
    }
}
