//! The DynamoDB quota ledger: one item per (org, model), `PK = <org>#<model>`,
//! and one per tenant with a quota, `PK = #tenant#<tenant>`, holding both
//! buckets' TATs (µs), and one conditional UpdateItem per acquisition.
//!
//! DynamoDB has no `max()` and no arithmetic in conditions, so the GCRA step
//! `TAT' = max(TAT, now) + n·T if TAT' − now ≤ τ` is split into its two
//! branches and the client picks one per bucket from the state it last saw:
//!
//! - idle, `TAT ≤ now`: condition `TAT ≤ :now`, `SET TAT = :now + n·T`;
//! - busy, `TAT > now`: condition `:now < TAT ≤ :now + τ − n·T` (the bound
//!   computed here), `SET TAT = TAT + n·T` (arithmetic is allowed in SET).
//!
//! Both are exact GCRA on the stored value, whatever this process believed,
//! and busy-branch writers in different processes never invalidate each
//! other: each adds its increment as long as the bound holds. A refused
//! write returns the item as it was (ALL_OLD), so the next attempt starts
//! from the truth without a read.
//!
//! Stored TATs only grow (acquisitions add, `raise` never lowers), so the
//! last state seen is a lower bound of the stored one and GCRA is monotone in
//! it: when the cached state already denies, the stored one denies too, and
//! the denial is answered without a request.
//!
//! Each write also sets the charge's slot attribute (`ch<slot>`, see
//! [`ChargeId`]) on condition that it does not hold this charge already: an
//! acquisition retried after a lost answer (by the caller, or by the SDK
//! itself after a timeout) is refused, and the refused item, holding the
//! charge, answers `Granted`.
//!
//! Within one process, writes to one item go one at a time (an async lock
//! per key): each starts from the state the previous one returned, so
//! in-process acquirers never refuse each other's writes and a full bucket
//! is denied from memory. It caps one process at one write per round trip
//! per (org, model) (some 150–250 acquisitions/s at DynamoDB's usual few
//! milliseconds); it is also what keeps the single-process tests exact on
//! the moto emulator, whose writes to one item are not atomic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::operation::describe_table::DescribeTableError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};

use super::AwsConfig;
use super::{dynamo_err, sdk_err};
use crate::domain::{Clock, Micros};
use crate::storage::gcra::{self, Decision, Rate};
use crate::storage::{
    Acquisition, BucketKey, BucketParams, BucketState, ChargeId, Cost, QuotaLedger, StorageError, StorageResult,
};

type Item = HashMap<String, AttributeValue>;

/// Writes per acquisition before giving up. Two suffice unless the item
/// is deleted and recreated meanwhile: a refused write either shows a
/// denial or corrects the one branch guess that can be wrong (idle when
/// another process just made the bucket busy), and a busy bucket stays busy
/// at a fixed `now`.
const MAX_ATTEMPTS: u32 = 4;

/// How long an acquisition that lost [`MAX_ATTEMPTS`] races waits before
/// deciding again.
const CONTENTION_BACKOFF_MICROS: Micros = 20_000;

/// DynamoDB requests made by one ledger since it was built, by kind; for
/// tests and metrics (requests per provider call).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerRequestCounts {
    /// `acquire` calls, whether or not they sent a request.
    pub acquisitions: u64,
    /// Conditional UpdateItems sent by `acquire`.
    pub acquire_writes: u64,
    /// Those of `acquire_writes` whose condition failed.
    pub acquire_refused: u64,
    /// Conditional UpdateItems sent by `raise` (refused ones included).
    pub raise_writes: u64,
    /// GetItems sent by `state`.
    pub reads: u64,
}

impl LedgerRequestCounts {
    /// Every request sent.
    pub fn total(&self) -> u64 {
        self.acquire_writes + self.raise_writes + self.reads
    }
}

#[derive(Default)]
struct Counters {
    acquisitions: AtomicU64,
    acquire_writes: AtomicU64,
    acquire_refused: AtomicU64,
    raise_writes: AtomicU64,
    reads: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The GCRA ledger on one DynamoDB table.
pub struct DynamoLedger {
    client: Client,
    table: String,
    /// The last state seen per key (from every write's returned values): a
    /// lower bound of the stored state. Picks each bucket's branch and
    /// answers denials without a request.
    seen: Mutex<HashMap<BucketKey, BucketState>>,
    /// One writer per key at a time in this process (see the module doc).
    turns: Mutex<HashMap<BucketKey, Arc<tokio::sync::Mutex<()>>>>,
    counts: Counters,
    /// Re-read before every write: the charge must be dated as late as
    /// possible (see `acquire`).
    clock: Arc<dyn Clock>,
}

impl DynamoLedger {
    /// Checks that the table exists; creates nothing (see
    /// [`super::jobs::ensure_tables`]).
    pub async fn connect(client: Client, cfg: &AwsConfig, clock: Arc<dyn Clock>) -> StorageResult<Self> {
        let table = cfg.ledger_table.clone();
        match client.describe_table().table_name(&table).send().await {
            Ok(_) => {}
            Err(e) if matches!(e.as_service_error(), Some(DescribeTableError::ResourceNotFoundException(_))) => {
                return Err(StorageError::Backend(format!(
                    "DynamoDB table {table} does not exist: create it with `ratepool aws init` or the CDK app"
                )));
            }
            Err(e) => return Err(sdk_err(&format!("describing table {table}"), e)),
        }
        Ok(Self {
            client,
            table,
            seen: Mutex::new(HashMap::new()),
            turns: Mutex::new(HashMap::new()),
            counts: Counters::default(),
            clock,
        })
    }

    /// DynamoDB requests made so far, by kind.
    pub fn requests(&self) -> LedgerRequestCounts {
        let c = &self.counts;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LedgerRequestCounts {
            acquisitions: get(&c.acquisitions),
            acquire_writes: get(&c.acquire_writes),
            acquire_refused: get(&c.acquire_refused),
            raise_writes: get(&c.raise_writes),
            reads: get(&c.reads),
        }
    }

    fn seen(&self, key: &BucketKey) -> BucketState {
        self.lock().get(key).copied().unwrap_or_default()
    }

    /// Folds a state read from the table into the cache. `max` keeps the
    /// cache a lower bound whatever order concurrent answers arrive in.
    fn remember(&self, key: &BucketKey, state: BucketState) -> BucketState {
        let mut seen = self.lock();
        let slot = seen.entry(key.clone()).or_default();
        *slot = gcra::raise(*slot, state);
        *slot
    }

    /// The item is gone (table recreated): what was seen no longer bounds it.
    fn forget(&self, key: &BucketKey) {
        self.lock().remove(key);
    }

    /// Waits for this process's turn to write `key` (FIFO).
    async fn turn(&self, key: &BucketKey) -> tokio::sync::OwnedMutexGuard<()> {
        let turn = {
            let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
            turns.entry(key.clone()).or_default().clone()
        };
        turn.lock_owned().await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BucketKey, BucketState>> {
        // The map is only ever replaced whole-entry, so a poisoned lock
        // still holds consistent states.
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, key: &BucketKey) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        self.client.update_item().table_name(&self.table).key("PK", AttributeValue::S(pk(key)))
    }
}

fn pk(key: &BucketKey) -> String {
    // Org and model names never contain '#', and a tenant key's first part
    // starts with one (`#tenant#<tenant>`), so no two keys share an item.
    let (org, model) = key.parts();
    format!("{org}#{model}")
}

fn num(v: Micros) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// The TATs in an item; a missing bucket is at 0 (never charged).
fn state_of(item: &Item) -> StorageResult<BucketState> {
    let tat = |name: &str| match item.get(name) {
        None => Ok(0),
        Some(AttributeValue::N(v)) => {
            v.parse::<Micros>().map_err(|_| StorageError::Backend(format!("ledger item: {name} = {v} is not a TAT")))
        }
        Some(_) => Err(StorageError::Backend(format!("ledger item: {name} is not a number"))),
    };
    Ok(BucketState { requests_tat: tat("requests_tat")?, tokens_tat: tat("tokens_tat")? })
}

/// One bucket's part of an acquisition: its condition and its SET clause.
#[derive(Debug, PartialEq)]
struct Branch {
    condition: String,
    set: String,
    values: Vec<(String, AttributeValue)>,
}

/// The write for one bucket (`attr` is `requests_tat` or `tokens_tat`,
/// `p` a short prefix for its placeholders), branch chosen by the TAT seen.
fn branch(attr: &str, p: &str, seen_tat: Micros, rate: &Rate, n: u64, now: Micros) -> Branch {
    let inc = rate.increment(n);
    if seen_tat <= now {
        Branch {
            condition: format!("(attribute_not_exists({attr}) OR {attr} <= :now)"),
            set: format!("{attr} = :{p}_new"),
            values: vec![(format!(":{p}_new"), num(now + inc))],
        }
    } else {
        // `TAT > :now` cannot fail while TATs only grow; it keeps a stale
        // cache from charging less than `now + inc` if the item was reset.
        Branch {
            condition: format!("({attr} > :now AND {attr} <= :{p}_max)"),
            set: format!("{attr} = {attr} + :{p}_inc"),
            values: vec![(format!(":{p}_max"), num(now + rate.tolerance() - inc)), (format!(":{p}_inc"), num(inc))],
        }
    }
}

#[async_trait]
impl QuotaLedger for DynamoLedger {
    /// `Granted` carries the stored state after the write. `Denied` carries
    /// the state the decision was made on: the stored one when a write was
    /// refused, else the last one seen, which may lag the stored one; its
    /// `retry_at` is then a lower bound, and a retry at that time decides
    /// again on fresh state.
    async fn acquire(
        &self,
        key: &BucketKey,
        params: &BucketParams,
        cost: Cost,
        now: Micros,
        charge: ChargeId,
    ) -> StorageResult<Acquisition> {
        bump(&self.counts.acquisitions);
        let slot = format!("ch{}", charge.slot());
        let mark = AttributeValue::N(charge.raw().to_string());
        let _turn = self.turn(key).await;
        // The provider charges when the call arrives, after this write
        // returns; waiting for our turn takes time, and a charge dated at
        // the caller's older `now` would leave the provider's bucket ahead
        // of ours when it was idle. `now` then stays fixed across attempts:
        // re-read per attempt, a slow round trip can carry it past the TAT
        // another process just wrote, so the next guess is "idle" again and
        // loses again to the next writer (seen on a loaded emulator).
        let now = now.max(self.clock.now());
        for _ in 0..MAX_ATTEMPTS {
            let seen = self.seen(key);
            match gcra::decide(seen, params, cost, now) {
                Decision::Never => return Ok(Acquisition::Never),
                Decision::Deny { retry_at } => return Ok(Acquisition::Denied { retry_at, state: seen }),
                Decision::Allow(_) => {}
            }
            let r = branch("requests_tat", "r", seen.requests_tat, &params.requests, cost.requests, now);
            let t = branch("tokens_tat", "t", seen.tokens_tat, &params.tokens, cost.tokens, now);
            let mut values: Item = r.values.into_iter().chain(t.values).collect();
            values.insert(":now".into(), num(now));
            values.insert(":charge".into(), mark.clone());
            bump(&self.counts.acquire_writes);
            let res = self
                .update(key)
                .update_expression(format!("SET {}, {}, {slot} = :charge", r.set, t.set))
                .condition_expression(format!(
                    "{} AND {} AND (attribute_not_exists({slot}) OR {slot} <> :charge)",
                    r.condition, t.condition
                ))
                .set_expression_attribute_values(Some(values))
                .return_values(ReturnValue::UpdatedNew)
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                .send()
                .await;
            match res {
                Ok(out) => {
                    let after = state_of(&out.attributes.unwrap_or_default())?;
                    self.remember(key, after);
                    return Ok(Acquisition::Granted(after));
                }
                Err(e) => match e.as_service_error() {
                    Some(UpdateItemError::ConditionalCheckFailedException(c)) => {
                        bump(&self.counts.acquire_refused);
                        match c.item().filter(|i| !i.is_empty()) {
                            Some(old) => {
                                let stored = state_of(old)?;
                                self.remember(key, stored);
                                if old.get(&slot) == Some(&mark) {
                                    // This charge, granted before: its answer was lost.
                                    return Ok(Acquisition::Granted(stored));
                                }
                            }
                            None => self.forget(key),
                        }
                    }
                    _ => return Err(dynamo_err("acquiring ledger capacity", e)),
                },
            }
        }
        // Only a bucket deleted and recreated meanwhile gets here. It is
        // contention, not a failure: the caller waits a moment and decides
        // again on what the refused writes showed.
        tracing::warn!(key = %pk(key), "ledger item changed under {MAX_ATTEMPTS} consecutive writes; backing off");
        let retry_at = self.clock.now() + CONTENTION_BACKOFF_MICROS;
        Ok(Acquisition::Denied { retry_at, state: self.seen(key) })
    }

    /// Only the buckets the last state seen does not already cover are
    /// written, each with `SET tat = :floor` on condition `tat < :floor`;
    /// one condition guards the whole update, so a bucket found already
    /// high enough is dropped and the rest written again (at most one write
    /// per bucket more). When nothing needs raising no request is sent and
    /// the last state seen (a lower bound of the stored one) is returned.
    async fn raise(&self, key: &BucketKey, floor: BucketState) -> StorageResult<BucketState> {
        let _turn = self.turn(key).await;
        for _ in 0..MAX_ATTEMPTS {
            let seen = self.seen(key);
            let mut sets = Vec::new();
            let mut conditions = Vec::new();
            let mut values = Item::new();
            for (attr, p, have, want) in [
                ("requests_tat", "r", seen.requests_tat, floor.requests_tat),
                ("tokens_tat", "t", seen.tokens_tat, floor.tokens_tat),
            ] {
                if want > have {
                    sets.push(format!("{attr} = :{p}_floor"));
                    conditions.push(format!("(attribute_not_exists({attr}) OR {attr} < :{p}_floor)"));
                    values.insert(format!(":{p}_floor"), num(want));
                }
            }
            if sets.is_empty() {
                return Ok(seen);
            }
            bump(&self.counts.raise_writes);
            let res = self
                .update(key)
                .update_expression(format!("SET {}", sets.join(", ")))
                .condition_expression(conditions.join(" AND "))
                .set_expression_attribute_values(Some(values))
                .return_values(ReturnValue::AllNew)
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                .send()
                .await;
            match res {
                Ok(out) => {
                    let after = state_of(&out.attributes.unwrap_or_default())?;
                    self.remember(key, after);
                    return Ok(after);
                }
                Err(e) => match e.as_service_error() {
                    // A missing item passes every condition, so the old
                    // item is always there.
                    Some(UpdateItemError::ConditionalCheckFailedException(c)) => {
                        if let Some(old) = c.item() {
                            self.remember(key, state_of(old)?);
                        }
                    }
                    _ => return Err(dynamo_err("raising the ledger", e)),
                },
            }
        }
        Err(StorageError::Backend(format!("ledger item {} changed under {MAX_ATTEMPTS} consecutive raises", pk(key))))
    }

    /// A strongly consistent read.
    async fn state(&self, key: &BucketKey) -> StorageResult<BucketState> {
        bump(&self.counts.reads);
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", AttributeValue::S(pk(key)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_err("reading the ledger", e))?;
        let state = match out.item {
            Some(item) => state_of(&item)?,
            None => BucketState::default(),
        };
        self.remember(key, state);
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Micros = 1_000_000;

    #[test]
    fn an_idle_bucket_is_set_from_now_and_a_busy_one_is_added_to_under_a_bound() {
        let rate = Rate::per_minute(5); // 12 s per request
        let idle = branch("requests_tat", "r", 90 * S, &rate, 1, 100 * S);
        assert_eq!(idle.condition, "(attribute_not_exists(requests_tat) OR requests_tat <= :now)");
        assert_eq!(idle.set, "requests_tat = :r_new");
        assert_eq!(idle.values, vec![(":r_new".to_owned(), num(112 * S))]);

        let busy = branch("requests_tat", "r", 130 * S, &rate, 1, 100 * S);
        assert_eq!(busy.condition, "(requests_tat > :now AND requests_tat <= :r_max)");
        assert_eq!(busy.set, "requests_tat = requests_tat + :r_inc");
        // Admissible iff TAT + 12 s − now ≤ 60 s, i.e. TAT ≤ now + 48 s.
        assert_eq!(busy.values, vec![(":r_max".to_owned(), num(148 * S)), (":r_inc".to_owned(), num(12 * S))]);
    }

    #[test]
    fn the_busy_bound_admits_exactly_what_gcra_admits() {
        let rate = Rate::per_minute(7);
        let p = BucketParams { requests: rate, tokens: Rate::per_minute(1_000_000) };
        let now = 1_000 * S;
        for tat in (now + 1..now + 70 * S).step_by(997_003) {
            let b = branch("requests_tat", "r", tat, &rate, 1, now);
            let max: Micros = match &b.values[0].1 {
                AttributeValue::N(v) => v.parse().unwrap_or_default(),
                _ => unreachable!(),
            };
            let st = BucketState { requests_tat: tat, tokens_tat: 0 };
            let gcra_allows = matches!(gcra::decide(st, &p, Cost { requests: 1, tokens: 0 }, now), Decision::Allow(_));
            assert_eq!(tat <= max, gcra_allows, "tat = now + {} µs", tat - now);
        }
    }
}
