//! What a placeholder names, and how a name is resolved to a value.
//!
//! The grammar (inside `{{ }}`, whitespace around it ignored):
//!
//! ```text
//! placeholder := reference | "join(" reference "," json-string ")"
//! reference   := "inputs." NAME
//!              | "steps." ID ".output"
//!              | "steps." ID "." ("json" | "tool_calls" | "choices" | "outputs") path
//!              | "item" path
//!              | "index"
//! path        := ( "." FIELD | "[" INDEX "]" )*
//! FIELD       := [A-Za-z0-9_-]+      INDEX := a decimal number, no sign or leading zero
//! ```
//!
//! A step id may contain dots; it ends at the first `.output`, `.json`,
//! `.tool_calls`, `.choices` or `.outputs` after its first part, which is
//! why ids with such a part after the first are refused at submission.
//! Every reference is found when the template is parsed, so the references
//! are still exactly the job's dependency graph.

use std::fmt;

use serde_json::Value;

use crate::domain::StepId;

/// What of a step's answer a reference reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Choice 0's text.
    Output,
    /// Choice 0's text parsed as JSON.
    Json,
    /// Choice 0's tool calls: `[{"id", "type", "function": {"name", "arguments"}}]`.
    ToolCalls,
    /// Every choice's message: `[{"content", "refusal", "tool_calls"?, "finish_reason"}]`.
    Choices,
    /// A fan-out step's instances' texts, in instance order, as a JSON array.
    Outputs,
}

impl View {
    const ALL: [(&'static str, View); 5] = [
        ("output", View::Output),
        ("outputs", View::Outputs),
        ("json", View::Json),
        ("tool_calls", View::ToolCalls),
        ("choices", View::Choices),
    ];

    fn parse(word: &str) -> Option<View> {
        Self::ALL.iter().find(|(w, _)| *w == word).map(|(_, v)| *v)
    }

    pub fn as_str(self) -> &'static str {
        Self::ALL.iter().find(|(_, v)| *v == self).map_or("output", |(w, _)| w)
    }
}

/// Whether `part` (a dot-separated part of a step id) would end the id in
/// a reference.
pub(crate) fn is_view_word(part: &str) -> bool {
    View::parse(part).is_some()
}

/// One step into a JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Field(String),
    Index(usize),
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Segment::Field(name) => write!(f, ".{name}"),
            Segment::Index(i) => write!(f, "[{i}]"),
        }
    }
}

/// A name inside a placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Input(String),
    Step {
        id: StepId,
        view: View,
        path: Vec<Segment>,
    },
    /// The current element of a fan-out step's array.
    Item(Vec<Segment>),
    /// The current instance's position in that array, from 0.
    Index,
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (head, path): (String, &[Segment]) = match self {
            Reference::Input(name) => (format!("inputs.{name}"), &[]),
            Reference::Step { id, view, path } => (format!("steps.{id}.{}", view.as_str()), path),
            Reference::Item(path) => ("item".into(), path),
            Reference::Index => ("index".into(), &[]),
        };
        f.write_str(&head)?;
        path.iter().try_for_each(|s| write!(f, "{s}"))
    }
}

/// What a placeholder renders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placeholder {
    Value(Reference),
    /// The elements of an array, each as it would render alone, with
    /// `separator` between them.
    Join {
        reference: Reference,
        separator: String,
    },
}

impl Placeholder {
    pub fn reference(&self) -> &Reference {
        match self {
            Placeholder::Value(r) | Placeholder::Join { reference: r, .. } => r,
        }
    }
}

const SYNTAX: &str = "expected `inputs.NAME`, `steps.ID.output`, `steps.ID.json…`, `steps.ID.tool_calls…`, \
                      `steps.ID.choices…`, `steps.ID.outputs…`, `item…`, `index` or `join(REFERENCE, \"SEPARATOR\")`";

/// Parses the text between `{{` and `}}`.
pub(crate) fn parse_placeholder(inner: &str) -> Result<Placeholder, String> {
    let inner = inner.trim();
    let Some(args) = inner.strip_prefix("join(") else {
        return parse_reference(inner).map(Placeholder::Value);
    };
    let args = args.strip_suffix(')').ok_or("`join(` must end with `)`")?;
    // References contain no comma, so the first one ends the reference.
    let (reference, separator) =
        args.split_once(',').ok_or("`join` takes a reference and a separator: join(steps.ID.outputs, \"\\n\")")?;
    let reference = parse_reference(reference.trim())?;
    let separator = serde_json::from_str::<String>(separator.trim())
        .map_err(|_| "the separator of `join` must be a JSON string such as \"\\n\\n\"".to_owned())?;
    Ok(Placeholder::Join { reference, separator })
}

pub(crate) fn parse_reference(s: &str) -> Result<Reference, String> {
    if s == "index" {
        return Ok(Reference::Index);
    }
    if let Some(rest) = s.strip_prefix("item")
        && (rest.is_empty() || rest.starts_with(['.', '[']))
    {
        return parse_path(rest).map(Reference::Item);
    }
    if let Some(name) = s.strip_prefix("inputs.") {
        super::template::check_input_name(name)?;
        return Ok(Reference::Input(name.to_owned()));
    }
    let Some(rest) = s.strip_prefix("steps.") else { return Err(SYNTAX.into()) };
    // The id runs to the first view word after its first part.
    let mut offset = rest.find('.').ok_or_else(|| missing_view(rest))?;
    loop {
        let after = &rest[offset + 1..];
        // A view word ends where the id part would: at `.`, `[`, or a
        // character no id has (so `json x` is the view `json`, `json-x`
        // is part of an id).
        let word_end =
            after.find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':'))).unwrap_or(after.len());
        if let Some(view) = View::parse(&after[..word_end]) {
            let id = StepId::parse(&rest[..offset]).map_err(|e| e.0)?;
            let path = parse_path(&after[word_end..])?;
            if view == View::Output && !path.is_empty() {
                return Err(format!(
                    "steps.{id}.output is text; read JSON in it with steps.{id}.json{}",
                    path.iter().map(ToString::to_string).collect::<String>()
                ));
            }
            return Ok(Reference::Step { id, view, path });
        }
        match after.find('.') {
            Some(dot) => offset += 1 + dot,
            None => return Err(missing_view(rest)),
        }
    }
}

fn missing_view(rest: &str) -> String {
    format!(
        "steps.{rest}: a step reference names what it reads, as in `steps.ID.output`, `steps.ID.json.FIELD`, \
         `steps.ID.tool_calls[0].function.arguments`, `steps.ID.choices` or `steps.ID.outputs`"
    )
}

fn parse_path(mut s: &str) -> Result<Vec<Segment>, String> {
    let mut path = Vec::new();
    while !s.is_empty() {
        if let Some(rest) = s.strip_prefix('.') {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')).unwrap_or(rest.len());
            if end == 0 {
                return Err(format!("expected a field name after `.` in `{s}` (letters, digits, `_`, `-`)"));
            }
            path.push(Segment::Field(rest[..end].to_owned()));
            s = &rest[end..];
        } else if let Some(rest) = s.strip_prefix('[') {
            let end = rest.find(']').ok_or_else(|| format!("unclosed `[` in `{s}`"))?;
            let digits = &rest[..end];
            let index = digits
                .parse::<usize>()
                .ok()
                .filter(|i| digits == i.to_string())
                .ok_or_else(|| format!("`[{digits}]` is not an index (a number from 0, without sign)"))?;
            path.push(Segment::Index(index));
            s = &rest[end + 1..];
        } else {
            return Err(format!("unexpected `{s}`: a path goes on with `.FIELD` or `[INDEX]`"));
        }
    }
    Ok(path)
}

/// Why a path does not lead anywhere in a value.
pub(crate) fn walk<'v>(mut value: &'v Value, path: &[Segment]) -> Result<&'v Value, (usize, String)> {
    for (k, seg) in path.iter().enumerate() {
        value = match (seg, value) {
            (Segment::Field(name), Value::Object(map)) => map.get(name).ok_or_else(|| {
                let mut keys: Vec<&str> = map.keys().map(String::as_str).take(20).collect();
                if map.len() > keys.len() {
                    keys.push("…");
                }
                (k, format!("no field \"{name}\" (fields: {})", keys.join(", ")))
            })?,
            (Segment::Index(i), Value::Array(items)) => {
                items.get(*i).ok_or_else(|| (k, format!("index {i} out of range ({} elements)", items.len())))?
            }
            (Segment::Field(name), other) => {
                return Err((k, format!("is {}, not an object with field \"{name}\"", kind(other))));
            }
            (Segment::Index(i), other) => {
                return Err((k, format!("is {}, not an array to take [{i}] of", kind(other))));
            }
        };
    }
    Ok(value)
}

/// "an array", "a string"… for messages.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: &str, view: View, path: Vec<Segment>) -> Reference {
        Reference::Step { id: StepId::parse(id).unwrap(), view, path }
    }

    #[test]
    fn references_parse_and_print_back() {
        use Segment::{Field, Index};
        for (src, want) in [
            ("steps.outline.output", step("outline", View::Output, vec![])),
            ("steps.act1.scene.output", step("act1.scene", View::Output, vec![])),
            ("steps.output.output", step("output", View::Output, vec![])),
            (
                "steps.outline.json.scenes[2].title",
                step("outline", View::Json, vec![Field("scenes".into()), Index(2), Field("title".into())]),
            ),
            ("steps.a.json", step("a", View::Json, vec![])),
            ("steps.a.json[0][10]", step("a", View::Json, vec![Index(0), Index(10)])),
            (
                "steps.plan.tool_calls[0].function.arguments",
                step("plan", View::ToolCalls, vec![Index(0), Field("function".into()), Field("arguments".into())]),
            ),
            ("steps.scene.outputs", step("scene", View::Outputs, vec![])),
            ("steps.d.choices[1].content", step("d", View::Choices, vec![Index(1), Field("content".into())])),
            ("item", Reference::Item(vec![])),
            ("item.heading", Reference::Item(vec![Field("heading".into())])),
            ("item[0].a-b_c", Reference::Item(vec![Index(0), Field("a-b_c".into())])),
            ("index", Reference::Index),
            ("inputs.premise", Reference::Input("premise".into())),
            ("inputs.a.json", Reference::Input("a.json".into())),
        ] {
            let got = parse_reference(src).unwrap_or_else(|e| panic!("{src}: {e}"));
            assert_eq!(got, want, "{src}");
            assert_eq!(got.to_string(), src);
        }
    }

    #[test]
    fn bad_references_say_why() {
        for (src, needle) in [
            ("steps.a", "names what it reads"),
            ("steps.a.result", "names what it reads"),
            ("steps..output", "step id must not be empty"),
            ("steps.a/b.output", "may contain only"),
            ("steps.a.output.x", "is text; read JSON in it with steps.a.json.x"),
            ("steps.a.json.", "expected a field name"),
            ("steps.a.json[", "unclosed `[`"),
            ("steps.a.json[-1]", "is not an index"),
            ("steps.a.json[01]", "is not an index"),
            ("steps.a.json[1", "unclosed"),
            ("steps.a.json x", "unexpected"),
            ("steps.a.json.b c", "unexpected"),
            ("items", "expected `inputs.NAME`"),
            ("index.x", "expected `inputs.NAME`"),
            ("premise", "expected `inputs.NAME`"),
            ("inputs.", "input name must not be empty"),
        ] {
            let err = parse_reference(src).expect_err(src);
            assert!(err.contains(needle), "{src}: {err}");
        }
    }

    #[test]
    fn join_takes_a_reference_and_a_json_string() {
        let p = parse_placeholder(r#"join(steps.scene.outputs, "\n\n---\n\n")"#).unwrap();
        assert_eq!(
            p,
            Placeholder::Join { reference: step("scene", View::Outputs, vec![]), separator: "\n\n---\n\n".into() }
        );
        let p = parse_placeholder(r#" join( item.lines , ", " ) "#).unwrap();
        assert_eq!(p.reference(), &Reference::Item(vec![Segment::Field("lines".into())]));
        for bad in
            ["join(steps.a.outputs)", "join(steps.a.outputs, x)", "join(steps.a.outputs, \"x\"", "join(nope, \"\")"]
        {
            assert!(parse_placeholder(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn walking_a_value_names_the_failing_segment() {
        let v = serde_json::json!({"scenes": [{"title": "a"}, {"title": "b"}], "n": 2});
        let path = |s: &str| parse_path(s).unwrap();
        assert_eq!(walk(&v, &path(".scenes[1].title")).unwrap(), "b");
        assert_eq!(walk(&v, &path(".scenes[40]")).unwrap_err(), (1, "index 40 out of range (2 elements)".into()));
        assert_eq!(walk(&v, &path(".nope")).unwrap_err(), (0, "no field \"nope\" (fields: n, scenes)".into()));
        assert_eq!(walk(&v, &path(".n.x")).unwrap_err().1, "is a number, not an object with field \"x\"");
        assert_eq!(walk(&v, &path("[0]")).unwrap_err().1, "is an object, not an array to take [0] of");
    }
}
