//! Moving the ledger toward the provider's view: every answer's
//! `x-ratelimit-*` headers, and a 429's retry time.

use std::time::Duration;

use super::{Router, lock, to_micros};
use crate::domain::{Micros, ModelName};
use crate::engine::retry::{WriteRetry, retry_write};
use crate::provider::RateLimitHeaders;
use crate::storage::BucketKey;
use crate::storage::gcra::{self, BucketParams, BucketState, Cost, Rate};

impl Router {
    pub(super) fn remember(
        &self,
        idx: usize,
        model: &ModelName,
        state: BucketState,
        params: &BucketParams,
        now: Micros,
    ) {
        let org = &self.orgs[idx];
        let mut cache = lock(&org.cache);
        let slot = cache.entry(model.clone()).or_default();
        *slot = gcra::raise(*slot, state);
        self.telemetry.set_headroom(&org.settings.endpoint.name, model, gcra::headroom(slot, params, now));
    }

    /// Moves the ledger to the provider's view when it shows less headroom.
    /// `sent_at` stands in for the provider's admission time: using it (not
    /// the time the answer arrived) never overstates the provider's usage.
    /// `blocked_for` (after a 429) keeps the org out until the provider's
    /// retry time even if its headers say nothing.
    pub(super) async fn sync_headers(
        &self,
        idx: usize,
        model: &ModelName,
        h: &RateLimitHeaders,
        sent_at: Micros,
        blocked_for: Option<Duration>,
    ) {
        let org = &self.orgs[idx];
        if !org.settings.header_sync && blocked_for.is_none() {
            return;
        }
        let Some(params) = org.settings.models.get(model) else { return };
        let (prov_rpm, prov_tpm) =
            org.settings.provider_limits.get(model).copied().unwrap_or((params.requests.limit, params.tokens.limit));
        let mut floor = BucketState::default();
        if org.settings.header_sync {
            floor = provider_floor(params, h, prov_rpm, prov_tpm, sent_at);
        }
        // What admission uses: a learned burst shortens the tolerance.
        let admitted = self.windowed(idx, model, params, Cost { requests: 1, tokens: 0 });
        if let Some(d) = blocked_for {
            // Available again (for one request) at now + retry-after.
            let again = self.clock.now() + to_micros(d);
            floor.requests_tat =
                floor.requests_tat.max(again + admitted.requests.tolerance() - admitted.requests.increment(1));
        }
        let cached = lock(&org.cache).get(model).copied().unwrap_or_default();
        // Write only when the provider is ahead by more than one request's
        // or a rounding's worth: the common case costs no ledger write.
        let slack_r = params.requests.increment(1);
        let slack_t = params.tokens.increment(params.tokens.limit / 1000 + 1);
        let ahead =
            floor.requests_tat > cached.requests_tat + slack_r || floor.tokens_tat > cached.tokens_tat + slack_t;
        if !ahead {
            return;
        }
        let key = BucketKey::new(&org.settings.endpoint.name, model);
        match retry_write("ledger raise", WriteRetry::CALL, || true, |_| self.ledger.raise(&key, floor)).await {
            Ok(state) => {
                self.telemetry.ledger_op("raise");
                tracing::debug!(org = %org.settings.endpoint.name, model = %model, "ledger moved toward the provider's headers");
                self.remember(idx, model, state, &admitted, self.clock.now());
            }
            Err(e) => {
                tracing::warn!(org = %org.settings.endpoint.name, error = %e, "could not sync the ledger to provider headers")
            }
        }
    }
}

/// The bucket state the provider's headers imply, at `at`.
pub fn provider_floor(
    params: &BucketParams,
    h: &RateLimitHeaders,
    prov_rpm: u64,
    prov_tpm: u64,
    at: Micros,
) -> BucketState {
    let tat = |rate: &Rate, limit: Option<u64>, default_limit: u64, remaining: Option<u64>, reset: Option<Duration>| {
        match (remaining, reset) {
            // Used = limit − remaining, with our own limit when the provider's
            // is lower (misconfigured, or its tier was cut): the ledger then
            // believes in no more than the provider says is left.
            (Some(rem), _) => rate.tat_for_remaining(limit.unwrap_or(default_limit).max(rate.limit), rem, at),
            (None, Some(reset)) => at + to_micros(reset),
            (None, None) => 0,
        }
    };
    BucketState {
        requests_tat: tat(&params.requests, h.limit_requests, prov_rpm, h.remaining_requests, h.reset_requests),
        tokens_tat: tat(&params.tokens, h.limit_tokens, prov_tpm, h.remaining_tokens, h.reset_tokens),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_floor_reads_remaining_in_our_units() {
        let p = BucketParams { requests: Rate::per_minute(60), tokens: Rate::per_minute(6_000) };
        let h = RateLimitHeaders { remaining_requests: Some(30), remaining_tokens: Some(1_500), ..Default::default() };
        let f = provider_floor(&p, &h, 60, 6_000, 0);
        assert_eq!(p.requests.remaining(f.requests_tat, 0), 30);
        assert_eq!(p.tokens.remaining(f.tokens_tat, 0), 1_500);
        // Reset only: the bucket is full again at `at + reset`.
        let h = RateLimitHeaders { reset_tokens: Some(Duration::from_secs(6)), ..Default::default() };
        assert_eq!(provider_floor(&p, &h, 60, 6_000, 10).tokens_tat, 10 + 6_000_000);
        assert_eq!(provider_floor(&p, &RateLimitHeaders::default(), 60, 6_000, 10), BucketState::default());
        // The provider's limit is below ours: what it has left is all we may use.
        let h = RateLimitHeaders { limit_requests: Some(3), remaining_requests: Some(2), ..Default::default() };
        assert_eq!(p.requests.remaining(provider_floor(&p, &h, 3, 6_000, 0).requests_tat, 0), 2);
    }
}
