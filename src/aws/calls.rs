//! Durable calls (`crate::storage::calls`) in DynamoDB: items in the jobs
//! table, like the response cache (its TTL, grants and backups serve them
//! too; see the table in [`super::jobs`]).
//!
//! | PK | SK | what |
//! | --- | --- | --- |
//! | `call#<tenant>#<key>` | `call` | the record: request hash, claim (owner, `claim_until`) or answer |
//! | `call#<tenant>#<key>` | `part#<token>#<index>` | one slice of a large answer's body |
//!
//! Every state change is one conditional write on the record, so two
//! requests never both hold a key. An item holds at most 400 KB, so an
//! answer larger than [`INLINE_BYTES`] is written as parts first, under a
//! token fresh for that answer, and the record's conditional update that
//! stores the answer names the token and the count: that update is the
//! commit, and parts no record names (a holder that lost its claim, a
//! crash between the writes) are only garbage that TTL removes.
//!
//! `expires_us` is the exact expiry (the claim's lapse while in flight,
//! the answer's expiry once done) and every read compares with it;
//! `expires_at` (whole seconds, rounded up) is for DynamoDB's TTL reaper,
//! which deletes late.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValuesOnConditionCheckFailure};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::jobs::{TTL_ATTR, num, query_prefix, s, secs_ceil};
use super::sdk_err;
use crate::domain::{Micros, OrgName, TenantId};
use crate::storage::{
    AnswerKind, CallClaim, CallStore, ClaimOutcome, RequestHash, StorageError, StorageResult, StoredCall,
};

type Item = HashMap<String, AttributeValue>;

const RECORD_SK: &str = "call";
const PART_PREFIX: &str = "part#";
const IN_FLIGHT: &str = "in_flight";
const DONE: &str = "done";
/// Bodies up to this size are stored in the record itself; the rest of the
/// record (hash, key, org, numbers) stays far below the 400 KB item limit.
pub const INLINE_BYTES: usize = 300_000;
/// The size of one part of a larger body.
const PART_BYTES: usize = 350_000;
/// Parts written at once.
const PART_WRITERS: usize = 4;

/// Durable calls in the jobs table.
pub struct DynamoCalls {
    client: Client,
    table: String,
}

impl DynamoCalls {
    /// `table` is the jobs table, which [`super::connect`] has checked.
    pub fn new(client: Client, table: &str) -> Self {
        Self { client, table: table.to_owned() }
    }

    /// The parts of an answer, in order, read with strong consistency.
    async fn read_parts(&self, pk: &str, token: &str, count: usize) -> StorageResult<Vec<u8>> {
        let prefix = format!("{PART_PREFIX}{token}#");
        let mut body = Vec::new();
        let mut found = 0usize;
        let mut items = query_prefix(&self.client, &self.table, pk, &prefix).into_paginator().items().send();
        while let Some(item) = items.next().await {
            let item = item.map_err(|e| sdk_err("reading a durable call's answer", e))?;
            let data = item.get("data").and_then(|v| v.as_b().ok()).ok_or_else(|| corrupt("part without data"))?;
            body.extend_from_slice(data.as_ref());
            found += 1;
        }
        if found != count {
            return Err(corrupt(&format!("answer has {found} of its {count} parts")));
        }
        Ok(body)
    }

    /// The outcome a refused claim found in the record as it was.
    async fn found(&self, pk: &str, claim: &CallClaim, old: &Item, now: Micros) -> StorageResult<Option<ClaimOutcome>> {
        if old.is_empty() || n::<Micros>(old, "expires_us")? <= now {
            return Ok(None);
        }
        if RequestHash::from_stored(str_attr(old, "request_hash")?.to_owned()) != claim.request {
            return Err(StorageError::IdempotencyMismatch { key: claim.key.to_string() });
        }
        match str_attr(old, "state")? {
            IN_FLIGHT => Ok(Some(ClaimOutcome::InFlight { until: n(old, "claim_until")? })),
            DONE => {
                let body = match old.get("body").and_then(|v| v.as_b().ok()) {
                    Some(b) => Bytes::copy_from_slice(b.as_ref()),
                    None => {
                        let token = str_attr(old, "part_token")?;
                        Bytes::from(self.read_parts(pk, token, n(old, "parts")?).await?)
                    }
                };
                let org = match old.get("org").and_then(|v| v.as_s().ok()) {
                    Some(o) => Some(OrgName::parse(o.as_str()).map_err(|e| corrupt(&e.0))?),
                    None => None,
                };
                Ok(Some(ClaimOutcome::Done(StoredCall {
                    status: n(old, "status")?,
                    kind: AnswerKind::parse(str_attr(old, "kind")?).ok_or_else(|| corrupt("unknown kind"))?,
                    org,
                    body,
                    created_at: n(old, "created_at")?,
                })))
            }
            other => Err(corrupt(&format!("unknown state {other:?}"))),
        }
    }

    async fn put_part(&self, pk: &str, sk: String, data: &[u8], ttl: i64) -> StorageResult<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(pk))
            .item("SK", s(&sk))
            .item("data", AttributeValue::B(Blob::new(data)))
            .item(TTL_ATTR, num(ttl))
            .send()
            .await
            .map_err(|e| sdk_err("writing a part of a durable call's answer", e))?;
        Ok(())
    }
}

fn pk(tenant: &TenantId, key: &str) -> String {
    format!("call#{tenant}#{key}")
}

fn corrupt(detail: &str) -> StorageError {
    StorageError::Backend(format!("stored durable call is malformed: {detail}"))
}

fn str_attr<'a>(item: &'a Item, name: &str) -> StorageResult<&'a str> {
    item.get(name).and_then(|v| v.as_s().ok()).map(String::as_str).ok_or_else(|| corrupt(&format!("no {name}")))
}

fn n<T: std::str::FromStr>(item: &Item, name: &str) -> StorageResult<T> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| corrupt(&format!("no valid {name}")))
}

/// A refused conditional write on the record is `LeaseLost`.
fn lost_or<R: std::fmt::Debug + Send + Sync + 'static>(e: SdkError<UpdateItemError, R>, what: &str) -> StorageError {
    if matches!(e.as_service_error(), Some(UpdateItemError::ConditionalCheckFailedException(_))) {
        StorageError::LeaseLost
    } else {
        sdk_err(what, e)
    }
}

/// The condition every write by a claim's holder carries.
const HELD: &str = "#state = :in_flight AND #owner = :owner";

#[async_trait]
impl CallStore for DynamoCalls {
    async fn claim(&self, claim: &CallClaim, now: Micros) -> StorageResult<ClaimOutcome> {
        let pk = pk(&claim.tenant, claim.key.as_str());
        // A second round only if the record vanished between the refused
        // write and reading it (TTL, a release).
        for _ in 0..2 {
            let res = self
                .client
                .put_item()
                .table_name(&self.table)
                .item("PK", s(&pk))
                .item("SK", s(RECORD_SK))
                .item("request_hash", s(claim.request.as_str()))
                .item("state", s(IN_FLIGHT))
                .item("owner", s(&claim.owner))
                .item("claim_until", num(claim.until))
                .item("expires_us", num(claim.until))
                .item(TTL_ATTR, num(secs_ceil(claim.until)))
                .condition_expression("attribute_not_exists(PK) OR #expires_us <= :now")
                .expression_attribute_names("#expires_us", "expires_us")
                .expression_attribute_values(":now", num(now))
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                .send()
                .await;
            let old = match res {
                Ok(_) => return Ok(ClaimOutcome::Start),
                Err(e) => match e.into_service_error() {
                    PutItemError::ConditionalCheckFailedException(c) => c.item().cloned().unwrap_or_default(),
                    other => return Err(sdk_err("claiming a durable call", other)),
                },
            };
            if let Some(outcome) = self.found(&pk, claim, &old, now).await? {
                return Ok(outcome);
            }
        }
        Err(StorageError::Backend(format!("durable call key {:?} changed while it was claimed", claim.key.as_str())))
    }

    async fn renew(&self, claim: &CallClaim) -> StorageResult<()> {
        let update = "SET #claim_until = :until, #expires_us = :until, #ttl = :ttl";
        self.client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(&pk(&claim.tenant, claim.key.as_str())))
            .key("SK", s(RECORD_SK))
            .update_expression(update)
            .condition_expression(HELD)
            .expression_attribute_names("#claim_until", "claim_until")
            .expression_attribute_names("#expires_us", "expires_us")
            .expression_attribute_names("#ttl", TTL_ATTR)
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":until", num(claim.until))
            .expression_attribute_values(":ttl", num(secs_ceil(claim.until)))
            .expression_attribute_values(":in_flight", s(IN_FLIGHT))
            .expression_attribute_values(":owner", s(&claim.owner))
            .send()
            .await
            .map_err(|e| lost_or(e, "renewing a durable call's claim"))?;
        Ok(())
    }

    async fn complete(&self, claim: &CallClaim, answer: &StoredCall, expires_at: Micros) -> StorageResult<()> {
        let pk = pk(&claim.tenant, claim.key.as_str());
        let ttl = secs_ceil(expires_at);
        let mut update = String::from(
            "SET #state = :done, #status = :status, #kind = :kind, #created_at = :created_at, \
             #expires_us = :expires_us, #ttl = :ttl",
        );
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(&pk))
            .key("SK", s(RECORD_SK))
            .condition_expression(HELD)
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#claim_until", "claim_until")
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#kind", "kind")
            .expression_attribute_names("#created_at", "created_at")
            .expression_attribute_names("#expires_us", "expires_us")
            .expression_attribute_names("#ttl", TTL_ATTR)
            .expression_attribute_values(":in_flight", s(IN_FLIGHT))
            .expression_attribute_values(":owner", s(&claim.owner))
            .expression_attribute_values(":done", s(DONE))
            .expression_attribute_values(":status", num(answer.status))
            .expression_attribute_values(":kind", s(answer.kind.as_str()))
            .expression_attribute_values(":created_at", num(answer.created_at))
            .expression_attribute_values(":expires_us", num(expires_at))
            .expression_attribute_values(":ttl", num(ttl));
        if let Some(org) = &answer.org {
            update.push_str(", #org = :org");
            req = req.expression_attribute_names("#org", "org").expression_attribute_values(":org", s(org.as_str()));
        }
        if answer.body.len() <= INLINE_BYTES {
            update.push_str(", #body = :body");
            req = req
                .expression_attribute_names("#body", "body")
                .expression_attribute_values(":body", AttributeValue::B(Blob::new(answer.body.as_ref())));
        } else {
            // The parts first, under a token no other answer uses; the
            // record's update below is what makes them the answer.
            let token = uuid::Uuid::new_v4().simple().to_string();
            let body = &answer.body;
            let parts: Vec<(String, Bytes)> = (0..body.len())
                .step_by(PART_BYTES)
                .enumerate()
                .map(|(i, at)| {
                    (format!("{PART_PREFIX}{token}#{i:06}"), body.slice(at..(at + PART_BYTES).min(body.len())))
                })
                .collect();
            let count = parts.len();
            let writes = parts.into_iter().map(|(sk, data)| {
                let pk = pk.clone();
                async move { self.put_part(&pk, sk, &data, ttl).await }
            });
            futures::stream::iter(writes).buffer_unordered(PART_WRITERS).try_collect::<Vec<()>>().await?;
            update.push_str(", #parts = :parts, #part_token = :token");
            req = req
                .expression_attribute_names("#parts", "parts")
                .expression_attribute_names("#part_token", "part_token")
                .expression_attribute_values(":parts", num(count))
                .expression_attribute_values(":token", s(&token));
        }
        update.push_str(" REMOVE #owner, #claim_until");
        req.update_expression(update).send().await.map_err(|e| lost_or(e, "storing a durable call's answer"))?;
        Ok(())
    }

    async fn release(&self, claim: &CallClaim) -> StorageResult<()> {
        let res = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("PK", s(&pk(&claim.tenant, claim.key.as_str())))
            .key("SK", s(RECORD_SK))
            .condition_expression(HELD)
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":in_flight", s(IN_FLIGHT))
            .expression_attribute_values(":owner", s(&claim.owner))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            // Not ours any more: nothing to give up.
            Err(e) if e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => Ok(()),
            Err(e) => Err(sdk_err("releasing a durable call's claim", e)),
        }
    }
}
