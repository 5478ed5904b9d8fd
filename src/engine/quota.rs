//! Tenant quotas: how a tenant's `[tenants.quota]` becomes a pair of
//! buckets in the same quota ledger as the orgs' (so one runaway script
//! cannot spend the pool), and the limit on its jobs in flight.
//!
//! The router charges a tenant's bucket before the org's for every call
//! attempt; the API reads it at submission to refuse work that could not
//! run now. A limit the tenant does not have is charged nothing.

use std::collections::HashMap;

use serde::Serialize;

use crate::domain::{Micros, TenantId};
use crate::storage::gcra::{self, BucketParams, BucketState, Cost, Decision, Rate};

/// One tenant's limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantQuota {
    pub tokens_per_day: Option<u64>,
    pub calls_per_minute: Option<u64>,
    pub jobs_in_flight: Option<u64>,
}

/// Which of a tenant's limits refused something, as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaKind {
    TokensPerDay,
    CallsPerMinute,
    JobsInFlight,
}

impl QuotaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TokensPerDay => "tokens_per_day",
            Self::CallsPerMinute => "calls_per_minute",
            Self::JobsInFlight => "jobs_in_flight",
        }
    }
}

/// A rate quota found spent: which one, its limit, and when it has room
/// again for one more call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    pub kind: QuotaKind,
    pub limit: u64,
    pub retry_at: Micros,
}

impl TenantQuota {
    /// The ledger parameters of the tenant's bucket pair, if it has a rate
    /// limit at all. An unset limit's bucket is charged nothing (see
    /// [`Self::charge`]), so its rate here is only a placeholder.
    pub fn bucket_params(&self) -> Option<BucketParams> {
        if self.tokens_per_day.is_none() && self.calls_per_minute.is_none() {
            return None;
        }
        Some(BucketParams {
            requests: Rate::per_minute(self.calls_per_minute.unwrap_or(1)),
            tokens: Rate::per_day(self.tokens_per_day.unwrap_or(1)),
        })
    }

    /// What one call attempt of `call` (an org's reservation) takes from
    /// the tenant's buckets: nothing from a limit it does not have.
    pub fn charge(&self, call: Cost) -> Cost {
        Cost {
            requests: if self.calls_per_minute.is_some() { call.requests } else { 0 },
            tokens: if self.tokens_per_day.is_some() { call.tokens } else { 0 },
        }
    }

    /// The rate limit that has no room for even the smallest call at `now`
    /// (one request, one token), given the bucket state `state`; calls per
    /// minute first when both are spent.
    pub fn spent(&self, state: &BucketState, now: Micros) -> Option<Spent> {
        let params = self.bucket_params()?;
        let check = |kind, limit: Option<u64>, cost: Cost| {
            let limit = limit?;
            match gcra::decide(*state, &params, cost, now) {
                Decision::Allow(_) => None,
                Decision::Deny { retry_at } => Some(Spent { kind, limit, retry_at }),
                Decision::Never => Some(Spent { kind, limit, retry_at: Micros::MAX }),
            }
        };
        check(QuotaKind::CallsPerMinute, self.calls_per_minute, Cost { requests: 1, tokens: 0 })
            .or_else(|| check(QuotaKind::TokensPerDay, self.tokens_per_day, Cost { requests: 0, tokens: 1 }))
    }

    /// Whether the tenant has any limit at all.
    pub fn is_limited(&self) -> bool {
        *self != Self::default()
    }

    /// What is left at `now` of each limit, given the tenant's bucket state
    /// and its jobs queued or running.
    pub fn report(&self, state: &BucketState, now: Micros, in_flight: u64) -> QuotaReport {
        let params = self.bucket_params();
        let rate = |limit: Option<u64>, left: &dyn Fn(&BucketParams) -> u64| {
            Some(Left { limit: limit?, remaining: params.as_ref().map_or(0, left) })
        };
        QuotaReport {
            tokens_per_day: rate(self.tokens_per_day, &|p| p.tokens.remaining(state.tokens_tat, now)),
            calls_per_minute: rate(self.calls_per_minute, &|p| p.requests.remaining(state.requests_tat, now)),
            jobs_in_flight: self.jobs_in_flight.map(|limit| Left { limit, remaining: limit.saturating_sub(in_flight) }),
        }
    }
}

/// One limit of a tenant's quota and what is left of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Left {
    pub limit: u64,
    pub remaining: u64,
}

/// What is left of each limit a tenant has (`/v1/usage`); a limit it does
/// not have is absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QuotaReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<Left>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calls_per_minute: Option<Left>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs_in_flight: Option<Left>,
}

/// Every configured tenant's quota.
#[derive(Debug, Clone, Default)]
pub struct TenantQuotas(HashMap<TenantId, TenantQuota>);

impl TenantQuotas {
    pub fn new(quotas: HashMap<TenantId, TenantQuota>) -> Self {
        Self(quotas)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&TenantId, &TenantQuota)> {
        self.0.iter()
    }

    /// The tenant's quota; an unknown tenant is unlimited.
    pub fn get(&self, tenant: &TenantId) -> TenantQuota {
        self.0.get(tenant).copied().unwrap_or_default()
    }
}

impl FromIterator<(TenantId, TenantQuota)> for TenantQuotas {
    fn from_iter<I: IntoIterator<Item = (TenantId, TenantQuota)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Micros = 1_000_000;

    fn quota(tokens_per_day: Option<u64>, calls_per_minute: Option<u64>) -> TenantQuota {
        TenantQuota { tokens_per_day, calls_per_minute, jobs_in_flight: None }
    }

    #[test]
    fn no_rate_limit_means_no_bucket_and_an_unset_limit_is_charged_nothing() {
        assert_eq!(quota(None, None).bucket_params(), None);
        let call = Cost { requests: 1, tokens: 500 };
        assert_eq!(quota(Some(1_000), None).charge(call), Cost { requests: 0, tokens: 500 });
        assert_eq!(quota(None, Some(10)).charge(call), Cost { requests: 1, tokens: 0 });
        assert_eq!(quota(Some(1_000), Some(10)).charge(call), call);
        let p = quota(Some(86_400), Some(60)).bucket_params().unwrap();
        assert_eq!(p.requests, Rate::per_minute(60));
        assert_eq!(p.tokens, Rate::per_day(86_400));
    }

    #[test]
    fn spent_names_the_limit_and_when_it_has_room_again() {
        let q = quota(Some(86_400), Some(60));
        let p = q.bucket_params().unwrap();
        let now = 1_000 * S;
        assert_eq!(q.spent(&BucketState::default(), now), None);
        // A minute's calls taken at once: the next one fits a second later.
        let calls_spent = BucketState { requests_tat: now + 60 * S, tokens_tat: 0 };
        assert_eq!(
            q.spent(&calls_spent, now),
            Some(Spent { kind: QuotaKind::CallsPerMinute, limit: 60, retry_at: now + S })
        );
        // A day's tokens taken: one token per second comes back.
        let tokens_spent = BucketState { requests_tat: 0, tokens_tat: now + p.tokens.increment(86_400) };
        assert_eq!(
            q.spent(&tokens_spent, now),
            Some(Spent { kind: QuotaKind::TokensPerDay, limit: 86_400, retry_at: now + S })
        );
        // A tenant without a calls limit is never refused for calls.
        assert_eq!(quota(Some(86_400), None).spent(&calls_spent, now), None);
    }

    #[test]
    fn the_report_shows_what_is_left_of_each_limit_the_tenant_has() {
        let q = TenantQuota { tokens_per_day: Some(86_400), calls_per_minute: Some(60), jobs_in_flight: Some(5) };
        let p = q.bucket_params().unwrap();
        let now = 1_000 * S;
        let fresh = q.report(&BucketState::default(), now, 0);
        assert_eq!(fresh.calls_per_minute, Some(Left { limit: 60, remaining: 60 }));
        assert_eq!(fresh.tokens_per_day, Some(Left { limit: 86_400, remaining: 86_400 }));
        assert_eq!(fresh.jobs_in_flight, Some(Left { limit: 5, remaining: 5 }));
        // 20 calls and 1,000 tokens taken just now, 7 jobs over a lowered limit.
        let used = BucketState { requests_tat: now + 20 * S, tokens_tat: now + p.tokens.increment(1_000) };
        let r = q.report(&used, now, 7);
        assert_eq!(r.calls_per_minute, Some(Left { limit: 60, remaining: 40 }));
        assert_eq!(r.tokens_per_day, Some(Left { limit: 86_400, remaining: 85_400 }));
        assert_eq!(r.jobs_in_flight, Some(Left { limit: 5, remaining: 0 }));
        // Only the limits the tenant has are reported.
        let calls_only = quota(None, Some(60));
        assert!(calls_only.is_limited() && !TenantQuota::default().is_limited());
        let r = calls_only.report(&used, now, 7);
        assert_eq!((r.tokens_per_day, r.jobs_in_flight), (None, None));
        assert_eq!(
            serde_json::to_value(r).unwrap(),
            serde_json::json!({"calls_per_minute": {"limit": 60, "remaining": 40}})
        );
    }
}
