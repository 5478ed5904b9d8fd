//! The simulator's limiter: one pair of continuously refilling buckets
//! (requests, tokens) per (org, model), run on the same GCRA as our ledger,
//! plus the sliding-window bookkeeping that lets a test prove the client
//! never got more than the limits allow.
//!
//! Everything here is pure: the caller passes `now` and holds the lock.

use std::collections::VecDeque;

use crate::domain::Micros;
use crate::storage::gcra::{self, BucketParams, BucketState, Cost, Decision, MINUTE_US, Rate};

use super::config::SimLimits;
use super::stats::ModelStats;

/// Which of the two buckets refused a call; also OpenAI's error `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LimitKind {
    Requests,
    Tokens,
}

impl LimitKind {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }

    /// How OpenAI names the limit in its messages.
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Requests => "requests per min (RPM)",
            Self::Tokens => "tokens per min (TPM)",
        }
    }
}

/// Why a call was refused, with the numbers OpenAI's message quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refusal {
    pub kind: LimitKind,
    pub limit: u64,
    pub used: u64,
    pub requested: u64,
    /// How long until the call would fit; `None` if it never can (it asks for
    /// more than a whole minute's allowance).
    pub retry_after: Option<Micros>,
}

/// One (org, model)'s buckets as OpenAI's `x-ratelimit-*` headers show them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Snapshot {
    pub limit_requests: u64,
    pub limit_tokens: u64,
    pub remaining_requests: u64,
    pub remaining_tokens: u64,
    /// Time until the bucket is full again.
    pub reset_requests: Micros,
    pub reset_tokens: Micros,
}

/// The limiter and the peak bookkeeping of one (org, model).
#[derive(Debug)]
pub(super) struct ModelLimiter {
    limits: SimLimits,
    /// The per-minute buckets the headers advertise.
    params: BucketParams,
    /// The buckets calls are checked against: the advertised ones, or the
    /// same rates with `enforce_burst_secs` of tolerance. Both are charged
    /// alike, so one state serves both.
    enforced: BucketParams,
    bucket: BucketState,
    window: PeakWindow,
}

impl ModelLimiter {
    pub(super) fn new(limits: SimLimits) -> Self {
        let params = BucketParams { requests: Rate::per_minute(limits.rpm), tokens: Rate::per_minute(limits.tpm) };
        let burst = |rate: Rate| match limits.enforce_burst_secs {
            Some(secs) => Rate { tolerance_us: secs as Micros * 1_000_000, ..rate },
            None => rate,
        };
        let enforced = BucketParams { requests: burst(params.requests), tokens: burst(params.tokens) };
        Self { limits, params, enforced, bucket: BucketState::default(), window: PeakWindow::default() }
    }

    /// Takes `cost` from both buckets at once, or nothing at all.
    pub(super) fn try_take(&mut self, cost: Cost, now: Micros) -> Result<(), Refusal> {
        match gcra::decide(self.bucket, &self.enforced, cost, now) {
            Decision::Allow(next) => {
                self.bucket = next;
                self.window.record(now, cost);
                Ok(())
            }
            Decision::Deny { .. } | Decision::Never => Err(self.refusal(cost, now)),
        }
    }

    /// Names the bucket that binds: the one that refuses outright, else the
    /// one that frees up last (the only wait after which the call fits).
    fn refusal(&self, cost: Cost, now: Micros) -> Refusal {
        // When each bucket alone would admit its part (`None`: never).
        let fits_at =
            |requests, tokens| gcra::available_at(&self.bucket, &self.enforced, Cost { requests, tokens }, now);
        let (kind, retry_at) = match (fits_at(cost.requests, 0), fits_at(0, cost.tokens)) {
            (None, _) => (LimitKind::Requests, None),
            (_, None) => (LimitKind::Tokens, None),
            (Some(r), Some(t)) if r > t => (LimitKind::Requests, Some(r)),
            (_, Some(t)) => (LimitKind::Tokens, Some(t)),
        };
        let (rate, tat, requested) = match kind {
            LimitKind::Requests => (self.params.requests, self.bucket.requests_tat, cost.requests),
            LimitKind::Tokens => (self.params.tokens, self.bucket.tokens_tat, cost.tokens),
        };
        Refusal {
            kind,
            limit: rate.limit,
            used: rate.limit - rate.remaining(tat, now),
            requested,
            retry_after: retry_at.map(|at| (at - now).max(0)),
        }
    }

    pub(super) fn snapshot(&self, now: Micros) -> Snapshot {
        let p = &self.params;
        Snapshot {
            limit_requests: p.requests.limit,
            limit_tokens: p.tokens.limit,
            remaining_requests: p.requests.remaining(self.bucket.requests_tat, now),
            remaining_tokens: p.tokens.remaining(self.bucket.tokens_tat, now),
            reset_requests: (self.bucket.requests_tat - now).max(0),
            reset_tokens: (self.bucket.tokens_tat - now).max(0),
        }
    }

    pub(super) fn stats(&self) -> ModelStats {
        ModelStats {
            rpm: self.limits.rpm,
            tpm: self.limits.tpm,
            peak_60s_requests: self.window.peak.requests,
            peak_60s_tokens: self.window.peak.tokens,
            window_bound_requests: window_bound(self.limits.rpm),
            window_bound_tokens: window_bound(self.limits.tpm),
        }
    }
}

/// The most a continuous-refill bucket of `limit` per minute can admit in
/// any 60-second window: a full minute's burst at the start plus a minute of
/// refill, i.e. `2 × limit`. (GCRA: after admitting n units in [a, a+w] the
/// TAT is ≥ a + n·T and ≤ a + w + τ, so n ≤ limit·(w + 60 s)/60 s.)
fn window_bound(limit: u64) -> u64 {
    limit.saturating_mul(2)
}

/// Admitted cost over the trailing 60 s and the highest it has ever been.
#[derive(Debug, Default)]
struct PeakWindow {
    events: VecDeque<(Micros, Cost)>,
    sum: Totals,
    peak: Totals,
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    requests: u64,
    tokens: u64,
}

impl PeakWindow {
    /// Every window that could hold a new maximum ends at an admission, so
    /// checking the window (now − 60 s, now] at each admission finds the peak.
    fn record(&mut self, now: Micros, cost: Cost) {
        while let Some(&(t, c)) = self.events.front() {
            if t > now - MINUTE_US {
                break;
            }
            self.sum.requests -= c.requests;
            self.sum.tokens -= c.tokens;
            self.events.pop_front();
        }
        self.events.push_back((now, cost));
        self.sum.requests += cost.requests;
        self.sum.tokens += cost.tokens;
        self.peak.requests = self.peak.requests.max(self.sum.requests);
        self.peak.tokens = self.peak.tokens.max(self.sum.tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Micros = 1_000_000;

    fn call(tokens: u64) -> Cost {
        Cost { requests: 1, tokens }
    }

    #[test]
    fn refusal_names_the_binding_bucket_and_charges_nothing() {
        let mut l = ModelLimiter::new(SimLimits { rpm: 2, tpm: 1_000, enforce_burst_secs: None });
        let t0 = 100 * S;
        l.try_take(call(100), t0).unwrap();
        l.try_take(call(100), t0).unwrap();
        let before = l.snapshot(t0);
        let r = l.try_take(call(100), t0).unwrap_err();
        assert_eq!(r.kind, LimitKind::Requests);
        assert_eq!((r.limit, r.used, r.requested), (2, 2, 1));
        assert_eq!(r.retry_after, Some(30 * S));
        assert_eq!(l.snapshot(t0), before);

        let mut l = ModelLimiter::new(SimLimits { rpm: 100, tpm: 1_000, enforce_burst_secs: None });
        l.try_take(call(990), t0).unwrap();
        let r = l.try_take(call(120), t0).unwrap_err();
        assert_eq!(r.kind, LimitKind::Tokens);
        assert_eq!((r.limit, r.used, r.requested), (1_000, 990, 120));
        // 110 tokens at 1000/min come back in 6.6 s.
        assert_eq!(r.retry_after, Some(6_600_000));
    }

    #[test]
    fn a_short_enforced_bucket_refuses_behind_per_minute_headers() {
        let mut l = ModelLimiter::new(SimLimits { rpm: 1_000, tpm: 30_000, enforce_burst_secs: Some(10) });
        let t0 = 100 * S;
        // 10 s of refill: 5,000 tokens at once, not 30,000.
        for _ in 0..10 {
            l.try_take(call(500), t0).unwrap();
        }
        let r = l.try_take(call(500), t0).unwrap_err();
        assert_eq!(r.kind, LimitKind::Tokens);
        assert_eq!(r.retry_after, Some(S), "500 tokens come back in a second");
        assert_eq!((r.limit, r.used), (30_000, 5_000), "the message quotes the minute");
        let s = l.snapshot(t0);
        assert_eq!((s.limit_tokens, s.remaining_tokens, s.reset_tokens), (30_000, 25_000, 10 * S));
        l.try_take(call(500), t0 + S).unwrap();
    }

    #[test]
    fn a_call_larger_than_the_minute_never_fits() {
        let mut l = ModelLimiter::new(SimLimits { rpm: 100, tpm: 1_000, enforce_burst_secs: None });
        let r = l.try_take(call(1_001), 0).unwrap_err();
        assert_eq!((r.kind, r.retry_after), (LimitKind::Tokens, None));
    }

    #[test]
    fn snapshot_reports_remaining_and_time_to_full() {
        let mut l = ModelLimiter::new(SimLimits { rpm: 60, tpm: 6_000, enforce_burst_secs: None });
        let t0 = 10 * S;
        l.try_take(call(600), t0).unwrap();
        let s = l.snapshot(t0);
        assert_eq!((s.remaining_requests, s.remaining_tokens), (59, 5_400));
        assert_eq!((s.reset_requests, s.reset_tokens), (S, 6 * S));
        let s = l.snapshot(t0 + 10 * S);
        assert_eq!((s.remaining_requests, s.remaining_tokens, s.reset_tokens), (60, 6_000, 0));
    }

    #[test]
    fn peak_is_the_busiest_sliding_minute() {
        let mut l = ModelLimiter::new(SimLimits { rpm: 1_000, tpm: 1_000_000, enforce_burst_secs: None });
        let t0 = 1_000 * S;
        for i in 0..10 {
            l.try_take(call(100), t0 + i * S).unwrap();
        }
        // 70 s later the first ten have left the window: the peak stays 10.
        for i in 0..5 {
            l.try_take(call(10), t0 + 70 * S + i * S).unwrap();
        }
        let s = l.stats();
        assert_eq!((s.peak_60s_requests, s.peak_60s_tokens), (10, 1_000));
        // An event exactly 60 s after another is in a different window.
        l.try_take(call(1), t0 + 70 * S + 60 * S).unwrap();
        assert_eq!(l.stats().peak_60s_requests, 10);
        assert_eq!((l.stats().window_bound_requests, l.stats().window_bound_tokens), (2_000, 2_000_000));
    }

    #[test]
    fn saturating_traffic_stays_within_the_window_bound() {
        let mut l = ModelLimiter::new(SimLimits { rpm: 600, tpm: 10_000, enforce_burst_secs: None });
        let mut now = 0;
        for i in 0..100_000u64 {
            now += 7_919 + (i % 13) as Micros * 1_000;
            let _ = l.try_take(call(1 + i % 97), now);
        }
        let s = l.stats();
        assert!(s.peak_60s_tokens <= s.window_bound_tokens, "{s:?}");
        assert!(s.peak_60s_requests <= s.window_bound_requests, "{s:?}");
        assert!(s.peak_60s_tokens > 10_000, "the burst should be visible: {s:?}");
    }
}
