//! The provider's rate-limit headers and retry hints: parsed from its
//! answers, and written the same way where ratepool answers as a provider
//! (the simulator, the Calls door).
//!
//! OpenAI reports its view of each bucket on every response:
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, where reset is a
//! Go-style duration (`6m0s`, `1.5s`, `120ms`). 429 and 503 answers may add
//! `retry-after-ms` (milliseconds) or `retry-after` (seconds or HTTP date).
//! Every parser here is total: a malformed header is treated as absent.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};

/// The provider's view of one org's buckets, as far as the headers tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitHeaders {
    pub limit_requests: Option<u64>,
    pub limit_tokens: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub reset_tokens: Option<Duration>,
}

impl RateLimitHeaders {
    pub fn from_headers(h: &HeaderMap) -> Self {
        let num = |name: &str| header_str(h, name).and_then(|s| s.trim().parse::<u64>().ok());
        let dur = |name: &str| header_str(h, name).and_then(parse_go_duration);
        Self {
            limit_requests: num("x-ratelimit-limit-requests"),
            limit_tokens: num("x-ratelimit-limit-tokens"),
            remaining_requests: num("x-ratelimit-remaining-requests"),
            remaining_tokens: num("x-ratelimit-remaining-tokens"),
            reset_requests: dur("x-ratelimit-reset-requests"),
            reset_tokens: dur("x-ratelimit-reset-tokens"),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A header's value as UTF-8. Not `HeaderValue::to_str`, which refuses
/// anything but visible ASCII: Go writes microseconds as `µs`, so a reset of
/// `500µs` arrives as UTF-8 and was being dropped.
fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
}

/// How long the provider asks us to wait: `retry-after-ms` wins over
/// `retry-after` (delta-seconds, possibly fractional, or an HTTP date).
pub fn retry_after(h: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = header_str(h, "retry-after-ms").and_then(|s| s.trim().parse::<f64>().ok()) {
        return duration_from_secs(ms / 1000.0);
    }
    let s = header_str(h, "retry-after")?.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return duration_from_secs(secs);
    }
    let at = httpdate::parse_http_date(s).ok()?;
    // A date in the past means "now"; one more than a day ahead is as
    // absurd as 90000 seconds would be (a date in 9999 must not park a call).
    let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
    (wait <= MAX_WAIT).then_some(wait)
}

/// Longest wait any header may ask for; longer values are malformed.
const MAX_WAIT: Duration = Duration::from_secs(86_400);

fn duration_from_secs(secs: f64) -> Option<Duration> {
    // Reject NaN, negatives and absurd values (over a day) as malformed.
    (secs.is_finite() && (0.0..=MAX_WAIT.as_secs_f64()).contains(&secs)).then(|| Duration::from_secs_f64(secs))
}

/// Parses a Go `time.Duration` string as OpenAI sends it: a sequence of
/// decimal numbers each with a unit (`h`, `m`, `s`, `ms`, `us`/`µs`, `ns`),
/// e.g. `6m0s`, `1.5s`, `120ms`, `1h2m3.5s`. A bare `0` is zero.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() || s.len() > 64 {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    duration_from_secs(total)
}

/// Formats a duration as OpenAI's headers do: Go's `time.Duration` string
/// at millisecond resolution (`6m0s`, `1h0m0s`, `1.5s`, `120ms`, `0s`).
/// Rounds up to the millisecond, so "wait this long" is never too short,
/// and never writes the sub-millisecond units Go would use below 1 ms.
pub fn format_go_duration(d: Duration) -> String {
    let ms = d.as_micros().div_ceil(1_000);
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let (h, m) = (ms / 3_600_000, ms / 60_000 % 60);
    let (s, frac) = (ms / 1_000 % 60, ms % 1_000);
    let secs = if frac == 0 {
        format!("{s}s")
    } else {
        let digits = format!("{frac:03}");
        format!("{s}.{}s", digits.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

/// `retry-after-ms` and `retry-after` for a wait of `wait`: milliseconds,
/// and whole seconds rounded up, so a client that reads only the coarse
/// one never comes back early.
pub fn retry_after_headers(wait: Duration) -> HeaderMap {
    let ms = u64::try_from(wait.as_micros().div_ceil(1_000)).unwrap_or(u64::MAX);
    let mut h = HeaderMap::new();
    h.insert(HeaderName::from_static("retry-after-ms"), HeaderValue::from(ms));
    h.insert(http::header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1_000)));
    h
}

/// OpenAI's `x-ratelimit-*` headers for limits and what is left of them;
/// the fields that are `None` are left out.
pub fn rate_limit_header_map(r: &RateLimitHeaders) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |name: &'static str, value: Option<String>| {
        if let Some(v) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    put("x-ratelimit-limit-requests", r.limit_requests.map(|v| v.to_string()));
    put("x-ratelimit-limit-tokens", r.limit_tokens.map(|v| v.to_string()));
    put("x-ratelimit-remaining-requests", r.remaining_requests.map(|v| v.to_string()));
    put("x-ratelimit-remaining-tokens", r.remaining_tokens.map(|v| v.to_string()));
    put("x-ratelimit-reset-requests", r.reset_requests.map(format_go_duration));
    put("x-ratelimit-reset-tokens", r.reset_tokens.map(format_go_duration));
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn go_durations_as_openai_sends_them() {
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("120ms"), Some(Duration::from_millis(120)));
        assert_eq!(parse_go_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("1h2m3.5s"), Some(Duration::from_millis(3_723_500)));
        assert_eq!(parse_go_duration("17us"), Some(Duration::from_micros(17)));
        for bad in ["", "s", "1", "1x", "-1s", "1.2.3s", "ms10", "1s 2s", "NaNs", "99999999h"] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?} should not parse");
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn rate_limit_headers_parse_and_tolerate_garbage() {
        let h = headers(&[
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-limit-tokens", "2000000"),
            ("x-ratelimit-remaining-requests", "9999"),
            ("x-ratelimit-remaining-tokens", "1999500"),
            ("x-ratelimit-reset-requests", "6ms"),
            ("x-ratelimit-reset-tokens", "15ms"),
        ]);
        let r = RateLimitHeaders::from_headers(&h);
        assert_eq!(r.limit_requests, Some(10_000));
        assert_eq!(r.remaining_tokens, Some(1_999_500));
        assert_eq!(r.reset_requests, Some(Duration::from_millis(6)));
        assert_eq!(r.reset_tokens, Some(Duration::from_millis(15)));
        let bad = headers(&[("x-ratelimit-remaining-tokens", "lots"), ("x-ratelimit-reset-tokens", "soon")]);
        assert!(RateLimitHeaders::from_headers(&bad).is_empty());
    }

    #[test]
    fn durations_are_written_like_openai_headers() {
        let f = |ms: u64| format_go_duration(Duration::from_millis(ms));
        assert_eq!(f(360_000), "6m0s");
        assert_eq!(f(1_500), "1.5s");
        assert_eq!(f(120), "120ms");
        assert_eq!(f(0), "0s");
        assert_eq!(f(6_600), "6.6s");
        assert_eq!(f(1_000), "1s");
        assert_eq!(f(61_050), "1m1.05s");
        assert_eq!(f(3_600_000), "1h0m0s");
        assert_eq!(f(3_723_500), "1h2m3.5s");
        assert_eq!(format_go_duration(Duration::from_micros(1)), "1ms");
        assert_eq!(format_go_duration(Duration::from_micros(1_000_001)), "1.001s");
    }

    #[test]
    fn retry_headers_round_up_and_parse_back() {
        let h = retry_after_headers(Duration::from_micros(2_000_001));
        assert_eq!(h["retry-after-ms"], "2001");
        assert_eq!(h["retry-after"], "3");
        assert_eq!(retry_after(&h), Some(Duration::from_millis(2001)));
        let h = retry_after_headers(Duration::ZERO);
        assert_eq!((h["retry-after-ms"].to_str().unwrap(), h["retry-after"].to_str().unwrap()), ("0", "0"));
    }

    #[test]
    fn written_rate_limit_headers_parse_back() {
        let r = RateLimitHeaders {
            limit_requests: Some(3_000),
            limit_tokens: Some(90_000),
            remaining_requests: Some(2_999),
            remaining_tokens: Some(89_000),
            reset_requests: Some(Duration::from_millis(20)),
            reset_tokens: Some(Duration::from_millis(667)),
        };
        assert_eq!(RateLimitHeaders::from_headers(&rate_limit_header_map(&r)), r);
        let partial = RateLimitHeaders { remaining_tokens: Some(5), ..Default::default() };
        assert_eq!(rate_limit_header_map(&partial).len(), 1);
    }

    #[test]
    fn retry_after_prefers_milliseconds() {
        let h = headers(&[("retry-after-ms", "1500"), ("retry-after", "9")]);
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        assert_eq!(retry_after(&headers(&[("retry-after", "2")])), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(&headers(&[("retry-after", "-3")])), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")])), Some(Duration::ZERO));
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }
}

/// Property tests: every parser here is total on arbitrary bytes, and what
/// a provider sends (rendered from typed values) parses back to the same
/// values. Go durations are rendered by a test-only copy of Go's
/// `Duration.String`.
#[cfg(test)]
mod proptests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    const CASES: u32 = 4_000;

    /// Go's `time.Duration.String()`: `0s`, `17ns`, `1.5µs`, `120ms`,
    /// `6m0s`, `1h2m3.5s` — units below a second only under a second.
    fn go_string(d: Duration) -> String {
        let ns = d.as_nanos();
        let with_fraction = |v: u128, unit: u128, digits: usize| {
            let (whole, rem) = (v / unit, v % unit);
            if rem == 0 {
                whole.to_string()
            } else {
                format!("{whole}.{}", format!("{rem:0digits$}").trim_end_matches('0'))
            }
        };
        match ns {
            0 => "0s".into(),
            1..1_000 => format!("{ns}ns"),
            1_000..1_000_000 => format!("{}µs", with_fraction(ns, 1_000, 3)),
            1_000_000..1_000_000_000 => format!("{}ms", with_fraction(ns, 1_000_000, 6)),
            _ => {
                let (h, rest) = (ns / 3_600_000_000_000, ns % 3_600_000_000_000);
                let (m, rest) = (rest / 60_000_000_000, rest % 60_000_000_000);
                let mut out = String::new();
                if h > 0 {
                    out.push_str(&format!("{h}h"));
                }
                if h > 0 || m > 0 {
                    out.push_str(&format!("{m}m"));
                }
                out.push_str(&format!("{}s", with_fraction(rest, 1_000_000_000, 9)));
                out
            }
        }
    }

    #[test]
    fn the_formatter_writes_what_go_writes() {
        for (d, go) in [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(17), "17ns"),
            (Duration::from_nanos(1_500), "1.5µs"),
            (Duration::from_millis(120), "120ms"),
            (Duration::from_millis(1_500), "1.5s"),
            (Duration::from_secs(360), "6m0s"),
            (Duration::from_secs(3_600), "1h0m0s"),
            (Duration::from_millis(3_723_500), "1h2m3.5s"),
            (Duration::from_nanos(3_723_123_456_789), "1h2m3.123456789s"),
        ] {
            assert_eq!(go_string(d), go);
        }
    }

    fn day_or_less() -> impl Strategy<Value = Duration> {
        prop_oneof![
            (0u64..=MAX_WAIT.as_nanos() as u64).prop_map(Duration::from_nanos),
            (0u64..=86_400_000).prop_map(Duration::from_millis),
            (0u64..=1_000_000).prop_map(Duration::from_nanos),
        ]
    }

    fn rate_limit_headers() -> impl Strategy<Value = RateLimitHeaders> {
        let n = || prop::option::of(any::<u64>());
        let d = || prop::option::of(day_or_less());
        (n(), n(), n(), n(), d(), d()).prop_map(|(lr, lt, rr, rt, dr, dt)| RateLimitHeaders {
            limit_requests: lr,
            limit_tokens: lt,
            remaining_requests: rr,
            remaining_tokens: rt,
            reset_requests: dr,
            reset_tokens: dt,
        })
    }

    /// What OpenAI would send for `r`.
    fn render(r: &RateLimitHeaders, micro: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let mut put = |name: &'static str, v: Option<String>| {
            if let Some(v) = v {
                h.insert(name, HeaderValue::from_str(&v).unwrap());
            }
        };
        let dur = |d: Option<Duration>| d.map(|d| go_string(d).replace("µs", micro));
        put("x-ratelimit-limit-requests", r.limit_requests.map(|n| n.to_string()));
        put("x-ratelimit-limit-tokens", r.limit_tokens.map(|n| n.to_string()));
        put("x-ratelimit-remaining-requests", r.remaining_requests.map(|n| n.to_string()));
        put("x-ratelimit-remaining-tokens", r.remaining_tokens.map(|n| n.to_string()));
        put("x-ratelimit-reset-requests", dur(r.reset_requests));
        put("x-ratelimit-reset-tokens", dur(r.reset_tokens));
        h
    }

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

    /// Values that look like what the headers carry, and garbage.
    fn header_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..40),
            "[0-9.hmsuµn +-]{0,24}".prop_map(String::into_bytes),
            "\\PC{0,24}".prop_map(String::into_bytes),
            "(Mon|Fri), [0-9]{1,2} (Jan|Dec) [0-9]{1,5} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT".prop_map(String::into_bytes),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn go_durations_round_trip(d in day_or_less(), micro in prop::sample::select(vec!["µs", "us", "μs"])) {
            let text = go_string(d).replace("µs", micro);
            prop_assert_eq!(parse_go_duration(&text), Some(d), "{}", text);
        }

        #[test]
        fn go_duration_parser_is_total_and_bounded(s in "[0-9.hmsuµn +-]{0,70}|\\PC{0,70}") {
            if let Some(d) = parse_go_duration(&s) {
                prop_assert!(d <= MAX_WAIT, "{:?} parsed as {:?}", s, d);
            }
        }

        #[test]
        fn rate_limit_headers_round_trip(r in rate_limit_headers(), micro in prop::sample::select(vec!["µs", "us"])) {
            prop_assert_eq!(RateLimitHeaders::from_headers(&render(&r, micro)), r);
        }

        #[test]
        fn header_parsers_are_total_on_any_value(values in prop::collection::vec(header_value(), 8)) {
            let mut h = HeaderMap::new();
            for (name, v) in NAMES.iter().zip(&values) {
                if let Ok(v) = HeaderValue::from_bytes(v) {
                    h.insert(*name, v);
                }
            }
            let r = RateLimitHeaders::from_headers(&h);
            for d in [r.reset_requests, r.reset_tokens].into_iter().flatten() {
                prop_assert!(d <= MAX_WAIT);
            }
            if let Some(d) = retry_after(&h) {
                prop_assert!(d <= MAX_WAIT, "retry-after {:?} from {:?}", d, h);
            }
        }

        #[test]
        fn retry_after_ms_is_exact_and_bounded(ms in 0u64..200_000_000) {
            let h: HeaderMap = [(http::header::HeaderName::from_static("retry-after-ms"), HeaderValue::from(ms))]
                .into_iter()
                .collect();
            let want = Duration::from_millis(ms);
            prop_assert_eq!(retry_after(&h), (want <= MAX_WAIT).then_some(want));
        }

        /// An HTTP date: a wait of at most a day, or nothing — never years.
        #[test]
        fn retry_after_dates_are_bounded(ahead in 0u64..250_000_000_000) {
            let at = SystemTime::now() + Duration::from_secs(ahead);
            let h: HeaderMap = [(
                http::header::RETRY_AFTER,
                HeaderValue::from_str(&httpdate::fmt_http_date(at)).unwrap(),
            )]
            .into_iter()
            .collect();
            let got = retry_after(&h);
            if ahead < 86_000 {
                prop_assert!(got.is_some_and(|d| d <= Duration::from_secs(ahead)), "{:?} for {}", got, ahead);
            } else if ahead > 86_500 {
                prop_assert_eq!(got, None);
            }
        }
    }
}
