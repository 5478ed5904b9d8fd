//! The provider's real burst window, configured and learned.
//!
//! The ledger models a limit as a bucket holding `burst_secs` of refill
//! (GCRA tolerance), a whole minute by default: after idling it lets a
//! minute's tokens go at once. A provider that enforces over shorter
//! periods (Azure OpenAI counts RPM in 10-second slices) then answers 429
//! although the ledger showed room. [`BurstWindow`] learns that from such
//! unexplained 429s: it shrinks the burst of one (org, model) to what the
//! 429's headers say the provider's bucket really held (halving without
//! headers), never below a floor, and grows it back by a second at a time
//! while calls keep succeeding. Everything is computed from times passed in,
//! so it is tested with an injected clock.

use std::time::Duration;

use serde::Deserialize;

use crate::domain::Micros;
use crate::provider::RateLimitHeaders;
use crate::storage::gcra::{BucketParams, Cost, MINUTE_US, Rate};

/// How the provider counts a limit over time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowModel {
    /// A continuously refilling bucket of `burst_secs` of refill (OpenAI's
    /// documented model, with `burst_secs = 60`). Learned from 429s.
    #[default]
    Continuous,
    /// Fixed windows of `burst_secs` whose alignment is unknown: the ledger
    /// paces calls with a one-second burst, at the rate that keeps any
    /// `burst_secs`-long stretch (plus the transit time) within one window's
    /// allowance. Nothing is learned: pacing is already the floor.
    Fixed,
}

/// An org's window settings (`burst_secs`, `window` in its config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSettings {
    pub burst_secs: u64,
    pub model: WindowModel,
}

impl Default for WindowSettings {
    /// Today's behaviour: a whole minute, continuously refilled.
    fn default() -> Self {
        Self { burst_secs: 60, model: WindowModel::Continuous }
    }
}

/// The burst a fixed-window org's ledger allows (before the transit
/// allowance): one second of refill, so calls go at an even pace.
const FIXED_BURST_US: i64 = 1_000_000;

impl WindowSettings {
    pub fn burst_us(&self) -> Micros {
        self.burst_secs as Micros * 1_000_000
    }

    /// Whether 429s may teach this org a smaller burst.
    pub fn learns(&self) -> bool {
        self.model == WindowModel::Continuous
    }

    /// The ledger parameters of one call: `params` (the per-minute limits
    /// less the transit allowance, already slowed down if need be) with
    /// the burst cut to `burst_us` less `transit_us`. A fixed window also
    /// lowers the rate by `W / (W + burst + transit)`. The tolerance never
    /// goes below what `cost` needs (up to the configured minute), so a
    /// small burst delays a large call (until the bucket is empty); only a
    /// call larger than the minute itself is refused for good.
    pub fn params(&self, params: &BucketParams, burst_us: Micros, transit_us: Micros, cost: Cost) -> BucketParams {
        let one = |rate: Rate, n: u64| {
            let (limit, tolerance) = match self.model {
                WindowModel::Continuous => (rate.limit, rate.tolerance_us.min(burst_us - transit_us)),
                WindowModel::Fixed => {
                    let w = self.burst_us() as u128;
                    let cut = u128::from(rate.limit) * w / (w + (FIXED_BURST_US + transit_us) as u128);
                    (cut.clamp(1, u128::from(rate.limit)) as u64, FIXED_BURST_US)
                }
            };
            let rate = Rate { limit, ..rate };
            // Raised for a large call, but never past the configured minute:
            // a call the org could never take stays refused for good (the
            // router then tries the orgs it fits, or answers too large).
            let needed = rate.increment(n).min(rate.tolerance_us);
            Rate { tolerance_us: tolerance.max(needed).max(1), ..rate }
        };
        BucketParams { requests: one(params.requests, cost.requests), tokens: one(params.tokens, cost.tokens) }
    }
}

/// How a learned burst follows unexplained 429s and successes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BurstPolicy {
    /// Never below this much refill (nor above the configured burst).
    pub floor: Duration,
    /// Without headers to estimate the real bucket, a cut multiplies by this.
    pub decrease: f64,
    /// While calls succeed, the burst grows by `increase` every `increase_every`.
    pub increase: Duration,
    pub increase_every: Duration,
}

impl Default for BurstPolicy {
    /// A 429 costs a retry and a step over the real bucket costs one per
    /// probe, while a burst smaller than the provider's only delays the
    /// first calls after an idle spell. So: cut at once to the estimate,
    /// grow back one second every two minutes of traffic. The first second
    /// over an estimate is covered by the transit allowance, so the first
    /// probe that can 429 comes four minutes after a cut.
    fn default() -> Self {
        Self {
            floor: Duration::from_secs(3),
            decrease: 0.5,
            increase: Duration::from_secs(1),
            increase_every: Duration::from_secs(120),
        }
    }
}

/// What a 429's own headers say about it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refused {
    /// The per-minute bucket the headers show could not take the call:
    /// other traffic or an estimate error, not a short window.
    pub minute_spent: bool,
    /// How much of its bucket, in µs of refill, the provider had filled
    /// when it refused (the fullest of requests and tokens): the real
    /// burst is at least this, and the call did not fit on top of it.
    pub filled_us: Option<Micros>,
}

impl Refused {
    /// Reads a 429's headers. `limits` are the provider's (rpm, tpm), used
    /// where the headers do not state a limit; `cost` is the call's.
    pub fn read(h: &RateLimitHeaders, limits: (u64, u64), cost: Cost) -> Self {
        let one = |limit: Option<u64>, default: u64, remaining: Option<u64>, reset: Option<Duration>, n: u64| {
            let limit = limit.unwrap_or(default).max(1);
            let spent = remaining.is_some_and(|r| r < n);
            let filled = match (remaining, reset) {
                (Some(r), _) => {
                    Some((u128::from(limit.saturating_sub(r)) * MINUTE_US as u128 / u128::from(limit)) as Micros)
                }
                (None, Some(reset)) => Some(reset.as_micros().min(MINUTE_US as u128) as Micros),
                (None, None) => None,
            };
            (spent, filled)
        };
        let (r_spent, r_filled) =
            one(h.limit_requests, limits.0, h.remaining_requests, h.reset_requests, cost.requests);
        let (t_spent, t_filled) = one(h.limit_tokens, limits.1, h.remaining_tokens, h.reset_tokens, cost.tokens);
        let filled_us = match (r_filled, t_filled) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Self { minute_spent: r_spent || t_spent, filled_us }
    }
}

/// The learned burst of one (org, model), in µs of refill.
#[derive(Debug, Clone)]
pub struct BurstWindow {
    policy: BurstPolicy,
    configured: Micros,
    current: Micros,
    /// When the burst last changed (cut or grown); growth counts from it.
    changed_at: Micros,
    /// When the last 429 was handled: calls sent before it were admitted
    /// without its news, so their 429s are the same evidence again.
    last_429: Micros,
    /// Until when the provider was known to be out of room (a 429's retry
    /// time, headers showing nothing left): 429s of calls sent before that
    /// were predicted, they say nothing about the window.
    known_blocked_until: Micros,
}

impl BurstWindow {
    pub fn new(policy: BurstPolicy, configured: Micros) -> Self {
        Self {
            policy,
            configured,
            current: configured,
            changed_at: Micros::MIN,
            last_429: Micros::MIN,
            known_blocked_until: Micros::MIN,
        }
    }

    /// The burst to admit with now.
    pub fn get(&self) -> Micros {
        self.current
    }

    fn floor(&self) -> Micros {
        (self.policy.floor.as_micros() as Micros).min(self.configured)
    }

    /// A 429 for a call sent at `sent_at` arrived at `now`; `retry_after`
    /// is the provider's wait. `predicted` says the router expected it for
    /// another reason (a slow-down in force). Returns the new burst if this
    /// was evidence of a smaller bucket and it was cut.
    pub fn on_rate_limited(
        &mut self,
        sent_at: Micros,
        now: Micros,
        refused: Refused,
        retry_after: Duration,
        predicted: bool,
    ) -> Option<Micros> {
        let evidence =
            !predicted && !refused.minute_spent && sent_at >= self.last_429 && sent_at >= self.known_blocked_until;
        self.last_429 = now;
        self.known_blocked_until = self.known_blocked_until.max(now + retry_after.as_micros() as Micros);
        if !evidence {
            return None;
        }
        let next = match refused.filled_us {
            Some(filled) if filled < self.current => filled,
            _ => (self.current as f64 * self.policy.decrease) as Micros,
        }
        .max(self.floor());
        if next >= self.current {
            return None;
        }
        self.current = next;
        self.changed_at = now;
        Some(next)
    }

    /// A call sent at `sent_at` succeeded at `now`; `headers` are its
    /// answer's. Returns the new burst if it grew.
    pub fn on_success(&mut self, sent_at: Micros, now: Micros, headers: &RateLimitHeaders) -> Option<Micros> {
        // Headers that show a limit used up: a 429 before its reset is expected.
        for (remaining, reset) in
            [(headers.remaining_requests, headers.reset_requests), (headers.remaining_tokens, headers.reset_tokens)]
        {
            if remaining == Some(0) {
                let reset = reset.map_or(0, |r| r.as_micros() as Micros);
                self.known_blocked_until = self.known_blocked_until.max(sent_at + reset);
            }
        }
        if self.current >= self.configured || sent_at < self.changed_at {
            return None;
        }
        let every = self.policy.increase_every.as_micros() as Micros;
        if now - self.changed_at < every {
            return None;
        }
        self.current = (self.current + self.policy.increase.as_micros() as Micros).min(self.configured);
        self.changed_at = now;
        Some(self.current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Clock, ManualClock};

    const S: Micros = 1_000_000;

    fn room() -> Refused {
        Refused { minute_spent: false, filled_us: None }
    }

    #[test]
    fn an_unexplained_429_cuts_to_what_the_headers_show_the_bucket_held() {
        let clock = ManualClock::new(1_000 * S);
        let mut w = BurstWindow::new(BurstPolicy::default(), 60 * S);
        // 1,000 rpm / 30,000 tpm; the provider refused with 25,000 tokens of
        // its minute left (5,000 used: 10 s of refill) and 900 requests.
        let h = RateLimitHeaders {
            remaining_requests: Some(900),
            remaining_tokens: Some(25_000),
            reset_tokens: Some(Duration::from_secs(10)),
            ..Default::default()
        };
        let refused = Refused::read(&h, (1_000, 30_000), Cost { requests: 1, tokens: 300 });
        assert_eq!(refused, Refused { minute_spent: false, filled_us: Some(10 * S) });
        let t = clock.now();
        assert_eq!(w.on_rate_limited(t - 50_000, t, refused, Duration::from_millis(600), false), Some(10 * S));
        assert_eq!(w.get(), 10 * S);
        // Calls in flight when the news came: their 429s are not new evidence.
        clock.advance(Duration::from_millis(5));
        assert_eq!(w.on_rate_limited(t - 10_000, clock.now(), refused, Duration::ZERO, false), None);
        // Without headers a later unexplained 429 halves.
        clock.advance(Duration::from_secs(2));
        let t2 = clock.now();
        assert_eq!(w.on_rate_limited(t2 - 1_000, t2, room(), Duration::ZERO, false), Some(5 * S));
        // Never below the floor.
        clock.advance(Duration::from_secs(2));
        let t3 = clock.now();
        assert_eq!(w.on_rate_limited(t3 - 1_000, t3, room(), Duration::ZERO, false), Some(3 * S));
        clock.advance(Duration::from_secs(2));
        let t4 = clock.now();
        assert_eq!(w.on_rate_limited(t4 - 1_000, t4, room(), Duration::ZERO, false), None);
        assert_eq!(w.get(), 3 * S);
    }

    #[test]
    fn a_429_the_ledger_predicted_does_not_cut() {
        let mut w = BurstWindow::new(BurstPolicy::default(), 60 * S);
        let t = 500 * S;
        // The headers show the minute itself spent: other traffic, not the window.
        let h = RateLimitHeaders {
            remaining_requests: Some(0),
            reset_requests: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        let spent = Refused::read(&h, (1_000, 30_000), Cost { requests: 1, tokens: 10 });
        assert!(spent.minute_spent);
        assert_eq!(w.on_rate_limited(t - 1_000, t, spent, Duration::from_secs(2), false), None);
        // Sent while the provider was known to be blocked (the 429's retry time).
        let t2 = t + S;
        assert_eq!(w.on_rate_limited(t2 - 1_000, t2, room(), Duration::ZERO, false), None);
        // During a slow-down the router already expects refusals.
        let t3 = t + 10 * S;
        assert_eq!(w.on_rate_limited(t3 - 1_000, t3, room(), Duration::ZERO, true), None);
        // Headers of a success showed nothing left until +5 s: a 429 of a
        // call sent before then was predicted.
        let t4 = t + 20 * S;
        let empty = RateLimitHeaders {
            remaining_tokens: Some(0),
            reset_tokens: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        assert_eq!(w.on_success(t4, t4 + 1_000, &empty), None);
        assert_eq!(w.on_rate_limited(t4 + 2 * S, t4 + 2 * S + 1_000, room(), Duration::ZERO, false), None);
        assert_eq!(w.get(), 60 * S, "nothing above was evidence of a shorter window");
        // After all that, a 429 sent with room is.
        let t5 = t + 40 * S;
        assert_eq!(w.on_rate_limited(t5 - 1_000, t5, room(), Duration::ZERO, false), Some(30 * S));
    }

    #[test]
    fn successes_grow_the_burst_back_slowly_to_the_configured_one() {
        let policy = BurstPolicy {
            increase: Duration::from_secs(1),
            increase_every: Duration::from_secs(10),
            ..Default::default()
        };
        let clock = ManualClock::new(100 * S);
        let mut w = BurstWindow::new(policy, 12 * S);
        let none = RateLimitHeaders::default();
        // Never cut: successes change nothing.
        assert_eq!(w.on_success(clock.now(), clock.now(), &none), None);
        let cut_at = clock.now();
        let filled = Refused { minute_spent: false, filled_us: Some(9 * S) };
        assert_eq!(w.on_rate_limited(cut_at - 1, cut_at, filled, Duration::ZERO, false), Some(9 * S));
        // A success of a call sent before the cut proves nothing.
        clock.advance(Duration::from_secs(30));
        assert_eq!(w.on_success(cut_at - 1, clock.now(), &none), None);
        // One step per `increase_every` of successes, not per success.
        let mut grown = Vec::new();
        for _ in 0..600 {
            clock.advance(Duration::from_millis(100));
            if let Some(b) = w.on_success(clock.now() - 50_000, clock.now(), &none) {
                grown.push(b);
            }
        }
        assert_eq!(grown, vec![10 * S, 11 * S, 12 * S], "up to the configured burst and no further");
        assert_eq!(w.get(), 12 * S);
    }

    #[test]
    fn window_params_cut_the_burst_and_still_take_a_large_call() {
        let minute = BucketParams {
            requests: Rate::per_minute(1_000).with_slack(S),
            tokens: Rate::per_minute(30_000).with_slack(S),
        };
        let small = Cost { requests: 1, tokens: 100 };
        let cont = WindowSettings::default();
        assert_eq!(cont.params(&minute, 60 * S, S, small), minute, "the default is today's ledger");
        let p = cont.params(&minute, 10 * S, S, small);
        assert_eq!((p.tokens.tolerance_us, p.tokens.limit), (9 * S, 30_000));
        // 20,000 tokens is 40 s of refill: admissible, with its own tolerance.
        let big = Cost { requests: 1, tokens: 20_000 };
        assert_eq!(cont.params(&minute, 10 * S, S, big).tokens.tolerance_us, 40 * S);
        // Fixed 60 s windows: a one-second burst, 60/62 of the rate.
        let fixed = WindowSettings { burst_secs: 60, model: WindowModel::Fixed };
        let f = fixed.params(&minute, 60 * S, S, small);
        assert_eq!((f.tokens.limit, f.tokens.tolerance_us), (30_000 * 60 / 62, S));
        assert!(!fixed.learns() && cont.learns());
    }
}
