//! The spec's wire shapes: the body as submitted (`Raw*`), the stored
//! form (`Stored*`), and the serde plumbing that turns serde's errors into
//! errors naming a field.

use std::collections::BTreeMap;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::messages::{RawMessage, StoredMessage};
use super::{SpecError, Tier};
use crate::domain::{ModelName, Priority, StepId};

/// The body as submitted. Also the stored shape: the stored form is simply a
/// submission with nothing left to default.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpec {
    pub name: String,
    #[serde(default)]
    pub priority: Option<Priority>,
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    #[serde(default)]
    pub defaults: RawDefaults,
    #[serde(default)]
    pub max_parallel: Option<u32>,
    #[serde(default)]
    pub max_fan_out: Option<u32>,
    #[serde(default)]
    pub cache: Option<bool>,
    #[serde(default)]
    pub cache_ttl_secs: Option<u64>,
    #[serde(default)]
    pub fallback_after_secs: Option<u64>,
    #[serde(default)]
    pub deadline_secs: Option<u64>,
    #[serde(default)]
    pub webhook_url: Option<String>,
    pub steps: Vec<RawStep>,
}

/// `defaults`: a model, and request fields (read by `ChatParams::parse`,
/// which refuses unknown ones).
#[derive(Default, Deserialize)]
pub(super) struct RawDefaults {
    #[serde(default)]
    pub model: Option<ModelName>,
    #[serde(flatten)]
    pub fields: Fields,
}

#[derive(Deserialize)]
pub(super) struct RawStep {
    pub id: StepId,
    pub messages: Vec<RawMessage>,
    #[serde(default)]
    pub model: Option<ModelName>,
    #[serde(default)]
    pub depends_on: Vec<StepId>,
    #[serde(default)]
    pub cache: Option<bool>,
    #[serde(default)]
    pub tier: Tier,
    #[serde(default)]
    pub for_each: Option<String>,
    /// Every other key: the step's request fields.
    #[serde(flatten)]
    pub fields: Fields,
}

/// The keys of an object that its struct does not name, refusing repeats:
/// a flattened `Map` would keep the last of two equal keys silently.
#[derive(Default)]
pub(super) struct Fields(pub Map<String, Value>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut out = Map::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!("duplicate field `{k}`")));
                    }
                    out.insert(k, v);
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Serialize)]
pub(super) struct StoredSpec<'a> {
    pub name: &'a str,
    pub priority: Priority,
    pub inputs: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_fan_out: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_ttl_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_after_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<&'a str>,
    pub steps: Vec<StoredStep<'a>>,
}

#[derive(Serialize)]
pub(super) struct StoredStep<'a> {
    pub id: &'a StepId,
    pub messages: Vec<StoredMessage<'a>>,
    pub model: &'a ModelName,
    /// The step's request fields with the defaults merged in.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
    /// All dependencies, template ones included: re-reading unions them with
    /// the template references again, which gives back the same set.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<&'a StepId>,
    /// Resolved per step, so the job-level default is not stored.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cache: bool,
    #[serde(skip_serializing_if = "Tier::is_standard")]
    pub tier: Tier,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
}

pub(super) fn deserialize(body: &[u8]) -> Result<RawSpec, SpecError> {
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
