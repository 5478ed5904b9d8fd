import { Match, Template } from 'aws-cdk-lib/assertions';
import { parse } from 'smol-toml';
import { buildApp, Built, flatten, logicalId, only, templates } from './helpers';

let built: Built;
let t: Template;
beforeAll(() => {
  built = buildApp();
  t = templates(built).main;
});
afterAll(() => built.cleanup());

function apiFunction() {
  const id = logicalId(t, 'AWS::Lambda::Function', 'ApiFunction');
  return { id, props: t.toJSON().Resources[id].Properties };
}

describe('Lambda', () => {
  test('provided.al2023 on arm64, handler bootstrap, 29 s, code from the asset path', () => {
    const { props } = apiFunction();
    expect(props).toEqual(
      expect.objectContaining({
        Runtime: 'provided.al2023',
        Architectures: ['arm64'],
        Handler: 'bootstrap',
        Timeout: 29,
        MemorySize: 512,
      }),
    );
    expect(props.Code.S3Key).toMatch(/\.zip$/);
  });

  test('RATEPOOL_CONFIG_TOML names this stack\'s tables, queues, outputs bucket and secret', () => {
    const toml = flatten(apiFunction().props.Environment.Variables.RATEPOOL_CONFIG_TOML);
    const cfg = parse(toml) as any;
    const ref = (prefix: string) => `<Ref:${logicalId(t, 'AWS::DynamoDB::Table', prefix)}>`;
    const queue = (prefix: string) => `<GetAtt:${logicalId(t, 'AWS::SQS::Queue', prefix)}.QueueName>`;
    expect(cfg.storage.backend).toBe('aws');
    expect(cfg.aws).toEqual({
      region: '<Ref:AWS::Region>',
      jobs_table: ref('JobsTable'),
      ledger_table: ref('LedgerTable'),
      interactive_queue: queue('InteractiveQueue'),
      batch_queue: queue('BatchQueue'),
      dead_letter_queue: queue('DeadLetterQueue'),
      metrics_namespace: 'Ratepool',
      secret_arn: expect.stringMatching(/^<StackOutput:.*Keys/),
      retention_days: 30,
      outputs_bucket: `<Ref:${logicalId(t, 'AWS::S3::Bucket', 'OutputsBucket')}>`,
    });
    expect(cfg.orgs.map((o: { name: string }) => o.name)).toEqual(['org-a', 'org-b', 'org-c']);
  });

  test('the worker task gets the same config', () => {
    const lambdaToml = flatten(apiFunction().props.Environment.Variables.RATEPOOL_CONFIG_TOML);
    const env = only(t, 'AWS::ECS::TaskDefinition').props.ContainerDefinitions[0].Environment;
    expect(env).toHaveLength(1);
    expect(env[0].Name).toBe('RATEPOOL_CONFIG_TOML');
    expect(flatten(env[0].Value)).toBe(lambdaToml);
  });

  test('logs to its own log group with a retention, no managed policies on its role', () => {
    const { props } = apiFunction();
    const group = logicalId(t, 'AWS::Logs::LogGroup', 'ApiFunctionLogs');
    expect(props.LoggingConfig).toEqual({ LogGroup: { Ref: group } });
    expect(t.toJSON().Resources[group].Properties.RetentionInDays).toBe(30);
    const role = t.toJSON().Resources[props.Role['Fn::GetAtt'][0]];
    expect(role.Properties.ManagedPolicyArns).toBeUndefined();
  });

  test('a different context sizes it without code edits', () => {
    const other = buildApp({ 'ratepool:lambdaMemoryMiB': 1024 });
    try {
      Template.fromStack(other.main).hasResourceProperties('AWS::Lambda::Function', {
        Runtime: 'provided.al2023',
        MemorySize: 1024,
      });
    } finally {
      other.cleanup();
    }
  });
});

describe('API Gateway', () => {
  test('regional REST API, stage prod with JSON access logs and throttling', () => {
    only(t, 'AWS::ApiGateway::RestApi');
    t.hasResourceProperties('AWS::ApiGateway::RestApi', { EndpointConfiguration: { Types: ['REGIONAL'] } });
    const stage = only(t, 'AWS::ApiGateway::Stage').props;
    expect(stage.StageName).toBe('prod');
    expect(flatten(stage.AccessLogSetting.DestinationArn)).toMatch(
      new RegExp(`:log-group:<Ref:${logicalId(t, 'AWS::Logs::LogGroup', 'ApiAccessLogs')}>$`),
    );
    const format = JSON.parse(stage.AccessLogSetting.Format);
    expect(format).toEqual(expect.objectContaining({ requestId: '$context.requestId', status: '$context.status' }));
    expect(stage.MethodSettings).toEqual([
      expect.objectContaining({ HttpMethod: '*', ResourcePath: '/*', ThrottlingRateLimit: 100, ThrottlingBurstLimit: 200 }),
    ]);
  });

  test('routes: /v1/{proxy+}, /v1/jobs and /v1/jobs/{proxy+}, all to the Lambda by proxy integration', () => {
    const resources = Object.values(t.findResources('AWS::ApiGateway::Resource')).map((r) => r.Properties.PathPart);
    expect(resources.sort()).toEqual(['jobs', 'v1', '{proxy+}', '{proxy+}'].sort());
    const methods = Object.values(t.findResources('AWS::ApiGateway::Method'));
    expect(methods.map((m) => m.Properties.HttpMethod).sort()).toEqual(['ANY', 'ANY', 'ANY', 'POST']);
    const fnArn = { 'Fn::GetAtt': [apiFunction().id, 'Arn'] };
    for (const m of methods) {
      expect(m.Properties.Integration.Type).toBe('AWS_PROXY');
      expect(JSON.stringify(m.Properties.Integration.Uri)).toContain(JSON.stringify(fnArn));
    }
  });

  test('every method validates that the Authorization header is present', () => {
    const validator = only(t, 'AWS::ApiGateway::RequestValidator');
    expect(validator.props).toEqual(expect.objectContaining({ ValidateRequestBody: true, ValidateRequestParameters: true }));
    for (const m of Object.values(t.findResources('AWS::ApiGateway::Method'))) {
      expect(m.Properties.RequestValidatorId).toEqual({ Ref: validator.id });
      expect(m.Properties.RequestParameters).toEqual({ 'method.request.header.Authorization': true });
    }
  });

  test('POST /v1/jobs checks the body against the job spec outline', () => {
    const model = only(t, 'AWS::ApiGateway::Model');
    expect(model.props.ContentType).toBe('application/json');
    expect(model.props.Schema).toEqual(
      expect.objectContaining({ type: 'object', required: ['steps'], properties: { steps: { type: 'array', minItems: 1 } } }),
    );
    t.hasResourceProperties('AWS::ApiGateway::Method', {
      HttpMethod: 'POST',
      RequestModels: { 'application/json': { Ref: model.id } },
    });
  });

  test("API Gateway's own refusals use the API's error shape", () => {
    const responses = Object.values(t.findResources('AWS::ApiGateway::GatewayResponse')).map((r) => r.Properties);
    const byType = Object.fromEntries(responses.map((r) => [r.ResponseType, r]));
    expect(byType.BAD_REQUEST_PARAMETERS.StatusCode).toBe('401');
    expect(byType.BAD_REQUEST_PARAMETERS.ResponseParameters).toEqual({
      'gatewayresponse.header.WWW-Authenticate': "'Bearer'",
    });
    expect(byType.BAD_REQUEST_BODY.StatusCode).toBe('400');
    expect(byType.MISSING_AUTHENTICATION_TOKEN.StatusCode).toBe('404');
    for (const r of responses) {
      const body = JSON.parse(r.ResponseTemplates['application/json']);
      expect(Object.keys(body.error)).toEqual(expect.arrayContaining(['type', 'message']));
    }
    expect(JSON.parse(byType.BAD_REQUEST_BODY.ResponseTemplates['application/json']).error).toEqual({
      type: 'invalid_request',
      message: '$context.error.validationErrorString',
      field: 'body',
    });
  });

  test('the URL is a stack output', () => {
    t.hasOutput('ApiUrl', { Value: Match.anyValue() });
  });
});
