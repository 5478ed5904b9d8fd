/**
 * Renders `RATEPOOL_CONFIG_TOML`, the whole configuration the worker and the
 * Lambda read (the same file format as `ratepool serve --config`, with
 * `storage.backend = "aws"`). Resource names may be CDK tokens: the rendered
 * string then becomes an Fn::Join that CloudFormation fills in.
 */
import { Token } from 'aws-cdk-lib';
import type { Settings } from './settings';
import { PROVIDER_TIMEOUT_SECS, WORKER_SHUTDOWN_GRACE_SECS } from './timing';

/** Where the AWS backend's resources are; any field may be a token. */
export interface AwsResourceNames {
  readonly region: string;
  readonly jobsTable: string;
  readonly ledgerTable: string;
  readonly interactiveQueue: string;
  readonly batchQueue: string;
  readonly deadLetterQueue: string;
  readonly secretArn: string;
  /** Step answers too large for a DynamoDB item. */
  readonly outputsBucket: string;
}

/**
 * Days a finished job's items are kept ([aws] retention_days, DynamoDB TTL).
 * Written out, not left to the backend's default: the outputs bucket's
 * lifecycle rule is computed from it.
 */
export const JOB_RETENTION_DAYS = 30;
/**
 * How long past the retention a step item may outlive its write: the
 * backend's LIVE_MARGIN_SECS (SQS's 14-day message retention), in days. A step
 * item's TTL is its write + retention + this margin, and so must its S3 object's
 * expiry be (both start at the same moment).
 */
export const STEP_LIVE_MARGIN_DAYS = 14;

/** The CloudWatch namespace the worker publishes to; IAM and alarms depend on it. */
export const METRICS_NAMESPACE = 'Ratepool';

export function renderConfigToml(s: Settings, aws: AwsResourceNames): string {
  const lines: string[] = [
    '[storage]',
    'backend = "aws"',
    '',
    '[aws]',
    `region = ${q(aws.region)}`,
    `jobs_table = ${q(aws.jobsTable)}`,
    `ledger_table = ${q(aws.ledgerTable)}`,
    `interactive_queue = ${q(aws.interactiveQueue)}`,
    `batch_queue = ${q(aws.batchQueue)}`,
    `dead_letter_queue = ${q(aws.deadLetterQueue)}`,
    `metrics_namespace = ${q(METRICS_NAMESPACE)}`,
    `secret_arn = ${q(aws.secretArn)}`,
    `retention_days = ${JOB_RETENTION_DAYS}`,
    `outputs_bucket = ${q(aws.outputsBucket)}`,
    '',
    '[workers]',
    `concurrency = ${s.workerConcurrency}`,
    `visibility_timeout_secs = ${s.visibilityTimeoutSecs}`,
    `shutdown_grace_secs = ${WORKER_SHUTDOWN_GRACE_SECS}`,
  ];
  if (s.calls) lines.push('', '[calls]', `max_wait_secs = ${s.calls.maxWaitSecs}`);
  for (const org of s.orgs) {
    lines.push(
      '',
      '[[orgs]]',
      `name = ${q(org.name)}`,
      `base_url = ${q(org.baseUrl)}`,
      `api_key_env = ${q(org.apiKeyEnv)}`,
      // Written out, not left to the worker's default: the load balancer's
      // timeouts are computed from it (timing.ts).
      `timeout_secs = ${PROVIDER_TIMEOUT_SECS}`,
    );
    for (const [model, limits] of Object.entries(org.models)) {
      lines.push(`[orgs.models.${q(model)}]`, `rpm = ${limits.rpm}`, `tpm = ${limits.tpm}`);
    }
  }
  for (const tenant of s.tenants) {
    lines.push('', '[[tenants]]', `name = ${q(tenant.name)}`, `api_key_env = ${q(tenant.apiKeyEnv)}`);
  }
  return lines.join('\n') + '\n';
}

/** A TOML basic string. Tokens are left alone: CloudFormation fills in plain names. */
function q(v: string): string {
  if (Token.isUnresolved(v)) return `"${v}"`;
  const escaped = v.replace(/[\\"\u0000-\u001f\u007f]/g, (c) =>
    c === '\\' || c === '"' ? `\\${c}` : `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`,
  );
  return `"${escaped}"`;
}
