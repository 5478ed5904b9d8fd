//! What a JSON Schema says for certain about where a path can lead, so a
//! reference into a step's structured output (`steps.outline.json.scenes[0].heading`,
//! `item.heading`) is checked at submission against the step's
//! `response_format` schema, and a `for_each` over something that can
//! never be an array is refused before anything runs.
//!
//! Only what is definite is refused: a node with `$ref`, `anyOf`/`oneOf`/
//! `allOf`, a list of types or no `type` at all may be anything, and an
//! object that allows additional properties may have any field. Strict
//! structured outputs (every object closed, every type named) are checked
//! fully.

use serde_json::{Value, json};

use super::reference::Segment;

/// Where a path leads in a schema: a sub-schema, or somewhere the schema
/// does not describe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Node<'a> {
    Known(&'a Value),
    Unknown,
}

/// Follows `path` through `schema`; an error when the schema rules it out
/// (the failing segment's index, and why).
pub(crate) fn follow<'a>(schema: &'a Value, path: &[Segment]) -> Result<Node<'a>, (usize, String)> {
    let mut node = Node::Known(schema);
    for (k, seg) in path.iter().enumerate() {
        let Node::Known(s) = node else { return Ok(Node::Unknown) };
        node = match (definite_type(s), seg) {
            (None, _) => Node::Unknown,
            (Some("object"), Segment::Field(name)) => match s.get("properties").and_then(|p| p.get(name)) {
                Some(sub) => Node::Known(sub),
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    let names: Vec<&str> = s
                        .get("properties")
                        .and_then(Value::as_object)
                        .map(|p| p.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    return Err((
                        k,
                        format!("the schema has no property \"{name}\" (properties: {})", names.join(", ")),
                    ));
                }
                None => Node::Unknown,
            },
            (Some("array"), Segment::Index(_)) => match s.get("items") {
                Some(items @ Value::Object(_)) => Node::Known(items),
                _ => Node::Unknown,
            },
            (Some(t), Segment::Field(name)) => {
                return Err((k, format!("the schema makes this {}, not an object with field \"{name}\"", a(t))));
            }
            (Some(t), Segment::Index(i)) => {
                return Err((k, format!("the schema makes this {}, not an array to take [{i}] of", a(t))));
            }
        };
    }
    Ok(node)
}

/// The node's one type, when it has exactly one and nothing that widens it.
pub(crate) fn definite_type(s: &Value) -> Option<&str> {
    let widened = ["$ref", "anyOf", "oneOf", "allOf"].iter().any(|k| s.get(k).is_some());
    if widened {
        return None;
    }
    s.get("type").and_then(Value::as_str)
}

fn a(t: &str) -> String {
    match t {
        "array" | "object" | "integer" => format!("an {t}"),
        "null" => "null".into(),
        _ => format!("a {t}"),
    }
}

/// The shape of `steps.ID.tool_calls`, for checking paths into it.
pub(crate) fn tool_calls() -> Value {
    json!({"type": "array", "items": {"type": "object", "additionalProperties": false, "properties": {
        "id": {"type": "string"},
        "type": {"type": "string"},
        "function": {"type": "object", "additionalProperties": false, "properties": {
            "name": {"type": "string"}, "arguments": {"type": "string"}}}}}})
}

/// The shape of `steps.ID.choices`.
pub(crate) fn choices() -> Value {
    json!({"type": "array", "items": {"type": "object", "additionalProperties": false, "properties": {
        "content": {}, "refusal": {}, "finish_reason": {}, "tool_calls": tool_calls()}}})
}

/// The shape of `steps.ID.outputs`.
pub(crate) fn outputs() -> Value {
    json!({"type": "array", "items": {"type": "string"}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::reference::Reference;
    use crate::spec::reference::parse_reference;

    fn path(r: &str) -> Vec<Segment> {
        match parse_reference(r).unwrap() {
            Reference::Step { path, .. } | Reference::Item(path) => path,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn strict_schemas_are_checked_fully_and_open_ones_only_where_definite() {
        let outline = json!({"type": "object", "additionalProperties": false, "properties": {
            "title": {"type": "string"},
            "scenes": {"type": "array", "items": {"type": "object", "additionalProperties": false,
                "properties": {"heading": {"type": "string"}, "beats": {"type": "array", "items": {"type": "string"}}}}},
            "extra": {"type": "object"},
            "either": {"anyOf": [{"type": "string"}, {"type": "array"}]}}});
        let f = |r: &str| follow(&outline, &path(r));
        assert_eq!(f("steps.o.json.scenes[3].heading"), Ok(Node::Known(&json!({"type": "string"}))));
        assert_eq!(f("steps.o.json.extra.anything[2]"), Ok(Node::Unknown), "an open object");
        assert_eq!(f("steps.o.json.either[0]"), Ok(Node::Unknown), "anyOf may be an array");
        let (k, why) = f("steps.o.json.scenes[0].headline").unwrap_err();
        assert_eq!(k, 2);
        assert_eq!(why, "the schema has no property \"headline\" (properties: beats, heading)");
        assert_eq!(
            f("steps.o.json.title[0]").unwrap_err().1,
            "the schema makes this a string, not an array to take [0] of"
        );
        assert_eq!(
            f("steps.o.json.scenes.heading").unwrap_err().1,
            "the schema makes this an array, not an object with field \"heading\""
        );
        assert_eq!(follow(&json!({}), &path("steps.o.json.a[1].b")), Ok(Node::Unknown));
    }

    #[test]
    fn the_fixed_shapes_of_tool_calls_and_choices_are_checked_too() {
        assert!(follow(&tool_calls(), &path("steps.p.tool_calls[0].function.arguments")).is_ok());
        assert!(follow(&tool_calls(), &path("steps.p.tool_calls[0].function.args")).is_err());
        assert!(follow(&choices(), &path("steps.p.choices[1].tool_calls[0].id")).is_ok());
        assert!(follow(&outputs(), &path("steps.p.outputs[1].x")).is_err());
    }
}
