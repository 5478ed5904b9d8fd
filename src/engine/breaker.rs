//! Per-org protection: circuit breaker, full-jitter exponential backoff, and
//! the slow-down rate factor.
//!
//! After `threshold` consecutive transient failures (5xx, timeouts, dropped
//! connections) the org is skipped for a cool-down; then one probe call is
//! let through (half-open). A success closes the breaker, a failure opens it
//! again for twice as long, up to `max_cooldown`.
//!
//! An org that answers 503 "Slow Down" is healthy but wants fewer requests:
//! [`RateFactor`] cuts the share of its configured rate the router admits
//! (multiplicative decrease) and gives it back linearly while no slow-down
//! comes (additive increase) — AIMD, as TCP does with its window.

use std::time::Duration;

use crate::domain::Micros;
use crate::telemetry::BreakerGauge;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerPolicy {
    pub threshold: u32,
    pub cooldown: Duration,
    pub max_cooldown: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self { threshold: 5, cooldown: Duration::from_secs(2), max_cooldown: Duration::from_secs(60) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Micros, cooldown_us: i64 },
    HalfOpen { probe_in_flight: bool, cooldown_us: i64 },
}

#[derive(Debug, Clone)]
pub struct Breaker {
    policy: BreakerPolicy,
    state: State,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Self {
        Self { policy, state: State::Closed { failures: 0 } }
    }

    /// Whether a call may be sent now; `None` if yes, else when to look again.
    pub fn blocked_until(&mut self, now: Micros) -> Option<Micros> {
        match self.state {
            State::Closed { .. } => None,
            State::Open { until, cooldown_us } if now >= until => {
                self.state = State::HalfOpen { probe_in_flight: false, cooldown_us };
                None
            }
            State::Open { until, .. } => Some(until),
            // While the probe is out, look again shortly: its answer decides.
            State::HalfOpen { probe_in_flight: true, .. } => Some(now + 200_000),
            State::HalfOpen { probe_in_flight: false, .. } => None,
        }
    }

    /// A call was dispatched to this org. Returns true if it is the
    /// half-open probe, whose answer the breaker now waits for.
    pub fn on_dispatch(&mut self) -> bool {
        if let State::HalfOpen { cooldown_us, probe_in_flight: false } = self.state {
            self.state = State::HalfOpen { probe_in_flight: true, cooldown_us };
            return true;
        }
        false
    }

    /// The probe's call ended without any answer from the org (cancelled,
    /// or its future dropped): let the next call probe instead. Without
    /// this the breaker would wait forever for a verdict that never comes.
    pub fn on_abandoned(&mut self) {
        if let State::HalfOpen { cooldown_us, probe_in_flight: true } = self.state {
            self.state = State::HalfOpen { probe_in_flight: false, cooldown_us };
        }
    }

    /// The org answered (any answer that is not a transient failure).
    /// Returns the new gauge state if it changed.
    pub fn on_success(&mut self) -> Option<BreakerGauge> {
        let changed = !matches!(self.state, State::Closed { .. });
        self.state = State::Closed { failures: 0 };
        changed.then_some(BreakerGauge::Closed)
    }

    /// A transient failure. Returns `Some(Open)` when the breaker opens.
    pub fn on_failure(&mut self, now: Micros) -> Option<BreakerGauge> {
        let base = self.policy.cooldown.as_micros() as i64;
        let max = self.policy.max_cooldown.as_micros() as i64;
        match self.state {
            State::Closed { failures } if failures + 1 >= self.policy.threshold => {
                self.state = State::Open { until: now + base, cooldown_us: base };
                Some(BreakerGauge::Open)
            }
            State::Closed { failures } => {
                self.state = State::Closed { failures: failures + 1 };
                None
            }
            State::HalfOpen { cooldown_us, .. } => {
                let next = (cooldown_us * 2).min(max);
                self.state = State::Open { until: now + next, cooldown_us: next };
                Some(BreakerGauge::Open)
            }
            // Calls dispatched before it opened are still coming back.
            State::Open { .. } => None,
        }
    }

    pub fn gauge(&self) -> BreakerGauge {
        match self.state {
            State::Closed { .. } => BreakerGauge::Closed,
            State::Open { .. } => BreakerGauge::Open,
            State::HalfOpen { .. } => BreakerGauge::HalfOpen,
        }
    }
}

/// How the admitted rate of an org follows its 503 "Slow Down" answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowDownPolicy {
    /// Each slow-down multiplies the factor by this.
    pub decrease: f64,
    /// The factor never goes below this: the org keeps some traffic, so the
    /// router learns when it recovers.
    pub floor: f64,
    /// Slow-downs within this long of the last cut answer calls sent before
    /// it took effect: they do not cut again (one decrease per round trip).
    pub hold: Duration,
    /// After `hold` without a slow-down the factor grows by this much of the
    /// full rate every `increase_every`, back to 1.
    pub increase: f64,
    pub increase_every: Duration,
}

impl Default for SlowDownPolicy {
    /// Halve at once; from the floor back to the full rate in about five
    /// minutes. OpenAI asks for a steady rate after a slow-down; a repeated
    /// 503 cuts again, so the slow climb is what keeps the probing gentle.
    fn default() -> Self {
        Self {
            decrease: 0.5,
            floor: 0.05,
            hold: Duration::from_secs(1),
            increase: 0.1,
            increase_every: Duration::from_secs(30),
        }
    }
}

/// The share of an (org, model)'s configured rate the router admits, in
/// `[policy.floor, 1]`. Computed from the time of the last cut, so it needs
/// no timer and is tested with an injected clock.
#[derive(Debug, Clone)]
pub struct RateFactor {
    policy: SlowDownPolicy,
    /// When the factor was last cut, and to what; `None` at the full rate.
    cut: Option<(Micros, f64)>,
}

impl RateFactor {
    pub fn new(policy: SlowDownPolicy) -> Self {
        Self { policy, cut: None }
    }

    /// The factor at `now`.
    pub fn get(&self, now: Micros) -> f64 {
        let Some((at, to)) = self.cut else { return 1.0 };
        let p = &self.policy;
        let climbing = (now - at - p.hold.as_micros() as i64).max(0) as f64;
        let every = p.increase_every.as_micros().max(1) as f64;
        (to + p.increase * climbing / every).min(1.0)
    }

    /// A slow-down answer arrived at `now`. Returns the new factor if it was
    /// cut (not within `hold` of the previous cut).
    pub fn on_slow_down(&mut self, now: Micros) -> Option<f64> {
        if let Some((at, _)) = self.cut
            && now - at < self.policy.hold.as_micros() as i64
        {
            return None;
        }
        let next = (self.get(now) * self.policy.decrease).max(self.policy.floor).min(1.0);
        self.cut = Some((now, next));
        Some(next)
    }

    /// True once, when a cut factor has climbed back to the full rate.
    pub fn take_restored(&mut self, now: Micros) -> bool {
        if self.cut.is_some() && self.get(now) >= 1.0 {
            self.cut = None;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    #[test]
    fn opens_after_threshold_probes_then_closes() {
        let mut b = Breaker::new(BreakerPolicy {
            threshold: 3,
            cooldown: Duration::from_secs(2),
            max_cooldown: Duration::from_secs(8),
        });
        assert_eq!(b.blocked_until(0), None);
        assert_eq!(b.on_failure(0), None);
        assert_eq!(b.on_failure(0), None);
        assert_eq!(b.on_failure(0), Some(BreakerGauge::Open));
        assert_eq!(b.blocked_until(S), Some(2 * S));
        // Cool-down over: one probe only.
        assert_eq!(b.blocked_until(2 * S), None);
        b.on_dispatch();
        assert!(b.blocked_until(2 * S).is_some());
        // The probe fails: open for twice as long.
        assert_eq!(b.on_failure(2 * S), Some(BreakerGauge::Open));
        assert_eq!(b.blocked_until(3 * S), Some(6 * S));
        assert_eq!(b.blocked_until(6 * S), None);
        b.on_dispatch();
        assert_eq!(b.on_success(), Some(BreakerGauge::Closed));
        assert_eq!(b.blocked_until(6 * S), None);
        assert_eq!(b.gauge(), BreakerGauge::Closed);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_call_probe() {
        let mut b = Breaker::new(BreakerPolicy {
            threshold: 1,
            cooldown: Duration::from_secs(2),
            max_cooldown: Duration::from_secs(8),
        });
        b.on_failure(0);
        assert_eq!(b.blocked_until(2 * S), None);
        assert!(b.on_dispatch(), "the first call after the cool-down is the probe");
        assert!(b.blocked_until(2 * S).is_some());
        b.on_abandoned();
        assert_eq!(b.blocked_until(2 * S), None);
        assert!(b.on_dispatch());
        // Abandoning outside half-open changes nothing.
        assert_eq!(b.on_success(), Some(BreakerGauge::Closed));
        assert!(!b.on_dispatch());
        b.on_abandoned();
        assert_eq!(b.gauge(), BreakerGauge::Closed);
    }

    #[test]
    fn cooldown_is_capped() {
        let mut b = Breaker::new(BreakerPolicy {
            threshold: 1,
            cooldown: Duration::from_secs(2),
            max_cooldown: Duration::from_secs(5),
        });
        let mut now = 0;
        b.on_failure(now);
        for _ in 0..5 {
            now = b.blocked_until(now).unwrap_or(now);
            assert_eq!(b.blocked_until(now), None);
            b.on_dispatch();
            b.on_failure(now);
        }
        assert_eq!(b.blocked_until(now), Some(now + 5 * S));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut b = Breaker::new(BreakerPolicy { threshold: 2, ..BreakerPolicy::default() });
        b.on_failure(0);
        assert_eq!(b.on_success(), None);
        assert_eq!(b.on_failure(0), None);
    }

    #[test]
    fn rate_factor_cuts_once_per_hold_and_climbs_back_linearly() {
        let policy = SlowDownPolicy {
            decrease: 0.5,
            floor: 0.1,
            hold: Duration::from_secs(1),
            increase: 0.1,
            increase_every: Duration::from_secs(2),
        };
        let mut f = RateFactor::new(policy);
        assert_eq!(f.get(0), 1.0);
        assert!(!f.take_restored(0), "never cut: nothing to restore");
        assert_eq!(f.on_slow_down(10 * S), Some(0.5));
        // Answers to calls sent before the cut do not cut again.
        assert_eq!(f.on_slow_down(10 * S + S / 2), None);
        assert_eq!(f.get(10 * S + S / 2), 0.5);
        assert_eq!(f.on_slow_down(11 * S), Some(0.25));
        assert_eq!(f.on_slow_down(12 * S), Some(0.125));
        // Never below the floor.
        assert_eq!(f.on_slow_down(13 * S), Some(0.1));
        assert_eq!(f.on_slow_down(14 * S), Some(0.1));
        // Held for a second, then +0.1 every two seconds.
        assert_eq!(f.get(15 * S), 0.1);
        assert!((f.get(17 * S) - 0.2).abs() < 1e-9, "{}", f.get(17 * S));
        assert!((f.get(25 * S) - 0.6).abs() < 1e-9, "{}", f.get(25 * S));
        // A cut while climbing halves the current value, not the old one.
        assert!((f.on_slow_down(25 * S).unwrap() - 0.3).abs() < 1e-9);
        assert!(!f.take_restored(30 * S));
        // 0.3 → 1 takes 14 s after the hold.
        assert!(f.get(39 * S + S / 2) < 1.0);
        assert_eq!(f.get(40 * S + S / 10), 1.0);
        assert!(f.take_restored(40 * S));
        assert!(!f.take_restored(41 * S), "reported once");
        assert_eq!(f.get(41 * S), 1.0);
        assert_eq!(f.on_slow_down(41 * S), Some(0.5), "a new episode starts from the full rate");
    }
}
