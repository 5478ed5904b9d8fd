//! Relaying a streamed chat completion: the provider's server-sent events
//! go to the client as they arrive, parsed by `eventsource-stream` (events
//! split across network chunks are put back together) and written again as
//! `data:` lines.
//!
//! On the way the relay counts the call's usage from the provider's final
//! usage chunk, which ratepool always asks for, and hides that chunk from a
//! client that did not ask for it. It bounds the gap between events by the
//! org's timeout. For a durable call it keeps the events as the client saw
//! them and stores them before sending `[DONE]`. When the client goes away
//! the response body, and with it this relay, is dropped: that drops the
//! provider's response (closing its connection, which cancels the call),
//! counts the call without usage and gives the durable call's key back.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::Stream;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::durable::{CLAIM_MARGIN, Held};
use crate::domain::{Clock, Micros, OrgName, Usage};
use crate::engine::router::CallRecord;
use crate::storage::{AnswerKind, StoredCall};
use crate::telemetry::Telemetry;

const DONE: &[u8] = b"data: [DONE]\n\n";
const ENDPOINT: &str = "chat_completions";

type Events = BoxStream<'static, Result<Event, EventStreamError<reqwest::Error>>>;

/// The events of a provider's streamed answer.
pub fn events(response: reqwest::Response) -> Events {
    chunks(response).eventsource().boxed()
}

/// A response's body as it arrives, ending after the first error.
pub fn chunks(response: reqwest::Response) -> impl Stream<Item = Result<Bytes, reqwest::Error>> + Send + 'static {
    futures::stream::unfold(Some(response), |response| async move {
        let mut response = response?;
        match response.chunk().await {
            Ok(Some(bytes)) => Some((Ok(bytes), Some(response))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// A durable stream's record of what the client was sent.
pub struct Transcript {
    pub held: Held,
    pub org: OrgName,
    /// Answers larger than this are sent but not stored.
    pub limit: usize,
    /// How long the stored answer is kept.
    pub ttl: Duration,
    bytes: Vec<u8>,
    overflowed: bool,
}

impl Transcript {
    pub fn new(held: Held, org: OrgName, limit: usize, ttl: Duration) -> Self {
        Self { held, org, limit, ttl, bytes: Vec::new(), overflowed: false }
    }

    fn push(&mut self, event: &[u8]) {
        if self.overflowed || self.bytes.len() + event.len() + DONE.len() > self.limit {
            self.overflowed = true;
            self.bytes = Vec::new();
            return;
        }
        self.bytes.extend_from_slice(event);
    }
}

/// One streamed call being relayed.
pub struct Relay {
    events: Events,
    read_timeout: Duration,
    usage_requested: bool,
    usage: Option<Usage>,
    record: Option<CallRecord>,
    durable: Option<Transcript>,
    clock: Arc<dyn Clock>,
    telemetry: Arc<Telemetry>,
    finished: bool,
}

/// The part of a chunk that says whether it carries the usage.
#[derive(Deserialize)]
struct ChunkUsage {
    #[serde(default)]
    usage: Option<IgnoredAny>,
    #[serde(default)]
    choices: Option<Vec<IgnoredAny>>,
}

impl Relay {
    pub fn new(
        events: Events,
        read_timeout: Duration,
        usage_requested: bool,
        record: CallRecord,
        durable: Option<Transcript>,
        clock: Arc<dyn Clock>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            events,
            read_timeout,
            usage_requested,
            usage: None,
            record: Some(record),
            durable,
            clock,
            telemetry,
            finished: false,
        }
    }

    /// The response body: every event the client is to see, then the end.
    pub fn into_body(self) -> BoxStream<'static, Result<Bytes, std::convert::Infallible>> {
        futures::stream::unfold(self, |mut relay| async move { relay.next_bytes().await.map(|b| (Ok(b), relay)) })
            .boxed()
    }

    async fn next_bytes(&mut self) -> Option<Bytes> {
        if self.finished {
            return None;
        }
        loop {
            let event = match tokio::time::timeout(self.read_timeout, self.events.next()).await {
                Err(_) => {
                    return Some(self.cut(format!("the provider sent nothing for {:?}", self.read_timeout)).await);
                }
                Ok(None) => return Some(self.cut("the provider's stream ended before [DONE]".into()).await),
                Ok(Some(Err(e))) => return Some(self.cut(format!("the provider's stream failed: {e}")).await),
                Ok(Some(Ok(event))) => event,
            };
            if event.data == "[DONE]" {
                return Some(self.done().await);
            }
            let show = self.inspect(&event.data);
            let now = self.clock.now();
            if let Some(t) = &mut self.durable {
                t.held.renew_if_due(now, self.read_timeout + CLAIM_MARGIN).await;
            }
            if !show {
                continue;
            }
            let bytes = encode(&event);
            if let Some(t) = &mut self.durable {
                t.push(&bytes);
            }
            return Some(bytes);
        }
    }

    /// Counts the usage a chunk carries; false for the usage-only chunk the
    /// client did not ask for.
    fn inspect(&mut self, data: &str) -> bool {
        let Ok(chunk) = serde_json::from_str::<ChunkUsage>(data) else { return true };
        if chunk.usage.is_none() {
            return true;
        }
        if let Some(usage) = crate::provider::usage_of(data.as_bytes()) {
            self.usage = Some(usage);
        }
        let usage_only = chunk.choices.is_some_and(|c| c.is_empty());
        !usage_only || self.usage_requested
    }

    fn finish_record(&mut self) {
        if let Some(record) = self.record.take() {
            record.finish(self.usage.unwrap_or(Usage { calls: 1, ..Usage::default() }));
        }
    }

    /// The end of a whole answer: stored (if durable) before `[DONE]` goes.
    async fn done(&mut self) -> Bytes {
        self.finished = true;
        self.finish_record();
        self.telemetry.door_call(ENDPOINT, "ok");
        if let Some(mut t) = self.durable.take() {
            if t.overflowed {
                tracing::warn!(limit = t.limit, "streamed answer larger than [calls] max_body_bytes: sent, not stored");
                self.telemetry.durable_store_failed();
                t.held.release().await;
            } else {
                t.bytes.extend_from_slice(DONE);
                let now: Micros = self.clock.now();
                let answer = StoredCall {
                    status: 200,
                    kind: AnswerKind::EventStream,
                    org: Some(t.org.clone()),
                    body: Bytes::from(std::mem::take(&mut t.bytes)),
                    created_at: now,
                };
                let expires_at = now.saturating_add(Micros::try_from(t.ttl.as_micros()).unwrap_or(Micros::MAX));
                if let Err(e) = t.held.complete(&answer, expires_at).await {
                    tracing::warn!(error = %e, "a durable stream's answer was not stored; a replay would call again");
                    self.telemetry.durable_store_failed();
                }
            }
        }
        Bytes::from_static(DONE)
    }

    /// The end of an answer cut short upstream: the client is told with an
    /// error event (the SDKs raise it), nothing is stored, the key is free.
    async fn cut(&mut self, reason: String) -> Bytes {
        self.finished = true;
        tracing::warn!(%reason, "streamed call cut short");
        self.finish_record();
        self.telemetry.door_call(ENDPOINT, "stream_cut");
        if let Some(t) = self.durable.take() {
            t.held.release().await;
        }
        let error = serde_json::json!({"error": {"message": reason, "type": "upstream_error", "param": null,
                                                 "code": "stream_cut"}});
        Bytes::from(format!("data: {error}\n\n"))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if !self.finished {
            // The client went away mid-stream; the record and the held
            // claim count the call and free the key as they drop.
            self.telemetry.door_call(ENDPOINT, "client_closed");
        }
    }
}

/// An event as it goes to the client: its type if it has one, its data
/// line by line.
fn encode(event: &Event) -> Bytes {
    let mut out = String::with_capacity(event.data.len() + 16);
    if !event.event.is_empty() && event.event != "message" {
        out.push_str("event: ");
        out.push_str(&event.event);
        out.push('\n');
    }
    for line in event.data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    /// The events parsed from `chunks`, each a piece of the wire bytes.
    async fn parse(chunks: Vec<&'static [u8]>) -> Vec<Event> {
        let wire = futures::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
        wire.eventsource().map(|e| e.unwrap()).collect().await
    }

    #[tokio::test]
    async fn events_split_across_network_chunks_are_put_back_together() {
        let events = parse(vec![b"data: {\"a\":", b"1}\n", b"\ndata: caf\xc3", b"\xa9\n\ndata: [DONE]\n\n"]).await;
        let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["{\"a\":1}", "caf\u{e9}", "[DONE]"]);
        assert_eq!(encode(&events[0]), Bytes::from_static(b"data: {\"a\":1}\n\n"));
    }

    #[tokio::test]
    async fn typed_and_multi_line_events_are_written_back_as_they_were() {
        let events = parse(vec![b"event: error\ndata: one\ndata: two\n\n"]).await;
        assert_eq!(encode(&events[0]), Bytes::from_static(b"event: error\ndata: one\ndata: two\n\n"));
    }

    fn relay(usage_requested: bool) -> Relay {
        let telemetry = Arc::new(Telemetry::new());
        let event = crate::storage::CallEvent {
            tenant: crate::domain::TenantId::parse("t").unwrap(),
            org: OrgName::parse("o").unwrap(),
            model: crate::domain::ModelName::parse("m").unwrap(),
            outcome: crate::storage::CallOutcome::Ok,
            usage: Usage::default(),
            latency: Duration::ZERO,
        };
        let record = CallRecord::for_tests(telemetry.clone(), event);
        let events = futures::stream::empty().boxed();
        let clock: Arc<dyn Clock> = Arc::new(crate::domain::ManualClock::new(0));
        Relay::new(events, Duration::from_secs(1), usage_requested, record, None, clock, telemetry)
    }

    #[test]
    fn the_usage_chunk_is_counted_and_shown_only_to_a_client_that_asked() {
        let usage = r#"{"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#;
        let content = r#"{"id":"x","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}"#;
        let mut hidden = relay(false);
        assert!(hidden.inspect(content), "content is always shown");
        assert_eq!(hidden.usage, None, "a null usage is none");
        assert!(!hidden.inspect(usage), "the client did not ask for the usage chunk");
        assert_eq!(hidden.usage, Some(Usage { calls: 1, prompt_tokens: 7, completion_tokens: 3 }));
        let mut shown = relay(true);
        assert!(shown.inspect(usage));
        assert_eq!(shown.usage.map(|u| u.completion_tokens), Some(3));
        // Usage riding on a chunk with content (some providers) is counted and the chunk kept.
        let both = r#"{"choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        assert!(hidden.inspect(both));
        assert_eq!(hidden.usage.map(|u| u.completion_tokens), Some(2));
        assert!(hidden.inspect("not json"), "what is not JSON is relayed as it is");
        hidden.finished = true;
        shown.finished = true;
    }
}
