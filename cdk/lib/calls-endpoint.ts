/**
 * The calls endpoint on AWS: the OpenAI-compatible door (`POST
 * /v1/chat/completions`, `POST /v1/embeddings`, `GET /v1/models`) served by
 * the worker tasks themselves (`ratepool worker --listen`) behind an
 * internet-facing Application Load Balancer.
 *
 * Not API Gateway → Lambda like the jobs API: a call needs the router and
 * the provider keys, which live in the workers; it may wait minutes for
 * capacity (a buffered API Gateway integration gives up after 29 s, and a
 * streamed Lambda response is billed for the whole wait and ends at 15
 * minutes); and the router's breakers and header-synced state belong to a
 * long-lived process. The ALB streams (SSE) as it receives, and holds an idle
 * connection for up to 4000 s. README "Deploy to AWS" says more.
 */
import { Aws, Duration, RemovalPolicy, Validations } from 'aws-cdk-lib';
import * as ec2 from 'aws-cdk-lib/aws-ec2';
import type * as ecs from 'aws-cdk-lib/aws-ecs';
import * as elbv2 from 'aws-cdk-lib/aws-elasticloadbalancingv2';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as s3 from 'aws-cdk-lib/aws-s3';
import { Construct } from 'constructs';
import type { CallsSettings } from './settings';

/** The port `ratepool worker --listen` serves the calls on, in the task. */
export const CALLS_PORT = 8080;

/** What the load balancer forwards to the workers; anything else (`/metrics`, `/healthz`) stays inside. */
export const CALLS_PATHS = ['/v1/chat/completions', '/v1/embeddings', '/v1/models'];

const HEALTH_CHECK_PATH = '/healthz';

/** Where in the bucket the load balancer writes (`<prefix>/AWSLogs/<account>/...`). */
const ACCESS_LOG_PREFIX = 'calls';

/** As long as the stack's CloudWatch log groups keep theirs. */
const ACCESS_LOG_RETENTION = Duration.days(30);

export interface CallsEndpointProps {
  readonly calls: CallsSettings;
  readonly vpc: ec2.IVpc;
  /** The worker service; its tasks are registered by IP on `CALLS_PORT`. */
  readonly service: ecs.FargateService;
  readonly containerName: string;
}

export class CallsEndpoint extends Construct {
  readonly loadBalancer: elbv2.ApplicationLoadBalancer;
  readonly targetGroup: elbv2.ApplicationTargetGroup;
  /** An OpenAI SDK's `base_url` is this + `/v1`. */
  readonly url: string;

  constructor(scope: Construct, id: string, props: CallsEndpointProps) {
    super(scope, id);
    const tls = props.calls.tls;
    const drainSecs = props.calls.drainSecs;

    const accessLogs = new s3.Bucket(this, 'AccessLogs', {
      // ELB log delivery supports S3-managed keys only.
      encryption: s3.BucketEncryption.S3_MANAGED,
      blockPublicAccess: s3.BlockPublicAccess.BLOCK_ALL,
      objectOwnership: s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
      enforceSSL: true,
      lifecycleRules: [{ id: 'expire', expiration: ACCESS_LOG_RETENTION }],
      // Kept when the stack goes: they may be wanted after it.
      removalPolicy: RemovalPolicy.RETAIN,
    });
    // The load balancer's own writer in every region; `logAccessLogs()`
    // would need the region at synth to pick an ELB account.
    accessLogs.addToResourcePolicy(
      new iam.PolicyStatement({
        sid: 'ElbLogDelivery',
        principals: [new iam.ServicePrincipal('logdelivery.elasticloadbalancing.amazonaws.com')],
        actions: ['s3:PutObject'],
        resources: [accessLogs.arnForObjects(`${ACCESS_LOG_PREFIX}/AWSLogs/${Aws.ACCOUNT_ID}/*`)],
      }),
    );
    Validations.of(accessLogs).acknowledge({
      id: 'AwsSolutions-S1',
      reason:
        'This bucket holds the load balancer access logs; S3 access logs of it would need another bucket for ' +
        'logs of logs. Only ELB log delivery may write here, public access is blocked and TLS enforced; where ' +
        'reads must be audited, CloudTrail S3 data events (account-wide) cover them.',
    });

    const securityGroup = new ec2.SecurityGroup(this, 'LoadBalancerSecurityGroup', {
      vpc: props.vpc,
      description: 'ratepool calls load balancer: clients in, workers on the calls port out',
      // The one egress rule (to the workers, on CALLS_PORT) is added when
      // the target group is attached to a listener.
      allowAllOutbound: false,
    });
    const publicPorts = tls ? [443, 80] : [80];
    for (const port of publicPorts) {
      securityGroup.addIngressRule(
        ec2.Peer.anyIpv4(),
        ec2.Port.tcp(port),
        port === 443 ? 'calls (HTTPS)' : tls ? 'redirect to HTTPS' : 'calls (plain HTTP, ratepool:allowHttp)',
      );
    }
    Validations.of(securityGroup).acknowledge({
      id: 'AwsSolutions-EC23',
      reason:
        'The calls endpoint serves application backends wherever they run; each call is authenticated by the ' +
        'tenant API key in the worker, and only the calls paths reach it.',
    });

    this.loadBalancer = new elbv2.ApplicationLoadBalancer(this, 'LoadBalancer', {
      vpc: props.vpc,
      internetFacing: true,
      vpcSubnets: { subnetType: ec2.SubnetType.PUBLIC },
      securityGroup,
      // A call waiting for capacity sends nothing until its answer: the
      // connection must stay open for the longest call (timing.ts).
      idleTimeout: Duration.seconds(drainSecs),
      dropInvalidHeaderFields: true,
      deletionProtection: true,
    });
    this.loadBalancer.setAttribute('access_logs.s3.enabled', 'true');
    this.loadBalancer.setAttribute('access_logs.s3.bucket', accessLogs.bucketName);
    this.loadBalancer.setAttribute('access_logs.s3.prefix', ACCESS_LOG_PREFIX);
    // The load balancer checks it may write when access logs are turned on.
    (this.loadBalancer.node.defaultChild as elbv2.CfnLoadBalancer).node.addDependency(accessLogs);

    this.targetGroup = new elbv2.ApplicationTargetGroup(this, 'Targets', {
      vpc: props.vpc,
      targetType: elbv2.TargetType.IP,
      protocol: elbv2.ApplicationProtocol.HTTP,
      port: CALLS_PORT,
      targets: [props.service.loadBalancerTarget({ containerName: props.containerName, containerPort: CALLS_PORT })],
      // Calls last from milliseconds to minutes: send each to the task with
      // the fewest in flight rather than in turn.
      loadBalancingAlgorithmType: elbv2.TargetGroupLoadBalancingAlgorithmType.LEAST_OUTSTANDING_REQUESTS,
      // A stopping task keeps its calls until they end; SIGTERM comes after (timing.ts).
      deregistrationDelay: Duration.seconds(drainSecs),
      healthCheck: {
        path: HEALTH_CHECK_PATH,
        healthyHttpCodes: '200',
        interval: Duration.seconds(10),
        timeout: Duration.seconds(5),
        // In service 20 s after it answers; out after 30 s of failures.
        healthyThresholdCount: 2,
        unhealthyThresholdCount: 3,
      },
    });

    const notFound = elbv2.ListenerAction.fixedResponse(404, {
      contentType: 'application/json',
      // The API's error shape (src/api/error.rs), which OpenAI SDKs also read.
      messageBody: JSON.stringify({ error: { type: 'not_found', message: 'no such route' } }),
    });
    // Security group rules are the ones above, not the listener's `open` ones.
    const callsListener = tls
      ? this.loadBalancer.addListener('Https', {
          protocol: elbv2.ApplicationProtocol.HTTPS,
          port: 443,
          open: false,
          certificates: [elbv2.ListenerCertificate.fromArn(tls.certificateArn)],
          // TLS 1.3, and 1.2 with forward-secret AES-GCM suites only; post-quantum key exchange offered.
          sslPolicy: elbv2.SslPolicy.TLS13_12_RES_PQ,
          defaultAction: notFound,
        })
      : this.loadBalancer.addListener('Http', {
          protocol: elbv2.ApplicationProtocol.HTTP,
          port: 80,
          open: false,
          defaultAction: notFound,
        });
    callsListener.addAction('Calls', {
      priority: 10,
      conditions: [elbv2.ListenerCondition.pathPatterns(CALLS_PATHS)],
      action: elbv2.ListenerAction.forward([this.targetGroup]),
    });
    if (tls) {
      this.loadBalancer.addListener('HttpRedirect', {
        protocol: elbv2.ApplicationProtocol.HTTP,
        port: 80,
        open: false,
        defaultAction: elbv2.ListenerAction.redirect({ protocol: 'HTTPS', port: '443', permanent: true }),
      });
    }

    this.url = tls ? `https://${tls.domain}` : `http://${this.loadBalancer.loadBalancerDnsName}`;
  }
}
