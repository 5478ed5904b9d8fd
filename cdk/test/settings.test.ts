import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { App } from 'aws-cdk-lib';
import { parse } from 'smol-toml';
import { renderConfigToml } from '../lib/config-toml';
import { loadSettings, Settings } from '../lib/settings';
import { buildApp, cdkJsonContext, JOBS_ONLY, PLACEHOLDER_ASSET, PLAIN_HTTP, TLS_CONTEXT } from './helpers';

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

const NAMES = {
  region: 'eu-west-1',
  jobsTable: 'Ratepool-JobsTable-1',
  ledgerTable: 'Ratepool-LedgerTable-2',
  interactiveQueue: 'Ratepool-InteractiveQueue-3',
  batchQueue: 'Ratepool-BatchQueue-4',
  deadLetterQueue: 'Ratepool-DeadLetterQueue-5',
  secretArn: 'arn:aws:secretsmanager:eu-west-1:111122223333:secret:Keys-AbCdEf',
  outputsBucket: 'ratepool-outputsbucket-6',
};

describe('settings from context', () => {
  test('cdk.json defaults: three orgs, one tenant, sizes', () => {
    const s = settingsWith({});
    expect(s.orgs.map((o) => o.name)).toEqual(['org-a', 'org-b', 'org-c']);
    expect(s.tenants).toEqual([{ name: 'screenplays', apiKeyEnv: 'TENANT_SCREENPLAYS_KEY' }]);
    expect(s.workerConcurrency).toBe(64);
    expect(s.visibilityTimeoutSecs).toBe(30);
    expect(s.minWorkers).toBe(1);
    expect(s.lambdaAsset).toMatch(/cdk\/test\/fixtures\/lambda-placeholder$/);
    expect(s.calls).toEqual({
      maxWaitSecs: 60,
      perTaskPerMinute: 3000,
      tls: { certificateArn: TLS_CONTEXT['ratepool:certificateArn'], domain: 'calls.example.test' },
    });
  });

  test('-c overrides arrive as strings and are parsed as JSON', () => {
    const s = settingsWith({
      'ratepool:maxWorkers': '25',
      'ratepool:orgs': JSON.stringify([
        { name: 'solo', baseUrl: 'https://example.test/v1', apiKeyEnv: 'SOLO_KEY', models: { 'gpt-4.1': { rpm: 5, tpm: 6 } } },
      ]),
      'ratepool:alarmEmail': 'ops@example.test',
    });
    expect(s.maxWorkers).toBe(25);
    expect(s.orgs).toEqual([
      { name: 'solo', baseUrl: 'https://example.test/v1', apiKeyEnv: 'SOLO_KEY', models: { 'gpt-4.1': { rpm: 5, tpm: 6 } } },
    ]);
    expect(s.alarmEmail).toBe('ops@example.test');
  });

  test('cdk.json alone does not synthesize: plain HTTP for the tenant keys must be chosen, not defaulted to', () => {
    expect(() => settingsWith({}, {})).toThrow(
      /context ratepool:certificateArn: the calls endpoint is internet-facing .*ratepool:callsDomain.*ratepool:allowHttp=true.*ratepool:calls=false/,
    );
  });

  test('ratepool:allowHttp=true: the calls endpoint without TLS', () => {
    expect(settingsWith({}, PLAIN_HTTP).calls).toEqual({ maxWaitSecs: 60, perTaskPerMinute: 3000 });
  });

  test('ratepool:calls=false: no calls endpoint, and workers may scale to zero', () => {
    const s = settingsWith(JOBS_ONLY, {});
    expect(s.calls).toBeUndefined();
    expect(s.minWorkers).toBe(0);
  });

  test('ratepool:callsMaxWaitSecs up to what the load balancer can hold and drain: 3600 - 120 - 30', () => {
    expect(settingsWith({ 'ratepool:callsMaxWaitSecs': '3450' }).calls?.maxWaitSecs).toBe(3450);
    expect(() => settingsWith({ 'ratepool:callsMaxWaitSecs': 3451 })).toThrow(
      'context ratepool:callsMaxWaitSecs: 3451 s lets a call last 3601 s (+ 120 s provider timeout + 30 s margin), ' +
        'longer than the load balancer can hold it (idle timeout, at most 4000 s) and drain it from a stopping task ' +
        '(deregistration delay, at most 3600 s): at most 3450',
    );
  });

  test.each([
    [{ 'ratepool:orgs': [] }, /ratepool:orgs: at least one org/],
    [{ 'ratepool:orgs': [{ name: 'bad name', baseUrl: 'https://x', apiKeyEnv: 'K', models: { m: { rpm: 1, tpm: 1 } } }] }, /orgs\[0\]\.name/],
    [{ 'ratepool:orgs': [{ name: 'a', baseUrl: 'https://x', apiKeyEnv: 'lower', models: { m: { rpm: 1, tpm: 1 } } }] }, /orgs\[0\]\.apiKeyEnv/],
    [{ 'ratepool:orgs': [{ name: 'a', baseUrl: 'https://x', apiKeyEnv: 'K', models: { m: { rpm: 0, tpm: 1 } } }] }, /orgs\[0\]\.models\.m\.rpm/],
    [{ 'ratepool:tenants': [{ name: 't', apiKeyEnv: 'ORG_A_KEY' }] }, /apiKeyEnv "ORG_A_KEY" appears twice/],
    [{ 'ratepool:maxWorkers': 'ten' }, /ratepool:maxWorkers: expected an integer/],
    [{ 'ratepool:minWorkers': 5, 'ratepool:maxWorkers': 2 }, /ratepool:maxWorkers/],
    [{ 'ratepool:lambdaAsset': 'no/such/dir' }, /make lambda-bundle/],
    [{ 'ratepool:alarmEmail': 'not-an-address' }, /ratepool:alarmEmail/],
    [{ 'ratepool:minWorkers': 0 }, /ratepool:minWorkers: the calls endpoint \(ratepool:calls\) needs a running task/],
    [{ 'ratepool:calls': 'yes' }, /ratepool:calls: expected true or false/],
    [{ 'ratepool:callsMaxWaitSecs': 0 }, /ratepool:callsMaxWaitSecs: expected an integer/],
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
  test('parses to the [aws] config the Rust side reads', () => {
    const toml = parse(renderConfigToml(settingsWith({}), NAMES));
    expect(Object.keys(toml).sort()).toEqual(['aws', 'calls', 'orgs', 'storage', 'tenants', 'workers']);
    expect(toml.storage).toEqual({ backend: 'aws' });
    expect(toml.aws).toEqual({
      region: 'eu-west-1',
      jobs_table: NAMES.jobsTable,
      ledger_table: NAMES.ledgerTable,
      interactive_queue: NAMES.interactiveQueue,
      batch_queue: NAMES.batchQueue,
      dead_letter_queue: NAMES.deadLetterQueue,
      metrics_namespace: 'Ratepool',
      secret_arn: NAMES.secretArn,
      retention_days: 30,
      outputs_bucket: NAMES.outputsBucket,
    });
    expect(toml.workers).toEqual({ concurrency: 64, visibility_timeout_secs: 30, shutdown_grace_secs: 70 });
    expect(toml.calls).toEqual({ max_wait_secs: 60 });
    expect(toml.orgs).toEqual(
      ['a', 'b', 'c'].map((x) => ({
        name: `org-${x}`,
        base_url: 'https://api.openai.com/v1',
        api_key_env: `ORG_${x.toUpperCase()}_KEY`,
        timeout_secs: 120,
        models: { 'gpt-4o-mini': { rpm: 10000, tpm: 10000000 } },
      })),
    );
    expect(toml.tenants).toEqual([{ name: 'screenplays', api_key_env: 'TENANT_SCREENPLAYS_KEY' }]);
  });

  test('[calls] max_wait_secs from ratepool:callsMaxWaitSecs; no [calls] without the endpoint', () => {
    expect((parse(renderConfigToml(settingsWith({ 'ratepool:callsMaxWaitSecs': 300 }), NAMES)) as any).calls).toEqual({
      max_wait_secs: 300,
    });
    expect(parse(renderConfigToml(settingsWith(JOBS_ONLY, {}), NAMES))).not.toHaveProperty('calls');
  });

  // The Rust side parses the same files (src/config.rs, test
  // `the_cdk_apps_rendered_configs_parse`): a setting the worker does not
  // know fails there, not in a deployed task. UPDATE_FIXTURES=1 rewrites them.
  test.each([
    ['calls.toml', {}, TLS_CONTEXT],
    ['jobs-only.toml', {}, JOBS_ONLY],
  ])('renders the fixture %s', (file, overrides, base) => {
    const fixture = path.join(__dirname, 'fixtures', 'config', file);
    const rendered = renderConfigToml(settingsWith(overrides, base), NAMES);
    if (process.env.UPDATE_FIXTURES === '1') fs.writeFileSync(fixture, rendered);
    expect(rendered).toBe(fs.readFileSync(fixture, 'utf8'));
  });

  test('escapes what TOML needs escaped', () => {
    const s = settingsWith({
      'ratepool:orgs': [
        { name: 'o', baseUrl: 'https://x.test/v1?a="b"\\c', apiKeyEnv: 'O_KEY', models: { 'ft:gpt-4o:acme.v2': { rpm: 1, tpm: 2 } } },
      ],
    });
    const toml = parse(renderConfigToml(s, NAMES)) as any;
    expect(toml.orgs[0].base_url).toBe('https://x.test/v1?a="b"\\c');
    expect(toml.orgs[0].models).toEqual({ 'ft:gpt-4o:acme.v2': { rpm: 1, tpm: 2 } });
  });

  test('a config too large for the Lambda environment stops synth', () => {
    const models = Object.fromEntries(Array.from({ length: 12 }, (_, i) => [`model-${i}`, { rpm: 1, tpm: 1 }]));
    const orgs = Array.from({ length: 12 }, (_, i) => ({
      name: `org-${i}`,
      baseUrl: 'https://api.openai.com/v1',
      apiKeyEnv: `ORG_${i}_KEY`,
      models,
    }));
    expect(() => buildApp({ 'ratepool:orgs': orgs })).toThrow(/over Lambda's 4096-byte environment limit/);
  });
});
