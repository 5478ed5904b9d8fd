import { Match, Template } from 'aws-cdk-lib/assertions';
import { parse } from 'smol-toml';
import { AUTHORIZER_CACHE_SECS, TENANT_KEYS_MAX_AGE_SECS } from '../lib/ratepool-stack';
import { buildApp, Built, configText, flatten, logicalId, only, tempConfig, templates } from './helpers';

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

function authorizerFunction() {
  const id = logicalId(t, 'AWS::Lambda::Function', 'AuthorizerFunction');
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

  test('RATEPOOL_CONFIG_TOML is the config file verbatim, then the stack\'s [storage] and [aws]', () => {
    const toml = flatten(apiFunction().props.Environment.Variables.RATEPOOL_CONFIG_TOML);
    const file = configText();
    expect(toml.startsWith(`${file}\n[storage]\nbackend = "aws"\n\n[aws]\n`)).toBe(true);
    const { storage, aws, ...fromFile } = parse(toml) as any;
    expect(fromFile).toEqual(parse(file));
    expect(storage).toEqual({ backend: 'aws' });
    expect(Object.keys(aws)).toEqual([
      'region',
      'jobs_table',
      'ledger_table',
      'interactive_queue',
      'batch_queue',
      'dead_letter_queue',
      'metrics_namespace',
      'retention_days',
      'outputs_bucket',
      'tenant_keys_secret_arn',
      'worker_keys_secret_arn',
    ]);
  });

  test('RATEPOOL_CONFIG_TOML names this stack\'s tables, queues, outputs bucket and secrets', () => {
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
      tenant_keys_secret_arn: expect.stringMatching(/^<StackOutput:.*TenantKeys/),
      worker_keys_secret_arn: expect.stringMatching(/^<StackOutput:.*WorkerKeys/),
      retention_days: 30,
      outputs_bucket: `<Ref:${logicalId(t, 'AWS::S3::Bucket', 'OutputsBucket')}>`,
    });
    expect(cfg.orgs.map((o: { name: string }) => o.name)).toEqual(['org-a', 'org-b', 'org-c', 'org-overflow']);
  });

  test('the worker task and the authorizer get the same config', () => {
    const lambdaToml = flatten(apiFunction().props.Environment.Variables.RATEPOOL_CONFIG_TOML);
    const env = only(t, 'AWS::ECS::TaskDefinition').props.ContainerDefinitions[0].Environment;
    expect(env).toHaveLength(1);
    expect(env[0].Name).toBe('RATEPOOL_CONFIG_TOML');
    expect(flatten(env[0].Value)).toBe(lambdaToml);
    expect(flatten(authorizerFunction().props.Environment.Variables.RATEPOOL_CONFIG_TOML)).toBe(lambdaToml);
  });

  test('the API Lambda\'s environment is the config only (it publishes no metrics)', () => {
    expect(Object.keys(apiFunction().props.Environment.Variables)).toEqual(['RATEPOOL_CONFIG_TOML']);
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

  test('every method is behind the tenant authorizer and the tenant\'s usage plan', () => {
    const authorizer = only(t, 'AWS::ApiGateway::Authorizer');
    const methods = Object.values(t.findResources('AWS::ApiGateway::Method'));
    expect(methods).toHaveLength(4);
    for (const m of methods) {
      expect(m.Properties.AuthorizationType).toBe('CUSTOM');
      expect(m.Properties.AuthorizerId).toEqual({ Ref: authorizer.id });
      expect(m.Properties.ApiKeyRequired).toBe(true);
    }
    // The usage plan's key comes from the authorizer, never from the client.
    expect(only(t, 'AWS::ApiGateway::RestApi').props.ApiKeySourceType).toBe('AUTHORIZER');
  });

  test('unauthenticated requests never reach the API Lambda: only the stage\'s methods may invoke it', () => {
    const permissions = Object.values(t.findResources('AWS::Lambda::Permission')).filter(
      (p) => JSON.stringify(p.Properties.FunctionName) === JSON.stringify({ 'Fn::GetAtt': [apiFunction().id, 'Arn'] }),
    );
    expect(permissions.length).toBeGreaterThan(0);
    for (const p of permissions) {
      expect(p.Properties.Principal).toBe('apigateway.amazonaws.com');
      // Deployed stage permissions name /prod/; the console's test-invoke ones /test-invoke-stage/ (IAM-authenticated).
      expect(flatten(p.Properties.SourceArn)).toMatch(/^arn:<Ref:AWS::Partition>:execute-api:<Ref:AWS::Region>:<Ref:AWS::AccountId>:<Ref:Api[0-9A-F]+>\/(<Ref:ApiDeploymentStageprod[0-9A-F]+>|test-invoke-stage)\//);
    }
  });

  test('the authorizer: REQUEST on the Authorization header, answers cached 300 s, its own function', () => {
    const a = only(t, 'AWS::ApiGateway::Authorizer').props;
    expect(a).toEqual(
      expect.objectContaining({
        Type: 'REQUEST',
        IdentitySource: 'method.request.header.Authorization',
        AuthorizerResultTtlInSeconds: AUTHORIZER_CACHE_SECS,
      }),
    );
    expect(flatten(a.AuthorizerUri)).toContain(`<GetAtt:${authorizerFunction().id}.Arn>/invocations`);
    // A revoked or rotated key stops working within the process's key refresh + the cache: 6 minutes.
    expect(TENANT_KEYS_MAX_AGE_SECS + AUTHORIZER_CACHE_SECS).toBe(360);
    const invoke = Object.values(t.findResources('AWS::Lambda::Permission')).filter(
      (p) => JSON.stringify(p.Properties.FunctionName) === JSON.stringify({ 'Fn::GetAtt': [authorizerFunction().id, 'Arn'] }),
    );
    expect(invoke).toHaveLength(1);
    expect(invoke[0].Properties.Principal).toBe('apigateway.amazonaws.com');
    expect(flatten(invoke[0].Properties.SourceArn)).toContain(`/authorizers/<Ref:${logicalId(t, 'AWS::ApiGateway::Authorizer', 'TenantAuthorizer')}>`);
  });

  test('the authorizer function: the API\'s bundle with RATEPOOL_LAMBDA=authorizer and the usage key prefix', () => {
    const a = authorizerFunction().props;
    const api = apiFunction().props;
    expect(a.Code).toEqual(api.Code);
    expect(a).toEqual(expect.objectContaining({ Runtime: 'provided.al2023', Architectures: ['arm64'], Handler: 'bootstrap', Timeout: 10 }));
    expect(a.Environment.Variables.RATEPOOL_LAMBDA).toBe('authorizer');
    expect(a.Environment.Variables.RATEPOOL_USAGE_KEY_PREFIX).toBe('Ratepool-usage-key-');
    expect(a.LoggingConfig).toEqual({ LogGroup: { Ref: logicalId(t, 'AWS::Logs::LogGroup', 'AuthorizerFunctionLogs') } });
  });

  test('a usage plan per tenant on the prod stage, with the tenant throttle, keyed by prefix + tenant', () => {
    const plan = only(t, 'AWS::ApiGateway::UsagePlan').props;
    expect(plan.Throttle).toEqual({ RateLimit: 50, BurstLimit: 100 });
    expect(plan.ApiStages).toEqual([
      expect.objectContaining({
        ApiId: { Ref: logicalId(t, 'AWS::ApiGateway::RestApi', 'Api') },
        Stage: { Ref: logicalId(t, 'AWS::ApiGateway::Stage', 'ApiDeploymentStageprod') },
      }),
    ]);
    const key = only(t, 'AWS::ApiGateway::ApiKey');
    expect(key.props.Value).toBe('Ratepool-usage-key-screenplays');
    expect(key.props.Enabled).toBe(true);
    expect(key.props.StageKeys).toBeUndefined();
    const link = only(t, 'AWS::ApiGateway::UsagePlanKey').props;
    expect(link).toEqual({ KeyId: { Ref: key.id }, KeyType: 'API_KEY', UsagePlanId: { Ref: logicalId(t, 'AWS::ApiGateway::UsagePlan', 'UsagePlan') } });
  });

  test('tenants of the file each get theirs; ratepool:tenantThrottles overrides one', () => {
    const text = `${configText()}\n[[tenants]]\nname = "b"\napi_key_env = "TENANT_B_KEY"\n`;
    const other = buildApp({
      'ratepool:configFile': tempConfig(text),
      'ratepool:tenantThrottles': { b: { rateLimit: 5, burstLimit: 7 } },
    });
    try {
      const o = Template.fromStack(other.main);
      const plans = Object.values(o.findResources('AWS::ApiGateway::UsagePlan')).map((p) => [p.Properties.UsagePlanName, p.Properties.Throttle]);
      expect(plans.sort()).toEqual([
        ['Ratepool-b', { RateLimit: 5, BurstLimit: 7 }],
        ['Ratepool-screenplays', { RateLimit: 50, BurstLimit: 100 }],
      ]);
      const values = Object.values(o.findResources('AWS::ApiGateway::ApiKey')).map((k) => k.Properties.Value);
      expect(values.sort()).toEqual(['Ratepool-usage-key-b', 'Ratepool-usage-key-screenplays']);
      // API Gateway's minimum for a key value.
      for (const v of values) expect(v.length).toBeGreaterThanOrEqual(20);
      o.resourceCountIs('AWS::ApiGateway::UsagePlanKey', 2);
    } finally {
      other.cleanup();
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
    const error = (type: string) => JSON.parse(byType[type].ResponseTemplates['application/json']).error;
    expect(Object.keys(byType).sort()).toEqual(
      [
        'ACCESS_DENIED',
        'AUTHORIZER_CONFIGURATION_ERROR',
        'AUTHORIZER_FAILURE',
        'BAD_REQUEST_BODY',
        'BAD_REQUEST_PARAMETERS',
        'INVALID_API_KEY',
        'MISSING_AUTHENTICATION_TOKEN',
        'THROTTLED',
        'UNAUTHORIZED',
      ].sort(),
    );
    // The authorizer refused the key, or the header was missing.
    expect(byType.UNAUTHORIZED.StatusCode).toBe('401');
    expect(byType.UNAUTHORIZED.ResponseParameters).toEqual({ 'gatewayresponse.header.WWW-Authenticate': "'Bearer'" });
    expect(error('UNAUTHORIZED')).toEqual({ type: 'unauthorized', message: 'missing or invalid API key' });
    expect(byType.ACCESS_DENIED.StatusCode).toBe('403');
    expect(error('ACCESS_DENIED').type).toBe('forbidden');
    expect(byType.INVALID_API_KEY.StatusCode).toBe('403');
    expect(byType.THROTTLED.StatusCode).toBe('429');
    expect(error('THROTTLED').type).toBe('rate_limited');
    for (const type of ['AUTHORIZER_FAILURE', 'AUTHORIZER_CONFIGURATION_ERROR']) {
      expect(byType[type].StatusCode).toBe('503');
      expect(error(type).type).toBe('unavailable');
    }
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

  test('the URL is a stack output, and so are the names the runbook needs', () => {
    t.hasOutput('ApiUrl', { Value: Match.anyValue() });
    t.hasOutput('ApiFunctionName', { Value: { Ref: apiFunction().id } });
    t.hasOutput('WorkerClusterName', { Value: { Ref: logicalId(t, 'AWS::ECS::Cluster', 'Cluster') } });
    t.hasOutput('WorkerServiceName', { Value: { 'Fn::GetAtt': [logicalId(t, 'AWS::ECS::Service', 'WorkerService'), 'Name'] } });
  });
});
