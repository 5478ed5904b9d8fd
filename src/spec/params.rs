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

// ------------------------------------------------------------ field parsers

fn tokens(v: &Value, f: &str, cap: u32) -> Result<u32, SpecError> {
    integer(v, f, 1, u64::from(cap)).map(|t| t as u32)
}

fn integer(v: &Value, f: &str, min: u64, max: u64) -> Result<u64, SpecError> {
    let range = || SpecError::new(f, format!("must be an integer between {min} and {max}, got {v}"));
    let n = v.as_u64().ok_or_else(range)?;
    if !(min..=max).contains(&n) {
        return Err(range());
    }
    Ok(n)
}

fn number(v: &Value, f: &str, min: f64, max: f64) -> Result<f64, SpecError> {
    let x = v.as_f64().ok_or_else(|| SpecError::new(f, format!("must be a number between {min} and {max}")))?;
    if !(min..=max).contains(&x) {
        return Err(SpecError::new(f, format!("must be between {min} and {max}, got {v}")));
    }
    Ok(x)
}

fn boolean(v: &Value, f: &str) -> Result<bool, SpecError> {
    v.as_bool().ok_or_else(|| SpecError::new(f, "must be true or false"))
}

fn object<'v>(v: &'v Value, f: &str) -> Result<&'v Map<String, Value>, SpecError> {
    v.as_object().ok_or_else(|| SpecError::new(f, "must be a JSON object"))
}

fn string<'v>(v: &'v Value, f: &str) -> Result<&'v str, SpecError> {
    v.as_str().ok_or_else(|| SpecError::new(f, "must be a string"))
}

fn short_string(v: &Value, f: &str) -> Result<String, SpecError> {
    let s = string(v, f)?;
    let n = s.chars().count();
    if n == 0 || n > MAX_ID_STRING {
        return Err(SpecError::new(f, format!("must be 1 to {MAX_ID_STRING} characters, got {n}")));
    }
    Ok(s.to_owned())
}

/// Keys of an object that only `allowed` may be.
fn only_keys(m: &Map<String, Value>, f: &str, allowed: &[&str]) -> Result<(), SpecError> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => {
            Err(SpecError::new(format!("{f}.{k}"), format!("unknown field (expected one of {})", allowed.join(", "))))
        }
        None => Ok(()),
    }
}

/// OpenAI's rule for function and schema names.
pub(super) fn check_function_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(format!("must be 1 to 64 letters, digits, '_' or '-', got {s:?}"));
    }
    Ok(())
}

fn name(v: &Value, f: &str) -> Result<String, SpecError> {
    let s = string(v, f)?;
    check_function_name(s).map_err(|m| SpecError::new(f, m))?;
    Ok(s.to_owned())
}

fn logit_bias(v: &Value, f: &str) -> Result<BTreeMap<u32, serde_json::Number>, SpecError> {
    let mut out = BTreeMap::new();
    for (k, bias) in object(v, f)? {
        let fk = format!("{f}.{k}");
        let token = k
            .parse::<u32>()
            .ok()
            .filter(|t| &t.to_string() == k)
            .ok_or_else(|| SpecError::new(&fk, "a key is a token id: a decimal number"))?;
        number(bias, &fk, -100.0, 100.0)?;
        let Value::Number(n) = bias else { return Err(SpecError::new(fk, "must be a number")) };
        out.insert(token, n.clone());
    }
    Ok(out)
}

fn stop(v: &Value, f: &str) -> Result<Vec<String>, SpecError> {
    let list: Vec<String> = match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_str().map(str::to_owned).ok_or_else(|| SpecError::new(format!("{f}[{i}]"), "must be a string"))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(SpecError::new(f, "must be a string or an array of strings")),
    };
    if list.is_empty() || list.len() > MAX_STOP {
        return Err(SpecError::new(f, format!("must hold 1 to {MAX_STOP} sequences, got {}", list.len())));
    }
    if list.iter().any(String::is_empty) {
        return Err(SpecError::new(f, "a stop sequence must not be empty"));
    }
    Ok(list)
}

fn response_format(v: &Value, f: &str) -> Result<ResponseFormat, SpecError> {
    let m = object(v, f)?;
    let kind = string(
        m.get("type").ok_or_else(|| SpecError::new(format!("{f}.type"), "required field is missing"))?,
        &format!("{f}.type"),
    )?;
    match kind {
        "text" | "json_object" => {
            only_keys(m, f, &["type"])?;
            Ok(if kind == "text" { ResponseFormat::Text } else { ResponseFormat::JsonObject })
        }
        "json_schema" => {
            only_keys(m, f, &["type", "json_schema"])?;
            let fj = format!("{f}.json_schema");
            let js =
                object(m.get("json_schema").ok_or_else(|| SpecError::new(&fj, "required field is missing"))?, &fj)?;
            only_keys(js, &fj, &["name", "description", "schema", "strict"])?;
            let field = |k: &str| format!("{fj}.{k}");
            let name = name(
                js.get("name").ok_or_else(|| SpecError::new(field("name"), "required field is missing"))?,
                &field("name"),
            )?;
            let description =
                js.get("description").map(|d| string(d, &field("description")).map(str::to_owned)).transpose()?;
            let schema = js.get("schema").ok_or_else(|| {
                SpecError::new(field("schema"), "required field is missing: the JSON Schema the output follows")
            })?;
            let schema = object(schema, &field("schema"))?.clone();
            let strict = js.get("strict").map(|s| boolean(s, &field("strict"))).transpose()?;
            Ok(ResponseFormat::JsonSchema(JsonSchemaFormat { name, description, schema, strict }))
        }
        other => Err(SpecError::new(
            format!("{f}.type"),
            format!("must be one of text, json_object, json_schema, got {other:?}"),
        )),
    }
}

fn tools(v: &Value, f: &str) -> Result<Vec<Tool>, SpecError> {
    let items = v.as_array().ok_or_else(|| SpecError::new(f, "must be an array of tools"))?;
    if items.is_empty() || items.len() > MAX_TOOLS {
        return Err(SpecError::new(f, format!("must hold 1 to {MAX_TOOLS} tools, got {}", items.len())));
    }
    let mut out: Vec<Tool> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let ft = format!("{f}[{i}]");
        let m = object(item, &ft)?;
        only_keys(m, &ft, &["type", "function"])?;
        if m.get("type").and_then(Value::as_str) != Some("function") {
            return Err(SpecError::new(format!("{ft}.type"), "must be \"function\""));
        }
        let ff = format!("{ft}.function");
        let func = object(m.get("function").ok_or_else(|| SpecError::new(&ff, "required field is missing"))?, &ff)?;
        only_keys(func, &ff, &["name", "description", "parameters", "strict"])?;
        let fname = format!("{ff}.name");
        let tool = Tool {
            name: name(func.get("name").ok_or_else(|| SpecError::new(&fname, "required field is missing"))?, &fname)?,
            description: func
                .get("description")
                .map(|d| string(d, &format!("{ff}.description")).map(str::to_owned))
                .transpose()?,
            parameters: func.get("parameters").map(|p| object(p, &format!("{ff}.parameters")).cloned()).transpose()?,
            strict: func.get("strict").map(|s| boolean(s, &format!("{ff}.strict"))).transpose()?,
        };
        if let Some(first) = out.iter().position(|t| t.name == tool.name) {
            return Err(SpecError::new(
                fname,
                format!("duplicate tool name \"{}\" (first used by {f}[{first}])", tool.name),
            ));
        }
        out.push(tool);
    }
    Ok(out)
}

fn tool_choice(v: &Value, f: &str) -> Result<ToolChoice, SpecError> {
    match v {
        Value::String(s) => match s.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            other => Err(SpecError::new(f, format!("must be none, auto, required or a function, got {other:?}"))),
        },
        Value::Object(m) => {
            only_keys(m, f, &["type", "function"])?;
            if m.get("type").and_then(Value::as_str) != Some("function") {
                return Err(SpecError::new(format!("{f}.type"), "must be \"function\""));
            }
            let ff = format!("{f}.function");
            let func = object(m.get("function").ok_or_else(|| SpecError::new(&ff, "required field is missing"))?, &ff)?;
            only_keys(func, &ff, &["name"])?;
            let fname = format!("{ff}.name");
            Ok(ToolChoice::Function(name(
                func.get("name").ok_or_else(|| SpecError::new(&fname, "required field is missing"))?,
                &fname,
            )?))
        }
        _ => Err(SpecError::new(
            f,
            "must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}",
        )),
    }
}

fn metadata(v: &Value, f: &str) -> Result<BTreeMap<String, String>, SpecError> {
    let m = object(v, f)?;
    if m.len() > MAX_METADATA {
        return Err(SpecError::new(f, format!("has {} pairs, more than the limit of {MAX_METADATA}", m.len())));
    }
    let mut out = BTreeMap::new();
    for (k, value) in m {
        let fk = format!("{f}.{k}");
        if k.is_empty() || k.chars().count() > MAX_METADATA_KEY {
            return Err(SpecError::new(fk, format!("a key is 1 to {MAX_METADATA_KEY} characters")));
        }
        let s = string(value, &fk)?;
        if s.chars().count() > MAX_METADATA_VALUE {
            return Err(SpecError::new(fk, format!("a value is at most {MAX_METADATA_VALUE} characters")));
        }
        out.insert(k.clone(), s.to_owned());
    }
    Ok(out)
}

fn extra(v: &Value, f: &str) -> Result<Map<String, Value>, SpecError> {
    let m = object(v, f)?;
    if let Some(k) = m.keys().find(|k| FIELDS.contains(&k.as_str()) || RESERVED.contains(&k.as_str())) {
        let why = if RESERVED.contains(&k.as_str()) {
            "ratepool sets this field itself".to_owned()
        } else {
            format!("is a known field: set it as `{k}` on the step or in defaults")
        };
        return Err(SpecError::new(format!("{f}.{k}"), why));
    }
    Ok(m.clone())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(v: Value) -> Result<ChatParams, SpecError> {
        ChatParams::parse(v.as_object().unwrap(), "steps[0]", 131_072)
    }

    #[track_caller]
    fn refused(v: Value, field: &str, needle: &str) {
        let e = parse(v).expect_err("refused");
        assert_eq!(e.field, field, "{e}");
        assert!(e.message.contains(needle), "{e}");
    }

    #[test]
    fn every_field_parses_and_writes_back_the_same() {
        let all = json!({
            "max_completion_tokens": 900, "temperature": 0.8, "top_p": 0.95, "frequency_penalty": -0.5,
            "presence_penalty": 1.5, "logit_bias": {"50256": -100, "1": 2.5}, "logprobs": true, "top_logprobs": 5,
            "n": 3, "stop": ["\n\n", "END"], "seed": -42,
            "response_format": {"type": "json_schema", "json_schema": {"name": "outline", "description": "d", "strict": true,
                "schema": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": false}}},
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "x", "strict": false,
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": false, "reasoning_effort": "low", "service_tier": "flex", "verbosity": "high",
            "store": false, "user": "u-1", "safety_identifier": "s", "prompt_cache_key": "k",
            "metadata": {"team": "screenplays"}, "extra": {"x_vendor": {"a": [1]}}
        });
        let p = parse(all.clone()).unwrap();
        assert_eq!(Value::Object(p.stored_fields()), all, "the stored form is what was written");
        let mut body = all.as_object().unwrap().clone();
        let extra = body.remove("extra").unwrap();
        body.extend(extra.as_object().unwrap().clone());
        assert_eq!(p.body_fields(), body, "the body carries extra's fields beside the known ones");
        p.check_merged(&|f| f.to_owned()).unwrap();
        assert_eq!(p.allowance(), 900);
        // Reading what was stored gives the same value back.
        assert_eq!(ChatParams::parse(&p.stored_fields(), "s", 131_072).unwrap(), p);
        // A single stop string is a list of one.
        assert_eq!(parse(json!({"stop": "END"})).unwrap().stop, Some(vec!["END".to_owned()]));
    }

    #[test]
    fn each_field_is_checked_for_type_and_range_naming_it() {
        refused(json!({"temperature": 2.5}), "steps[0].temperature", "between 0 and 2");
        refused(json!({"temperature": "hot"}), "steps[0].temperature", "must be a number");
        refused(json!({"top_p": 1.01}), "steps[0].top_p", "between 0 and 1");
        refused(json!({"frequency_penalty": -2.1}), "steps[0].frequency_penalty", "between -2 and 2");
        refused(json!({"presence_penalty": 3}), "steps[0].presence_penalty", "between -2 and 2");
        refused(json!({"max_tokens": 0}), "steps[0].max_tokens", "between 1 and 131072");
        refused(json!({"max_completion_tokens": 1.5}), "steps[0].max_completion_tokens", "an integer");
        refused(json!({"max_tokens": 5, "max_completion_tokens": 5}), "steps[0].max_completion_tokens", "not both");
        refused(json!({"n": 0}), "steps[0].n", "between 1 and 16");
        refused(json!({"n": 17}), "steps[0].n", "between 1 and 16");
        refused(json!({"top_logprobs": 21}), "steps[0].top_logprobs", "between 0 and 20");
        refused(json!({"logprobs": "yes"}), "steps[0].logprobs", "true or false");
        refused(json!({"logit_bias": {"abc": 1}}), "steps[0].logit_bias.abc", "token id");
        refused(json!({"logit_bias": {"007": 1}}), "steps[0].logit_bias.007", "token id");
        refused(json!({"logit_bias": {"7": 101}}), "steps[0].logit_bias.7", "between -100 and 100");
        refused(json!({"logit_bias": [1]}), "steps[0].logit_bias", "JSON object");
        refused(json!({"stop": []}), "steps[0].stop", "1 to 4");
        refused(json!({"stop": ["a", "b", "c", "d", "e"]}), "steps[0].stop", "1 to 4");
        refused(json!({"stop": [""]}), "steps[0].stop", "must not be empty");
        refused(json!({"stop": [1]}), "steps[0].stop[0]", "a string");
        refused(json!({"seed": 1.5}), "steps[0].seed", "an integer");
        refused(json!({"seed": u64::MAX}), "steps[0].seed", "an integer");
        refused(json!({"reasoning_effort": "max"}), "steps[0].reasoning_effort", "one of none, minimal");
        refused(json!({"service_tier": "gold"}), "steps[0].service_tier", "one of auto, default");
        refused(json!({"verbosity": 1}), "steps[0].verbosity", "a string");
        refused(json!({"user": ""}), "steps[0].user", "1 to 512");
        refused(json!({"metadata": {"k": 1}}), "steps[0].metadata.k", "a string");
        let many: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        refused(json!({"metadata": many}), "steps[0].metadata", "more than the limit of 16");
        refused(
            json!({"metadata": {"x".repeat(65): "v"}}),
            &format!("steps[0].metadata.{}", "x".repeat(65)),
            "1 to 64",
        );
        refused(json!({"metadata": {"k": "v".repeat(513)}}), "steps[0].metadata.k", "at most 512");
        refused(json!({"stream": true}), "steps[0].stream", "read whole");
        refused(json!({"respones_format": {}}), "steps[0].respones_format", "unknown field");
        refused(json!({"extra": {"temperature": 1}}), "steps[0].extra.temperature", "known field");
        refused(json!({"extra": {"messages": []}}), "steps[0].extra.messages", "sets this field itself");
        refused(json!({"extra": {"stream": true}}), "steps[0].extra.stream", "sets this field itself");
        refused(json!({"extra": 1}), "steps[0].extra", "JSON object");
    }

    #[test]
    fn response_format_tools_and_tool_choice_are_checked_to_the_field() {
        let rf = |v: Value| json!({"response_format": v});
        refused(rf(json!({"type": "xml"})), "steps[0].response_format.type", "text, json_object, json_schema");
        refused(rf(json!({})), "steps[0].response_format.type", "missing");
        refused(rf(json!({"type": "json_schema"})), "steps[0].response_format.json_schema", "missing");
        refused(
            rf(json!({"type": "json_schema", "json_schema": {"name": "o"}})),
            "steps[0].response_format.json_schema.schema",
            "missing",
        );
        refused(
            rf(json!({"type": "json_schema", "json_schema": {"name": "o", "schema": []}})),
            "steps[0].response_format.json_schema.schema",
            "JSON object",
        );
        refused(
            rf(json!({"type": "json_schema", "json_schema": {"name": "o o", "schema": {}}})),
            "steps[0].response_format.json_schema.name",
            "letters, digits",
        );
        refused(
            rf(json!({"type": "json_schema", "json_schema": {"name": "o", "schema": {}, "strict": 1}})),
            "steps[0].response_format.json_schema.strict",
            "true or false",
        );
        refused(
            rf(json!({"type": "json_schema", "json_schema": {"name": "o", "schema": {}, "x": 1}})),
            "steps[0].response_format.json_schema.x",
            "unknown field",
        );
        refused(
            rf(json!({"type": "text", "json_schema": {}})),
            "steps[0].response_format.json_schema",
            "unknown field",
        );
        let tool = |name: &str| json!({"type": "function", "function": {"name": name}});
        refused(json!({"tools": []}), "steps[0].tools", "1 to 128");
        refused(json!({"tools": [{"type": "retrieval"}]}), "steps[0].tools[0].type", "\"function\"");
        refused(json!({"tools": [tool("a b")]}), "steps[0].tools[0].function.name", "letters, digits");
        refused(json!({"tools": [tool(&"x".repeat(65))]}), "steps[0].tools[0].function.name", "1 to 64");
        refused(json!({"tools": [tool("a"), tool("a")]}), "steps[0].tools[1].function.name", "duplicate tool name");
        refused(
            json!({"tools": [{"type": "function", "function": {"name": "a", "parameters": "x"}}]}),
            "steps[0].tools[0].function.parameters",
            "JSON object",
        );
        refused(json!({"tool_choice": "sometimes"}), "steps[0].tool_choice", "none, auto, required");
        refused(
            json!({"tool_choice": {"type": "function", "function": {}}}),
            "steps[0].tool_choice.function.name",
            "missing",
        );
    }

    #[test]
    fn merged_fields_are_checked_together_naming_where_each_was_set() {
        let d = parse(json!({"max_tokens": 400, "temperature": 0.8, "tools": [{"type": "function", "function": {"name": "a"}}], "extra": {"k": 1, "j": 2}})).unwrap();
        let s = parse(json!({"max_completion_tokens": 900, "tool_choice": {"type": "function", "function": {"name": "b"}}, "extra": {"k": 3}})).unwrap();
        let m = ChatParams::merged(&s, &d);
        assert_eq!((m.max_tokens, m.max_completion_tokens, m.temperature), (None, Some(900), Some(0.8)));
        assert_eq!(m.extra, json!({"k": 3, "j": 2}).as_object().unwrap().clone());
        let origin = |f: &str| {
            if s.tool_choice.is_some() && f == "tool_choice" {
                format!("steps[1].{f}")
            } else {
                format!("defaults.{f}")
            }
        };
        let e = m.check_merged(&origin).unwrap_err();
        assert_eq!(e.field, "steps[1].tool_choice");
        assert!(e.message.contains("not among the tools (a)"), "{e}");
        let e = parse(json!({"top_logprobs": 2})).unwrap().check_merged(&|f| f.into()).unwrap_err();
        assert_eq!((e.field.as_str(), e.message.as_str()), ("top_logprobs", "needs \"logprobs\": true"));
        let e = parse(json!({"tool_choice": "auto"})).unwrap().check_merged(&|f| f.into()).unwrap_err();
        assert_eq!(e.field, "tool_choice");
        let e = parse(json!({"parallel_tool_calls": true})).unwrap().check_merged(&|f| f.into()).unwrap_err();
        assert_eq!(e.field, "parallel_tool_calls");
        assert_eq!(ChatParams::default().allowance(), DEFAULT_MAX_TOKENS);
        assert_eq!(ChatParams::default().body_fields(), json!({"max_tokens": 512}).as_object().unwrap().clone());
        assert!(ChatParams::default().stored_fields().is_empty());
    }
}
