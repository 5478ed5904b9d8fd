import { Template } from 'aws-cdk-lib/assertions';
import { stepSizes } from '../lib/worker-scaling';
import { buildApp, Built, logicalId, only, templates } from './helpers';

let built: Built;
let t: Template;
beforeAll(() => {
  built = buildApp();
  t = templates(built).main;
});
afterAll(() => built.cleanup());

describe('ECS', () => {
  test('cluster has Container Insights on', () => {
    t.hasResourceProperties('AWS::ECS::Cluster', {
      ClusterSettings: [{ Name: 'containerInsights', Value: 'enabled' }],
    });
  });

  test('task: Fargate arm64, sizes from context, stopTimeout 120 s, init process', () => {
    const task = only(t, 'AWS::ECS::TaskDefinition').props;
    expect(task.RuntimePlatform).toEqual({ CpuArchitecture: 'ARM64', OperatingSystemFamily: 'LINUX' });
    expect(task.RequiresCompatibilities).toEqual(['FARGATE']);
    expect(task.Cpu).toBe('1024');
    expect(task.Memory).toBe('2048');
    const [c] = task.ContainerDefinitions;
    expect(c.StopTimeout).toBe(120);
    expect(c.Essential).toBe(true);
    expect(c.LinuxParameters).toEqual(expect.objectContaining({ InitProcessEnabled: true }));
    expect(c.LogConfiguration.LogDriver).toBe('awslogs');
    expect(c.Command).toBeUndefined(); // the image's ENTRYPOINT is `ratepool worker`
  });

  test('service: no DesiredCount, circuit breaker with rollback, private subnets, no public IP', () => {
    const svc = only(t, 'AWS::ECS::Service').props;
    expect(svc).not.toHaveProperty('DesiredCount');
    expect(svc.LaunchType).toBe('FARGATE');
    expect(svc.DeploymentConfiguration).toEqual(
      expect.objectContaining({
        DeploymentCircuitBreaker: { Enable: true, Rollback: true },
        MinimumHealthyPercent: 100,
        MaximumPercent: 200,
      }),
    );
    expect(svc.NetworkConfiguration.AwsvpcConfiguration.AssignPublicIp).toBe('DISABLED');
  });

  test('worker security group: nothing in, HTTPS out', () => {
    const sg = Object.values(t.findResources('AWS::EC2::SecurityGroup')).find((r) =>
      r.Properties.GroupDescription.startsWith('ratepool workers'),
    )!;
    expect(sg.Properties.SecurityGroupIngress).toBeUndefined();
    expect(sg.Properties.SecurityGroupEgress).toEqual([
      expect.objectContaining({ CidrIp: '0.0.0.0/0', IpProtocol: 'tcp', FromPort: 443, ToPort: 443 }),
    ]);
  });

  test('VPC: NAT for fixed egress IPs, DynamoDB gateway endpoint, flow logs', () => {
    t.resourceCountIs('AWS::EC2::NatGateway', 1);
    t.hasResourceProperties('AWS::EC2::VPCEndpoint', { VpcEndpointType: 'Gateway' });
    t.hasResourceProperties('AWS::EC2::FlowLog', { TrafficType: 'REJECT', LogDestinationType: 'cloud-watch-logs' });
  });
});

describe('scaling on backlog per task, counting in-flight jobs', () => {
  const deficit =
    'CEIL((FILL(visible0, 0) + FILL(inflight0, 0) + FILL(visible1, 0) + FILL(inflight1, 0)) / 64) - FILL(tasks, 0)';

  test('scalable target: 0..maxWorkers from context', () => {
    t.hasResourceProperties('AWS::ApplicationAutoScaling::ScalableTarget', {
      MinCapacity: 0,
      MaxCapacity: 10,
      ScalableDimension: 'ecs:service:DesiredCount',
      ServiceNamespace: 'ecs',
    });
  });

  test('both alarms compute the task deficit from visible + in-flight messages of both queues and the desired count', () => {
    const alarms = Object.entries(t.findResources('AWS::CloudWatch::Alarm')).filter(([id]) => id.startsWith('WorkerService'));
    expect(alarms).toHaveLength(2);
    const queueName = (prefix: string) => ({ 'Fn::GetAtt': [logicalId(t, 'AWS::SQS::Queue', prefix), 'QueueName'] });
    for (const [, alarm] of alarms) {
      const metrics = alarm.Properties.Metrics as any[];
      const byId = Object.fromEntries(metrics.map((m) => [m.Id, m]));
      const expr = metrics.find((m) => m.Expression);
      expect(expr.Expression).toBe(deficit);
      expect(expr.ReturnData).toBe(true);
      const sqs = (id: string, name: string, queue: string) => {
        expect(byId[id].MetricStat.Metric).toEqual({
          Namespace: 'AWS/SQS',
          MetricName: name,
          Dimensions: [{ Name: 'QueueName', Value: queueName(queue) }],
        });
        expect(byId[id].MetricStat.Period).toBe(60);
        expect(byId[id].ReturnData).toBe(false);
      };
      sqs('visible0', 'ApproximateNumberOfMessagesVisible', 'InteractiveQueue');
      sqs('inflight0', 'ApproximateNumberOfMessagesNotVisible', 'InteractiveQueue');
      sqs('visible1', 'ApproximateNumberOfMessagesVisible', 'BatchQueue');
      sqs('inflight1', 'ApproximateNumberOfMessagesNotVisible', 'BatchQueue');
      expect(byId.tasks.MetricStat.Metric).toEqual({
        Namespace: 'ECS/ContainerInsights',
        MetricName: 'DesiredTaskCount',
        Dimensions: [
          { Name: 'ClusterName', Value: { Ref: logicalId(t, 'AWS::ECS::Cluster', 'Cluster') } },
          { Name: 'ServiceName', Value: { 'Fn::GetAtt': [logicalId(t, 'AWS::ECS::Service', 'WorkerService'), 'Name'] } },
        ],
      });
    }
  });

  test('scale out from zero: one missing task for a minute adds it; the step grows with the deficit', () => {
    const [, up] = Object.entries(t.findResources('AWS::CloudWatch::Alarm')).find(([id]) => id.includes('ScaleOut'))!;
    expect(up.Properties).toEqual(
      expect.objectContaining({ ComparisonOperator: 'GreaterThanOrEqualToThreshold', Threshold: 1, EvaluationPeriods: 1 }),
    );
    const policy = Object.values(t.findResources('AWS::ApplicationAutoScaling::ScalingPolicy')).find((p) =>
      p.Properties.PolicyName.includes('ScaleOut'),
    )!;
    const cfg = policy.Properties.StepScalingPolicyConfiguration;
    expect(cfg.AdjustmentType).toBe('ChangeInCapacity');
    expect(cfg.Cooldown).toBe(60);
    // Bounds are relative to the threshold (1): deficit in [1, 2) adds 1, ..., ≥ 10 adds 10.
    expect(cfg.StepAdjustments[0]).toEqual({ MetricIntervalLowerBound: 0, MetricIntervalUpperBound: 1, ScalingAdjustment: 1 });
    expect(cfg.StepAdjustments.at(-1)).toEqual({ MetricIntervalLowerBound: 9, ScalingAdjustment: 10 });
    for (const step of cfg.StepAdjustments) {
      // Never more tasks than the deficit at the interval's low end.
      expect(step.ScalingAdjustment).toBe(step.MetricIntervalLowerBound + 1);
    }
  });

  test('scale in only after five minutes of surplus, never below what queued + in-flight jobs need', () => {
    const [, down] = Object.entries(t.findResources('AWS::CloudWatch::Alarm')).find(([id]) => id.includes('ScaleIn'))!;
    expect(down.Properties).toEqual(
      expect.objectContaining({ ComparisonOperator: 'LessThanOrEqualToThreshold', Threshold: -1, EvaluationPeriods: 5 }),
    );
    const policy = Object.values(t.findResources('AWS::ApplicationAutoScaling::ScalingPolicy')).find((p) =>
      p.Properties.PolicyName.includes('ScaleIn'),
    )!;
    const cfg = policy.Properties.StepScalingPolicyConfiguration;
    expect(cfg.Cooldown).toBe(300);
    expect(cfg.StepAdjustments[0]).toEqual({ MetricIntervalLowerBound: -1, MetricIntervalUpperBound: 0, ScalingAdjustment: -1 });
    for (const step of cfg.StepAdjustments) {
      // Below the threshold (-1) the upper bound is inclusive: remove at most the surplus.
      expect(-step.ScalingAdjustment).toBeLessThanOrEqual(1 - step.MetricIntervalUpperBound);
    }
  });

  test('no CPU or memory based scaling', () => {
    t.resourceCountIs('AWS::ApplicationAutoScaling::ScalingPolicy', 2);
    for (const p of Object.values(t.findResources('AWS::ApplicationAutoScaling::ScalingPolicy'))) {
      expect(p.Properties.PolicyType).toBe('StepScaling');
    }
  });

  test('step sizes stay within the 40 steps Application Auto Scaling allows', () => {
    expect(stepSizes(1)).toEqual([1]);
    expect(stepSizes(10)).toEqual([1, 2, 3, 4, 6, 8, 10]);
    expect(stepSizes(16)).toEqual([1, 2, 3, 4, 6, 8, 12, 16]);
    expect(stepSizes(1000).length).toBeLessThan(40);
  });

  test('concurrency from context changes the divisor', () => {
    const other = buildApp({ 'ratepool:workerConcurrency': 16, 'ratepool:minWorkers': 1 });
    try {
      const o = Template.fromStack(other.main);
      o.hasResourceProperties('AWS::ApplicationAutoScaling::ScalableTarget', { MinCapacity: 1 });
      const exprs = Object.values(o.findResources('AWS::CloudWatch::Alarm'))
        .flatMap((a) => (a.Properties.Metrics ?? []) as any[])
        .map((m) => m.Expression)
        .filter((e) => e?.startsWith('CEIL('));
      expect(exprs).toHaveLength(2);
      for (const e of exprs) expect(e).toContain('/ 16)');
    } finally {
      other.cleanup();
    }
  });
});
