//! A step's chat-completions request fields (everything but `model` and
//! `messages`), parsed once into typed, range-checked values.
//!
//! The same fields may stand on a step and in `defaults`; each is checked
//! where it was written, with that path in the error
//! (`steps[3].response_format.json_schema.schema`, `defaults.top_p`), then
//! the step's value replaces the default's field by field ([`ChatParams::merged`])
//! and the rules that tie fields together are checked on the result. The
//! ranges are OpenAI's documented ones. Provider-specific fields go in
//! `extra`, which may not repeat a known field. [`ChatParams::fields`]
//! writes the fields back in their wire form: into the request body, and
//! into the stored spec (which re-reads to the same value).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::SpecError;
use fields::{
    boolean, extra, integer, logit_bias, metadata, number, response_format, short_string, stop, tokens, tool_choice,
    tools,
};

mod fields;
#[cfg(test)]
mod tests;

pub(super) use fields::check_function_name;

/// Used when neither the step nor `defaults` sets an allowance.
pub const DEFAULT_MAX_TOKENS: u32 = 512;
/// A step's reservation is its allowance times `n`, so `n` is kept small;
/// OpenAI allows up to 128.
pub const MAX_N: u64 = 16;
const MAX_STOP: usize = 4;
const MAX_TOP_LOGPROBS: u64 = 20;
const MAX_TOOLS: usize = 128;
const MAX_METADATA: usize = 16;
const MAX_METADATA_KEY: usize = 64;
const MAX_METADATA_VALUE: usize = 512;
/// `user`, `safety_identifier`, `prompt_cache_key`: identifiers, kept to
/// the length of a metadata value.
const MAX_ID_STRING: usize = 512;

/// Every request field a step or `defaults` may set, besides `model`
/// (which `defaults` may set too) and `extra`.
pub const FIELDS: &[&str] = &[
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "n",
    "stop",
    "seed",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_effort",
    "service_tier",
    "verbosity",
    "store",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "metadata",
];

/// Fields `extra` may not set besides [`FIELDS`]: ratepool writes them
/// itself, and a step's answer is read whole, never streamed.
const RESERVED: &[&str] = &["model", "messages", "stream", "stream_options"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseKind {
    Text,
    JsonObject,
    JsonSchema,
}

/// `response_format`.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema(JsonSchemaFormat),
}

#[derive(Debug, Clone, PartialEq)]
pub struct JsonSchemaFormat {
    pub name: String,
    pub description: Option<String>,
    /// A JSON object; its contents are the provider's to judge, but paths
    /// into the output are checked against it (`super::schema`).
    pub schema: Map<String, Value>,
    pub strict: Option<bool>,
}

impl ResponseFormat {
    pub fn kind(&self) -> ResponseKind {
        match self {
            Self::Text => ResponseKind::Text,
            Self::JsonObject => ResponseKind::JsonObject,
            Self::JsonSchema(_) => ResponseKind::JsonSchema,
        }
    }

    /// The schema the output conforms to, for a `json_schema` format.
    pub fn schema(&self) -> Option<&Map<String, Value>> {
        match self {
            Self::JsonSchema(f) => Some(&f.schema),
            _ => None,
        }
    }
}

/// One declared function tool.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Option<Map<String, Value>>,
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Function(String),
}

/// A closed set of strings, as the provider documents it.
macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $s:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($variant),* }
        impl $name {
            const ALL: &'static [($name, &'static str)] = &[$(($name::$variant, $s)),*];
            pub fn as_str(self) -> &'static str {
                Self::ALL.iter().find(|(v, _)| *v == self).map_or("", |(_, s)| s)
            }
            fn parse(v: &Value, field: &str) -> Result<Self, SpecError> {
                let s = v.as_str().ok_or_else(|| SpecError::new(field, "must be a string"))?;
                Self::ALL.iter().find(|(_, name)| *name == s).map(|(v, _)| *v).ok_or_else(|| {
                    let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
                    SpecError::new(field, format!("must be one of {}, got {s:?}", names.join(", ")))
                })
            }
        }
    };
}

string_enum!(
    /// `reasoning_effort`, for reasoning models.
    ReasoningEffort { None = "none", Minimal = "minimal", Low = "low", Medium = "medium", High = "high", XHigh = "xhigh" }
);
string_enum!(
    /// `service_tier`.
    ServiceTier { Auto = "auto", Default = "default", Flex = "flex", Scale = "scale", Priority = "priority" }
);
string_enum!(
    /// `verbosity`.
    Verbosity { Low = "low", Medium = "medium", High = "high" }
);

/// The request fields of one step (or of `defaults`): `None` is unset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatParams {
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    /// Token id → bias; kept as written (`serde_json::Number`) so the
    /// stored form round-trips exactly.
    pub logit_bias: Option<BTreeMap<u32, serde_json::Number>>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u8>,
    pub n: Option<u8>,
    pub stop: Option<Vec<String>>,
    pub seed: Option<i64>,
    pub response_format: Option<ResponseFormat>,
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    pub reasoning_effort: Option<ReasoningEffort>,
    pub service_tier: Option<ServiceTier>,
    pub verbosity: Option<Verbosity>,
    pub store: Option<bool>,
    pub user: Option<String>,
    pub safety_identifier: Option<String>,
    pub prompt_cache_key: Option<String>,
    pub metadata: Option<BTreeMap<String, String>>,
    /// Provider-specific fields, forwarded as they are.
    pub extra: Map<String, Value>,
}

impl ChatParams {
    /// Reads the request fields of one object. `fields` holds every key of
    /// the object that is not one of its own (`id`, `messages`, …);
    /// `at` is the object's path (`steps[3]`, `defaults`). An unknown key is
    /// refused, naming it.
    pub fn parse(fields: &Map<String, Value>, at: &str, max_tokens_cap: u32) -> Result<Self, SpecError> {
        let mut p = ChatParams::default();
        for (key, v) in fields {
            // An empty key names the object that holds it.
            let f = if key.is_empty() { at.to_owned() } else { format!("{at}.{key}") };
            match key.as_str() {
                "max_tokens" => p.max_tokens = Some(tokens(v, &f, max_tokens_cap)?),
                "max_completion_tokens" => p.max_completion_tokens = Some(tokens(v, &f, max_tokens_cap)?),
                "temperature" => p.temperature = Some(number(v, &f, 0.0, 2.0)?),
                "top_p" => p.top_p = Some(number(v, &f, 0.0, 1.0)?),
                "frequency_penalty" => p.frequency_penalty = Some(number(v, &f, -2.0, 2.0)?),
                "presence_penalty" => p.presence_penalty = Some(number(v, &f, -2.0, 2.0)?),
                "logit_bias" => p.logit_bias = Some(logit_bias(v, &f)?),
                "logprobs" => p.logprobs = Some(boolean(v, &f)?),
                "top_logprobs" => p.top_logprobs = Some(integer(v, &f, 0, MAX_TOP_LOGPROBS)? as u8),
                "n" => p.n = Some(integer(v, &f, 1, MAX_N)? as u8),
                "stop" => p.stop = Some(stop(v, &f)?),
                "seed" => {
                    p.seed = Some(v.as_i64().ok_or_else(|| SpecError::new(&f, "must be an integer (64-bit, signed)"))?)
                }
                "response_format" => p.response_format = Some(response_format(v, &f)?),
                "tools" => p.tools = Some(tools(v, &f)?),
                "tool_choice" => p.tool_choice = Some(tool_choice(v, &f)?),
                "parallel_tool_calls" => p.parallel_tool_calls = Some(boolean(v, &f)?),
                "reasoning_effort" => p.reasoning_effort = Some(ReasoningEffort::parse(v, &f)?),
                "service_tier" => p.service_tier = Some(ServiceTier::parse(v, &f)?),
                "verbosity" => p.verbosity = Some(Verbosity::parse(v, &f)?),
                "store" => p.store = Some(boolean(v, &f)?),
                "user" => p.user = Some(short_string(v, &f)?),
                "safety_identifier" => p.safety_identifier = Some(short_string(v, &f)?),
                "prompt_cache_key" => p.prompt_cache_key = Some(short_string(v, &f)?),
                "metadata" => p.metadata = Some(metadata(v, &f)?),
                "extra" => p.extra = extra(v, &f)?,
                "stream" | "stream_options" => {
                    return Err(SpecError::new(
                        f,
                        "a step's answer is read whole; streaming is not available on a step",
                    ));
                }
                other => {
                    return Err(SpecError::new(
                        f,
                        format!(
                            "unknown field `{other}`; a chat-completions field ratepool does not know goes in `extra`"
                        ),
                    ));
                }
            }
        }
        if p.max_tokens.is_some() && p.max_completion_tokens.is_some() {
            return Err(SpecError::new(
                format!("{at}.max_completion_tokens"),
                "set max_tokens or max_completion_tokens, not both",
            ));
        }
        Ok(p)
    }

    /// The step's fields over the defaults', field by field; `extra` is
    /// merged key by key. The completion allowance counts as one field:
    /// a step's `max_completion_tokens` replaces a default `max_tokens`.
    pub fn merged(step: &ChatParams, defaults: &ChatParams) -> ChatParams {
        let (max_tokens, max_completion_tokens) = if step.max_tokens.is_some() || step.max_completion_tokens.is_some() {
            (step.max_tokens, step.max_completion_tokens)
        } else {
            (defaults.max_tokens, defaults.max_completion_tokens)
        };
        let mut extra = defaults.extra.clone();
        extra.extend(step.extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        macro_rules! or {
            ($($f:ident),*) => { ChatParams { max_tokens, max_completion_tokens, extra, $($f: step.$f.clone().or_else(|| defaults.$f.clone())),* } };
        }
        or!(
            temperature,
            top_p,
            frequency_penalty,
            presence_penalty,
            logit_bias,
            logprobs,
            top_logprobs,
            n,
            stop,
            seed,
            response_format,
            tools,
            tool_choice,
            parallel_tool_calls,
            reasoning_effort,
            service_tier,
            verbosity,
            store,
            user,
            safety_identifier,
            prompt_cache_key,
            metadata
        )
    }

    /// The rules between fields, on the merged value; `origin` names where
    /// a field was set (`steps[2].tool_choice` or `defaults.tool_choice`).
    pub fn check_merged(&self, origin: &dyn Fn(&str) -> String) -> Result<(), SpecError> {
        if self.top_logprobs.is_some() && self.logprobs != Some(true) {
            return Err(SpecError::new(origin("top_logprobs"), "needs \"logprobs\": true"));
        }
        if self.parallel_tool_calls.is_some() && self.tools.is_none() {
            return Err(SpecError::new(origin("parallel_tool_calls"), "is only allowed with tools"));
        }
        match (&self.tool_choice, &self.tools) {
            (None, _) => {}
            (Some(_), None) => return Err(SpecError::new(origin("tool_choice"), "is only allowed with tools")),
            (Some(ToolChoice::Function(name)), Some(tools)) if !tools.iter().any(|t| &t.name == name) => {
                let declared: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
                return Err(SpecError::new(
                    origin("tool_choice"),
                    format!("names function \"{name}\", which is not among the tools ({})", declared.join(", ")),
                ));
            }
            (Some(_), Some(_)) => {}
        }
        Ok(())
    }

    /// What a call reserves per choice: `max_completion_tokens`, else
    /// `max_tokens`, else the default.
    pub fn allowance(&self) -> u32 {
        self.max_completion_tokens.or(self.max_tokens).unwrap_or(DEFAULT_MAX_TOKENS)
    }

    /// What the request body carries: every set field in its wire form,
    /// an unset allowance as `max_tokens` (so the provider and the ledger
    /// reserve the same), and `extra`'s fields beside them (they never
    /// collide).
    pub fn body_fields(&self) -> Map<String, Value> {
        let mut m = self.fields(true);
        m.extend(self.extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        m
    }

    /// What the stored spec keeps: every set field in its wire form, and
    /// `extra` as `extra`; [`ChatParams::parse`] reads it back unchanged.
    pub fn stored_fields(&self) -> Map<String, Value> {
        let mut m = self.fields(false);
        if !self.extra.is_empty() {
            m.insert("extra".into(), Value::Object(self.extra.clone()));
        }
        m
    }

    /// Every set field but `extra` in its wire form; with `with_default`,
    /// an unset allowance as `max_tokens`.
    fn fields(&self, with_default: bool) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_owned(), v);
        };
        match (self.max_tokens, self.max_completion_tokens) {
            (_, Some(t)) => put("max_completion_tokens", t.into()),
            (Some(t), None) => put("max_tokens", t.into()),
            (None, None) if with_default => put("max_tokens", DEFAULT_MAX_TOKENS.into()),
            (None, None) => {}
        }
        let float = |f: f64| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number);
        for (k, v) in [
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if let Some(v) = v {
                put(k, float(v));
            }
        }
        if let Some(b) = &self.logit_bias {
            put("logit_bias", b.iter().map(|(k, v)| (k.to_string(), Value::Number(v.clone()))).collect());
        }
        for (k, v) in
            [("logprobs", self.logprobs), ("parallel_tool_calls", self.parallel_tool_calls), ("store", self.store)]
        {
            if let Some(v) = v {
                put(k, v.into());
            }
        }
        if let Some(v) = self.top_logprobs {
            put("top_logprobs", v.into());
        }
        if let Some(v) = self.n {
            put("n", v.into());
        }
        if let Some(v) = &self.stop {
            put("stop", v.clone().into());
        }
        if let Some(v) = self.seed {
            put("seed", v.into());
        }
        if let Some(f) = &self.response_format {
            put("response_format", response_format_json(f));
        }
        if let Some(tools) = &self.tools {
            put("tools", tools.iter().map(tool_json).collect());
        }
        if let Some(c) = &self.tool_choice {
            put(
                "tool_choice",
                match c {
                    ToolChoice::None => "none".into(),
                    ToolChoice::Auto => "auto".into(),
                    ToolChoice::Required => "required".into(),
                    ToolChoice::Function(name) => serde_json::json!({"type": "function", "function": {"name": name}}),
                },
            );
        }
        if let Some(v) = self.reasoning_effort {
            put("reasoning_effort", v.as_str().into());
        }
        if let Some(v) = self.service_tier {
            put("service_tier", v.as_str().into());
        }
        if let Some(v) = self.verbosity {
            put("verbosity", v.as_str().into());
        }
        for (k, v) in [
            ("user", &self.user),
            ("safety_identifier", &self.safety_identifier),
            ("prompt_cache_key", &self.prompt_cache_key),
        ] {
            if let Some(v) = v {
                put(k, v.as_str().into());
            }
        }
        if let Some(md) = &self.metadata {
            put("metadata", md.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect());
        }
        m
    }
}

fn response_format_json(f: &ResponseFormat) -> Value {
    match f {
        ResponseFormat::Text => serde_json::json!({"type": "text"}),
        ResponseFormat::JsonObject => serde_json::json!({"type": "json_object"}),
        ResponseFormat::JsonSchema(s) => {
            let mut js = Map::new();
            js.insert("name".into(), s.name.as_str().into());
            if let Some(d) = &s.description {
                js.insert("description".into(), d.as_str().into());
            }
            js.insert("schema".into(), Value::Object(s.schema.clone()));
            if let Some(strict) = s.strict {
                js.insert("strict".into(), strict.into());
            }
            serde_json::json!({"type": "json_schema", "json_schema": js})
        }
    }
}

fn tool_json(t: &Tool) -> Value {
    let mut f = Map::new();
    f.insert("name".into(), t.name.as_str().into());
    if let Some(d) = &t.description {
        f.insert("description".into(), d.as_str().into());
    }
    if let Some(p) = &t.parameters {
        f.insert("parameters".into(), Value::Object(p.clone()));
    }
    if let Some(s) = t.strict {
        f.insert("strict".into(), s.into());
    }
    serde_json::json!({"type": "function", "function": f})
}
