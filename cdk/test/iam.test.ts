import { Template } from 'aws-cdk-lib/assertions';
import { buildApp, Built, flatten, logicalId, only, templates } from './helpers';

let built: Built;
let t: Template;
beforeAll(() => {
  built = buildApp();
  t = templates(built).main;
});
afterAll(() => built.cleanup());

type Statement = { Sid?: string; Effect: string; Action: string | string[]; Resource: unknown; Condition?: unknown };

/** The statements of every inline policy attached to a role. */
function statementsOf(roleId: string): Statement[] {
  return Object.values(t.findResources('AWS::IAM::Policy'))
    .filter((p) => (p.Properties.Roles as unknown[]).some((r) => JSON.stringify(r) === JSON.stringify({ Ref: roleId })))
    .flatMap((p) => p.Properties.PolicyDocument.Statement as Statement[]);
}

const bySid = (statements: Statement[]) => Object.fromEntries(statements.map((s) => [s.Sid ?? '', s]));
const sorted = (a: string | string[]) => [...(Array.isArray(a) ? a : [a])].sort();
const arn = (type: string, prefix: string) => ({ 'Fn::GetAtt': [logicalId(t, type, prefix), 'Arn'] });
const resources = (s: Statement) => (Array.isArray(s.Resource) ? s.Resource : [s.Resource]);
const secretArn = (s: Statement) => flatten(resources(s)[0]);
/** Resources compared as a set: policy minimization orders them its own way. */
const resourceSet = (r: unknown) => (Array.isArray(r) ? r : [r]).map((x) => JSON.stringify(x)).sort();

const ITEM_READ = ['dynamodb:BatchGetItem', 'dynamodb:DescribeTable', 'dynamodb:GetItem', 'dynamodb:Query'];
const ITEM_WRITE = [
  'dynamodb:BatchWriteItem',
  'dynamodb:ConditionCheckItem',
  'dynamodb:DeleteItem',
  'dynamodb:PutItem',
  'dynamodb:UpdateItem',
];

function taskRoleId(): string {
  return only(t, 'AWS::ECS::TaskDefinition').props.TaskRoleArn['Fn::GetAtt'][0];
}

function lambdaRoleId(): string {
  const fn = t.toJSON().Resources[logicalId(t, 'AWS::Lambda::Function', 'ApiFunction')];
  return fn.Properties.Role['Fn::GetAtt'][0];
}

describe('worker task role: only its tables, queues, secret, metrics namespace and task protection', () => {
  test('exactly these statements', () => {
    expect(Object.keys(bySid(statementsOf(taskRoleId()))).sort()).toEqual(
      ['OutputsReadWrite', 'OwnTaskProtection', 'PutRatepoolMetrics', 'Queues', 'ReadKeys', 'TablesReadWrite'].sort(),
    );
    expect(statementsOf(taskRoleId()).every((s) => s.Effect === 'Allow')).toBe(true);
  });

  test('tables: item reads and writes (transactions need these) on the two tables, no Scan, no table admin', () => {
    const s = bySid(statementsOf(taskRoleId())).TablesReadWrite;
    expect(sorted(s.Action)).toEqual([...ITEM_READ, ...ITEM_WRITE].sort());
    expect(resourceSet(s.Resource)).toEqual(
      resourceSet([arn('AWS::DynamoDB::Table', 'JobsTable'), arn('AWS::DynamoDB::Table', 'LedgerTable')]),
    );
  });

  test('outputs bucket: get and put objects in it, nothing else (no delete, no listing, no other bucket)', () => {
    const s = bySid(statementsOf(taskRoleId())).OutputsReadWrite;
    expect(sorted(s.Action)).toEqual(['s3:GetObject', 's3:PutObject']);
    expect(flatten(s.Resource)).toBe(`<GetAtt:${logicalId(t, 'AWS::S3::Bucket', 'OutputsBucket')}.Arn>/*`);
  });

  test('queues: receive, delete, change visibility, send, attributes and url on the three queues', () => {
    const s = bySid(statementsOf(taskRoleId())).Queues;
    expect(sorted(s.Action)).toEqual(
      [
        'sqs:ChangeMessageVisibility',
        'sqs:DeleteMessage',
        'sqs:GetQueueAttributes',
        'sqs:GetQueueUrl',
        'sqs:ReceiveMessage',
        'sqs:SendMessage',
      ].sort(),
    );
    expect(resourceSet(s.Resource)).toEqual(
      resourceSet([
        arn('AWS::SQS::Queue', 'InteractiveQueue'),
        arn('AWS::SQS::Queue', 'BatchQueue'),
        arn('AWS::SQS::Queue', 'DeadLetterQueue'),
      ]),
    );
  });

  test('the keys secret: GetSecretValue on its ARN only', () => {
    const s = bySid(statementsOf(taskRoleId())).ReadKeys;
    expect(s.Action).toBe('secretsmanager:GetSecretValue');
    expect(secretArn(s)).toMatch(/^<StackOutput:.*Keys/);
  });

  test('PutMetricData only into the Ratepool namespace', () => {
    const s = bySid(statementsOf(taskRoleId())).PutRatepoolMetrics;
    expect(s).toEqual({
      Sid: 'PutRatepoolMetrics',
      Effect: 'Allow',
      Action: 'cloudwatch:PutMetricData',
      Resource: '*',
      Condition: { StringEquals: { 'cloudwatch:namespace': 'Ratepool' } },
    });
  });

  test('ecs:UpdateTaskProtection on the tasks of its own cluster', () => {
    const s = bySid(statementsOf(taskRoleId())).OwnTaskProtection;
    expect(s.Action).toBe('ecs:UpdateTaskProtection');
    expect(flatten(s.Resource)).toBe(
      `arn:<Ref:AWS::Partition>:ecs:<Ref:AWS::Region>:<Ref:AWS::AccountId>:task/<Ref:${logicalId(t, 'AWS::ECS::Cluster', 'Cluster')}>/*`,
    );
  });

  test('no managed policies', () => {
    expect(t.toJSON().Resources[taskRoleId()].Properties.ManagedPolicyArns).toBeUndefined();
  });
});

describe('API Lambda role', () => {
  test('exactly these statements', () => {
    const sids = statementsOf(lambdaRoleId())
      .map((s) => s.Sid ?? '')
      .filter((sid) => sid !== '');
    expect(sids.sort()).toEqual(
      ['Enqueue', 'JobsReadWrite', 'LedgerRead', 'OutputsRead', 'PutRatepoolMetrics', 'ReadKeys', 'ResolveQueues'].sort(),
    );
  });

  test('outputs bucket: read objects only (the workers write them)', () => {
    const s = bySid(statementsOf(lambdaRoleId())).OutputsRead;
    expect(s.Action).toBe('s3:GetObject');
    expect(flatten(s.Resource)).toBe(`<GetAtt:${logicalId(t, 'AWS::S3::Bucket', 'OutputsBucket')}.Arn>/*`);
  });

  test('jobs read/write, ledger read only', () => {
    const s = bySid(statementsOf(lambdaRoleId()));
    expect(sorted(s.JobsReadWrite.Action)).toEqual([...ITEM_READ, ...ITEM_WRITE].sort());
    expect(s.JobsReadWrite.Resource).toEqual(arn('AWS::DynamoDB::Table', 'JobsTable'));
    expect(sorted(s.LedgerRead.Action)).toEqual(ITEM_READ);
    expect(s.LedgerRead.Resource).toEqual(arn('AWS::DynamoDB::Table', 'LedgerTable'));
  });

  test('sends to the two work queues only; resolves all three by name', () => {
    const s = bySid(statementsOf(lambdaRoleId()));
    expect(s.Enqueue.Action).toBe('sqs:SendMessage');
    expect(resourceSet(s.Enqueue.Resource)).toEqual(
      resourceSet([arn('AWS::SQS::Queue', 'InteractiveQueue'), arn('AWS::SQS::Queue', 'BatchQueue')]),
    );
    expect(sorted(s.ResolveQueues.Action)).toEqual(['sqs:GetQueueAttributes', 'sqs:GetQueueUrl']);
    expect(resourceSet(s.ResolveQueues.Resource)).toEqual(
      resourceSet(['InteractiveQueue', 'BatchQueue', 'DeadLetterQueue'].map((q) => arn('AWS::SQS::Queue', q))),
    );
  });

  test('secret read and namespaced PutMetricData', () => {
    const s = bySid(statementsOf(lambdaRoleId()));
    expect(s.ReadKeys.Action).toBe('secretsmanager:GetSecretValue');
    expect(secretArn(s.ReadKeys)).toMatch(/^<StackOutput:.*Keys/);
    expect(s.PutRatepoolMetrics.Condition).toEqual({ StringEquals: { 'cloudwatch:namespace': 'Ratepool' } });
  });

  test('logs only to its own log group', () => {
    const logs = statementsOf(lambdaRoleId()).filter((s) => sorted(s.Action).every((a) => a.startsWith('logs:')));
    expect(logs).toHaveLength(1);
    expect(sorted(logs[0].Action)).toEqual(['logs:CreateLogStream', 'logs:PutLogEvents']);
    expect(JSON.stringify(logs[0].Resource)).toContain(logicalId(t, 'AWS::Logs::LogGroup', 'ApiFunctionLogs'));
  });
});

test('no role in the stack may act on every resource except the acknowledged PutMetricData and image pull token', () => {
  const wildcard = Object.values(t.findResources('AWS::IAM::Policy'))
    .flatMap((p) => p.Properties.PolicyDocument.Statement as Statement[])
    .filter((s) => resources(s).includes('*'))
    .map((s) => sorted(s.Action).join(','));
  expect(wildcard.sort()).toEqual(['cloudwatch:PutMetricData', 'cloudwatch:PutMetricData', 'ecr:GetAuthorizationToken'].sort());
});
