//! Deterministic answers: a completion's text and token count are a
//! function of the request only (model, messages, max_tokens, temperature,
//! seed, response format, tools, and the choice's index) — never of the
//! org, the time or the fault RNG — so a job rerun after a crash produces
//! exactly the outputs of an undisturbed run, and tests can compare the
//! two. Embedding vectors are a function of the model and the input text.
//!
//! The answer's shape follows the request as the provider's does: a tool
//! call (arguments conforming to the function's `parameters`,
//! `finish_reason: "tool_calls"`) when `tool_choice` is `required` or names
//! a function; JSON conforming to the schema for `response_format:
//! json_schema` ([`super::json`]); a JSON object for `json_object`; else
//! pseudo-text. Token counts follow the text's length (about four
//! characters a token), and an answer longer than `max_tokens` is cut
//! there with `finish_reason: "length"`, invalid JSON included.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::provider::Reservation;

/// The part of a chat request that decides its answer, normalised.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ChatCall {
    pub model: String,
    /// (role, text content) of each message.
    pub messages: Vec<(String, String)>,
    pub max_tokens: u64,
    pub temperature: Option<f64>,
    /// Choices to answer with.
    pub n: u64,
    /// Sequences that end a choice's text where they first appear.
    pub stop: Vec<String>,
    pub seed: Option<i64>,
    /// `Some(include_usage)` for a streamed request.
    pub stream: Option<bool>,
    /// What the call is charged at arrival (the same rule ratepool's
    /// ledger uses, `crate::provider::Reservation`).
    pub reservation: Reservation,
    /// Kept for the answer's shape: structured outputs and tool calls.
    pub response_format: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
}

/// One choice of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Choice {
    pub tokens: u64,
    /// `"length"` when the choice used all of max_tokens, `"tool_calls"`
    /// for a tool call, else `"stop"`.
    pub finish_reason: &'static str,
    /// Decided up front when a stop sequence may cut it (its token count
    /// depends on where) or when it is JSON; else generated once the call
    /// is admitted.
    text: Option<String>,
    /// The text generator's state after drawing `tokens`.
    rng: SplitMix64,
    /// The call this choice makes instead of answering with text.
    pub tool_call: Option<SimToolCall>,
}

/// A tool call the simulated model makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SimToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl Choice {
    /// About four characters of pseudo-text per token; empty for a tool call.
    pub(super) fn text(&self) -> String {
        if self.tool_call.is_some() {
            return String::new();
        }
        self.text.clone().unwrap_or_else(|| pseudo_text(&mut self.rng.clone(), self.tokens as usize * 4))
    }

    /// The assistant message of this choice.
    pub(super) fn message(&self) -> Value {
        match &self.tool_call {
            Some(c) => json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}]}),
            None => json!({"role": "assistant", "content": self.text(), "refusal": null}),
        }
    }
}

/// What a choice is made of.
enum Shape<'a> {
    Text,
    /// `json_schema` (with its schema) or `json_object` (without).
    Json(Option<&'a Value>),
    Call {
        name: &'a str,
        parameters: Option<&'a Value>,
    },
}

/// A call's answer, decided before the call is admitted (its token count is
/// needed for the stats and the latency).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Answer {
    /// `chatcmpl-…`, derived from the digest so it is as repeatable as the text.
    pub id: String,
    pub choices: Vec<Choice>,
}

impl Answer {
    /// Completion tokens of all choices.
    pub(super) fn tokens(&self) -> u64 {
        self.choices.iter().map(|c| c.tokens).sum()
    }
}

impl ChatCall {
    /// The prompt estimate OpenAI documents for what it charges at arrival:
    /// characters of the prompt / chars_per_token, rounded up.
    pub(super) fn prompt_tokens(&self, chars_per_token: f64) -> u64 {
        Reservation { completion_tokens: 0, ..self.reservation }.cost(chars_per_token).tokens
    }

    /// SHA-256 of the fields that decide the answer, each length-prefixed so
    /// that different requests cannot collide by shifting text between fields.
    pub(super) fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(self.model.as_bytes());
        for (role, content) in &self.messages {
            field(role.as_bytes());
            field(content.as_bytes());
        }
        field(&self.max_tokens.to_le_bytes());
        // Absent means OpenAI's default of 1, so both spellings answer alike.
        field(&self.temperature.unwrap_or(1.0).to_bits().to_le_bytes());
        if let Some(seed) = self.seed {
            field(&seed.to_le_bytes());
        }
        // Only when present, so plain requests answer as they always did.
        for v in [&self.response_format, &self.tools, &self.tool_choice].into_iter().flatten() {
            field(v.to_string().as_bytes());
        }
        h.finalize().into()
    }

    /// The shape the request asks for. A tool call that `tool_choice`
    /// forces comes before any response format, as at the provider.
    fn shape(&self, rng: &mut SplitMix64) -> Shape<'_> {
        let functions: Vec<&Value> = self
            .tools
            .iter()
            .filter_map(Value::as_array)
            .flatten()
            .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
            .filter_map(|t| t.get("function"))
            .collect();
        fn named(f: &Value) -> Option<&str> {
            f.get("name").and_then(Value::as_str)
        }
        let forced = match &self.tool_choice {
            Some(Value::String(s)) if s == "required" && !functions.is_empty() => {
                Some(functions[(rng.next() % functions.len() as u64) as usize])
            }
            Some(Value::Object(o)) => {
                let want = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
                functions.iter().find(|f| want.is_some() && named(f) == want).copied()
            }
            _ => None,
        };
        if let Some(f) = forced
            && let Some(name) = named(f)
        {
            return Shape::Call { name, parameters: f.get("parameters") };
        }
        let format = self.response_format.as_ref();
        match format.and_then(|f| f.get("type")).and_then(Value::as_str) {
            Some("json_schema") => Shape::Json(format.and_then(|f| f.get("json_schema")).and_then(|j| j.get("schema"))),
            Some("json_object") => Shape::Json(None),
            _ => Shape::Text,
        }
    }

    /// The answer: `n` choices of between max_tokens/2 and max_tokens
    /// tokens each, cut at the first stop sequence.
    pub(super) fn answer(&self) -> Answer {
        let digest = self.digest();
        let choices = (0..self.n.max(1)).map(|i| self.choice(&digest, i)).collect();
        Answer { id: format!("chatcmpl-{}", hex::encode(&digest[..12])), choices }
    }

    fn choice(&self, digest: &[u8; 32], index: u64) -> Choice {
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&digest[..8]);
        // Choice 0 is what a request without `n` gets; the others differ.
        let mut rng = SplitMix64(u64::from_le_bytes(seed) ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let max = self.max_tokens.max(1);
        match self.shape(&mut rng) {
            Shape::Text => {}
            Shape::Json(schema) => {
                let doc = match schema {
                    Some(s) => super::json::generate(s, s, &mut rng),
                    None => json!({"answer": pseudo_text(&mut rng, 1)}),
                };
                let (text, tokens, cut) = fit(doc.to_string(), max);
                let finish_reason = if cut { "length" } else { "stop" };
                return Choice { tokens, finish_reason, text: Some(text), rng, tool_call: None };
            }
            Shape::Call { name, parameters } => {
                let args = parameters.map_or(json!({}), |p| super::json::generate(p, p, &mut rng));
                let id = format!("call_{:016x}", rng.next());
                let (arguments, tokens, cut) = fit(args.to_string(), max);
                let call = SimToolCall { id, name: name.to_owned(), arguments };
                let finish_reason = if cut { "length" } else { "tool_calls" };
                return Choice { tokens, finish_reason, text: None, rng, tool_call: Some(call) };
            }
        }
        let min = max.div_ceil(2);
        let tokens = min + rng.next() % (max - min + 1);
        let mut choice = Choice {
            tokens,
            finish_reason: if tokens == max { "length" } else { "stop" },
            text: None,
            rng,
            tool_call: None,
        };
        if !self.stop.is_empty() {
            let mut text = choice.text();
            if let Some(cut) = self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
                choice.tokens = (text.len() as u64).div_ceil(4);
                choice.finish_reason = "stop";
            }
            choice.text = Some(text);
        }
        choice
    }
}

/// `text` with its token count (four characters a token), cut to
/// `max_tokens` if longer (`true`: it was cut), as a provider stops a
/// structured answer at the limit.
fn fit(mut text: String, max_tokens: u64) -> (String, u64, bool) {
    let tokens = (text.len() as u64).div_ceil(4).max(1);
    if tokens <= max_tokens {
        return (text, tokens, false);
    }
    let mut cut = usize::try_from(max_tokens.saturating_mul(4)).unwrap_or(usize::MAX).min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    (text, max_tokens, true)
}

impl super::json::Draw for SplitMix64 {
    fn next(&mut self) -> u64 {
        SplitMix64::next(self)
    }
    fn sentence(&mut self) -> String {
        pseudo_text(self, 1)
    }
}

/// A deterministic unit vector of `dimensions` numbers for `input`.
pub(super) fn embedding(model: &str, input: &str, dimensions: usize) -> Vec<f64> {
    let digest =
        Sha256::new().chain_update(model.as_bytes()).chain_update([0]).chain_update(input.as_bytes()).finalize();
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&digest[..8]);
    let mut rng = SplitMix64(u64::from_le_bytes(seed));
    let raw: Vec<f64> = (0..dimensions).map(|_| (rng.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0).collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
    raw.into_iter().map(|x| x / norm).collect()
}

/// A tiny, fast PRNG: the text only has to look varied, not be random.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "a",
    "to",
    "in",
    "is",
    "it",
    "that",
    "was",
    "for",
    "on",
    "with",
    "as",
    "at",
    "by",
    "from",
    "this",
    "they",
    "we",
    "river",
    "light",
    "city",
    "stone",
    "quiet",
    "morning",
    "signal",
    "garden",
    "window",
    "story",
    "engine",
    "harbor",
    "winter",
    "market",
    "letter",
    "bridge",
    "forest",
    "voice",
    "shadow",
    "careful",
    "bright",
    "slow",
    "ancient",
    "open",
    "small",
    "golden",
    "distant",
    "silver",
    "warm",
    "hidden",
    "walked",
    "found",
    "carried",
    "watched",
    "built",
    "remembered",
    "answered",
    "followed",
    "opened",
    "waited",
    "across",
    "beneath",
    "between",
    "toward",
    "after",
    "before",
    "until",
    "while",
    "because",
    "although",
];

/// Sentences of 5–14 words until at least `chars` characters.
fn pseudo_text(rng: &mut SplitMix64, chars: usize) -> String {
    let mut out = String::with_capacity(chars + 16);
    while out.len() < chars {
        if !out.is_empty() {
            out.push(' ');
        }
        let words = 5 + rng.next() % 10;
        for i in 0..words {
            let w = WORDS[(rng.next() % WORDS.len() as u64) as usize];
            if i == 0 {
                let mut cs = w.chars();
                if let Some(first) = cs.next() {
                    out.extend(first.to_uppercase());
                    out.push_str(cs.as_str());
                }
            } else {
                out.push(' ');
                out.push_str(w);
            }
        }
        out.push('.');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(content: &str, max_tokens: u64, temperature: Option<f64>) -> ChatCall {
        let body = json!({"model": "gpt-4o-mini", "max_tokens": max_tokens, "messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]});
        ChatCall {
            model: "gpt-4o-mini".into(),
            messages: vec![("system".into(), "Be brief.".into()), ("user".into(), content.into())],
            max_tokens,
            temperature,
            n: 1,
            stop: Vec::new(),
            seed: None,
            stream: None,
            reservation: Reservation::of_chat(body.as_object().unwrap(), max_tokens),
            response_format: None,
            tools: None,
            tool_choice: None,
        }
    }

    #[test]
    fn answers_are_repeatable_and_depend_on_every_input() {
        let a = call("Write a story.", 200, Some(0.7));
        assert_eq!(a.answer(), a.answer());
        let base = a.answer().choices[0].text();
        assert_eq!(a.answer().choices[0].text(), base);
        assert_ne!(call("Write a poem.", 200, Some(0.7)).answer().choices[0].text(), base);
        assert_ne!(call("Write a story.", 201, Some(0.7)).answer().choices[0].text(), base);
        assert_ne!(call("Write a story.", 200, Some(0.2)).answer().choices[0].text(), base);
        assert_eq!(call("x", 10, None).answer(), call("x", 10, Some(1.0)).answer());
        let mut other_model = a.clone();
        other_model.model = "gpt-4o".into();
        assert_ne!(other_model.answer().choices[0].text(), base);
    }

    #[test]
    fn token_count_is_in_range_and_text_is_about_four_chars_per_token() {
        for i in 0..200 {
            let c = call(&format!("prompt {i}"), 1 + i * 7, None).answer().choices.remove(0);
            let max = 1 + i * 7;
            assert!(c.tokens >= max.div_ceil(2) && c.tokens <= max, "{} not in range for {max}", c.tokens);
            assert_eq!(c.finish_reason == "length", c.tokens == max);
            let text = c.text();
            let len = text.len() as u64;
            assert!(len >= c.tokens * 4 && len < c.tokens * 4 + 200, "{len} chars for {} tokens", c.tokens);
            assert!(text.ends_with('.') && text.chars().next().is_some_and(|ch| ch.is_uppercase()));
        }
    }

    #[test]
    fn n_choices_differ_a_seed_changes_them_and_stop_cuts_them() {
        let mut c = call("Write a story.", 200, Some(0.7));
        let one = c.answer();
        c.n = 3;
        let three = c.answer();
        assert_eq!(three.choices.len(), 3);
        assert_eq!(three.choices[0], one.choices[0], "choice 0 is the answer without n");
        assert_ne!(three.choices[1].text(), three.choices[2].text());
        assert_eq!(three.tokens(), three.choices.iter().map(|c| c.tokens).sum::<u64>());
        c.n = 1;
        c.seed = Some(7);
        assert_ne!(c.answer().choices[0].text(), one.choices[0].text(), "a seed is part of the request");
        c.seed = None;
        c.stop = vec![". ".into()];
        let cut = c.answer().choices.remove(0);
        let text = cut.text();
        assert!(!text.contains(". ") && one.choices[0].text().starts_with(&text), "{text}");
        assert_eq!((cut.finish_reason, cut.tokens), ("stop", (text.len() as u64).div_ceil(4)));
    }

    #[test]
    fn a_json_schema_gets_conforming_json_counted_by_its_length_and_cut_at_max_tokens() {
        let schema = json!({"type": "object", "additionalProperties": false, "required": ["title", "scenes"],
            "properties": {"title": {"type": "string"}, "scenes": {"type": "array", "minItems": 5, "maxItems": 9,
                "items": {"type": "object", "properties": {"heading": {"type": "string"}, "n": {"type": "integer"}}}}}});
        let mut c = call("Outline it.", 3000, Some(0.7));
        c.response_format = Some(json!({"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}));
        let a = c.answer();
        assert_eq!(a, c.answer(), "the same request, the same document");
        let text = a.choices[0].text();
        let doc: Value = serde_json::from_str(&text).unwrap();
        super::super::json::tests::conforms(&doc, &schema, &schema).unwrap();
        assert_eq!((a.choices[0].tokens, a.choices[0].finish_reason), ((text.len() as u64).div_ceil(4), "stop"));
        assert_eq!(a.choices[0].message()["content"], json!(text));
        c.n = 2;
        let two = c.answer();
        assert_ne!(two.choices[0].text(), two.choices[1].text(), "each choice its own document");
        c.n = 1;
        c.max_tokens = 10;
        let cut = c.answer().choices.remove(0);
        assert_eq!((cut.tokens, cut.finish_reason), (10, "length"));
        assert!(cut.text().len() <= 40 && serde_json::from_str::<Value>(&cut.text()).is_err());
        let mut o = call("Answer in JSON.", 200, None);
        o.response_format = Some(json!({"type": "json_object"}));
        assert!(serde_json::from_str::<Value>(&o.answer().choices[0].text()).unwrap().is_object());
    }

    #[test]
    fn a_required_tool_choice_gets_a_call_with_conforming_arguments() {
        let params = json!({"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}});
        let mut c = call("Weather in Oban?", 200, None);
        c.tools = Some(json!([{"type": "function", "function": {"name": "forecast", "parameters": params}},
                              {"type": "function", "function": {"name": "other"}}]));
        assert!(c.answer().choices[0].tool_call.is_none(), "no tool_choice: text");
        c.tool_choice = Some(json!("auto"));
        assert!(c.answer().choices[0].tool_call.is_none(), "auto: this model answers in text");
        c.tool_choice = Some(json!({"type": "function", "function": {"name": "forecast"}}));
        let choice = c.answer().choices.remove(0);
        let m = choice.message();
        assert_eq!((m["content"].clone(), choice.finish_reason), (Value::Null, "tool_calls"));
        let f = &m["tool_calls"][0]["function"];
        assert_eq!(f["name"], "forecast");
        let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
        super::super::json::tests::conforms(&args, &params, &params).unwrap();
        assert!(m["tool_calls"][0]["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(choice.tokens, (f["arguments"].as_str().unwrap().len() as u64).div_ceil(4).max(1));
        c.tool_choice = Some(json!("required"));
        assert!(c.answer().choices[0].tool_call.is_some());
    }

    #[test]
    fn embeddings_are_repeatable_unit_vectors() {
        let a = embedding("e", "hello", 16);
        assert_eq!(a.len(), 16);
        assert_eq!(a, embedding("e", "hello", 16));
        assert_ne!(a, embedding("e", "hullo", 16));
        assert!((a.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn prompt_estimate_rounds_up() {
        // "Be brief." (9) + "abc" (3) = 12 chars.
        assert_eq!(call("abc", 1, None).prompt_tokens(4.0), 3);
        assert_eq!(call("abcd", 1, None).prompt_tokens(4.0), 4);
        assert_eq!(call("é", 1, None).prompt_tokens(10.0), 1);
    }
}
