//! Step answers too large for a DynamoDB item, kept in S3 (`[aws]
//! outputs_bucket`) with a pointer in the checkpoint item.
//!
//! The object is written before the checkpoint's transaction, under a key
//! that names its content (`<job>/<step key>/<sha256>`): a retried
//! checkpoint writes the same bytes to the same key, and a worker whose
//! lease was taken over can never overwrite the object that the new
//! holder's checkpoint points at. An object whose checkpoint never landed
//! is left to the bucket's lifecycle rule, like an expired job's.

use aws_sdk_s3::primitives::ByteStream;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::sdk_err;
use crate::answer::StepAnswer;
use crate::domain::{JobId, StepKey};
use crate::storage::{StorageError, StorageResult};

/// Where an answer lives: the checkpoint item's `output_ref`,
/// `output_bytes` and `output_sha256`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OutputRef {
    pub key: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The object's body: the same two parts an inline checkpoint holds.
#[derive(Serialize, Deserialize)]
struct Stored<'a> {
    output: std::borrow::Cow<'a, str>,
    answer: std::borrow::Cow<'a, str>,
}

/// The bucket of oversized step answers.
pub(super) struct OutputBucket {
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl OutputBucket {
    pub(super) fn new(client: aws_sdk_s3::Client, bucket: String) -> Self {
        Self { client, bucket }
    }

    /// Writes `answer` (its text and the rest of its message) and returns
    /// the pointer to store. Writing the same answer again is harmless.
    pub(super) async fn put(&self, job: &JobId, step: &StepKey, text: &str, rest: &str) -> StorageResult<OutputRef> {
        let body = serde_json::to_vec(&Stored { output: text.into(), answer: rest.into() })
            .map_err(|e| StorageError::Backend(format!("encoding step {step}'s answer: {e}")))?;
        let sha256 = hex::encode(Sha256::digest(&body));
        let r = OutputRef { key: format!("{job}/{step}/{sha256}"), bytes: body.len() as u64, sha256 };
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&r.key)
            .content_type("application/json")
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| sdk_err(&format!("writing step {step}'s answer to s3://{}", self.bucket), e))?;
        Ok(r)
    }

    /// Reads an answer back, checking it is the one the pointer names.
    pub(super) async fn get(&self, r: &OutputRef) -> StorageResult<StepAnswer> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&r.key)
            .send()
            .await
            .map_err(|e| sdk_err(&format!("reading s3://{}/{}", self.bucket, r.key), e))?;
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| sdk_err(&format!("reading s3://{}/{}", self.bucket, r.key), e))?
            .into_bytes();
        let corrupt = |why: String| StorageError::Backend(format!("s3://{}/{}: {why}", self.bucket, r.key));
        if body.len() as u64 != r.bytes || hex::encode(Sha256::digest(&body)) != r.sha256 {
            return Err(corrupt(format!(
                "{} bytes that do not match the checkpoint's {} bytes and sha256",
                body.len(),
                r.bytes
            )));
        }
        let stored: Stored<'_> = serde_json::from_slice(&body).map_err(|e| corrupt(e.to_string()))?;
        StepAnswer::join(stored.output.into_owned(), Some(&stored.answer)).map_err(|e| corrupt(e.to_string()))
    }
}

/// Creates the bucket unless it exists (`ratepool aws init`). Returns
/// whether it created it.
pub(in crate::aws) async fn ensure_bucket(client: &aws_sdk_s3::Client, bucket: &str) -> StorageResult<bool> {
    if client.head_bucket().bucket(bucket).send().await.is_ok() {
        return Ok(false);
    }
    let mut create = client.create_bucket().bucket(bucket);
    // us-east-1 is the one region that takes no location constraint.
    if let Some(region) = client.config().region().map(|r| r.as_ref()).filter(|r| *r != "us-east-1") {
        create = create.create_bucket_configuration(
            aws_sdk_s3::types::CreateBucketConfiguration::builder()
                .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(region))
                .build(),
        );
    }
    create.send().await.map_err(|e| sdk_err(&format!("creating bucket {bucket}"), e))?;
    Ok(true)
}
