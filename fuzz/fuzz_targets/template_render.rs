//! Any template text and any size cap: parsing and rendering must return,
//! never panic; a render within the cap equals the uncapped one, and one
//! refused as too large really would have exceeded the cap.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use ratepool::domain::StepId;
use ratepool::spec::{RenderError, Template};

fuzz_target!(|data: &[u8]| {
    let Some((&cap_byte, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    let Ok(t) = Template::parse(&text) else { return };
    assert_eq!(t.source(), text, "the source must be kept verbatim");

    // Every reference resolves, to values whose sizes vary with the name
    // so that repeats and mixtures of sizes are covered.
    let inputs: BTreeMap<String, String> = t.input_refs().map(|n| (n.to_string(), n.repeat(1 + n.len() % 7))).collect();
    let outputs: BTreeMap<StepId, String> =
        t.step_refs().map(|id| (id.clone(), "o".repeat(id.as_str().len() * 3))).collect();
    let lookup = |id: &StepId| outputs.get(id).map(String::as_str);

    let full = t.render(&inputs, &lookup, usize::MAX).expect("every reference is provided");
    let cap = usize::from(cap_byte) * 4;
    match t.render(&inputs, &lookup, cap) {
        Ok(s) => {
            assert!(s.len() <= cap, "rendered {} bytes over a cap of {cap}", s.len());
            assert_eq!(s, full);
        }
        Err(RenderError::TooLarge { max_bytes }) => {
            assert_eq!(max_bytes, cap);
            assert!(full.len() > cap, "refused a {}-byte render under a cap of {cap}", full.len());
        }
        Err(e) => panic!("unexpected render error {e}"),
    }
    // A missing reference is an error, not a panic or an empty piece.
    if t.step_refs().next().is_some() || t.input_refs().next().is_some() {
        assert!(t.render(&BTreeMap::new(), &|_| None, usize::MAX).is_err());
    }
});
