//! The production backend: SQS queues, DynamoDB tables, CloudWatch metrics,
//! Secrets Manager for keys. Implements the same storage traits as
//! `crate::local` and passes the same conformance suite (against the moto
//! emulator in tests).

pub mod cache;
pub mod calls;
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

/// How long AWS requests may take. Without bounds a request to a hung
/// endpoint never returns: a step waits forever on a ledger write while
/// the heartbeat, which still works, keeps its lease alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    /// One HTTP attempt. DynamoDB and SQS answer in milliseconds; this is
    /// for the attempt that hangs, so the SDK's own retry gets its turn.
    pub attempt: Duration,
    /// An operation, its retries included.
    pub operation: Duration,
}

impl Default for Timeouts {
    /// Generous next to DynamoDB's and SQS's milliseconds (a loaded emulator
    /// answers in seconds), yet an operation, its retries included, ends
    /// within the default 30 s lease, which the heartbeat renews every 10 s.
    fn default() -> Self {
        Self { connect: Duration::from_secs(5), attempt: Duration::from_secs(10), operation: Duration::from_secs(25) }
    }
}

impl Timeouts {
    fn config(&self) -> aws_config::timeout::TimeoutConfig {
        aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(self.connect)
            .operation_attempt_timeout(self.attempt)
            .operation_timeout(self.operation)
            .build()
    }

    /// A long poll holds its attempt open for `wait` by design.
    pub(crate) fn for_long_poll(&self, wait: Duration) -> aws_config::timeout::TimeoutConfig {
        Timeouts { attempt: self.attempt + wait, operation: self.operation + 2 * wait, ..*self }.config()
    }
}

/// SDK clients, built once at start and shared.
#[derive(Clone, Debug)]
pub struct AwsClients {
    pub sqs: aws_sdk_sqs::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub secrets: aws_sdk_secretsmanager::Client,
    /// Path-style addressing when an endpoint is set: the emulator (and
    /// most S3 look-alikes) serve buckets under one host.
    pub s3: aws_sdk_s3::Client,
    pub timeouts: Timeouts,
}

impl AwsClients {
    /// From the usual SDK sources, overridden by `[aws] region` and
    /// `endpoint_url` when set, with the default [`Timeouts`].
    pub async fn load(cfg: &AwsConfig) -> Self {
        Self::from_sdk(&loader(cfg).load().await, Timeouts::default())
    }

    /// Clients of `sdk` whose requests are bounded by `timeouts`.
    pub fn from_sdk(sdk: &aws_config::SdkConfig, timeouts: Timeouts) -> Self {
        let sdk = sdk.to_builder().timeout_config(timeouts.config()).build();
        Self {
            sqs: aws_sdk_sqs::Client::new(&sdk),
            dynamodb: aws_sdk_dynamodb::Client::new(&sdk),
            secrets: aws_sdk_secretsmanager::Client::new(&sdk),
            s3: aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(&sdk).force_path_style(sdk.endpoint_url().is_some()).build(),
            ),
            timeouts,
        }
    }
}

/// The SDK's usual sources (environment, profile, instance role),
/// overridden by `[aws] region` and `endpoint_url` when set.
pub fn loader(cfg: &AwsConfig) -> aws_config::ConfigLoader {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(r) = &cfg.region {
        loader = loader.region(Region::new(r.clone()));
    }
    if let Some(e) = &cfg.endpoint_url {
        loader = loader.endpoint_url(e.clone());
    }
    loader
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

/// [`sdk_err`], with DynamoDB's throttling kept apart as
/// [`StorageError::Throttled`] (the SDK's own retries of it are spent by
/// the time it gets here; the caller backs off longer).
pub(crate) fn dynamo_err<E>(what: &str, e: E) -> StorageError
where
    E: std::error::Error + aws_sdk_dynamodb::error::ProvideErrorMetadata + Send + Sync + 'static,
{
    match e.code() {
        Some(code @ ("ProvisionedThroughputExceededException" | "ThrottlingException" | "RequestLimitExceeded")) => {
            StorageError::Throttled(format!("{what}: {code}"))
        }
        _ => sdk_err(what, e),
    }
}

/// Opens the AWS backend: resolves queue URLs and checks the tables exist.
pub async fn connect(
    clients: &AwsClients,
    cfg: &AwsConfig,
    visibility_timeout: Duration,
    interactive_weight: std::num::NonZeroU64,
    clock: Arc<dyn Clock>,
) -> StorageResult<Backend> {
    let queue = Arc::new(
        queue::SqsQueue::connect(clients.sqs.clone(), cfg, visibility_timeout, interactive_weight, clients.timeouts)
            .await?,
    );
    let jobs =
        Arc::new(jobs::DynamoJobs::connect(clients.dynamodb.clone(), clients.s3.clone(), cfg, clock.clone()).await?);
    let ledger = Arc::new(ledger::DynamoLedger::connect(clients.dynamodb.clone(), cfg, clock).await?);
    let cache = Arc::new(cache::DynamoCache::new(clients.dynamodb.clone(), &cfg.jobs_table));
    let calls = Arc::new(calls::DynamoCalls::new(clients.dynamodb.clone(), &cfg.jobs_table));
    Ok(Backend { queue, jobs: jobs.clone(), ledger, usage: jobs, cache, calls })
}

/// Creates the tables, queues and outputs bucket that do not exist yet
/// (`ratepool aws init`: for the emulator and dev accounts; production gets
/// them from the CDK app). Returns what it created.
pub async fn init(clients: &AwsClients, cfg: &AwsConfig, visibility_timeout: Duration) -> StorageResult<Vec<String>> {
    let mut created = jobs::ensure_tables(&clients.dynamodb, cfg).await?;
    created.extend(queue::ensure_queues(&clients.sqs, cfg, visibility_timeout).await?);
    if let Some(bucket) = &cfg.outputs_bucket
        && jobs::ensure_bucket(&clients.s3, bucket).await?
    {
        created.push(bucket.clone());
    }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::domain::SystemClock;

    /// Accepts connections and reads requests, never answering: a hung
    /// endpoint. Returns its address and how many connections it took.
    async fn hung_endpoint() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        (format!("http://{addr}"), accepted)
    }

    #[tokio::test]
    async fn requests_to_a_hung_endpoint_end_at_the_operation_timeout() {
        let (endpoint, accepted) = hung_endpoint().await;
        let cfg = AwsConfig { region: Some("us-east-1".into()), endpoint_url: Some(endpoint), ..AwsConfig::default() };
        let creds = aws_sdk_dynamodb::config::Credentials::new("test", "test", None, None, "test");
        let sdk = loader(&cfg).credentials_provider(creds).load().await;
        let timeouts = Timeouts {
            connect: Duration::from_secs(1),
            attempt: Duration::from_millis(200),
            operation: Duration::from_secs(1),
        };
        let clients = AwsClients::from_sdk(&sdk, timeouts);
        let started = Instant::now();
        let weight = std::num::NonZeroU64::MIN;
        let opened = connect(&clients, &cfg, Duration::from_secs(30), weight, Arc::new(SystemClock));
        let r = tokio::time::timeout(Duration::from_secs(10), opened).await.expect("bounded by the SDK, not the test");
        assert!(matches!(r, Err(StorageError::Backend(_))), "{:?}", r.err());
        assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
        assert!(accepted.load(Ordering::SeqCst) >= 1, "the requests reached the hung endpoint");
    }

    #[test]
    fn a_long_poll_gets_its_wait_on_top_of_the_attempt_timeout() {
        let t = Timeouts::default();
        let poll = t.for_long_poll(Duration::from_secs(20));
        assert_eq!(poll.operation_attempt_timeout(), Some(t.attempt + Duration::from_secs(20)));
        assert!(poll.operation_timeout() >= Some(t.attempt + Duration::from_secs(20)));
        assert!(t.operation < Duration::from_secs(30), "within the default 30 s lease");
    }
}
