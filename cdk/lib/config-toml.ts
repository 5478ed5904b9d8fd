/**
 * Renders `RATEPOOL_CONFIG_TOML`, the whole configuration the worker, the API
 * Lambda and the authorizer read: the config file (`ratepool:configFile`) as
 * it is, then the parts the stack owns, `[storage] backend = "aws"` and the
 * `[aws]` table naming its resources. Resource names may be CDK tokens: the
 * rendered string then becomes an Fn::Join that CloudFormation fills in.
 * The stack's parts come last, so a line number in the rendered text is the
 * same line of the file.
 */
import { Token } from 'aws-cdk-lib';

/** Where the AWS backend's resources are; any field may be a token. */
export interface AwsResourceNames {
  readonly region: string;
  readonly jobsTable: string;
  readonly ledgerTable: string;
  readonly interactiveQueue: string;
  readonly batchQueue: string;
  readonly deadLetterQueue: string;
  /** Tenants' API keys: read by the API Lambda, the authorizer and workers serving calls. */
  readonly tenantKeysSecretArn: string;
  /** Org keys and webhook secrets: read by the workers only. */
  readonly workerKeysSecretArn: string;
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

/** The CloudWatch namespace of the worker's metrics (embedded metric format in its log); alarms read it. */
export const METRICS_NAMESPACE = 'Ratepool';

/** The tables the stack appends, which the config file must not have. */
export const STACK_TABLES = ['storage', 'aws'] as const;

/** The stack's parts: `[storage]` and `[aws]`. */
export function stackParts(aws: AwsResourceNames): string {
  return [
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
    `retention_days = ${JOB_RETENTION_DAYS}`,
    `outputs_bucket = ${q(aws.outputsBucket)}`,
    `tenant_keys_secret_arn = ${q(aws.tenantKeysSecretArn)}`,
    `worker_keys_secret_arn = ${q(aws.workerKeysSecretArn)}`,
  ].join('\n') + '\n';
}

/** The config file's text verbatim, a blank line, the stack's parts. */
export function renderConfigToml(fileText: string, aws: AwsResourceNames): string {
  const text = fileText === '' || fileText.endsWith('\n') ? fileText : `${fileText}\n`;
  return `${text}\n${stackParts(aws)}`;
}

/**
 * Stand-ins for the resource names, valid where the config checker looks
 * (the bucket name), for `ratepool config check` at synth, before the real
 * names exist.
 */
export const PLACEHOLDER_NAMES: AwsResourceNames = {
  region: 'eu-west-1',
  jobsTable: 'Ratepool-JobsTable-PLACEHOLDER',
  ledgerTable: 'Ratepool-LedgerTable-PLACEHOLDER',
  interactiveQueue: 'Ratepool-InteractiveQueue-PLACEHOLDER',
  batchQueue: 'Ratepool-BatchQueue-PLACEHOLDER',
  deadLetterQueue: 'Ratepool-DeadLetterQueue-PLACEHOLDER',
  tenantKeysSecretArn: 'arn:aws:secretsmanager:eu-west-1:111122223333:secret:TenantKeys-PLACEHOLDER-AbCdEf',
  workerKeysSecretArn: 'arn:aws:secretsmanager:eu-west-1:111122223333:secret:WorkerKeys-PLACEHOLDER-AbCdEf',
  outputsBucket: 'ratepool-outputsbucket-placeholder',
};

/**
 * Names as long as CloudFormation makes them for a stack called
 * `stackName`: `STACK-LOGICALID-RANDOM` (a logical id of at most 40
 * characters here, 13 random ones), cut to each service's limit; secret
 * names `LOGICALID-RANDOM` with Secrets Manager's 6-character suffix; the
 * longest region and partition names. For the Lambda environment's size.
 */
export function longestNames(stackName: string): AwsResourceNames {
  const generated = (max: number) => 'x'.repeat(Math.min(max, stackName.length + 1 + 40 + 1 + 13));
  const secretArn = `arn:aws-us-gov:secretsmanager:${'x'.repeat(16)}:111122223333:secret:${'x'.repeat(40 + 1 + 12)}-AbCdEf`;
  return {
    region: 'x'.repeat(16),
    jobsTable: generated(255),
    ledgerTable: generated(255),
    interactiveQueue: generated(80),
    batchQueue: generated(80),
    deadLetterQueue: generated(80),
    tenantKeysSecretArn: secretArn,
    workerKeysSecretArn: secretArn,
    outputsBucket: 'x'.repeat(63),
  };
}

/** A TOML basic string. Tokens are left alone: CloudFormation fills in plain names. */
function q(v: string): string {
  if (Token.isUnresolved(v)) return `"${v}"`;
  const escaped = v.replace(/[\\"\u0000-\u001f\u007f]/g, (c) =>
    c === '\\' || c === '"' ? `\\${c}` : `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`,
  );
  return `"${escaped}"`;
}
