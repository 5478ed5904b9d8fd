//! Tests of what a step can say beyond text in, text out: request fields
//! on steps and in `defaults`, messages with tool calls and tool results,
//! references into structured outputs (checked against the step's schema
//! where it has one), fan-out steps, and the shipped screenplay example.

use serde_json::{Value, json};

use super::*;

fn parse(v: &Value) -> Result<JobSpec, SpecError> {
    JobSpec::parse(v.to_string().as_bytes(), &SpecLimits::default(), &|_| true)
}

#[track_caller]
fn refused(v: &Value, field: &str, needle: &str) -> SpecError {
    let err = parse(v).expect_err("spec should be refused");
    assert_eq!(err.field, field, "{err}");
    assert!(err.message.contains(needle), "{err:?} should contain {needle:?}");
    err
}

fn user(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

/// An outline with a strict schema, a fan-out over its scenes, and a step
/// that reads every instance.
fn fan_out() -> Value {
    json!({
        "name": "fan", "defaults": {"model": "m"},
        "steps": [
            {"id": "outline", "messages": user("Outline"),
             "response_format": {"type": "json_schema", "json_schema": {"name": "outline", "strict": true, "schema": {
                 "type": "object", "additionalProperties": false, "required": ["title", "scenes"],
                 "properties": {"title": {"type": "string"}, "scenes": {"type": "array", "minItems": 2, "items": {
                     "type": "object", "additionalProperties": false, "required": ["heading", "cast"],
                     "properties": {"heading": {"type": "string"}, "cast": {"type": "array", "items": {"type": "string"}}}}}}}}}},
            {"id": "scene", "for_each": "steps.outline.json.scenes",
             "messages": user("{{index}}: {{item.heading}} with {{join(item.cast, \", \")}} in {{steps.outline.json.title}}")},
            {"id": "notes", "messages": user("{{join(steps.scene.outputs, \"\\n---\\n\")}} {{steps.scene.outputs[0]}}")}
        ]
    })
}

fn body_of(spec: &JobSpec, i: usize) -> Value {
    Value::Object(spec.steps[i].body(vec![json!({"role": "user", "content": "x"})]))
}

#[test]
fn request_fields_on_steps_and_in_defaults_reach_the_body() {
    let v = json!({
        "name": "n",
        "defaults": {"model": "m", "max_tokens": 400, "temperature": 0.8, "seed": 7, "stop": "END",
                     "metadata": {"team": "a"}, "extra": {"x_a": 1, "x_b": 2}},
        "steps": [
            {"id": "a", "messages": user("hi")},
            {"id": "b", "messages": user("hi"), "max_completion_tokens": 2000, "reasoning_effort": "high",
             "n": 2, "temperature": 0.2, "logprobs": true, "top_logprobs": 3, "extra": {"x_b": 3}}
        ]
    });
    let spec = parse(&v).unwrap();
    assert_eq!(
        body_of(&spec, 0),
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 400, "temperature": 0.8,
               "seed": 7, "stop": ["END"], "metadata": {"team": "a"}, "x_a": 1, "x_b": 2})
    );
    assert_eq!(
        body_of(&spec, 1),
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2000,
               "temperature": 0.2, "seed": 7, "stop": ["END"], "metadata": {"team": "a"}, "reasoning_effort": "high",
               "n": 2, "logprobs": true, "top_logprobs": 3, "x_a": 1, "x_b": 3}),
        "the step's max_completion_tokens replaces the default max_tokens; extra merges key by key"
    );
    let back = JobSpec::from_stored(&spec.to_stored(), &SpecLimits::default()).unwrap();
    assert_eq!(back, spec);
    assert_eq!(back.to_stored(), spec.to_stored());
}

#[test]
fn a_bad_field_is_named_where_it_was_written() {
    let mut v = fan_out();
    v["steps"][0]["response_format"]["json_schema"]["schema"] = json!("object");
    refused(&v, "steps[0].response_format.json_schema.schema", "JSON object");
    let mut v = fan_out();
    v["defaults"]["top_p"] = json!(2);
    refused(&v, "defaults.top_p", "between 0 and 1");
    let mut v = fan_out();
    v["steps"][2]["stream"] = json!(true);
    refused(&v, "steps[2].stream", "read whole");
    let mut v = fan_out();
    v["defaults"]["tools"] = json!([{"type": "function", "function": {"name": "look"}}]);
    v["steps"][2]["tool_choice"] = json!({"type": "function", "function": {"name": "find"}});
    refused(&v, "steps[2].tool_choice", "not among the tools (look)");
    v["steps"][2].as_object_mut().unwrap().remove("tool_choice");
    v["defaults"]["tool_choice"] = json!("required");
    assert!(parse(&v).is_ok(), "a default tool_choice with default tools");
    v["defaults"].as_object_mut().unwrap().remove("tools");
    refused(&v, "defaults.tool_choice", "only allowed with tools");
}

#[test]
fn messages_carry_tool_calls_and_tool_results() {
    let v = json!({"name": "n", "defaults": {"model": "m"}, "steps": [
        {"id": "plan", "messages": user("Plan"), "tools": [{"type": "function", "function": {"name": "lookup",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}], "tool_choice": "required"},
        {"id": "answer", "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "lookup", "arguments": "{{steps.plan.tool_calls[0].function.arguments}}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Rain, 9 C"}
        ]}
    ]});
    let spec = parse(&v).unwrap();
    assert_eq!(spec.steps[1].deps, [0], "a tool call's arguments are a dependency");
    assert_eq!(JobSpec::from_stored(&spec.to_stored(), &SpecLimits::default()).unwrap(), spec);
    let m = &spec.steps[1].messages;
    assert_eq!(
        (m[2].role, m[2].content.is_none(), m[3].tool_call_id.as_deref()),
        (Role::Assistant, true, Some("call_1"))
    );

    let msg = |m: Value| {
        let mut w = v.clone();
        w["steps"][1]["messages"][3] = m;
        w
    };
    refused(&msg(json!({"role": "tool", "content": "x"})), "steps[1].messages[3].tool_call_id", "required");
    refused(
        &msg(json!({"role": "tool", "tool_call_id": "call_9", "content": "x"})),
        "steps[1].messages[3].tool_call_id",
        "answers no tool call",
    );
    refused(
        &msg(json!({"role": "user", "tool_call_id": "call_1", "content": "x"})),
        "steps[1].messages[3].tool_call_id",
        "only a tool message",
    );
    refused(&msg(json!({"role": "assistant"})), "steps[1].messages[3].content", "must be text");
    refused(
        &msg(json!({"role": "user", "content": "x", "tool_calls": []})),
        "steps[1].messages[3].tool_calls",
        "only an assistant message",
    );
    refused(
        &msg(
            json!({"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "a b", "arguments": "{}"}}]}),
        ),
        "steps[1].messages[3].tool_calls[0].function.name",
        "letters, digits",
    );
    refused(
        &msg(
            json!({"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{{steps.zz.output}}"}}]}),
        ),
        "steps[1].messages[3].tool_calls[0].function.arguments",
        "unknown step \"zz\"",
    );
    refused(
        &msg(
            json!({"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{{steps.plan.tool_calls[0].function.args}}"}}]}),
        ),
        "steps[1].messages[3].tool_calls[0].function.arguments",
        "no property \"args\"",
    );
}

#[test]
fn a_fan_out_step_depends_on_its_source_and_round_trips() {
    let spec = parse(&fan_out()).unwrap();
    assert_eq!(spec.steps[1].deps, [0]);
    assert_eq!(spec.steps[2].deps, [1]);
    assert_eq!(spec.steps[1].for_each.as_ref().map(ToString::to_string).as_deref(), Some("steps.outline.json.scenes"));
    let back = JobSpec::from_stored(&spec.to_stored(), &SpecLimits::default()).unwrap();
    assert_eq!(back, spec);
    assert_eq!(spec.fan_out_cap(256), 256);
    let mut v = fan_out();
    v["max_fan_out"] = json!(10);
    assert_eq!(parse(&v).unwrap().fan_out_cap(256), 10);
    assert_eq!(parse(&v).unwrap().fan_out_cap(4), 4, "the configured cap still bounds a stored job");
    v["max_fan_out"] = json!(257);
    refused(&v, "max_fan_out", "between 1 and 256");
    v["max_fan_out"] = json!(0);
    refused(&v, "max_fan_out", "between 1 and 256");
}

#[test]
fn references_that_can_be_checked_at_submission_are() {
    let edit = |i: usize, content: &str| {
        let mut v = fan_out();
        v["steps"][i]["messages"][0]["content"] = json!(content);
        v
    };
    let f = |i: usize| format!("steps[{i}].messages[0].content");
    refused(&edit(2, "{{item.heading}}"), &f(2), "only defined in a for_each step");
    refused(&edit(0, "{{index}}"), &f(0), "only defined in a for_each step");
    refused(
        &edit(2, "{{steps.scene.output}}"),
        &f(2),
        "is a for_each step; read its instances with steps.scene.outputs",
    );
    refused(&edit(2, "{{steps.outline.outputs}}"), &f(2), "is not a for_each step");
    let err = refused(&edit(1, "{{steps.outline.json.scenes[0].headline}}"), &f(1), "");
    assert_eq!(
        err.message,
        "steps.outline.json.scenes[0].headline: the schema has no property \"headline\" (properties: cast, heading)"
    );
    refused(&edit(1, "{{item.heding}}"), &f(1), "item.heding: the schema has no property \"heding\"");
    refused(&edit(1, "{{item.cast.first}}"), &f(1), "item.cast.first: the schema makes this an array, not an object");
    refused(&edit(2, "{{steps.outline.json.title[0]}}"), &f(2), "makes this a string");
    // Paths the schema leaves open are left to run time.
    assert!(parse(&edit(2, "{{steps.outline.json.scenes[99].heading}}")).is_ok(), "the array's length is not known");

    let source = |src: &str| {
        let mut v = fan_out();
        v["steps"][1]["for_each"] = json!(src);
        v
    };
    refused(&source("steps.outline.json.title"), "steps[1].for_each", "makes this string, never an array");
    refused(&source("steps.outline.output"), "steps[1].for_each", "not an array a step can fan out over");
    refused(&source("inputs.premise"), "steps[1].for_each", "not an array a step can fan out over");
    refused(&source("steps.nope.json"), "steps[1].for_each", "unknown step \"nope\"");
    refused(&source("steps.scene.json"), "steps[1].for_each", "its own output");
    refused(&source("steps.outline.json.scenes["), "steps[1].for_each", "unclosed");
    let mut v = fan_out();
    v["steps"][1]["id"] = json!("scene.json");
    refused(&v, "steps[1].id", "has a part `.json`");
}

#[test]
fn the_screenplay_example_fans_out_over_its_structured_outline() {
    let body = include_str!("../../examples/screenplay.json");
    assert!(body.len() < 60 << 10, "the example should stay small");
    let spec = JobSpec::parse(body.as_bytes(), &SpecLimits::default(), &|_| true).unwrap();
    let stored = JobSpec::from_stored(&spec.to_stored(), &SpecLimits::default()).unwrap();
    assert_eq!(stored, spec);

    let step = |id: &str| &spec.steps[spec.step_index(&StepId::parse(id).unwrap()).unwrap()];
    let idx = |id: &str| spec.step_index(&StepId::parse(id).unwrap()).unwrap();
    let outline = step("outline");
    let schema = outline.params.response_format.as_ref().and_then(|f| f.schema()).expect("a json_schema outline");
    assert_eq!(schema["properties"]["scenes"]["type"], "array");
    let scene = step("scene");
    assert_eq!(scene.for_each.as_ref().unwrap().to_string(), "steps.outline.json.scenes");
    let text = scene.messages[1].content.as_ref().unwrap().source();
    for r in ["{{item.heading}}", "{{item.summary}}", "{{index}}"] {
        assert!(text.contains(r), "scenes use {r}");
    }
    // Scenes wait for the character work and the style guide, never for
    // each other; the continuity pass waits for every scene.
    for dep in ["outline", "protagonist", "antagonist", "supporting_cast", "style_guide"] {
        assert!(scene.deps.contains(&idx(dep)), "scene waits for {dep}");
    }
    assert!(step("continuity").deps.contains(&idx("scene")));
    assert!(step("continuity").messages[1].content.as_ref().unwrap().source().contains("steps.scene.outputs"));
    for id in ["synopsis", "title_page", "polish"] {
        assert!(spec.step_index(&StepId::parse(id).unwrap()).is_some(), "{id}");
    }
}
