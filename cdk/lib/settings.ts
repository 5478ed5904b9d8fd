/**
 * What a deployment is made of — orgs, tenants, sizes, limits — read from CDK
 * context (`cdk.json` defaults, `-c ratepool:KEY=VALUE` overrides) and checked
 * once, so a typo stops `cdk synth` with the key's name instead of surfacing
 * as a worker that refuses its config after a deploy.
 */
import * as fs from 'fs';
import * as path from 'path';
import type { Node } from 'constructs';
import {
  ALB_MAX_IDLE_TIMEOUT_SECS,
  callDrainSecs,
  CALL_MARGIN_SECS,
  MAX_CALLS_MAX_WAIT_SECS,
  MAX_DEREGISTRATION_DELAY_SECS,
  PROVIDER_TIMEOUT_SECS,
} from './timing';

export interface ModelLimits {
  readonly rpm: number;
  readonly tpm: number;
}

export interface OrgSettings {
  /** Also the CloudWatch dimension `Org` the worker publishes under. */
  readonly name: string;
  readonly baseUrl: string;
  /** The field of the keys secret's JSON that holds this org's API key. */
  readonly apiKeyEnv: string;
  readonly models: Readonly<Record<string, ModelLimits>>;
}

export interface TenantSettings {
  readonly name: string;
  /** The field of the keys secret's JSON that holds this tenant's API key. */
  readonly apiKeyEnv: string;
}

/** The calls endpoint (the OpenAI-compatible door) behind the load balancer. */
export interface CallsSettings {
  /** `[calls] max_wait_secs`: the longest a call waits for pooled capacity. */
  readonly maxWaitSecs: number;
  /** Calls a minute one task is sized for; with `workerConcurrency`, what scaling divides by. */
  readonly perTaskPerMinute: number;
  /** HTTPS on the certificate's hostname; absent only when `ratepool:allowHttp` chose plain HTTP. */
  readonly tls?: CallsTls;
}

export interface CallsTls {
  /** An ACM certificate in the stack's region. */
  readonly certificateArn: string;
  /** The hostname the certificate is for; its DNS record points at the load balancer. */
  readonly domain: string;
}

export interface Settings {
  readonly orgs: readonly OrgSettings[];
  readonly tenants: readonly TenantSettings[];
  /** Absolute path of the directory holding the Lambda's `bootstrap`. */
  readonly lambdaAsset: string;
  /** Jobs one worker task runs at once; also the backlog one task is sized for. */
  readonly workerConcurrency: number;
  /** SQS visibility timeout; the worker extends it by heartbeat while it works. */
  readonly visibilityTimeoutSecs: number;
  readonly workerCpu: number;
  readonly workerMemoryMiB: number;
  readonly minWorkers: number;
  readonly maxWorkers: number;
  readonly lambdaMemoryMiB: number;
  /** NAT gateways give the workers fixed egress IPs (for provider IP allowlists). */
  readonly natGateways: number;
  /** API Gateway stage throttling, requests per second and burst. */
  readonly apiRateLimit: number;
  readonly apiBurstLimit: number;
  /** Alarm when the oldest waiting message of a queue is older than this. */
  readonly interactiveMaxAgeSecs: number;
  readonly batchMaxAgeSecs: number;
  /** Subscribed to the alarm topic when set. */
  readonly alarmEmail?: string;
  /** Absent with `ratepool:calls=false`: no load balancer, and workers may scale to zero. */
  readonly calls?: CallsSettings;
}

export const CONTEXT_PREFIX = 'ratepool:';

/** The directory holding cdk.json, found from this file wherever it runs from. */
export function cdkDir(): string {
  let dir = __dirname;
  while (!fs.existsSync(path.join(dir, 'cdk.json'))) {
    const parent = path.dirname(dir);
    if (parent === dir) throw new Error(`no cdk.json above ${__dirname}`);
    dir = parent;
  }
  return dir;
}

/** The repository root: the worker image's build context. */
export function repoRoot(): string {
  return path.dirname(cdkDir());
}

// Same rule as the Rust side's `OrgName`/`TenantId` (src/domain.rs).
const ID = /^[A-Za-z0-9._:-]{1,64}$/;
const MODEL = /^[A-Za-z0-9._:-]{1,128}$/;
const ENV_NAME = /^[A-Z_][A-Z0-9_]*$/;
const CERTIFICATE_ARN = /^arn:aws[a-z-]*:acm:[a-z0-9-]+:\d{12}:certificate\/[A-Za-z0-9-]+$/;
const HOSTNAME = /^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$/;

class SettingsError extends Error {
  constructor(key: string, message: string) {
    super(`context ${CONTEXT_PREFIX}${key}: ${message}`);
  }
}

/** Reads and checks every `ratepool:*` context value. */
export function loadSettings(node: Node): Settings {
  const raw = (key: string): unknown => {
    const v: unknown = node.tryGetContext(CONTEXT_PREFIX + key);
    // `-c key=VALUE` always gives a string; JSON lets it carry numbers and lists.
    if (typeof v === 'string') {
      try {
        return JSON.parse(v);
      } catch {
        return v;
      }
    }
    return v;
  };
  const int = (key: string, min: number, max: number): number => {
    const v = raw(key);
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
      throw new SettingsError(key, `expected an integer in ${min}..${max}, got ${JSON.stringify(v)}`);
    }
    return v;
  };

  const orgs = list(raw('orgs'), 'orgs').map((o, i) => parseOrg(o, `orgs[${i}]`));
  if (orgs.length === 0) throw new SettingsError('orgs', 'at least one org is needed');
  const tenants = list(raw('tenants'), 'tenants').map((t, i) => parseTenant(t, `tenants[${i}]`));
  if (tenants.length === 0) throw new SettingsError('tenants', 'at least one tenant is needed');
  unique(orgs.map((o) => o.name), 'orgs', 'name');
  unique(tenants.map((t) => t.name), 'tenants', 'name');
  unique([...orgs, ...tenants].map((x) => x.apiKeyEnv), 'orgs/tenants', 'apiKeyEnv');

  const asset = raw('lambdaAsset');
  if (typeof asset !== 'string' || asset === '') throw new SettingsError('lambdaAsset', 'expected a directory path');
  const lambdaAsset = path.resolve(repoRoot(), asset);
  if (!fs.existsSync(path.join(lambdaAsset, 'bootstrap'))) {
    throw new SettingsError(
      'lambdaAsset',
      `${lambdaAsset}/bootstrap does not exist: build it with \`make lambda-bundle\`, ` +
        'or pass -c ratepool:lambdaAsset=cdk/test/fixtures/lambda-placeholder to synthesize without it',
    );
  }

  const minWorkers = int('minWorkers', 0, 1000);
  const maxWorkers = int('maxWorkers', Math.max(1, minWorkers), 1000);
  const bool = (key: string): boolean => {
    const v = raw(key);
    if (typeof v !== 'boolean') throw new SettingsError(key, `expected true or false, got ${JSON.stringify(v)}`);
    return v;
  };
  /** A string matching `re`, or undefined when empty or missing. */
  const optional = (key: string, re: RegExp, what: string): string | undefined => {
    const v = raw(key);
    if (v === undefined || v === '') return undefined;
    if (typeof v !== 'string' || !re.test(v)) throw new SettingsError(key, `expected ${what}, got ${JSON.stringify(v)}`);
    return v;
  };

  const email = raw('alarmEmail');
  if (email !== undefined && email !== '' && (typeof email !== 'string' || !/^[^@\s]+@[^@\s]+$/.test(email))) {
    throw new SettingsError('alarmEmail', `expected an email address, got ${JSON.stringify(email)}`);
  }

  const calls = bool('calls') ? parseCalls() : noCalls();

  return {
    orgs,
    tenants,
    lambdaAsset,
    workerConcurrency: int('workerConcurrency', 1, 10000),
    // SQS allows up to 12 hours; more than a few minutes only delays crash recovery.
    visibilityTimeoutSecs: int('visibilityTimeoutSecs', 5, 43200),
    workerCpu: int('workerCpu', 256, 16384),
    workerMemoryMiB: int('workerMemoryMiB', 512, 122880),
    minWorkers,
    maxWorkers,
    lambdaMemoryMiB: int('lambdaMemoryMiB', 128, 10240),
    natGateways: int('natGateways', 1, 2),
    apiRateLimit: int('apiRateLimit', 1, 10000),
    apiBurstLimit: int('apiBurstLimit', 1, 5000),
    interactiveMaxAgeSecs: int('interactiveMaxAgeSecs', 60, 1209600),
    batchMaxAgeSecs: int('batchMaxAgeSecs', 60, 1209600),
    alarmEmail: typeof email === 'string' && email !== '' ? email : undefined,
    calls,
  };

  function parseCalls(): CallsSettings {
    if (minWorkers < 1) {
      throw new SettingsError(
        'minWorkers',
        'the calls endpoint (ratepool:calls) needs a running task to answer a call at once: 1 or more ' +
          '(or ratepool:calls=false for a jobs-only stack that scales from zero)',
      );
    }
    const maxWaitSecs = int('callsMaxWaitSecs', 1, 86400);
    if (maxWaitSecs > MAX_CALLS_MAX_WAIT_SECS) {
      throw new SettingsError(
        'callsMaxWaitSecs',
        `${maxWaitSecs} s lets a call last ${callDrainSecs(maxWaitSecs)} s (+ ${PROVIDER_TIMEOUT_SECS} s provider ` +
          `timeout + ${CALL_MARGIN_SECS} s margin), longer than the load balancer can hold it (idle timeout, at most ` +
          `${ALB_MAX_IDLE_TIMEOUT_SECS} s) and drain it from a stopping task (deregistration delay, at most ` +
          `${MAX_DEREGISTRATION_DELAY_SECS} s): at most ${MAX_CALLS_MAX_WAIT_SECS}`,
      );
    }
    const perTaskPerMinute = int('callsPerTaskPerMinute', 1, 1000000);
    const certificateArn = optional('certificateArn', CERTIFICATE_ARN, 'an ACM certificate ARN');
    const domain = optional('callsDomain', HOSTNAME, 'a lowercase DNS hostname');
    const allowHttp = bool('allowHttp');
    if (certificateArn === undefined && domain === undefined) {
      if (!allowHttp) {
        throw new SettingsError(
          'certificateArn',
          'the calls endpoint is internet-facing and tenant keys travel in its Authorization header: give an ACM ' +
            'certificate (ratepool:certificateArn) and the hostname it is for (ratepool:callsDomain); or choose plain ' +
            'HTTP for a dev stack with ratepool:allowHttp=true; or no calls endpoint with ratepool:calls=false',
        );
      }
      return { maxWaitSecs, perTaskPerMinute };
    }
    if (certificateArn === undefined) {
      throw new SettingsError('certificateArn', `needed with ratepool:callsDomain: the ACM certificate for ${domain}`);
    }
    if (domain === undefined) {
      throw new SettingsError('callsDomain', 'needed with ratepool:certificateArn: the hostname the certificate is for');
    }
    if (allowHttp) {
      throw new SettingsError('allowHttp', 'must be false with a certificate: port 80 then only redirects to HTTPS');
    }
    return { maxWaitSecs, perTaskPerMinute, tls: { certificateArn, domain } };
  }

  /** With no calls endpoint, its TLS settings would silently do nothing. */
  function noCalls(): undefined {
    for (const key of ['certificateArn', 'callsDomain']) {
      const v = raw(key);
      if (v !== undefined && v !== '') throw new SettingsError(key, 'has no use with ratepool:calls=false');
    }
    if (bool('allowHttp')) throw new SettingsError('allowHttp', 'has no use with ratepool:calls=false');
    return undefined;
  }
}

function list(v: unknown, key: string): unknown[] {
  if (!Array.isArray(v)) throw new SettingsError(key, `expected a JSON list, got ${JSON.stringify(v)}`);
  return v;
}

function record(v: unknown, key: string): Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) {
    throw new SettingsError(key, `expected a JSON object, got ${JSON.stringify(v)}`);
  }
  return v as Record<string, unknown>;
}

function str(o: Record<string, unknown>, field: string, key: string, re?: RegExp): string {
  const v = o[field];
  if (typeof v !== 'string' || (re !== undefined && !re.test(v))) {
    throw new SettingsError(`${key}.${field}`, `invalid value ${JSON.stringify(v)}${re ? ` (must match ${re})` : ''}`);
  }
  return v;
}

function positive(o: Record<string, unknown>, field: string, key: string): number {
  const v = o[field];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) {
    throw new SettingsError(`${key}.${field}`, `expected a positive integer, got ${JSON.stringify(v)}`);
  }
  return v;
}

function parseOrg(v: unknown, key: string): OrgSettings {
  const o = record(v, key);
  const baseUrl = str(o, 'baseUrl', key, /^https?:\/\/\S+$/);
  const modelsRaw = record(o.models, `${key}.models`);
  const models: Record<string, ModelLimits> = {};
  for (const [model, limits] of Object.entries(modelsRaw)) {
    const k = `${key}.models.${model}`;
    if (!MODEL.test(model)) throw new SettingsError(k, `model name must match ${MODEL}`);
    const l = record(limits, k);
    models[model] = { rpm: positive(l, 'rpm', k), tpm: positive(l, 'tpm', k) };
  }
  if (Object.keys(models).length === 0) throw new SettingsError(`${key}.models`, 'an org needs at least one model');
  return { name: str(o, 'name', key, ID), baseUrl, apiKeyEnv: str(o, 'apiKeyEnv', key, ENV_NAME), models };
}

function parseTenant(v: unknown, key: string): TenantSettings {
  const o = record(v, key);
  return { name: str(o, 'name', key, ID), apiKeyEnv: str(o, 'apiKeyEnv', key, ENV_NAME) };
}

function unique(values: string[], key: string, field: string): void {
  const seen = new Set<string>();
  for (const v of values) {
    if (seen.has(v)) throw new SettingsError(key, `${field} ${JSON.stringify(v)} appears twice`);
    seen.add(v);
  }
}
