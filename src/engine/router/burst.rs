//! The burst each (org, model) is admitted with: its configured window,
//! cut by 429s that the ledger did not predict and grown back by successes
//! (see [`crate::engine::window`]). Local to this process, like the
//! slow-down factor: the ledger's parameters come from each router, so on
//! a shared ledger every worker admits with the burst it learned itself.

use std::collections::BTreeMap;
use std::time::Duration;

use super::settings::TRANSIT_ALLOWANCE_US;
use super::{Router, lock};
use crate::domain::{Micros, ModelName};
use crate::engine::window::{BurstWindow, Refused};
use crate::provider::RateLimitHeaders;
use crate::storage::gcra::{BucketParams, Cost};

impl Router {
    /// The burst (µs of refill) (org, model) is admitted with now.
    fn burst_us(&self, idx: usize, model: &ModelName) -> Micros {
        let org = &self.orgs[idx];
        lock(&org.burst).get(model).map_or(org.settings.window.burst_us(), BurstWindow::get)
    }

    /// `params` as the org's window and learned burst admit a call of `cost`.
    pub(super) fn windowed(&self, idx: usize, model: &ModelName, params: &BucketParams, cost: Cost) -> BucketParams {
        let window = self.orgs[idx].settings.window;
        window.params(params, self.burst_us(idx, model), TRANSIT_ALLOWANCE_US, cost)
    }

    /// The burst of every model of an org, in seconds (for `/v1/usage`).
    pub(super) fn bursts(&self, idx: usize) -> BTreeMap<ModelName, f64> {
        let org = &self.orgs[idx];
        org.settings.models.keys().map(|m| (m.clone(), self.burst_us(idx, m) as f64 / 1e6)).collect()
    }

    /// A 429 answered a call of `cost` sent at `sent_at`: if the ledger did
    /// not predict it, the provider's bucket is smaller than the burst.
    pub(super) fn learn_from_429(
        &self,
        idx: usize,
        model: &ModelName,
        cost: Cost,
        sent_at: Micros,
        limits: &RateLimitHeaders,
        retry_after: Duration,
    ) {
        let org = &self.orgs[idx];
        if !org.settings.window.learns() {
            return;
        }
        let now = self.clock.now();
        // A slow-down in force: the router expects refusals for that reason.
        let slowed = self.rate_factor(idx, model, now) < 1.0;
        let provider = org.settings.provider_limits.get(model).copied().unwrap_or((0, 0));
        let refused = Refused::read(limits, provider, cost);
        let cut = lock(&org.burst)
            .entry(model.clone())
            .or_insert_with(|| BurstWindow::new(self.burst_policy, org.settings.window.burst_us()))
            .on_rate_limited(sent_at, now, refused, retry_after, slowed);
        if let Some(burst) = cut {
            let secs = burst as f64 / 1e6;
            tracing::warn!(
                org = %org.settings.endpoint.name, model = %model, burst_secs = secs,
                "429 while the ledger showed room: the provider's window is shorter; burst cut"
            );
            self.telemetry.set_burst(&org.settings.endpoint.name, model, secs);
        }
    }

    /// A call sent at `sent_at` succeeded: the burst may grow back.
    pub(super) fn learn_from_success(&self, idx: usize, model: &ModelName, sent_at: Micros, limits: &RateLimitHeaders) {
        let org = &self.orgs[idx];
        if !org.settings.window.learns() {
            return;
        }
        let grown = lock(&org.burst)
            .entry(model.clone())
            .or_insert_with(|| BurstWindow::new(self.burst_policy, org.settings.window.burst_us()))
            .on_success(sent_at, self.clock.now(), limits);
        if let Some(burst) = grown {
            let secs = burst as f64 / 1e6;
            tracing::info!(org = %org.settings.endpoint.name, model = %model, burst_secs = secs, "burst grown back");
            self.telemetry.set_burst(&org.settings.endpoint.name, model, secs);
        }
    }
}
