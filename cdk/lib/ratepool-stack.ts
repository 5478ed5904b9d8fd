/**
 * The production shape of ratepool (DESIGN.md): API Gateway → Lambda `api` →
 * SQS → Fargate `worker` service, DynamoDB for jobs and the quota ledger,
 * CloudWatch for metrics, dashboard and alarms; and the calls endpoint, an
 * Application Load Balancer in front of the same workers. Everything that
 * varies between deployments comes in through `Settings` (CDK context),
 * never code edits.
 */
import { Aws, CfnOutput, Duration, RemovalPolicy, Stack, StackProps, Validations } from 'aws-cdk-lib';
import * as apigw from 'aws-cdk-lib/aws-apigateway';
import * as dynamodb from 'aws-cdk-lib/aws-dynamodb';
import * as ec2 from 'aws-cdk-lib/aws-ec2';
import { Platform } from 'aws-cdk-lib/aws-ecr-assets';
import * as ecs from 'aws-cdk-lib/aws-ecs';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as lambda from 'aws-cdk-lib/aws-lambda';
import * as logs from 'aws-cdk-lib/aws-logs';
import * as s3 from 'aws-cdk-lib/aws-s3';
import type * as secretsmanager from 'aws-cdk-lib/aws-secretsmanager';
import * as sqs from 'aws-cdk-lib/aws-sqs';
import type { Construct } from 'constructs';
import { CALLS_PORT, CallsEndpoint } from './calls-endpoint';
import {
  AwsResourceNames,
  JOB_RETENTION_DAYS,
  METRICS_NAMESPACE,
  renderConfigToml,
  STEP_LIVE_MARGIN_DAYS,
} from './config-toml';
import { Monitoring } from './monitoring';
import { repoRoot, Settings } from './settings';
import { SQS_LONG_POLL_SECS, WORKER_STOP_TIMEOUT_SECS } from './timing';
import { addWorkerScaling } from './worker-scaling';

export interface RatepoolStackProps extends StackProps {
  readonly settings: Settings;
  /** The keys secret (KeysStack): JSON object, field name → key. */
  readonly keys: secretsmanager.ISecret;
}

/** Lambda's limit on all of a function's environment variables together. */
const LAMBDA_ENV_LIMIT_BYTES = 4096;
const LOG_RETENTION = logs.RetentionDays.ONE_MONTH;
const WORKER_CONTAINER = 'worker';

/**
 * Item-level DynamoDB actions (a TransactWriteItems needs those of its parts).
 * DescribeTable lets the backend check at start that its tables exist; there
 * is no Scan and no table administration.
 */
const TABLE_READ = ['dynamodb:GetItem', 'dynamodb:BatchGetItem', 'dynamodb:Query', 'dynamodb:DescribeTable'];
const TABLE_WRITE = [
  'dynamodb:PutItem',
  'dynamodb:UpdateItem',
  'dynamodb:DeleteItem',
  'dynamodb:BatchWriteItem',
  'dynamodb:ConditionCheckItem',
];

export class RatepoolStack extends Stack {
  readonly jobsTable: dynamodb.Table;
  readonly ledgerTable: dynamodb.Table;
  readonly outputsBucket: s3.Bucket;
  readonly interactiveQueue: sqs.Queue;
  readonly batchQueue: sqs.Queue;
  readonly deadLetterQueue: sqs.Queue;
  readonly api: apigw.RestApi;
  readonly apiFunction: lambda.Function;
  readonly cluster: ecs.Cluster;
  readonly workerService: ecs.FargateService;
  /** Absent with `ratepool:calls=false`. */
  readonly calls?: CallsEndpoint;
  readonly monitoring: Monitoring;

  constructor(scope: Construct, id: string, props: RatepoolStackProps) {
    super(scope, id, props);
    const s = props.settings;

    // ---- storage: jobs + step checkpoints, and the quota ledger ----
    this.jobsTable = new dynamodb.Table(this, 'JobsTable', {
      partitionKey: { name: 'PK', type: dynamodb.AttributeType.STRING },
      sortKey: { name: 'SK', type: dynamodb.AttributeType.STRING },
      billingMode: dynamodb.BillingMode.PAY_PER_REQUEST,
      pointInTimeRecoverySpecification: { pointInTimeRecoveryEnabled: true },
      // Finished jobs' items carry `expires_at` (epoch seconds; [aws] retention_days);
      // response cache entries (`cache#<key>`) carry it too, as their TTL.
      timeToLiveAttribute: 'expires_at',
      removalPolicy: RemovalPolicy.RETAIN,
    });
    this.ledgerTable = new dynamodb.Table(this, 'LedgerTable', {
      partitionKey: { name: 'PK', type: dynamodb.AttributeType.STRING },
      billingMode: dynamodb.BillingMode.PAY_PER_REQUEST,
      pointInTimeRecoverySpecification: { pointInTimeRecoveryEnabled: true },
      removalPolicy: RemovalPolicy.RETAIN,
    });

    // Step answers too large for a DynamoDB item (over 350 KB): the step item
    // points at an object named by job, step and content hash. Each object
    // expires when its step item's TTL does (both are written together).
    // Unversioned: an object is written once and never changed (the same key
    // always holds the same bytes), so versions would only keep expired
    // answers past their retention.
    this.outputsBucket = new s3.Bucket(this, 'OutputsBucket', {
      blockPublicAccess: s3.BlockPublicAccess.BLOCK_ALL,
      encryption: s3.BucketEncryption.S3_MANAGED,
      enforceSSL: true,
      versioned: false,
      objectOwnership: s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
      lifecycleRules: [
        {
          id: 'ExpireWithTheirSteps',
          expiration: Duration.days(JOB_RETENTION_DAYS + STEP_LIVE_MARGIN_DAYS),
          abortIncompleteMultipartUploadAfter: Duration.days(1),
        },
      ],
      removalPolicy: RemovalPolicy.RETAIN,
    });
    Validations.of(this.outputsBucket).acknowledge({
      id: 'AwsSolutions-S1',
      reason:
        'Objects are step answers read and written only by the API Lambda and the workers, which log each job; ' +
        'server access logs would duplicate CloudTrail data events at the cost of a second bucket.',
    });

    // ---- queues ----
    this.deadLetterQueue = new sqs.Queue(this, 'DeadLetterQueue', {
      encryption: sqs.QueueEncryption.SQS_MANAGED,
      enforceSSL: true,
      retentionPeriod: Duration.days(14),
    });
    const workQueue = (qid: string) =>
      new sqs.Queue(this, qid, {
        encryption: sqs.QueueEncryption.SQS_MANAGED,
        enforceSSL: true,
        visibilityTimeout: Duration.seconds(s.visibilityTimeoutSecs),
        receiveMessageWaitTime: Duration.seconds(SQS_LONG_POLL_SECS),
        retentionPeriod: Duration.days(14),
        // The worker dead-letters a poison job itself (and marks it failed with
        // the reason); this only catches a message that kills every worker
        // that takes it before the worker can.
        deadLetterQueue: { queue: this.deadLetterQueue, maxReceiveCount: 50 },
      });
    this.interactiveQueue = workQueue('InteractiveQueue');
    this.batchQueue = workQueue('BatchQueue');

    const names: AwsResourceNames = {
      region: Aws.REGION,
      jobsTable: this.jobsTable.tableName,
      ledgerTable: this.ledgerTable.tableName,
      interactiveQueue: this.interactiveQueue.queueName,
      batchQueue: this.batchQueue.queueName,
      deadLetterQueue: this.deadLetterQueue.queueName,
      secretArn: props.keys.secretArn,
      outputsBucket: this.outputsBucket.bucketName,
    };
    const configToml = renderConfigToml(s, names);
    checkLambdaEnvSize(s);
    const queues = [this.interactiveQueue, this.batchQueue, this.deadLetterQueue];

    this.apiFunction = this.addApiFunction(s, configToml, props.keys, queues);
    this.api = this.addRestApi(s, this.apiFunction);
    const workers = this.addWorkers(s, configToml, props.keys, queues);
    this.cluster = workers.cluster;
    this.workerService = workers.service;
    if (s.calls) {
      this.calls = new CallsEndpoint(this, 'Calls', {
        calls: s.calls,
        vpc: this.cluster.vpc,
        service: this.workerService,
        containerName: WORKER_CONTAINER,
      });
    }

    const scaling = addWorkerScaling(this.workerService, {
      settings: s,
      clusterName: this.cluster.clusterName,
      workQueues: [this.interactiveQueue, this.batchQueue],
      callRequests: this.calls?.targetGroup.metrics.requestCount(),
    });

    // ---- dashboard and alarms ----
    this.monitoring = new Monitoring(this, 'Monitoring', {
      settings: s,
      interactiveQueue: this.interactiveQueue,
      batchQueue: this.batchQueue,
      deadLetterQueue: this.deadLetterQueue,
      api: this.api,
      apiFunction: this.apiFunction,
      clusterName: this.cluster.clusterName,
      serviceName: this.workerService.serviceName,
      scaling,
      calls: this.calls,
    });

    new CfnOutput(this, 'ApiUrl', {
      value: this.api.url,
      description: 'RATEPOOL_URL for the CLI (routes are under /v1)',
    });
    if (this.calls) {
      new CfnOutput(this, 'CallsUrl', {
        value: this.calls.url,
        description: 'The calls endpoint: an OpenAI SDK\'s base_url is this + /v1',
      });
      if (s.calls?.tls) {
        new CfnOutput(this, 'CallsLoadBalancerDnsName', {
          value: this.calls.loadBalancer.loadBalancerDnsName,
          description: `Point ${s.calls.tls.domain} at this (CNAME, or a Route 53 alias)`,
        });
      }
    }
    new CfnOutput(this, 'DashboardName', { value: this.monitoring.dashboard.dashboardName });
    new CfnOutput(this, 'AlarmTopicArn', { value: this.monitoring.alarmTopic.topicArn });
  }

  /** The API's Lambda: the axum router, its role limited to what the API does. */
  private addApiFunction(
    s: Settings,
    configToml: string,
    keys: secretsmanager.ISecret,
    queues: sqs.IQueue[],
  ): lambda.Function {
    const fnLogs = new logs.LogGroup(this, 'ApiFunctionLogs', { retention: LOG_RETENTION });
    const fnRole = new iam.Role(this, 'ApiFunctionRole', {
      assumedBy: new iam.ServicePrincipal('lambda.amazonaws.com'),
      description: 'ratepool API Lambda: its tables, enqueue, keys, metrics',
    });
    // Instead of the AWSLambdaBasicExecutionRole managed policy: its own log group only.
    fnLogs.grantWrite(fnRole);
    const fn = new lambda.Function(this, 'ApiFunction', {
      description: 'ratepool HTTP API (the axum router behind API Gateway)',
      runtime: lambda.Runtime.PROVIDED_AL2023,
      architecture: lambda.Architecture.ARM_64,
      handler: 'bootstrap',
      code: lambda.Code.fromAsset(s.lambdaAsset),
      memorySize: s.lambdaMemoryMiB,
      // API Gateway gives up after 29 s; the API answers at once (202) anyway.
      timeout: Duration.seconds(29),
      role: fnRole,
      logGroup: fnLogs,
      environment: { RATEPOOL_CONFIG_TOML: configToml },
    });
    fnRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        sid: 'JobsReadWrite',
        actions: [...TABLE_READ, ...TABLE_WRITE],
        resources: [this.jobsTable.tableArn],
      }),
    );
    fnRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        sid: 'OutputsRead', // GET /v1/jobs/{id}/result reads large answers
        actions: ['s3:GetObject'],
        resources: [this.outputsBucket.arnForObjects('*')],
      }),
    );
    fnRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        sid: 'LedgerRead', // GET /v1/usage shows headroom
        actions: TABLE_READ,
        resources: [this.ledgerTable.tableArn],
      }),
    );
    fnRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        sid: 'Enqueue',
        actions: ['sqs:SendMessage'],
        resources: [this.interactiveQueue.queueArn, this.batchQueue.queueArn],
      }),
    );
    fnRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        // The queue backend resolves all three queues by name at start.
        sid: 'ResolveQueues',
        actions: ['sqs:GetQueueUrl', 'sqs:GetQueueAttributes'],
        resources: queues.map((q) => q.queueArn),
      }),
    );
    fnRole.addToPrincipalPolicy(readKeys(keys));
    fnRole.addToPrincipalPolicy(putMetrics());
    Validations.of(fnRole).acknowledge(
      {
        id: 'AwsSolutions-IAM5[Resource::*]',
        reason: 'cloudwatch:PutMetricData has no resource-level permissions; the statement is limited by the cloudwatch:namespace condition to Ratepool.',
      },
      outputsObjectsAck(this.outputsBucket, 's3:GetObject: the API reads any step answer a tenant asks for'),
    );
    return fn;
  }

  /** REST API with access logs and throttling in front of the Lambda. */
  private addRestApi(s: Settings, fn: lambda.Function): apigw.RestApi {
    const accessLogs = new logs.LogGroup(this, 'ApiAccessLogs', { retention: LOG_RETENTION });
    const api = new apigw.RestApi(this, 'Api', {
      restApiName: 'ratepool',
      description: 'ratepool: submit and follow jobs (/v1/...)',
      endpointConfiguration: { types: [apigw.EndpointType.REGIONAL] },
      cloudWatchRole: false,
      deployOptions: {
        stageName: 'prod',
        accessLogDestination: new apigw.LogGroupLogDestination(accessLogs),
        accessLogFormat: apigw.AccessLogFormat.jsonWithStandardFields(),
        throttlingRateLimit: s.apiRateLimit,
        throttlingBurstLimit: s.apiBurstLimit,
      },
    });
    this.addRoutes(api, fn);
    Validations.of(api).acknowledge(
      {
        id: 'AwsSolutions-APIG4',
        reason: 'Every /v1 route authenticates the tenant API key (Authorization: Bearer) in the Lambda, which maps the key to its tenant; API Gateway rejects requests without the header before they reach it.',
      },
      {
        id: 'AwsSolutions-COG4',
        reason: 'Clients are backend services holding tenant API keys, not Cognito users; the keys are checked in the Lambda.',
      },
      {
        id: 'AwsSolutions-APIG3',
        reason: 'No WAF web ACL: a request without the Authorization header is refused by API Gateway and one with a wrong key by the Lambda, and the stage throttle (ratepool:apiRateLimit/apiBurstLimit) bounds what abuse can cost. Attach an account-level web ACL where policy requires one.',
      },
      {
        id: 'AwsSolutions-APIG6',
        reason: 'Execution logging needs the account-wide API Gateway CloudWatch role (AWS::ApiGateway::Account), which one stack should not own for the whole account; access logs (ApiAccessLogs) and the Lambda log cover every request.',
      },
    );
    return api;
  }

  /** VPC, cluster, task definition, role and service of the workers. */
  private addWorkers(
    s: Settings,
    configToml: string,
    keys: secretsmanager.ISecret,
    queues: sqs.IQueue[],
  ): { cluster: ecs.Cluster; service: ecs.FargateService } {
    const flowLogs = new logs.LogGroup(this, 'VpcFlowLogs', { retention: LOG_RETENTION });
    const vpc = new ec2.Vpc(this, 'Vpc', {
      maxAzs: 2,
      // NAT: the workers' calls to the provider leave from fixed IPs, which an
      // org's IP allowlist can name.
      natGateways: s.natGateways,
      subnetConfiguration: [
        { name: 'public', subnetType: ec2.SubnetType.PUBLIC, cidrMask: 24 },
        { name: 'workers', subnetType: ec2.SubnetType.PRIVATE_WITH_EGRESS, cidrMask: 20 },
      ],
      // DynamoDB traffic (a ledger write per provider call) skips the NAT.
      gatewayEndpoints: { DynamoDb: { service: ec2.GatewayVpcEndpointAwsService.DYNAMODB } },
      flowLogs: {
        rejected: {
          destination: ec2.FlowLogDestination.toCloudWatchLogs(flowLogs),
          trafficType: ec2.FlowLogTrafficType.REJECT,
        },
      },
    });

    const cluster = new ecs.Cluster(this, 'Cluster', {
      vpc,
      // Also the source of the task counts the scaling policy reads.
      containerInsightsV2: ecs.ContainerInsights.ENABLED,
    });

    const taskDefinition = new ecs.FargateTaskDefinition(this, 'WorkerTask', {
      cpu: s.workerCpu,
      memoryLimitMiB: s.workerMemoryMiB,
      runtimePlatform: {
        cpuArchitecture: ecs.CpuArchitecture.ARM64,
        operatingSystemFamily: ecs.OperatingSystemFamily.LINUX,
      },
    });
    const workerLogs = new logs.LogGroup(this, 'WorkerLogs', { retention: LOG_RETENTION });
    taskDefinition.addContainer(WORKER_CONTAINER, {
      image: ecs.ContainerImage.fromAsset(repoRoot(), {
        file: 'infra/Dockerfile',
        target: 'runtime',
        platform: Platform.LINUX_ARM64,
      }),
      // The image's entrypoint is `ratepool worker`; JSON log lines on stderr.
      // With --listen it also serves the calls endpoint (and /healthz).
      command: s.calls ? ['--listen', `0.0.0.0:${CALLS_PORT}`] : undefined,
      portMappings: s.calls ? [{ containerPort: CALLS_PORT, protocol: ecs.Protocol.TCP }] : undefined,
      logging: ecs.LogDrivers.awsLogs({ streamPrefix: 'worker', logGroup: workerLogs }),
      environment: { RATEPOOL_CONFIG_TOML: configToml },
      // SIGTERM → the worker finishes or hands back its jobs within 100 s;
      // calls have drained before it (timing.ts). 120 s is Fargate's maximum.
      stopTimeout: Duration.seconds(WORKER_STOP_TIMEOUT_SECS),
      // A real init as PID 1 delivers SIGTERM and reaps children.
      linuxParameters: new ecs.LinuxParameters(this, 'WorkerLinux', { initProcessEnabled: true }),
    });
    Validations.of(taskDefinition).acknowledge({
      id: 'AwsSolutions-ECS2',
      reason: 'RATEPOOL_CONFIG_TOML holds only resource names, org endpoints and limits; the API keys stay in Secrets Manager and are read by the worker at start.',
    });

    const workerRole = taskDefinition.taskRole;
    workerRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        sid: 'TablesReadWrite',
        actions: [...TABLE_READ, ...TABLE_WRITE],
        resources: [this.jobsTable.tableArn, this.ledgerTable.tableArn],
      }),
    );
    workerRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        // Large answers: written before their checkpoint, read on resume.
        // Nothing is deleted by hand (the lifecycle rule does it).
        sid: 'OutputsReadWrite',
        actions: ['s3:GetObject', 's3:PutObject'],
        resources: [this.outputsBucket.arnForObjects('*')],
      }),
    );
    workerRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        sid: 'Queues',
        actions: [
          'sqs:ReceiveMessage',
          'sqs:DeleteMessage',
          'sqs:ChangeMessageVisibility',
          'sqs:SendMessage',
          'sqs:GetQueueAttributes',
          'sqs:GetQueueUrl',
        ],
        resources: queues.map((q) => q.queueArn),
      }),
    );
    workerRole.addToPrincipalPolicy(readKeys(keys));
    workerRole.addToPrincipalPolicy(putMetrics());
    const ownTasks = Stack.of(this).formatArn({
      service: 'ecs',
      resource: 'task',
      resourceName: `${cluster.clusterName}/*`,
    });
    workerRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        // Scale-in protection while jobs are in flight ($ECS_AGENT_URI/task-protection/v1/state).
        sid: 'OwnTaskProtection',
        actions: ['ecs:UpdateTaskProtection'],
        resources: [ownTasks],
      }),
    );
    Validations.of(workerRole).acknowledge(
      {
        id: 'AwsSolutions-IAM5[Resource::*]',
        reason: 'cloudwatch:PutMetricData has no resource-level permissions; the statement is limited by the cloudwatch:namespace condition to Ratepool.',
      },
      outputsObjectsAck(this.outputsBucket, 's3:GetObject and s3:PutObject: a worker writes and reads back the answers of every job it runs'),
      {
        id: `AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ecs:<AWS::Region>:<AWS::AccountId>:task/<${this.getLogicalId(cluster.node.defaultChild as ecs.CfnCluster)}>/*]`,
        reason: 'A task protects itself, and task ids are not known before the tasks start; the ARN is limited to the tasks of this cluster.',
      },
    );
    Validations.of(taskDefinition.obtainExecutionRole()).acknowledge({
      id: 'AwsSolutions-IAM5[Resource::*]',
      reason: 'ecr:GetAuthorizationToken (added by CDK for the image pull) has no resource-level permissions; the pull itself is limited to the asset repository.',
    });

    const workerSg = new ec2.SecurityGroup(this, 'WorkerSecurityGroup', {
      vpc,
      // The calls endpoint opens the calls port to its load balancer only.
      description: s.calls
        ? 'ratepool workers: calls from their load balancer; HTTPS out to the provider and AWS APIs'
        : 'ratepool workers: no inbound; HTTPS out to the provider and AWS APIs',
      allowAllOutbound: false,
    });
    workerSg.addEgressRule(ec2.Peer.anyIpv4(), ec2.Port.tcp(443), 'provider APIs and AWS endpoints (HTTPS)');

    const service = new ecs.FargateService(this, 'WorkerService', {
      cluster: cluster,
      taskDefinition,
      // No desiredCount: the scaling policy owns it, and a deploy must not reset it.
      vpcSubnets: { subnetType: ec2.SubnetType.PRIVATE_WITH_EGRESS },
      securityGroups: [workerSg],
      assignPublicIp: false,
      circuitBreaker: { enable: true, rollback: true },
      // New tasks start before old ones get SIGTERM, so a deploy never drops capacity.
      minHealthyPercent: 100,
      maxHealthyPercent: 200,
      platformVersion: ecs.FargatePlatformVersion.LATEST,
      // A new task reads its keys and checks its tables before /healthz answers.
      healthCheckGracePeriod: s.calls ? Duration.seconds(60) : undefined,
      enableECSManagedTags: true,
      propagateTags: ecs.PropagatedTagSource.SERVICE,
    });
    return { cluster, service };
  }

  /**
   * `/v1/{proxy+}` and `/v1/jobs/{proxy+}` go to the Lambda as they are;
   * `POST /v1/jobs` gets its body checked against the job spec's outline
   * first. Every method needs the Authorization header.
   */
  private addRoutes(api: apigw.RestApi, fn: lambda.IFunction): void {
    const integration = new apigw.LambdaIntegration(fn);
    const validator = api.addRequestValidator('Validator', {
      requestValidatorName: 'header-and-body',
      validateRequestParameters: true,
      validateRequestBody: true,
    });
    const authorized: apigw.MethodOptions = {
      requestValidator: validator,
      requestParameters: { 'method.request.header.Authorization': true },
    };
    const jobSpec = api.addModel('JobSpec', {
      contentType: 'application/json',
      modelName: 'JobSpec',
      description: 'The outline of a job spec; the Lambda validates the rest and names the field.',
      schema: {
        schema: apigw.JsonSchemaVersion.DRAFT4,
        type: apigw.JsonSchemaType.OBJECT,
        required: ['steps'],
        properties: {
          steps: { type: apigw.JsonSchemaType.ARRAY, minItems: 1 },
        },
      },
    });

    const v1 = api.root.addResource('v1');
    // (addProxy's defaultMethodOptions drop the validator: methods added explicitly.)
    v1.addProxy({ anyMethod: false }).addMethod('ANY', integration, authorized);
    // An explicit /v1/jobs hides /v1/{proxy+} below it, so it proxies the rest itself.
    const jobs = v1.addResource('jobs');
    jobs.addMethod('POST', integration, { ...authorized, requestModels: { 'application/json': jobSpec } });
    jobs.addMethod('ANY', integration, authorized);
    jobs.addProxy({ anyMethod: false }).addMethod('ANY', integration, authorized);

    // API Gateway's own refusals in the API's error shape (src/api/error.rs).
    api.addGatewayResponse('MissingKey', {
      type: apigw.ResponseType.BAD_REQUEST_PARAMETERS,
      statusCode: '401',
      responseHeaders: { 'WWW-Authenticate': "'Bearer'" },
      templates: { 'application/json': errorBody('unauthorized', 'missing or invalid API key') },
    });
    api.addGatewayResponse('InvalidBody', {
      type: apigw.ResponseType.BAD_REQUEST_BODY,
      statusCode: '400',
      templates: {
        'application/json': errorBody('invalid_request', '$context.error.validationErrorString', 'body'),
      },
    });
    api.addGatewayResponse('NoRoute', {
      type: apigw.ResponseType.MISSING_AUTHENTICATION_TOKEN,
      statusCode: '404',
      templates: { 'application/json': errorBody('not_found', 'no such route') },
    });
  }
}

function errorBody(type: string, message: string, field?: string): string {
  const fieldPart = field === undefined ? '' : `, "field": "${field}"`;
  return `{"error": {"type": "${type}", "message": "${message}"${fieldPart}}}`;
}

function readKeys(keys: secretsmanager.ISecret): iam.PolicyStatement {
  return new iam.PolicyStatement({
    sid: 'ReadKeys',
    actions: ['secretsmanager:GetSecretValue'],
    resources: [keys.secretArn],
  });
}

function putMetrics(): iam.PolicyStatement {
  return new iam.PolicyStatement({
    sid: 'PutRatepoolMetrics',
    actions: ['cloudwatch:PutMetricData'],
    resources: ['*'],
    conditions: { StringEquals: { 'cloudwatch:namespace': METRICS_NAMESPACE } },
  });
}

/** The objects of the outputs bucket: keys are job ids, unknown before the jobs exist. */
function outputsObjectsAck(bucket: s3.Bucket, what: string): { id: string; reason: string } {
  return {
    id: `AwsSolutions-IAM5[Resource::<${Stack.of(bucket).getLogicalId(bucket.node.defaultChild as s3.CfnBucket)}.Arn>/*]`,
    reason: `${what}; object keys start with job ids, unknown before the jobs are submitted, and the ARN is limited to this one bucket.`,
  };
}

/**
 * Lambda refuses more than 4 KB of environment, at deploy time. Rendered with
 * resource names as long as CloudFormation makes them, the config must fit,
 * or synth stops here naming the cause.
 */
function checkLambdaEnvSize(s: Settings): void {
  const longest: AwsResourceNames = {
    region: 'x'.repeat(16),
    jobsTable: 'x'.repeat(128),
    ledgerTable: 'x'.repeat(128),
    interactiveQueue: 'x'.repeat(80),
    batchQueue: 'x'.repeat(80),
    deadLetterQueue: 'x'.repeat(80),
    secretArn: 'x'.repeat(160),
    outputsBucket: 'x'.repeat(63),
  };
  const bytes = Buffer.byteLength('RATEPOOL_CONFIG_TOML' + renderConfigToml(s, longest));
  if (bytes > LAMBDA_ENV_LIMIT_BYTES) {
    throw new Error(
      `RATEPOOL_CONFIG_TOML may reach ${bytes} bytes, over Lambda's ${LAMBDA_ENV_LIMIT_BYTES}-byte environment limit: ` +
        'fewer orgs/models/tenants per deployment, or shorter names.',
    );
  }
}
