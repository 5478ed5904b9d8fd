/**
 * The app's stacks, wired the same way for `cdk synth`/`deploy` and the tests.
 */
import { App, Validations } from 'aws-cdk-lib';
import { AwsSolutionsChecks } from 'cdk-nag';
import { KeysStack } from './keys-stack';
import { RatepoolStack } from './ratepool-stack';
import { loadSettings } from './settings';

export interface RatepoolApp {
  readonly keys: KeysStack;
  readonly main: RatepoolStack;
}

/**
 * No `env` on the stacks: an account or region would make synth look up
 * availability zones, which needs credentials. The region comes from the
 * deploy's credentials.
 */
export function defineApp(app: App, opts: { nag: boolean }): RatepoolApp {
  const settings = loadSettings(app.node);
  const keys = new KeysStack(app, 'RatepoolKeys', {
    settings,
    description: 'ratepool keys: tenant API keys, org keys and webhook secrets (deploy and fill before the Ratepool stack)',
  });
  const main = new RatepoolStack(app, 'Ratepool', {
    settings,
    tenantKeys: keys.tenantKeys,
    workerKeys: keys.workerKeys,
    description: 'ratepool: API Gateway with a tenant authorizer, Lambda, SQS, DynamoDB, Fargate workers, dashboard and alarms',
  });
  if (opts.nag) Validations.of(app).addPlugins(new AwsSolutionsChecks(app));
  return { keys, main };
}
