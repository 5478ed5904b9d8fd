//! How the router is set up: each org's endpoint and ledger parameters,
//! and how it retries.

use std::collections::BTreeMap;
use std::time::Duration;

use super::super::breaker::BreakerPolicy;
use crate::domain::ModelName;
use crate::engine::window::WindowSettings;
use crate::provider::OrgEndpoint;
use crate::storage::gcra::{BucketParams, Rate};

/// Time between the ledger's charge and the provider's, allowed for in the
/// burst tolerance (see [`Rate::with_slack`]).
/// It covers the ledger write's round trip (a DynamoDB conditional write,
/// retried under contention) plus the request's way to the provider; a
/// second trims the burst by 1/60 and leaves the sustained rate untouched.
pub(super) const TRANSIT_ALLOWANCE_US: i64 = 1_000_000;

/// One org as the router sees it.
#[derive(Debug, Clone)]
pub struct OrgSettings {
    pub endpoint: OrgEndpoint,
    /// Per model: the ledger's bucket parameters (limits less the safety margin).
    pub models: BTreeMap<ModelName, BucketParams>,
    /// The provider's own limits per model, used to read its headers.
    pub provider_limits: BTreeMap<ModelName, (u64, u64)>,
    pub chars_per_token: f64,
    pub header_sync: bool,
    /// Taken only by cheap steps, or after `Routing::fallback_after`.
    pub fallback: bool,
    /// How the provider counts its limits over time: the ledger's burst.
    pub window: WindowSettings,
}

impl OrgSettings {
    /// An org whose ledger buckets are its provider limits (`(rpm, tpm)` per
    /// model) less `safety_margin`, with the provider's usual prompt
    /// estimate (4 characters a token), header sync on, primary (not a
    /// fallback), and a whole minute's burst.
    pub fn new(endpoint: OrgEndpoint, provider_limits: BTreeMap<ModelName, (u64, u64)>, safety_margin: f64) -> Self {
        let keep = 1.0 - safety_margin;
        let scaled = |v: u64| ((v as f64 * keep).floor() as u64).max(1);
        let models = provider_limits
            .iter()
            .map(|(model, &(rpm, tpm))| {
                let params = BucketParams {
                    requests: Rate::per_minute(scaled(rpm)).with_slack(TRANSIT_ALLOWANCE_US),
                    tokens: Rate::per_minute(scaled(tpm)).with_slack(TRANSIT_ALLOWANCE_US),
                };
                (model.clone(), params)
            })
            .collect();
        Self {
            endpoint,
            models,
            provider_limits,
            chars_per_token: 4.0,
            header_sync: true,
            fallback: false,
            window: WindowSettings::default(),
        }
    }
}

/// How the router retries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Transient failures (5xx, timeout, dropped connection) one call may
    /// have before it is given up.
    pub max_transient_failures: u32,
    /// Provider 429s (rate limits) one call may meet, over every org, before
    /// it is given up: a limit that does not clear (a per-day limit, limits
    /// configured above the org's real tier with header sync off) would
    /// otherwise be retried forever.
    pub max_rate_limited: u32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub breaker: BreakerPolicy,
    /// How long an org that answered `insufficient_quota` or refused its
    /// key stays out of rotation before it is tried again.
    pub out_of_rotation_for: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_transient_failures: 12,
            max_rate_limited: 10,
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(20),
            breaker: BreakerPolicy::default(),
            out_of_rotation_for: Duration::from_secs(600),
        }
    }
}
