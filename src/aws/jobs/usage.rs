//! Per-tenant usage counters: one item per (tenant, org).

use super::*;
use crate::storage::USAGE_BATCH_MEMORY;

#[async_trait]
impl UsageStore for DynamoJobs {
    /// One transaction of ADDs per 99 (tenant, org) pairs (deltas for the
    /// same pair merged first, in the batch's order, so a retry of the batch
    /// makes the same chunks), each with a marker item for (batch id, chunk)
    /// put on the condition that it does not exist: a chunk that landed
    /// before (its answer lost, or a later chunk failed) is refused whole
    /// and adds nothing. Markers expire after [`USAGE_BATCH_MEMORY`].
    async fn add(&self, batch: &UsageBatch) -> StorageResult<()> {
        let mut merged: Vec<((TenantId, OrgName), OrgCounters)> = Vec::new();
        for (tenant, org, c) in &batch.deltas {
            match merged.iter_mut().find(|((t, o), _)| t == tenant && o == org) {
                Some((_, total)) => total.merge(c),
                None => merged.push(((tenant.clone(), org.clone()), c.clone())),
            }
        }
        let forget_at = secs(self.clock.now()).saturating_add(USAGE_BATCH_MEMORY.as_secs() as i64);
        let update = "ADD #calls :calls, #prompt_tokens :pt, #completion_tokens :ct, #rate_limited :rl, \
                      #insufficient_quota :iq, #server_errors :se, #timeouts :to, #connection_errors :ce, \
                      #request_errors :re";
        for (n, chunk) in merged.chunks(TX_MAX_ITEMS - 1).enumerate() {
            let mut items = Vec::with_capacity(chunk.len() + 1);
            for ((tenant, org), c) in chunk {
                let add = Update::builder()
                    .table_name(&self.table)
                    .key("PK", s(&usage_pk(tenant)))
                    .key("SK", s(&format!("{USAGE_ORG_PREFIX}{org}")))
                    .update_expression(update)
                    .set_expression_attribute_names(Some(names(&[update])))
                    .set_expression_attribute_values(Some(values([
                        (":calls", num(c.calls)),
                        (":pt", num(c.prompt_tokens)),
                        (":ct", num(c.completion_tokens)),
                        (":rl", num(c.rate_limited)),
                        (":iq", num(c.insufficient_quota)),
                        (":se", num(c.server_errors)),
                        (":to", num(c.timeouts)),
                        (":ce", num(c.connection_errors)),
                        (":re", num(c.request_errors)),
                    ])))
                    .build()
                    .map_err(|e| sdk_err("building a usage update", e))?;
                items.push(TransactWriteItem::builder().update(add).build());
            }
            let marker = Put::builder()
                .table_name(&self.table)
                .item("PK", s(&format!("{USAGE_BATCH_PREFIX}{}", batch.id)))
                .item("SK", s(&format!("chunk#{n}")))
                .item(TTL_ATTR, num(forget_at))
                .condition_expression("attribute_not_exists(PK)")
                .build()
                .map_err(|e| sdk_err("building a usage batch marker", e))?;
            let marker_at = items.len();
            items.push(TransactWriteItem::builder().put(marker).build());
            match self.transact(items, "adding usage").await {
                Ok(()) => {}
                Err(TxError::Other(e)) => return Err(e),
                // This chunk of the batch was added before.
                Err(TxError::Cancelled(r)) if failed(&r, marker_at) => {}
                Err(TxError::Cancelled(r)) => {
                    return Err(StorageError::Backend(format!("usage update cancelled: {:?}", codes(&r))));
                }
            }
        }
        Ok(())
    }

    /// Ordered by org name.
    async fn usage(&self, tenant: &TenantId) -> StorageResult<Vec<(OrgName, OrgCounters)>> {
        let mut out = Vec::new();
        let mut items = query_prefix(&self.client, &self.table, &usage_pk(tenant), USAGE_ORG_PREFIX)
            .into_paginator()
            .items()
            .send();
        while let Some(item) = items.next().await {
            let item = item.map_err(|e| sdk_err("reading usage", e))?;
            out.push(usage_from_item(&item)?);
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}
