//! A step's messages: who says what, with templates for the text.
//!
//! Roles are the chat API's: `system`, `developer`, `user`, `assistant`
//! and `tool`. An assistant message may carry `tool_calls` (a conversation
//! that replays a call the model made), and then needs no content; a `tool`
//! message answers one of them by `tool_call_id`. A tool call's
//! `arguments` are a template, so an earlier step's tool call can be
//! replayed (`{{steps.plan.tool_calls[0].function.arguments}}`): its
//! references are dependencies like any other.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::template::{RenderError, Scope, Template};
use super::{SpecError, SpecLimits};

/// Tool calls one assistant message may replay.
const MAX_TOOL_CALLS: usize = 128;
const MAX_TOOL_CALL_ID: usize = 128;

/// Who says a message, as the chat API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// A tool call an assistant message replays.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCallTemplate {
    pub id: String,
    pub name: String,
    pub arguments: Template,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MessageTemplate {
    pub role: Role,
    /// `None` only for an assistant message that carries tool calls.
    pub content: Option<Template>,
    pub tool_calls: Vec<ToolCallTemplate>,
    /// For a `tool` message: the call it answers.
    pub tool_call_id: Option<String>,
}

impl MessageTemplate {
    /// Every template of the message: its content, then its tool calls'
    /// arguments.
    pub fn templates(&self) -> impl Iterator<Item = &Template> {
        self.content.iter().chain(self.tool_calls.iter().map(|c| &c.arguments))
    }

    /// The message as the provider is sent it, with every template rendered
    /// from `scope`; the rendered text counts against `budget`, which is
    /// lowered by what was used.
    pub fn render(&self, scope: &dyn Scope, budget: &mut usize) -> Result<Value, RenderError> {
        let mut m = Map::new();
        m.insert("role".into(), self.role.as_str().into());
        let mut render = |t: &Template| -> Result<String, RenderError> {
            let text = t.render(scope, *budget)?;
            *budget = budget.saturating_sub(text.len());
            Ok(text)
        };
        if let Some(c) = &self.content {
            m.insert("content".into(), render(c)?.into());
        }
        if !self.tool_calls.is_empty() {
            let calls = self
                .tool_calls
                .iter()
                .map(|c| {
                    Ok(json!({"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": render(&c.arguments)?}}))
                })
                .collect::<Result<Vec<_>, RenderError>>()?;
            m.insert("tool_calls".into(), calls.into());
        }
        if let Some(id) = &self.tool_call_id {
            m.insert("tool_call_id".into(), id.as_str().into());
        }
        Ok(Value::Object(m))
    }
}

// ------------------------------------------------------------ wire shapes

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMessage {
    role: Role,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<RawToolCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToolCall {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    function: RawFunction,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    name: String,
    arguments: String,
}

/// How a message is stored: as submitted, templates as their source.
#[derive(Serialize)]
pub(super) struct StoredMessage<'a> {
    role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

impl<'a> StoredMessage<'a> {
    pub(super) fn of(m: &'a MessageTemplate) -> Self {
        Self {
            role: m.role,
            content: m.content.as_ref().map(Template::source),
            tool_calls: m
                .tool_calls
                .iter()
                .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments.source()}}))
                .collect(),
            tool_call_id: m.tool_call_id.as_deref(),
        }
    }
}

/// Checks a step's messages alone; references are checked by the caller
/// once every step is known. `at` is `steps[i]`.
pub(super) fn check(raw: &[RawMessage], at: &str, limits: &SpecLimits) -> Result<Vec<MessageTemplate>, SpecError> {
    if raw.is_empty() {
        return Err(SpecError::new(format!("{at}.messages"), "must contain at least one message"));
    }
    if raw.len() > limits.max_messages_per_step {
        return Err(SpecError::new(
            format!("{at}.messages"),
            format!("has {} messages, more than the limit of {}", raw.len(), limits.max_messages_per_step),
        ));
    }
    let template = |source: &str, field: &str| -> Result<Template, SpecError> {
        if source.is_empty() {
            return Err(SpecError::new(field, "must not be empty"));
        }
        if source.len() > limits.max_template_bytes {
            return Err(SpecError::new(
                field,
                format!("is {} bytes, more than the limit of {}", source.len(), limits.max_template_bytes),
            ));
        }
        Template::parse(source).map_err(|e| SpecError::new(field, e.message))
    };
    let mut out: Vec<MessageTemplate> = Vec::with_capacity(raw.len());
    for (j, m) in raw.iter().enumerate() {
        let at = format!("{at}.messages[{j}]");
        let calls = m.tool_calls.as_deref().unwrap_or_default();
        if m.tool_calls.is_some() && m.role != Role::Assistant {
            return Err(SpecError::new(format!("{at}.tool_calls"), "only an assistant message carries tool calls"));
        }
        if m.tool_calls.is_some() && (calls.is_empty() || calls.len() > MAX_TOOL_CALLS) {
            return Err(SpecError::new(
                format!("{at}.tool_calls"),
                format!("must hold 1 to {MAX_TOOL_CALLS} tool calls, got {}", calls.len()),
            ));
        }
        let content = match (&m.content, m.role) {
            (Some(c), _) => Some(template(c, &format!("{at}.content"))?),
            (None, Role::Assistant) if !calls.is_empty() => None,
            (None, _) => {
                return Err(SpecError::new(
                    format!("{at}.content"),
                    "must be text: only an assistant message that carries tool calls has no content",
                ));
            }
        };
        let mut tool_calls = Vec::with_capacity(calls.len());
        for (k, c) in calls.iter().enumerate() {
            let fc = format!("{at}.tool_calls[{k}]");
            check_call_id(&c.id).map_err(|e| SpecError::new(format!("{fc}.id"), e))?;
            if c.kind != "function" {
                return Err(SpecError::new(format!("{fc}.type"), "must be \"function\""));
            }
            super::params::check_function_name(&c.function.name)
                .map_err(|e| SpecError::new(format!("{fc}.function.name"), e))?;
            tool_calls.push(ToolCallTemplate {
                id: c.id.clone(),
                name: c.function.name.clone(),
                arguments: template(&c.function.arguments, &format!("{fc}.function.arguments"))?,
            });
        }
        let tool_call_id = match (&m.tool_call_id, m.role) {
            (Some(id), Role::Tool) => {
                check_call_id(id).map_err(|e| SpecError::new(format!("{at}.tool_call_id"), e))?;
                // The provider refuses a tool result that answers no call
                // made before it; say so now rather than at run time.
                let answered = out.iter().flat_map(|m| &m.tool_calls).any(|c| &c.id == id);
                if !answered {
                    return Err(SpecError::new(
                        format!("{at}.tool_call_id"),
                        format!("answers no tool call of an earlier assistant message (no call has id {id:?})"),
                    ));
                }
                Some(id.clone())
            }
            (None, Role::Tool) => {
                return Err(SpecError::new(
                    format!("{at}.tool_call_id"),
                    "required field is missing in a tool message",
                ));
            }
            (Some(_), _) => {
                return Err(SpecError::new(format!("{at}.tool_call_id"), "only a tool message answers a tool call"));
            }
            (None, _) => None,
        };
        out.push(MessageTemplate { role: m.role, content, tool_calls, tool_call_id });
    }
    Ok(out)
}

fn check_call_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_TOOL_CALL_ID || id.chars().any(char::is_control) {
        return Err(format!("must be 1 to {MAX_TOOL_CALL_ID} characters without control characters"));
    }
    Ok(())
}
