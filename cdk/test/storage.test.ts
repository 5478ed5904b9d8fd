import { Match, Template } from 'aws-cdk-lib/assertions';
import { buildApp, Built, logicalId, only, templates } from './helpers';

let built: Built;
let t: Template;
let keys: Template;
beforeAll(() => {
  built = buildApp();
  ({ main: t, keys } = templates(built));
});
afterAll(() => built.cleanup());

describe('DynamoDB', () => {
  test('jobs table: PK/SK strings, on demand, PITR, TTL on expires_at, retained', () => {
    t.hasResource('AWS::DynamoDB::Table', {
      Properties: {
        KeySchema: [
          { AttributeName: 'PK', KeyType: 'HASH' },
          { AttributeName: 'SK', KeyType: 'RANGE' },
        ],
        AttributeDefinitions: [
          { AttributeName: 'PK', AttributeType: 'S' },
          { AttributeName: 'SK', AttributeType: 'S' },
        ],
        BillingMode: 'PAY_PER_REQUEST',
        PointInTimeRecoverySpecification: { PointInTimeRecoveryEnabled: true },
        TimeToLiveSpecification: { AttributeName: 'expires_at', Enabled: true },
      },
      DeletionPolicy: 'Retain',
    });
  });

  test('ledger table: PK only, on demand, PITR, retained', () => {
    t.hasResource('AWS::DynamoDB::Table', {
      Properties: {
        KeySchema: [{ AttributeName: 'PK', KeyType: 'HASH' }],
        AttributeDefinitions: [{ AttributeName: 'PK', AttributeType: 'S' }],
        BillingMode: 'PAY_PER_REQUEST',
        PointInTimeRecoverySpecification: { PointInTimeRecoveryEnabled: true },
      },
      DeletionPolicy: 'Retain',
    });
    t.resourceCountIs('AWS::DynamoDB::Table', 2);
  });
});

describe('S3 outputs bucket', () => {
  test('private, S3-managed SSE, TLS only, unversioned, retained like the tables', () => {
    const outputs = t.toJSON().Resources[logicalId(t, 'AWS::S3::Bucket', 'OutputsBucket')];
    expect(outputs).toMatchObject({
      Properties: {
        PublicAccessBlockConfiguration: {
          BlockPublicAcls: true,
          BlockPublicPolicy: true,
          IgnorePublicAcls: true,
          RestrictPublicBuckets: true,
        },
        BucketEncryption: {
          ServerSideEncryptionConfiguration: [{ ServerSideEncryptionByDefault: { SSEAlgorithm: 'AES256' } }],
        },
      },
      DeletionPolicy: 'Retain',
    });
    expect(outputs.Properties.VersioningConfiguration).toBeUndefined();
    const bucket = logicalId(t, 'AWS::S3::Bucket', 'OutputsBucket');
    const policy = Object.values(t.findResources('AWS::S3::BucketPolicy')).find(
      (p) => JSON.stringify(p.Properties.Bucket) === JSON.stringify({ Ref: bucket }),
    );
    expect(policy?.Properties.PolicyDocument.Statement).toContainEqual(
      expect.objectContaining({ Effect: 'Deny', Condition: { Bool: { 'aws:SecureTransport': 'false' } } }),
    );
  });

  test('objects expire with their step items: retention (30 days) + the 14-day live margin', () => {
    const rules = only(t, 'AWS::S3::Bucket', (r) => r === t.toJSON().Resources[logicalId(t, 'AWS::S3::Bucket', 'OutputsBucket')])
      .props.LifecycleConfiguration.Rules;
    expect(rules).toEqual([
      expect.objectContaining({ Status: 'Enabled', ExpirationInDays: 44, AbortIncompleteMultipartUpload: { DaysAfterInitiation: 1 } }),
    ]);
  });
});

describe('SQS', () => {
  test('interactive and batch queues: 30 s visibility, long polling, SSE, DLQ backstop after 50 receives', () => {
    const dlq = logicalId(t, 'AWS::SQS::Queue', 'DeadLetterQueue');
    for (const prefix of ['InteractiveQueue', 'BatchQueue']) {
      const id = logicalId(t, 'AWS::SQS::Queue', prefix);
      expect(t.toJSON().Resources[id].Properties).toEqual(
        expect.objectContaining({
          VisibilityTimeout: 30,
          ReceiveMessageWaitTimeSeconds: 20,
          SqsManagedSseEnabled: true,
          RedrivePolicy: { deadLetterTargetArn: { 'Fn::GetAtt': [dlq, 'Arn'] }, maxReceiveCount: 50 },
        }),
      );
    }
  });

  test('the dead-letter queue keeps messages 14 days and has no DLQ itself', () => {
    const dlq = logicalId(t, 'AWS::SQS::Queue', 'DeadLetterQueue');
    const props = t.toJSON().Resources[dlq].Properties;
    expect(props.MessageRetentionPeriod).toBe(14 * 24 * 3600);
    expect(props.SqsManagedSseEnabled).toBe(true);
    expect(props.RedrivePolicy).toBeUndefined();
  });

  test('every queue denies requests without TLS', () => {
    const policies = t.findResources('AWS::SQS::QueuePolicy');
    const covered = new Set<string>();
    for (const p of Object.values(policies)) {
      expect(p.Properties.PolicyDocument.Statement).toEqual(
        expect.arrayContaining([
          expect.objectContaining({
            Effect: 'Deny',
            Action: 'sqs:*',
            Principal: { AWS: '*' },
            Condition: { Bool: { 'aws:SecureTransport': 'false' } },
          }),
        ]),
      );
      for (const q of p.Properties.Queues) covered.add(q.Ref);
    }
    expect([...covered].sort()).toEqual(Object.keys(t.findResources('AWS::SQS::Queue')).sort());
  });
});

describe('keys secrets', () => {
  const secrets = () =>
    Object.fromEntries(
      Object.entries(keys.findResources('AWS::SecretsManager::Secret')).map(([id, r]) => [id.replace(/[0-9A-F]{8}$/, ''), r]),
    );

  test('two, in their own stack, retained, each starting as an empty JSON object', () => {
    const s = secrets();
    expect(Object.keys(s).sort()).toEqual(['TenantKeys', 'WorkerKeys']);
    for (const r of Object.values(s)) {
      expect(r.Properties.SecretString).toBe('{}');
      expect(r.DeletionPolicy).toBe('Retain');
      expect(r.UpdateReplacePolicy).toBe('Retain');
    }
    t.resourceCountIs('AWS::SecretsManager::Secret', 0);
  });

  test('TenantKeys: the tenants\' api_key_env; WorkerKeys: the orgs\' api_key_env and the tenants\' webhook_secret_env', () => {
    const s = secrets();
    expect(s.TenantKeys.Properties.Description).toMatch(/with the fields TENANT_SCREENPLAYS_KEY\. /);
    expect(s.WorkerKeys.Properties.Description).toMatch(
      /with the fields ORG_A_KEY, ORG_B_KEY, ORG_C_KEY, ORG_OVERFLOW_KEY, SCREENPLAYS_WEBHOOK_SECRET\. Read by the workers only/,
    );
  });

  test('each ARN is an output saying how to put the keys', () => {
    for (const [name, file, fields] of [
      ['TenantKeysSecretArn', 'tenant-keys.json', 'TENANT_SCREENPLAYS_KEY'],
      ['WorkerKeysSecretArn', 'worker-keys.json', 'ORG_A_KEY, ORG_B_KEY, ORG_C_KEY, ORG_OVERFLOW_KEY, SCREENPLAYS_WEBHOOK_SECRET'],
    ]) {
      keys.hasOutput(name, {
        Value: { Ref: Match.stringLikeRegexp(name.replace('SecretArn', '')) },
        Description: `Put the ${name === 'TenantKeysSecretArn' ? 'tenant API keys' : 'org provider keys and tenant webhook secrets'} with: ` +
          `aws secretsmanager put-secret-value --secret-id <this> --secret-string file://${file} (fields: ${fields})`,
      });
    }
  });

  test('the main stack depends on the keys stack', () => {
    expect(built.main.dependencies).toContain(built.keys);
  });
});
