//! Property tests of the spec parser and the templater against hostile
//! input: arbitrary bytes, arbitrary strings, structured-but-wild JSON and
//! mutated valid specs. Neither may panic; an accepted spec survives its
//! stored round trip and can always be run to the end; a refused one names
//! a field that exists; a render matches a model of the template and never
//! exceeds its cap; a JSON path renders what it points at; a step reserves
//! what the provider documents for its body. The same parsers have
//! cargo-fuzz targets in `fuzz/`.

use std::collections::{BTreeMap, HashSet};

use super::template::tests::TestScope;
use crate::answer::StepAnswer;

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::*;

/// Cases per property; the parsers are cheap, so more than proptest's 256.
const SPEC_CASES: u32 = 2_000;
const TEMPLATE_CASES: u32 = 4_000;

fn serves(m: &ModelName) -> bool {
    m.as_str() != "unserved"
}

/// Small limits, so that inputs a few hundred bytes long reach every size
/// check as well as the checks behind them.
fn tight() -> SpecLimits {
    SpecLimits {
        max_body_bytes: 2048,
        max_steps: 6,
        max_messages_per_step: 3,
        max_template_bytes: 96,
        max_inputs: 3,
        max_input_bytes: 64,
        ..SpecLimits::default()
    }
}

/// Parses `body` under both limit sets and checks what every outcome must
/// satisfy: see the module doc.
fn check_parse(body: &[u8]) -> Result<(), TestCaseError> {
    for limits in [SpecLimits::default(), tight()] {
        match JobSpec::parse(body, &limits, &serves) {
            Ok(spec) => check_accepted(&spec, &limits)?,
            Err(e) => {
                prop_assert!(!e.message.is_empty(), "empty message for {}", e.field);
                prop_assert!(!e.field.is_empty());
            }
        }
    }
    Ok(())
}

fn check_accepted(spec: &JobSpec, limits: &SpecLimits) -> Result<(), TestCaseError> {
    let stored = spec.to_stored();
    let back = JobSpec::from_stored(&stored, limits);
    prop_assert_eq!(back.as_ref(), Ok(spec), "stored form {} did not re-read", stored);
    prop_assert_eq!(back.map(|b| b.to_stored()).ok(), Some(stored), "stored form is not canonical");
    prop_assert!(spec.steps.len() <= limits.max_steps && !spec.steps.is_empty());

    // Accepted means runnable: taking whatever is ready until nothing is
    // must finish every step (no cycle, no dangling dependency).
    let mut done = HashSet::new();
    loop {
        let ready = spec.ready(&done, &HashSet::new());
        if ready.is_empty() {
            break;
        }
        for i in ready {
            prop_assert!(spec.steps[i].deps.iter().all(|d| done.contains(d)));
            done.insert(i);
        }
    }
    prop_assert_eq!(done.len(), spec.steps.len(), "some steps can never run");
    Ok(())
}

// ---------------------------------------------------------------- strategies

/// Text that tends to contain template syntax, valid and not.
fn template_text() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("{{".to_string()),
        Just("}}".to_string()),
        Just("{".to_string()),
        Just("}".to_string()),
        Just(" ".to_string()),
        Just("inputs.".to_string()),
        Just("steps.".to_string()),
        Just(".output".to_string()),
        Just("{{inputs.x}}".to_string()),
        Just("{{ steps.a.output }}".to_string()),
        Just("{{steps.b.output}}".to_string()),
        prop::sample::select(vec!["a", "b", "x", "y", "é", "\u{0}", "\n", "µ", "..", "/"]).prop_map(String::from),
        "\\PC{0,6}",
    ];
    prop::collection::vec(token, 0..12).prop_map(|t| t.concat())
}

/// Any JSON, but with the spec's own keys and plausible values mixed in, so
/// that it gets past the syntax check and into the typed and semantic ones.
fn wild_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        4 => prop::sample::select(vec![
            "name", "priority", "inputs", "defaults", "max_parallel", "steps", "id", "messages", "role",
            "content", "model", "max_tokens", "temperature", "depends_on", "x", "a",
        ])
        .prop_map(String::from),
        1 => "\\PC{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        template_text().prop_map(Value::from),
        prop::sample::select(vec!["user", "system", "assistant", "gpt-4o-mini", "unserved", "batch", "a", "b", ""])
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 96, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..7)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Specs of the right shape with wild contents: ids, references, numbers
/// and models drawn so that valid, invalid and cyclic specs all occur.
fn shaped_spec() -> impl Strategy<Value = Value> {
    let ids = vec!["a", "b", "c", "d", "bad id", ""];
    let step = (
        prop::sample::select(ids.clone()),
        prop::collection::vec((prop::sample::select(vec!["user", "system", "tool"]), template_text()), 0..4),
        prop::option::of(prop::sample::select(vec!["gpt-4o-mini", "unserved", "gpt 4"])),
        prop::option::of(prop_oneof![Just(0u32), 1u32..200_000, Just(u32::MAX)]),
        prop::option::of(-1.0f64..3.0),
        prop::collection::vec(prop::sample::select(ids), 0..3),
    )
        .prop_map(|(id, messages, model, max_tokens, temperature, depends_on)| {
            let mut s = json!({
                "id": id,
                "messages": messages.into_iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>(),
            });
            let o = s.as_object_mut().expect("an object");
            model.map(|m| o.insert("model".into(), m.into()));
            max_tokens.map(|t| o.insert("max_tokens".into(), t.into()));
            temperature.map(|t| o.insert("temperature".into(), t.into()));
            if !depends_on.is_empty() {
                o.insert("depends_on".into(), depends_on.into());
            }
            s
        });
    (
        prop::sample::select(vec!["job", "", "  ", "é"]),
        prop::option::of(prop::sample::select(vec!["interactive", "batch", "urgent"])),
        prop::collection::btree_map(prop::sample::select(vec!["x", "y", "bad name", ""]), "\\PC{0,80}", 0..4),
        prop::option::of(prop::sample::select(vec!["gpt-4o-mini", "unserved"])),
        prop::option::of(0u32..70),
        prop::collection::vec(step, 0..8),
    )
        .prop_map(|(name, priority, inputs, model, max_parallel, steps)| {
            let mut v = json!({"name": name, "inputs": inputs, "steps": steps});
            if let Some(p) = priority {
                v["priority"] = p.into();
            }
            if let Some(m) = model {
                v["defaults"] = json!({"model": m});
            }
            if let Some(p) = max_parallel {
                v["max_parallel"] = p.into();
            }
            v
        })
}

/// Request fields that are valid together, drawn so that every field
/// occurs: sampling, stop sequences, seeds, `n`, structured outputs and
/// tools, and `extra`.
fn valid_params() -> impl Strategy<Value = Map<String, Value>> {
    let schema = json!({"type": "object", "additionalProperties": false, "required": ["items"],
        "properties": {"items": {"type": "array", "items": {"type": "string"}}}});
    let formats = vec![
        json!({"type": "text"}),
        json!({"type": "json_object"}),
        json!({"type": "json_schema", "json_schema": {"name": "list", "strict": true, "schema": schema}}),
    ];
    let tools = json!([{"type": "function", "function": {"name": "lookup", "description": "Look it up",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]);
    (
        prop::option::of(0.0f64..=1.0),
        prop::option::of(-2.0f64..=2.0),
        prop::option::of(any::<i64>()),
        prop::option::of(1u64..=16),
        prop::option::of(prop::collection::vec("[a-z\n]{1,4}", 1..=4)),
        prop::option::of(prop::sample::select(formats)),
        prop::option::of(prop::sample::select(vec![
            json!("auto"),
            json!("required"),
            json!("none"),
            json!({"type": "function", "function": {"name": "lookup"}}),
        ])),
        prop::option::of(prop::sample::select(vec!["low", "high", "xhigh"])),
        prop::option::of(prop::collection::btree_map("[a-z]{1,8}", "\\PC{0,20}", 0..4)),
        prop::option::of(prop::collection::btree_map("x_[a-z]{1,6}", any::<i32>(), 1..3)),
        prop::option::of(1u32..=4096),
    )
        .prop_map(move |(top_p, penalty, seed, n, stop, format, choice, effort, metadata, extra, completion)| {
            let mut m = Map::new();
            top_p.map(|v| m.insert("top_p".into(), v.into()));
            penalty.map(|v| m.insert("presence_penalty".into(), v.into()));
            seed.map(|v| m.insert("seed".into(), v.into()));
            n.map(|v| m.insert("n".into(), v.into()));
            stop.map(|v| m.insert("stop".into(), v.into()));
            format.map(|v| m.insert("response_format".into(), v));
            if let Some(c) = choice {
                m.insert("tools".into(), tools.clone());
                m.insert("tool_choice".into(), c);
            }
            effort.map(|v| m.insert("reasoning_effort".into(), v.into()));
            metadata.map(|v| m.insert("metadata".into(), json!(v)));
            extra.map(|v| m.insert("extra".into(), json!(v)));
            completion.map(|v| m.insert("max_completion_tokens".into(), v.into()));
            m
        })
}

/// Specs that must be accepted: unique ids, references only to earlier
/// steps and to inputs that exist, every number in range, any request
/// field, and fan-out steps over an earlier step's JSON (read by later
/// steps through `outputs`). Used for the round trip (which the wilder
/// strategies above rarely reach: almost all of their specs are refused)
/// and as the base that mutations break.
fn runnable_spec() -> impl Strategy<Value = Value> {
    let piece = (0u8..5, any::<prop::sample::Index>(), "[a-zA-Z0-9 ,.:;!?'\"()}é\n-]{0,16}");
    let message =
        (prop::sample::select(vec!["system", "developer", "user", "assistant"]), prop::collection::vec(piece, 1..5));
    let step = (
        prop::collection::vec(message, 1..4),
        prop::option::of(prop::sample::select(vec!["gpt-4o-mini", "gpt-4o"])),
        prop::option::of(1u32..=131_072),
        prop::option::of(0.0f32..=2.0),
        prop::collection::vec(any::<prop::sample::Index>(), 0..3),
        valid_params(),
        prop::option::of(any::<prop::sample::Index>()),
    );
    (
        "[a-zA-Z0-9 é-]{0,10}[a-z]",
        prop::collection::btree_map("[a-z][a-z0-9_.:-]{0,6}", "\\PC{0,40}", 1..4),
        prop::collection::vec(step, 1..7),
        prop::option::of(prop::sample::select(vec!["interactive", "batch"])),
        prop::option::of(1u32..=64),
    )
        .prop_map(|(name, inputs, steps, priority, max_parallel)| {
            let names: Vec<&String> = inputs.keys().collect();
            // Which steps fan out: step i over an earlier one's JSON.
            let mut fans = vec![false; steps.len()];
            let mut specs = Vec::new();
            for (i, (messages, model, max_tokens, temperature, deps, mut params, fan)) in steps.into_iter().enumerate()
            {
                let for_each = fan.filter(|_| i > 0).map(|at| at.index(i));
                // A source's schema (if any) has the array at `items`; a
                // fan-out source is read through its outputs.
                let for_each = for_each
                    .map(|j| if fans[j] { format!("steps.s{j}.outputs") } else { format!("steps.s{j}.json.items") });
                fans[i] = for_each.is_some();
                let reference = |j: usize| {
                    if fans[j] {
                        format!("{{{{join(steps.s{j}.outputs, \"; \")}}}}")
                    } else {
                        format!("{{{{ steps.s{j}.output }}}}")
                    }
                };
                let messages: Vec<Value> = messages
                    .into_iter()
                    .map(|(role, pieces)| {
                        let content: String = pieces
                            .into_iter()
                            .map(|(kind, at, text)| match kind {
                                1 => format!("{{{{inputs.{}}}}}", at.get(&names)),
                                2 if i > 0 => reference(at.index(i)),
                                3 if i > 0 && !fans[at.index(i)] => {
                                    format!("{{{{steps.s{}.json.items[0]}}}}", at.index(i))
                                }
                                4 if fans[i] => "{{index}}: {{item}}".to_string(),
                                _ => text,
                            })
                            .collect();
                        // Empty content is refused; a space is not.
                        let content = if content.is_empty() { " ".to_string() } else { content };
                        json!({"role": role, "content": content})
                    })
                    .collect();
                let mut s = json!({"id": format!("s{i}"), "messages": messages});
                if let Some(m) = model {
                    s["model"] = m.into();
                }
                // One allowance per object.
                if let Some(t) = max_tokens.filter(|_| !params.contains_key("max_completion_tokens")) {
                    s["max_tokens"] = t.into();
                }
                if let Some(t) = temperature {
                    s["temperature"] = t.into();
                }
                if i > 0 && !deps.is_empty() {
                    s["depends_on"] = deps.iter().map(|d| format!("s{}", d.index(i))).collect::<Vec<_>>().into();
                }
                if let Some(src) = for_each {
                    s["for_each"] = src.into();
                }
                s.as_object_mut().expect("an object").append(&mut params);
                specs.push(s);
            }
            let mut v = json!({"name": name, "inputs": inputs, "defaults": {"model": "gpt-4o-mini"}, "steps": specs});
            if let Some(p) = priority {
                v["priority"] = p.into();
            }
            if let Some(p) = max_parallel {
                v["max_parallel"] = p.into();
            }
            v
        })
}

/// Breaks one rule in a runnable spec; returns the field the error must
/// name, or `None` if the change happens to leave the spec valid.
fn break_one_rule(v: &mut Value, rule: usize, at: prop::sample::Index) -> Option<String> {
    let n = v["steps"].as_array().map_or(0, Vec::len);
    let k = at.index(n);
    let step = format!("steps[{k}]");
    match rule {
        0 => {
            v["name"] = json!(" ");
            Some("name".into())
        }
        1 if k > 0 => {
            v["steps"][k]["id"] = json!("s0");
            Some(format!("{step}.id"))
        }
        2 => {
            v["steps"][k]["messages"][0]["content"] = json!(format!("{{{{steps.s{k}.output}}}}"));
            Some(format!("{step}.messages[0].content"))
        }
        3 => {
            v["steps"][k]["max_tokens"] = json!(0);
            Some(format!("{step}.max_tokens"))
        }
        4 => {
            v["steps"][k]["temperature"] = json!(2.5);
            Some(format!("{step}.temperature"))
        }
        5 => {
            v["steps"][k]["model"] = json!("unserved");
            Some(format!("{step}.model"))
        }
        6 => {
            v["steps"][k]["seed"] = json!("1");
            Some(format!("{step}.seed"))
        }
        7 => {
            v["steps"][k]["messages"][0]["content"] = json!("{{inputs.nope!}}");
            Some(format!("{step}.messages[0].content"))
        }
        8 => {
            v["steps"] = json!([]);
            Some("steps".into())
        }
        9 => {
            v["max_parallel"] = json!(65);
            Some("max_parallel".into())
        }
        10 => {
            v["steps"][k]["messages"][0]["role"] = json!("tool");
            Some(format!("{step}.messages[0].tool_call_id"))
        }
        11 => {
            v["steps"][k]["depends_on"] = json!(["ghost"]);
            Some(format!("{step}.depends_on[0]"))
        }
        12 => {
            v["steps"][k]["messages"] = json!([]);
            Some(format!("{step}.messages"))
        }
        13 => {
            v["steps"][k]["top_p"] = json!(1.5);
            Some(format!("{step}.top_p"))
        }
        14 => {
            v["steps"][k]["response_format"] =
                json!({"type": "json_schema", "json_schema": {"name": "s", "schema": "x"}});
            Some(format!("{step}.response_format.json_schema.schema"))
        }
        15 => {
            v["steps"][k]["for_each"] = json!("steps.s0.output");
            Some(format!("{step}.for_each"))
        }
        16 if v["steps"][k].get("for_each").is_none() => {
            v["steps"][k]["messages"][0]["content"] = json!("{{item.x}}");
            Some(format!("{step}.messages[0].content"))
        }
        17 => {
            v["steps"][k]["n"] = json!(0);
            Some(format!("{step}.n"))
        }
        18 if v["steps"][k].get("tools").is_none() && v["defaults"].get("tools").is_none() => {
            v["steps"][k]["tool_choice"] = json!("required");
            Some(format!("{step}.tool_choice"))
        }
        19 => {
            v["steps"][k]["extra"] = json!({"temperature": 1});
            Some(format!("{step}.extra.temperature"))
        }
        _ => None,
    }
}

/// Byte-level damage to an otherwise well-formed body.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<usize>(), prop::sample::select(b"{}[]\",:\\ 0e-.u".to_vec())).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
        any::<usize>().prop_map(Edit::Truncate),
    ];
    prop::collection::vec(edit, 1..4)
}

fn apply(mut body: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = body.len().max(1);
        match *e {
            Edit::Flip(i, b) if !body.is_empty() => body[i % n] ^= b,
            Edit::Insert(i, b) => body.insert(i % (body.len() + 1), b),
            Edit::Delete(i) if !body.is_empty() => drop(body.remove(i % n)),
            Edit::Truncate(i) => body.truncate(i % n),
            _ => {}
        }
    }
    body
}

/// The first segment of an error's field path: `steps[2].id` → `steps`.
fn field_root(field: &str) -> &str {
    field.split(['.', '[']).next().unwrap_or(field)
}

// ---------------------------------------------------------------- the parser

proptest! {
    #![proptest_config(ProptestConfig::with_cases(SPEC_CASES))]

    #[test]
    fn parse_never_panics_on_bytes(body in prop::collection::vec(any::<u8>(), 0..600)) {
        check_parse(&body)?;
    }

    #[test]
    fn parse_never_panics_on_strings(body in "\\PC{0,300}") {
        check_parse(body.as_bytes())?;
    }

    #[test]
    fn parse_never_panics_on_wild_json(v in wild_json()) {
        check_parse(v.to_string().as_bytes())?;
    }

    /// Every outcome of a well-shaped spec: accepted ones round-trip and
    /// run to the end; refused ones name one of the spec's own fields.
    #[test]
    fn shaped_specs_round_trip_or_name_a_real_field(v in shaped_spec()) {
        let body = v.to_string();
        check_parse(body.as_bytes())?;
        if let Err(e) = JobSpec::parse(body.as_bytes(), &SpecLimits::default(), &serves) {
            let known = ["body", "name", "priority", "inputs", "defaults", "max_parallel", "steps"];
            prop_assert!(known.contains(&field_root(&e.field)), "field {:?} is not in the spec: {}", e.field, e);
        }
    }

    /// A valid spec with a few bytes flipped, inserted, deleted or cut off.
    #[test]
    fn parse_never_panics_on_damaged_specs(v in runnable_spec(), edits in edits()) {
        check_parse(&apply(v.to_string().into_bytes(), &edits))?;
    }

    /// Specs built to be valid are accepted, round-trip through the stored
    /// form and run to the end.
    #[test]
    fn runnable_specs_are_accepted_and_round_trip(v in runnable_spec()) {
        let spec = JobSpec::parse(v.to_string().as_bytes(), &SpecLimits::default(), &serves);
        prop_assert!(spec.is_ok(), "refused: {:?}\n{}", spec.err(), v);
        check_parse(v.to_string().as_bytes())?;
    }

    /// One rule broken in a valid spec: refused, naming exactly that field.
    #[test]
    fn one_broken_rule_is_refused_naming_its_field(
        mut v in runnable_spec(),
        rule in 0usize..21,
        at in any::<prop::sample::Index>(),
    ) {
        let want = break_one_rule(&mut v, rule, at);
        let got = JobSpec::parse(v.to_string().as_bytes(), &SpecLimits::default(), &serves);
        match want {
            Some(field) => {
                let err = got.err().ok_or_else(|| TestCaseError::fail(format!("accepted: {v}")))?;
                prop_assert_eq!(err.field, field, "{}", err.message);
            }
            None => prop_assert!(got.is_ok()),
        }
    }

    /// Deeply nested JSON (a stack-overflow attempt) is refused, not a crash.
    #[test]
    fn deep_nesting_is_refused(depth in 1usize..5_000, open in prop::sample::select(vec!["[", "{\"a\":"])) {
        let close = if open == "[" { "]" } else { "}" };
        let body = format!("{{\"name\":{}1{}}}", open.repeat(depth), close.repeat(depth));
        prop_assert!(JobSpec::parse(body.as_bytes(), &SpecLimits::default(), &serves).is_err());
    }
}

// ---------------------------------------------------------------- the templater

/// One piece of a template, as the model the parser is checked against.
#[derive(Debug, Clone)]
enum Piece {
    /// Literal text with no `{{` in it and not ending in `{` (which would
    /// run into the next placeholder's braces).
    Text(String),
    Input(String, bool),
    Output(String, bool),
}

impl Piece {
    fn source(&self) -> String {
        let pad = |p: bool| if p { " " } else { "" };
        match self {
            Piece::Text(t) => t.clone(),
            Piece::Input(n, p) => format!("{{{{{}inputs.{n}{}}}}}", pad(*p), pad(*p)),
            Piece::Output(id, p) => format!("{{{{{}steps.{id}.output{}}}}}", pad(*p), pad(*p)),
        }
    }
}

fn piece() -> impl Strategy<Value = Piece> {
    let name = "[a-zA-Z0-9_.:-]{1,8}";
    prop_oneof![
        2 => "([^{]|\\{[^{]){0,12}".prop_map(Piece::Text),
        1 => (name, any::<bool>()).prop_map(|(n, p)| Piece::Input(n, p)),
        1 => (name, any::<bool>()).prop_map(|(n, p)| Piece::Output(n, p)),
    ]
}

fn value_for(name: &str, scale: usize) -> String {
    format!("<{name}>").repeat(1 + name.len() % 3 + scale)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(TEMPLATE_CASES))]

    #[test]
    fn template_parse_never_panics(s in template_text()) {
        if let Ok(t) = Template::parse(&s) {
            prop_assert_eq!(t.source(), s.as_str());
            // Whatever parsed renders once every reference is given, or
            // says which reference it could not resolve.
            let scope = TestScope {
                inputs: t.input_refs().map(|n| (n.to_string(), "v".into())).collect(),
                answers: t.step_refs().map(|id| (id.clone(), StepAnswer::text("[\"o\"]".into()))).collect(),
                item: Some((json!({"x": [1]}), 0)),
                ..TestScope::default()
            };
            match t.render(&scope, usize::MAX) {
                Ok(_) | Err(RenderError::Unresolved { .. }) => {}
                Err(e) => prop_assert!(false, "{e}"),
            }
        }
    }

    #[test]
    fn template_parse_never_panics_on_any_string(s in "\\PC{0,200}") {
        let _ = Template::parse(&s);
    }

    /// Templates built from a model: the parser finds exactly the model's
    /// references, in order, and the render is the model's concatenation —
    /// or, under a cap, a `TooLarge` exactly when that would exceed it.
    #[test]
    fn templates_match_their_model_and_respect_the_cap(
        pieces in prop::collection::vec(piece(), 0..10),
        scale in 0usize..40,
        cap in 0usize..600,
    ) {
        let source: String = pieces.iter().map(Piece::source).collect();
        let t = Template::parse(&source).map_err(|e| TestCaseError::fail(format!("{source:?}: {e}")))?;
        let want_inputs: Vec<&str> =
            pieces.iter().filter_map(|p| if let Piece::Input(n, _) = p { Some(n.as_str()) } else { None }).collect();
        let want_steps: Vec<&str> =
            pieces.iter().filter_map(|p| if let Piece::Output(n, _) = p { Some(n.as_str()) } else { None }).collect();
        prop_assert_eq!(t.input_refs().collect::<Vec<_>>(), want_inputs);
        prop_assert_eq!(t.step_refs().map(StepId::as_str).collect::<Vec<_>>(), want_steps);

        let inputs: BTreeMap<String, String> =
            t.input_refs().map(|n| (n.to_string(), value_for(n, scale))).collect();
        let scope = TestScope {
            inputs: inputs.clone(),
            answers: t.step_refs().map(|id| (id.clone(), StepAnswer::text(value_for(id.as_str(), scale * 2)))).collect(),
            ..TestScope::default()
        };
        let expected: String = pieces
            .iter()
            .map(|p| match p {
                Piece::Text(s) => s.clone(),
                Piece::Input(n, _) => value_for(n, scale),
                Piece::Output(id, _) => value_for(id, scale * 2),
            })
            .collect();
        prop_assert_eq!(t.render(&scope, usize::MAX), Ok(expected.clone()));
        match t.render(&scope, cap) {
            Ok(s) => {
                prop_assert!(s.len() <= cap);
                prop_assert_eq!(s, expected);
            }
            Err(e) => {
                prop_assert_eq!(e, RenderError::TooLarge { max_bytes: cap });
                prop_assert!(expected.len() > cap);
            }
        }
    }
}

/// The request-limit case the render cap exists for: a template naming a
/// 1 MiB output 10,000 times (10 GB if built) must be refused without ever
/// holding more than the cap. The closure sees how much has been rendered
/// so far through the number of lookups: the cap must stop it after at most
/// `cap / 1 MiB + 1` of them, not 10,000.
/// A scope that counts its lookups of step outputs.
struct Counting<'a> {
    answer: &'a StepAnswer,
    lookups: std::cell::Cell<usize>,
}

impl Scope for Counting<'_> {
    fn input(&self, _: &str) -> Option<&str> {
        None
    }
    fn step(&self, id: &StepId) -> Option<StepOutput<'_>> {
        self.lookups.set(self.lookups.get() + 1);
        (id.as_str() == "big").then_some(StepOutput::One(self.answer))
    }
    fn item(&self) -> Option<(&Value, usize)> {
        None
    }
}

/// The request-limit case the render cap exists for: a template naming a
/// 1 MiB output 10,000 times (10 GB if built) must be refused without ever
/// holding more than the cap. The scope sees how much has been rendered
/// so far through the number of lookups: the cap must stop it after at most
/// `cap / 1 MiB + 1` of them, not 10,000.
#[test]
fn ten_thousand_references_to_a_megabyte_output_are_refused_at_the_cap() {
    let big = StepAnswer::text("x".repeat(1 << 20));
    let template = Template::parse(&"{{steps.big.output}}".repeat(10_000)).unwrap();
    assert_eq!(template.step_refs().count(), 10_000);
    let out = Counting { answer: &big, lookups: std::cell::Cell::new(0) };
    let cap = SpecLimits::default().max_rendered_bytes;
    let got = template.render(&out, cap);
    assert_eq!(got, Err(RenderError::TooLarge { max_bytes: cap }));
    assert!(out.lookups.get() <= cap / (1 << 20) + 1, "rendered {} references before stopping", out.lookups.get());

    // Under a cap that allows exactly three copies, the result is exactly
    // those three, and one byte less refuses it.
    let three = Template::parse(&"{{steps.big.output}}".repeat(3)).unwrap();
    assert_eq!(three.render(&out, 3 << 20).map(|s| s.len()), Ok(3 << 20));
    assert_eq!(three.render(&out, (3 << 20) - 1), Err(RenderError::TooLarge { max_bytes: (3 << 20) - 1 }));
}

// ---------------------------------------------------------------- JSON paths and reservations

/// Any JSON document, small enough to walk.
fn document() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z0-9_-]{1,6}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A path into `doc` chosen by `picks`: existing steps while there are
/// any, then (with `overshoot`) one segment that does not exist.
fn path_in(doc: &Value, picks: &[prop::sample::Index], overshoot: bool) -> (String, Option<Value>) {
    let mut path = String::new();
    let mut at = doc;
    for pick in picks {
        match at {
            Value::Object(m) if !m.is_empty() => {
                let (k, v) = m.iter().nth(pick.index(m.len())).expect("a key");
                path.push_str(&format!(".{k}"));
                at = v;
            }
            Value::Array(a) if !a.is_empty() => {
                let i = pick.index(a.len());
                path.push_str(&format!("[{i}]"));
                at = &a[i];
            }
            _ => break,
        }
    }
    if !overshoot {
        return (path, Some(at.clone()));
    }
    match at {
        Value::Array(a) => path.push_str(&format!("[{}]", a.len())),
        _ => path.push_str(".no_such_field"),
    }
    (path, None)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(TEMPLATE_CASES))]

    /// A path into a step's JSON output renders the value found there (a
    /// string as its text, anything else as compact JSON), and a path one
    /// step past what exists fails naming a prefix of the path, never
    /// panicking or rendering something else.
    #[test]
    fn json_paths_render_what_they_point_at(
        doc in document(),
        picks in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        overshoot in any::<bool>(),
    ) {
        let (path, want) = path_in(&doc, &picks, overshoot);
        let t = Template::parse(&format!("<{{{{steps.d.json{path}}}}}>")).map_err(|e| TestCaseError::fail(format!("{path}: {e}")))?;
        let mut scope = TestScope::default();
        scope.answers.insert(StepId::parse("d").unwrap(), StepAnswer::text(doc.to_string()));
        match (t.render(&scope, usize::MAX), want) {
            (Ok(got), Some(v)) => {
                let text = match v { Value::String(s) => s, other => other.to_string() };
                prop_assert_eq!(got, format!("<{text}>"));
            }
            (Err(RenderError::Unresolved { reference, reason }), None) => {
                prop_assert!(format!("steps.d.json{path}").starts_with(&reference), "{} is not a prefix of {}", reference, path);
                prop_assert!(!reason.is_empty());
            }
            (got, want) => prop_assert!(false, "{path}: got {got:?}, wanted {want:?}"),
        }
        // The same path as a fan-out element's `item`.
        let t = Template::parse(&format!("{{{{item{path}}}}}")).map_err(|e| TestCaseError::fail(e.message))?;
        scope.item = Some((doc.clone(), 0));
        prop_assert_eq!(t.render(&scope, usize::MAX).is_ok(), !overshoot);
    }

    /// What a step reserves is what OpenAI documents for its body: the
    /// prompt estimate counts the message text, the tool definitions and the
    /// response schema (as compact JSON), and the completion share is
    /// `max_completion_tokens` (else `max_tokens`, else the default) times
    /// `n`. Checked on the body the step really sends.
    #[test]
    fn a_steps_reservation_is_the_documented_one(
        params in valid_params(),
        max_tokens in prop::option::of(1u32..=4096),
        texts in prop::collection::vec("\\PC{1,60}", 1..4),
    ) {
        let mut step = json!({"id": "s", "messages": texts.iter().map(|t| json!({"role": "user", "content": t.replace('{', "(")})).collect::<Vec<_>>()});
        let mut params = params;
        step.as_object_mut().expect("an object").append(&mut params);
        if let Some(t) = max_tokens.filter(|_| step.get("max_completion_tokens").is_none()) {
            step["max_tokens"] = t.into();
        }
        let v = json!({"name": "r", "defaults": {"model": "m"}, "steps": [step.clone()]});
        let spec = JobSpec::parse(v.to_string().as_bytes(), &SpecLimits::default(), &serves)
            .map_err(|e| TestCaseError::fail(format!("{e}: {v}")))?;
        let s = &spec.steps[0];
        let scope = TestScope::default();
        let mut budget = usize::MAX;
        let messages: Vec<Value> = s.messages.iter().map(|m| m.render(&scope, &mut budget)).collect::<Result<_, _>>()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let request = crate::provider::ProviderRequest::chat(s.body(messages), u64::from(s.params.allowance()))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;

        let chars = |s: &str| s.chars().count() as u64;
        let mut prompt: u64 = step["messages"].as_array().expect("messages").iter()
            .map(|m| chars(m["content"].as_str().expect("text"))).sum();
        if let Some(tools) = step.get("tools") {
            prompt += chars(&tools.to_string());
        }
        if let Some(schema) = step.get("response_format").and_then(|f| f.get("json_schema")) {
            prompt += chars(&schema.to_string());
        }
        let allowance = step.get("max_completion_tokens").or(step.get("max_tokens")).and_then(Value::as_u64).unwrap_or(512);
        let n = step.get("n").and_then(Value::as_u64).unwrap_or(1);
        prop_assert_eq!(request.reservation.prompt_chars, prompt);
        prop_assert_eq!(request.reservation.completion_tokens, allowance * n);
        prop_assert_eq!(request.cost(4.0).tokens, prompt.div_ceil(4) + allowance * n);
    }
}
