//! The assistant's answer to one step: every choice's message (content,
//! tool calls, refusal, finish reason), as a checkpoint keeps it, the
//! response cache stores it and templates read it.
//!
//! Choice 0 is what a step's `{{steps.ID.output}}`, `.json` and
//! `.tool_calls` mean: it is what a request without `n` gets, and what an
//! SDK user reads as `choices[0]`. The other choices of an `n > 1` step are
//! kept beside it and read through `{{steps.ID.choices}}`.

use serde::{Deserialize, Serialize};

/// One tool call the model asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    /// `"function"`, the only kind chat completions returns for the tools
    /// a step can declare.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text, as the model wrote it (not checked: it may be invalid).
    pub arguments: String,
}

/// One choice's assistant message and why it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// `None` when the model answered only with tool calls or a refusal.
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub refusal: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// `stop`, `length`, `tool_calls`, `content_filter`… as the provider
    /// said; `None` for checkpoints written before it was kept.
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// A step's answer: one message per choice, at least one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<AssistantMessage>", into = "Vec<AssistantMessage>")]
pub struct StepAnswer {
    choices: Vec<AssistantMessage>,
}

/// Why an answer could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AnswerError(pub String);

impl StepAnswer {
    /// `None` for no choices: every answer has at least one.
    pub fn new(choices: Vec<AssistantMessage>) -> Option<Self> {
        (!choices.is_empty()).then_some(Self { choices })
    }

    /// A plain text answer with nothing else known (a checkpoint written
    /// before the whole message was kept).
    pub fn text(content: String) -> Self {
        Self { choices: vec![AssistantMessage { content: Some(content), ..AssistantMessage::default() }] }
    }

    /// Choice 0.
    pub fn first(&self) -> &AssistantMessage {
        // `new` and every decoder refuse an empty list, so there is one.
        &self.choices[0]
    }

    pub fn choices(&self) -> &[AssistantMessage] {
        &self.choices
    }

    /// Choice 0's text; empty when it has none (a tool call, a refusal).
    pub fn output(&self) -> &str {
        self.first().content.as_deref().unwrap_or("")
    }

    /// The choices of a chat completion body, in their `index` order.
    pub fn from_completion(body: &[u8]) -> Result<Self, AnswerError> {
        #[derive(Deserialize)]
        struct Completion {
            choices: Vec<WireChoice>,
        }
        #[derive(Deserialize)]
        struct WireChoice {
            #[serde(default)]
            index: u32,
            message: WireMessage,
            #[serde(default)]
            finish_reason: Option<String>,
        }
        #[derive(Deserialize)]
        struct WireMessage {
            #[serde(default)]
            content: Option<String>,
            #[serde(default)]
            refusal: Option<String>,
            #[serde(default)]
            tool_calls: Option<Vec<ToolCall>>,
        }
        let c: Completion =
            serde_json::from_slice(body).map_err(|e| AnswerError(format!("unreadable completion: {e}")))?;
        let mut choices = c.choices;
        choices.sort_by_key(|c| c.index);
        let choices = choices
            .into_iter()
            .map(|c| AssistantMessage {
                content: c.message.content,
                refusal: c.message.refusal,
                tool_calls: c.message.tool_calls.unwrap_or_default(),
                finish_reason: c.finish_reason,
            })
            .collect();
        Self::new(choices).ok_or_else(|| AnswerError("the completion has no choices".into()))
    }

    /// The stored form: choice 0's text, which backends keep as the step's
    /// output, and the rest of the answer as JSON. Apart so the text is
    /// not stored twice: a DynamoDB step item is paid by its size.
    pub fn split(&self) -> (&str, String) {
        let first = self.first();
        let rest = Rest {
            no_content: first.content.is_none(),
            refusal: first.refusal.clone(),
            tool_calls: first.tool_calls.clone(),
            finish_reason: first.finish_reason.clone(),
            more: self.choices[1..].to_vec(),
        };
        // A struct of strings and vectors always serializes.
        (self.output(), serde_json::to_string(&rest).unwrap_or_default())
    }

    /// Reads [`StepAnswer::split`]'s parts; `rest` is `None` for a
    /// checkpoint written before the whole message was kept.
    pub fn join(text: String, rest: Option<&str>) -> Result<Self, AnswerError> {
        let Some(rest) = rest else { return Ok(Self::text(text)) };
        let rest: Rest =
            serde_json::from_str(rest).map_err(|e| AnswerError(format!("unreadable stored answer: {e}")))?;
        let first = AssistantMessage {
            content: (!rest.no_content).then_some(text),
            refusal: rest.refusal,
            tool_calls: rest.tool_calls,
            finish_reason: rest.finish_reason,
        };
        let mut choices = vec![first];
        choices.extend(rest.more);
        Ok(Self { choices })
    }
}

impl TryFrom<Vec<AssistantMessage>> for StepAnswer {
    type Error = AnswerError;
    fn try_from(choices: Vec<AssistantMessage>) -> Result<Self, AnswerError> {
        Self::new(choices).ok_or_else(|| AnswerError("an answer has at least one choice".into()))
    }
}

impl From<StepAnswer> for Vec<AssistantMessage> {
    fn from(a: StepAnswer) -> Self {
        a.choices
    }
}

/// Everything of an answer but choice 0's text.
#[derive(Serialize, Deserialize)]
struct Rest {
    /// Choice 0 had no content at all, rather than an empty text.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    no_content: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refusal: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    finish_reason: Option<String>,
    /// Choices 1 and up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    more: Vec<AssistantMessage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str) -> ToolCall {
        ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: FunctionCall { name: name.into(), arguments: "{\"q\":1}".into() },
        }
    }

    #[test]
    fn a_completion_reads_every_choice_in_index_order() {
        let body = serde_json::json!({"choices": [
            {"index": 1, "message": {"role": "assistant", "content": "b"}, "finish_reason": "length"},
            {"index": 0, "message": {"role": "assistant", "content": null, "refusal": null,
             "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get", "arguments": "{\"q\":1}"}}]},
             "finish_reason": "tool_calls"}
        ]});
        let a = StepAnswer::from_completion(body.to_string().as_bytes()).unwrap();
        assert_eq!(a.choices().len(), 2);
        assert_eq!(a.first().tool_calls, vec![call("get")]);
        assert_eq!((a.output(), a.first().finish_reason.as_deref()), ("", Some("tool_calls")));
        assert_eq!(a.choices()[1].content.as_deref(), Some("b"));
        assert!(StepAnswer::from_completion(br#"{"choices": []}"#).is_err());
        assert!(StepAnswer::from_completion(b"not json").is_err());
    }

    #[test]
    fn the_stored_form_keeps_the_text_once_and_everything_else_beside_it() {
        let plain = StepAnswer::new(vec![AssistantMessage {
            content: Some("hello".into()),
            finish_reason: Some("stop".into()),
            ..Default::default()
        }])
        .unwrap();
        let (text, rest) = plain.split();
        assert_eq!((text, rest.as_str()), ("hello", r#"{"finish_reason":"stop"}"#));
        assert_eq!(StepAnswer::join(text.to_owned(), Some(&rest)).unwrap(), plain);

        let tool = StepAnswer::new(vec![
            AssistantMessage {
                tool_calls: vec![call("f")],
                finish_reason: Some("tool_calls".into()),
                ..Default::default()
            },
            AssistantMessage { content: Some(String::new()), refusal: Some("no".into()), ..Default::default() },
        ])
        .unwrap();
        let (text, rest) = tool.split();
        assert_eq!(text, "");
        assert!(!rest.contains("hello"));
        assert_eq!(StepAnswer::join(text.to_owned(), Some(&rest)).unwrap(), tool, "null content stays null");

        // A checkpoint from before: the text alone.
        assert_eq!(StepAnswer::join("old".into(), None).unwrap(), StepAnswer::text("old".into()));
        assert!(StepAnswer::join("x".into(), Some("{")).is_err());
    }

    #[test]
    fn serde_refuses_an_answer_without_choices() {
        assert!(serde_json::from_str::<StepAnswer>("[]").is_err());
        let a = StepAnswer::text("t".into());
        assert_eq!(serde_json::from_str::<StepAnswer>(&serde_json::to_string(&a).unwrap()).unwrap(), a);
    }
}
