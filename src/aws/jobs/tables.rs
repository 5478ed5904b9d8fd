//! Creating the tables (`ratepool aws init`, the emulator, dev accounts).

use super::*;

/// Creates the jobs and ledger tables that do not exist (on-demand
/// capacity), waits until both are ACTIVE and turns TTL on for the jobs
/// table. Returns the names it created.
pub async fn ensure_tables(client: &Client, cfg: &AwsConfig) -> StorageResult<Vec<String>> {
    let mut created = Vec::new();
    for (table, with_sort_key) in [(&cfg.jobs_table, true), (&cfg.ledger_table, false)] {
        if describe_status(client, table).await?.is_none() && create_table(client, table, with_sort_key).await? {
            created.push(table.clone());
        }
    }
    for table in [&cfg.jobs_table, &cfg.ledger_table] {
        wait_active(client, table).await?;
    }
    enable_ttl(client, &cfg.jobs_table).await?;
    Ok(created)
}

/// The table's status, `None` if it does not exist.
pub(super) async fn describe_status(client: &Client, table: &str) -> StorageResult<Option<TableStatus>> {
    match client.describe_table().table_name(table).send().await {
        Ok(out) => Ok(Some(out.table.and_then(|t| t.table_status).unwrap_or(TableStatus::Creating))),
        Err(e) if matches!(e.as_service_error(), Some(DescribeTableError::ResourceNotFoundException(_))) => Ok(None),
        Err(e) => Err(sdk_err(&format!("describing table {table}"), e)),
    }
}

/// `false` if another process created it first.
pub(super) async fn create_table(client: &Client, table: &str, with_sort_key: bool) -> StorageResult<bool> {
    let build = |e| sdk_err("building the table definition", e);
    let mut req = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("PK")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(build)?,
        )
        .key_schema(KeySchemaElement::builder().attribute_name("PK").key_type(KeyType::Hash).build().map_err(build)?);
    if with_sort_key {
        req = req
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("SK")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(build)?,
            )
            .key_schema(
                KeySchemaElement::builder().attribute_name("SK").key_type(KeyType::Range).build().map_err(build)?,
            );
    }
    match req.send().await {
        Ok(_) => Ok(true),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_in_use_exception()) => Ok(false),
        Err(e) => Err(sdk_err(&format!("creating table {table}"), e)),
    }
}

pub(super) async fn wait_active(client: &Client, table: &str) -> StorageResult<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        match describe_status(client, table).await? {
            Some(TableStatus::Active) => return Ok(()),
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(StorageError::Backend(format!("table {table} did not become ACTIVE within 120 s")));
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

pub(super) async fn enable_ttl(client: &Client, table: &str) -> StorageResult<()> {
    let out = client
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .map_err(|e| sdk_err(&format!("reading the TTL setting of {table}"), e))?;
    let status = out.time_to_live_description.and_then(|d| d.time_to_live_status);
    if matches!(status, Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)) {
        return Ok(());
    }
    let spec = TimeToLiveSpecification::builder()
        .enabled(true)
        .attribute_name(TTL_ATTR)
        .build()
        .map_err(|e| sdk_err("building the TTL setting", e))?;
    client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(spec)
        .send()
        .await
        .map_err(|e| sdk_err(&format!("enabling TTL on {table}"), e))?;
    Ok(())
}

pub(super) fn missing_table(table: &str) -> StorageError {
    StorageError::Backend(format!(
        "DynamoDB table {table} does not exist: create it with `ratepool aws init` or the CDK app"
    ))
}
