//! Tests of the request fields: each one's type and range, named where it
//! was written; the merge of a step over `defaults`; the wire form.

use serde_json::json;

use super::*;

fn parse(v: Value) -> Result<ChatParams, SpecError> {
    ChatParams::parse(v.as_object().unwrap(), "steps[0]", 131_072)
}

#[track_caller]
fn refused(v: Value, field: &str, needle: &str) {
    let e = parse(v).expect_err("refused");
    assert_eq!(e.field, field, "{e}");
    assert!(e.message.contains(needle), "{e}");
}

#[test]
fn every_field_parses_and_writes_back_the_same() {
    let all = json!({
        "max_completion_tokens": 900, "temperature": 0.8, "top_p": 0.95, "frequency_penalty": -0.5,
        "presence_penalty": 1.5, "logit_bias": {"50256": -100, "1": 2.5}, "logprobs": true, "top_logprobs": 5,
        "n": 3, "stop": ["\n\n", "END"], "seed": -42,
        "response_format": {"type": "json_schema", "json_schema": {"name": "outline", "description": "d", "strict": true,
            "schema": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": false}}},
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "x", "strict": false,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": false, "reasoning_effort": "low", "service_tier": "flex", "verbosity": "high",
        "store": false, "user": "u-1", "safety_identifier": "s", "prompt_cache_key": "k",
        "metadata": {"team": "screenplays"}, "extra": {"x_vendor": {"a": [1]}}
    });
    let p = parse(all.clone()).unwrap();
    assert_eq!(Value::Object(p.stored_fields()), all, "the stored form is what was written");
    let mut body = all.as_object().unwrap().clone();
    let extra = body.remove("extra").unwrap();
    body.extend(extra.as_object().unwrap().clone());
    assert_eq!(p.body_fields(), body, "the body carries extra's fields beside the known ones");
    p.check_merged(&|f| f.to_owned()).unwrap();
    assert_eq!(p.allowance(), 900);
    // Reading what was stored gives the same value back.
    assert_eq!(ChatParams::parse(&p.stored_fields(), "s", 131_072).unwrap(), p);
    // A single stop string is a list of one.
    assert_eq!(parse(json!({"stop": "END"})).unwrap().stop, Some(vec!["END".to_owned()]));
}

#[test]
fn each_field_is_checked_for_type_and_range_naming_it() {
    refused(json!({"temperature": 2.5}), "steps[0].temperature", "between 0 and 2");
    refused(json!({"temperature": "hot"}), "steps[0].temperature", "must be a number");
    refused(json!({"top_p": 1.01}), "steps[0].top_p", "between 0 and 1");
    refused(json!({"frequency_penalty": -2.1}), "steps[0].frequency_penalty", "between -2 and 2");
    refused(json!({"presence_penalty": 3}), "steps[0].presence_penalty", "between -2 and 2");
    refused(json!({"max_tokens": 0}), "steps[0].max_tokens", "between 1 and 131072");
    refused(json!({"max_completion_tokens": 1.5}), "steps[0].max_completion_tokens", "an integer");
    refused(json!({"max_tokens": 5, "max_completion_tokens": 5}), "steps[0].max_completion_tokens", "not both");
    refused(json!({"n": 0}), "steps[0].n", "between 1 and 16");
    refused(json!({"n": 17}), "steps[0].n", "between 1 and 16");
    refused(json!({"top_logprobs": 21}), "steps[0].top_logprobs", "between 0 and 20");
    refused(json!({"logprobs": "yes"}), "steps[0].logprobs", "true or false");
    refused(json!({"logit_bias": {"abc": 1}}), "steps[0].logit_bias.abc", "token id");
    refused(json!({"logit_bias": {"007": 1}}), "steps[0].logit_bias.007", "token id");
    refused(json!({"logit_bias": {"7": 101}}), "steps[0].logit_bias.7", "between -100 and 100");
    refused(json!({"logit_bias": [1]}), "steps[0].logit_bias", "JSON object");
    refused(json!({"stop": []}), "steps[0].stop", "1 to 4");
    refused(json!({"stop": ["a", "b", "c", "d", "e"]}), "steps[0].stop", "1 to 4");
    refused(json!({"stop": [""]}), "steps[0].stop", "must not be empty");
    refused(json!({"stop": [1]}), "steps[0].stop[0]", "a string");
    refused(json!({"seed": 1.5}), "steps[0].seed", "an integer");
    refused(json!({"seed": u64::MAX}), "steps[0].seed", "an integer");
    refused(json!({"reasoning_effort": "max"}), "steps[0].reasoning_effort", "one of none, minimal");
    refused(json!({"service_tier": "gold"}), "steps[0].service_tier", "one of auto, default");
    refused(json!({"verbosity": 1}), "steps[0].verbosity", "a string");
    refused(json!({"user": ""}), "steps[0].user", "1 to 512");
    refused(json!({"metadata": {"k": 1}}), "steps[0].metadata.k", "a string");
    let many: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    refused(json!({"metadata": many}), "steps[0].metadata", "more than the limit of 16");
    refused(json!({"metadata": {"x".repeat(65): "v"}}), &format!("steps[0].metadata.{}", "x".repeat(65)), "1 to 64");
    refused(json!({"metadata": {"k": "v".repeat(513)}}), "steps[0].metadata.k", "at most 512");
    refused(json!({"stream": true}), "steps[0].stream", "read whole");
    refused(json!({"respones_format": {}}), "steps[0].respones_format", "unknown field");
    refused(json!({"extra": {"temperature": 1}}), "steps[0].extra.temperature", "known field");
    refused(json!({"extra": {"messages": []}}), "steps[0].extra.messages", "sets this field itself");
    refused(json!({"extra": {"stream": true}}), "steps[0].extra.stream", "sets this field itself");
    refused(json!({"extra": 1}), "steps[0].extra", "JSON object");
}

#[test]
fn response_format_tools_and_tool_choice_are_checked_to_the_field() {
    let rf = |v: Value| json!({"response_format": v});
    refused(rf(json!({"type": "xml"})), "steps[0].response_format.type", "text, json_object, json_schema");
    refused(rf(json!({})), "steps[0].response_format.type", "missing");
    refused(rf(json!({"type": "json_schema"})), "steps[0].response_format.json_schema", "missing");
    refused(
        rf(json!({"type": "json_schema", "json_schema": {"name": "o"}})),
        "steps[0].response_format.json_schema.schema",
        "missing",
    );
    refused(
        rf(json!({"type": "json_schema", "json_schema": {"name": "o", "schema": []}})),
        "steps[0].response_format.json_schema.schema",
        "JSON object",
    );
    refused(
        rf(json!({"type": "json_schema", "json_schema": {"name": "o o", "schema": {}}})),
        "steps[0].response_format.json_schema.name",
        "letters, digits",
    );
    refused(
        rf(json!({"type": "json_schema", "json_schema": {"name": "o", "schema": {}, "strict": 1}})),
        "steps[0].response_format.json_schema.strict",
        "true or false",
    );
    refused(
        rf(json!({"type": "json_schema", "json_schema": {"name": "o", "schema": {}, "x": 1}})),
        "steps[0].response_format.json_schema.x",
        "unknown field",
    );
    refused(rf(json!({"type": "text", "json_schema": {}})), "steps[0].response_format.json_schema", "unknown field");
    let tool = |name: &str| json!({"type": "function", "function": {"name": name}});
    refused(json!({"tools": []}), "steps[0].tools", "1 to 128");
    refused(json!({"tools": [{"type": "retrieval"}]}), "steps[0].tools[0].type", "\"function\"");
    refused(json!({"tools": [tool("a b")]}), "steps[0].tools[0].function.name", "letters, digits");
    refused(json!({"tools": [tool(&"x".repeat(65))]}), "steps[0].tools[0].function.name", "1 to 64");
    refused(json!({"tools": [tool("a"), tool("a")]}), "steps[0].tools[1].function.name", "duplicate tool name");
    refused(
        json!({"tools": [{"type": "function", "function": {"name": "a", "parameters": "x"}}]}),
        "steps[0].tools[0].function.parameters",
        "JSON object",
    );
    refused(json!({"tool_choice": "sometimes"}), "steps[0].tool_choice", "none, auto, required");
    refused(
        json!({"tool_choice": {"type": "function", "function": {}}}),
        "steps[0].tool_choice.function.name",
        "missing",
    );
}

#[test]
fn merged_fields_are_checked_together_naming_where_each_was_set() {
    let d = parse(json!({"max_tokens": 400, "temperature": 0.8, "tools": [{"type": "function", "function": {"name": "a"}}], "extra": {"k": 1, "j": 2}})).unwrap();
    let s = parse(json!({"max_completion_tokens": 900, "tool_choice": {"type": "function", "function": {"name": "b"}}, "extra": {"k": 3}})).unwrap();
    let m = ChatParams::merged(&s, &d);
    assert_eq!((m.max_tokens, m.max_completion_tokens, m.temperature), (None, Some(900), Some(0.8)));
    assert_eq!(m.extra, json!({"k": 3, "j": 2}).as_object().unwrap().clone());
    let origin = |f: &str| {
        if s.tool_choice.is_some() && f == "tool_choice" { format!("steps[1].{f}") } else { format!("defaults.{f}") }
    };
    let e = m.check_merged(&origin).unwrap_err();
    assert_eq!(e.field, "steps[1].tool_choice");
    assert!(e.message.contains("not among the tools (a)"), "{e}");
    let e = parse(json!({"top_logprobs": 2})).unwrap().check_merged(&|f| f.into()).unwrap_err();
    assert_eq!((e.field.as_str(), e.message.as_str()), ("top_logprobs", "needs \"logprobs\": true"));
    let e = parse(json!({"tool_choice": "auto"})).unwrap().check_merged(&|f| f.into()).unwrap_err();
    assert_eq!(e.field, "tool_choice");
    let e = parse(json!({"parallel_tool_calls": true})).unwrap().check_merged(&|f| f.into()).unwrap_err();
    assert_eq!(e.field, "parallel_tool_calls");
    assert_eq!(ChatParams::default().allowance(), DEFAULT_MAX_TOKENS);
    assert_eq!(ChatParams::default().body_fields(), json!({"max_tokens": 512}).as_object().unwrap().clone());
    assert!(ChatParams::default().stored_fields().is_empty());
}
