import { App, Stack, Validations } from 'aws-cdk-lib';
import { AwsSolutionsChecks } from 'cdk-nag';
import type { IConstruct } from 'constructs';
import { buildApp, Built, JOBS_ONLY, PLAIN_HTTP } from './helpers';

let built: Built;
beforeAll(() => {
  built = buildApp();
});
afterAll(() => built.cleanup());

interface Ack {
  readonly path: string;
  readonly id: string;
  readonly reason: string;
  readonly onStackOrApp: boolean;
}

/** Every cdk-nag acknowledgement recorded in the tree, with where it sits. */
function acknowledgements(app: App): Ack[] {
  return app.node.findAll().flatMap((c: IConstruct) =>
    c.node.metadata
      .filter((m) => m.type === Validations.ACKNOWLEDGED_RULES_METADATA_KEY)
      .flatMap((m) => Object.entries(m.data as Record<string, string>))
      .filter(([id]) => id.includes('AwsSolutions-'))
      .map(([id, reason]) => ({
        path: c.node.path,
        id: id.replace(/^Annotation::/, ''),
        reason,
        onStackOrApp: c instanceof Stack || c instanceof App,
      })),
  );
}

function findings(app: App): { rule: string; path: string }[] {
  const report = new AwsSolutionsChecks(app).validateScope(app);
  return report.violations.flatMap((v) => v.violatingResources.map((r) => ({ rule: v.ruleName, path: r.constructPath ?? '' })));
}

test('cdk-nag AwsSolutions: no unacknowledged finding, errors and warnings alike', () => {
  expect(findings(built.app)).toEqual([]);
});

test.each([
  ['the calls endpoint on plain HTTP (ratepool:allowHttp)', PLAIN_HTTP],
  ['no calls endpoint (ratepool:calls=false)', JOBS_ONLY],
])('cdk-nag AwsSolutions: no unacknowledged finding with %s either', (_, context) => {
  const other = buildApp(context);
  try {
    expect(findings(other.app)).toEqual([]);
  } finally {
    other.cleanup();
  }
});

test('every acknowledgement sits next to its resource and gives a real reason', () => {
  const acks = acknowledgements(built.app);
  expect(acks.length).toBeGreaterThan(0);
  for (const a of acks) {
    expect({ path: a.path, onStackOrApp: a.onStackOrApp }).toEqual({ path: a.path, onStackOrApp: false });
    expect(a.reason.length).toBeGreaterThanOrEqual(60);
    expect(a.reason).not.toMatch(/\b(TODO|TBD|fixme|not needed|ignore)\b/i);
  }
});

test('no stale acknowledgement: each one silences a finding that exists without it', () => {
  const spy = jest.spyOn(Validations.prototype, 'acknowledge').mockImplementation(() => undefined);
  let bare: Built | undefined;
  try {
    bare = buildApp();
    const raw = findings(bare.app);
    for (const a of acknowledgements(built.app)) {
      const silenced = raw.filter((f) => f.rule === a.id && (f.path === a.path || f.path.startsWith(`${a.path}/`)));
      expect({ ack: `${a.path} ${a.id}`, silences: silenced.length > 0 }).toEqual({ ack: `${a.path} ${a.id}`, silences: true });
    }
  } finally {
    spy.mockRestore();
    bare?.cleanup();
  }
});

test('synth with the plugin registered (as bin/ratepool.ts does) succeeds', () => {
  const withPlugin = buildApp({}, { nag: true });
  try {
    expect(() => withPlugin.app.synth()).not.toThrow();
  } finally {
    withPlugin.cleanup();
  }
});
