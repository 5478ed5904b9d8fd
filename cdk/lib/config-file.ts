/**
 * The config file a deployment runs (`ratepool:configFile`): the same TOML a
 * user runs locally with `ratepool serve --config`, read at synth for the
 * values the infrastructure depends on, and checked by the binary's own
 * checker (`ratepool config check`) with the stack's parts appended, so a
 * mistake stops `cdk synth` with the file's line and the reason instead of
 * a task that refuses its config after a deploy.
 */
import * as childProcess from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { parse } from 'smol-toml';
import { PLACEHOLDER_NAMES, renderConfigToml, STACK_TABLES } from './config-toml';
import {
  CALL_MARGIN_SECS,
  callDrainSecs,
  HAND_BACK_SECS,
  MAX_CALL_DRAIN_SECS,
  MAX_SHUTDOWN_GRACE_SECS,
  MAX_SIGTERM_TO_EXIT_SECS,
  MAX_VISIBILITY_TIMEOUT_SECS,
  SQS_LONG_POLL_SECS,
  WORKER_STOP_TIMEOUT_SECS,
} from './timing';

/**
 * The worker's defaults for what the file may leave out (src/config.rs:
 * `default_concurrency`, `default_visibility`, `default_grace`,
 * `default_timeout`, `default_call_wait`, `default_call_wait_cap`).
 */
export const RUST_DEFAULTS = {
  concurrency: 64,
  visibilityTimeoutSecs: 30,
  shutdownGraceSecs: 10,
  timeoutSecs: 120,
  callsMaxWaitSecs: 60,
  callsMaxWaitCapSecs: 300,
} as const;

export interface FileOrg {
  /** Also the CloudWatch dimension `Org` of the worker's metrics (per-org alarms). */
  readonly name: string;
  /** The WorkerKeys field holding this org's API key. */
  readonly apiKeyEnv: string;
  /** One provider attempt. */
  readonly timeoutSecs: number;
  readonly fallback: boolean;
}

export interface FileTenant {
  readonly name: string;
  /** The TenantKeys field holding this tenant's API key. */
  readonly apiKeyEnv: string;
  /** The WorkerKeys field holding the secret its webhooks are signed with. */
  readonly webhookSecretEnv?: string;
}

export interface ConfigFile {
  /** Absolute. */
  readonly path: string;
  /** As errors show it: relative to the repository root when inside it. */
  readonly shownPath: string;
  /** Verbatim: the head of `RATEPOOL_CONFIG_TOML`. */
  readonly text: string;
  readonly orgs: readonly FileOrg[];
  readonly tenants: readonly FileTenant[];
  readonly concurrency: number;
  readonly visibilityTimeoutSecs: number;
  readonly shutdownGraceSecs: number;
  /** `[calls] max_wait_secs`. */
  readonly callsMaxWaitSecs: number;
  /** `[calls] max_wait_cap_secs`: the longest a call may wait (with a `Ratepool-Max-Wait` header). */
  readonly callsMaxWaitCapSecs: number;
}

export class ConfigFileError extends Error {
  constructor(shownPath: string, message: string, line?: number) {
    super(`config file ${shownPath}: ${line === undefined ? '' : `line ${line}: `}${message}`);
  }
}

/**
 * Reads `file` (absolute), checks it with `ratepool config check` and reads
 * the values the stack needs. `calls`: whether the calls endpoint is on (its
 * timing limits apply only then).
 */
export function loadConfigFile(file: string, repoRoot: string, opts: { calls: boolean }): ConfigFile {
  const rel = path.relative(repoRoot, file);
  const shownPath = rel.startsWith('..') || path.isAbsolute(rel) ? file : rel;
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new ConfigFileError(shownPath, `cannot read it: ${(e as Error).message}`);
  }
  refuseStackTables(text, shownPath);
  checkWithRatepool(text, shownPath, repoRoot);
  let doc: Record<string, unknown>;
  try {
    doc = parse(text) as Record<string, unknown>;
  } catch (e) {
    const line = (e as { line?: number }).line;
    throw new ConfigFileError(shownPath, (e as Error).message.split('\n')[0], line);
  }
  return readValues(doc, text, file, shownPath, opts);
}

/** `[storage]` and `[aws]` are the stack's: refused wherever the file sets them. */
function refuseStackTables(text: string, shownPath: string): void {
  const names = STACK_TABLES.join('|');
  const header = new RegExp(`^\\s*\\[\\[?\\s*"?(${names})"?\\s*[\\].]`);
  const topLevelKey = new RegExp(`^\\s*"?(${names})"?\\s*[.=]`);
  let inTable = false;
  text.split('\n').forEach((line, i) => {
    const h = header.exec(line);
    const k = inTable ? null : topLevelKey.exec(line);
    const found = h?.[1] ?? k?.[1];
    if (found !== undefined) {
      throw new ConfigFileError(
        shownPath,
        `[${found}] is the stack's: it appends [storage] backend = "aws" and an [aws] table naming its tables, ` +
          'queues, bucket and secrets; remove it from the file',
        i + 1,
      );
    }
    if (/^\s*\[/.test(line)) inTable = true;
  });
}

/** The binary `config check` runs: `RATEPOOL_BIN`, else the newer of the release and debug builds. */
export function ratepoolBinary(repoRoot: string): string {
  const fromEnv = process.env.RATEPOOL_BIN;
  if (fromEnv !== undefined && fromEnv !== '') {
    if (!fs.existsSync(fromEnv)) {
      throw new Error(`RATEPOOL_BIN=${fromEnv} does not exist: run \`cargo build --release\` (\`make build\`), or unset it`);
    }
    return fromEnv;
  }
  const built = ['release', 'debug']
    .map((p) => path.join(repoRoot, 'target', p, 'ratepool'))
    .filter((p) => fs.existsSync(p))
    .sort((a, b) => fs.statSync(b).mtimeMs - fs.statSync(a).mtimeMs);
  if (built.length === 0) {
    throw new Error(
      `no ratepool binary to check the config file with (looked for target/release/ratepool and target/debug/ratepool ` +
        `under ${repoRoot}): run \`cargo build --release\` (\`make build\`), or set RATEPOOL_BIN`,
    );
  }
  return built[0];
}

/**
 * `ratepool config check` on the file with the stack's parts appended
 * (placeholders stand in for the resource names). Its line numbers are
 * the file's: the stack's parts come last.
 */
function checkWithRatepool(text: string, shownPath: string, repoRoot: string): void {
  const bin = ratepoolBinary(repoRoot);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ratepool-config-check-'));
  const rendered = path.join(dir, 'config.toml');
  try {
    fs.writeFileSync(rendered, renderConfigToml(text, PLACEHOLDER_NAMES));
    const r = childProcess.spawnSync(bin, ['config', 'check', rendered], { encoding: 'utf8', timeout: 60_000 });
    if (r.error) throw new Error(`could not run ${bin} config check: ${r.error.message}`);
    if (r.status === 0) return;
    const stderr = (r.stderr ?? '').trim();
    const prefix = `error: config file ${rendered}: `;
    if (r.status !== 1 || !stderr.startsWith(prefix)) {
      throw new Error(
        `${bin} config check ${shownPath} failed without a config error (exit ${r.status ?? r.signal}): ` +
          `${stderr.split('\n')[0] || '(no output)'}; a binary built before \`ratepool config check\` existed? ` +
          'Rebuild it: `cargo build --release`',
      );
    }
    let message = stderr.slice(prefix.length).split(rendered).join(shownPath);
    // The toml crate's wording: "TOML parse error at line N, column C", the
    // line shown with a caret, then the reason. Reason first, as for the rest.
    const parseError = /^TOML parse error at line (\d+), column (\d+)\n([\s\S]*?)\n([^\n]+)$/.exec(message);
    if (parseError) {
      const [, line, column, shown, reason] = parseError;
      message = `line ${line}: ${reason.trim()} (column ${column})\n${shown}`;
    }
    const m = /^line (\d+): ([\s\S]*)$/.exec(message);
    if (m) {
      const line = Number(m[1]);
      const fileLines = text.endsWith('\n') ? text.split('\n').length - 1 : text.split('\n').length;
      if (line > fileLines) message = `${m[2]} (in the [storage]/[aws] part the stack appends after line ${fileLines})`;
      else throw new ConfigFileError(shownPath, m[2], line);
    }
    throw new ConfigFileError(shownPath, message);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** The values the stack depends on, the worker's defaults where the file has none, checked against AWS's limits. */
function readValues(
  doc: Record<string, unknown>,
  text: string,
  file: string,
  shownPath: string,
  opts: { calls: boolean },
): ConfigFile {
  const fail = (message: string, line?: number): never => {
    throw new ConfigFileError(shownPath, message, line);
  };
  const table = (v: unknown, key: string): Record<string, unknown> => {
    if (v === undefined) return {};
    if (typeof v !== 'object' || v === null || Array.isArray(v)) return fail(`${key} must be a table`);
    return v as Record<string, unknown>;
  };
  const tables = (v: unknown, key: string): Record<string, unknown>[] => {
    if (v === undefined) return [];
    if (!Array.isArray(v)) return fail(`${key} must be an array of tables ([[${key}]])`);
    return v.map((x, i) => table(x, `${key}[${i}]`));
  };
  const int = (t: Record<string, unknown>, key: string, shown: string, dflt: number): number => {
    const v = t[key] ?? dflt;
    if (typeof v !== 'number' || !Number.isSafeInteger(v)) return fail(`${shown} must be an integer`);
    return v;
  };
  const str = (t: Record<string, unknown>, key: string, shown: string): string => {
    const v = t[key];
    if (typeof v !== 'string') return fail(`${shown} must be a string`);
    return v;
  };

  const orgs: FileOrg[] = tables(doc.orgs, 'orgs').map((o, i) => ({
    name: str(o, 'name', `[[orgs]] #${i + 1} name`),
    apiKeyEnv: str(o, 'api_key_env', `[[orgs]] #${i + 1} api_key_env`),
    timeoutSecs: int(o, 'timeout_secs', `[[orgs]] #${i + 1} timeout_secs`, RUST_DEFAULTS.timeoutSecs),
    fallback: o.fallback === true,
  }));
  const tenants: FileTenant[] = tables(doc.tenants, 'tenants').map((t, i) => {
    const webhook = t.webhook_secret_env;
    return {
      name: str(t, 'name', `[[tenants]] #${i + 1} name`),
      apiKeyEnv: str(t, 'api_key_env', `[[tenants]] #${i + 1} api_key_env`),
      ...(webhook === undefined ? {} : { webhookSecretEnv: str(t, 'webhook_secret_env', `[[tenants]] #${i + 1} webhook_secret_env`) }),
    };
  });
  if (orgs.length === 0) fail('no [[orgs]]');
  if (tenants.length === 0) fail('no [[tenants]]');

  // A name in both secrets would be read from whichever a process loads first.
  const workerFields = new Map<string, string>();
  orgs.forEach((o) => workerFields.set(o.apiKeyEnv, `org ${o.name}'s api_key_env`));
  tenants.forEach((t) => {
    if (t.webhookSecretEnv !== undefined) workerFields.set(t.webhookSecretEnv, `tenant ${t.name}'s webhook_secret_env`);
  });
  for (const t of tenants) {
    const other = workerFields.get(t.apiKeyEnv);
    if (other !== undefined) {
      fail(
        `tenant ${t.name}'s api_key_env ${JSON.stringify(t.apiKeyEnv)} is also ${other}: tenant keys go in the ` +
          'TenantKeys secret, org keys and webhook secrets in WorkerKeys, so the names must differ',
        lineOf(text, 'tenants', 'api_key_env', tenants.indexOf(t)),
      );
    }
  }

  const workers = table(doc.workers, 'workers');
  const calls = table(doc.calls, 'calls');
  const cfg: ConfigFile = {
    path: file,
    shownPath,
    text,
    orgs,
    tenants,
    concurrency: int(workers, 'concurrency', '[workers] concurrency', RUST_DEFAULTS.concurrency),
    visibilityTimeoutSecs: int(
      workers,
      'visibility_timeout_secs',
      '[workers] visibility_timeout_secs',
      RUST_DEFAULTS.visibilityTimeoutSecs,
    ),
    shutdownGraceSecs: int(workers, 'shutdown_grace_secs', '[workers] shutdown_grace_secs', RUST_DEFAULTS.shutdownGraceSecs),
    callsMaxWaitSecs: int(calls, 'max_wait_secs', '[calls] max_wait_secs', RUST_DEFAULTS.callsMaxWaitSecs),
    callsMaxWaitCapSecs: int(calls, 'max_wait_cap_secs', '[calls] max_wait_cap_secs', RUST_DEFAULTS.callsMaxWaitCapSecs),
  };

  // ---- what AWS can hold ----
  if (cfg.visibilityTimeoutSecs > MAX_VISIBILITY_TIMEOUT_SECS) {
    fail(
      `[workers] visibility_timeout_secs = ${cfg.visibilityTimeoutSecs}: it is the SQS queues' visibility timeout, ` +
        `at most ${MAX_VISIBILITY_TIMEOUT_SECS} (12 hours)`,
      lineOf(text, 'workers', 'visibility_timeout_secs'),
    );
  }
  if (cfg.shutdownGraceSecs > MAX_SHUTDOWN_GRACE_SECS) {
    fail(
      `[workers] shutdown_grace_secs = ${cfg.shutdownGraceSecs}: after SIGTERM a worker takes the ${SQS_LONG_POLL_SECS} s ` +
        `long poll in progress + the grace + ${HAND_BACK_SECS} s to hand back its jobs, which must fit ` +
        `${MAX_SIGTERM_TO_EXIT_SECS} s of Fargate's ${WORKER_STOP_TIMEOUT_SECS} s stop timeout (then SIGKILL): ` +
        `at most ${MAX_SHUTDOWN_GRACE_SECS}`,
      lineOf(text, 'workers', 'shutdown_grace_secs'),
    );
  }
  if (opts.calls) {
    const slowest = orgs.reduce((a, b) => (b.timeoutSecs > a.timeoutSecs ? b : a));
    const drain = callDrainSecs(cfg.callsMaxWaitCapSecs, slowest.timeoutSecs);
    if (drain > MAX_CALL_DRAIN_SECS) {
      const capLine = lineOf(text, 'calls', 'max_wait_cap_secs');
      const orgLine = lineOf(text, 'orgs', 'timeout_secs', orgs.indexOf(slowest));
      fail(
        `a call may last [calls] max_wait_cap_secs (${cfg.callsMaxWaitCapSecs} s) + org ${slowest.name}'s timeout_secs ` +
          `(${slowest.timeoutSecs} s) + ${CALL_MARGIN_SECS} s = ${drain} s, longer than the load balancer can hold it ` +
          `(idle timeout) and drain it from a stopping task (deregistration delay, at most ${MAX_CALL_DRAIN_SECS} s): ` +
          'lower either (or turn the calls endpoint off with -c ratepool:calls=false)',
        cfg.callsMaxWaitCapSecs >= slowest.timeoutSecs ? capLine ?? orgLine : orgLine ?? capLine,
      );
    }
  }
  return cfg;
}

/**
 * The line of `key` in `[table]` (or in the `index`th `[[table]]`), if the
 * file has it: for errors about values the checker accepts but AWS cannot
 * hold. A plain scan, enough for the keys it is asked about.
 */
export function lineOf(text: string, table: string, key: string, index?: number): number | undefined {
  const want = index === undefined ? table : `${table}#${index}`;
  const seen = new Map<string, number>();
  let current = '';
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const bare = lines[i].replace(/#.*$/, '');
    const array = /^\s*\[\[\s*([^\]]+?)\s*\]\]\s*$/.exec(bare);
    const plain = array ? null : /^\s*\[\s*([^\]]+?)\s*\]\s*$/.exec(bare);
    if (array) {
      const n = (seen.get(array[1]) ?? -1) + 1;
      seen.set(array[1], n);
      current = `${array[1]}#${n}`;
    } else if (plain) {
      current = plain[1];
    } else if (current === want && new RegExp(`^\\s*${key}\\s*=`).test(lines[i])) {
      return i + 1;
    }
  }
  return undefined;
}
