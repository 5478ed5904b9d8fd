//! Tests of spec validation (one per rule, each checking the field named),
//! the stored round trip, scheduling queries and the shipped example.

use serde_json::{Value, json};

use super::*;

fn serves(m: &ModelName) -> bool {
    m.as_str() != "gpt-9"
}

fn parse_with(v: &Value, limits: &SpecLimits) -> Result<JobSpec, SpecError> {
    JobSpec::parse(v.to_string().as_bytes(), limits, &serves)
}

fn parse(v: &Value) -> Result<JobSpec, SpecError> {
    parse_with(v, &SpecLimits::default())
}

/// A valid spec: `a` uses an input, `b` uses `a`.
fn base() -> Value {
    json!({
        "name": "test",
        "inputs": {"premise": "a heist"},
        "defaults": {"model": "gpt-4o-mini"},
        "steps": [
            {"id": "a", "messages": [{"role": "user", "content": "Premise: {{inputs.premise}}"}]},
            {"id": "b", "messages": [
                {"role": "system", "content": "You edit."},
                {"role": "user", "content": "Edit: {{ steps.a.output }}"}
            ]}
        ]
    })
}

/// The error for `base()` changed by `edit`, checked to name `field`.
#[track_caller]
fn rejects(edit: impl FnOnce(&mut Value), field: &str, needle: &str) -> SpecError {
    let mut v = base();
    edit(&mut v);
    let err = parse(&v).expect_err("spec should be refused");
    assert_eq!(err.field, field, "{err}");
    assert!(err.message.contains(needle), "{err:?} should contain {needle:?}");
    err
}

fn step(id: &str, content: &str) -> Value {
    json!({"id": id, "messages": [{"role": "user", "content": content}]})
}

fn set(done: &[usize]) -> HashSet<usize> {
    done.iter().copied().collect()
}

// ---------------------------------------------------------------- accepted

#[test]
fn parses_and_resolves_defaults() {
    let spec = parse(&base()).unwrap();
    assert_eq!(spec.name, "test");
    assert_eq!(spec.priority, Priority::Interactive);
    assert_eq!(spec.max_parallel, None);
    assert_eq!(spec.inputs["premise"], "a heist");
    let b = &spec.steps[1];
    assert_eq!(b.id.as_str(), "b");
    assert_eq!(b.model.as_str(), "gpt-4o-mini");
    assert_eq!(b.params.allowance(), 512);
    assert_eq!(b.params.temperature, None, "unset: the provider's default, not sent");
    assert_eq!(b.deps, [0]);
    assert_eq!(b.messages[0].role, Role::System);
    assert_eq!(b.messages[1].role.as_str(), "user");
    assert_eq!(b.messages[1].content.as_ref().unwrap().source(), "Edit: {{ steps.a.output }}");
    assert!(spec.steps[0].deps.is_empty());
}

#[test]
fn step_values_override_defaults() {
    let mut v = base();
    v["priority"] = json!("batch");
    v["max_parallel"] = json!(64);
    v["defaults"] = json!({"model": "gpt-4o-mini", "max_tokens": 300, "temperature": 0.5});
    v["steps"][1]["model"] = json!("gpt-4o");
    v["steps"][1]["max_tokens"] = json!(131072);
    v["steps"][1]["temperature"] = json!(0.0);
    let spec = parse(&v).unwrap();
    assert_eq!(spec.priority, Priority::Batch);
    assert_eq!(spec.max_parallel, Some(64));
    assert_eq!(
        (spec.steps[0].model.as_str(), spec.steps[0].params.allowance(), spec.steps[0].params.temperature),
        ("gpt-4o-mini", 300, Some(0.5))
    );
    assert_eq!(
        (spec.steps[1].model.as_str(), spec.steps[1].params.allowance(), spec.steps[1].params.temperature),
        ("gpt-4o", 131072, Some(0.0))
    );
}

#[test]
fn deps_union_templates_and_depends_on() {
    let v = json!({
        "name": "n",
        "defaults": {"model": "m"},
        "steps": [
            step("a", "x"),
            step("b", "x"),
            step("c", "x"),
            {"id": "d", "depends_on": ["c", "a", "c"], "messages": [
                {"role": "user", "content": "{{steps.c.output}} {{steps.b.output}} {{steps.c.output}}"}
            ]}
        ]
    });
    let spec = parse(&v).unwrap();
    assert_eq!(spec.steps[3].deps, [0, 1, 2]);
}

#[test]
fn references_may_point_forward() {
    let v = json!({"name": "n", "defaults": {"model": "m"},
        "steps": [step("last", "{{steps.first.output}}"), step("first", "go")]});
    let spec = parse(&v).unwrap();
    assert_eq!(spec.steps[0].deps, [1]);
    assert_eq!(spec.ready(&set(&[]), &set(&[])), [1]);
}

// ---------------------------------------------------------------- body and serde errors

#[test]
fn body_not_json_names_body_with_position() {
    let err = JobSpec::parse(b"{\"name\": ", &SpecLimits::default(), &serves).unwrap_err();
    assert_eq!(err.field, "body");
    assert!(err.message.contains("line 1 column"), "{err}");
    let err = JobSpec::parse(b"{\n  \"name\": x}", &SpecLimits::default(), &serves).unwrap_err();
    assert_eq!(err.field, "body");
    assert!(err.message.contains("line 2 column"), "{err}");
}

#[test]
fn trailing_data_and_non_object_bodies_are_refused() {
    let body = format!("{} {{}}", base());
    let err = JobSpec::parse(body.as_bytes(), &SpecLimits::default(), &serves).unwrap_err();
    assert_eq!(err.field, "body", "{err}");
    let err = JobSpec::parse(b"[\"n\", {}, {}, [], null, []]", &SpecLimits::default(), &serves).unwrap_err();
    assert_eq!(err.to_string(), "body: must be a JSON object");
    let err = JobSpec::parse(b"", &SpecLimits::default(), &serves).unwrap_err();
    assert_eq!(err.field, "body", "{err}");
}

#[test]
fn structs_written_as_arrays_are_refused() {
    rejects(|v| v["defaults"] = json!(["gpt-4o-mini"]), "defaults", "must be a JSON object");
    rejects(|v| v["steps"][1] = json!(["b", []]), "steps[1]", "must be a JSON object");
    rejects(|v| v["steps"][1]["messages"][1] = json!(["user", "hi"]), "steps[1].messages[1]", "must be a JSON object");
    rejects(|v| v["steps"][1]["messages"] = json!("hi"), "steps[1].messages", "invalid type: string");
}

#[test]
fn duplicate_keys_are_refused() {
    let body = r#"{"name": "a", "name": "b", "steps": []}"#;
    let err = JobSpec::parse(body.as_bytes(), &SpecLimits::default(), &serves).unwrap_err();
    assert_eq!(err.to_string(), "name: appears more than once");
    let mut v = base();
    v["steps"][0]["model"] = json!("m");
    let body = v.to_string().replace(r#""model":"m""#, r#""model":"m","model":"n""#);
    let err = JobSpec::parse(body.as_bytes(), &SpecLimits::default(), &serves).unwrap_err();
    assert_eq!(err.to_string(), "steps[0].model: appears more than once");
}

#[test]
fn oversized_body() {
    let limits = SpecLimits { max_body_bytes: 100, ..SpecLimits::default() };
    let err = parse_with(&base(), &limits).unwrap_err();
    assert_eq!(err.field, "body");
    assert!(err.message.contains("more than the limit of 100"), "{err}");
}

#[test]
fn wrong_type_names_the_path_without_position() {
    let err = rejects(|v| v["steps"][1]["max_tokens"] = json!("x"), "steps[1].max_tokens", "");
    assert_eq!(err.to_string(), "steps[1].max_tokens: must be an integer between 1 and 131072, got \"x\"");
    rejects(|v| v["inputs"]["premise"] = json!(3), "inputs.premise", "invalid type: integer");
    rejects(|v| v["steps"][0]["messages"][0]["content"] = json!(null), "steps[0].messages[0].content", "must be text");
    rejects(|v| v["steps"] = json!({}), "steps", "invalid type: map");
    rejects(|v| v["steps"][1]["max_tokens"] = json!(-1), "steps[1].max_tokens", "got -1");
}

#[test]
fn unknown_fields_are_refused() {
    rejects(|v| v["colour"] = json!("red"), "colour", "unknown field `colour`");
    rejects(|v| v["steps"][1]["temprature"] = json!(1), "steps[1].temprature", "unknown field `temprature`");
    rejects(|v| v["defaults"]["top_q"] = json!(1), "defaults.top_q", "unknown field `top_q`");
    rejects(|v| v["steps"][1]["temprature"] = json!(1), "steps[1].temprature", "goes in `extra`");
    rejects(|v| v["steps"][0]["messages"][0]["name"] = json!("x"), "steps[0].messages[0].name", "unknown field");
}

/// Found by the property tests: an empty key left the error naming "".
#[test]
fn an_empty_key_names_the_object_that_holds_it() {
    let err = JobSpec::parse(br#"{"": null}"#, &SpecLimits::default(), &serves).unwrap_err();
    assert_eq!(err.field, "body", "{err}");
    rejects(|v| v["steps"][0][""] = json!(1), "steps[0]", "unknown field ``");
}

#[test]
fn missing_required_fields_name_the_field() {
    rejects(|v| drop(v.as_object_mut().unwrap().remove("name")), "name", "required");
    rejects(|v| drop(v.as_object_mut().unwrap().remove("steps")), "steps", "required");
    rejects(|v| drop(v["steps"][1].as_object_mut().unwrap().remove("id")), "steps[1].id", "required");
    rejects(
        |v| drop(v["steps"][1]["messages"][1].as_object_mut().unwrap().remove("role")),
        "steps[1].messages[1].role",
        "required",
    );
}

#[test]
fn invalid_role_and_priority() {
    rejects(
        |v| v["steps"][0]["messages"][0]["role"] = json!("robot"),
        "steps[0].messages[0].role",
        "unknown variant `robot`",
    );
    rejects(|v| v["priority"] = json!("urgent"), "priority", "unknown variant `urgent`");
}

// ---------------------------------------------------------------- top-level rules

#[test]
fn name_rules() {
    rejects(|v| v["name"] = json!(""), "name", "must not be empty");
    rejects(|v| v["name"] = json!("   "), "name", "must not be empty");
    rejects(|v| v["name"] = json!("é".repeat(201)), "name", "201 characters");
    let mut v = base();
    v["name"] = json!("é".repeat(200));
    assert!(parse(&v).is_ok());
}

#[test]
fn input_rules() {
    let limits = SpecLimits { max_inputs: 1, max_input_bytes: 10, ..SpecLimits::default() };
    let mut v = base();
    v["inputs"]["extra"] = json!("x");
    let err = parse_with(&v, &limits).unwrap_err();
    assert_eq!((err.field.as_str(), err.message.contains("more than the limit of 1")), ("inputs", true), "{err}");

    let mut v = base();
    v["inputs"]["premise"] = json!("x".repeat(11));
    let err = parse_with(&v, &limits).unwrap_err();
    assert_eq!(err.field, "inputs.premise", "{err}");
    assert!(err.message.contains("11 bytes"), "{err}");

    rejects(|v| v["inputs"]["bad name"] = json!("x"), "inputs", "may contain only");
}

#[test]
fn max_parallel_rules() {
    rejects(|v| v["max_parallel"] = json!(0), "max_parallel", "between 1 and 64, got 0");
    rejects(|v| v["max_parallel"] = json!(65), "max_parallel", "got 65");
}

#[test]
fn step_count_rules() {
    rejects(|v| v["steps"] = json!([]), "steps", "at least one step");
    let limits = SpecLimits { max_steps: 1, ..SpecLimits::default() };
    let err = parse_with(&base(), &limits).unwrap_err();
    assert_eq!(err.field, "steps");
    assert!(err.message.contains("2 steps, more than the limit of 1"), "{err}");
}

// ---------------------------------------------------------------- per-step rules

#[test]
fn duplicate_and_invalid_step_ids() {
    let err = rejects(|v| v["steps"][1]["id"] = json!("a"), "steps[1].id", "duplicate step id \"a\"");
    assert!(err.message.contains("steps[0]"), "{err}");
    rejects(|v| v["steps"][1]["id"] = json!("scene 3"), "steps[1].id", "may contain only");
    rejects(|v| v["steps"][1]["id"] = json!(""), "steps[1].id", "must not be empty");
}

#[test]
fn message_count_rules() {
    rejects(|v| v["steps"][0]["messages"] = json!([]), "steps[0].messages", "at least one message");
    let limits = SpecLimits { max_messages_per_step: 1, ..SpecLimits::default() };
    let err = parse_with(&base(), &limits).unwrap_err();
    assert_eq!(err.field, "steps[1].messages");
    assert!(err.message.contains("2 messages"), "{err}");
}

#[test]
fn template_rules() {
    rejects(
        |v| v["steps"][1]["messages"][1]["content"] = json!(""),
        "steps[1].messages[1].content",
        "must not be empty",
    );
    rejects(
        |v| v["steps"][1]["messages"][0]["content"] = json!("{{ premise }}"),
        "steps[1].messages[0].content",
        "expected `inputs.NAME`",
    );
    rejects(
        |v| v["steps"][1]["messages"][1]["content"] = json!("{{steps.a"),
        "steps[1].messages[1].content",
        "unclosed",
    );
    let limits = SpecLimits { max_template_bytes: 10, ..SpecLimits::default() };
    let err = parse_with(&base(), &limits).unwrap_err();
    assert_eq!(err.field, "steps[0].messages[0].content");
    assert!(err.message.contains("more than the limit of 10"), "{err}");
}

#[test]
fn reference_rules() {
    let err = rejects(
        |v| v["steps"][1]["messages"][1]["content"] = json!("{{inputs.premis}}"),
        "steps[1].messages[1].content",
        "",
    );
    assert_eq!(err.to_string(), "steps[1].messages[1].content: unknown input \"premis\"");
    rejects(
        |v| v["steps"][1]["messages"][1]["content"] = json!("{{steps.z.output}}"),
        "steps[1].messages[1].content",
        "unknown step \"z\"",
    );
    rejects(
        |v| v["steps"][1]["messages"][1]["content"] = json!("{{steps.b.output}}"),
        "steps[1].messages[1].content",
        "its own output",
    );
    rejects(|v| v["steps"][1]["depends_on"] = json!(["a", "nope"]), "steps[1].depends_on[1]", "unknown step \"nope\"");
    rejects(|v| v["steps"][1]["depends_on"] = json!(["b"]), "steps[1].depends_on[0]", "cannot depend on itself");
    rejects(|v| v["steps"][1]["depends_on"] = json!(["bad id"]), "steps[1].depends_on[0]", "may contain only");
}

#[test]
fn cycles_name_a_step_and_the_path() {
    // a <-> b through a template and a depends_on.
    let err = rejects(|v| v["steps"][0]["depends_on"] = json!(["b"]), "steps[0]", "");
    assert_eq!(err.message, "dependency cycle a -> b -> a (each step depends on the next)");

    // A 3-cycle behind an innocent step, reported from its lowest index.
    let v = json!({"name": "n", "defaults": {"model": "m"}, "steps": [
        step("ok", "fine"),
        step("x", "{{steps.z.output}} {{steps.ok.output}}"),
        step("y", "{{steps.x.output}}"),
        step("z", "{{steps.y.output}}"),
        step("after", "{{steps.z.output}}"),
    ]});
    let err = parse(&v).unwrap_err();
    assert_eq!(err.to_string(), "steps[1]: dependency cycle x -> z -> y -> x (each step depends on the next)");
}

#[test]
fn model_rules() {
    let err = rejects(|v| drop(v.as_object_mut().unwrap().remove("defaults")), "steps[0].model", "");
    assert_eq!(err.to_string(), "steps[0].model: no model given and no defaults.model");
    let err = rejects(|v| v["steps"][1]["model"] = json!("gpt-9"), "steps[1].model", "");
    assert_eq!(err.to_string(), "steps[1].model: model \"gpt-9\" is not served by any configured org");
    rejects(|v| v["defaults"]["model"] = json!("gpt-9"), "steps[0].model", "(from defaults.model)");
    rejects(|v| v["defaults"]["model"] = json!("gpt 4"), "defaults.model", "may contain only");
}

#[test]
fn max_tokens_rules() {
    rejects(|v| v["steps"][1]["max_tokens"] = json!(0), "steps[1].max_tokens", "between 1 and 131072, got 0");
    rejects(|v| v["steps"][1]["max_tokens"] = json!(131073), "steps[1].max_tokens", "got 131073");
    rejects(|v| v["defaults"]["max_tokens"] = json!(0), "defaults.max_tokens", "got 0");
}

#[test]
fn temperature_rules() {
    rejects(|v| v["steps"][0]["temperature"] = json!(-0.1), "steps[0].temperature", "between 0 and 2");
    rejects(|v| v["steps"][0]["temperature"] = json!(2.01), "steps[0].temperature", "got 2.01");
    rejects(|v| v["defaults"]["temperature"] = json!(3), "defaults.temperature", "got 3");
    rejects(|v| v["steps"][0]["temperature"] = json!(1e39), "steps[0].temperature", "got 1e+39");
}

// ---------------------------------------------------------------- storage and queries

#[test]
fn stored_form_round_trips() {
    let mut v = base();
    v["priority"] = json!("batch");
    v["max_parallel"] = json!(3);
    v["defaults"]["temperature"] = json!(0.7);
    v["steps"][0]["max_tokens"] = json!(99);
    v["steps"].as_array_mut().unwrap().push(json!({
        "id": "c", "depends_on": ["a"], "temperature": 0.1,
        "messages": [{"role": "assistant", "content": "{ literal }} {{steps.b.output}}"}]
    }));
    let spec = parse(&v).unwrap();
    let stored = spec.to_stored();
    let back = JobSpec::from_stored(&stored, &SpecLimits::default()).unwrap();
    assert_eq!(back, spec);
    assert_eq!(back.to_stored(), stored, "the stored form is canonical");
    assert_eq!(back.steps[2].params.temperature, Some(0.1));
    assert_eq!(back.steps[0].params.temperature, Some(0.7));
}

#[test]
fn from_stored_skips_model_and_body_checks() {
    let mut v = base();
    v["defaults"]["model"] = json!("retired-model");
    let limits = SpecLimits::default();
    let spec = JobSpec::parse(v.to_string().as_bytes(), &limits, &|_| true).unwrap();
    let stored = spec.to_stored();
    let tight = SpecLimits { max_body_bytes: 1, ..limits };
    assert_eq!(JobSpec::from_stored(&stored, &tight).unwrap(), spec);
    let err = JobSpec::from_stored("not json", &limits).unwrap_err();
    assert_eq!(err.field, "body");
}

#[test]
fn step_index_finds_ids() {
    let spec = parse(&base()).unwrap();
    assert_eq!(spec.step_index(&StepId::parse("b").unwrap()), Some(1));
    assert_eq!(spec.step_index(&StepId::parse("zz").unwrap()), None);
}

#[test]
fn ready_on_a_diamond_spec() {
    let v = json!({"name": "n", "defaults": {"model": "m"}, "steps": [
        step("top", "go"),
        step("left", "{{steps.top.output}}"),
        step("right", "{{steps.top.output}}"),
        step("bottom", "{{steps.left.output}} {{steps.right.output}}"),
    ]});
    let spec = parse(&v).unwrap();
    assert_eq!(spec.ready(&set(&[]), &set(&[])), [0]);
    assert_eq!(spec.ready(&set(&[0]), &set(&[])), [1, 2]);
    assert_eq!(spec.ready(&set(&[0]), &set(&[2])), [1]);
    assert_eq!(spec.ready(&set(&[0, 1]), &set(&[2])), Vec::<usize>::new());
    assert_eq!(spec.ready(&set(&[0, 1, 2]), &set(&[])), [3]);
    assert_eq!(spec.ready(&set(&[0, 1, 2, 3]), &set(&[])), Vec::<usize>::new());
}

#[test]
fn rendering_a_parsed_step() {
    let spec = parse(&base()).unwrap();
    let a = crate::answer::StepAnswer::text("draft".into());
    let scope = template::Steps {
        inputs: &spec.inputs,
        steps: |id: &StepId| (id.as_str() == "a").then_some(StepOutput::One(&a)),
    };
    let mut budget = 1 << 20;
    let got = spec.steps[1].messages[1].render(&scope, &mut budget).unwrap();
    assert_eq!(got, json!({"role": "user", "content": "Edit: draft"}));
    assert_eq!(budget, (1 << 20) - "Edit: draft".len());
}

#[test]
fn cache_is_off_by_default_set_per_job_and_overridden_per_step() {
    let spec = parse(&base()).unwrap();
    assert!(spec.steps.iter().all(|s| !s.cache));
    let mut v = base();
    v["cache"] = json!(true);
    v["steps"][1]["cache"] = json!(false);
    v["cache_ttl_secs"] = json!(600);
    let spec = parse(&v).unwrap();
    assert_eq!(spec.steps.iter().map(|s| s.cache).collect::<Vec<_>>(), [true, false]);
    assert_eq!(spec.cache_ttl_secs, Some(600));
    let mut v = base();
    v["steps"][0]["cache"] = json!(true);
    assert_eq!(parse(&v).unwrap().steps.iter().map(|s| s.cache).collect::<Vec<_>>(), [true, false]);
}

#[test]
fn cache_ttl_must_be_between_a_second_and_thirty_days() {
    rejects(|v| v["cache_ttl_secs"] = json!(0), "cache_ttl_secs", "between 1 and");
    rejects(|v| v["cache_ttl_secs"] = json!(31 * 24 * 3600), "cache_ttl_secs", "between 1 and");
    rejects(|v| v["cache_ttl_secs"] = json!(-5), "cache_ttl_secs", "invalid value");
    rejects(|v| v["cache"] = json!("yes"), "cache", "invalid type");
}

#[test]
fn webhook_url_shape_is_checked_and_stored() {
    rejects(|v| v["webhook_url"] = json!("ftp://hooks.example.com/x"), "webhook_url", "http");
    rejects(|v| v["webhook_url"] = json!("https://user:pw@hooks.example.com/x"), "webhook_url", "");
    rejects(|v| v["webhook_url"] = json!("not a url"), "webhook_url", "");
    rejects(|v| v["webhook_url"] = json!(format!("https://example.com/{}", "a".repeat(3000))), "webhook_url", "limit");
    let mut v = base();
    v["webhook_url"] = json!("https://hooks.example.com/jobs?token=abc");
    let spec = parse(&v).unwrap();
    let stored = spec.to_stored();
    assert_eq!(JobSpec::stored_webhook_url(&stored).as_deref(), Some("https://hooks.example.com/jobs?token=abc"));
    assert_eq!(JobSpec::stored_webhook_url(&parse(&base()).unwrap().to_stored()), None);
}

#[test]
fn cache_settings_and_webhook_survive_the_stored_round_trip() {
    let mut v = base();
    v["cache"] = json!(true);
    v["steps"][1]["cache"] = json!(false);
    v["cache_ttl_secs"] = json!(60);
    v["webhook_url"] = json!("https://hooks.example.com/j");
    let spec = parse(&v).unwrap();
    let again = JobSpec::from_stored(&spec.to_stored(), &SpecLimits::default()).unwrap();
    assert_eq!(again, spec);
}

#[test]
fn tier_and_fallback_wait_are_parsed_checked_and_stored() {
    let mut v = base();
    v["steps"][1]["tier"] = json!("cheap");
    v["fallback_after_secs"] = json!(5);
    let spec = parse(&v).unwrap();
    assert_eq!(spec.steps.iter().map(|s| s.tier).collect::<Vec<_>>(), [Tier::Standard, Tier::Cheap]);
    assert_eq!(spec.fallback_after_secs, Some(5));
    assert_eq!(JobSpec::from_stored(&spec.to_stored(), &SpecLimits::default()).unwrap(), spec);
    rejects(|v| v["steps"][0]["tier"] = json!("premium"), "steps[0].tier", "unknown variant");
    rejects(|v| v["fallback_after_secs"] = json!(3601), "fallback_after_secs", "at most 3600");
}

#[test]
fn a_deadline_is_a_positive_number_of_seconds_up_to_a_week_and_is_stored() {
    let mut v = base();
    v["deadline_secs"] = json!(600);
    let spec = parse(&v).unwrap();
    assert_eq!(spec.deadline_secs, Some(600));
    assert_eq!(JobSpec::from_stored(&spec.to_stored(), &SpecLimits::default()).unwrap(), spec);
    assert_eq!(parse(&base()).unwrap().deadline_secs, None, "the configured default applies");
    rejects(|v| v["deadline_secs"] = json!(0), "deadline_secs", "between 1 and 604800");
    rejects(|v| v["deadline_secs"] = json!(7 * 24 * 3600 + 1), "deadline_secs", "between 1 and 604800");
    rejects(|v| v["deadline_secs"] = json!(-5), "deadline_secs", "invalid value");
    rejects(|v| v["deadline_secs"] = json!(1.5), "deadline_secs", "");
    rejects(|v| v["deadline_secs"] = json!("60"), "deadline_secs", "");
}
