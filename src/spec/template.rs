//! Message templates: literal text with `{{inputs.NAME}}` and
//! `{{steps.ID.output}}` placeholders.
//!
//! The syntax is deliberately tiny and strict, and parsed here rather than by
//! a general template engine: the references *are* the job's dependency
//! graph, so we must extract every one of them at submission, and anything a
//! general engine would accept (filters, loops, conditionals) would hide
//! dependencies from the scheduler.
//!
//! Rules:
//! - `{{` opens a placeholder, closed by the next `}}`; whitespace just inside
//!   the braces is ignored (`{{ inputs.premise }}`).
//! - the placeholder must be `inputs.NAME` (NAME: letters, digits, `_`, `-`,
//!   `.`, `:`) or `steps.ID.output` (ID: a valid step id); anything else,
//!   including an unclosed `{{`, is an error.
//! - a `}}` with no `{{` before it, and single `{` or `}`, are literal text
//!   (so JSON examples in prompts need no care).
//! - there is no escape: a prompt cannot contain a literal `{{`. No prompt has
//!   needed one, and an escape syntax would be one more thing to get wrong.

use std::collections::BTreeMap;

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
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    /// Byte range into the source, so literals are not copied twice.
    Literal(std::ops::Range<usize>),
    Input(String),
    StepOutput(StepId),
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
            parts.push(parse_placeholder(&s[inner_start..close])?);
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

    /// Every `{{steps.ID.output}}` in order of appearance (repeats included).
    pub fn step_refs(&self) -> impl Iterator<Item = &StepId> {
        self.parts.iter().filter_map(|p| match p {
            Part::StepOutput(id) => Some(id),
            _ => None,
        })
    }

    /// Every `{{inputs.NAME}}` in order of appearance (repeats included).
    pub fn input_refs(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Input(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// Substitutes inputs and step outputs. The size cap is checked before
    /// each piece is appended, so a template that repeats a large output many
    /// times fails after at most `max_bytes` of work and memory.
    pub fn render<'o>(
        &self,
        inputs: &BTreeMap<String, String>,
        outputs: &dyn Fn(&StepId) -> Option<&'o str>,
        max_bytes: usize,
    ) -> Result<String, RenderError> {
        let mut out = String::with_capacity(self.source.len().min(max_bytes));
        for part in &self.parts {
            let piece: &str = match part {
                Part::Literal(range) => &self.source[range.clone()],
                Part::Input(name) => {
                    inputs.get(name).map(String::as_str).ok_or_else(|| RenderError::MissingInput(name.clone()))?
                }
                Part::StepOutput(id) => outputs(id).ok_or_else(|| RenderError::MissingOutput(id.clone()))?,
            };
            if piece.len() > max_bytes.saturating_sub(out.len()) {
                return Err(RenderError::TooLarge { max_bytes });
            }
            out.push_str(piece);
        }
        Ok(out)
    }
}

fn parse_placeholder(raw: &str) -> Result<Part, TemplateError> {
    let inner = raw.trim();
    let shown = || format!("`{{{{{raw}}}}}`");
    if let Some(name) = inner.strip_prefix("inputs.") {
        check_input_name(name).map_err(|e| TemplateError::new(format!("{}: {e}", shown())))?;
        return Ok(Part::Input(name.to_owned()));
    }
    if let Some(rest) = inner.strip_prefix("steps.") {
        let id = rest.strip_suffix(".output").ok_or_else(|| {
            TemplateError::new(format!(
                "{}: a step reference must end in `.output`, as in `{{{{steps.ID.output}}}}`",
                shown()
            ))
        })?;
        let id = StepId::parse(id).map_err(|e| TemplateError::new(format!("{}: {e}", shown())))?;
        return Ok(Part::StepOutput(id));
    }
    Err(TemplateError::new(format!("{}: expected `{{{{inputs.NAME}}}}` or `{{{{steps.ID.output}}}}`", shown())))
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
mod tests {
    use super::*;

    fn sid(s: &str) -> StepId {
        StepId::parse(s).unwrap()
    }

    fn render(t: &str, inputs: &[(&str, &str)], outputs: &[(&str, &str)]) -> Result<String, RenderError> {
        let inputs: BTreeMap<String, String> = inputs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let outputs: BTreeMap<StepId, String> = outputs.iter().map(|(k, v)| (sid(k), v.to_string())).collect();
        Template::parse(t).unwrap().render(&inputs, &|id| outputs.get(id).map(String::as_str), 1 << 20)
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
        let t = Template::parse("{{steps.b.output}} {{inputs.x}} {{steps.a.output}} {{steps.b.output}}").unwrap();
        let steps: Vec<&str> = t.step_refs().map(StepId::as_str).collect();
        assert_eq!(steps, ["b", "a", "b"]);
        assert_eq!(t.input_refs().collect::<Vec<_>>(), ["x"]);
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
            ("{{ premise }}", "expected `{{inputs.NAME}}` or `{{steps.ID.output}}`"),
            ("{{outputs.a}}", "expected `{{inputs.NAME}}`"),
            ("{{}}", "expected `{{inputs.NAME}}`"),
            ("{{inputs.}}", "input name must not be empty"),
            ("{{inputs.a b}}", "may contain only"),
            ("{{steps.a}}", "must end in `.output`"),
            ("{{steps.a.result}}", "must end in `.output`"),
            ("{{steps..output}}", "step id must not be empty"),
            ("{{steps.a/b.output}}", "may contain only"),
            ("{{{inputs.x}}}", "expected `{{inputs.NAME}}`"),
            ("{{ a {{inputs.x}}", "expected `{{inputs.NAME}}`"),
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
    fn render_cap_is_exact() {
        let t = Template::parse("ab{{inputs.x}}").unwrap();
        let inputs = BTreeMap::from([("x".to_string(), "cd".to_string())]);
        let none = |_: &StepId| None;
        assert_eq!(t.render(&inputs, &none, 4).unwrap(), "abcd");
        assert_eq!(t.render(&inputs, &none, 3), Err(RenderError::TooLarge { max_bytes: 3 }));
        assert_eq!(t.render(&inputs, &none, 1), Err(RenderError::TooLarge { max_bytes: 1 }));
    }

    #[test]
    fn huge_output_referenced_many_times_is_refused() {
        // 1,000 references to a 1 MiB output would be 1 GB rendered; the cap
        // must stop it at 2 MiB without building it.
        let big = "x".repeat(1 << 20);
        let t = Template::parse(&"{{steps.big.output}}".repeat(1000)).unwrap();
        let inputs = BTreeMap::new();
        let out = |id: &StepId| (id.as_str() == "big").then_some(big.as_str());
        assert_eq!(t.render(&inputs, &out, 2 << 20), Err(RenderError::TooLarge { max_bytes: 2 << 20 }));
    }
}
