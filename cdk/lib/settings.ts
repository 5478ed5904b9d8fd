/**
 * What a deployment is made of. The ratepool config itself (orgs, tenants,
 * quotas, workers, calls, ...) is a TOML file (`ratepool:configFile`, read
 * and checked in config-file.ts); the AWS-only settings (sizes, scaling,
 * NAT, TLS, alarms, throttles) are CDK context (`cdk.json` defaults,
 * `-c ratepool:KEY=VALUE` overrides). Both are checked once, so a mistake
 * stops `cdk synth` naming the key (or the file's line) instead of surfacing
 * as a worker that refuses its config after a deploy.
 */
import * as fs from 'fs';
import * as path from 'path';
import type { Node } from 'constructs';
import { ConfigFile, FileOrg, FileTenant, loadConfigFile } from './config-file';
import { callDrainSecs } from './timing';

export type OrgSettings = FileOrg;

/** API Gateway throttling: requests per second and burst. */
export interface Throttle {
  readonly rateLimit: number;
  readonly burstLimit: number;
}

export interface TenantSettings extends FileTenant {
  /** Its usage plan's throttle (`ratepool:tenantThrottles`, else the tenant defaults). */
  readonly throttle: Throttle;
}

/** The calls endpoint (the OpenAI-compatible door) behind the load balancer. */
export interface CallsSettings {
  /**
   * The longest a call can take, with its margin: the config file's `[calls]
   * max_wait_cap_secs` + its slowest org's `timeout_secs` + 30 s. The load
   * balancer's idle timeout and the deregistration delay.
   */
  readonly drainSecs: number;
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
  /** The config file, checked; its text is the head of every `RATEPOOL_CONFIG_TOML`. */
  readonly configFile: ConfigFile;
  readonly orgs: readonly OrgSettings[];
  readonly tenants: readonly TenantSettings[];
  /** Absolute path of the directory holding the Lambda's `bootstrap`. */
  readonly lambdaAsset: string;
  /** `[workers] concurrency`: jobs one worker task runs at once; also the backlog one task is sized for. */
  readonly workerConcurrency: number;
  /** `[workers] visibility_timeout_secs`: the SQS visibility timeout; the worker extends it by heartbeat while it works. */
  readonly visibilityTimeoutSecs: number;
  readonly workerCpu: number;
  readonly workerMemoryMiB: number;
  readonly minWorkers: number;
  readonly maxWorkers: number;
  readonly lambdaMemoryMiB: number;
  /** NAT gateways give the workers fixed egress IPs (for provider IP allowlists). */
  readonly natGateways: number;
  /** API Gateway stage throttling: the cap over every tenant together. */
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

/** The config file of a deployment that names none (relative to the repository root). */
export const DEFAULT_CONFIG_FILE = 'examples/aws.toml';

/** Context keys that were settings before the config file carried them, with where they went. */
const MOVED_TO_FILE: Record<string, string> = {
  orgs: '[[orgs]]',
  tenants: '[[tenants]]',
  workerConcurrency: '[workers] concurrency',
  visibilityTimeoutSecs: '[workers] visibility_timeout_secs',
  callsMaxWaitSecs: '[calls] max_wait_secs and max_wait_cap_secs',
};

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
  const bool = (key: string): boolean => {
    const v = raw(key);
    if (typeof v !== 'boolean') throw new SettingsError(key, `expected true or false, got ${JSON.stringify(v)}`);
    return v;
  };
  const int = (key: string, min: number, max: number): number => {
    const v = raw(key);
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
      throw new SettingsError(key, `expected an integer in ${min}..${max}, got ${JSON.stringify(v)}`);
    }
    return v;
  };

  for (const [key, where] of Object.entries(MOVED_TO_FILE)) {
    if (node.tryGetContext(CONTEXT_PREFIX + key) !== undefined) {
      throw new SettingsError(key, `is no longer a setting: it is ${where} in the config file (ratepool:configFile)`);
    }
  }
  const callsOn = bool('calls');
  const configPath = raw('configFile') ?? DEFAULT_CONFIG_FILE;
  if (typeof configPath !== 'string' || configPath === '') {
    throw new SettingsError('configFile', 'expected the path of a ratepool config file, relative to the repository root');
  }
  const file = loadConfigFile(path.resolve(repoRoot(), configPath), repoRoot(), { calls: callsOn });

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

  const calls = callsOn ? parseCalls() : noCalls();
  const apiRateLimit = int('apiRateLimit', 1, 10000);
  const apiBurstLimit = int('apiBurstLimit', 1, 5000);
  const tenantDefault: Throttle = {
    rateLimit: int('tenantRateLimit', 1, 10000),
    burstLimit: int('tenantBurstLimit', 1, 5000),
  };
  const overrides = tenantThrottles(raw('tenantThrottles'), file);
  const tenants = file.tenants.map((t) => ({ ...t, throttle: overrides.get(t.name) ?? tenantDefault }));

  return {
    configFile: file,
    orgs: file.orgs,
    tenants,
    lambdaAsset,
    workerConcurrency: file.concurrency,
    visibilityTimeoutSecs: file.visibilityTimeoutSecs,
    workerCpu: int('workerCpu', 256, 16384),
    workerMemoryMiB: int('workerMemoryMiB', 512, 122880),
    minWorkers,
    maxWorkers,
    lambdaMemoryMiB: int('lambdaMemoryMiB', 128, 10240),
    natGateways: int('natGateways', 1, 2),
    apiRateLimit,
    apiBurstLimit,
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
    const slowest = Math.max(...file.orgs.map((o) => o.timeoutSecs));
    // Checked against the load balancer's limits in config-file.ts.
    const drainSecs = callDrainSecs(file.callsMaxWaitCapSecs, slowest);
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
      return { drainSecs, perTaskPerMinute };
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
    return { drainSecs, perTaskPerMinute, tls: { certificateArn, domain } };
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

/** `ratepool:tenantThrottles`: `{TENANT: {rateLimit, burstLimit}}` for tenants of the config file. */
function tenantThrottles(v: unknown, file: ConfigFile): Map<string, Throttle> {
  const key = 'tenantThrottles';
  const out = new Map<string, Throttle>();
  if (v === undefined || v === '') return out;
  if (typeof v !== 'object' || v === null || Array.isArray(v)) {
    throw new SettingsError(key, `expected a JSON object {"TENANT": {"rateLimit": N, "burstLimit": N}}, got ${JSON.stringify(v)}`);
  }
  const names = new Set(file.tenants.map((t) => t.name));
  for (const [tenant, t] of Object.entries(v as Record<string, unknown>)) {
    if (!names.has(tenant)) {
      throw new SettingsError(`${key}.${tenant}`, `no such tenant in ${file.shownPath} (tenants: ${[...names].join(', ')})`);
    }
    const o = (typeof t === 'object' && t !== null ? t : {}) as Record<string, unknown>;
    const limit = (field: string, max: number): number => {
      const n = o[field];
      if (typeof n !== 'number' || !Number.isInteger(n) || n < 1 || n > max) {
        throw new SettingsError(`${key}.${tenant}.${field}`, `expected an integer in 1..${max}, got ${JSON.stringify(n)}`);
      }
      return n;
    };
    out.set(tenant, { rateLimit: limit('rateLimit', 10000), burstLimit: limit('burstLimit', 5000) });
  }
  return out;
}
