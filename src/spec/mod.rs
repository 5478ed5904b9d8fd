//! The job spec: what a client submits to `POST /v1/jobs`, parsed and
//! validated whole before anything is stored.
//!
//! [`JobSpec::parse`] turns a request body into a [`JobSpec`] or a
//! [`SpecError`] that names the offending field (`steps[3].messages[0].content`),
//! so the API can answer 400 with something a user can act on. A validated
//! spec has every default resolved, every template parsed and every
//! dependency as an index, and is known to be acyclic; the engine never
//! re-checks any of it. [`JobSpec::to_stored`] / [`JobSpec::from_stored`] are
//! the canonical form kept with the job, re-read by whichever worker runs it.
//!
//! - [`template`]: the `{{inputs.NAME}}` / `{{steps.ID.output}}` syntax.
//! - [`dag`]: cycle detection and the "which steps may run now" query.

mod dag;
pub mod template;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::domain::{ModelName, Priority, StepId};

pub use template::{RenderError, Template, TemplateError};

/// Used when neither the step nor `defaults` sets `max_tokens`.
const DEFAULT_MAX_TOKENS: u32 = 512;
/// Used when neither the step nor `defaults` sets `temperature`; the
/// provider's own default, so omitting it changes nothing.
const DEFAULT_TEMPERATURE: f32 = 1.0;
const MAX_NAME_CHARS: usize = 200;
const MAX_PARALLEL: u32 = 64;
const MAX_CACHE_TTL_SECS: u64 = 30 * 24 * 3600;
const MAX_FALLBACK_AFTER_SECS: u64 = 3600;
const MAX_WEBHOOK_URL_BYTES: usize = 2048;

/// Size limits on a submitted spec. They bound what one request can make the
/// service store, schedule and send, whatever the client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecLimits {
    pub max_body_bytes: usize,
    pub max_steps: usize,
    pub max_messages_per_step: usize,
    /// Per message template, before rendering.
    pub max_template_bytes: usize,
    pub max_inputs: usize,
    /// Per input value.
    pub max_input_bytes: usize,
    /// Per rendered message; not checked here (outputs are unknown at
    /// submission) but passed by the engine to [`Template::render`].
    pub max_rendered_bytes: usize,
    pub max_tokens_cap: u32,
}

impl Default for SpecLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_steps: 500,
            max_messages_per_step: 32,
            max_template_bytes: 64 << 10,
            max_inputs: 64,
            max_input_bytes: 256 << 10,
            max_rendered_bytes: 2 << 20,
            max_tokens_cap: 131_072,
        }
    }
}

/// A refused spec: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// A path into the submitted JSON (`steps[2].depends_on[0]`), or `body`
    /// when the body as a whole is wrong.
    pub field: String,
    pub message: String,
}

impl SpecError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// Who says a message, as the chat API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MessageTemplate {
    pub role: Role,
    pub content: Template,
}

/// One LLM call, with every default resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: StepId,
    pub messages: Vec<MessageTemplate>,
    pub model: ModelName,
    pub max_tokens: u32,
    pub temperature: f32,
    /// Indices into [`JobSpec::steps`] of every step this one waits for
    /// (template references and `depends_on`), ascending, without repeats.
    pub deps: Vec<usize>,
    /// Served from the response cache when the same request was answered
    /// before (the step's `cache`, else the job's; off by default).
    pub cache: bool,
    /// `"tier": "cheap"`: run on the fallback orgs (self-hosted models).
    pub tier: Tier,
}

impl Step {
    /// The chat-completions body the provider is sent for this step, with
    /// its messages rendered (`{"role", "content"}` objects).
    pub fn body(&self, messages: Vec<serde_json::Value>) -> serde_json::Map<String, serde_json::Value> {
        let mut body = serde_json::Map::new();
        body.insert("model".into(), self.model.as_str().into());
        body.insert("messages".into(), messages.into());
        body.insert("max_tokens".into(), self.max_tokens.into());
        body.insert("temperature".into(), wire_f32(self.temperature));
        body
    }
}

/// An `f32` as the JSON number a person wrote (`0.8`, not
/// `0.800000011920929`): through its shortest decimal form.
fn wire_f32(v: f32) -> serde_json::Value {
    v.to_string().parse::<f64>().map_or(serde_json::Value::Null, serde_json::Value::from)
}

/// Where a step may run: `standard` on the primary orgs (falling back only
/// when they have no capacity in time), `cheap` on the fallback orgs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    #[default]
    Standard,
    Cheap,
}

impl Tier {
    fn is_standard(&self) -> bool {
        *self == Tier::Standard
    }
}

/// A validated job spec; see the module doc.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub name: String,
    pub priority: Priority,
    pub inputs: BTreeMap<String, String>,
    /// Per-job cap on steps in flight, if the client set one.
    pub max_parallel: Option<u32>,
    /// How long this job's answers stay in the response cache, if the
    /// client chose (else the configured default).
    pub cache_ttl_secs: Option<u64>,
    /// How long a step waits for a primary org before a fallback org may
    /// take it, if the client chose (else the configured default).
    pub fallback_after_secs: Option<u64>,
    /// Where the job's summary is POSTed when it succeeds or fails; the
    /// shape is checked here, the network policy by the API.
    pub webhook_url: Option<String>,
    pub steps: Vec<Step>,
}

// ------------------------------------------------------------ wire shapes

/// The body as submitted. Also the stored shape: the stored form is simply a
/// submission with nothing left to default.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    #[serde(default)]
    priority: Option<Priority>,
    #[serde(default)]
    inputs: BTreeMap<String, String>,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    max_parallel: Option<u32>,
    #[serde(default)]
    cache: Option<bool>,
    #[serde(default)]
    cache_ttl_secs: Option<u64>,
    #[serde(default)]
    fallback_after_secs: Option<u64>,
    #[serde(default)]
    webhook_url: Option<String>,
    steps: Vec<RawStep>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    model: Option<ModelName>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    id: StepId,
    messages: Vec<RawMessage>,
    model: Option<ModelName>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    #[serde(default)]
    depends_on: Vec<StepId>,
    #[serde(default)]
    cache: Option<bool>,
    #[serde(default)]
    tier: Tier,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage {
    role: Role,
    content: String,
}

#[derive(Serialize)]
struct StoredSpec<'a> {
    name: &'a str,
    priority: Priority,
    inputs: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_parallel: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_ttl_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fallback_after_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook_url: Option<&'a str>,
    steps: Vec<StoredStep<'a>>,
}

#[derive(Serialize)]
struct StoredStep<'a> {
    id: &'a StepId,
    messages: Vec<StoredMessage<'a>>,
    model: &'a ModelName,
    max_tokens: u32,
    temperature: f32,
    /// All dependencies, template ones included: re-reading unions them with
    /// the template references again, which gives back the same set.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    depends_on: Vec<&'a StepId>,
    /// Resolved per step, so the job-level default is not stored.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    cache: bool,
    #[serde(skip_serializing_if = "Tier::is_standard")]
    tier: Tier,
}

#[derive(Serialize)]
struct StoredMessage<'a> {
    role: Role,
    content: &'a str,
}

// ------------------------------------------------------------ JobSpec

impl JobSpec {
    /// Parses and validates a request body. `serves_model` says whether any
    /// configured org serves a model.
    pub fn parse(
        body: &[u8],
        limits: &SpecLimits,
        serves_model: &dyn Fn(&ModelName) -> bool,
    ) -> Result<JobSpec, SpecError> {
        if body.len() > limits.max_body_bytes {
            return Err(SpecError::new(
                "body",
                format!("request body is {} bytes, more than the limit of {}", body.len(), limits.max_body_bytes),
            ));
        }
        validate(deserialize(body)?, limits, Some(serves_model))
    }

    /// Canonical JSON of the validated spec, stored with the job.
    pub fn to_stored(&self) -> String {
        let stored = StoredSpec {
            name: &self.name,
            priority: self.priority,
            inputs: &self.inputs,
            max_parallel: self.max_parallel,
            cache_ttl_secs: self.cache_ttl_secs,
            fallback_after_secs: self.fallback_after_secs,
            webhook_url: self.webhook_url.as_deref(),
            steps: self
                .steps
                .iter()
                .map(|s| StoredStep {
                    id: &s.id,
                    messages: s
                        .messages
                        .iter()
                        .map(|m| StoredMessage { role: m.role, content: m.content.source() })
                        .collect(),
                    model: &s.model,
                    max_tokens: s.max_tokens,
                    temperature: s.temperature,
                    depends_on: s.deps.iter().filter_map(|&d| self.steps.get(d)).map(|d| &d.id).collect(),
                    cache: s.cache,
                    tier: s.tier,
                })
                .collect(),
        };
        // serde_json fails only on non-string map keys or a failing Serialize
        // impl, and there are none here; an empty string would still be
        // refused loudly by `from_stored` rather than run as something else.
        serde_json::to_string(&stored).unwrap_or_default()
    }

    /// Re-reads [`JobSpec::to_stored`] output. Models are not checked: the
    /// set of served models may have changed since submission, and that is
    /// for the worker to report on the step. The body size limit is not
    /// applied either: resolved defaults make the stored form larger than
    /// the body that was accepted.
    pub fn from_stored(s: &str, limits: &SpecLimits) -> Result<JobSpec, SpecError> {
        validate(deserialize(s.as_bytes())?, limits, None)
    }

    /// The webhook URL of a stored spec, read without re-validating the
    /// rest (the API and the finishing worker need only this).
    pub fn stored_webhook_url(stored: &str) -> Option<String> {
        #[derive(Deserialize)]
        struct Hook {
            webhook_url: Option<String>,
        }
        serde_json::from_str::<Hook>(stored).ok().and_then(|h| h.webhook_url)
    }

    pub fn step_index(&self, id: &StepId) -> Option<usize> {
        self.steps.iter().position(|s| &s.id == id)
    }

    /// Steps whose deps are all in `done` and that are in neither `done` nor
    /// `running`, in spec order.
    pub fn ready(&self, done: &HashSet<usize>, running: &HashSet<usize>) -> Vec<usize> {
        dag::ready(self.steps.len(), |i| &self.steps[i].deps, done, running)
    }
}

fn deserialize(body: &[u8]) -> Result<RawSpec, SpecError> {
    // Syntax first, on its own, so its errors name the body with serde's
    // line/column; this also refuses trailing data after the object.
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| SpecError::new("body", e.to_string()))?;
    require_objects(&value)?;
    // Then the typed pass, from the bytes rather than the `Value`, because
    // only the streaming parser reports duplicate keys.
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(json_error)
}

/// serde's derived structs also accept a JSON array of the field values in
/// order; nobody means that, and it would make `["x", []]` a valid spec.
fn require_objects(v: &serde_json::Value) -> Result<(), SpecError> {
    use serde_json::Value;
    let not_object = |field: String| SpecError::new(field, "must be a JSON object");
    let Value::Object(root) = v else {
        return Err(not_object("body".into()));
    };
    if root.get("defaults").is_some_and(Value::is_array) {
        return Err(not_object("defaults".into()));
    }
    let Some(Value::Array(steps)) = root.get("steps") else {
        return Ok(());
    };
    for (i, step) in steps.iter().enumerate() {
        if step.is_array() {
            return Err(not_object(format!("steps[{i}]")));
        }
        if let Some(Value::Array(messages)) = step.get("messages")
            && let Some(j) = messages.iter().position(Value::is_array)
        {
            return Err(not_object(format!("steps[{i}].messages[{j}]")));
        }
    }
    Ok(())
}

/// Maps a serde error to the field it is about. Syntax errors concern the
/// body and keep serde's line/column; data errors name the field path and
/// drop the position, which the path makes redundant.
fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> SpecError {
    use serde_json::error::Category;
    let path = e.path().to_string();
    let inner = e.into_inner();
    if !matches!(inner.classify(), Category::Data) {
        return SpecError::new("body", inner.to_string());
    }
    let full = inner.to_string();
    let position = format!(" at line {} column {}", inner.line(), inner.column());
    let message = full.strip_suffix(&position).unwrap_or(&full);
    // serde reports a missing or repeated field at the enclosing object;
    // point at the field itself.
    for (prefix, what) in
        [("missing field `", "required field is missing"), ("duplicate field `", "appears more than once")]
    {
        if let Some(name) = message.strip_prefix(prefix).and_then(|rest| rest.strip_suffix('`')) {
            let field = if path == "." { name.to_owned() } else { format!("{path}.{name}") };
            return SpecError::new(named_path(field), what);
        }
    }
    SpecError::new(named_path(path), message)
}

/// A field path that names something: an empty key (`{"": 1}`) makes
/// serde's path empty or end in `.`, which would leave the error naming
/// nothing, so it names the object holding that key instead.
fn named_path(path: String) -> String {
    let trimmed = path.trim_end_matches('.');
    if trimmed.is_empty() { "body".to_owned() } else { trimmed.to_owned() }
}

fn validate(
    raw: RawSpec,
    limits: &SpecLimits,
    serves_model: Option<&dyn Fn(&ModelName) -> bool>,
) -> Result<JobSpec, SpecError> {
    let name = raw.name;
    if name.trim().is_empty() {
        return Err(SpecError::new("name", "must not be empty"));
    }
    let name_chars = name.chars().count();
    if name_chars > MAX_NAME_CHARS {
        return Err(SpecError::new(
            "name",
            format!("is {name_chars} characters, more than the limit of {MAX_NAME_CHARS}"),
        ));
    }

    if raw.inputs.len() > limits.max_inputs {
        return Err(SpecError::new(
            "inputs",
            format!("has {} inputs, more than the limit of {}", raw.inputs.len(), limits.max_inputs),
        ));
    }
    for (key, value) in &raw.inputs {
        template::check_input_name(key).map_err(|m| SpecError::new("inputs", m))?;
        if value.len() > limits.max_input_bytes {
            return Err(SpecError::new(
                format!("inputs.{key}"),
                format!("is {} bytes, more than the limit of {}", value.len(), limits.max_input_bytes),
            ));
        }
    }

    if let Some(p) = raw.max_parallel
        && !(1..=MAX_PARALLEL).contains(&p)
    {
        return Err(SpecError::new("max_parallel", format!("must be between 1 and {MAX_PARALLEL}, got {p}")));
    }
    if let Some(t) = raw.cache_ttl_secs
        && !(1..=MAX_CACHE_TTL_SECS).contains(&t)
    {
        return Err(SpecError::new(
            "cache_ttl_secs",
            format!("must be between 1 and {MAX_CACHE_TTL_SECS} (30 days), got {t}"),
        ));
    }
    if let Some(t) = raw.fallback_after_secs
        && t > MAX_FALLBACK_AFTER_SECS
    {
        return Err(SpecError::new(
            "fallback_after_secs",
            format!("must be at most {MAX_FALLBACK_AFTER_SECS} (1 hour), got {t}"),
        ));
    }
    if let Some(url) = &raw.webhook_url {
        check_webhook_url(url).map_err(|m| SpecError::new("webhook_url", m))?;
    }

    let defaults = raw.defaults;
    if let Some(t) = defaults.max_tokens {
        check_max_tokens(t, limits).map_err(|m| SpecError::new("defaults.max_tokens", m))?;
    }
    if let Some(t) = defaults.temperature {
        check_temperature(t).map_err(|m| SpecError::new("defaults.temperature", m))?;
    }

    if raw.steps.is_empty() {
        return Err(SpecError::new("steps", "must contain at least one step"));
    }
    if raw.steps.len() > limits.max_steps {
        return Err(SpecError::new(
            "steps",
            format!("has {} steps, more than the limit of {}", raw.steps.len(), limits.max_steps),
        ));
    }

    // First pass: everything a step can check alone, and the id index that
    // references are resolved against in the second pass.
    let mut index: HashMap<&StepId, usize> = HashMap::with_capacity(raw.steps.len());
    let mut steps = Vec::with_capacity(raw.steps.len());
    for (i, rs) in raw.steps.iter().enumerate() {
        if let Some(first) = index.insert(&rs.id, i) {
            return Err(SpecError::new(
                format!("steps[{i}].id"),
                format!("duplicate step id \"{}\" (first used by steps[{first}])", rs.id),
            ));
        }
        let mut step = check_step(i, rs, &defaults, limits, serves_model)?;
        step.cache = rs.cache.or(raw.cache).unwrap_or(false);
        step.tier = rs.tier;
        steps.push(step);
    }

    // Second pass: references, which may point forward in the list.
    for (i, (rs, step)) in raw.steps.iter().zip(steps.iter_mut()).enumerate() {
        let mut deps = Vec::new();
        for (j, msg) in step.messages.iter().enumerate() {
            let field = || format!("steps[{i}].messages[{j}].content");
            if let Some(missing) = msg.content.input_refs().find(|n| !raw.inputs.contains_key(*n)) {
                return Err(SpecError::new(field(), format!("unknown input \"{missing}\"")));
            }
            for id in msg.content.step_refs() {
                match index.get(id) {
                    Some(&d) if d == i => {
                        return Err(SpecError::new(field(), format!("step \"{id}\" cannot use its own output")));
                    }
                    Some(&d) => deps.push(d),
                    None => return Err(SpecError::new(field(), format!("unknown step \"{id}\""))),
                }
            }
        }
        for (k, id) in rs.depends_on.iter().enumerate() {
            let field = || format!("steps[{i}].depends_on[{k}]");
            match index.get(id) {
                Some(&d) if d == i => {
                    return Err(SpecError::new(field(), "a step cannot depend on itself"));
                }
                Some(&d) => deps.push(d),
                None => return Err(SpecError::new(field(), format!("unknown step \"{id}\""))),
            }
        }
        deps.sort_unstable();
        deps.dedup();
        step.deps = deps;
    }

    if let Some(cycle) = dag::find_cycle(steps.len(), |i| &steps[i].deps) {
        let path: Vec<&str> = cycle.iter().map(|&i| steps[i].id.as_str()).collect();
        return Err(SpecError::new(
            format!("steps[{}]", cycle[0]),
            format!("dependency cycle {} (each step depends on the next)", path.join(" -> ")),
        ));
    }

    Ok(JobSpec {
        name,
        priority: raw.priority.unwrap_or_default(),
        inputs: raw.inputs,
        max_parallel: raw.max_parallel,
        cache_ttl_secs: raw.cache_ttl_secs,
        fallback_after_secs: raw.fallback_after_secs,
        webhook_url: raw.webhook_url,
        steps,
    })
}

/// The URL's shape: http(s), a host, no credentials, not absurdly long.
/// Where it may point (no loopback, private or metadata addresses) is the
/// API's check, against the configured policy.
fn check_webhook_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_WEBHOOK_URL_BYTES {
        return Err(format!("is {} bytes, more than the limit of {MAX_WEBHOOK_URL_BYTES}", url.len()));
    }
    crate::ssrf::check_url(url, true).map(|_| ()).map_err(|e| e.to_string())
}

/// Checks one step on its own and resolves its defaults; `deps` is filled in
/// once every id is known.
fn check_step(
    i: usize,
    rs: &RawStep,
    defaults: &RawDefaults,
    limits: &SpecLimits,
    serves_model: Option<&dyn Fn(&ModelName) -> bool>,
) -> Result<Step, SpecError> {
    if rs.messages.is_empty() {
        return Err(SpecError::new(format!("steps[{i}].messages"), "must contain at least one message"));
    }
    if rs.messages.len() > limits.max_messages_per_step {
        return Err(SpecError::new(
            format!("steps[{i}].messages"),
            format!("has {} messages, more than the limit of {}", rs.messages.len(), limits.max_messages_per_step),
        ));
    }
    let mut messages = Vec::with_capacity(rs.messages.len());
    for (j, m) in rs.messages.iter().enumerate() {
        let field = || format!("steps[{i}].messages[{j}].content");
        if m.content.is_empty() {
            return Err(SpecError::new(field(), "must not be empty"));
        }
        if m.content.len() > limits.max_template_bytes {
            return Err(SpecError::new(
                field(),
                format!("is {} bytes, more than the limit of {}", m.content.len(), limits.max_template_bytes),
            ));
        }
        let content = Template::parse(&m.content).map_err(|e| SpecError::new(field(), e.message))?;
        messages.push(MessageTemplate { role: m.role, content });
    }

    let model_field = format!("steps[{i}].model");
    let model = match (&rs.model, &defaults.model) {
        (Some(m), _) => m.clone(),
        (None, Some(m)) => m.clone(),
        (None, None) => {
            return Err(SpecError::new(model_field, "no model given and no defaults.model"));
        }
    };
    if let Some(serves) = serves_model
        && !serves(&model)
    {
        let from_defaults = if rs.model.is_none() { " (from defaults.model)" } else { "" };
        return Err(SpecError::new(
            model_field,
            format!("model \"{model}\" is not served by any configured org{from_defaults}"),
        ));
    }

    // Defaults were checked once already; only the step's own values here.
    if let Some(t) = rs.max_tokens {
        check_max_tokens(t, limits).map_err(|m| SpecError::new(format!("steps[{i}].max_tokens"), m))?;
    }
    if let Some(t) = rs.temperature {
        check_temperature(t).map_err(|m| SpecError::new(format!("steps[{i}].temperature"), m))?;
    }

    Ok(Step {
        id: rs.id.clone(),
        messages,
        model,
        max_tokens: rs.max_tokens.or(defaults.max_tokens).unwrap_or(DEFAULT_MAX_TOKENS),
        temperature: rs.temperature.or(defaults.temperature).unwrap_or(DEFAULT_TEMPERATURE),
        deps: Vec::new(),
        cache: false,
        tier: Tier::Standard,
    })
}

fn check_max_tokens(t: u32, limits: &SpecLimits) -> Result<(), String> {
    if t == 0 || t > limits.max_tokens_cap {
        return Err(format!("must be between 1 and {}, got {t}", limits.max_tokens_cap));
    }
    Ok(())
}

fn check_temperature(t: f32) -> Result<(), String> {
    // `contains` is false for NaN, so NaN is refused too.
    if !(0.0..=2.0).contains(&t) {
        return Err(format!("must be between 0.0 and 2.0, got {t}"));
    }
    Ok(())
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
