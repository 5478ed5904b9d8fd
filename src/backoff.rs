//! Full-jitter exponential backoff, shared by everything that retries:
//! provider calls and webhook deliveries.

use std::time::Duration;

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
