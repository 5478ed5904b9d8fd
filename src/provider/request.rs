//! A request as the provider receives it, and what it reserves against the
//! org's limits.
//!
//! The body is the whole JSON object the caller built (a job step's fields,
//! or an OpenAI SDK's request as it arrived at `/v1/chat/completions`),
//! forwarded unchanged: fields ratepool does not know are passed through.
//! The only change ratepool makes is to a streamed chat request, which is
//! asked for its final usage chunk (`stream_options.include_usage`) so the
//! call's tokens are counted; [`StreamMode::usage_requested`] says whether
//! the client asked for that chunk itself.
//!
//! The reservation follows OpenAI's documented rate-limit accounting: the
//! prompt is estimated from its characters (message text, names, tool calls
//! and results, tool definitions and the response schema), and the whole
//! completion allowance (`max_completion_tokens`, else `max_tokens`, else
//! the configured default) is reserved for each of the `n` choices.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::domain::ModelName;
use crate::storage::Cost;

/// Which provider endpoint a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Embeddings,
}

impl Endpoint {
    /// The path under the org's base URL (which ends in `/v1`).
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/chat/completions",
            Self::Embeddings => "/embeddings",
        }
    }
}

/// What a request takes from an org's limits before it is sent. The prompt
/// is kept in characters, because how many characters make a token is the
/// org's setting (`chars_per_token`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reservation {
    /// Characters of everything the prompt estimate counts.
    pub prompt_chars: u64,
    /// Prompt tokens given as token ids (embeddings input), counted exactly.
    pub prompt_tokens: u64,
    /// Completion tokens reserved: the allowance times `n`.
    pub completion_tokens: u64,
}

impl Reservation {
    /// The ledger's charge at `chars_per_token`: one request, and the
    /// prompt estimate (rounded up) plus the completion allowance in tokens.
    pub fn cost(&self, chars_per_token: f64) -> Cost {
        let estimate = (self.prompt_chars as f64 / chars_per_token).ceil() as u64;
        Cost { requests: 1, tokens: estimate.saturating_add(self.prompt_tokens).saturating_add(self.completion_tokens) }
    }

    /// A chat-completions body's reservation; `default_max_tokens` stands in
    /// for a body that sets neither `max_completion_tokens` nor `max_tokens`.
    pub fn of_chat(body: &Map<String, Value>, default_max_tokens: u64) -> Self {
        let mut chars = 0u64;
        if let Some(Value::Array(messages)) = body.get("messages") {
            for m in messages {
                chars += message_chars(m);
            }
        }
        // Tool and function definitions and the response schema are sent to
        // the model with the prompt, so the estimate counts their JSON.
        for key in ["tools", "functions"] {
            if let Some(v) = body.get(key) {
                chars += json_chars(v);
            }
        }
        if let Some(schema) = body.get("response_format").and_then(|f| f.get("json_schema")) {
            chars += json_chars(schema);
        }
        let allowance = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|k| body.get(*k).and_then(Value::as_u64))
            .unwrap_or(default_max_tokens);
        let n = body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
        Self { prompt_chars: chars, prompt_tokens: 0, completion_tokens: allowance.saturating_mul(n) }
    }

    /// An embeddings body's reservation: its input, nothing for a
    /// completion. Text counts by characters; token ids (one list, or a
    /// list of lists) count one token each.
    pub fn of_embeddings(body: &Map<String, Value>) -> Self {
        let mut r = Self::default();
        match body.get("input") {
            Some(Value::String(s)) => r.prompt_chars = char_count(s),
            Some(Value::Array(items)) => {
                for item in items {
                    match item {
                        Value::String(s) => r.prompt_chars += char_count(s),
                        Value::Number(_) => r.prompt_tokens += 1,
                        Value::Array(ids) => r.prompt_tokens += ids.len() as u64,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        r
    }
}

fn char_count(s: &str) -> u64 {
    s.chars().count() as u64
}

/// Characters of `v` as it would be sent: strings by their characters,
/// anything else by its compact JSON.
fn json_chars(v: &Value) -> u64 {
    match v {
        Value::String(s) => char_count(s),
        other => char_count(&other.to_string()),
    }
}

/// What one message adds to the prompt: its text (a string, or the text of
/// its content parts), its author name, its tool calls' names and
/// arguments, and its refusal.
fn message_chars(m: &Value) -> u64 {
    let mut chars = 0;
    match m.get("content") {
        Some(Value::String(s)) => chars += char_count(s),
        Some(Value::Array(parts)) => {
            for p in parts {
                if let Some(Value::String(t)) = p.get("text") {
                    chars += char_count(t);
                }
            }
        }
        _ => {}
    }
    for key in ["name", "refusal"] {
        if let Some(Value::String(s)) = m.get(key) {
            chars += char_count(s);
        }
    }
    if let Some(Value::Array(calls)) = m.get("tool_calls") {
        for call in calls {
            if let Some(f) = call.get("function") {
                for key in ["name", "arguments"] {
                    if let Some(Value::String(s)) = f.get(key) {
                        chars += char_count(s);
                    }
                }
            }
        }
    }
    chars
}

/// How a streamed request is relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamMode {
    /// The client itself asked for the final usage chunk; if not, ratepool
    /// asked for it and must not show it.
    pub usage_requested: bool,
}

/// Why a body cannot be sent: the field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidRequest {
    pub field: &'static str,
    pub message: String,
}

/// One request, ready to send to any org that serves its model.
#[derive(Debug, Clone)]
pub struct ProviderRequest {
    pub endpoint: Endpoint,
    pub model: ModelName,
    /// The JSON body, serialized once and sent as is on every attempt.
    pub body: Bytes,
    pub reservation: Reservation,
    /// `Some` for a streamed chat request (`"stream": true`).
    pub stream: Option<StreamMode>,
}

impl ProviderRequest {
    /// A chat-completions request of `body`, which must name a valid
    /// `model`. See the module doc for the one change made to a streamed one.
    pub fn chat(mut body: Map<String, Value>, default_max_tokens: u64) -> Result<Self, InvalidRequest> {
        let model = model_of(&body)?;
        let reservation = Reservation::of_chat(&body, default_max_tokens);
        let stream = match body.get("stream") {
            Some(Value::Bool(true)) => {
                let options = body.entry("stream_options").or_insert_with(|| Value::Object(Map::new()));
                let Value::Object(options) = options else {
                    return Err(InvalidRequest { field: "stream_options", message: "must be an object".into() });
                };
                let usage_requested = options.get("include_usage") == Some(&Value::Bool(true));
                options.insert("include_usage".into(), Value::Bool(true));
                Some(StreamMode { usage_requested })
            }
            _ => None,
        };
        Ok(Self { endpoint: Endpoint::ChatCompletions, model, body: to_bytes(&body), reservation, stream })
    }

    /// An embeddings request of `body`, which must name a valid `model`.
    pub fn embeddings(body: Map<String, Value>) -> Result<Self, InvalidRequest> {
        let model = model_of(&body)?;
        let reservation = Reservation::of_embeddings(&body);
        Ok(Self { endpoint: Endpoint::Embeddings, model, body: to_bytes(&body), reservation, stream: None })
    }

    /// A chat request of one user message, deterministic (temperature 0):
    /// the benchmark's and the tests' call.
    pub fn user_prompt(model: &ModelName, text: &str, max_tokens: u32) -> Self {
        let mut body = Map::new();
        body.insert("model".into(), model.as_str().into());
        body.insert("messages".into(), serde_json::json!([{"role": "user", "content": text}]));
        body.insert("max_tokens".into(), max_tokens.into());
        body.insert("temperature".into(), 0.into());
        let reservation = Reservation::of_chat(&body, u64::from(max_tokens));
        Self {
            endpoint: Endpoint::ChatCompletions,
            model: model.clone(),
            body: to_bytes(&body),
            reservation,
            stream: None,
        }
    }

    /// The ledger's charge for this request at `chars_per_token`.
    pub fn cost(&self, chars_per_token: f64) -> Cost {
        self.reservation.cost(chars_per_token)
    }
}

fn model_of(body: &Map<String, Value>) -> Result<ModelName, InvalidRequest> {
    match body.get("model") {
        Some(Value::String(m)) => {
            ModelName::parse(m.as_str()).map_err(|e| InvalidRequest { field: "model", message: e.0 })
        }
        Some(_) => Err(InvalidRequest { field: "model", message: "must be a string".into() }),
        None => Err(InvalidRequest { field: "model", message: "is required".into() }),
    }
}

fn to_bytes(body: &Map<String, Value>) -> Bytes {
    // A `Map` of `Value`s always serializes: its keys are strings.
    Bytes::from(serde_json::to_vec(body).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn plain_chat_is_message_text_plus_max_tokens() {
        let body = obj(json!({"model": "m", "max_tokens": 100, "messages": [
            {"role": "system", "content": "abcd".repeat(10)},
            {"role": "user", "content": "xyz"}]}));
        let r = Reservation::of_chat(&body, 1024);
        assert_eq!(r, Reservation { prompt_chars: 43, prompt_tokens: 0, completion_tokens: 100 });
        // 43 characters / 4 → 11 tokens (rounded up) + 100.
        assert_eq!(r.cost(4.0), Cost { requests: 1, tokens: 111 });
    }

    #[test]
    fn tools_schema_tool_calls_and_n_count_as_the_provider_reserves() {
        let tools = json!([{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]);
        let schema = json!({"name": "s", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}});
        let body = obj(json!({
            "model": "m",
            "n": 3,
            "max_completion_tokens": 50,
            "max_tokens": 999,
            "tools": tools,
            "response_format": {"type": "json_schema", "json_schema": schema},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {"url": "x"}}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get", "arguments": "{\"q\":1}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}
            ]
        }));
        let r = Reservation::of_chat(&body, 1024);
        let expected_chars = 5 + (3 + 7) + 2 + tools.to_string().chars().count() + schema.to_string().chars().count();
        assert_eq!(r.prompt_chars, expected_chars as u64);
        assert_eq!(r.completion_tokens, 150, "max_completion_tokens wins over max_tokens, times n");
        let none = obj(json!({"model": "m", "messages": []}));
        assert_eq!(Reservation::of_chat(&none, 1024).completion_tokens, 1024, "the default allowance");
    }

    #[test]
    fn embeddings_count_text_by_characters_and_token_ids_exactly() {
        let r = |input: Value| Reservation::of_embeddings(&obj(json!({"model": "e", "input": input})));
        assert_eq!(r(json!("abcd")), Reservation { prompt_chars: 4, ..Default::default() });
        assert_eq!(r(json!(["ab", "cde"])), Reservation { prompt_chars: 5, ..Default::default() });
        assert_eq!(r(json!([1, 2, 3])), Reservation { prompt_tokens: 3, ..Default::default() });
        assert_eq!(r(json!([[1, 2], [3]])), Reservation { prompt_tokens: 3, ..Default::default() });
        assert_eq!(r(json!(["abcd"])).cost(4.0), Cost { requests: 1, tokens: 1 });
    }

    #[test]
    fn a_streamed_chat_asks_for_usage_and_remembers_whether_the_client_did() {
        let req = ProviderRequest::chat(obj(json!({"model": "m", "stream": true, "messages": []})), 10).unwrap();
        assert_eq!(req.stream, Some(StreamMode { usage_requested: false }));
        let sent: Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(sent["stream_options"], json!({"include_usage": true}));
        let asked =
            obj(json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}, "messages": []}));
        assert_eq!(ProviderRequest::chat(asked, 10).unwrap().stream, Some(StreamMode { usage_requested: true }));
        let plain =
            ProviderRequest::chat(obj(json!({"model": "m", "messages": [], "x_vendor": {"a": 1}})), 10).unwrap();
        assert_eq!(plain.stream, None);
        let sent: Value = serde_json::from_slice(&plain.body).unwrap();
        assert_eq!(sent["x_vendor"], json!({"a": 1}), "unknown fields are forwarded");
    }

    #[test]
    fn the_model_is_required_and_valid() {
        let err = |v: Value| ProviderRequest::chat(obj(v), 10).unwrap_err().field;
        assert_eq!(err(json!({"messages": []})), "model");
        assert_eq!(err(json!({"model": 3, "messages": []})), "model");
        assert_eq!(err(json!({"model": "a b", "messages": []})), "model");
        let bad_options = json!({"model": "m", "stream": true, "stream_options": 1, "messages": []});
        assert_eq!(err(bad_options), "stream_options");
    }
}
