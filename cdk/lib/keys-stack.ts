/**
 * The Secrets Manager secret holding every org and tenant API key, in a stack
 * of its own: it is deployed and filled before the workers exist, because a
 * worker that starts without its keys refuses its config, and a service whose
 * first tasks all exit fails (and rolls back) the deployment that created it.
 */
import { CfnOutput, RemovalPolicy, Stack, StackProps, Validations } from 'aws-cdk-lib';
import * as secretsmanager from 'aws-cdk-lib/aws-secretsmanager';
import type { Construct } from 'constructs';
import type { Settings } from './settings';

export interface KeysStackProps extends StackProps {
  readonly settings: Settings;
}

export class KeysStack extends Stack {
  /** A JSON object: `apiKeyEnv` name of each org and tenant → its key. */
  readonly secret: secretsmanager.ISecret;

  constructor(scope: Construct, id: string, props: KeysStackProps) {
    super(scope, id, props);
    const fields = [...props.settings.orgs, ...props.settings.tenants].map((x) => x.apiKeyEnv);

    const secret = new secretsmanager.Secret(this, 'Keys', {
      description:
        `ratepool API keys, a JSON object with the fields ${fields.join(', ')}. ` +
        'Read once by each worker task and Lambda instance at start.',
      // An empty object: the keys never pass through CloudFormation; the
      // operator puts them with `aws secretsmanager put-secret-value`.
      secretObjectValue: {},
      // Losing the keys with a stack is never what anybody wanted.
      removalPolicy: RemovalPolicy.RETAIN,
    });
    Validations.of(secret).acknowledge({
      id: 'AwsSolutions-SMG4',
      reason:
        'The org keys are issued in the OpenAI dashboard, which has no API a rotation Lambda could call, ' +
        'and tenant keys are shared with client teams; both are rotated by hand (put-secret-value), ' +
        'and new worker tasks and Lambda instances read the new value.',
    });
    this.secret = secret;

    new CfnOutput(this, 'KeysSecretArn', {
      value: secret.secretArn,
      description: `Put the keys with: aws secretsmanager put-secret-value --secret-id <this> --secret-string file://keys.json (fields: ${fields.join(', ')})`,
    });
  }
}
