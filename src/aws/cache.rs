//! The DynamoDB response cache. Entries live in the jobs table under their
//! own partition-key prefix (`cache#<key hex>`, sort key `cache`; see the
//! table in [`super::jobs`]): that table already has DynamoDB TTL on
//! `expires_at`, the IAM grants and the backups, so the cache needs no table,
//! permission or CDK change of its own, and a key of 64 hex digits spreads
//! evenly over partitions.
//!
//! TTL works in whole seconds and deletes late (days on AWS, never on the
//! emulator), so `expires_at` (seconds, rounded up) is only for the reaper;
//! reads compare `now` with `expires_us`, the exact expiry in microseconds.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;

use super::jobs::{TTL_ATTR, micros, num, s, secs_ceil};
use super::sdk_err;
use crate::domain::Micros;
use crate::storage::{CacheKey, CachedResponse, ResponseCache, StorageError, StorageResult};

const CACHE_PREFIX: &str = "cache#";
const CACHE_SK: &str = "cache";
const VALUE_ATTR: &str = "value";
const EXPIRES_US_ATTR: &str = "expires_us";
/// DynamoDB's item size limit: attribute names and values, UTF-8 bytes.
const MAX_ITEM_BYTES: usize = 400 * 1024;
/// The most a number attribute takes in an item.
const MAX_NUMBER_BYTES: usize = 21;

/// Cache entries in the jobs table.
pub struct DynamoCache {
    client: Client,
    table: String,
}

impl DynamoCache {
    /// `table` is the jobs table, which [`super::connect`] has already
    /// checked exists.
    pub fn new(client: Client, table: &str) -> Self {
        Self { client, table: table.to_owned() }
    }
}

fn pk(key: &CacheKey) -> String {
    format!("{CACHE_PREFIX}{key}")
}

/// An upper bound of the item's size as DynamoDB counts it.
fn item_size(pk: &str, value: &str) -> usize {
    "PK".len()
        + pk.len()
        + "SK".len()
        + CACHE_SK.len()
        + VALUE_ATTR.len()
        + value.len()
        + TTL_ATTR.len()
        + EXPIRES_US_ATTR.len()
        + 2 * MAX_NUMBER_BYTES
}

#[async_trait]
impl ResponseCache for DynamoCache {
    async fn get(&self, key: &CacheKey, now: Micros) -> StorageResult<Option<CachedResponse>> {
        // Eventually consistent: half the read cost, and a stale read is at
        // worst a miss or the previous entry for the same request.
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", s(&pk(key)))
            .key("SK", s(CACHE_SK))
            .send()
            .await
            .map_err(|e| sdk_err("reading a response cache entry", e))?;
        let Some(item) = out.item else { return Ok(None) };
        let expires_us =
            item.get(EXPIRES_US_ATTR).and_then(|v| v.as_n().ok()).and_then(|n| n.parse::<Micros>().ok()).ok_or_else(
                || StorageError::Backend(format!("response cache entry without a valid {EXPIRES_US_ATTR}")),
            )?;
        if expires_us <= now {
            return Ok(None);
        }
        let value = item
            .get(VALUE_ATTR)
            .and_then(|v| v.as_s().ok())
            .ok_or_else(|| StorageError::Backend(format!("response cache entry without a {VALUE_ATTR}")))?;
        serde_json::from_str(value)
            .map(Some)
            .map_err(|e| StorageError::Backend(format!("unreadable response cache entry: {e}")))
    }

    async fn put(&self, key: &CacheKey, value: &CachedResponse, ttl: Duration, now: Micros) -> StorageResult<()> {
        let pk = pk(key);
        let json = serde_json::to_string(value)
            .map_err(|e| StorageError::Backend(format!("serializing a response cache entry: {e}")))?;
        let size = item_size(&pk, &json);
        if size > MAX_ITEM_BYTES {
            return Err(StorageError::TooLarge(format!(
                "response cache entry of {size} bytes exceeds DynamoDB's {MAX_ITEM_BYTES}"
            )));
        }
        let expires_us = now.saturating_add(micros(ttl));
        // An unconditional put: last write wins.
        let res = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(&pk))
            .item("SK", s(CACHE_SK))
            .item(VALUE_ATTR, s(&json))
            .item(EXPIRES_US_ATTR, num(expires_us))
            .item(TTL_ATTR, num(secs_ceil(expires_us)))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            // Should the estimate above ever fall short.
            Err(e)
                if e.as_service_error().is_some_and(|se| {
                    se.code() == Some("ValidationException") && se.message().is_some_and(|m| m.contains("size"))
                }) =>
            {
                Err(StorageError::TooLarge(format!("response cache entry of about {size} bytes refused by DynamoDB")))
            }
            Err(e) => Err(sdk_err("writing a response cache entry", e)),
        }
    }
}
