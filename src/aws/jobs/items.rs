//! Items: attribute values, expression names, keys, and the codecs of the
//! records the table holds.

use super::*;

pub(in crate::aws) fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

/// A strongly consistent query of the items of partition `pk` whose sort
/// key starts with `prefix`; callers page through it with the SDK's
/// paginator.
pub(in crate::aws) fn query_prefix(
    client: &Client,
    table: &str,
    pk: &str,
    prefix: &str,
) -> aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder {
    client
        .query()
        .table_name(table)
        .key_condition_expression("PK = :pk AND begins_with(SK, :prefix)")
        .expression_attribute_values(":pk", s(pk))
        .expression_attribute_values(":prefix", s(prefix))
        .consistent_read(true)
}

pub(in crate::aws) fn num(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub(super) fn values<const N: usize>(pairs: [(&str, AttributeValue); N]) -> HashMap<String, AttributeValue> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// `#name` → `name` for every placeholder in the expressions. Every
/// attribute goes through one, so no name can hit DynamoDB's long list of
/// reserved words (`status`, `name`, `error`…).
pub(super) fn names(exprs: &[&str]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for expr in exprs {
        let mut rest = *expr;
        while let Some(at) = rest.find('#') {
            let tail = &rest[at + 1..];
            let len = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            let name = &tail[..len];
            let attr = if name == "ttl" { TTL_ATTR } else { name };
            out.insert(format!("#{name}"), attr.to_owned());
            rest = &tail[len..];
        }
    }
    out
}

pub(super) fn secs(t: Micros) -> i64 {
    t.div_euclid(1_000_000)
}

/// Whole seconds at or after `t`: a TTL written with it never lets the
/// reaper delete an item that is still live.
pub(in crate::aws) fn secs_ceil(t: Micros) -> i64 {
    t.div_euclid(1_000_000) + i64::from(t.rem_euclid(1_000_000) != 0)
}

pub(in crate::aws) fn micros(d: Duration) -> Micros {
    Micros::try_from(d.as_micros()).unwrap_or(Micros::MAX)
}

/// Whether an item's TTL has passed at `now_s` (DynamoDB deletes such items
/// only eventually).
pub(super) fn expired(item: &Item, now_s: i64) -> bool {
    item.get(TTL_ATTR).and_then(|v| v.as_n().ok()).and_then(|n| n.parse::<i64>().ok()).is_some_and(|t| t <= now_s)
}

pub(super) fn idem_pk(tenant: &TenantId, key: &str) -> String {
    format!("idem#{tenant}#{key}")
}

pub(super) fn usage_pk(tenant: &TenantId) -> String {
    format!("usage#{tenant}")
}

pub(super) fn quota_pk(tenant: &TenantId) -> String {
    format!("quota#{tenant}")
}

/// An in-flight counter item's count; below zero reads as 0.
pub(super) fn in_flight_of(item: &Item) -> StorageResult<u64> {
    let n = Fields::new(item, "in-flight counter").opt_n::<i64>("in_flight")?;
    Ok(n.unwrap_or(0).max(0) as u64)
}

pub(super) fn priority_str(p: Priority) -> &'static str {
    match p {
        Priority::Interactive => "interactive",
        Priority::Batch => "batch",
    }
}

/// At most [`MAX_ERROR_BYTES`], cut at a character boundary.
pub(super) fn clip(s: &str) -> String {
    if s.len() <= MAX_ERROR_BYTES {
        return s.to_owned();
    }
    let mut end = MAX_ERROR_BYTES - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

pub(super) fn already_exists(id: &JobId) -> StorageError {
    StorageError::AlreadyExists(format!("job {id}"))
}

pub(super) fn corrupt(what: &str, detail: &str) -> StorageError {
    StorageError::Backend(format!("stored {what} is malformed: {detail}"))
}

pub(super) fn codes(reasons: &[CancellationReason]) -> Vec<&str> {
    reasons.iter().map(|r| r.code().unwrap_or("?")).collect()
}

/// A refused conditional write on the job item is `LeaseLost`; anything
/// else is a backend error.
pub(super) fn lease_lost_or<R: std::fmt::Debug + Send + Sync + 'static>(
    e: SdkError<UpdateItemError, R>,
    what: &str,
) -> StorageError {
    if matches!(e.as_service_error(), Some(UpdateItemError::ConditionalCheckFailedException(_))) {
        StorageError::LeaseLost
    } else {
        sdk_err(what, e)
    }
}

/// Why an acquisition was refused, from the item as it was.
pub(super) fn refused_lease(old: Option<&Item>, now: Micros) -> StorageResult<LeaseOutcome> {
    let Some(item) = old.filter(|i| !i.is_empty() && !expired(i, secs(now))) else {
        return Ok(LeaseOutcome::Missing);
    };
    let f = Fields::new(item, "job item");
    let status = f.status()?;
    if status.is_terminal() {
        return Ok(LeaseOutcome::Finished(status));
    }
    match (f.opt_s("lease_owner")?, f.opt_n::<Micros>("lease_expires_at")?) {
        (Some(owner), Some(expires_at)) if now < expires_at => {
            Ok(LeaseOutcome::Held { owner: owner.to_owned(), expires_at })
        }
        _ => Err(StorageError::Backend("lease refused on a job that looks free; retry".into())),
    }
}

/// Typed reads of one item's attributes, naming the item in errors.
pub(super) struct Fields<'a> {
    item: &'a Item,
    what: &'static str,
}

impl<'a> Fields<'a> {
    pub(super) fn new(item: &'a Item, what: &'static str) -> Self {
        Self { item, what }
    }

    pub(super) fn opt_s(&self, name: &str) -> StorageResult<Option<&'a str>> {
        match self.item.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::S(v)) => Ok(Some(v.as_str())),
            Some(_) => Err(corrupt(self.what, &format!("{name} is not a string"))),
        }
    }

    pub(super) fn s(&self, name: &str) -> StorageResult<&'a str> {
        self.opt_s(name)?.ok_or_else(|| corrupt(self.what, &format!("{name} is missing")))
    }

    pub(super) fn opt_n<T: std::str::FromStr>(&self, name: &str) -> StorageResult<Option<T>> {
        match self.item.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::N(v)) => {
                v.parse().map(Some).map_err(|_| corrupt(self.what, &format!("{name} = {v} is out of range")))
            }
            Some(_) => Err(corrupt(self.what, &format!("{name} is not a number"))),
        }
    }

    pub(super) fn n<T: std::str::FromStr>(&self, name: &str) -> StorageResult<T> {
        self.opt_n(name)?.ok_or_else(|| corrupt(self.what, &format!("{name} is missing")))
    }

    pub(super) fn parsed<T, E: std::fmt::Display>(
        &self,
        name: &str,
        parse: impl FnOnce(&'a str) -> Result<T, E>,
    ) -> StorageResult<T> {
        parse(self.s(name)?).map_err(|e| corrupt(self.what, &format!("{name}: {e}")))
    }

    pub(super) fn status(&self) -> StorageResult<JobStatus> {
        self.parsed("status", |v| JobStatus::parse(v).ok_or(format!("unknown job status {v:?}")))
    }
}

/// The job record from its item and its spec (the spec item's, or for a job
/// stored before specs had their own item, the job item's).
pub(super) fn job_from_item(item: &Item, spec_json: String) -> StorageResult<JobRecord> {
    let f = Fields::new(item, "job item");
    Ok(JobRecord {
        id: f.parsed("PK", JobId::parse)?,
        tenant: f.parsed("tenant", TenantId::parse)?,
        name: f.s("name")?.to_owned(),
        priority: f.parsed("priority", |v| match v {
            "interactive" => Ok(Priority::Interactive),
            "batch" => Ok(Priority::Batch),
            other => Err(format!("unknown priority {other:?}")),
        })?,
        status: f.status()?,
        spec_json,
        steps_total: f.n("steps_total")?,
        steps_done: f.n("steps_done")?,
        usage: Usage {
            calls: f.n("calls")?,
            prompt_tokens: f.n("prompt_tokens")?,
            completion_tokens: f.n("completion_tokens")?,
        },
        error: f.opt_s("error")?.map(str::to_owned),
        created_at: f.n("created_at")?,
        updated_at: f.n("updated_at")?,
        finished_at: f.opt_n("finished_at")?,
        lease_owner: f.opt_s("lease_owner")?.map(str::to_owned),
        lease_expires_at: f.opt_n("lease_expires_at")?,
        stalled_runs: f.n("stalled_runs")?,
    })
}

/// Where a checkpoint item's answer is.
pub(super) enum StoredAnswer {
    Inline(StepAnswer),
    InS3(OutputRef),
}

/// A checkpoint item's answer, or its pointer into the outputs bucket
/// (`output_ref`, written instead of `output` and `answer`).
pub(super) fn stored_answer(item: &Item) -> StorageResult<StoredAnswer> {
    let f = Fields::new(item, "checkpoint item");
    if let Some(key) = f.opt_s("output_ref")? {
        return Ok(StoredAnswer::InS3(OutputRef {
            key: key.to_owned(),
            bytes: f.n("output_bytes")?,
            sha256: f.s("output_sha256")?.to_owned(),
        }));
    }
    let answer = match item.get(PACKED_ATTR) {
        Some(AttributeValue::B(z)) => {
            let (text, rest) = unpack(z.as_ref()).map_err(|e| corrupt("checkpoint item", &e))?;
            StepAnswer::join(text, Some(&rest))
        }
        _ => StepAnswer::join(f.s("output")?.to_owned(), f.opt_s("answer")?),
    }
    .map_err(|e| corrupt("checkpoint item", &e.to_string()))?;
    Ok(StoredAnswer::Inline(answer))
}

/// The attribute of a step item holding its answer deflated.
pub(super) const PACKED_ATTR: &str = "packed";

/// A step answer's text and the rest of its message, deflated together, if
/// that is smaller than both as they are (a short answer often is not).
pub(super) fn pack(text: &str, rest: &str) -> Option<Vec<u8>> {
    use std::io::Write as _;
    let raw = serde_json::to_vec(&(text, rest)).ok()?;
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw).ok()?;
    let z = z.finish().ok()?;
    (z.len() < text.len() + rest.len()).then_some(z)
}

/// [`pack`] undone; never more than an item's answer may hold.
pub(super) fn unpack(z: &[u8]) -> Result<(String, String), String> {
    use std::io::Read as _;
    let mut raw = Vec::new();
    flate2::read::DeflateDecoder::new(z)
        .take(2 * MAX_PAYLOAD_BYTES as u64)
        .read_to_end(&mut raw)
        .map_err(|e| format!("packed answer: {e}"))?;
    serde_json::from_slice(&raw).map_err(|e| format!("packed answer: {e}"))
}

/// What orders a job's checkpoints (when the step finished, then its key)
/// and what its answer takes in store, read without the answer.
pub(super) fn checkpoint_order(item: &Item) -> StorageResult<(Micros, StepKey, u64)> {
    let f = Fields::new(item, "checkpoint item");
    let bytes = match f.opt_n::<u64>("output_bytes")? {
        Some(b) => b,
        None => (f.opt_s("output")?.map_or(0, str::len) + f.opt_s("answer")?.map_or(0, str::len)) as u64,
    };
    Ok((f.n("finished_at")?, checkpoint_step(&f)?, bytes))
}

fn checkpoint_step(f: &Fields<'_>) -> StorageResult<StepKey> {
    f.parsed("SK", |sk| StepKey::parse(sk.strip_prefix(STEP_PREFIX).unwrap_or(sk)))
}

/// A checkpoint item, with its answer (inline or read from S3).
pub(super) fn checkpoint_from_item(item: &Item, answer: StepAnswer) -> StorageResult<Checkpoint> {
    let f = Fields::new(item, "checkpoint item");
    Ok(Checkpoint {
        step: checkpoint_step(&f)?,
        answer,
        usage: Usage {
            calls: f.n("calls")?,
            prompt_tokens: f.n("prompt_tokens")?,
            completion_tokens: f.n("completion_tokens")?,
        },
        org: f.parsed("org", OrgName::parse)?,
        model: f.parsed("model", ModelName::parse)?,
        attempts: f.n("attempts")?,
        started_at: f.n("started_at")?,
        finished_at: f.n("finished_at")?,
    })
}

pub(super) fn usage_from_item(item: &Item) -> StorageResult<(OrgName, OrgCounters)> {
    let f = Fields::new(item, "usage item");
    let count = |name: &str| f.opt_n::<u64>(name).map(Option::unwrap_or_default);
    Ok((
        f.parsed("SK", |sk| OrgName::parse(sk.strip_prefix(USAGE_ORG_PREFIX).unwrap_or(sk)))?,
        OrgCounters {
            calls: count("calls")?,
            prompt_tokens: count("prompt_tokens")?,
            completion_tokens: count("completion_tokens")?,
            rate_limited: count("rate_limited")?,
            insufficient_quota: count("insufficient_quota")?,
            server_errors: count("server_errors")?,
            timeouts: count("timeouts")?,
            connection_errors: count("connection_errors")?,
            request_errors: count("request_errors")?,
        },
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ttl_seconds_never_precede_the_exact_expiry() {
        use super::secs_ceil;
        assert_eq!(secs_ceil(5_000_000), 5);
        assert_eq!(secs_ceil(5_000_001), 6);
        assert_eq!(secs_ceil(4_999_999), 5);
    }

    use super::*;

    #[test]
    fn names_maps_every_placeholder_and_the_ttl_alias() {
        let n = names(&["SET #status = :s, #ttl = :t ADD #lease_epoch :one", "#lease_owner = :o AND #status = :r"]);
        let mut got: Vec<_> = n.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("#lease_epoch", "lease_epoch"),
                ("#lease_owner", "lease_owner"),
                ("#status", "status"),
                ("#ttl", "expires_at")
            ]
        );
    }

    #[test]
    fn clip_keeps_short_messages_and_cuts_long_ones_on_a_char_boundary() {
        assert_eq!(clip("model refused"), "model refused");
        let long = "ü".repeat(MAX_ERROR_BYTES);
        let cut = clip(&long);
        assert!(cut.len() <= MAX_ERROR_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn expiry_is_in_epoch_seconds_and_inclusive() {
        let item: Item = [(TTL_ATTR.to_owned(), num(1_700_000_100))].into_iter().collect();
        assert!(!expired(&item, 1_700_000_099));
        assert!(expired(&item, 1_700_000_100));
        assert!(!expired(&Item::new(), i64::MAX), "an item without TTL never expires");
        assert_eq!(secs(1_700_000_000_999_999), 1_700_000_000);
    }
}

#[cfg(test)]
mod pack_tests {
    use super::*;

    #[test]
    fn an_answer_packs_smaller_and_unpacks_whole_and_a_short_one_stays_as_it_is() {
        let text = "INT. KITCHEN - NIGHT. The kettle screams; Mara does not move. ".repeat(30);
        let rest = r#"{"finish_reason":"stop"}"#;
        let z = pack(&text, rest).expect("prose deflates");
        assert!(z.len() < text.len() / 2, "{} of {}", z.len(), text.len());
        assert_eq!(unpack(&z).unwrap(), (text.clone(), rest.to_string()));
        assert_eq!(pack("ok", "{}"), None, "two bytes do not deflate smaller");
        assert!(unpack(b"not deflate").is_err());
    }
}
