/**
 * The two Secrets Manager secrets of a deployment, in a stack of their own:
 * they are deployed and filled before the workers exist, because a worker
 * that starts without its keys refuses its config, and a service whose first
 * tasks all exit fails (and rolls back) the deployment that created it.
 *
 * Two secrets, so that each reader gets only what it uses:
 *
 * - `TenantKeys`: the tenants' API keys. Read by the API Lambda and the
 *   authorizer (and by the workers when they serve the calls endpoint, which
 *   authenticates tenants itself); read again every 60 s, so a rotated or
 *   revoked key takes effect without a redeploy.
 * - `WorkerKeys`: the orgs' provider keys and the tenants' webhook signing
 *   secrets. Read by the workers only, once at start.
 */
import { CfnOutput, RemovalPolicy, Stack, StackProps, Validations } from 'aws-cdk-lib';
import * as secretsmanager from 'aws-cdk-lib/aws-secretsmanager';
import type { Construct } from 'constructs';
import type { Settings } from './settings';

export interface KeysStackProps extends StackProps {
  readonly settings: Settings;
}

/** The fields (JSON object keys) of each secret, from the config file. */
export function secretFields(s: Settings): { tenantKeys: string[]; workerKeys: string[] } {
  const tenantKeys = s.tenants.map((t) => t.apiKeyEnv);
  const workerKeys = [
    ...s.orgs.map((o) => o.apiKeyEnv),
    ...s.tenants.flatMap((t) => (t.webhookSecretEnv === undefined ? [] : [t.webhookSecretEnv])),
  ];
  return { tenantKeys: [...new Set(tenantKeys)], workerKeys: [...new Set(workerKeys)] };
}

export class KeysStack extends Stack {
  /** JSON object: each tenant's `api_key_env` → its API key. */
  readonly tenantKeys: secretsmanager.ISecret;
  /** JSON object: each org's `api_key_env` → its provider key, each tenant's `webhook_secret_env` → its signing secret. */
  readonly workerKeys: secretsmanager.ISecret;

  constructor(scope: Construct, id: string, props: KeysStackProps) {
    super(scope, id, props);
    const fields = secretFields(props.settings);
    this.tenantKeys = this.addSecret('TenantKeys', fields.tenantKeys, {
      what: 'tenant API keys',
      readBy: 'Read by the API Lambda, its authorizer and the workers serving calls, again every 60 s.',
      rotation:
        'Tenant keys are shared with client teams and rotated by hand (put-secret-value); the API, its authorizer ' +
        'and the workers read the new value within 60 s, and the authorizer cache forgets the old one within 5 minutes.',
    });
    this.workerKeys = this.addSecret('WorkerKeys', fields.workerKeys, {
      what: 'org provider keys and tenant webhook secrets',
      readBy: 'Read by the workers only, once at start.',
      rotation:
        'The org keys are issued in the provider dashboard, which has no API a rotation Lambda could call, and ' +
        'webhook secrets are shared with each tenant; both are rotated by hand (put-secret-value) followed by a new ' +
        'worker deployment.',
    });
  }

  private addSecret(
    id: string,
    fields: string[],
    text: { what: string; readBy: string; rotation: string },
  ): secretsmanager.ISecret {
    const secret = new secretsmanager.Secret(this, id, {
      description: `ratepool ${text.what}: a JSON object with the fields ${fields.join(', ')}. ${text.readBy}`,
      // An empty object: the keys never pass through CloudFormation; the
      // operator puts them with `aws secretsmanager put-secret-value`.
      secretObjectValue: {},
      // Losing the keys with a stack is never what anybody wanted.
      removalPolicy: RemovalPolicy.RETAIN,
    });
    Validations.of(secret).acknowledge({ id: 'AwsSolutions-SMG4', reason: text.rotation });
    new CfnOutput(this, `${id}SecretArn`, {
      value: secret.secretArn,
      description:
        `Put the ${text.what} with: aws secretsmanager put-secret-value --secret-id <this> ` +
        `--secret-string file://${id === 'TenantKeys' ? 'tenant-keys' : 'worker-keys'}.json (fields: ${fields.join(', ')})`,
    });
    return secret;
  }
}
