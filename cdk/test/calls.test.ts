import { Template } from 'aws-cdk-lib/assertions';
import { parse } from 'smol-toml';
import { CALLS_PATHS } from '../lib/calls-endpoint';
import {
  ALB_MAX_IDLE_TIMEOUT_SECS,
  HAND_BACK_SECS,
  MAX_DEREGISTRATION_DELAY_SECS,
  MAX_SHUTDOWN_GRACE_SECS,
  SQS_LONG_POLL_SECS,
  WORKER_STOP_TIMEOUT_SECS,
} from '../lib/timing';
import {
  buildApp,
  Built,
  editedExample,
  flatten,
  JOBS_ONLY,
  logicalId,
  only,
  PLAIN_HTTP,
  templates,
  TLS_CONTEXT,
} from './helpers';

// One synth per shape: production (TLS, the default of these tests), a dev
// stack on plain HTTP, and a jobs-only stack without the endpoint.
let tlsApp: Built;
let httpApp: Built;
let jobsApp: Built;
let t: Template;
let h: Template;
let j: Template;
beforeAll(() => {
  tlsApp = buildApp();
  httpApp = buildApp(PLAIN_HTTP);
  jobsApp = buildApp(JOBS_ONLY);
  t = templates(tlsApp).main;
  h = templates(httpApp).main;
  j = templates(jobsApp).main;
});
afterAll(() => [tlsApp, httpApp, jobsApp].forEach((b) => b.cleanup()));

const LB = 'AWS::ElasticLoadBalancingV2::LoadBalancer';
const LISTENER = 'AWS::ElasticLoadBalancingV2::Listener';
const RULE = 'AWS::ElasticLoadBalancingV2::ListenerRule';
const TG = 'AWS::ElasticLoadBalancingV2::TargetGroup';

const ref = (template: Template, type: string, prefix: string) => ({ Ref: logicalId(template, type, prefix) });
const attributes = (list: { Key: string; Value: unknown }[]) => Object.fromEntries(list.map((a) => [a.Key, a.Value]));
const lbAttributes = (template: Template) => attributes(only(template, LB).props.LoadBalancerAttributes);
const tgAttributes = (template: Template) => attributes(only(template, TG).props.TargetGroupAttributes);
const sgId = (template: Template, prefix: string) => ({
  'Fn::GetAtt': [logicalId(template, 'AWS::EC2::SecurityGroup', prefix), 'GroupId'],
});
/** The worker's RATEPOOL_CONFIG_TOML, parsed. */
const workerConfig = (template: Template): any => {
  const [c] = only(template, 'AWS::ECS::TaskDefinition').props.ContainerDefinitions;
  const env = (c.Environment as { Name: string; Value: unknown }[]).find((e) => e.Name === 'RATEPOOL_CONFIG_TOML')!;
  return parse(flatten(env.Value));
};

describe('load balancer', () => {
  test('internet-facing ALB in the public subnets, behind its own security group', () => {
    const lb = only(t, LB).props;
    expect(lb.Type).toBe('application');
    expect(lb.Scheme).toBe('internet-facing');
    const publicSubnets = Object.keys(t.findResources('AWS::EC2::Subnet'))
      .filter((id) => id.startsWith('Vpcpublic'))
      .map((id) => ({ Ref: id }));
    expect(lb.Subnets).toEqual(publicSubnets);
    expect(publicSubnets).toHaveLength(2);
    expect(lb.SecurityGroups).toEqual([sgId(t, 'CallsLoadBalancerSecurityGroup')]);
  });

  test('deletion protection, invalid header fields dropped, access logs to its bucket under calls/', () => {
    expect(lbAttributes(t)).toEqual(
      expect.objectContaining({
        'deletion_protection.enabled': 'true',
        'routing.http.drop_invalid_header_fields.enabled': 'true',
        'access_logs.s3.enabled': 'true',
        'access_logs.s3.bucket': ref(t, 'AWS::S3::Bucket', 'CallsAccessLogs'),
        'access_logs.s3.prefix': 'calls',
      }),
    );
    // Turning access logs on fails unless the bucket policy already lets ELB write.
    expect(only(t, LB).resource.DependsOn).toEqual(
      expect.arrayContaining([logicalId(t, 'AWS::S3::BucketPolicy', 'CallsAccessLogs')]),
    );
  });
});

describe('timeouts: a call outlives neither the idle timeout nor a stopping task', () => {
  test('idle timeout and deregistration delay: max_wait_cap_secs 300 + timeout_secs 120 + margin 30', () => {
    expect(lbAttributes(t)['idle_timeout.timeout_seconds']).toBe('450');
    expect(tgAttributes(t)['deregistration_delay.timeout_seconds']).toBe('450');
  });

  test('both cover the longest call the worker\'s own config allows: [calls] max_wait_cap_secs + the slowest org\'s timeout_secs', () => {
    // A Ratepool-Max-Wait header may ask for up to max_wait_cap_secs, more than max_wait_secs.
    const cfg = workerConfig(t);
    const longest = Math.max(cfg.calls.max_wait_secs, cfg.calls.max_wait_cap_secs) + Math.max(...cfg.orgs.map((o: any) => o.timeout_secs));
    expect(Number(lbAttributes(t)['idle_timeout.timeout_seconds'])).toBeGreaterThan(longest);
    expect(Number(tgAttributes(t)['deregistration_delay.timeout_seconds'])).toBeGreaterThan(longest);
  });

  test.each([
    ['max_wait_secs = 60\nmax_wait_cap_secs = 300', 'max_wait_secs = 60\nmax_wait_cap_secs = 60', '210'],
    ['max_wait_cap_secs = 300', 'max_wait_cap_secs = 3450', '3600'],
    ['timeout_secs = 120\nfallback = true', 'timeout_secs = 600\nfallback = true', '930'],
  ])('the config file\'s %j as %j: idle timeout and deregistration delay %s', (from, to, expected) => {
    const other = buildApp(editedExample((text) => text.replace(from, to)));
    try {
      const o = Template.fromStack(other.main);
      expect(lbAttributes(o)['idle_timeout.timeout_seconds']).toBe(expected);
      expect(tgAttributes(o)['deregistration_delay.timeout_seconds']).toBe(expected);
      expect(Number(expected)).toBeLessThanOrEqual(Math.min(ALB_MAX_IDLE_TIMEOUT_SECS, MAX_DEREGISTRATION_DELAY_SECS));
    } finally {
      other.cleanup();
    }
  });

  test('a wait past what the ALB can hold stops synth, naming the file\'s line', () => {
    expect(() => buildApp(editedExample((text) => text.replace('max_wait_cap_secs = 300', 'max_wait_cap_secs = 3451')))).toThrow(
      /^config file .*: line \d+: a call may last \[calls\] max_wait_cap_secs \(3451 s\)/,
    );
  });

  test('SIGTERM comes after the drain, and what follows it fits the stop timeout', () => {
    const [c] = only(t, 'AWS::ECS::TaskDefinition').props.ContainerDefinitions;
    expect(c.StopTimeout).toBe(WORKER_STOP_TIMEOUT_SECS);
    const cfg = workerConfig(t);
    expect(cfg.workers.shutdown_grace_secs).toBe(70);
    // SIGTERM to exit: the long poll in progress + the grace + handing back
    // the jobs still held (a visibility change each), within the 100 s the
    // design allows, which leaves the stop timeout a margin before SIGKILL.
    expect(SQS_LONG_POLL_SECS + cfg.workers.shutdown_grace_secs + HAND_BACK_SECS).toBeLessThanOrEqual(100);
    expect(MAX_SHUTDOWN_GRACE_SECS).toBe(70);
    expect(c.StopTimeout).toBeGreaterThan(100);
    for (const q of ['InteractiveQueue', 'BatchQueue']) {
      expect(t.toJSON().Resources[logicalId(t, 'AWS::SQS::Queue', q)].Properties.ReceiveMessageWaitTimeSeconds).toBe(
        SQS_LONG_POLL_SECS,
      );
    }
  });
});

describe('target group and service', () => {
  test('IP targets on the calls port, least outstanding requests, health check GET /healthz', () => {
    const tg = only(t, TG).props;
    expect(tg).toEqual(
      expect.objectContaining({
        TargetType: 'ip',
        Protocol: 'HTTP',
        Port: 8080,
        HealthCheckPath: '/healthz',
        Matcher: { HttpCode: '200' },
        HealthCheckIntervalSeconds: 10,
        HealthCheckTimeoutSeconds: 5,
        HealthyThresholdCount: 2,
        UnhealthyThresholdCount: 3,
      }),
    );
    expect(tg.HealthCheckProtocol ?? 'HTTP').toBe('HTTP');
    expect(tg.HealthCheckPort ?? 'traffic-port').toBe('traffic-port');
    expect(tgAttributes(t)).toEqual(
      expect.objectContaining({ 'load_balancing.algorithm.type': 'least_outstanding_requests', 'stickiness.enabled': 'false' }),
    );
  });

  test('the worker service registers its container on 8080, with a grace period for its first health checks', () => {
    const svc = only(t, 'AWS::ECS::Service');
    expect(svc.props.LoadBalancers).toEqual([
      { ContainerName: 'worker', ContainerPort: 8080, TargetGroupArn: ref(t, TG, 'CallsTargets') },
    ]);
    expect(svc.props.HealthCheckGracePeriodSeconds).toBe(60);
    // ECS refuses a target group that no listener uses yet.
    expect(svc.resource.DependsOn).toEqual(expect.arrayContaining([logicalId(t, RULE, 'CallsLoadBalancerHttps')]));
    expect(only(j, 'AWS::ECS::Service').props.HealthCheckGracePeriodSeconds).toBeUndefined();
  });

  test('the worker serves the calls on 0.0.0.0:8080 (`ratepool worker --listen`)', () => {
    const [c] = only(t, 'AWS::ECS::TaskDefinition').props.ContainerDefinitions;
    expect(c.Command).toEqual(['--listen', '0.0.0.0:8080']);
    expect(c.PortMappings).toEqual([{ ContainerPort: 8080, Protocol: 'tcp' }]);
  });
});

describe('listeners', () => {
  const notFound = {
    Type: 'fixed-response',
    FixedResponseConfig: {
      StatusCode: '404',
      ContentType: 'application/json',
      MessageBody: '{"error":{"type":"not_found","message":"no such route"}}',
    },
  };
  const forwardRule = (template: Template, listenerPrefix: string) => ({
    ListenerArn: ref(template, LISTENER, listenerPrefix),
    Priority: 10,
    Conditions: [{ Field: 'path-pattern', PathPatternConfig: { Values: CALLS_PATHS } }],
    Actions: [{ Type: 'forward', TargetGroupArn: ref(template, TG, 'CallsTargets') }],
  });

  test('the calls paths are exactly the OpenAI ones the worker serves', () => {
    expect(CALLS_PATHS).toEqual(['/v1/chat/completions', '/v1/embeddings', '/v1/models']);
  });

  test('with a certificate: HTTPS on 443 with a TLS 1.2+ policy; only the calls paths reach the workers', () => {
    const listeners = Object.values(t.findResources(LISTENER)).map((l) => l.Properties);
    expect(listeners).toHaveLength(2);
    const https = listeners.find((l) => l.Port === 443)!;
    expect(https).toEqual({
      LoadBalancerArn: ref(t, LB, 'CallsLoadBalancer'),
      Protocol: 'HTTPS',
      Port: 443,
      Certificates: [{ CertificateArn: TLS_CONTEXT['ratepool:certificateArn'] }],
      SslPolicy: 'ELBSecurityPolicy-TLS13-1-2-Res-PQ-2025-09',
      DefaultActions: [notFound],
    });
    const rules = Object.values(t.findResources(RULE)).map((r) => r.Properties);
    expect(rules).toEqual([forwardRule(t, 'CallsLoadBalancerHttps')]);
  });

  test('with a certificate: port 80 only redirects to HTTPS', () => {
    const http = Object.values(t.findResources(LISTENER)).find((l) => l.Properties.Port === 80)!.Properties;
    expect(http).toEqual({
      LoadBalancerArn: ref(t, LB, 'CallsLoadBalancer'),
      Protocol: 'HTTP',
      Port: 80,
      DefaultActions: [{ Type: 'redirect', RedirectConfig: { Protocol: 'HTTPS', Port: '443', StatusCode: 'HTTP_301' } }],
    });
  });

  test('ratepool:allowHttp: one plain HTTP listener on 80, the same rule, no certificate', () => {
    const listeners = Object.values(h.findResources(LISTENER)).map((l) => l.Properties);
    expect(listeners).toEqual([
      { LoadBalancerArn: ref(h, LB, 'CallsLoadBalancer'), Protocol: 'HTTP', Port: 80, DefaultActions: [notFound] },
    ]);
    expect(Object.values(h.findResources(RULE)).map((r) => r.Properties)).toEqual([forwardRule(h, 'CallsLoadBalancerHttp')]);
    expect(JSON.stringify(h.toJSON())).not.toContain('certificate');
  });
});

describe('security groups: exactly what the calls need', () => {
  const ingressRules = (template: Template, prefix: string) =>
    only(template, 'AWS::EC2::SecurityGroup', (r) => r.Properties.GroupDescription.startsWith(prefix)).props.SecurityGroupIngress;

  test('load balancer: 443 and 80 (the redirect) from anywhere over IPv4', () => {
    expect(ingressRules(t, 'ratepool calls load balancer')).toEqual([
      { CidrIp: '0.0.0.0/0', IpProtocol: 'tcp', FromPort: 443, ToPort: 443, Description: 'calls (HTTPS)' },
      { CidrIp: '0.0.0.0/0', IpProtocol: 'tcp', FromPort: 80, ToPort: 80, Description: 'redirect to HTTPS' },
    ]);
  });

  test('ratepool:allowHttp: 80 only', () => {
    expect(ingressRules(h, 'ratepool calls load balancer')).toEqual([
      { CidrIp: '0.0.0.0/0', IpProtocol: 'tcp', FromPort: 80, ToPort: 80, Description: 'calls (plain HTTP, ratepool:allowHttp)' },
    ]);
  });

  test.each([
    ['with a certificate', () => t],
    ['plain HTTP', () => h],
  ])('%s: load balancer → workers on 8080 is the only rule between security groups, and its only way out', (_, template) => {
    const tpl = template();
    const lbSg = only(tpl, 'AWS::EC2::SecurityGroup', (r) => r.Properties.GroupDescription.startsWith('ratepool calls'));
    // No inline egress: not even the allow-all default.
    expect(lbSg.props.SecurityGroupEgress).toBeUndefined();
    expect(Object.values(tpl.findResources('AWS::EC2::SecurityGroupEgress')).map((r) => r.Properties)).toEqual([
      {
        GroupId: sgId(tpl, 'CallsLoadBalancerSecurityGroup'),
        DestinationSecurityGroupId: sgId(tpl, 'WorkerSecurityGroup'),
        IpProtocol: 'tcp',
        FromPort: 8080,
        ToPort: 8080,
        Description: 'Load balancer to target',
      },
    ]);
    expect(Object.values(tpl.findResources('AWS::EC2::SecurityGroupIngress')).map((r) => r.Properties)).toEqual([
      {
        GroupId: sgId(tpl, 'WorkerSecurityGroup'),
        SourceSecurityGroupId: sgId(tpl, 'CallsLoadBalancerSecurityGroup'),
        IpProtocol: 'tcp',
        FromPort: 8080,
        ToPort: 8080,
        Description: 'Load balancer to target',
      },
    ]);
  });
});

describe('access logs bucket', () => {
  test('S3-managed encryption (all ELB supports), no public access, no ACLs, 30 days, kept with the stack gone', () => {
    const bucket = only(t, 'AWS::S3::Bucket', (r) => r === t.toJSON().Resources[logicalId(t, 'AWS::S3::Bucket', 'CallsAccessLogs')]);
    expect(bucket.props).toEqual({
      BucketEncryption: { ServerSideEncryptionConfiguration: [{ ServerSideEncryptionByDefault: { SSEAlgorithm: 'AES256' } }] },
      PublicAccessBlockConfiguration: {
        BlockPublicAcls: true,
        BlockPublicPolicy: true,
        IgnorePublicAcls: true,
        RestrictPublicBuckets: true,
      },
      OwnershipControls: { Rules: [{ ObjectOwnership: 'BucketOwnerEnforced' }] },
      LifecycleConfiguration: { Rules: [{ Id: 'expire', Status: 'Enabled', ExpirationInDays: 30 }] },
    });
    expect(bucket.resource.DeletionPolicy).toBe('Retain');
  });

  test('policy: TLS only; ELB log delivery may put objects under calls/AWSLogs/<this account>/ and nothing else', () => {
    const logs = ref(t, 'AWS::S3::Bucket', 'CallsAccessLogs');
    const policy = only(t, 'AWS::S3::BucketPolicy', (r) => JSON.stringify(r.Properties.Bucket) === JSON.stringify(logs)).props;
    expect(policy.Bucket).toEqual(logs);
    const [deny, allow, ...rest] = policy.PolicyDocument.Statement;
    expect(rest).toEqual([]);
    expect(deny).toEqual(
      expect.objectContaining({ Effect: 'Deny', Action: 's3:*', Condition: { Bool: { 'aws:SecureTransport': 'false' } } }),
    );
    expect(allow).toEqual({
      Sid: 'ElbLogDelivery',
      Effect: 'Allow',
      Principal: { Service: 'logdelivery.elasticloadbalancing.amazonaws.com' },
      Action: 's3:PutObject',
      Resource: allow.Resource,
    });
    const bucketId = logicalId(t, 'AWS::S3::Bucket', 'CallsAccessLogs');
    expect(flatten(allow.Resource)).toBe(`<GetAtt:${bucketId}.Arn>/calls/AWSLogs/<Ref:AWS::AccountId>/*`);
  });
});

describe('outputs', () => {
  test('with a certificate: CallsUrl is the certificate\'s hostname, and the DNS name to point it at', () => {
    const outputs = t.toJSON().Outputs;
    expect(outputs.CallsUrl.Value).toBe('https://calls.example.test');
    expect(outputs.CallsLoadBalancerDnsName.Value).toEqual({ 'Fn::GetAtt': [logicalId(t, LB, 'CallsLoadBalancer'), 'DNSName'] });
  });

  test('plain HTTP: CallsUrl is the load balancer\'s own name', () => {
    const outputs = h.toJSON().Outputs;
    expect(flatten(outputs.CallsUrl.Value)).toBe(`http://<GetAtt:${logicalId(h, LB, 'CallsLoadBalancer')}.DNSName>`);
    expect(outputs.CallsLoadBalancerDnsName).toBeUndefined();
  });
});

describe('ratepool:calls=false', () => {
  test('no load balancer, target group, listener, access logs bucket or security group rule; no CallsUrl', () => {
    for (const type of [LB, TG, LISTENER, RULE, 'AWS::EC2::SecurityGroupIngress', 'AWS::EC2::SecurityGroupEgress']) {
      j.resourceCountIs(type, 0);
    }
    // Only the outputs bucket.
    expect(Object.keys(j.findResources('AWS::S3::Bucket'))).toEqual([logicalId(j, 'AWS::S3::Bucket', 'OutputsBucket')]);
    expect(j.toJSON().Outputs.CallsUrl).toBeUndefined();
    // The file's [calls] is still there (the worker parses it), unused: no worker listens.
    expect(workerConfig(j).calls).toEqual(workerConfig(t).calls);
    expect(only(j, 'AWS::ECS::TaskDefinition').props.ContainerDefinitions[0].Command).toBeUndefined();
  });
});
