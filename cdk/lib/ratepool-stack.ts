/**
 * The production shape of ratepool (DESIGN.md): API Gateway (a tenant
 * authorizer, a usage plan per tenant) → Lambda `api` → SQS → Fargate
 * `worker` service, DynamoDB for jobs and the quota ledger, CloudWatch for
 * metrics, dashboard and alarms; and the calls endpoint, an Application Load
 * Balancer in front of the same workers. Everything that varies between
 * deployments comes in through `Settings` (the config file and CDK context),
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
  longestNames,
  renderConfigToml,
  STEP_LIVE_MARGIN_DAYS,
} from './config-toml';
import { Monitoring } from './monitoring';
import { repoRoot, Settings } from './settings';
import { SQS_LONG_POLL_SECS, WORKER_STOP_TIMEOUT_SECS } from './timing';
import { addWorkerScaling } from './worker-scaling';

export interface RatepoolStackProps extends StackProps {
  readonly settings: Settings;
  /** Tenants' API keys (KeysStack): read by the API Lambda, the authorizer, and workers serving calls. */
  readonly tenantKeys: secretsmanager.ISecret;
  /** Org keys and webhook secrets (KeysStack): read by the workers only. */
  readonly workerKeys: secretsmanager.ISecret;
}

/** Lambda's limit on all of a function's environment variables together. */
const LAMBDA_ENV_LIMIT_BYTES = 4096;
/** The authorizer checks a key against the few it holds: the smallest size that starts fast. */
const AUTHORIZER_MEMORY_MIB = 256;
const LOG_RETENTION = logs.RetentionDays.ONE_MONTH;
const WORKER_CONTAINER = 'worker';

/**
 * How long API Gateway keeps an authorizer's answer for one Authorization
 * header. With the 60 s for which a process uses the tenant keys it read
 * (src/api/keyring.rs, TENANT_KEYS_MAX_AGE), a rotated or revoked tenant key
 * stops working within 60 s + this: 6 minutes.
 */
export const AUTHORIZER_CACHE_SECS = 300;
/** TENANT_KEYS_MAX_AGE of the Rust side: how stale a process's tenant keys may be. */
export const TENANT_KEYS_MAX_AGE_SECS = 60;

/**
 * The DynamoDB actions each role's code calls (src/aws): item reads and
 * writes (a TransactWriteItems is authorized as its parts: Put, Update,
 * ConditionCheck), and DescribeTable, with which the backend checks at start
 * that its tables exist. No Scan, no Batch*, no table administration (that is
 * `ratepool aws init`, for dev accounts).
 */
const DESCRIBE = 'dynamodb:DescribeTable';
/** Jobs, steps, usage, the unsent list, cached answers and stored calls. */
const JOBS_ITEMS = ['dynamodb:GetItem', 'dynamodb:Query', 'dynamodb:PutItem', 'dynamodb:UpdateItem', 'dynamodb:DeleteItem'];
/** The ledger: a strongly consistent read of a bucket, a conditional update to charge it. */
const LEDGER_READ = ['dynamodb:GetItem', DESCRIBE];

export class RatepoolStack extends Stack {
  readonly jobsTable: dynamodb.Table;
  readonly ledgerTable: dynamodb.Table;
  readonly outputsBucket: s3.Bucket;
  readonly interactiveQueue: sqs.Queue;
  readonly batchQueue: sqs.Queue;
  readonly deadLetterQueue: sqs.Queue;
  readonly api: apigw.RestApi;
  readonly apiFunction: lambda.Function;
  /** The same bundle as `apiFunction`, answering API Gateway's REQUEST authorizer events. */
  readonly authorizerFunction: lambda.Function;
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
      tenantKeysSecretArn: props.tenantKeys.secretArn,
      workerKeysSecretArn: props.workerKeys.secretArn,
      outputsBucket: this.outputsBucket.bucketName,
    };
    const configToml = renderConfigToml(s.configFile.text, names);
    // Not a secret: an identifier the authorizer answers with and each
    // tenant's API key (usage plan) has as its value. Clients never send it.
    const usageKeyPrefix = `${this.stackName}-usage-key-`;
    checkLambdaEnvSize(s, this.stackName, usageKeyPrefix);
    const queues = [this.interactiveQueue, this.batchQueue, this.deadLetterQueue];

    this.apiFunction = this.addApiFunction(s, configToml, props.tenantKeys, queues);
    this.authorizerFunction = this.addAuthorizerFunction(s, configToml, props.tenantKeys, usageKeyPrefix);
    this.api = this.addRestApi(s, this.apiFunction, this.authorizerFunction, usageKeyPrefix);
    const workers = this.addWorkers(s, configToml, props);
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
      authorizerFunction: this.authorizerFunction,
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
    new CfnOutput(this, 'ApiFunctionName', {
      value: this.apiFunction.functionName,
      description: 'Its RATEPOOL_CONFIG_TOML is the deployed config, e.g. for `ratepool dlq` (README: runbook)',
    });
    new CfnOutput(this, 'WorkerClusterName', { value: this.cluster.clusterName });
    new CfnOutput(this, 'WorkerServiceName', {
      value: this.workerService.serviceName,
      description: 'aws ecs update-service --cluster <WorkerClusterName> --service <this> --force-new-deployment: workers read WorkerKeys again',
    });
    new CfnOutput(this, 'DashboardName', { value: this.monitoring.dashboard.dashboardName });
    new CfnOutput(this, 'AlarmTopicArn', { value: this.monitoring.alarmTopic.topicArn });
  }

  /** The API's Lambda: the axum router, its role limited to what the API does. */
  private addApiFunction(
    s: Settings,
    configToml: string,
    tenantKeys: secretsmanager.ISecret,
    queues: sqs.IQueue[],
  ): lambda.Function {
    const fnLogs = new logs.LogGroup(this, 'ApiFunctionLogs', { retention: LOG_RETENTION });
    const fnRole = new iam.Role(this, 'ApiFunctionRole', {
      assumedBy: new iam.ServicePrincipal('lambda.amazonaws.com'),
      description: 'ratepool API Lambda: the jobs table, ledger reads, enqueue, tenant keys',
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
        // Submit (a transaction of puts and updates), status, result pages,
        // cancel, usage, idempotent replays; DeleteItem takes a job off the
        // unsent list once its message is sent.
        sid: 'JobsReadWrite',
        actions: [...JOBS_ITEMS, DESCRIBE],
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
        sid: 'LedgerRead', // GET /v1/usage shows headroom; submissions check the tenant's quota bucket
        actions: LEDGER_READ,
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
        // The queue backend resolves all three queues by name at start;
        // /healthz and /metrics read their depths.
        sid: 'ResolveQueues',
        actions: ['sqs:GetQueueUrl', 'sqs:GetQueueAttributes'],
        resources: queues.map((q) => q.queueArn),
      }),
    );
    fnRole.addToPrincipalPolicy(readSecret('ReadTenantKeys', tenantKeys));
    Validations.of(fnRole).acknowledge(
      outputsObjectsAck(this.outputsBucket, 's3:GetObject: the API reads any step answer a tenant asks for'),
    );
    return fn;
  }

  /**
   * The tenant authorizer: the API's bundle again (`RATEPOOL_LAMBDA=authorizer`),
   * reading only the tenant keys. It answers a valid `Bearer` key with an
   * Allow for the whole stage (one cached answer serves every route), the
   * tenant as principal and its usage plan's key; anything else is 401.
   */
  private addAuthorizerFunction(
    s: Settings,
    configToml: string,
    tenantKeys: secretsmanager.ISecret,
    usageKeyPrefix: string,
  ): lambda.Function {
    const fnLogs = new logs.LogGroup(this, 'AuthorizerFunctionLogs', { retention: LOG_RETENTION });
    const fnRole = new iam.Role(this, 'AuthorizerFunctionRole', {
      assumedBy: new iam.ServicePrincipal('lambda.amazonaws.com'),
      description: 'ratepool tenant authorizer: reads the tenant keys, nothing else',
    });
    fnLogs.grantWrite(fnRole);
    const fn = new lambda.Function(this, 'AuthorizerFunction', {
      description: 'ratepool tenant authorizer (API Gateway REQUEST authorizer: Authorization: Bearer <tenant key>)',
      runtime: lambda.Runtime.PROVIDED_AL2023,
      architecture: lambda.Architecture.ARM_64,
      handler: 'bootstrap',
      code: lambda.Code.fromAsset(s.lambdaAsset),
      memorySize: AUTHORIZER_MEMORY_MIB,
      // A secret read at most; API Gateway answers 500 to a slow authorizer anyway.
      timeout: Duration.seconds(10),
      role: fnRole,
      logGroup: fnLogs,
      environment: {
        RATEPOOL_LAMBDA: 'authorizer',
        RATEPOOL_CONFIG_TOML: configToml,
        RATEPOOL_USAGE_KEY_PREFIX: usageKeyPrefix,
      },
    });
    fnRole.addToPrincipalPolicy(readSecret('ReadTenantKeys', tenantKeys));
    return fn;
  }

  /**
   * REST API with access logs in front of the Lambda: every method behind the
   * tenant authorizer, and a usage plan (throttle) per tenant under the
   * stage-wide throttle.
   */
  private addRestApi(s: Settings, fn: lambda.Function, authorizerFn: lambda.Function, usageKeyPrefix: string): apigw.RestApi {
    const accessLogs = new logs.LogGroup(this, 'ApiAccessLogs', { retention: LOG_RETENTION });
    const api = new apigw.RestApi(this, 'Api', {
      restApiName: 'ratepool',
      description: 'ratepool: submit and follow jobs (/v1/...)',
      endpointConfiguration: { types: [apigw.EndpointType.REGIONAL] },
      cloudWatchRole: false,
      // The usage plan's key comes from the authorizer (usageIdentifierKey),
      // never from the client: it is not a secret, the tenant key is.
      apiKeySourceType: apigw.ApiKeySourceType.AUTHORIZER,
      deployOptions: {
        stageName: 'prod',
        accessLogDestination: new apigw.LogGroupLogDestination(accessLogs),
        accessLogFormat: apigw.AccessLogFormat.jsonWithStandardFields(),
        // The cap over all tenants together; each tenant's own is its usage plan.
        throttlingRateLimit: s.apiRateLimit,
        throttlingBurstLimit: s.apiBurstLimit,
      },
    });
    const authorizer = new apigw.RequestAuthorizer(this, 'TenantAuthorizer', {
      authorizerName: 'tenant-key',
      handler: authorizerFn,
      // A request without the header is refused (401) without invoking it.
      identitySources: [apigw.IdentitySource.header('Authorization')],
      resultsCacheTtl: Duration.seconds(AUTHORIZER_CACHE_SECS),
    });
    this.addRoutes(api, fn, authorizer);

    for (const tenant of s.tenants) {
      const key = new apigw.ApiKey(this, `UsageKey-${tenant.name}`, {
        apiKeyName: `${this.stackName}-${tenant.name}`,
        description: `ratepool tenant ${tenant.name}: the usage plan identifier its authorizer answers with (not a secret)`,
        value: `${usageKeyPrefix}${tenant.name}`,
        enabled: true,
      });
      const plan = new apigw.UsagePlan(this, `UsagePlan-${tenant.name}`, {
        name: `${this.stackName}-${tenant.name}`,
        description: `ratepool tenant ${tenant.name}: its throttle`,
        throttle: { rateLimit: tenant.throttle.rateLimit, burstLimit: tenant.throttle.burstLimit },
        apiStages: [{ api, stage: api.deploymentStage }],
      });
      plan.addApiKey(key);
    }

    Validations.of(api).acknowledge(
      {
        id: 'AwsSolutions-COG4',
        reason: 'Clients are backend services holding tenant API keys, not Cognito users; every method has the tenant authorizer (a Lambda REQUEST authorizer on the Authorization header).',
      },
      {
        id: 'AwsSolutions-APIG3',
        reason: 'No WAF web ACL: a request without a valid tenant key is refused by the authorizer before the API Lambda runs, and each tenant has its usage plan throttle under the stage throttle (ratepool:apiRateLimit/apiBurstLimit). Attach an account-level web ACL where policy requires one.',
      },
      {
        id: 'AwsSolutions-APIG6',
        reason: 'Execution logging needs the account-wide API Gateway CloudWatch role (AWS::ApiGateway::Account), which one stack should not own for the whole account; access logs (ApiAccessLogs), the authorizer log and the Lambda log cover every request.',
      },
    );
    return api;
  }

  /** VPC, cluster, task definition, role and service of the workers. */
  private addWorkers(
    s: Settings,
    configToml: string,
    keys: { tenantKeys: secretsmanager.ISecret; workerKeys: secretsmanager.ISecret },
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
      reason: 'RATEPOOL_CONFIG_TOML holds the config file (names of secret fields, never their values) and resource names; the keys stay in Secrets Manager and are read by the worker at start.',
    });

    const workerRole = taskDefinition.taskRole;
    workerRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        // Leases, checkpoints, usage, the unsent sweep, cached answers,
        // stored calls; ConditionCheckItem in the webhook report's transaction.
        sid: 'JobsReadWrite',
        actions: [...JOBS_ITEMS, 'dynamodb:ConditionCheckItem', DESCRIBE],
        resources: [this.jobsTable.tableArn],
      }),
    );
    workerRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        sid: 'LedgerReadWrite', // charge (conditional update) and read the orgs' and tenants' buckets
        actions: [...LEDGER_READ, 'dynamodb:UpdateItem'],
        resources: [this.ledgerTable.tableArn],
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
    // Queue depths are read by /healthz, which only a worker serving calls has.
    const depths = s.calls ? ['sqs:GetQueueAttributes'] : [];
    workerRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        // Receive, heartbeat (visibility), finish (delete), defer and hand
        // back (send a fresh copy, delete the old one).
        sid: 'WorkQueues',
        actions: [
          'sqs:ReceiveMessage',
          'sqs:DeleteMessage',
          'sqs:ChangeMessageVisibility',
          'sqs:SendMessage',
          'sqs:GetQueueUrl',
          ...depths,
        ],
        resources: [this.interactiveQueue.queueArn, this.batchQueue.queueArn],
      }),
    );
    workerRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        // Dead-letters poison and unreadable messages; never reads the DLQ
        // (that is `ratepool dlq`, run by an operator).
        sid: 'DeadLetter',
        actions: ['sqs:SendMessage', 'sqs:GetQueueUrl', ...depths],
        resources: [this.deadLetterQueue.queueArn],
      }),
    );
    workerRole.addToPrincipalPolicy(readSecret('ReadWorkerKeys', keys.workerKeys));
    // The calls endpoint authenticates tenants in the worker.
    if (s.calls) workerRole.addToPrincipalPolicy(readSecret('ReadTenantKeys', keys.tenantKeys));
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
   * first. Every method is behind the tenant authorizer and the tenant's
   * usage plan.
   */
  private addRoutes(api: apigw.RestApi, fn: lambda.IFunction, authorizer: apigw.IAuthorizer): void {
    const integration = new apigw.LambdaIntegration(fn);
    const validator = api.addRequestValidator('Validator', {
      requestValidatorName: 'header-and-body',
      validateRequestParameters: true,
      validateRequestBody: true,
    });
    const authorized: apigw.MethodOptions = {
      requestValidator: validator,
      requestParameters: { 'method.request.header.Authorization': true },
      authorizationType: apigw.AuthorizationType.CUSTOM,
      authorizer,
      // The tenant's usage plan (throttle), keyed by what the authorizer answers.
      apiKeyRequired: true,
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
    const unauthorized = errorBody('unauthorized', 'missing or invalid API key');
    api.addGatewayResponse('Unauthorized', {
      // The authorizer refused the key, or there was no Authorization header.
      type: apigw.ResponseType.UNAUTHORIZED,
      statusCode: '401',
      responseHeaders: { 'WWW-Authenticate': "'Bearer'" },
      templates: { 'application/json': unauthorized },
    });
    api.addGatewayResponse('AccessDenied', {
      type: apigw.ResponseType.ACCESS_DENIED,
      statusCode: '403',
      templates: { 'application/json': errorBody('forbidden', 'this API key may not call this route') },
    });
    api.addGatewayResponse('NoUsagePlan', {
      // The authorizer answered a usage key no usage plan of this stage has.
      type: apigw.ResponseType.INVALID_API_KEY,
      statusCode: '403',
      templates: { 'application/json': errorBody('forbidden', 'this tenant has no usage plan on this API') },
    });
    api.addGatewayResponse('Throttled', {
      type: apigw.ResponseType.THROTTLED,
      statusCode: '429',
      templates: {
        'application/json': errorBody('rate_limited', 'too many requests: over this API\'s throttle for the tenant; retry with backoff'),
      },
    });
    for (const [id, type] of [
      ['AuthorizerFailure', apigw.ResponseType.AUTHORIZER_FAILURE],
      ['AuthorizerConfiguration', apigw.ResponseType.AUTHORIZER_CONFIGURATION_ERROR],
    ] as const) {
      api.addGatewayResponse(id, {
        type,
        statusCode: '503',
        templates: { 'application/json': errorBody('unavailable', 'the API key check is unavailable; retry with backoff') },
      });
    }
    api.addGatewayResponse('MissingKey', {
      type: apigw.ResponseType.BAD_REQUEST_PARAMETERS,
      statusCode: '401',
      responseHeaders: { 'WWW-Authenticate': "'Bearer'" },
      templates: { 'application/json': unauthorized },
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

function readSecret(sid: string, secret: secretsmanager.ISecret): iam.PolicyStatement {
  return new iam.PolicyStatement({
    sid,
    actions: ['secretsmanager:GetSecretValue'],
    resources: [secret.secretArn],
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
 * resource names as long as CloudFormation makes them, the authorizer's
 * environment (the larger: the config and two more variables) must fit, or
 * synth stops here naming the file.
 */
function checkLambdaEnvSize(s: Settings, stackName: string, usageKeyPrefix: string): void {
  const config = renderConfigToml(s.configFile.text, longestNames(stackName));
  const env: Record<string, string> = {
    RATEPOOL_CONFIG_TOML: config,
    RATEPOOL_LAMBDA: 'authorizer',
    RATEPOOL_USAGE_KEY_PREFIX: usageKeyPrefix,
  };
  const bytes = Object.entries(env).reduce((n, [k, v]) => n + Buffer.byteLength(k) + Buffer.byteLength(v), 0);
  if (bytes > LAMBDA_ENV_LIMIT_BYTES) {
    const fileBytes = Buffer.byteLength(s.configFile.text);
    throw new Error(
      `config file ${s.configFile.shownPath}: ${fileBytes} bytes, which with the [storage]/[aws] part the stack appends ` +
        `makes a Lambda environment of up to ${bytes} bytes, over Lambda's ${LAMBDA_ENV_LIMIT_BYTES}-byte limit: ` +
        `trim ${bytes - LAMBDA_ENV_LIMIT_BYTES} bytes (comments first), or split the deployment (fewer orgs, models or tenants per file)`,
    );
  }
}
