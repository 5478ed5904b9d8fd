//! Any request body: `JobSpec::parse` must return, never panic, and an
//! accepted spec must survive its stored round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ratepool::spec::{JobSpec, SpecLimits};

fuzz_target!(|data: &[u8]| {
    // Tight limits too, so the size checks themselves are exercised on
    // small inputs rather than only on the 1 MiB defaults.
    let tight = SpecLimits {
        max_body_bytes: 4096,
        max_steps: 8,
        max_messages_per_step: 4,
        max_template_bytes: 256,
        max_inputs: 4,
        max_input_bytes: 256,
        ..SpecLimits::default()
    };
    for limits in [SpecLimits::default(), tight] {
        match JobSpec::parse(data, &limits, &|m| m.as_str() != "unserved") {
            Ok(spec) => {
                let stored = spec.to_stored();
                let back = JobSpec::from_stored(&stored, &limits).expect("a stored spec must re-read");
                assert_eq!(back, spec, "stored round trip changed the spec");
                assert_eq!(back.to_stored(), stored, "the stored form is not canonical");
            }
            Err(e) => assert!(!e.field.is_empty() && !e.message.is_empty(), "an error must name a field: {e:?}"),
        }
    }
});
