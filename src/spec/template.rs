//! Message templates: literal text with `{{ … }}` placeholders.
//!
//! The syntax is deliberately tiny and strict, and parsed here rather than by
//! a general template engine: the references *are* the job's dependency
//! graph, so we must extract every one of them at submission, and anything a
//! general engine would accept (filters, loops, conditionals) would hide
//! dependencies from the scheduler. What may stand inside the braces is in
//! [`super::reference`]: inputs, a step's text, JSON paths into its JSON
//! output or tool calls, a fan-out step's outputs, a fan-out instance's
//! `item` and `index`, and `join(…)` of an array.
//!
//! Rules:
//! - `{{` opens a placeholder, closed by the next `}}`; whitespace just inside
//!   the braces is ignored (`{{ inputs.premise }}`).
//! - an unclosed `{{` or a placeholder the grammar refuses is an error.
//! - a `}}` with no `{{` before it, and single `{` or `}`, are literal text
//!   (so JSON examples in prompts need no care).
//! - there is no escape: a prompt cannot contain a literal `{{`. No prompt has
//!   needed one, and an escape syntax would be one more thing to get wrong.
//! - a value that is a string renders as its text; any other JSON value
//!   (number, object, array, null) renders as compact JSON.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use super::reference::{self, Placeholder, Reference, Segment, View};
use crate::answer::StepAnswer;
use crate::domain::StepId;

/// Longest input name; the same bound as ids, so names stay readable in errors.
const MAX_INPUT_NAME: usize = 64;

/// Why a template's text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TemplateError {
    pub message: String,
}

impl TemplateError {
    fn new(message: impl Into<String>) -> Self {
        Self { message: message.into() }
    }
}

/// Why a template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("rendered prompt would exceed {max_bytes} bytes")]
    TooLarge { max_bytes: usize },
    #[error("input {0:?} is not set")]
    MissingInput(String),
    #[error("output of step \"{0}\" is not available")]
    MissingOutput(StepId),
    /// A reference that does not lead to a value in what the earlier
    /// steps answered: `reference` up to the part that failed, and why.
    #[error("{reference}: {reason}")]
    Unresolved { reference: String, reason: String },
}

/// What a step's references see of an earlier step.
#[derive(Debug, Clone, Copy)]
pub enum StepOutput<'a> {
    One(&'a StepAnswer),
    /// A fan-out step: its instances' answers in instance order.
    Group(&'a [Arc<StepAnswer>]),
}

/// Where a template's references are looked up when it is rendered.
pub trait Scope {
    fn input(&self, name: &str) -> Option<&str>;
    fn step(&self, id: &StepId) -> Option<StepOutput<'_>>;
    /// The current fan-out element and its index, in an instance.
    fn item(&self) -> Option<(&Value, usize)>;
}

/// A scope of inputs and finished steps, without a fan-out element.
pub struct Steps<'a, F: Fn(&StepId) -> Option<StepOutput<'a>>> {
    pub inputs: &'a BTreeMap<String, String>,
    pub steps: F,
}

impl<'a, F: Fn(&StepId) -> Option<StepOutput<'a>>> Scope for Steps<'a, F> {
    fn input(&self, name: &str) -> Option<&str> {
        self.inputs.get(name).map(String::as_str)
    }
    fn step(&self, id: &StepId) -> Option<StepOutput<'_>> {
        (self.steps)(id)
    }
    fn item(&self) -> Option<(&Value, usize)> {
        None
    }
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    /// Byte range into the source, so literals are not copied twice.
    Literal(std::ops::Range<usize>),
    Placeholder(Placeholder),
}

/// A parsed message template. Equality is on the source text: the parts are
/// a function of it.
#[derive(Debug, Clone)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl PartialEq for Template {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Template {
    pub fn parse(s: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut pos = 0;
        while let Some(open) = s[pos..].find("{{").map(|i| pos + i) {
            if open > pos {
                parts.push(Part::Literal(pos..open));
            }
            let inner_start = open + 2;
            let close = s[inner_start..]
                .find("}}")
                .map(|i| inner_start + i)
                .ok_or_else(|| TemplateError::new(format!("unclosed `{{{{` at byte {open}")))?;
            let raw = &s[inner_start..close];
            let placeholder =
                reference::parse_placeholder(raw).map_err(|e| TemplateError::new(format!("`{{{{{raw}}}}}`: {e}")))?;
            parts.push(Part::Placeholder(placeholder));
            pos = close + 2;
        }
        if pos < s.len() {
            parts.push(Part::Literal(pos..s.len()));
        }
        Ok(Template { source: s.to_owned(), parts })
    }

    /// The original text; what is stored, so a stored spec round-trips.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Every placeholder in order of appearance (repeats included).
    pub fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.parts.iter().filter_map(|p| match p {
            Part::Placeholder(p) => Some(p),
            Part::Literal(_) => None,
        })
    }

    /// Every reference in order of appearance (repeats included).
    pub fn references(&self) -> impl Iterator<Item = &Reference> {
        self.placeholders().map(Placeholder::reference)
    }

    /// Every step referenced, in order of appearance (repeats included).
    pub fn step_refs(&self) -> impl Iterator<Item = &StepId> {
        self.references().filter_map(|r| match r {
            Reference::Step { id, .. } => Some(id),
            _ => None,
        })
    }

    /// Every `{{inputs.NAME}}` in order of appearance (repeats included).
    pub fn input_refs(&self) -> impl Iterator<Item = &str> {
        self.references().filter_map(|r| match r {
            Reference::Input(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// Substitutes every placeholder from `scope`. The size cap is checked
    /// before each piece is appended, so a template that repeats a large
    /// output many times fails after at most `max_bytes` of work and memory.
    pub fn render(&self, scope: &dyn Scope, max_bytes: usize) -> Result<String, RenderError> {
        let mut out = Out { text: String::with_capacity(self.source.len().min(max_bytes)), max_bytes };
        for part in &self.parts {
            match part {
                Part::Literal(range) => out.push(&self.source[range.clone()])?,
                Part::Placeholder(Placeholder::Value(r)) => render_value(r, scope, &mut out)?,
                Part::Placeholder(Placeholder::Join { reference, separator }) => {
                    let array = resolve(reference, scope)?;
                    let Value::Array(items) = array.get() else {
                        let what = reference::kind(array.get());
                        return Err(unresolved(reference, last(reference), format!("is {what}, not an array to join")));
                    };
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(separator)?;
                        }
                        out.push_value(item)?;
                    }
                }
            }
        }
        Ok(out.text)
    }
}

/// The JSON value a reference names in `scope` (a `for_each` source).
pub fn resolve_value(r: &Reference, scope: &dyn Scope) -> Result<Value, RenderError> {
    Ok(match resolve(r, scope)? {
        Resolved::Borrowed(v) => v.clone(),
        Resolved::Owned(v) => v,
    })
}

/// The rendered text and its cap.
struct Out {
    text: String,
    max_bytes: usize,
}

impl Out {
    fn push(&mut self, piece: &str) -> Result<(), RenderError> {
        if piece.len() > self.max_bytes.saturating_sub(self.text.len()) {
            return Err(RenderError::TooLarge { max_bytes: self.max_bytes });
        }
        self.text.push_str(piece);
        Ok(())
    }

    /// A string as its text, anything else as compact JSON.
    fn push_value(&mut self, v: &Value) -> Result<(), RenderError> {
        match v {
            Value::String(s) => self.push(s),
            other => self.push(&other.to_string()),
        }
    }
}

fn render_value(r: &Reference, scope: &dyn Scope, out: &mut Out) -> Result<(), RenderError> {
    // Text is appended as it is, without building a JSON value of it.
    match r {
        Reference::Input(name) => out.push(scope.input(name).ok_or_else(|| RenderError::MissingInput(name.clone()))?),
        Reference::Step { id, view: View::Output, .. } => match scope.step(id) {
            Some(StepOutput::One(answer)) => out.push(answer.output()),
            Some(StepOutput::Group(_)) => Err(unresolved(r, None, "is a fan-out step: read it with `outputs`".into())),
            None => Err(RenderError::MissingOutput(id.clone())),
        },
        _ => out.push_value(resolve(r, scope)?.get()),
    }
}

/// A resolved value: borrowed from the scope, or built for the reference.
enum Resolved<'s> {
    Borrowed(&'s Value),
    Owned(Value),
}

impl Resolved<'_> {
    fn get(&self) -> &Value {
        match self {
            Resolved::Borrowed(v) => v,
            Resolved::Owned(v) => v,
        }
    }
}

/// The value a reference names (for `inputs` and `index`: their text as a
/// JSON string, their number).
fn resolve<'s>(r: &Reference, scope: &'s dyn Scope) -> Result<Resolved<'s>, RenderError> {
    let (base, path): (Resolved<'s>, &[Segment]) = match r {
        Reference::Input(name) => {
            let v = scope.input(name).ok_or_else(|| RenderError::MissingInput(name.clone()))?;
            (Resolved::Owned(Value::from(v)), &[])
        }
        Reference::Index => {
            let (_, i) = scope.item().ok_or_else(|| unresolved(r, None, "only a for_each step has an index".into()))?;
            (Resolved::Owned(Value::from(i)), &[])
        }
        Reference::Item(path) => {
            let (item, _) =
                scope.item().ok_or_else(|| unresolved(r, None, "only a for_each step has an item".into()))?;
            (Resolved::Borrowed(item), path)
        }
        Reference::Step { id, view, path } => {
            let found = scope.step(id).ok_or_else(|| RenderError::MissingOutput(id.clone()))?;
            (Resolved::Owned(step_value(r, id, *view, found)?), path)
        }
    };
    if path.is_empty() {
        return Ok(base);
    }
    match reference::walk(base.get(), path) {
        Ok(found) => Ok(Resolved::Owned(found.clone())),
        Err((k, reason)) => Err(unresolved(r, Some(k), reason)),
    }
}

/// The JSON a view of a step's answer is.
fn step_value(r: &Reference, id: &StepId, view: View, found: StepOutput<'_>) -> Result<Value, RenderError> {
    match (view, found) {
        (View::Outputs, StepOutput::Group(answers)) => {
            Ok(Value::Array(answers.iter().map(|a| Value::from(a.output())).collect()))
        }
        (View::Outputs, StepOutput::One(_)) => {
            Err(unresolved(r, None, format!("step {id} is not a for_each step: read it with `output`")))
        }
        (_, StepOutput::Group(_)) => Err(unresolved(r, None, "is a fan-out step: read it with `outputs`".into())),
        (View::Output, StepOutput::One(a)) => Ok(Value::from(a.output())),
        (View::Json, StepOutput::One(a)) => serde_json::from_str(a.output())
            .map_err(|e| unresolved(r, None, format!("the output of step {id} is not JSON ({e})"))),
        // Plain structs of strings: serializing them cannot fail.
        (View::ToolCalls, StepOutput::One(a)) => Ok(serde_json::to_value(&a.first().tool_calls).unwrap_or_default()),
        (View::Choices, StepOutput::One(a)) => Ok(serde_json::to_value(a.choices()).unwrap_or_default()),
    }
}

/// The index of a reference's last path segment, to name it whole.
fn last(r: &Reference) -> Option<usize> {
    match r {
        Reference::Step { path, .. } | Reference::Item(path) => path.len().checked_sub(1),
        _ => None,
    }
}

/// An `Unresolved` naming the reference up to segment `k` (without its
/// path when `None`).
fn unresolved(r: &Reference, k: Option<usize>, reason: String) -> RenderError {
    let shown = match (r, k) {
        (Reference::Step { id, view, path }, Some(k)) => {
            Reference::Step { id: id.clone(), view: *view, path: path.iter().take(k + 1).cloned().collect() }
                .to_string()
        }
        (Reference::Item(path), Some(k)) => Reference::Item(path.iter().take(k + 1).cloned().collect()).to_string(),
        (Reference::Step { id, view, .. }, None) => format!("steps.{id}.{}", view.as_str()),
        (Reference::Item(_), None) => "item".into(),
        (other, _) => other.to_string(),
    };
    RenderError::Unresolved { reference: shown, reason }
}

/// Input names appear inside placeholders and as keys of `inputs`, so both
/// sides are checked by the same rule.
pub(crate) fn check_input_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("input name must not be empty".into());
    }
    if name.len() > MAX_INPUT_NAME {
        return Err(format!("input name is longer than {MAX_INPUT_NAME} characters"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')) {
        return Err(format!("input name {name:?} may contain only letters, digits, '-', '_', '.' and ':'"));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;
    use crate::answer::{AssistantMessage, FunctionCall, ToolCall};

    fn sid(s: &str) -> StepId {
        StepId::parse(s).unwrap()
    }

    /// A scope for tests: inputs, single answers, groups, and an item.
    #[derive(Default)]
    pub(crate) struct TestScope {
        pub inputs: BTreeMap<String, String>,
        pub answers: BTreeMap<StepId, StepAnswer>,
        pub groups: BTreeMap<StepId, Vec<Arc<StepAnswer>>>,
        pub item: Option<(Value, usize)>,
    }

    impl Scope for TestScope {
        fn input(&self, name: &str) -> Option<&str> {
            self.inputs.get(name).map(String::as_str)
        }
        fn step(&self, id: &StepId) -> Option<StepOutput<'_>> {
            self.answers
                .get(id)
                .map(StepOutput::One)
                .or_else(|| self.groups.get(id).map(|g| StepOutput::Group(g.as_slice())))
        }
        fn item(&self) -> Option<(&Value, usize)> {
            self.item.as_ref().map(|(v, i)| (v, *i))
        }
    }

    fn scope(inputs: &[(&str, &str)], outputs: &[(&str, &str)]) -> TestScope {
        TestScope {
            inputs: inputs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            answers: outputs.iter().map(|(k, v)| (sid(k), StepAnswer::text(v.to_string()))).collect(),
            ..TestScope::default()
        }
    }

    fn render(t: &str, inputs: &[(&str, &str)], outputs: &[(&str, &str)]) -> Result<String, RenderError> {
        Template::parse(t).unwrap().render(&scope(inputs, outputs), 1 << 20)
    }

    #[test]
    fn renders_inputs_and_outputs() {
        let got = render(
            "Premise: {{inputs.premise}}\nOutline:\n{{steps.outline.output}}.",
            &[("premise", "a heist")],
            &[("outline", "1. rob bank")],
        )
        .unwrap();
        assert_eq!(got, "Premise: a heist\nOutline:\n1. rob bank.");
    }

    #[test]
    fn whitespace_inside_braces_is_ignored() {
        let got = render("[{{ inputs.x }}|{{\n\tsteps.a.output  }}]", &[("x", "1")], &[("a", "2")]);
        assert_eq!(got.unwrap(), "[1|2]");
    }

    #[test]
    fn lone_braces_are_literal() {
        let src = "json: {\"a\": {\"b\": 1}} and }} and { x } done";
        assert_eq!(render(src, &[], &[]).unwrap(), src);
        assert_eq!(Template::parse(src).unwrap().source(), src);
    }

    #[test]
    fn template_without_placeholders_and_empty_template() {
        assert_eq!(render("plain", &[], &[]).unwrap(), "plain");
        assert_eq!(render("", &[], &[]).unwrap(), "");
    }

    #[test]
    fn extracts_references_in_order() {
        let t = Template::parse(
            "{{steps.b.output}} {{inputs.x}} {{steps.a.json.k}} {{join(steps.b.outputs, \",\")}} {{item.z}}",
        )
        .unwrap();
        let steps: Vec<&str> = t.step_refs().map(StepId::as_str).collect();
        assert_eq!(steps, ["b", "a", "b"]);
        assert_eq!(t.input_refs().collect::<Vec<_>>(), ["x"]);
        assert_eq!(t.references().count(), 5);
    }

    #[test]
    fn step_ids_with_dots_are_allowed() {
        let t = Template::parse("{{steps.act1.scene.output}}").unwrap();
        assert_eq!(t.step_refs().next().unwrap().as_str(), "act1.scene");
    }

    #[test]
    fn parse_errors() {
        for (src, needle) in [
            ("hello {{inputs.x", "unclosed `{{` at byte 6"),
            ("{{ premise }}", "expected `inputs.NAME`"),
            ("{{outputs.a}}", "expected `inputs.NAME`"),
            ("{{}}", "expected `inputs.NAME`"),
            ("{{inputs.}}", "input name must not be empty"),
            ("{{inputs.a b}}", "may contain only"),
            ("{{steps.a}}", "names what it reads"),
            ("{{steps.a.result}}", "names what it reads"),
            ("{{steps..output}}", "step id must not be empty"),
            ("{{steps.a/b.output}}", "may contain only"),
            ("{{{inputs.x}}}", "expected `inputs.NAME`"),
            ("{{ a {{inputs.x}}", "expected `inputs.NAME`"),
            ("{{steps.a.json.x[}}", "unclosed `[`"),
        ] {
            let err = Template::parse(src).unwrap_err();
            assert!(err.message.contains(needle), "{src:?}: {err}");
        }
    }

    #[test]
    fn missing_references_at_render() {
        assert_eq!(render("{{inputs.x}}", &[], &[]), Err(RenderError::MissingInput("x".into())));
        assert_eq!(render("{{steps.a.output}}", &[], &[]), Err(RenderError::MissingOutput(sid("a"))));
    }

    #[test]
    fn json_paths_read_into_structured_output_and_say_why_they_fail() {
        let outline =
            json!({"title": "Tide", "scenes": [{"heading": "INT. LIGHTHOUSE"}, {"heading": "EXT. PIER", "n": 2}]});
        let s = scope(&[], &[("outline", &outline.to_string()), ("prose", "not json")]);
        let r = |t: &str| Template::parse(t).unwrap().render(&s, 1 << 20);
        assert_eq!(r("{{steps.outline.json.scenes[1].heading}}").unwrap(), "EXT. PIER");
        assert_eq!(r("{{steps.outline.json.scenes[1].n}}").unwrap(), "2", "numbers render as JSON");
        assert_eq!(r("{{steps.outline.json.scenes[0]}}").unwrap(), r#"{"heading":"INT. LIGHTHOUSE"}"#);
        assert_eq!(
            r("{{join(steps.outline.json.scenes, \" | \")}}").unwrap(),
            r#"{"heading":"INT. LIGHTHOUSE"} | {"heading":"EXT. PIER","n":2}"#
        );
        let err = r("{{steps.outline.json.scenes[40].heading}}").unwrap_err();
        assert_eq!(err.to_string(), "steps.outline.json.scenes[40]: index 40 out of range (2 elements)");
        let err = r("{{steps.prose.json.x}}").unwrap_err().to_string();
        assert!(err.starts_with("steps.prose.json: the output of step prose is not JSON"), "{err}");
        let err = r("{{join(steps.outline.json.title, \",\")}}").unwrap_err().to_string();
        assert_eq!(err, "steps.outline.json.title: is a string, not an array to join");
    }

    #[test]
    fn tool_calls_choices_groups_and_items() {
        let call = ToolCall {
            id: "call_7".into(),
            kind: "function".into(),
            function: FunctionCall { name: "lookup".into(), arguments: "{\"city\":\"Oban\"}".into() },
        };
        let plan = StepAnswer::new(vec![
            AssistantMessage { tool_calls: vec![call], finish_reason: Some("tool_calls".into()), ..Default::default() },
            AssistantMessage { content: Some("second".into()), ..Default::default() },
        ])
        .unwrap();
        let mut s = scope(&[], &[]);
        s.answers.insert(sid("plan"), plan);
        s.groups.insert(
            sid("scene"),
            vec![Arc::new(StepAnswer::text("one".into())), Arc::new(StepAnswer::text("two".into()))],
        );
        s.item = Some((json!({"heading": "INT. ROOM", "cast": ["A", "B"]}), 3));
        let r = |t: &str| Template::parse(t).unwrap().render(&s, 1 << 20);
        assert_eq!(r("{{steps.plan.tool_calls[0].function.arguments}}").unwrap(), "{\"city\":\"Oban\"}");
        assert_eq!(r("{{steps.plan.tool_calls[0].id}}/{{steps.plan.output}}|").unwrap(), "call_7/|");
        assert_eq!(r("{{steps.plan.choices[1].content}}").unwrap(), "second");
        assert_eq!(r("{{steps.scene.outputs}}").unwrap(), r#"["one","two"]"#);
        assert_eq!(r("{{join(steps.scene.outputs, \"\\n\\n\")}}").unwrap(), "one\n\ntwo");
        assert_eq!(
            r("#{{index}} {{item.heading}} {{join(item.cast, \" & \")}} {{item}}").unwrap(),
            r#"#3 INT. ROOM A & B {"cast":["A","B"],"heading":"INT. ROOM"}"#
        );
        assert!(r("{{steps.scene.output}}").unwrap_err().to_string().contains("read it with `outputs`"));
        assert!(r("{{steps.plan.outputs}}").unwrap_err().to_string().contains("not a for_each step"));
        assert_eq!(r("{{item.cast[2]}}").unwrap_err().to_string(), "item.cast[2]: index 2 out of range (2 elements)");
        s.item = None;
        let r = |t: &str| Template::parse(t).unwrap().render(&s, 1 << 20);
        assert!(r("{{index}}").unwrap_err().to_string().contains("only a for_each step"));
    }

    #[test]
    fn render_cap_is_exact() {
        let t = Template::parse("ab{{inputs.x}}").unwrap();
        let s = scope(&[("x", "cd")], &[]);
        assert_eq!(t.render(&s, 4).unwrap(), "abcd");
        assert_eq!(t.render(&s, 3), Err(RenderError::TooLarge { max_bytes: 3 }));
        assert_eq!(t.render(&s, 1), Err(RenderError::TooLarge { max_bytes: 1 }));
        let j = Template::parse("{{join(steps.g.outputs, \"--\")}}").unwrap();
        let mut s = scope(&[], &[]);
        s.groups.insert(sid("g"), (0..3).map(|_| Arc::new(StepAnswer::text("abc".into()))).collect());
        assert_eq!(j.render(&s, 13).unwrap(), "abc--abc--abc");
        assert_eq!(j.render(&s, 12), Err(RenderError::TooLarge { max_bytes: 12 }));
    }

    #[test]
    fn huge_output_referenced_many_times_is_refused() {
        // 1,000 references to a 1 MiB output would be 1 GB rendered; the cap
        // must stop it at 2 MiB without building it.
        let big = "x".repeat(1 << 20);
        let t = Template::parse(&"{{steps.big.output}}".repeat(1000)).unwrap();
        let s = scope(&[], &[("big", &big)]);
        assert_eq!(t.render(&s, 2 << 20), Err(RenderError::TooLarge { max_bytes: 2 << 20 }));
    }
}
