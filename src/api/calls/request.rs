//! Reading a call before anything is charged or stored: its body (a JSON
//! object with a served `model` and well-formed `messages` or `input` and
//! numbers), and its `Ratepool-Max-Wait` header. Every refusal is a 400
//! naming the field. Fields ratepool does not check are forwarded as they
//! came; the provider judges them.

use std::time::Duration;

use axum::http::HeaderMap;
use serde_json::{Map, Value};

use super::error::OpenAiError;
use crate::domain::ModelName;
use crate::provider::{Endpoint, ProviderRequest};
use crate::storage::RequestHash;

/// The header a client sets to bound its wait for capacity, in seconds.
pub const MAX_WAIT_HEADER: &str = "ratepool-max-wait";
/// OpenAI's limits on `n` and on the inputs of one embeddings request.
const MAX_N: u64 = 128;
const MAX_INPUTS: usize = 2048;

/// A call that passed every check.
pub struct ParsedCall {
    pub request: ProviderRequest,
    /// The request's identity for its idempotency key, when it has one.
    pub hash: Option<RequestHash>,
    /// The field that sets the completion allowance (or the input, for
    /// embeddings): what to name when the call is too large.
    pub allowance_param: &'static str,
}

/// Checks `body` for `endpoint` (at `path`) and builds the provider request.
/// `served` lists the pool's models for the error of one it does not serve.
pub fn parse(
    endpoint: Endpoint,
    path: &str,
    body: &[u8],
    default_max_tokens: u64,
    served: &dyn Fn(&ModelName) -> bool,
    models: &dyn Fn() -> Vec<String>,
    durable: bool,
) -> Result<ParsedCall, OpenAiError> {
    let map = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(OpenAiError::not_json("The request body must be a JSON object.")),
        Err(e) => return Err(OpenAiError::not_json(format!("The request body is not valid JSON ({e})."))),
    };
    let model = match map.get("model") {
        None | Some(Value::Null) => return Err(OpenAiError::missing("model")),
        Some(Value::String(m)) => {
            ModelName::parse(m.as_str()).map_err(|e| OpenAiError::invalid("model", format!("Invalid 'model': {e}.")))?
        }
        Some(_) => return Err(OpenAiError::invalid("model", "Invalid 'model': expected a string.")),
    };
    if !served(&model) {
        return Err(OpenAiError::model_not_served(model.as_str(), &models()));
    }
    match endpoint {
        Endpoint::ChatCompletions => check_chat(&map)?,
        Endpoint::Embeddings => check_input(map.get("input"))?,
    }
    let hash = durable.then(|| RequestHash::of(path, &map));
    let allowance_param = match endpoint {
        Endpoint::Embeddings => "input",
        Endpoint::ChatCompletions if matches!(map.get("max_completion_tokens"), None | Some(Value::Null)) => {
            "max_tokens"
        }
        Endpoint::ChatCompletions => "max_completion_tokens",
    };
    let request = match endpoint {
        Endpoint::ChatCompletions => ProviderRequest::chat(map, default_max_tokens),
        Endpoint::Embeddings => ProviderRequest::embeddings(map),
    }
    .map_err(|e| OpenAiError::invalid(e.field, format!("Invalid '{}': {}.", e.field, e.message)))?;
    Ok(ParsedCall { request, hash, allowance_param })
}

fn check_chat(map: &Map<String, Value>) -> Result<(), OpenAiError> {
    let messages = match map.get("messages") {
        None | Some(Value::Null) => return Err(OpenAiError::missing("messages")),
        Some(Value::Array(m)) => m,
        Some(_) => return Err(OpenAiError::invalid("messages", "Invalid 'messages': expected an array.")),
    };
    if messages.is_empty() {
        return Err(OpenAiError::invalid("messages", "Invalid 'messages': it must contain at least one message."));
    }
    for (i, m) in messages.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(OpenAiError::invalid(
                format!("messages[{i}]"),
                format!("Invalid 'messages[{i}]': expected an object."),
            ));
        };
        if !matches!(m.get("role"), Some(Value::String(r)) if !r.is_empty()) {
            return Err(OpenAiError::invalid(
                format!("messages[{i}].role"),
                format!("Invalid 'messages[{i}].role': expected a non-empty string."),
            ));
        }
    }
    if !matches!(map.get("stream"), None | Some(Value::Null | Value::Bool(_))) {
        return Err(OpenAiError::invalid("stream", "Invalid 'stream': expected a boolean."));
    }
    check_count(map, "n", 1, MAX_N)?;
    check_count(map, "max_tokens", 1, u64::from(u32::MAX))?;
    check_count(map, "max_completion_tokens", 1, u64::from(u32::MAX))?;
    Ok(())
}

/// `field`, if present and not null, must be an integer in `min..=max`.
fn check_count(map: &Map<String, Value>, field: &str, min: u64, max: u64) -> Result<(), OpenAiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|v| (min..=max).contains(&v)) => Ok(()),
        Some(other) => Err(OpenAiError::invalid(
            field,
            format!("Invalid '{field}': {other}. It must be an integer from {min} to {max}."),
        )),
    }
}

/// An embeddings `input`: a string, or a non-empty array of strings, of
/// token ids, or of arrays of token ids, none of them empty.
fn check_input(input: Option<&Value>) -> Result<(), OpenAiError> {
    let bad = |why: &str| OpenAiError::invalid("input", format!("Invalid 'input': {why}."));
    match input {
        None | Some(Value::Null) => Err(OpenAiError::missing("input")),
        Some(Value::String(s)) if s.is_empty() => Err(bad("it must not be empty")),
        Some(Value::String(_)) => Ok(()),
        Some(Value::Array(items)) => {
            if items.is_empty() || items.len() > MAX_INPUTS {
                return Err(bad(&format!("it must hold 1 to {MAX_INPUTS} items")));
            }
            let token = |v: &Value| v.as_u64().is_some();
            let ok = items.iter().all(|v| matches!(v, Value::String(s) if !s.is_empty()))
                || items.iter().all(token)
                || items.iter().all(|v| matches!(v, Value::Array(ids) if !ids.is_empty() && ids.iter().all(token)));
            if ok {
                Ok(())
            } else {
                Err(bad("expected a string, or an array of non-empty strings, of token ids or of token id arrays"))
            }
        }
        Some(_) => Err(bad("expected a string or an array")),
    }
}

/// How long the call may wait for capacity: the `Ratepool-Max-Wait` header
/// (seconds, fractions allowed) cut to `cap`, else `default`.
pub fn max_wait(headers: &HeaderMap, default: Duration, cap: Duration) -> Result<Duration, OpenAiError> {
    let Some(v) = headers.get(MAX_WAIT_HEADER) else { return Ok(default) };
    let secs = v.to_str().ok().and_then(|s| s.trim().parse::<f64>().ok()).filter(|s| s.is_finite() && *s >= 0.0);
    match secs {
        Some(s) => Ok(Duration::try_from_secs_f64(s).unwrap_or(cap).min(cap)),
        None => Err(OpenAiError::invalid(
            "Ratepool-Max-Wait",
            "Invalid 'Ratepool-Max-Wait' header: expected a number of seconds, 0 or more (e.g. 2.5).",
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn chat(body: Value) -> Result<ParsedCall, OpenAiError> {
        let served = |m: &ModelName| m.as_str() == "gpt-4o-mini";
        let models = || vec!["gpt-4o-mini".to_string()];
        let bytes = serde_json::to_vec(&body).unwrap();
        parse(Endpoint::ChatCompletions, "/v1/chat/completions", &bytes, 256, &served, &models, false)
    }

    fn param_of(body: Value) -> Option<String> {
        chat(body).err().map(|e| e.param.unwrap_or_else(|| "<none>".into()))
    }

    fn user() -> Value {
        json!([{"role": "user", "content": "hi"}])
    }

    #[test]
    fn a_well_formed_chat_passes_with_unknown_fields_intact() {
        let ok =
            chat(json!({"model": "gpt-4o-mini", "messages": user(), "x_vendor": 1, "n": 2, "max_tokens": 7})).unwrap();
        let sent: Value = serde_json::from_slice(&ok.request.body).unwrap();
        assert_eq!(sent["x_vendor"], 1);
        assert_eq!(ok.request.reservation.completion_tokens, 14);
        assert!(ok.hash.is_none(), "no hash without a key");
    }

    #[test]
    fn each_bad_field_is_named() {
        let m = "gpt-4o-mini";
        assert_eq!(param_of(json!({"messages": user()})).as_deref(), Some("model"));
        assert_eq!(param_of(json!({"model": 4, "messages": user()})).as_deref(), Some("model"));
        assert_eq!(param_of(json!({"model": "gpt-typo", "messages": user()})).as_deref(), Some("model"));
        assert_eq!(param_of(json!({"model": m})).as_deref(), Some("messages"));
        assert_eq!(param_of(json!({"model": m, "messages": []})).as_deref(), Some("messages"));
        assert_eq!(param_of(json!({"model": m, "messages": "hi"})).as_deref(), Some("messages"));
        assert_eq!(param_of(json!({"model": m, "messages": [1]})).as_deref(), Some("messages[0]"));
        let no_role = json!([{"role": "user", "content": "a"}, {"content": "b"}]);
        assert_eq!(param_of(json!({"model": m, "messages": no_role})).as_deref(), Some("messages[1].role"));
        assert_eq!(param_of(json!({"model": m, "messages": user(), "stream": "yes"})).as_deref(), Some("stream"));
        assert_eq!(param_of(json!({"model": m, "messages": user(), "n": 0})).as_deref(), Some("n"));
        assert_eq!(param_of(json!({"model": m, "messages": user(), "n": 1.5})).as_deref(), Some("n"));
        assert_eq!(param_of(json!({"model": m, "messages": user(), "max_tokens": -1})).as_deref(), Some("max_tokens"));
        let zero = json!({"model": m, "messages": user(), "max_completion_tokens": 0});
        assert_eq!(param_of(zero).as_deref(), Some("max_completion_tokens"));
        let options = json!({"model": m, "messages": user(), "stream": true, "stream_options": 3});
        assert_eq!(param_of(options).as_deref(), Some("stream_options"));
        assert_eq!(param_of(json!([1, 2])).as_deref(), Some("<none>"));
        let served = |_: &ModelName| true;
        let models = Vec::new;
        let bad_json = parse(Endpoint::ChatCompletions, "/", b"{nope", 1, &served, &models, false).err().unwrap();
        assert!(bad_json.message.contains("not valid JSON"), "{}", bad_json.message);
        // Nulls are OpenAI's "not set".
        assert!(chat(json!({"model": m, "messages": user(), "n": null, "stream": null})).is_ok());
    }

    #[test]
    fn embeddings_input_must_be_one_of_openais_forms() {
        let served = |_: &ModelName| true;
        let models = Vec::new;
        let param = |input: Value| {
            let body = serde_json::to_vec(&json!({"model": "e", "input": input})).unwrap();
            parse(Endpoint::Embeddings, "/v1/embeddings", &body, 1, &served, &models, true).err().map(|e| e.param)
        };
        for ok in [json!("text"), json!(["a", "b"]), json!([1, 2]), json!([[1], [2, 3]])] {
            assert_eq!(param(ok.clone()), None, "{ok}");
        }
        for bad in [json!(""), json!([]), json!(["a", 1]), json!([[]]), json!({"a": 1}), json!(null)] {
            assert_eq!(param(bad.clone()), Some(Some("input".into())), "{bad}");
        }
        let body = br#"{"model": "e", "input": "x"}"#;
        let ok = parse(Endpoint::Embeddings, "/v1/embeddings", body, 1, &served, &models, true).ok().unwrap();
        assert!(ok.hash.is_some(), "a durable call is hashed");
    }

    #[test]
    fn the_wait_header_is_seconds_cut_to_the_cap() {
        let h = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(MAX_WAIT_HEADER, v.parse().unwrap());
            h
        };
        let (default, cap) = (Duration::from_secs(60), Duration::from_secs(300));
        assert_eq!(max_wait(&HeaderMap::new(), default, cap).unwrap(), default);
        assert_eq!(max_wait(&h("2.5"), default, cap).unwrap(), Duration::from_millis(2500));
        assert_eq!(max_wait(&h("0"), default, cap).unwrap(), Duration::ZERO);
        assert_eq!(max_wait(&h("9000"), default, cap).unwrap(), cap);
        for bad in ["-1", "soon", "NaN", "inf", ""] {
            let e = max_wait(&h(bad), default, cap).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("Ratepool-Max-Wait"), "{bad}");
        }
    }
}
