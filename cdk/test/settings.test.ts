import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { App } from 'aws-cdk-lib';
import { parse } from 'smol-toml';
import { lineOf, ratepoolBinary } from '../lib/config-file';
import { renderConfigToml, stackParts } from '../lib/config-toml';
import { loadSettings, repoRoot, Settings } from '../lib/settings';
import {
  buildApp,
  cdkJsonContext,
  configText,
  editedExample,
  JOBS_ONLY,
  PLACEHOLDER_ASSET,
  PLAIN_HTTP,
  tempConfig,
  TLS_CONTEXT,
} from './helpers';

/** cdk.json's context with the placeholder bundle, the TLS settings and `overrides`. */
function settingsWith(overrides: Record<string, unknown>, base: Record<string, unknown> = TLS_CONTEXT): Settings {
  // An App without an outdir leaves a fresh cdk.out* temp dir behind.
  const outdir = fs.mkdtempSync(path.join(os.tmpdir(), 'ratepool-cdk-settings-'));
  try {
    const app = new App({
      outdir,
      context: { ...cdkJsonContext(), 'ratepool:lambdaAsset': PLACEHOLDER_ASSET, ...base, ...overrides },
    });
    return loadSettings(app.node);
  } finally {
    fs.rmSync(outdir, { recursive: true, force: true });
  }
}

/** The 1-based line of the `n`th (0-based) line of `text` matching `re`. */
function lineMatching(text: string, re: RegExp, n = 0): number {
  const lines = text.split('\n').map((l, i) => [l, i + 1] as const).filter(([l]) => re.test(l));
  if (lines.length <= n) throw new Error(`no line ${re} #${n}`);
  return lines[n][1];
}

const NAMES = {
  region: 'eu-west-1',
  jobsTable: 'Ratepool-JobsTable-1',
  ledgerTable: 'Ratepool-LedgerTable-2',
  interactiveQueue: 'Ratepool-InteractiveQueue-3',
  batchQueue: 'Ratepool-BatchQueue-4',
  deadLetterQueue: 'Ratepool-DeadLetterQueue-5',
  tenantKeysSecretArn: 'arn:aws:secretsmanager:eu-west-1:111122223333:secret:TenantKeys-AbCdEf',
  workerKeysSecretArn: 'arn:aws:secretsmanager:eu-west-1:111122223333:secret:WorkerKeys-GhIjKl',
  outputsBucket: 'ratepool-outputsbucket-6',
};

const MINIMAL = `[[orgs]]
name = "solo"
api_key_env = "SOLO_KEY"
[orgs.models."gpt-4.1"]
rpm = 5
tpm = 6

[[tenants]]
name = "t"
api_key_env = "T_KEY"
`;

describe('the config file (ratepool:configFile)', () => {
  test('cdk.json: examples/aws.toml, four orgs (one fallback), one tenant with a webhook secret', () => {
    const s = settingsWith({});
    expect(s.configFile.shownPath).toBe('examples/aws.toml');
    expect(s.configFile.text).toBe(configText());
    expect(s.orgs).toEqual([
      { name: 'org-a', apiKeyEnv: 'ORG_A_KEY', timeoutSecs: 120, fallback: false },
      { name: 'org-b', apiKeyEnv: 'ORG_B_KEY', timeoutSecs: 120, fallback: false },
      { name: 'org-c', apiKeyEnv: 'ORG_C_KEY', timeoutSecs: 120, fallback: false },
      { name: 'org-overflow', apiKeyEnv: 'ORG_OVERFLOW_KEY', timeoutSecs: 120, fallback: true },
    ]);
    expect(s.tenants).toEqual([
      {
        name: 'screenplays',
        apiKeyEnv: 'TENANT_SCREENPLAYS_KEY',
        webhookSecretEnv: 'SCREENPLAYS_WEBHOOK_SECRET',
        throttle: { rateLimit: 50, burstLimit: 100 },
      },
    ]);
    expect(s.workerConcurrency).toBe(64);
    expect(s.visibilityTimeoutSecs).toBe(30);
    expect(s.configFile.shutdownGraceSecs).toBe(70);
    expect(s.configFile.callsMaxWaitSecs).toBe(60);
    expect(s.minWorkers).toBe(1);
    expect(s.lambdaAsset).toMatch(/cdk\/test\/fixtures\/lambda-placeholder$/);
    // [calls] max_wait_cap_secs 300 + timeout_secs 120 + 30 s margin.
    expect(s.calls).toEqual({
      drainSecs: 450,
      perTaskPerMinute: 3000,
      tls: { certificateArn: TLS_CONTEXT['ratepool:certificateArn'], domain: 'calls.example.test' },
    });
  });

  test('the example carries every feature: quotas, webhooks, a fallback org, the calls endpoint, priorities, the cache', () => {
    const cfg = parse(configText()) as any;
    expect(cfg.tenants[0].quota).toEqual(expect.objectContaining({ tokens_per_day: expect.any(Number), jobs_in_flight: expect.any(Number) }));
    expect(cfg.tenants[0].webhook_secret_env).toBe('SCREENPLAYS_WEBHOOK_SECRET');
    expect(cfg.orgs.filter((o: any) => o.fallback)).toHaveLength(1);
    expect(cfg.calls.max_wait_secs).toBe(60);
    expect(cfg.workers).toEqual(
      expect.objectContaining({ concurrency: 64, visibility_timeout_secs: 30, shutdown_grace_secs: 70, interactive_weight: 3 }),
    );
    expect(cfg.workers.cache_ttl_secs).toBeGreaterThan(0);
    expect(cfg.webhooks).toBeDefined();
    expect(cfg.orgs.every((o: any) => o.timeout_secs === 120)).toBe(true);
  });

  test('what the file leaves out takes the worker\'s defaults (src/config.rs)', () => {
    const s = settingsWith({ 'ratepool:configFile': tempConfig(MINIMAL) });
    expect(s.orgs).toEqual([{ name: 'solo', apiKeyEnv: 'SOLO_KEY', timeoutSecs: 120, fallback: false }]);
    expect(s.tenants).toEqual([{ name: 't', apiKeyEnv: 'T_KEY', throttle: { rateLimit: 50, burstLimit: 100 } }]);
    expect(s.workerConcurrency).toBe(64);
    expect(s.visibilityTimeoutSecs).toBe(30);
    expect(s.configFile.shutdownGraceSecs).toBe(10);
    expect(s.configFile.callsMaxWaitCapSecs).toBe(300);
    expect(s.calls?.drainSecs).toBe(450);
  });

  test('a path relative to the repository root, as -c gives it', () => {
    const s = settingsWith({ 'ratepool:configFile': 'cdk/test/fixtures/config/jobs-only.input.toml' }, JOBS_ONLY);
    expect(s.configFile.shownPath).toBe('cdk/test/fixtures/config/jobs-only.input.toml');
    expect(s.orgs.map((o) => o.name)).toEqual(['org-a', 'org-b', 'org-c']);
  });

  test('a file that does not exist', () => {
    expect(() => settingsWith({ 'ratepool:configFile': 'no/such.toml' })).toThrow(/^config file no\/such\.toml: cannot read it/);
  });

  test('a mistake stops synth with the file, the line and the checker\'s reason', () => {
    // The second org named like the first: `ratepool config check` names that line.
    const edit = editedExample((t) => t.replace('name = "org-b"', 'name = "org-a"'));
    const line = lineMatching(configText(), /^name = "org-b"$/);
    expect(() => settingsWith(edit)).toThrow(
      new RegExp(`^config file ${edit['ratepool:configFile'].replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: line ${line}: duplicate org name "org-a"`),
    );
  });

  test('so does a TOML mistake, in a whole synth: its line, the reason, then the line shown', () => {
    const edit = editedExample((t) => t.replace('rpm = 5000', 'rpm = lots'));
    const line = lineMatching(configText(), /^rpm = 5000$/);
    expect(() => buildApp(edit)).toThrow(
      new RegExp(`^config file .*config\\.toml: line ${line}: string values must be quoted.* \\(column 7\\)\n.*\n${line} \\| rpm = lots`),
    );
  });

  test.each([
    ['[storage]\nbackend = "sqlite"\n', 'storage'],
    ['[aws]\nregion = "eu-west-1"\n', 'aws'],
    ['[aws.x]\ny = 1\n', 'aws'],
    ['aws.region = "eu-west-1"\n', 'aws'],
  ])('[storage] and [aws] are the stack\'s: %j is refused on its line', (part, table) => {
    const text = `# a comment\n${part}\n${MINIMAL}`;
    expect(() => settingsWith({ 'ratepool:configFile': tempConfig(text) })).toThrow(
      new RegExp(`: line 2: \\[${table}\\] is the stack's: .*remove it from the file`),
    );
  });

  test('a key of another table named like one is not refused', () => {
    const text = MINIMAL.replace('[[tenants]]', '[webhooks]\nallow_private = false\n\n[[tenants]]');
    expect(() => settingsWith({ 'ratepool:configFile': tempConfig(text) })).not.toThrow();
  });

  test('shutdown_grace_secs must fit the stop timeout: 20 s poll + grace + 10 s hand-back <= 100 s', () => {
    const edit = editedExample((t) => t.replace('shutdown_grace_secs = 70', 'shutdown_grace_secs = 71'));
    const line = lineMatching(configText(), /^shutdown_grace_secs = 70/);
    expect(() => settingsWith(edit)).toThrow(
      new RegExp(`: line ${line}: \\[workers\\] shutdown_grace_secs = 71: .*Fargate's 120 s stop timeout .*at most 70$`),
    );
  });

  test('visibility_timeout_secs within SQS\'s 12 hours', () => {
    const edit = editedExample((t) => t.replace('visibility_timeout_secs = 30', 'visibility_timeout_secs = 43201'));
    expect(() => settingsWith(edit)).toThrow(/\[workers\] visibility_timeout_secs = 43201: .*at most 43200 \(12 hours\)/);
  });

  test('the longest call (max_wait_cap_secs + the slowest org\'s timeout_secs + 30 s) must fit the load balancer', () => {
    const ok = editedExample((t) => t.replace('max_wait_cap_secs = 300', 'max_wait_cap_secs = 3450'));
    expect(settingsWith(ok).calls?.drainSecs).toBe(3600);
    const tooLong = editedExample((t) => t.replace('max_wait_cap_secs = 300', 'max_wait_cap_secs = 3451'));
    const line = lineMatching(configText(), /^max_wait_cap_secs = 300/);
    expect(() => settingsWith(tooLong)).toThrow(
      `line ${line}: a call may last [calls] max_wait_cap_secs (3451 s) + org org-a's timeout_secs (120 s) + 30 s = 3601 s, ` +
        'longer than the load balancer can hold it (idle timeout) and drain it from a stopping task ' +
        '(deregistration delay, at most 3600 s): lower either (or turn the calls endpoint off with -c ratepool:calls=false)',
    );
    // Without the endpoint no load balancer holds calls.
    expect(() => settingsWith(tooLong, JOBS_ONLY)).not.toThrow();
  });

  test('a slow org names its own timeout_secs line', () => {
    const text = configText().replace(/(name = "org-c"[\s\S]*?timeout_secs = )120/, '$13500');
    const org = lineOf(text, 'orgs', 'timeout_secs', 2);
    expect(org).toBeDefined();
    expect(() => settingsWith({ 'ratepool:configFile': tempConfig(text) })).toThrow(
      new RegExp(`: line ${org}: a call may last .* org org-c's timeout_secs \\(3500 s\\)`),
    );
  });

  test('a tenant key name that is also an org key or webhook secret name is refused (they are in different secrets)', () => {
    const edit = editedExample((t) => t.replace('api_key_env = "TENANT_SCREENPLAYS_KEY"', 'api_key_env = "SCREENPLAYS_WEBHOOK_SECRET"'));
    expect(() => settingsWith(edit)).toThrow(/tenant screenplays's api_key_env "SCREENPLAYS_WEBHOOK_SECRET" is also tenant screenplays's webhook_secret_env/);
  });

  test.each(['orgs', 'tenants', 'workerConcurrency', 'visibilityTimeoutSecs', 'callsMaxWaitSecs'])(
    'the old context key ratepool:%s is refused, naming where it went',
    (key) => {
      expect(() => settingsWith({ [`ratepool:${key}`]: 1 })).toThrow(
        new RegExp(`^context ratepool:${key}: is no longer a setting: it is .* in the config file \\(ratepool:configFile\\)`),
      );
    },
  );
});

describe('config check binary', () => {
  const saved = process.env.RATEPOOL_BIN;
  afterEach(() => {
    if (saved === undefined) delete process.env.RATEPOOL_BIN;
    else process.env.RATEPOOL_BIN = saved;
  });

  test('RATEPOOL_BIN, else the newer of target/release and target/debug', () => {
    process.env.RATEPOOL_BIN = process.execPath;
    expect(ratepoolBinary('/nowhere')).toBe(process.execPath);
    process.env.RATEPOOL_BIN = '/no/such/ratepool';
    expect(() => ratepoolBinary('/nowhere')).toThrow(/^RATEPOOL_BIN=\/no\/such\/ratepool does not exist: run `cargo build --release`/);
    delete process.env.RATEPOOL_BIN;
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'ratepool-root-'));
    try {
      expect(() => ratepoolBinary(root)).toThrow(/no ratepool binary .*run `cargo build --release`/);
      for (const [p, mtime] of [['release', 2000], ['debug', 1000]] as const) {
        fs.mkdirSync(path.join(root, 'target', p), { recursive: true });
        fs.writeFileSync(path.join(root, 'target', p, 'ratepool'), '');
        fs.utimesSync(path.join(root, 'target', p, 'ratepool'), mtime, mtime);
      }
      expect(ratepoolBinary(root)).toBe(path.join(root, 'target', 'release', 'ratepool'));
      fs.utimesSync(path.join(root, 'target', 'debug', 'ratepool'), 3000, 3000);
      expect(ratepoolBinary(root)).toBe(path.join(root, 'target', 'debug', 'ratepool'));
    } finally {
      fs.rmSync(root, { recursive: true, force: true });
    }
  });

  test('a binary without `config check` stops synth saying to rebuild it', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ratepool-oldbin-'));
    const bin = path.join(dir, 'ratepool');
    fs.writeFileSync(bin, "#!/bin/sh\necho \"error: unrecognized subcommand 'config'\" >&2\nexit 2\n", { mode: 0o755 });
    process.env.RATEPOOL_BIN = bin;
    try {
      expect(() => settingsWith({})).toThrow(/config check examples\/aws\.toml failed without a config error \(exit 2\): .*Rebuild it/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  test('the real binary accepts the example', () => {
    expect(fs.existsSync(ratepoolBinary(repoRoot()))).toBe(true);
  });
});

describe('settings from context', () => {
  test('-c overrides arrive as strings and are parsed as JSON', () => {
    const s = settingsWith({
      'ratepool:maxWorkers': '25',
      'ratepool:alarmEmail': 'ops@example.test',
      'ratepool:tenantThrottles': JSON.stringify({ screenplays: { rateLimit: 5, burstLimit: 10 } }),
    });
    expect(s.maxWorkers).toBe(25);
    expect(s.alarmEmail).toBe('ops@example.test');
    expect(s.tenants[0].throttle).toEqual({ rateLimit: 5, burstLimit: 10 });
  });

  test('tenant throttle defaults from ratepool:tenantRateLimit / tenantBurstLimit', () => {
    const s = settingsWith({ 'ratepool:tenantRateLimit': 7, 'ratepool:tenantBurstLimit': 9 });
    expect(s.tenants.map((t) => t.throttle)).toEqual([{ rateLimit: 7, burstLimit: 9 }]);
  });

  test('cdk.json alone does not synthesize: plain HTTP for the tenant keys must be chosen, not defaulted to', () => {
    expect(() => settingsWith({}, {})).toThrow(
      /context ratepool:certificateArn: the calls endpoint is internet-facing .*ratepool:callsDomain.*ratepool:allowHttp=true.*ratepool:calls=false/,
    );
  });

  test('ratepool:allowHttp=true: the calls endpoint without TLS', () => {
    expect(settingsWith({}, PLAIN_HTTP).calls).toEqual({ drainSecs: 450, perTaskPerMinute: 3000 });
  });

  test('ratepool:calls=false: no calls endpoint, and workers may scale to zero', () => {
    const s = settingsWith(JOBS_ONLY, {});
    expect(s.calls).toBeUndefined();
    expect(s.minWorkers).toBe(0);
  });

  test.each([
    [{ 'ratepool:maxWorkers': 'ten' }, /ratepool:maxWorkers: expected an integer/],
    [{ 'ratepool:minWorkers': 5, 'ratepool:maxWorkers': 2 }, /ratepool:maxWorkers/],
    [{ 'ratepool:lambdaAsset': 'no/such/dir' }, /make lambda-bundle/],
    [{ 'ratepool:alarmEmail': 'not-an-address' }, /ratepool:alarmEmail/],
    [{ 'ratepool:configFile': 7 }, /ratepool:configFile: expected the path of a ratepool config file/],
    [{ 'ratepool:tenantRateLimit': 0 }, /ratepool:tenantRateLimit: expected an integer in 1\.\.10000/],
    [{ 'ratepool:tenantBurstLimit': 5001 }, /ratepool:tenantBurstLimit: expected an integer in 1\.\.5000/],
    [{ 'ratepool:tenantThrottles': [] }, /ratepool:tenantThrottles: expected a JSON object/],
    [{ 'ratepool:tenantThrottles': { nobody: { rateLimit: 1, burstLimit: 1 } } }, /ratepool:tenantThrottles\.nobody: no such tenant in examples\/aws\.toml \(tenants: screenplays\)/],
    [{ 'ratepool:tenantThrottles': { screenplays: { rateLimit: 1 } } }, /ratepool:tenantThrottles\.screenplays\.burstLimit: expected an integer/],
    [{ 'ratepool:minWorkers': 0 }, /ratepool:minWorkers: the calls endpoint \(ratepool:calls\) needs a running task/],
    [{ 'ratepool:calls': 'yes' }, /ratepool:calls: expected true or false/],
    [{ 'ratepool:callsPerTaskPerMinute': 0 }, /ratepool:callsPerTaskPerMinute: expected an integer/],
    [{ 'ratepool:certificateArn': 'calls.example.test' }, /ratepool:certificateArn: expected an ACM certificate ARN/],
    [{ 'ratepool:callsDomain': 'https://calls.example.test' }, /ratepool:callsDomain: expected a lowercase DNS hostname/],
    [{ 'ratepool:callsDomain': '' }, /ratepool:callsDomain: needed with ratepool:certificateArn/],
    [{ 'ratepool:certificateArn': '' }, /ratepool:certificateArn: needed with ratepool:callsDomain/],
    [{ 'ratepool:allowHttp': true }, /ratepool:allowHttp: must be false with a certificate/],
    [{ ...JOBS_ONLY, 'ratepool:certificateArn': TLS_CONTEXT['ratepool:certificateArn'] }, /ratepool:certificateArn: has no use with ratepool:calls=false/],
    [{ ...JOBS_ONLY, 'ratepool:callsDomain': 'calls.example.test' }, /ratepool:callsDomain: has no use with ratepool:calls=false/],
    [{ ...JOBS_ONLY, 'ratepool:allowHttp': true }, /ratepool:allowHttp: has no use with ratepool:calls=false/],
  ])('refuses %j', (overrides, message) => {
    expect(() => settingsWith(overrides)).toThrow(message);
  });
});

describe('RATEPOOL_CONFIG_TOML', () => {
  test('the config file verbatim, a blank line, then [storage] and [aws]', () => {
    const text = configText();
    const rendered = renderConfigToml(text, NAMES);
    expect(rendered).toBe(`${text}\n${stackParts(NAMES)}`);
    expect(stackParts(NAMES)).toBe(
      [
        '[storage]',
        'backend = "aws"',
        '',
        '[aws]',
        'region = "eu-west-1"',
        'jobs_table = "Ratepool-JobsTable-1"',
        'ledger_table = "Ratepool-LedgerTable-2"',
        'interactive_queue = "Ratepool-InteractiveQueue-3"',
        'batch_queue = "Ratepool-BatchQueue-4"',
        'dead_letter_queue = "Ratepool-DeadLetterQueue-5"',
        'metrics_namespace = "Ratepool"',
        'retention_days = 30',
        'outputs_bucket = "ratepool-outputsbucket-6"',
        `tenant_keys_secret_arn = "${NAMES.tenantKeysSecretArn}"`,
        `worker_keys_secret_arn = "${NAMES.workerKeysSecretArn}"`,
        '',
      ].join('\n'),
    );
    const toml = parse(rendered) as any;
    expect(toml.storage).toEqual({ backend: 'aws' });
    expect(Object.keys(toml).sort()).toEqual(['aws', 'calls', 'limits', 'orgs', 'storage', 'tenants', 'webhooks', 'workers']);
  });

  test('a file without a final newline still ends its last line before the stack\'s parts', () => {
    expect(renderConfigToml('a = 1', NAMES)).toBe(`a = 1\n\n${stackParts(NAMES)}`);
  });

  test('escapes what TOML needs escaped in plain names', () => {
    const toml = parse(renderConfigToml('', { ...NAMES, jobsTable: 'a"b\\c' })) as any;
    expect(toml.aws.jobs_table).toBe('a"b\\c');
  });

  // The Rust side parses the same files (src/config.rs, test
  // `the_cdk_apps_rendered_configs_parse`): a setting the worker does not
  // know fails there, not in a deployed task. UPDATE_FIXTURES=1 rewrites them.
  test.each([
    ['calls.toml', 'examples/aws.toml'],
    ['jobs-only.toml', 'cdk/test/fixtures/config/jobs-only.input.toml'],
  ])('renders the fixture %s from %s', (fixtureName, input) => {
    const fixture = path.join(__dirname, 'fixtures', 'config', fixtureName);
    const rendered = renderConfigToml(configText(input), NAMES);
    if (process.env.UPDATE_FIXTURES === '1') fs.writeFileSync(fixture, rendered);
    expect(rendered).toBe(fs.readFileSync(fixture, 'utf8'));
  });

  test('a config too large for the Lambda environment stops synth, naming the file and what to trim', () => {
    const padded = `${configText()}\n${'# a long comment\n'.repeat(100)}`;
    expect(() => buildApp({ 'ratepool:configFile': tempConfig(padded) })).toThrow(
      /^config file .*config\.toml: \d+ bytes, .* over Lambda's 4096-byte limit: trim \d+ bytes \(comments first\), or split the deployment/,
    );
  });
});
