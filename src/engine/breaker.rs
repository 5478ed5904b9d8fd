//! Per-org circuit breaker and full-jitter exponential backoff.
//!
//! After `threshold` consecutive transient failures (5xx, timeouts, dropped
//! connections) the org is skipped for a cool-down; then one probe call is
//! let through (half-open). A success closes the breaker, a failure opens it
//! again for twice as long, up to `max_cooldown`.

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

/// Full-jitter exponential backoff: a uniformly random wait in
/// `[0, min(cap, base · 2^attempt))`. Jitter spreads retries of many
/// workers apart so a recovering org is not hit by all of them at once.
pub fn full_jitter(attempt: u32, base: Duration, cap: Duration, unit_random: f64) -> Duration {
    let exp = base.as_secs_f64() * 2f64.powi(attempt.min(30) as i32);
    let ceiling = exp.min(cap.as_secs_f64());
    Duration::from_secs_f64(ceiling * unit_random.clamp(0.0, 1.0))
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
    fn full_jitter_stays_within_the_exponential_ceiling() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        assert_eq!(full_jitter(0, base, cap, 1.0), Duration::from_millis(100));
        assert_eq!(full_jitter(3, base, cap, 0.5), Duration::from_millis(400));
        assert_eq!(full_jitter(20, base, cap, 1.0), cap);
        assert_eq!(full_jitter(5, base, cap, 0.0), Duration::ZERO);
    }
}
