//! The generic cell rate algorithm (GCRA) behind the quota ledger.
//!
//! A bucket is one number, its theoretical arrival time (TAT). Taking `n`
//! units at `now` with emission interval `T` and burst tolerance `τ` is
//! allowed iff `max(TAT, now) + n·T − now ≤ τ`, and then sets
//! `TAT = max(TAT, now) + n·T`. With `τ` equal to the limit's period this is
//! the provider's documented "continuous refill" bucket: a full minute's
//! allowance may be spent at once and it comes back linearly.
//!
//! Every backend (SQLite, DynamoDB, the simulator's in-memory limiter) runs
//! these functions; only where the TATs are stored differs.

use serde::{Deserialize, Serialize};

use crate::domain::Micros;

/// A limit of `limit` units per `period_us`, with burst tolerance
/// `tolerance_us` (normally the whole period).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    pub limit: u64,
    pub period_us: i64,
    pub tolerance_us: i64,
}

pub const MINUTE_US: i64 = 60_000_000;
pub const DAY_US: i64 = 24 * 60 * MINUTE_US;

impl Rate {
    pub fn per_minute(limit: u64) -> Self {
        Self { limit, period_us: MINUTE_US, tolerance_us: MINUTE_US }
    }

    /// A daily allowance (a tenant's tokens per day): the whole day's may be
    /// spent at once, and it comes back linearly over the next 24 hours.
    pub fn per_day(limit: u64) -> Self {
        Self { limit, period_us: DAY_US, tolerance_us: DAY_US }
    }

    /// The same rate with `slack_us` less burst tolerance. The provider
    /// charges a call when it arrives, a little after the ledger did; when
    /// the bucket had refilled, that moves the provider's TAT ahead of ours
    /// by up to the transit time. Keeping that much tolerance in hand means
    /// the provider never sees a call the ledger admitted as over the limit.
    /// It trims the burst, not the sustained rate.
    pub fn with_slack(self, slack_us: i64) -> Self {
        Self { tolerance_us: (self.period_us - slack_us.max(0)).max(1), ..self }
    }

    /// The TAT increment of `n` units: `n·T`, rounded up so rounding never
    /// admits more than the limit. A zero limit admits nothing.
    pub fn increment(&self, n: u64) -> Micros {
        if self.limit == 0 {
            return Micros::MAX / 4;
        }
        let num = n as u128 * self.period_us as u128;
        let inc = num.div_ceil(self.limit as u128);
        inc.min((Micros::MAX / 4) as u128) as Micros
    }

    /// τ: how much of the period may be spent at once.
    pub fn tolerance(&self) -> Micros {
        self.tolerance_us
    }

    /// Units still available at `now` for a bucket at `tat`.
    pub fn remaining(&self, tat: Micros, now: Micros) -> u64 {
        if self.limit == 0 {
            return 0;
        }
        let used_us = (tat - now).max(0) as u128;
        let used = (used_us * self.limit as u128).div_ceil(self.period_us as u128) as u64;
        // Units the trimmed tolerance keeps in hand are not available.
        let held =
            ((self.period_us - self.tolerance_us).max(0) as u128 * self.limit as u128 / self.period_us as u128) as u64;
        self.limit.saturating_sub(used).saturating_sub(held)
    }

    /// The TAT of a bucket that has `remaining` of `limit` units left at `at`,
    /// expressed in this rate's emission interval. Used to pull the ledger
    /// toward what the provider reports.
    pub fn tat_for_remaining(&self, limit: u64, remaining: u64, at: Micros) -> Micros {
        at + self.increment(limit.saturating_sub(remaining))
    }
}

/// The limits of one (org, model): requests and tokens per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketParams {
    pub requests: Rate,
    pub tokens: Rate,
}

/// The stored state of one (org, model): the TAT of each of its two buckets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketState {
    pub requests_tat: Micros,
    pub tokens_tat: Micros,
}

/// What one call takes from the buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    pub requests: u64,
    pub tokens: u64,
}

/// The outcome of one acquisition attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Taken; the buckets are now at this state.
    Allow(BucketState),
    /// Not now; retrying at `retry_at` will succeed if nothing else takes
    /// capacity first.
    Deny { retry_at: Micros },
    /// Larger than a whole period's allowance: never admissible here.
    Never,
}

fn one(tat: Micros, rate: &Rate, n: u64, now: Micros) -> Result<Micros, Option<Micros>> {
    let inc = rate.increment(n);
    if inc > rate.tolerance() {
        return Err(None);
    }
    let new_tat = tat.max(now) + inc;
    if new_tat - now <= rate.tolerance() { Ok(new_tat) } else { Err(Some(new_tat - rate.tolerance())) }
}

/// Checks and takes both buckets at once: either both are charged or neither.
pub fn decide(state: BucketState, params: &BucketParams, cost: Cost, now: Micros) -> Decision {
    let r = one(state.requests_tat, &params.requests, cost.requests, now);
    let t = one(state.tokens_tat, &params.tokens, cost.tokens, now);
    match (r, t) {
        (Ok(requests_tat), Ok(tokens_tat)) => Decision::Allow(BucketState { requests_tat, tokens_tat }),
        (Err(None), _) | (_, Err(None)) => Decision::Never,
        (r, t) => {
            let wait_r = r.err().flatten().unwrap_or(now);
            let wait_t = t.err().flatten().unwrap_or(now);
            Decision::Deny { retry_at: wait_r.max(wait_t) }
        }
    }
}

/// The fraction of the tighter of the two buckets still free at `now`, in
/// `[0, 1]`: the router's measure of an org's headroom.
pub fn headroom(state: &BucketState, params: &BucketParams, now: Micros) -> f64 {
    let frac = |tat: Micros, rate: &Rate| {
        let used = (tat - now).max(0) as f64 / rate.tolerance() as f64;
        (1.0 - used).clamp(0.0, 1.0)
    };
    frac(state.requests_tat, &params.requests).min(frac(state.tokens_tat, &params.tokens))
}

/// The earliest time at which `cost` fits, given only this state.
pub fn available_at(state: &BucketState, params: &BucketParams, cost: Cost, now: Micros) -> Option<Micros> {
    match decide(*state, params, cost, now) {
        Decision::Allow(_) => Some(now),
        Decision::Deny { retry_at } => Some(retry_at),
        Decision::Never => None,
    }
}

/// Raises each TAT to at least the floor's (never lowers it).
pub fn raise(state: BucketState, floor: BucketState) -> BucketState {
    BucketState {
        requests_tat: state.requests_tat.max(floor.requests_tat),
        tokens_tat: state.tokens_tat.max(floor.tokens_tat),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn params(rpm: u64, tpm: u64) -> BucketParams {
        BucketParams { requests: Rate::per_minute(rpm), tokens: Rate::per_minute(tpm) }
    }

    fn run(state: &mut BucketState, p: &BucketParams, tokens: u64, now: Micros) -> bool {
        match decide(*state, p, Cost { requests: 1, tokens }, now) {
            Decision::Allow(s) => {
                *state = s;
                true
            }
            _ => false,
        }
    }

    #[test]
    fn a_full_minute_may_be_spent_at_once_then_refills_linearly() {
        let p = params(60, 1_000_000);
        let mut st = BucketState::default();
        let t0 = 1_000 * S;
        for i in 0..60 {
            assert!(run(&mut st, &p, 1, t0), "call {i} should fit in the burst");
        }
        assert!(!run(&mut st, &p, 1, t0), "61st call in the same instant must be refused");
        // One request per second comes back.
        assert!(!run(&mut st, &p, 1, t0 + S - 1));
        assert!(run(&mut st, &p, 1, t0 + S));
        assert!(!run(&mut st, &p, 1, t0 + S));
    }

    #[test]
    fn denial_names_the_exact_retry_time_and_charges_nothing() {
        let p = params(10_000, 600);
        let mut st = BucketState::default();
        let t0 = 50 * S;
        assert!(run(&mut st, &p, 600, t0));
        let before = st;
        match decide(st, &p, Cost { requests: 1, tokens: 10 }, t0) {
            Decision::Deny { retry_at } => assert_eq!(retry_at, t0 + S),
            other => panic!("expected deny, got {other:?}"),
        }
        assert_eq!(st, before);
        assert!(!run(&mut st, &p, 10, t0 + S - 1));
        assert!(run(&mut st, &p, 10, t0 + S));
    }

    #[test]
    fn both_buckets_are_taken_or_neither() {
        let p = params(2, 1_000);
        let mut st = BucketState::default();
        let t0 = 7 * S;
        assert!(run(&mut st, &p, 100, t0));
        assert!(run(&mut st, &p, 100, t0));
        let before = st;
        // Tokens would fit, requests do not: nothing is charged.
        assert!(!run(&mut st, &p, 100, t0));
        assert_eq!(st, before);
    }

    #[test]
    fn cost_above_a_whole_period_is_never_admissible() {
        let p = params(100, 1_000);
        assert_eq!(decide(BucketState::default(), &p, Cost { requests: 1, tokens: 1_001 }, 0), Decision::Never);
    }

    #[test]
    fn admitted_units_never_exceed_the_limit_over_any_window() {
        // Randomised arrivals; count what is admitted in every sliding
        // 60-second window and compare with limit (burst) + refill.
        let p = params(1_000_000, 10_000);
        let mut st = BucketState::default();
        let mut admitted: Vec<(Micros, u64)> = Vec::new();
        let mut now = 0;
        let mut seed = 12345u64;
        for _ in 0..20_000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            now += (seed >> 40) as i64 % (200_000);
            let n = 1 + (seed >> 20) % 500;
            if run(&mut st, &p, n, now) {
                admitted.push((now, n));
            }
        }
        // Over any window of length w, at most tpm * (1 + w/60s) tokens.
        let w = 60 * S;
        let mut j = 0;
        let mut sum = 0u64;
        for i in 0..admitted.len() {
            sum += admitted[i].1;
            while admitted[i].0 - admitted[j].0 > w {
                sum -= admitted[j].1;
                j += 1;
            }
            assert!(sum <= 10_000 * 2, "window sum {sum} over bound");
        }
        assert!(admitted.len() > 100);
    }

    #[test]
    fn headroom_and_remaining_follow_the_tat() {
        let p = params(60, 6_000);
        let st = BucketState { requests_tat: 30 * S, tokens_tat: 0 };
        let h = headroom(&st, &p, 0);
        assert!((h - 0.5).abs() < 1e-9, "{h}");
        assert_eq!(p.requests.remaining(st.requests_tat, 0), 30);
        assert_eq!(p.tokens.remaining(st.tokens_tat, 0), 6_000);
        let tat = p.tokens.tat_for_remaining(6_000, 1_500, 0);
        assert_eq!(p.tokens.remaining(tat, 0), 1_500);
    }

    #[test]
    fn slack_keeps_a_late_arrival_within_the_providers_bucket() {
        // The ledger admits at a_i, the provider charges at a_i + d_i with
        // d_i <= D. With D of slack the provider's own check always passes.
        let limit = 1_000u64;
        let d = 50_000;
        let ledger_p = params(1_000_000, limit);
        let ledger_p = BucketParams { tokens: ledger_p.tokens.with_slack(d), ..ledger_p };
        let prov_p = params(1_000_000, limit);
        let (mut ledger, mut prov) = (BucketState::default(), BucketState::default());
        let mut seed = 7u64;
        let mut now = 0;
        for i in 0..5_000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            now += (seed >> 33) as i64 % 40_000;
            let n = 1 + (seed >> 12) % 60;
            // Alternate worst cases: earlier calls arrive late, this one early.
            let delay = if i % 2 == 0 { d } else { 0 };
            if run(&mut ledger, &ledger_p, n, now) {
                assert!(run(&mut prov, &prov_p, n, now + delay), "provider rejected call {i}");
            }
        }
    }

    #[test]
    fn a_daily_allowance_is_spent_at_once_and_refills_over_the_day() {
        let p = BucketParams { requests: Rate::per_minute(1_000_000), tokens: Rate::per_day(86_400) };
        let mut st = BucketState::default();
        let t0 = 3 * DAY_US;
        assert!(run(&mut st, &p, 86_000, t0), "most of the day's tokens in one go");
        assert!(run(&mut st, &p, 400, t0));
        assert!(!run(&mut st, &p, 1, t0), "the day's allowance is spent");
        // One token per second comes back (86,400 a day).
        match decide(st, &p, Cost { requests: 1, tokens: 10 }, t0) {
            Decision::Deny { retry_at } => assert_eq!(retry_at, t0 + 10 * S),
            other => panic!("expected deny, got {other:?}"),
        }
        assert!(run(&mut st, &p, 10, t0 + 10 * S));
        assert_eq!(
            decide(BucketState::default(), &p, Cost { requests: 1, tokens: 86_401 }, t0),
            Decision::Never,
            "more than a whole day's allowance"
        );
        assert_eq!(p.tokens.remaining(st.tokens_tat, st.tokens_tat), 86_400, "full again a day later");
    }

    #[test]
    fn raise_never_lowers() {
        let a = BucketState { requests_tat: 5, tokens_tat: 50 };
        let b = BucketState { requests_tat: 9, tokens_tat: 10 };
        assert_eq!(raise(a, b), BucketState { requests_tat: 9, tokens_tat: 50 });
    }
}
