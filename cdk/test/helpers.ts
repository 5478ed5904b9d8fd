/**
 * Builds the app exactly as `cdk synth` does (cdk.json context, the same
 * stacks), with the placeholder Lambda bundle, the calls endpoint's TLS
 * settings and a temp outdir per app.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { App } from 'aws-cdk-lib';
import { Template } from 'aws-cdk-lib/assertions';
import { defineApp, RatepoolApp } from '../lib/app';
import { cdkDir, repoRoot } from '../lib/settings';

export const PLACEHOLDER_ASSET = 'cdk/test/fixtures/lambda-placeholder';

/**
 * The calls endpoint's TLS settings of a production stack. cdk.json has none
 * (synth refuses without them or `ratepool:allowHttp`); the ARN is never
 * looked up at synth.
 */
export const TLS_CONTEXT = {
  'ratepool:certificateArn': 'arn:aws:acm:eu-west-1:111122223333:certificate/0d6c1ec5-5b2e-4a55-a6e7-0123456789ab',
  'ratepool:callsDomain': 'calls.example.test',
};

/** A dev stack: the calls endpoint on plain HTTP. */
export const PLAIN_HTTP = { 'ratepool:certificateArn': '', 'ratepool:callsDomain': '', 'ratepool:allowHttp': true };

/** A jobs-only stack: no calls endpoint, workers scale from zero. */
export const JOBS_ONLY = {
  'ratepool:calls': false,
  'ratepool:minWorkers': 0,
  'ratepool:certificateArn': '',
  'ratepool:callsDomain': '',
};

/** The production config file cdk.json names (ratepool:configFile). */
export const EXAMPLE_CONFIG = 'examples/aws.toml';

/** The text of a config file relative to the repository root. */
export function configText(file: string = EXAMPLE_CONFIG): string {
  return fs.readFileSync(path.join(repoRoot(), file), 'utf8');
}

/**
 * Writes `text` to a temporary config file and returns its absolute path (a
 * `ratepool:configFile` value); the files go with the process's temp dir.
 */
export function tempConfig(text: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ratepool-cdk-config-'));
  const file = path.join(dir, 'config.toml');
  fs.writeFileSync(file, text);
  return file;
}

/** `ratepool:configFile` pointing at the example with `edit` applied to its text. */
export function editedExample(edit: (text: string) => string): { 'ratepool:configFile': string } {
  const before = configText();
  const after = edit(before);
  if (after === before) throw new Error('the edit changed nothing: the example config has changed under the test');
  return { 'ratepool:configFile': tempConfig(after) };
}

/** The `context` of cdk.json: the defaults every deployment starts from. */
export function cdkJsonContext(): Record<string, unknown> {
  return JSON.parse(fs.readFileSync(path.join(cdkDir(), 'cdk.json'), 'utf8')).context;
}

export interface Built extends RatepoolApp {
  readonly app: App;
  readonly outdir: string;
  /** Removes the staged assets; call from afterAll. */
  cleanup(): void;
}

export function buildApp(overrides: Record<string, unknown> = {}, opts: { nag?: boolean } = {}): Built {
  const outdir = fs.mkdtempSync(path.join(os.tmpdir(), 'ratepool-cdk-test-'));
  const app = new App({
    outdir,
    context: { ...cdkJsonContext(), 'ratepool:lambdaAsset': PLACEHOLDER_ASSET, ...TLS_CONTEXT, ...overrides },
    // The built-in CloudFormation rules take ~4 s per synth; `cdk synth` in
    // scripts/check.sh runs them (as errors) once, cfn-lint after it.
    builtinCloudFormationValidation: false,
  });
  const cleanup = () => fs.rmSync(outdir, { recursive: true, force: true });
  try {
    return { app, outdir, ...defineApp(app, { nag: opts.nag ?? false }), cleanup };
  } catch (e) {
    cleanup();
    throw e;
  }
}

/** One synth shared by a test file. */
export function templates(built: Built): { main: Template; keys: Template } {
  return { main: Template.fromStack(built.main), keys: Template.fromStack(built.keys) };
}

/** `Fn::Join`-ed strings with their tokens shown as `<Ref:Id>` / `<GetAtt:Id.Attr>` / `<Select:i:<Split:/:...>>`. */
export function flatten(v: unknown): string {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object') {
    const o = v as Record<string, unknown>;
    if ('Fn::Join' in o) {
      const [sep, parts] = o['Fn::Join'] as [string, unknown[]];
      return parts.map(flatten).join(sep);
    }
    if ('Ref' in o) return `<Ref:${o.Ref}>`;
    if ('Fn::GetAtt' in o) return `<GetAtt:${(o['Fn::GetAtt'] as string[]).join('.')}>`;
    if ('Fn::Select' in o) {
      const [index, list] = o['Fn::Select'] as [number, unknown];
      return `<Select:${index}:${flatten(list)}>`;
    }
    if ('Fn::Split' in o) {
      const [sep, source] = o['Fn::Split'] as [string, unknown];
      return `<Split:${sep}:${flatten(source)}>`;
    }
    if ('Fn::GetStackOutput' in o) return `<StackOutput:${(o['Fn::GetStackOutput'] as { OutputName: string }).OutputName}>`;
    if ('Fn::ImportValue' in o) return `<Import:${JSON.stringify(o['Fn::ImportValue'])}>`;
  }
  return JSON.stringify(v);
}

/** The only resource of a type, among those `which` picks (fails the test when there are more or none). */
export function only(
  t: Template,
  type: string,
  which: (resource: Record<string, any>) => boolean = () => true,
): { id: string; props: Record<string, any>; resource: Record<string, any> } {
  const found = Object.entries(t.findResources(type)).filter(([, r]) => which(r));
  if (found.length !== 1) throw new Error(`expected one ${type}, found ${found.length}`);
  const [id, resource] = found[0];
  return { id, props: resource.Properties ?? {}, resource };
}

/** The logical id of a resource whose id starts with `prefix`. */
export function logicalId(t: Template, type: string, prefix: string): string {
  const ids = Object.keys(t.findResources(type)).filter((id) => id.startsWith(prefix));
  if (ids.length !== 1) throw new Error(`expected one ${type} starting ${prefix}, found ${ids.join(', ') || 'none'}`);
  return ids[0];
}
