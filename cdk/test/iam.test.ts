import { Template } from 'aws-cdk-lib/assertions';
import { buildApp, Built, flatten, JOBS_ONLY, logicalId, only, templates } from './helpers';

let built: Built;
let t: Template;
let jobsOnly: Built;
let j: Template;
beforeAll(() => {
  built = buildApp();
  t = templates(built).main;
  jobsOnly = buildApp(JOBS_ONLY);
  j = templates(jobsOnly).main;
});
afterAll(() => [built, jobsOnly].forEach((b) => b.cleanup()));

type Statement = { Sid?: string; Effect: string; Action: string | string[]; Resource: unknown; Condition?: unknown };

/** The statements of every policy of a role: inline in the role and attached to it. */
function statementsOf(roleId: string, template: Template = t): Statement[] {
  const role = template.toJSON().Resources[roleId];
  const inline = ((role.Properties.Policies ?? []) as { PolicyDocument: { Statement: Statement[] } }[]).flatMap(
    (p) => p.PolicyDocument.Statement,
  );
  const attached = Object.values(template.findResources('AWS::IAM::Policy'))
    .filter((p) => (p.Properties.Roles as unknown[]).some((r) => JSON.stringify(r) === JSON.stringify({ Ref: roleId })))
    .flatMap((p) => p.Properties.PolicyDocument.Statement as Statement[]);
  return [...inline, ...attached];
}

const bySid = (statements: Statement[]) => Object.fromEntries(statements.map((s) => [s.Sid ?? '', s]));
const sorted = (a: string | string[]) => [...(Array.isArray(a) ? a : [a])].sort();
const arn = (type: string, prefix: string, template: Template = t) => ({
  'Fn::GetAtt': [logicalId(template, type, prefix), 'Arn'],
});
const resources = (s: Statement) => (Array.isArray(s.Resource) ? s.Resource : [s.Resource]);
const secretArn = (s: Statement) => flatten(resources(s)[0]);
/** Resources compared as a set: policy minimization orders them its own way. */
const resourceSet = (r: unknown) => (Array.isArray(r) ? r : [r]).map((x) => JSON.stringify(x)).sort();
/** Every action a role may take, whatever statement grants it. */
const actionsOf = (roleId: string, template: Template = t) =>
  [...new Set(statementsOf(roleId, template).flatMap((s) => sorted(s.Action)))].sort();

const JOBS_ITEMS = ['dynamodb:DeleteItem', 'dynamodb:GetItem', 'dynamodb:PutItem', 'dynamodb:Query', 'dynamodb:UpdateItem'];
const LOGS = ['logs:CreateLogStream', 'logs:PutLogEvents'];

function taskRoleId(template: Template = t): string {
  return only(template, 'AWS::ECS::TaskDefinition').props.TaskRoleArn['Fn::GetAtt'][0];
}
function executionRoleId(): string {
  return only(t, 'AWS::ECS::TaskDefinition').props.ExecutionRoleArn['Fn::GetAtt'][0];
}
function functionRoleId(prefix: string): string {
  const fn = t.toJSON().Resources[logicalId(t, 'AWS::Lambda::Function', prefix)];
  return fn.Properties.Role['Fn::GetAtt'][0];
}

/**
 * Each role of the stack and every action it has, exactly. Each action of
 * the application's roles is one the Rust code calls (src/aws: `.send()` of
 * DynamoDB, SQS, S3, Secrets Manager); the others are CDK's own.
 */
describe('every role and its actions, exactly', () => {
  test('the application roles', () => {
    expect(actionsOf(taskRoleId())).toEqual(
      [
        ...JOBS_ITEMS,
        'dynamodb:ConditionCheckItem',
        'dynamodb:DescribeTable',
        'ecs:UpdateTaskProtection',
        's3:GetObject',
        's3:PutObject',
        'secretsmanager:GetSecretValue',
        'sqs:ChangeMessageVisibility',
        'sqs:DeleteMessage',
        'sqs:GetQueueAttributes',
        'sqs:GetQueueUrl',
        'sqs:ReceiveMessage',
        'sqs:SendMessage',
      ].sort(),
    );
    expect(actionsOf(functionRoleId('ApiFunction'))).toEqual(
      [
        ...JOBS_ITEMS,
        'dynamodb:DescribeTable',
        ...LOGS,
        's3:GetObject',
        'secretsmanager:GetSecretValue',
        'sqs:GetQueueAttributes',
        'sqs:GetQueueUrl',
        'sqs:SendMessage',
      ].sort(),
    );
    expect(actionsOf(functionRoleId('AuthorizerFunction'))).toEqual([...LOGS, 'secretsmanager:GetSecretValue'].sort());
  });

  test('the roles CDK makes: image pull and logs, flow logs, the default security group lock-down', () => {
    expect(actionsOf(executionRoleId())).toEqual(
      ['ecr:BatchCheckLayerAvailability', 'ecr:BatchGetImage', 'ecr:GetAuthorizationToken', 'ecr:GetDownloadUrlForLayer', ...LOGS].sort(),
    );
    expect(actionsOf(logicalId(t, 'AWS::IAM::Role', 'VpcrejectedIAMRole'))).toEqual(
      ['logs:CreateLogStream', 'logs:DescribeLogStreams', 'logs:PutLogEvents'].sort(),
    );
    expect(actionsOf(logicalId(t, 'AWS::IAM::Role', 'CustomVpcRestrictDefaultSG'))).toEqual(
      [
        'ec2:AuthorizeSecurityGroupEgress',
        'ec2:AuthorizeSecurityGroupIngress',
        'ec2:RevokeSecurityGroupEgress',
        'ec2:RevokeSecurityGroupIngress',
      ].sort(),
    );
  });

  test('no other role, in either stack', () => {
    expect(Object.keys(t.findResources('AWS::IAM::Role')).sort()).toEqual(
      [
        taskRoleId(),
        executionRoleId(),
        functionRoleId('ApiFunction'),
        functionRoleId('AuthorizerFunction'),
        logicalId(t, 'AWS::IAM::Role', 'VpcrejectedIAMRole'),
        logicalId(t, 'AWS::IAM::Role', 'CustomVpcRestrictDefaultSG'),
      ].sort(),
    );
    templates(built).keys.resourceCountIs('AWS::IAM::Role', 0);
  });

  test('jobs only: the workers serve no API, so no queue depths and no tenant keys', () => {
    expect(actionsOf(taskRoleId(j), j)).toEqual(
      [
        ...JOBS_ITEMS,
        'dynamodb:ConditionCheckItem',
        'dynamodb:DescribeTable',
        'ecs:UpdateTaskProtection',
        's3:GetObject',
        's3:PutObject',
        'secretsmanager:GetSecretValue',
        'sqs:ChangeMessageVisibility',
        'sqs:DeleteMessage',
        'sqs:GetQueueUrl',
        'sqs:ReceiveMessage',
        'sqs:SendMessage',
      ].sort(),
    );
    const s = bySid(statementsOf(taskRoleId(j), j));
    expect(Object.keys(s)).not.toContain('ReadTenantKeys');
    expect(secretArn(s.ReadWorkerKeys)).toMatch(/^<StackOutput:.*WorkerKeys/);
  });

  test('nothing publishes metrics with an API call any more (the worker logs them in embedded metric format)', () => {
    const all = Object.values(t.findResources('AWS::IAM::Policy')).flatMap((p) =>
      (p.Properties.PolicyDocument.Statement as Statement[]).flatMap((s) => sorted(s.Action)),
    );
    expect(all.filter((a) => a.startsWith('cloudwatch:'))).toEqual([]);
  });
});

describe('worker task role: its tables, queues, bucket, secrets and task protection', () => {
  test('exactly these statements, all Allow', () => {
    expect(Object.keys(bySid(statementsOf(taskRoleId()))).sort()).toEqual(
      [
        'DeadLetter',
        'JobsReadWrite',
        'LedgerReadWrite',
        'OutputsReadWrite',
        'OwnTaskProtection',
        'ReadTenantKeys',
        'ReadWorkerKeys',
        'WorkQueues',
      ].sort(),
    );
    expect(statementsOf(taskRoleId()).every((s) => s.Effect === 'Allow')).toBe(true);
  });

  test('jobs table: item reads and writes (ConditionCheckItem in a transaction), no Scan, no Batch*, no table admin', () => {
    const s = bySid(statementsOf(taskRoleId())).JobsReadWrite;
    expect(sorted(s.Action)).toEqual([...JOBS_ITEMS, 'dynamodb:ConditionCheckItem', 'dynamodb:DescribeTable'].sort());
    expect(s.Resource).toEqual(arn('AWS::DynamoDB::Table', 'JobsTable'));
  });

  test('ledger table: read a bucket and charge it (conditional update), nothing else', () => {
    const s = bySid(statementsOf(taskRoleId())).LedgerReadWrite;
    expect(sorted(s.Action)).toEqual(['dynamodb:DescribeTable', 'dynamodb:GetItem', 'dynamodb:UpdateItem']);
    expect(s.Resource).toEqual(arn('AWS::DynamoDB::Table', 'LedgerTable'));
  });

  test('outputs bucket: get and put objects in it, nothing else (no delete, no listing, no other bucket)', () => {
    const s = bySid(statementsOf(taskRoleId())).OutputsReadWrite;
    expect(sorted(s.Action)).toEqual(['s3:GetObject', 's3:PutObject']);
    expect(flatten(s.Resource)).toBe(`<GetAtt:${logicalId(t, 'AWS::S3::Bucket', 'OutputsBucket')}.Arn>/*`);
  });

  test('work queues: receive, delete, change visibility, send, url, depths (for /healthz)', () => {
    const s = bySid(statementsOf(taskRoleId())).WorkQueues;
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
      resourceSet([arn('AWS::SQS::Queue', 'InteractiveQueue'), arn('AWS::SQS::Queue', 'BatchQueue')]),
    );
  });

  test('dead-letter queue: send to it only (reading it is `ratepool dlq`, an operator\'s)', () => {
    const s = bySid(statementsOf(taskRoleId())).DeadLetter;
    expect(sorted(s.Action)).toEqual(['sqs:GetQueueAttributes', 'sqs:GetQueueUrl', 'sqs:SendMessage']);
    expect(s.Resource).toEqual(arn('AWS::SQS::Queue', 'DeadLetterQueue'));
  });

  test('secrets: WorkerKeys, and TenantKeys because the workers serve the calls endpoint', () => {
    const s = bySid(statementsOf(taskRoleId()));
    expect(s.ReadWorkerKeys.Action).toBe('secretsmanager:GetSecretValue');
    expect(secretArn(s.ReadWorkerKeys)).toMatch(/^<StackOutput:.*WorkerKeys/);
    expect(s.ReadTenantKeys.Action).toBe('secretsmanager:GetSecretValue');
    expect(secretArn(s.ReadTenantKeys)).toMatch(/^<StackOutput:.*TenantKeys/);
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
    const sids = statementsOf(functionRoleId('ApiFunction'))
      .map((s) => s.Sid ?? '')
      .filter((sid) => sid !== '');
    expect(sids.sort()).toEqual(['Enqueue', 'JobsReadWrite', 'LedgerRead', 'OutputsRead', 'ReadTenantKeys', 'ResolveQueues'].sort());
  });

  test('outputs bucket: read objects only (the workers write them)', () => {
    const s = bySid(statementsOf(functionRoleId('ApiFunction'))).OutputsRead;
    expect(s.Action).toBe('s3:GetObject');
    expect(flatten(s.Resource)).toBe(`<GetAtt:${logicalId(t, 'AWS::S3::Bucket', 'OutputsBucket')}.Arn>/*`);
  });

  test('jobs read/write without ConditionCheckItem, ledger read only', () => {
    const s = bySid(statementsOf(functionRoleId('ApiFunction')));
    expect(sorted(s.JobsReadWrite.Action)).toEqual([...JOBS_ITEMS, 'dynamodb:DescribeTable'].sort());
    expect(s.JobsReadWrite.Resource).toEqual(arn('AWS::DynamoDB::Table', 'JobsTable'));
    expect(sorted(s.LedgerRead.Action)).toEqual(['dynamodb:DescribeTable', 'dynamodb:GetItem']);
    expect(s.LedgerRead.Resource).toEqual(arn('AWS::DynamoDB::Table', 'LedgerTable'));
  });

  test('sends to the two work queues only; resolves all three by name and reads their depths', () => {
    const s = bySid(statementsOf(functionRoleId('ApiFunction')));
    expect(s.Enqueue.Action).toBe('sqs:SendMessage');
    expect(resourceSet(s.Enqueue.Resource)).toEqual(
      resourceSet([arn('AWS::SQS::Queue', 'InteractiveQueue'), arn('AWS::SQS::Queue', 'BatchQueue')]),
    );
    expect(sorted(s.ResolveQueues.Action)).toEqual(['sqs:GetQueueAttributes', 'sqs:GetQueueUrl']);
    expect(resourceSet(s.ResolveQueues.Resource)).toEqual(
      resourceSet(['InteractiveQueue', 'BatchQueue', 'DeadLetterQueue'].map((q) => arn('AWS::SQS::Queue', q))),
    );
  });

  test('reads the tenant keys, never the worker keys (the provider keys)', () => {
    const s = bySid(statementsOf(functionRoleId('ApiFunction')));
    expect(s.ReadTenantKeys.Action).toBe('secretsmanager:GetSecretValue');
    expect(secretArn(s.ReadTenantKeys)).toMatch(/^<StackOutput:.*TenantKeys/);
    const all = JSON.stringify(statementsOf(functionRoleId('ApiFunction')));
    expect(all).not.toMatch(/WorkerKeys/);
  });

  test('logs only to its own log group', () => {
    const logs = statementsOf(functionRoleId('ApiFunction')).filter((s) => sorted(s.Action).every((a) => a.startsWith('logs:')));
    expect(logs).toHaveLength(1);
    expect(sorted(logs[0].Action)).toEqual(LOGS);
    expect(JSON.stringify(logs[0].Resource)).toContain(logicalId(t, 'AWS::Logs::LogGroup', 'ApiFunctionLogs'));
  });
});

describe('authorizer role', () => {
  test('the tenant keys and its own log group, nothing else', () => {
    const statements = statementsOf(functionRoleId('AuthorizerFunction'));
    const s = bySid(statements);
    expect(s.ReadTenantKeys.Action).toBe('secretsmanager:GetSecretValue');
    expect(secretArn(s.ReadTenantKeys)).toMatch(/^<StackOutput:.*TenantKeys/);
    const logs = statements.filter((x) => x.Sid === undefined);
    expect(logs).toHaveLength(1);
    expect(sorted(logs[0].Action)).toEqual(LOGS);
    expect(JSON.stringify(logs[0].Resource)).toContain(logicalId(t, 'AWS::Logs::LogGroup', 'AuthorizerFunctionLogs'));
    expect(t.toJSON().Resources[functionRoleId('AuthorizerFunction')].Properties.ManagedPolicyArns).toBeUndefined();
  });
});

test('no role in the stack may act on every resource except the image pull token', () => {
  const wildcard = Object.values(t.findResources('AWS::IAM::Policy'))
    .flatMap((p) => p.Properties.PolicyDocument.Statement as Statement[])
    .filter((s) => resources(s).includes('*'))
    .map((s) => sorted(s.Action).join(','));
  expect(wildcard).toEqual(['ecr:GetAuthorizationToken']);
});

test('only the workers read the worker keys (the provider keys and webhook secrets)', () => {
  const readers = Object.entries(t.findResources('AWS::IAM::Policy'))
    .filter(([, p]) => JSON.stringify(p.Properties.PolicyDocument).includes('WorkerKeys'))
    .flatMap(([, p]) => (p.Properties.Roles as { Ref: string }[]).map((r) => r.Ref));
  expect(readers).toEqual([taskRoleId()]);
});
