//! Parsing of the provider's rate-limit headers and retry hints.
//!
//! OpenAI reports its view of each bucket on every response:
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, where reset is a
//! Go-style duration (`6m0s`, `1.5s`, `120ms`). 429 and 503 answers may add
//! `retry-after-ms` (milliseconds) or `retry-after` (seconds or HTTP date).
//! Every parser here is total: a malformed header is treated as absent.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

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

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
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
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

fn duration_from_secs(secs: f64) -> Option<Duration> {
    // Reject NaN, negatives and absurd values (over a day) as malformed.
    (secs.is_finite() && (0.0..=86_400.0).contains(&secs)).then(|| Duration::from_secs_f64(secs))
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
    fn retry_after_prefers_milliseconds() {
        let h = headers(&[("retry-after-ms", "1500"), ("retry-after", "9")]);
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        assert_eq!(retry_after(&headers(&[("retry-after", "2")])), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(&headers(&[("retry-after", "-3")])), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")])), Some(Duration::ZERO));
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }
}
