//! The job queue on SQS: two standard queues (interactive, batch) and a
//! dead-letter queue, behind the same [`JobQueue`] trait as the SQLite table.
//!
//! A receipt is `"<lane>|<SQS receipt handle>"` (`i` or `b`), because
//! extend, delete and dead-letter must name the queue the message came
//! from. SQS itself cannot tell a stale receipt from a current one (it
//! accepts a delete with an old handle and "might not" delete), so this
//! queue remembers until when each receipt it handed out keeps its message
//! hidden, and refuses a receipt whose visibility may have lapsed with
//! `StaleReceipt`: only then could another worker hold it.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName};

use super::AwsConfig;
use super::sdk_err;
use crate::domain::{JobId, Priority};
use crate::storage::{DeadLetter, Delivery, JobQueue, QueueMessage, QueueStats, StorageError, StorageResult};

/// SQS returns at most 10 messages per receive.
const MAX_BATCH: usize = 10;
/// SQS's longest long poll.
const MAX_WAIT_SECS: u64 = 20;
/// SQS's longest visibility timeout (12 h).
const MAX_VISIBILITY_SECS: u64 = 43_200;
/// SQS's longest per-message delay (15 minutes).
const MAX_DELAY_SECS: u64 = 900;
/// Receives after which SQS itself moves a message to the DLQ. Only a
/// backstop: the engine dead-letters a poison job itself (`dead_letter`)
/// after counting its runs that ended without progress, which tells a job
/// that crashes its workers from one that was merely handed back on every
/// deploy; a low count here would bury the latter.
const REDRIVE_MAX_RECEIVES: u32 = 50;
/// How long `ratepool dlq` hides the dead letters it is not acting on while
/// it looks through the queue.
const DLQ_HOLD_SECS: i32 = 60;
/// Dead letters wait for a human; keep them as long as SQS allows (14 days).
const DLQ_RETENTION_SECS: u64 = 14 * 24 * 3600;
/// How much earlier than its computed end a receipt is treated as lapsed:
/// covers the request's trip to SQS and the response's trip back from a
/// long poll, so a receipt we accept is still current when SQS acts on it.
const RECEIPT_MARGIN: Duration = Duration::from_millis(500);

/// The two work queues; the dead-letter queue is never received from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Interactive,
    Batch,
}

impl Lane {
    fn of(p: Priority) -> Self {
        match p {
            Priority::Interactive => Self::Interactive,
            Priority::Batch => Self::Batch,
        }
    }
    fn tag(self) -> &'static str {
        match self {
            Self::Interactive => "i",
            Self::Batch => "b",
        }
    }
    fn from_tag(tag: &str) -> Option<Self> {
        match tag {
            "i" => Some(Self::Interactive),
            "b" => Some(Self::Batch),
            _ => None,
        }
    }
}

/// Whole seconds for SQS, rounded up so a message is hidden at least as
/// long as asked.
fn ceil_secs(d: Duration, max: u64) -> i32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    // Bounded by `max`, which SQS limits fit in an i32.
    i32::try_from(secs.min(max)).unwrap_or(i32::MAX)
}

fn secs(s: i32) -> Duration {
    Duration::from_secs(s.unsigned_abs().into())
}

/// The wait for SQS's `WaitTimeSeconds`: below a second, a short poll, so a
/// caller asking for a short wait gets an answer at once; else whole
/// seconds rounded down (never longer than asked), at most 20.
fn wait_secs(wait: Duration) -> i32 {
    let secs = wait.as_secs().min(MAX_WAIT_SECS);
    i32::try_from(secs).unwrap_or(0)
}

/// Whether an SQS error says the receipt handle no longer names an
/// in-flight message. Real SQS answers a lapsed one with
/// `MessageNotInflight` or an `InvalidParameterValue` about `ReceiptHandle`.
fn is_stale_receipt_error<E: ProvideErrorMetadata>(e: &E) -> bool {
    match e.code() {
        Some(code) if code.ends_with("ReceiptHandleIsInvalid") || code.ends_with("MessageNotInflight") => true,
        Some("InvalidParameterValue") => e.message().is_some_and(|m| m.contains("ReceiptHandle")),
        _ => false,
    }
}

pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
    interactive_url: String,
    batch_url: String,
    dlq_url: String,
    /// Sent with every receive rather than read from the queue, so the
    /// receipt bookkeeping below knows it whatever the queue was created with.
    visibility_secs: i32,
    /// Every `batch_turn`-th receive looks at the batch queue first, so a
    /// steady interactive load cannot starve batch jobs.
    batch_turn: u64,
    receives: AtomicU64,
    /// Receipt → the instant (by this process's clock) before which SQS
    /// surely still hides its message for us. An entry is dropped once it
    /// passes, so the map holds about the messages in flight here.
    held: Mutex<HashMap<String, Instant>>,
    /// The client's bounds; a long poll's attempt is allowed its wait on top.
    timeouts: super::Timeouts,
}

impl SqsQueue {
    /// Resolves the three queues by name; fails naming a missing one.
    pub async fn connect(
        client: aws_sdk_sqs::Client,
        cfg: &AwsConfig,
        visibility_timeout: Duration,
        interactive_weight: NonZeroU64,
        timeouts: super::Timeouts,
    ) -> StorageResult<SqsQueue> {
        let (interactive_url, batch_url, dlq_url) = tokio::try_join!(
            existing_url(&client, &cfg.interactive_queue),
            existing_url(&client, &cfg.batch_queue),
            existing_url(&client, &cfg.dead_letter_queue),
        )?;
        Ok(SqsQueue {
            client,
            interactive_url,
            batch_url,
            dlq_url,
            // SQS takes whole seconds; 0 would make every message visible at once.
            visibility_secs: ceil_secs(visibility_timeout, MAX_VISIBILITY_SECS).max(1),
            batch_turn: interactive_weight.get().saturating_add(1),
            receives: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
            timeouts,
        })
    }

    fn url(&self, lane: Lane) -> &str {
        match lane {
            Lane::Interactive => &self.interactive_url,
            Lane::Batch => &self.batch_url,
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // The map holds plain values; a panic elsewhere cannot leave it torn.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lane and SQS handle of a receipt this queue handed out and whose
    /// message is surely still hidden; else `StaleReceipt`.
    fn current<'r>(&self, receipt: &'r str) -> StorageResult<(Lane, &'r str)> {
        let (lane, handle) = receipt
            .split_once('|')
            .and_then(|(tag, handle)| Some((Lane::from_tag(tag)?, handle)))
            .ok_or(StorageError::StaleReceipt)?;
        let mut held = self.held();
        match held.get(receipt) {
            Some(until) if Instant::now() + RECEIPT_MARGIN < *until => Ok((lane, handle)),
            // Lapsed: another worker may have received the message since,
            // and SQS would still accept this handle.
            Some(_) => {
                held.remove(receipt);
                Err(StorageError::StaleReceipt)
            }
            // Never ours, or already deleted / handed back / lapsed.
            None => Err(StorageError::StaleReceipt),
        }
    }

    fn forget(&self, receipt: &str) {
        self.held().remove(receipt);
    }

    /// One ReceiveMessage on one lane.
    async fn poll(&self, lane: Lane, max: usize, wait_secs: i32) -> StorageResult<Vec<Delivery>> {
        let started = Instant::now();
        let out = self
            .client
            .receive_message()
            .queue_url(self.url(lane))
            .max_number_of_messages(i32::try_from(max.min(MAX_BATCH)).unwrap_or(1))
            .wait_time_seconds(wait_secs)
            .visibility_timeout(self.visibility_secs)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .customize()
            .config_override(
                aws_sdk_sqs::config::Builder::default().timeout_config(self.timeouts.for_long_poll(secs(wait_secs))),
            )
            .send()
            .await
            .map_err(|e| sdk_err("receiving from SQS", e))?;
        let returned = Instant::now();
        // SQS starts each message's visibility when it picks it: after we
        // asked, and (a long poll answering as soon as a message arrives)
        // just before the answer left.
        let hidden_from = returned.checked_sub(RECEIPT_MARGIN).map_or(started, |t| t.max(started));
        let hidden_until = hidden_from + secs(self.visibility_secs);

        let mut got = Vec::new();
        for m in out.messages() {
            let Some(handle) = m.receipt_handle() else { continue };
            let body = m.body().unwrap_or_default();
            let message = match serde_json::from_str::<QueueMessage>(body) {
                Ok(message) => message,
                Err(e) => {
                    self.quarantine(lane, handle, body, &e.to_string()).await;
                    continue;
                }
            };
            let receive_count = m
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|n| n.parse().ok())
                // Asked for, so always present on SQS; 1 is the least it can be.
                .unwrap_or(1);
            got.push(Delivery { message, receipt: format!("{}|{handle}", lane.tag()), receive_count });
        }
        if !got.is_empty() {
            let now = Instant::now();
            let mut held = self.held();
            // Pruned here, where entries are added, so the map stays about
            // the size of what is in flight even if callers never ack.
            held.retain(|_, until| *until > now);
            for d in &got {
                held.insert(d.receipt.clone(), hidden_until);
            }
        }
        Ok(got)
    }

    /// A body that is not a `QueueMessage` can never run: straight to the
    /// DLQ instead of being redelivered up to the redrive count. Best effort;
    /// if it fails the message comes back and is tried again.
    async fn quarantine(&self, lane: Lane, handle: &str, body: &str, why: &str) {
        tracing::error!(
            queue = lane.tag(),
            error = why,
            "unreadable queue message; moving it to the dead-letter queue"
        );
        let moved = async {
            self.client
                .send_message()
                .queue_url(&self.dlq_url)
                .message_body(body)
                .send()
                .await
                .map_err(|e| sdk_err("dead-lettering an unreadable message", e))?;
            self.client
                .delete_message()
                .queue_url(self.url(lane))
                .receipt_handle(handle)
                .send()
                .await
                .map_err(|e| sdk_err("deleting an unreadable message", e))?;
            Ok::<(), StorageError>(())
        };
        if let Err(e) = moved.await {
            tracing::warn!(error = %e, "could not dead-letter an unreadable queue message");
        }
    }

    /// Receives the DLQ until it brings nothing: each dead letter of `job`
    /// (every one if `None`) is sent back to its work queue if `redrive`,
    /// then deleted. The others are kept hidden meanwhile, so each receive
    /// brings new ones, and made visible again at the end.
    async fn take_dead_letters(&self, job: Option<&JobId>, redrive: bool) -> StorageResult<Vec<QueueMessage>> {
        let mut taken = Vec::new();
        let mut others = Vec::new();
        let result = async {
            loop {
                let out = self
                    .client
                    .receive_message()
                    .queue_url(&self.dlq_url)
                    .max_number_of_messages(i32::try_from(MAX_BATCH).unwrap_or(1))
                    .visibility_timeout(DLQ_HOLD_SECS)
                    .wait_time_seconds(1)
                    .customize()
                    .config_override(
                        aws_sdk_sqs::config::Builder::default().timeout_config(self.timeouts.for_long_poll(secs(1))),
                    )
                    .send()
                    .await
                    .map_err(|e| sdk_err("receiving from the SQS dead-letter queue", e))?;
                if out.messages().is_empty() {
                    return Ok::<(), StorageError>(());
                }
                for m in out.messages() {
                    let Some(handle) = m.receipt_handle() else { continue };
                    match serde_json::from_str::<QueueMessage>(m.body().unwrap_or_default()) {
                        Ok(message) if job.is_none_or(|j| *j == message.job_id) => {
                            if redrive {
                                self.send(&message).await?;
                            }
                            self.client
                                .delete_message()
                                .queue_url(&self.dlq_url)
                                .receipt_handle(handle)
                                .send()
                                .await
                                .map_err(|e| sdk_err("deleting a dead letter", e))?;
                            taken.push(message);
                        }
                        // Another job's, or a quarantined body: left as it is.
                        _ => others.push(handle.to_owned()),
                    }
                }
            }
        }
        .await;
        for handle in others {
            let shown = self
                .client
                .change_message_visibility()
                .queue_url(&self.dlq_url)
                .receipt_handle(handle)
                .visibility_timeout(0);
            if let Err(e) = shown.send().await {
                tracing::warn!(error = %sdk_err("showing a dead letter again", e), "a dead letter stays hidden for its hold");
            }
        }
        result.map(|()| taken)
    }

    /// DeleteMessage of a receipt already checked by [`Self::current`].
    async fn delete_handle(&self, receipt: &str, lane: Lane, handle: &str) -> StorageResult<()> {
        let res = self.client.delete_message().queue_url(self.url(lane)).receipt_handle(handle).send().await;
        match res {
            Ok(_) => {
                self.forget(receipt);
                Ok(())
            }
            Err(e) if e.as_service_error().is_some_and(is_stale_receipt_error) => {
                self.forget(receipt);
                Err(StorageError::StaleReceipt)
            }
            Err(e) => Err(sdk_err("deleting an SQS message", e)),
        }
    }
}

/// The queue's URL, or an error telling how to create it.
async fn existing_url(client: &aws_sdk_sqs::Client, name: &str) -> StorageResult<String> {
    queue_url(client, name).await?.ok_or_else(|| {
        StorageError::Backend(format!(
            "SQS queue `{name}` does not exist: run `ratepool aws init` (or deploy the CDK stack)"
        ))
    })
}

/// The queue's URL, `None` if there is no such queue.
async fn queue_url(client: &aws_sdk_sqs::Client, name: &str) -> StorageResult<Option<String>> {
    match client.get_queue_url().queue_name(name).send().await {
        Ok(out) => out
            .queue_url()
            .map(|u| Some(u.to_owned()))
            .ok_or_else(|| StorageError::Backend(format!("SQS returned no URL for queue `{name}`"))),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_queue_does_not_exist()) => Ok(None),
        Err(e) => Err(sdk_err(&format!("looking up SQS queue `{name}`"), e)),
    }
}

/// Creates whichever of the three queues is missing (the DLQ first: the
/// work queues' redrive policy names its ARN). Returns the names created.
/// Existing queues are left as they are.
pub async fn ensure_queues(
    client: &aws_sdk_sqs::Client,
    cfg: &AwsConfig,
    visibility_timeout: Duration,
) -> StorageResult<Vec<String>> {
    let mut created = Vec::new();
    let dlq_url = match queue_url(client, &cfg.dead_letter_queue).await? {
        Some(url) => url,
        None => {
            let out = client
                .create_queue()
                .queue_name(&cfg.dead_letter_queue)
                .attributes(QueueAttributeName::MessageRetentionPeriod, DLQ_RETENTION_SECS.to_string())
                .attributes(QueueAttributeName::SqsManagedSseEnabled, "true")
                .send()
                .await
                .map_err(|e| sdk_err(&format!("creating SQS queue `{}`", cfg.dead_letter_queue), e))?;
            created.push(cfg.dead_letter_queue.clone());
            out.queue_url()
                .map(str::to_owned)
                .ok_or_else(|| StorageError::Backend("SQS returned no URL for the new dead-letter queue".into()))?
        }
    };
    let dlq_arn = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| sdk_err("reading the dead-letter queue's ARN", e))?
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .ok_or_else(|| StorageError::Backend("SQS returned no ARN for the dead-letter queue".into()))?;
    let redrive =
        serde_json::json!({ "deadLetterTargetArn": dlq_arn, "maxReceiveCount": REDRIVE_MAX_RECEIVES }).to_string();

    for name in [&cfg.interactive_queue, &cfg.batch_queue] {
        if queue_url(client, name).await?.is_some() {
            continue;
        }
        client
            .create_queue()
            .queue_name(name)
            .attributes(
                QueueAttributeName::VisibilityTimeout,
                ceil_secs(visibility_timeout, MAX_VISIBILITY_SECS).to_string(),
            )
            .attributes(QueueAttributeName::ReceiveMessageWaitTimeSeconds, MAX_WAIT_SECS.to_string())
            .attributes(QueueAttributeName::RedrivePolicy, redrive.clone())
            .attributes(QueueAttributeName::SqsManagedSseEnabled, "true")
            .send()
            .await
            .map_err(|e| sdk_err(&format!("creating SQS queue `{name}`"), e))?;
        created.push(name.clone());
    }
    Ok(created)
}

/// `ApproximateNumberOfMessages` and `…NotVisible` of one queue.
async fn depth(client: &aws_sdk_sqs::Client, url: &str) -> StorageResult<(u64, u64)> {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
        .send()
        .await
        .map_err(|e| sdk_err("reading SQS queue depth", e))?;
    let count = |name: &QueueAttributeName| -> u64 {
        out.attributes().and_then(|a| a.get(name)).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    // Delayed messages (deferred, see `defer`) are hidden too: in flight.
    Ok((
        count(&QueueAttributeName::ApproximateNumberOfMessages),
        count(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            + count(&QueueAttributeName::ApproximateNumberOfMessagesDelayed),
    ))
}

#[async_trait]
impl JobQueue for SqsQueue {
    /// The tenant is the message group: on a standard queue that makes SQS
    /// a fair queue, so one tenant's flood does not delay the others' jobs.
    async fn send(&self, message: &QueueMessage) -> StorageResult<()> {
        let body = serde_json::to_string(message)
            .map_err(|e| StorageError::Backend(format!("encoding a queue message: {e}")))?;
        self.client
            .send_message()
            .queue_url(self.url(Lane::of(message.priority)))
            .message_body(body)
            .message_group_id(message.tenant.as_str())
            .send()
            .await
            .map_err(|e| sdk_err("sending to SQS", e))?;
        Ok(())
    }

    /// Interactive first, except every `interactive_weight + 1`-th call,
    /// which looks at batch first. Both lanes are short-polled in that order;
    /// only if both are empty does it long-poll, and then the interactive
    /// lane alone, for `wait`: one long poll (never two adding up to 2×wait),
    /// and an interactive job arriving meanwhile is taken at once. A batch
    /// job arriving meanwhile waits for that poll to end (at most `wait`,
    /// 20 s); batch is the lane that can afford it.
    ///
    /// If dropped while a poll is running, the messages it took stay hidden
    /// until their visibility ends, as with a lost SQS response.
    async fn receive(&self, max: usize, wait: Duration) -> StorageResult<Vec<Delivery>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let turn = self.receives.fetch_add(1, Ordering::Relaxed);
        let order = if turn % self.batch_turn == self.batch_turn - 1 {
            [Lane::Batch, Lane::Interactive]
        } else {
            [Lane::Interactive, Lane::Batch]
        };
        for lane in order {
            let got = self.poll(lane, max, 0).await?;
            if !got.is_empty() {
                return Ok(got);
            }
        }
        match wait_secs(wait) {
            0 => Ok(Vec::new()),
            long => self.poll(Lane::Interactive, max, long).await,
        }
    }

    async fn extend(&self, receipt: &str, timeout: Duration) -> StorageResult<()> {
        let (lane, handle) = self.current(receipt)?;
        let hide_secs = ceil_secs(timeout, MAX_VISIBILITY_SECS);
        let started = Instant::now();
        let res = self
            .client
            .change_message_visibility()
            .queue_url(self.url(lane))
            .receipt_handle(handle)
            .visibility_timeout(hide_secs)
            .send()
            .await;
        match res {
            Ok(_) if hide_secs == 0 => {
                // Handed back: another worker may take it from now on.
                self.forget(receipt);
                Ok(())
            }
            Ok(_) => {
                // SQS counts from when it got the request, after `started`.
                self.held().insert(receipt.to_owned(), started + secs(hide_secs));
                Ok(())
            }
            Err(e) if e.as_service_error().is_some_and(is_stale_receipt_error) => {
                self.forget(receipt);
                Err(StorageError::StaleReceipt)
            }
            Err(e) => Err(sdk_err("extending an SQS message's visibility", e)),
        }
    }

    async fn delete(&self, receipt: &str) -> StorageResult<()> {
        let (lane, handle) = self.current(receipt)?;
        self.delete_handle(receipt, lane, handle).await
    }

    /// Sends a delayed copy, then deletes the received one: a failure in
    /// between leaves two copies (the second finds the job leased or
    /// finished), never none. SQS delays at most 15 minutes.
    async fn defer(&self, delivery: &Delivery, delay: Duration) -> StorageResult<()> {
        let (lane, handle) = self.current(&delivery.receipt)?;
        let body = serde_json::to_string(&delivery.message)
            .map_err(|e| StorageError::Backend(format!("encoding a queue message: {e}")))?;
        self.client
            .send_message()
            .queue_url(self.url(lane))
            .message_body(body)
            .message_group_id(delivery.message.tenant.as_str())
            .delay_seconds(ceil_secs(delay, MAX_DELAY_SECS))
            .send()
            .await
            .map_err(|e| sdk_err("sending a deferred copy to SQS", e))?;
        self.delete_handle(&delivery.receipt, lane, handle).await
    }

    /// Sends the message to the DLQ, then deletes it from its queue: a
    /// failure in between leaves it in both (seen twice), never in neither.
    async fn dead_letter(&self, delivery: &Delivery) -> StorageResult<()> {
        let (lane, handle) = self.current(&delivery.receipt)?;
        let body = serde_json::to_string(&delivery.message)
            .map_err(|e| StorageError::Backend(format!("encoding a queue message: {e}")))?;
        let attr = |kind: &str, value: String| {
            MessageAttributeValue::builder()
                .data_type(kind)
                .string_value(value)
                .build()
                .map_err(|e| StorageError::Backend(format!("building a message attribute: {e}")))
        };
        self.client
            .send_message()
            .queue_url(&self.dlq_url)
            .message_body(body)
            .message_attributes("receive_count", attr("Number", delivery.receive_count.to_string())?)
            .message_attributes("source_queue", attr("String", self.url(lane).to_owned())?)
            .send()
            .await
            .map_err(|e| sdk_err("sending to the SQS dead-letter queue", e))?;
        self.delete_handle(&delivery.receipt, lane, handle).await
    }

    /// Peeks: receives with a visibility timeout of 0, so every message
    /// stays where it is (only its DLQ receive count, which nothing reads,
    /// goes up). SQS cannot page through a queue: one receive returns up to
    /// 10 of the messages, some of them perhaps again, so this receives
    /// until it has `max` distinct ones or a receive brings nothing new.
    /// Beyond 10 dead letters the listing is best effort.
    async fn dead_letters(&self, max: usize) -> StorageResult<Vec<DeadLetter>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let (available, _) = depth(&self.client, &self.dlq_url).await?;
        let want = usize::try_from(available).unwrap_or(usize::MAX).min(max);
        let mut seen: HashMap<String, (u64, DeadLetter)> = HashMap::new();
        while seen.len() < want {
            let out = self
                .client
                .receive_message()
                .queue_url(&self.dlq_url)
                .max_number_of_messages(i32::try_from(MAX_BATCH).unwrap_or(1))
                .visibility_timeout(0)
                // Long polling asks every SQS server, so a queue with few
                // messages does not look empty; with messages it answers at once.
                .wait_time_seconds(1)
                .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .message_attribute_names("receive_count")
                .customize()
                .config_override(
                    aws_sdk_sqs::config::Builder::default().timeout_config(self.timeouts.for_long_poll(secs(1))),
                )
                .send()
                .await
                .map_err(|e| sdk_err("reading the SQS dead-letter queue", e))?;
            let before = seen.len();
            for m in out.messages() {
                let Some(id) = m.message_id() else { continue };
                if seen.contains_key(id) {
                    continue;
                }
                match serde_json::from_str::<QueueMessage>(m.body().unwrap_or_default()) {
                    Ok(message) => {
                        let system =
                            |name| m.attributes().and_then(|a| a.get(&name)).and_then(|t| t.parse::<u64>().ok());
                        let sent = system(MessageSystemAttributeName::SentTimestamp).unwrap_or(u64::MAX);
                        // Ours says how many receives the engine saw; one SQS
                        // moved itself kept its count (this peek is one more).
                        let receive_count = m
                            .message_attributes()
                            .and_then(|a| a.get("receive_count"))
                            .and_then(|v| v.string_value())
                            .and_then(|n| n.parse().ok())
                            .or_else(|| {
                                let n = system(MessageSystemAttributeName::ApproximateReceiveCount)?;
                                u32::try_from(n.saturating_sub(1)).ok()
                            })
                            .unwrap_or(0);
                        let since = i64::try_from(sent.saturating_mul(1000)).unwrap_or(i64::MAX);
                        seen.insert(id.to_owned(), (sent, DeadLetter { message, receive_count, since }));
                    }
                    // A quarantined body: there, but not a job to list.
                    Err(_) => tracing::debug!(message_id = id, "skipping an unreadable dead letter"),
                }
            }
            if seen.len() == before {
                break;
            }
        }
        let mut listed: Vec<(String, (u64, DeadLetter))> = seen.into_iter().collect();
        listed.sort_by(|(a_id, (a_sent, _)), (b_id, (b_sent, _))| (a_sent, a_id).cmp(&(b_sent, b_id)));
        Ok(listed.into_iter().take(max).map(|(_, (_, m))| m).collect())
    }

    /// Sends each to its work queue, then deletes it from the DLQ: a
    /// failure in between leaves it in both (its job runs or is settled
    /// once, by the lease), never in neither.
    async fn redrive_dead_letters(&self, job: Option<&JobId>) -> StorageResult<Vec<QueueMessage>> {
        self.take_dead_letters(job, true).await
    }

    async fn remove_dead_letters(&self, job: Option<&JobId>) -> StorageResult<Vec<QueueMessage>> {
        self.take_dead_letters(job, false).await
    }

    async fn stats(&self) -> StorageResult<QueueStats> {
        let ((iv, ih), (bv, bh), (dead, _)) = tokio::try_join!(
            depth(&self.client, &self.interactive_url),
            depth(&self.client, &self.batch_url),
            depth(&self.client, &self.dlq_url),
        )?;
        Ok(QueueStats { visible: iv + bv, in_flight: ih + bh, dead })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_below_a_second_are_short_polls() {
        assert_eq!(wait_secs(Duration::ZERO), 0);
        assert_eq!(wait_secs(Duration::from_millis(999)), 0);
        assert_eq!(wait_secs(Duration::from_millis(1500)), 1);
        assert_eq!(wait_secs(Duration::from_secs(60)), 20);
    }

    #[test]
    fn visibility_rounds_up_and_is_capped() {
        assert_eq!(ceil_secs(Duration::ZERO, MAX_VISIBILITY_SECS), 0);
        assert_eq!(ceil_secs(Duration::from_millis(1), MAX_VISIBILITY_SECS), 1);
        assert_eq!(ceil_secs(Duration::from_secs(30), MAX_VISIBILITY_SECS), 30);
        assert_eq!(ceil_secs(Duration::from_secs(1 << 40), MAX_VISIBILITY_SECS), 43_200);
    }

    #[test]
    fn lane_tags_round_trip() {
        for lane in [Lane::Interactive, Lane::Batch] {
            assert_eq!(Lane::from_tag(lane.tag()), Some(lane));
        }
        assert_eq!(Lane::from_tag("x"), None);
    }
}
