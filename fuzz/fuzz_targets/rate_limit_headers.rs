//! Any header values: the rate-limit and retry-after parsers must return,
//! never panic, and never produce a wait longer than their one-day bound.
#![no_main]

use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use ratepool::provider::RateLimitHeaders;
use ratepool::provider::headers::{parse_go_duration, retry_after};

const NAMES: [&str; 8] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "retry-after-ms",
    "retry-after",
];
const DAY: Duration = Duration::from_secs(86_400);

fuzz_target!(|data: &[u8]| {
    // One value per header, separated by newlines (which a header value
    // cannot contain anyway).
    let mut h = HeaderMap::new();
    for (name, value) in NAMES.iter().zip(data.split(|&b| b == b'\n')) {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            h.insert(*name, v);
        }
    }
    let r = RateLimitHeaders::from_headers(&h);
    for d in [r.reset_requests, r.reset_tokens].into_iter().flatten() {
        assert!(d <= DAY, "reset of {d:?}");
    }
    if let Some(d) = retry_after(&h) {
        assert!(d <= DAY, "retry-after of {d:?}");
    }
    if let Ok(s) = std::str::from_utf8(data)
        && let Some(d) = parse_go_duration(s)
    {
        assert!(d <= DAY, "{s:?} parsed as {d:?}");
    }
});
