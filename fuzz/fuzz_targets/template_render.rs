//! Any template text and any size cap: parsing and rendering must return,
//! never panic; a render within the cap equals the uncapped one, one
//! refused as too large really would have exceeded the cap, and a
//! reference that cannot be resolved fails the capped render too. The
//! scope has JSON and text outputs, a fan-out group and an item, so JSON
//! paths, `outputs`, `item`, `index` and `join` are all exercised.
#![no_main]

use std::collections::BTreeMap;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use ratepool::answer::StepAnswer;
use ratepool::domain::StepId;
use ratepool::spec::{RenderError, Scope, StepOutput, Template};
use serde_json::{Value, json};

struct FuzzScope {
    inputs: BTreeMap<String, String>,
    answers: BTreeMap<StepId, StepAnswer>,
    group: Vec<Arc<StepAnswer>>,
    item: Value,
}

impl Scope for FuzzScope {
    fn input(&self, name: &str) -> Option<&str> {
        self.inputs.get(name).map(String::as_str)
    }
    fn step(&self, id: &StepId) -> Option<StepOutput<'_>> {
        // Ids starting with `g` are fan-out steps.
        if id.as_str().starts_with('g') {
            return Some(StepOutput::Group(&self.group));
        }
        self.answers.get(id).map(StepOutput::One)
    }
    fn item(&self) -> Option<(&Value, usize)> {
        Some((&self.item, 3))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&cap_byte, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    let Ok(t) = Template::parse(&text) else { return };
    assert_eq!(t.source(), text, "the source must be kept verbatim");

    // Every input and step resolves: inputs to values whose sizes vary
    // with the name; steps to a JSON document or, for odd lengths, text.
    let doc = json!({"a": [1, "x", {"b": "c"}], "k": "v", "scenes": [{"heading": "H"}]}).to_string();
    let scope = FuzzScope {
        inputs: t.input_refs().map(|n| (n.to_string(), n.repeat(1 + n.len() % 7))).collect(),
        answers: t
            .step_refs()
            .map(|id| {
                let out = if id.as_str().len() % 2 == 0 { doc.clone() } else { "o".repeat(id.as_str().len() * 3) };
                (id.clone(), StepAnswer::text(out))
            })
            .collect(),
        group: vec![Arc::new(StepAnswer::text("one".into())), Arc::new(StepAnswer::text(doc.clone()))],
        item: json!({"heading": "INT. ROOM", "cast": ["A", "B"], "n": 2}),
    };

    let full = t.render(&scope, usize::MAX);
    let cap = usize::from(cap_byte) * 4;
    match (&full, t.render(&scope, cap)) {
        (Ok(full), Ok(s)) => {
            assert!(s.len() <= cap, "rendered {} bytes over a cap of {cap}", s.len());
            assert_eq!(&s, full);
        }
        (Ok(full), Err(RenderError::TooLarge { max_bytes })) => {
            assert_eq!(max_bytes, cap);
            assert!(full.len() > cap, "refused a {}-byte render under a cap of {cap}", full.len());
        }
        (Err(RenderError::Unresolved { reference, reason }), capped) => {
            assert!(!reference.is_empty() && !reason.is_empty());
            assert!(capped.is_err(), "an unresolvable reference rendered under a cap");
        }
        (full, capped) => panic!("unexpected render results {full:?} / {capped:?}"),
    }
});
