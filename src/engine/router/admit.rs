//! Admission: waiting for and charging capacity, first on the tenant's own
//! quota, then on the org with the most headroom.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{CallError, CallRequest, Router, lock};
use crate::domain::{Micros, TenantId};
use crate::engine::quota::{QuotaKind, TenantQuota};
use crate::engine::retry::{WriteRetry, retry_write};
use crate::storage::gcra::{self, BucketParams, BucketState, Cost, Rate};
use crate::storage::{Acquisition, BucketKey, ChargeId, StorageError};

/// Sleeps `wait` microseconds for capacity that returns at `retry_at`,
/// unless that is past the call's deadline: then the call is told at once
/// (capacity returns in order; nothing frees it sooner).
async fn wait_for(
    wait: Micros,
    retry_at: Micros,
    now: Micros,
    deadline: Option<Micros>,
    cancel: &CancellationToken,
) -> Result<(), CallError> {
    if deadline.is_some_and(|d| now.saturating_add(wait) > d) {
        return Err(CallError::NoCapacity { retry_at });
    }
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_micros(wait as u64)) => Ok(()),
        _ = cancel.cancelled() => Err(CallError::Cancelled),
    }
}

/// Takes a FIFO admission turn, waiting no later than the deadline. A call
/// that cannot get its turn in time is told when the call ahead of it
/// expects capacity, as far as this process knows (`fallback_retry_at`).
async fn turn<'g>(
    gate: &'g tokio::sync::Mutex<()>,
    deadline: Option<(Micros, Micros)>,
    fallback_retry_at: impl FnOnce() -> Micros,
    cancel: &CancellationToken,
) -> Result<tokio::sync::MutexGuard<'g, ()>, CallError> {
    let within = async {
        match deadline {
            None => Some(gate.lock().await),
            Some((now, d)) => {
                tokio::time::timeout(Duration::from_micros((d - now).max(0) as u64), gate.lock()).await.ok()
            }
        }
    };
    tokio::select! {
        g = within => g.ok_or_else(|| CallError::NoCapacity { retry_at: fallback_retry_at() }),
        _ = cancel.cancelled() => Err(CallError::Cancelled),
    }
}

/// `params` with both limits scaled by `factor` (a slowed-down org): the
/// same burst window, a slower refill. Never scaled below what `cost`
/// needs, so a slowed org takes a call later, never refuses it for good.
pub fn scaled(params: &BucketParams, factor: f64, cost: Cost) -> BucketParams {
    if factor >= 1.0 {
        return *params;
    }
    let scale = |rate: Rate, n: u64| {
        // The smallest limit whose increment for `n` fits the tolerance.
        let needed = (u128::from(n) * rate.period_us.max(0) as u128).div_ceil(rate.tolerance_us.max(1) as u128);
        let cut = (rate.limit as f64 * factor.max(0.0)).ceil() as u64;
        Rate { limit: cut.max(needed.min(u128::from(u64::MAX)) as u64).min(rate.limit), ..rate }
    };
    BucketParams { requests: scale(params.requests, cost.requests), tokens: scale(params.tokens, cost.tokens) }
}

impl Router {
    /// Waits for and charges capacity on the best org; returns its index
    /// and whether the call is that org's half-open breaker probe. With a
    /// `deadline`, capacity that does not come before it is
    /// [`CallError::NoCapacity`] and the org is charged nothing.
    pub(super) async fn admit(
        &self,
        req: &CallRequest,
        deadline: Option<Micros>,
        cancel: &CancellationToken,
    ) -> Result<(usize, bool), CallError> {
        let model = &req.request.model;
        let (Some(candidates), Some(gate)) = (self.by_model.get(model), self.gates.get(model)) else {
            return Err(CallError::Unroutable(format!("no configured org serves model {model}")));
        };
        // Before any charge: a call no org can ever take costs nothing.
        self.check_size(req, candidates.iter().copied())?;
        // One mark for every bucket this admission charges, kept through its
        // retries and waits: a charge whose answer was lost is recognised
        // when the same bucket is asked again, not taken twice.
        let charge = ChargeId::new();
        self.charge_tenant(req, candidates, deadline, charge, cancel).await?;
        let mut held = None;
        let is_fallback = |i: usize| self.orgs[i].settings.fallback;
        let has_fallback = candidates.iter().any(|&i| is_fallback(i));
        let has_primary = candidates.iter().any(|&i| !is_fallback(i));
        let cheap = req.routing.cheap && has_fallback;
        let started = self.clock.now();
        let opens_at =
            started.saturating_add(i64::try_from(req.routing.fallback_after.as_micros()).unwrap_or(i64::MAX));
        let mut forced_open = false;
        loop {
            // The turn is held to decide and charge, never while sleeping:
            // one call waiting long (a large one, or a spent pool) must not
            // hold back every other call of the model.
            if held.is_none() {
                let within = deadline.map(|d| (self.clock.now(), d));
                held = Some(turn(gate, within, || self.earliest_capacity(req, candidates), cancel).await?);
            }
            let now = self.clock.now();
            // Cheap calls use the fallback orgs only; the rest the
            // primaries, and the fallbacks too once they waited long enough
            // (or no primary can ever take the call, or none serves it).
            let fallback_open = cheap || !has_primary || forced_open || now >= opens_at;
            let usable = |i: usize| if is_fallback(i) { fallback_open } else { !cheap };
            let considered = candidates.iter().filter(|&&i| usable(i)).count();
            // (headroom, index, cost, cached state) of every org that may take a call now.
            let mut ready = Vec::new();
            let mut wake_at: Option<Micros> = if fallback_open || !has_fallback { None } else { Some(opens_at) };
            // Whether some org is only out of quota (then the wait is for
            // capacity), or every one is unhealthy (breaker, rotation).
            let mut rate_limited = false;
            let mut never = 0usize;
            for &i in candidates.iter().filter(|&&i| usable(i)) {
                let org = &self.orgs[i];
                // One guard for the check and the reset: a guard taken in an
                // `if let` scrutinee lives through its body, so locking again
                // there would deadlock the first admission after the time out.
                let mut out = lock(&org.out);
                if let Some(o) = out.as_ref() {
                    if o.until > now {
                        wake_at = min_opt(wake_at, o.until);
                        continue;
                    }
                    *out = None;
                    self.telemetry.set_out_of_rotation(&org.settings.endpoint.name, false);
                }
                drop(out);
                if let Some(until) = lock(&org.breaker).blocked_until(now) {
                    wake_at = min_opt(wake_at, until);
                    continue;
                }
                let Some(params) = org.settings.models.get(model) else { continue };
                let cost = req.request.cost(org.settings.chars_per_token);
                let params = scaled(params, self.rate_factor(i, model, now), cost);
                let params = self.windowed(i, model, &params, cost);
                let cached = lock(&org.cache).get(model).copied().unwrap_or_default();
                match gcra::available_at(&cached, &params, cost, now) {
                    None => never += 1,
                    Some(at) if at > now => {
                        rate_limited = true;
                        wake_at = min_opt(wake_at, at);
                    }
                    Some(_) => ready.push((gcra::headroom(&cached, &params, now), i, cost, params)),
                }
            }
            if never == considered && has_fallback && !fallback_open {
                forced_open = true;
                continue;
            }
            if never == considered {
                self.check_size(req, candidates.iter().copied().filter(|&i| usable(i)))?;
            }
            ready.sort_by(|a, b| b.0.total_cmp(&a.0));
            for (_, i, cost, params) in ready {
                let org = &self.orgs[i];
                let key = BucketKey::new(&org.settings.endpoint.name, model);
                let (acquired, now) = self.acquire(&key, &params, cost, charge, cancel).await?;
                match acquired {
                    Acquisition::Granted(state) => {
                        self.telemetry.ledger_op("acquire");
                        self.remember(i, model, state, &params, now);
                        let probe = lock(&org.breaker).on_dispatch();
                        return Ok((i, probe));
                    }
                    Acquisition::Denied { retry_at, state } => {
                        self.telemetry.ledger_op("denied");
                        self.remember(i, model, state, &params, now);
                        rate_limited = true;
                        wake_at = min_opt(wake_at, retry_at);
                    }
                    Acquisition::Never => {}
                }
            }
            // Nothing free: sleep until the earliest capacity. Out-of-rotation
            // orgs are looked at again at least once a minute.
            let now = self.clock.now();
            let wait = wake_at.map_or(60_000_000, |t| (t - now).clamp(1_000, 60_000_000));
            let retry_at = wake_at.unwrap_or(now + wait);
            if !rate_limited && deadline.is_some_and(|d| now.saturating_add(wait) > d) {
                return Err(CallError::Unavailable {
                    retry_at,
                    reason: format!(
                        "every org serving {model} is unavailable (circuit breaker open or out of rotation)"
                    ),
                });
            }
            drop(held.take());
            wait_for(wait, retry_at, now, deadline, cancel).await?;
        }
    }

    /// `TooLarge` unless one of `orgs` could ever admit the call (with all
    /// its buckets full).
    /// One charge of the ledger, its transient failures retried while the
    /// call is wanted; returns the answer and the time it was dated at: as
    /// late as possible (each try), since the provider charges on arrival.
    async fn acquire(
        &self,
        key: &BucketKey,
        params: &BucketParams,
        cost: Cost,
        charge: ChargeId,
        cancel: &CancellationToken,
    ) -> Result<(Acquisition, Micros), StorageError> {
        let mut now = self.clock.now();
        let acquired = retry_write(
            "ledger acquire",
            WriteRetry::CALL,
            || !cancel.is_cancelled(),
            |_| {
                now = self.clock.now();
                self.ledger.acquire(key, params, cost, now, charge)
            },
        )
        .await?;
        Ok((acquired, now))
    }

    fn check_size(&self, req: &CallRequest, orgs: impl Iterator<Item = usize>) -> Result<(), CallError> {
        let model = &req.request.model;
        let (mut tokens, mut largest) = (0, 0);
        for i in orgs {
            let org = &self.orgs[i];
            let Some(params) = org.settings.models.get(model) else { continue };
            let cost = req.request.cost(org.settings.chars_per_token);
            if gcra::available_at(&BucketState::default(), params, cost, 0).is_some() {
                return Ok(());
            }
            tokens = tokens.max(cost.tokens);
            largest = largest.max(params.tokens.limit);
        }
        Err(CallError::TooLarge { tokens, largest, model: model.clone() })
    }

    /// When the earliest org serving the request's model has room for it,
    /// by this process's cached bucket states (a guess: other processes
    /// may have spent it); for a call that gives up waiting for its turn.
    fn earliest_capacity(&self, req: &CallRequest, candidates: &[usize]) -> Micros {
        let model = &req.request.model;
        let now = self.clock.now();
        candidates
            .iter()
            .filter_map(|&i| {
                let org = &self.orgs[i];
                let cost = req.request.cost(org.settings.chars_per_token);
                let params = self.windowed(i, model, org.settings.models.get(model)?, cost);
                let cached = lock(&org.cache).get(model).copied().unwrap_or_default();
                gcra::available_at(&cached, &params, cost, now)
            })
            .min()
            .unwrap_or(now)
            .max(now)
    }

    /// Waits for and charges one call attempt to the tenant's own quota
    /// (nothing to do for a tenant without a rate quota). The charge is the
    /// largest reservation any org serving the model would make, so the
    /// tenant's tokens are counted the same wherever the call goes.
    pub(super) async fn charge_tenant(
        &self,
        req: &CallRequest,
        candidates: &[usize],
        deadline: Option<Micros>,
        charge: ChargeId,
        cancel: &CancellationToken,
    ) -> Result<(), CallError> {
        let quota = self.quotas.get(&req.tenant);
        let (Some(params), Some(gate)) = (quota.bucket_params(), self.tenant_gates.get(&req.tenant)) else {
            return Ok(());
        };
        let call = candidates
            .iter()
            .map(|&i| req.request.cost(self.orgs[i].settings.chars_per_token))
            .max_by_key(|c| c.tokens)
            .unwrap_or(Cost { requests: 1, tokens: 0 });
        let cost = quota.charge(call);
        let key = BucketKey::tenant(&req.tenant);
        let within = deadline.map(|d| (self.clock.now(), d));
        let _turn = turn(gate, within, || self.clock.now() + 1_000_000, cancel).await?;
        let mut counted = false;
        loop {
            let (acquired, now) = self.acquire(&key, &params, cost, charge, cancel).await?;
            let retry_at = match acquired {
                Acquisition::Granted(_) => {
                    self.telemetry.ledger_op("acquire");
                    return Ok(());
                }
                Acquisition::Denied { retry_at, state } => {
                    self.telemetry.ledger_op("denied");
                    if !counted {
                        counted = true;
                        let kind = denied_by(&quota, &params, state, cost, now);
                        self.telemetry.tenant_quota_wait(&req.tenant, kind.as_str());
                        tracing::debug!(tenant = %req.tenant, quota = kind.as_str(), "call held by the tenant's quota");
                    }
                    retry_at
                }
                Acquisition::Never => {
                    return Err(CallError::Unroutable(format!(
                        "a call of this size ({} tokens) exceeds tenant {}'s whole tokens_per_day quota",
                        cost.tokens, req.tenant
                    )));
                }
            };
            if req.yield_to_tenant_quota {
                return Err(CallError::TenantQuotaSpent { retry_at });
            }
            let now = self.clock.now();
            let wait = (retry_at - now).clamp(1_000, 60_000_000);
            wait_for(wait, retry_at, now, deadline, cancel).await?;
        }
    }
}

impl Router {
    /// When `tenant`'s rate quota has room for a call again, if it has
    /// none now (`None`: it has room, or no rate quota). A read of the
    /// ledger, nothing charged: a worker asks before it takes a job.
    pub async fn tenant_quota_retry_at(&self, tenant: &TenantId) -> Result<Option<Micros>, StorageError> {
        let quota = self.quotas.get(tenant);
        if quota.bucket_params().is_none() {
            return Ok(None);
        }
        let state = self.ledger.state(&BucketKey::tenant(tenant)).await?;
        Ok(quota.spent(&state, self.clock.now()).map(|s| s.retry_at))
    }
}

/// Which of a tenant's two limits refused `cost` at `now`.
fn denied_by(quota: &TenantQuota, params: &BucketParams, state: BucketState, cost: Cost, now: Micros) -> QuotaKind {
    let calls_only = Cost { tokens: 0, ..cost };
    let calls_fit = matches!(gcra::decide(state, params, calls_only, now), gcra::Decision::Allow(_));
    if quota.calls_per_minute.is_some() && !calls_fit { QuotaKind::CallsPerMinute } else { QuotaKind::TokensPerDay }
}

fn min_opt(a: Option<Micros>, b: Micros) -> Option<Micros> {
    Some(a.map_or(b, |a| a.min(b)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::Clock;
    use crate::engine::router::settings::TRANSIT_ALLOWANCE_US;

    #[test]
    fn a_slowed_org_is_paced_at_the_factor_and_still_takes_every_call() {
        let p = BucketParams {
            requests: Rate::per_minute(600).with_slack(TRANSIT_ALLOWANCE_US),
            tokens: Rate::per_minute(60_000).with_slack(TRANSIT_ALLOWANCE_US),
        };
        let call = Cost { requests: 1, tokens: 50 };
        assert_eq!(scaled(&p, 1.0, call), p);
        let half = scaled(&p, 0.5, call);
        assert_eq!((half.requests.limit, half.tokens.limit), (300, 30_000));
        assert_eq!(half.requests.tolerance_us, p.requests.tolerance_us, "same burst window");
        // A call the full rate admits stays admissible at any factor.
        let big = Cost { requests: 1, tokens: 50_000 };
        let tiny = scaled(&p, 0.01, big);
        assert!(tiny.tokens.limit < p.tokens.limit);
        assert!(gcra::available_at(&BucketState::default(), &tiny, big, 0).is_some());

        // Saturating demand, one attempt every 10 ms of injected time, from
        // a bucket already at the steady state: a minute admits the factor's
        // share of the rate (± one call of rounding).
        let admitted = |factor: f64| {
            let clock = crate::domain::ManualClock::new(1_000_000_000);
            let start = clock.now();
            let mut st = BucketState { requests_tat: start + p.requests.tolerance(), tokens_tat: 0 };
            let mut n = 0u64;
            while clock.now() < start + gcra::MINUTE_US {
                if let gcra::Decision::Allow(next) = gcra::decide(st, &scaled(&p, factor, call), call, clock.now()) {
                    st = next;
                    n += 1;
                }
                clock.advance(Duration::from_millis(10));
            }
            n
        };
        assert!(admitted(1.0).abs_diff(600) <= 1, "{}", admitted(1.0));
        assert!(admitted(0.5).abs_diff(300) <= 1, "{}", admitted(0.5));
        assert!(admitted(0.1).abs_diff(60) <= 1, "{}", admitted(0.1));
    }
}
