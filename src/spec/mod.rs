//! The job spec: what a client submits to `POST /v1/jobs`, parsed and
//! validated whole before anything is stored.
//!
//! [`JobSpec::parse`] turns a request body into a [`JobSpec`] or a
//! [`SpecError`] that names the offending field (`steps[3].messages[0].content`),
//! so the API can answer 400 with something a user can act on. A validated
//! spec has every default resolved, every template and request field parsed
//! and every dependency as an index, and is known to be acyclic; the engine
//! never re-checks any of it. [`JobSpec::to_stored`] / [`JobSpec::from_stored`]
//! are the canonical form kept with the job, re-read by whichever worker
//! runs it.
//!
//! - [`params`]: a step's chat-completions fields, typed and range-checked.
//! - [`messages`]: roles, tool calls and tool results.
//! - [`template`] and [`reference`]: the `{{ … }}` syntax and what it names.
//! - [`schema`]: references checked against a step's `json_schema`.
//! - [`dag`]: cycle detection and the "which steps may run now" query.
//! - `wire`: the submitted and stored shapes.

mod dag;
pub mod messages;
pub mod params;
pub mod reference;
mod schema;
pub mod template;
mod wire;

#[cfg(test)]
use std::collections::HashSet;
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::{ModelName, Priority, StepId};
pub use messages::{MessageTemplate, Role};
pub use params::ChatParams;
pub use reference::{Reference, Segment, View};
pub use template::{RenderError, Scope, StepOutput, Template, TemplateError};
use wire::{RawSpec, RawStep, StoredSpec, StoredStep};

const MAX_NAME_CHARS: usize = 200;
const MAX_PARALLEL: u32 = 64;
const MAX_CACHE_TTL_SECS: u64 = 30 * 24 * 3600;
const MAX_FALLBACK_AFTER_SECS: u64 = 3600;
/// The longest `deadline_secs`: a week.
pub const MAX_DEADLINE_SECS: u64 = 7 * 24 * 3600;
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
    /// Per rendered step (all its messages); not checked here (outputs are
    /// unknown at submission) but passed by the engine to [`Template::render`].
    pub max_rendered_bytes: usize,
    pub max_tokens_cap: u32,
    /// Instances one `for_each` step may expand to (`[limits] max_fan_out`);
    /// a job may ask for fewer.
    pub max_fan_out: u32,
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
            max_fan_out: 256,
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

/// One LLM call, with every default resolved; or, with `for_each`, one
/// call per element of an array an earlier step produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: StepId,
    pub messages: Vec<MessageTemplate>,
    pub model: ModelName,
    /// The request fields, the step's over `defaults`.
    pub params: ChatParams,
    /// Indices into [`JobSpec::steps`] of every step this one waits for
    /// (template references, `for_each` and `depends_on`), ascending,
    /// without repeats. Waiting for a fan-out step means waiting for all
    /// of its instances.
    pub deps: Vec<usize>,
    /// Served from the response cache when the same request was answered
    /// before (the step's `cache`, else the job's; off by default).
    pub cache: bool,
    /// `"tier": "cheap"`: run on the fallback orgs (self-hosted models).
    pub tier: Tier,
    /// `"for_each": "steps.outline.json.scenes"`: a `steps.…` reference
    /// (never `.output`, which is text) to the array whose elements the
    /// instances get as `{{item}}`.
    pub for_each: Option<Reference>,
}

impl Step {
    /// The chat-completions body the provider is sent for this step, with
    /// its messages rendered ([`MessageTemplate::render`]).
    pub fn body(&self, messages: Vec<Value>) -> serde_json::Map<String, Value> {
        let mut body = self.params.body_fields();
        body.insert("model".into(), self.model.as_str().into());
        body.insert("messages".into(), messages.into());
        body
    }
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
    /// Per-job cap on one `for_each` step's instances, if the client set
    /// one (at most the configured `max_fan_out`).
    pub max_fan_out: Option<u32>,
    /// How long this job's answers stay in the response cache, if the
    /// client chose (else the configured default).
    pub cache_ttl_secs: Option<u64>,
    /// How long a step waits for a primary org before a fallback org may
    /// take it, if the client chose (else the configured default).
    pub fallback_after_secs: Option<u64>,
    /// How long after submission the job may take before it fails (waiting
    /// for capacity, a worker or retries), if the client chose (else the
    /// configured default).
    pub deadline_secs: Option<u64>,
    /// Where the job's summary is POSTed when it succeeds or fails; the
    /// shape is checked here, the network policy by the API.
    pub webhook_url: Option<String>,
    pub steps: Vec<Step>,
}

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
        validate(wire::deserialize(body)?, limits, Some(serves_model))
    }

    /// Canonical JSON of the validated spec, stored with the job.
    pub fn to_stored(&self) -> String {
        let stored = StoredSpec {
            name: &self.name,
            priority: self.priority,
            inputs: &self.inputs,
            max_parallel: self.max_parallel,
            max_fan_out: self.max_fan_out,
            cache_ttl_secs: self.cache_ttl_secs,
            fallback_after_secs: self.fallback_after_secs,
            deadline_secs: self.deadline_secs,
            webhook_url: self.webhook_url.as_deref(),
            steps: self
                .steps
                .iter()
                .map(|s| StoredStep {
                    id: &s.id,
                    messages: s.messages.iter().map(messages::StoredMessage::of).collect(),
                    model: &s.model,
                    fields: s.params.stored_fields(),
                    depends_on: s.deps.iter().filter_map(|&d| self.steps.get(d)).map(|d| &d.id).collect(),
                    cache: s.cache,
                    tier: s.tier,
                    for_each: s.for_each.as_ref().map(ToString::to_string),
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
    /// for the worker to report on the step. Neither are the body size limit
    /// (resolved defaults make the stored form larger than the body that
    /// was accepted) nor the job's `max_fan_out` against the configured one
    /// (the engine takes the smaller of the two).
    pub fn from_stored(s: &str, limits: &SpecLimits) -> Result<JobSpec, SpecError> {
        validate(wire::deserialize(s.as_bytes())?, limits, None)
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
    /// `running`, in spec order. The engine schedules fan-out instances
    /// too (`crate::engine`'s plan); tests use this to check that an
    /// accepted spec can run to the end.
    #[cfg(test)]
    pub fn ready(&self, done: &HashSet<usize>, running: &HashSet<usize>) -> Vec<usize> {
        dag::ready(self.steps.len(), |i| &self.steps[i].deps, done, running)
    }

    /// The cap on one `for_each` step's instances: the job's, within the
    /// configured one.
    pub fn fan_out_cap(&self, configured: u32) -> u32 {
        self.max_fan_out.map_or(configured, |j| j.min(configured))
    }
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
    if let Some(f) = raw.max_fan_out {
        // A stored job keeps its own cap even if the configured one fell.
        let max = if serves_model.is_some() { limits.max_fan_out } else { u32::MAX };
        if f == 0 || f > max {
            return Err(SpecError::new(
                "max_fan_out",
                format!("must be between 1 and {} (the configured max_fan_out), got {f}", limits.max_fan_out),
            ));
        }
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
    if let Some(t) = raw.deadline_secs
        && !(1..=MAX_DEADLINE_SECS).contains(&t)
    {
        return Err(SpecError::new(
            "deadline_secs",
            format!("must be between 1 and {MAX_DEADLINE_SECS} (7 days), got {t}"),
        ));
    }
    if let Some(url) = &raw.webhook_url {
        check_webhook_url(url).map_err(|m| SpecError::new("webhook_url", m))?;
    }

    let defaults = ChatParams::parse(&raw.defaults.fields.0, "defaults", limits.max_tokens_cap)?;

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
        let mut step = check_step(i, rs, &raw.defaults.model, &defaults, limits, serves_model)?;
        step.cache = rs.cache.or(raw.cache).unwrap_or(false);
        steps.push(step);
    }

    // Second pass: references, which may point forward in the list.
    let mut all_deps = Vec::with_capacity(steps.len());
    for (i, rs) in raw.steps.iter().enumerate() {
        all_deps.push(check_references(i, rs, &steps, &index, &raw.inputs)?);
    }
    for (step, deps) in steps.iter_mut().zip(all_deps) {
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
        max_fan_out: raw.max_fan_out,
        cache_ttl_secs: raw.cache_ttl_secs,
        fallback_after_secs: raw.fallback_after_secs,
        deadline_secs: raw.deadline_secs,
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
    default_model: &Option<ModelName>,
    defaults: &ChatParams,
    limits: &SpecLimits,
    serves_model: Option<&dyn Fn(&ModelName) -> bool>,
) -> Result<Step, SpecError> {
    let at = format!("steps[{i}]");
    // A reference's id ends at the first view word after its first part,
    // so an id with such a part could never be referenced.
    if let Some(word) = rs.id.as_str().split('.').skip(1).find(|p| reference::is_view_word(p)) {
        return Err(SpecError::new(
            format!("{at}.id"),
            format!("step id \"{}\" has a part `.{word}`, which references read as what they name", rs.id),
        ));
    }
    let messages = messages::check(&rs.messages, &at, limits)?;

    let model_field = format!("{at}.model");
    let model = match (&rs.model, default_model) {
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

    let own = ChatParams::parse(&rs.fields.0, &at, limits.max_tokens_cap)?;
    let params = ChatParams::merged(&own, defaults);
    let set_here = |f: &str| rs.fields.0.contains_key(f);
    params.check_merged(&|f| if set_here(f) { format!("{at}.{f}") } else { format!("defaults.{f}") })?;

    let for_each = match &rs.for_each {
        None => None,
        Some(src) => {
            let field = format!("{at}.for_each");
            match reference::parse_reference(src.trim()).map_err(|e| SpecError::new(&field, e))? {
                r @ Reference::Step { view: View::Json | View::ToolCalls | View::Choices | View::Outputs, .. } => {
                    Some(r)
                }
                r => {
                    return Err(SpecError::new(
                        field,
                        format!(
                            "`{r}` is not an array a step can fan out over: name one in an earlier step, \
                             as in steps.outline.json.scenes or steps.scene.outputs"
                        ),
                    ));
                }
            }
        }
    };

    Ok(Step { id: rs.id.clone(), messages, model, params, deps: Vec::new(), cache: false, tier: rs.tier, for_each })
}

/// Checks every reference of step `i` against the other steps (and, where
/// a step declares a `json_schema`, against its schema), and returns the
/// step's dependencies.
fn check_references(
    i: usize,
    rs: &RawStep,
    steps: &[Step],
    index: &HashMap<&StepId, usize>,
    inputs: &BTreeMap<String, String>,
) -> Result<Vec<usize>, SpecError> {
    let step = &steps[i];
    let mut deps = Vec::new();
    let target = |id: &StepId, field: &str| -> Result<usize, SpecError> {
        match index.get(id) {
            Some(&d) if d == i => Err(SpecError::new(field, format!("step \"{id}\" cannot use its own output"))),
            Some(&d) => Ok(d),
            None => Err(SpecError::new(field, format!("unknown step \"{id}\""))),
        }
    };

    // The schema of the fan-out element, for checking `item` paths.
    let mut item_schema: Option<Value> = None;
    if let Some(src) = &step.for_each {
        let field = format!("steps[{i}].for_each");
        if let Reference::Step { id, view, path } = src {
            let d = target(id, &field)?;
            deps.push(d);
            check_view(src, &steps[d], *view).map_err(|m| SpecError::new(&field, m))?;
            if let Some(schema) = view_schema(&steps[d], *view) {
                let mut to_item = path.clone();
                to_item.push(Segment::Index(0));
                match schema::follow(&schema, path) {
                    Err((k, why)) => return Err(SpecError::new(field, shown(src, k, &why))),
                    Ok(schema::Node::Known(node)) => match schema::definite_type(node) {
                        Some(t) if t != "array" => {
                            return Err(SpecError::new(
                                field,
                                format!("{src}: the schema of step {id} makes this {t}, never an array"),
                            ));
                        }
                        _ => {
                            if let Ok(schema::Node::Known(items)) = schema::follow(&schema, &to_item) {
                                item_schema = Some(items.clone());
                            }
                        }
                    },
                    Ok(schema::Node::Unknown) => {}
                }
            }
        }
    }

    for (j, m) in step.messages.iter().enumerate() {
        let fields = m.content.iter().map(|t| (format!("steps[{i}].messages[{j}].content"), t)).chain(
            m.tool_calls
                .iter()
                .enumerate()
                .map(|(k, c)| (format!("steps[{i}].messages[{j}].tool_calls[{k}].function.arguments"), &c.arguments)),
        );
        for (field, t) in fields {
            for r in t.references() {
                match r {
                    Reference::Input(name) if !inputs.contains_key(name) => {
                        return Err(SpecError::new(field, format!("unknown input \"{name}\"")));
                    }
                    Reference::Input(_) => {}
                    Reference::Item(_) | Reference::Index if step.for_each.is_none() => {
                        return Err(SpecError::new(
                            field,
                            format!("`{r}` is only defined in a for_each step, and step {} has no for_each", step.id),
                        ));
                    }
                    Reference::Index => {}
                    Reference::Item(path) => {
                        if let Some(s) = &item_schema
                            && let Err((k, why)) = schema::follow(s, path)
                        {
                            return Err(SpecError::new(field, shown(r, k, &why)));
                        }
                    }
                    Reference::Step { id, view, path } => {
                        let d = target(id, &field)?;
                        deps.push(d);
                        check_view(r, &steps[d], *view).map_err(|m| SpecError::new(&field, m))?;
                        if let Some(s) = view_schema(&steps[d], *view)
                            && let Err((k, why)) = schema::follow(&s, path)
                        {
                            return Err(SpecError::new(field, shown(r, k, &why)));
                        }
                    }
                }
            }
        }
    }
    for (k, id) in rs.depends_on.iter().enumerate() {
        let field = format!("steps[{i}].depends_on[{k}]");
        match index.get(id) {
            Some(&d) if d == i => return Err(SpecError::new(field, "a step cannot depend on itself")),
            Some(&d) => deps.push(d),
            None => return Err(SpecError::new(field, format!("unknown step \"{id}\""))),
        }
    }
    deps.sort_unstable();
    deps.dedup();
    Ok(deps)
}

/// A fan-out step is read through `outputs`, any other through the rest.
fn check_view(r: &Reference, target: &Step, view: View) -> Result<(), String> {
    match (view, target.for_each.is_some()) {
        (View::Outputs, false) => {
            Err(format!("`{r}`: step {} is not a for_each step; read it with .output", target.id))
        }
        (View::Outputs, true) | (_, false) => Ok(()),
        (_, true) => Err(format!(
            "`{r}`: step {0} is a for_each step; read its instances with steps.{0}.outputs or join(steps.{0}.outputs, \"\\n\")",
            target.id
        )),
    }
}

/// The schema of what a view of `target` is, where it is known.
fn view_schema(target: &Step, view: View) -> Option<Value> {
    match view {
        View::Output => None,
        View::Json => target.params.response_format.as_ref()?.schema().map(|s| Value::Object(s.clone())),
        View::ToolCalls => Some(schema::tool_calls()),
        View::Choices => Some(schema::choices()),
        View::Outputs => Some(schema::outputs()),
    }
}

/// `steps.outline.json.scenes[0].x: why`, the reference cut after segment `k`.
fn shown(r: &Reference, k: usize, why: &str) -> String {
    let cut = match r {
        Reference::Step { id, view, path } => {
            Reference::Step { id: id.clone(), view: *view, path: path.iter().take(k + 1).cloned().collect() }
        }
        Reference::Item(path) => Reference::Item(path.iter().take(k + 1).cloned().collect()),
        other => other.clone(),
    };
    format!("{cut}: {why}")
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod surface_tests;
#[cfg(test)]
mod tests;
