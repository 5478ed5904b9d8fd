//! Streamed answers (`"stream": true`), as OpenAI sends them: server-sent
//! events of `chat.completion.chunk` objects — the role first, then the
//! content in pieces (for a tool call: the call's id and name, then its
//! arguments in pieces), then each choice's finish reason, then (if asked with
//! `stream_options.include_usage`) a chunk with no choices and the usage,
//! then `data: [DONE]`. Chunks are paced like the whole answer would be:
//! the first after the base latency, each piece after its tokens' time.
//! A stream whose client goes away before the end is counted as cut.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::text::{Answer, ChatCall};

/// Characters per content piece: about four tokens.
const PIECE_CHARS: usize = 16;

/// Every event of the stream, each with the completion tokens it carries.
pub(super) fn chunks(call: &ChatCall, answer: &Answer, created: i64, usage: Option<&Value>) -> Vec<(u64, Bytes)> {
    let chunk = |choices: Value, usage_field: Option<&Value>| {
        let mut c = json!({
            "id": answer.id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": call.model,
            "choices": choices,
        });
        // With include_usage every chunk has a `usage` field, null but in
        // the last one, as OpenAI sends it.
        if usage.is_some() {
            c["usage"] = usage_field.cloned().unwrap_or(Value::Null);
        }
        event(&c)
    };
    let mut out = Vec::new();
    for (i, choice) in answer.choices.iter().enumerate() {
        let delta = |d: Value, finish: Option<&str>| json!([{"index": i, "delta": d, "logprobs": null, "finish_reason": finish}]);
        let text = match &choice.tool_call {
            None => {
                out.push((0, chunk(delta(json!({"role": "assistant", "content": ""}), None), None)));
                choice.text()
            }
            Some(call) => {
                let opening = json!({"role": "assistant", "content": null, "tool_calls": [
                    {"index": 0, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}]});
                out.push((0, chunk(delta(opening, None), None)));
                call.arguments.clone()
            }
        };
        let pieces = split(&text, PIECE_CHARS);
        let mut left = choice.tokens;
        let n = pieces.len() as u64;
        for (k, piece) in pieces.into_iter().enumerate() {
            // The choice's tokens spread over its pieces.
            let tokens = if k as u64 + 1 == n { left } else { (choice.tokens / n.max(1)).min(left) };
            left -= tokens;
            let d = match choice.tool_call {
                None => json!({"content": piece}),
                Some(_) => json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
            };
            out.push((tokens, chunk(delta(d, None), None)));
        }
        out.push((left, chunk(delta(json!({}), Some(choice.finish_reason)), None)));
    }
    if let Some(u) = usage {
        out.push((0, chunk(json!([]), Some(u))));
    }
    out.push((0, Bytes::from_static(b"data: [DONE]\n\n")));
    out
}

/// The events with the delay before each: `first` before the first, and
/// `per_token` for every token an event carries.
pub(super) fn paced(chunks: Vec<(u64, Bytes)>, first: Duration, per_token: Duration) -> Vec<(Duration, Bytes)> {
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, (tokens, bytes))| {
            let wait = per_token.saturating_mul(u32::try_from(tokens).unwrap_or(u32::MAX));
            (if i == 0 { first + wait } else { wait }, bytes)
        })
        .collect()
}

/// Counts a stream whose body is dropped before its last event was taken:
/// the client went away (or the shutdown cut it), so the answer was not
/// delivered whole.
struct Delivery {
    events: std::vec::IntoIter<(Duration, Bytes)>,
    closing: CancellationToken,
    cut: Arc<AtomicU64>,
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if self.events.len() > 0 {
            self.cut.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The SSE response; a shutdown mid-stream cuts it off like a dropped
/// connection. `cut` counts streams not delivered to their end.
pub(super) fn response(
    mut headers: HeaderMap,
    events: Vec<(Duration, Bytes)>,
    closing: CancellationToken,
    cut: Arc<AtomicU64>,
) -> Response {
    let delivery = Delivery { events: events.into_iter(), closing, cut };
    let body = futures::stream::unfold(delivery, |mut d| async move {
        let (wait, bytes) = d.events.as_slice().first().cloned()?;
        if !wait.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = d.closing.cancelled() => {
                    let cut = std::io::Error::other("stream cut off by the simulator's shutdown");
                    return Some((Err(cut), d));
                }
            }
        }
        d.events.next();
        Some((Ok::<_, std::io::Error>(bytes), d))
    });
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    (headers, Body::from_stream(body)).into_response()
}

fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// `text` in pieces of about `size` bytes, cut on character boundaries.
fn split(text: &str, size: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = size.min(rest.len());
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        let (piece, tail) = rest.split_at(cut);
        out.push(piece);
        rest = tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Reservation;

    /// The events' JSON, without `data: [DONE]`.
    fn events(call: &ChatCall) -> Vec<Value> {
        let answer = call.answer();
        chunks(call, &answer, 0, None)
            .into_iter()
            .filter_map(|(_, b)| {
                let line = std::str::from_utf8(&b).ok()?.strip_prefix("data: ")?.trim().to_owned();
                serde_json::from_str(&line).ok()
            })
            .collect()
    }

    #[test]
    fn a_tool_call_streams_its_id_and_name_first_then_its_arguments_in_pieces() {
        let body = json!({"model": "m", "max_tokens": 300, "messages": [{"role": "user", "content": "Weather?"}]});
        let call = ChatCall {
            model: "m".into(),
            messages: vec![("user".into(), "Weather?".into())],
            max_tokens: 300,
            temperature: None,
            n: 1,
            stop: Vec::new(),
            seed: None,
            stream: Some(false),
            reservation: Reservation::of_chat(body.as_object().unwrap(), 300),
            response_format: None,
            tools: Some(json!([{"type": "function", "function": {"name": "forecast", "parameters": {
                "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}])),
            tool_choice: Some(json!("required")),
        };
        let whole = call.answer().choices.remove(0);
        let expected = whole.tool_call.clone().unwrap();
        let ev = events(&call);
        let first = &ev[0]["choices"][0]["delta"];
        assert_eq!(first["role"], "assistant");
        assert_eq!(first["content"], Value::Null);
        assert_eq!(first["tool_calls"][0]["id"], json!(expected.id));
        assert_eq!(first["tool_calls"][0]["function"]["name"], "forecast");
        let args: String = ev[1..]
            .iter()
            .filter_map(|e| {
                e["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str().map(str::to_owned)
            })
            .collect();
        assert_eq!(args, expected.arguments, "the pieces make the whole arguments");
        assert!(ev.len() > 3, "the arguments come in several pieces");
        assert_eq!(ev.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");
        assert!(ev.iter().all(|e| e["choices"][0]["delta"].get("content").is_none_or(Value::is_null)));
    }

    #[test]
    fn pieces_cover_the_text_on_char_boundaries() {
        let text = "é".repeat(20) + "abc";
        let pieces = split(&text, 5);
        assert_eq!(pieces.concat(), text);
        assert!(pieces.iter().all(|p| !p.is_empty() && p.len() <= 6));
        assert!(split("", 5).is_empty());
    }
}
