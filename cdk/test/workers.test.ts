import { Template } from 'aws-cdk-lib/assertions';
import { stepSizes } from '../lib/worker-scaling';
import { buildApp, Built, editedExample, JOBS_ONLY, logicalId, only, templates } from './helpers';

let built: Built;
let t: Template;
/** A jobs-only stack: no calls endpoint, scaling from zero. */
let jobsOnly: Built;
let j: Template;
beforeAll(() => {
  built = buildApp();
  t = templates(built).main;
  jobsOnly = buildApp(JOBS_ONLY);
  j = templates(jobsOnly).main;
});
afterAll(() => {
  built.cleanup();
  jobsOnly.cleanup();
});

describe('ECS', () => {
  test('cluster has Container Insights on', () => {
    t.hasResourceProperties('AWS::ECS::Cluster', {
      ClusterSettings: [{ Name: 'containerInsights', Value: 'enabled' }],
    });
  });

  test('task: Fargate arm64, sizes from context, stopTimeout 120 s, init process, the calls port', () => {
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
    // Appended to the image's ENTRYPOINT `ratepool worker`.
    expect(c.Command).toEqual(['--listen', '0.0.0.0:8080']);
    expect(c.PortMappings).toEqual([{ ContainerPort: 8080, Protocol: 'tcp' }]);
  });

  test('jobs only: `ratepool worker` as the image has it, no port', () => {
    const [c] = only(j, 'AWS::ECS::TaskDefinition').props.ContainerDefinitions;
    expect(c.Command).toBeUndefined();
    expect(c.PortMappings).toBeUndefined();
    expect(only(j, 'AWS::ECS::Service').props.LoadBalancers ?? []).toEqual([]);
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

  test('worker security group: HTTPS out; in, only what the calls endpoint opens (calls.test.ts)', () => {
    for (const template of [t, j]) {
      const sg = only(template, 'AWS::EC2::SecurityGroup', (r) => r.Properties.GroupDescription.startsWith('ratepool workers'));
      expect(sg.props.SecurityGroupIngress).toBeUndefined();
      expect(sg.props.SecurityGroupEgress).toEqual([
        expect.objectContaining({ CidrIp: '0.0.0.0/0', IpProtocol: 'tcp', FromPort: 443, ToPort: 443 }),
      ]);
    }
    j.resourceCountIs('AWS::EC2::SecurityGroupIngress', 0);
  });

  test('VPC: NAT for fixed egress IPs, DynamoDB gateway endpoint, flow logs', () => {
    t.resourceCountIs('AWS::EC2::NatGateway', 1);
    t.hasResourceProperties('AWS::EC2::VPCEndpoint', { VpcEndpointType: 'Gateway' });
    t.hasResourceProperties('AWS::EC2::FlowLog', { TrafficType: 'REJECT', LogDestinationType: 'cloud-watch-logs' });
  });
});

describe('scaling on backlog per task, counting in-flight jobs and calls', () => {
  const backlog = '(FILL(visible0, 0) + FILL(inflight0, 0) + FILL(visible1, 0) + FILL(inflight1, 0))';

  test('scalable target: minWorkers..maxWorkers from context, 1..10 with the calls endpoint, 0..10 without', () => {
    const target = (template: Template) => only(template, 'AWS::ApplicationAutoScaling::ScalableTarget').props;
    expect(target(t)).toEqual(
      expect.objectContaining({ MinCapacity: 1, MaxCapacity: 10, ScalableDimension: 'ecs:service:DesiredCount', ServiceNamespace: 'ecs' }),
    );
    expect(target(j)).toEqual(expect.objectContaining({ MinCapacity: 0, MaxCapacity: 10 }));
  });

  test.each([
    ['with the calls endpoint', () => t, `CEIL(${backlog} / 64 + FILL(calls, 0) / 3000) - FILL(tasks, 0)`],
    ['jobs only', () => j, `CEIL(${backlog} / 64) - FILL(tasks, 0)`],
  ])('%s: both alarms compute the task deficit from visible + in-flight messages of both queues, calls, and the desired count', (_, template, deficit) => {
    const t = template();
    const alarms = Object.entries(t.findResources('AWS::CloudWatch::Alarm')).filter(([id]) => id.startsWith('WorkerService'));
    expect(alarms).toHaveLength(2);
    const queueName = (prefix: string) => ({ 'Fn::GetAtt': [logicalId(t, 'AWS::SQS::Queue', prefix), 'QueueName'] });
    for (const [, alarm] of alarms) {
      const metrics = alarm.Properties.Metrics as any[];
      const byId = Object.fromEntries(metrics.map((m) => [m.Id, m]));
      const expr = metrics.find((m) => m.Expression);
      expect(expr.Expression).toBe(deficit);
      expect(expr.ReturnData).toBe(true);
      expect(Object.keys(byId).sort()).toEqual(
        [expr.Id, 'tasks', 'visible0', 'inflight0', 'visible1', 'inflight1', ...(deficit.includes('calls') ? ['calls'] : [])].sort(),
      );
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
      if (byId.calls) {
        // The calls the load balancer sent the workers in the minute.
        expect(byId.calls.MetricStat.Metric.Namespace).toBe('AWS/ApplicationELB');
        expect(byId.calls.MetricStat.Metric.MetricName).toBe('RequestCount');
        expect(byId.calls.MetricStat.Metric.Dimensions).toEqual(
          expect.arrayContaining([
            { Name: 'TargetGroup', Value: { 'Fn::GetAtt': [logicalId(t, 'AWS::ElasticLoadBalancingV2::TargetGroup', 'CallsTargets'), 'TargetGroupFullName'] } },
          ]),
        );
        expect(byId.calls.MetricStat.Stat).toBe('Sum');
        expect(byId.calls.MetricStat.Period).toBe(60);
        expect(byId.calls.ReturnData).toBe(false);
      }
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

  test('one pair of step policies for both doors: no CPU or memory scaling, no target tracking to scale in what the other door needs', () => {
    for (const template of [t, j]) {
      template.resourceCountIs('AWS::ApplicationAutoScaling::ScalingPolicy', 2);
      for (const p of Object.values(template.findResources('AWS::ApplicationAutoScaling::ScalingPolicy'))) {
        expect(p.Properties.PolicyType).toBe('StepScaling');
      }
    }
  });

  test('step sizes stay within the 40 steps Application Auto Scaling allows', () => {
    expect(stepSizes(1)).toEqual([1]);
    expect(stepSizes(10)).toEqual([1, 2, 3, 4, 6, 8, 10]);
    expect(stepSizes(16)).toEqual([1, 2, 3, 4, 6, 8, 12, 16]);
    expect(stepSizes(1000).length).toBeLessThan(40);
  });

  test('[workers] concurrency from the config file and calls per task from context change the divisors', () => {
    const other = buildApp({
      ...editedExample((text) => text.replace('concurrency = 64', 'concurrency = 16')),
      'ratepool:callsPerTaskPerMinute': 500,
      'ratepool:minWorkers': 2,
    });
    try {
      const o = Template.fromStack(other.main);
      o.hasResourceProperties('AWS::ApplicationAutoScaling::ScalableTarget', { MinCapacity: 2 });
      const exprs = Object.values(o.findResources('AWS::CloudWatch::Alarm'))
        .flatMap((a) => (a.Properties.Metrics ?? []) as any[])
        .map((m) => m.Expression)
        .filter((e) => e?.startsWith('CEIL('));
      expect(exprs).toHaveLength(2);
      for (const e of exprs) expect(e).toBe(`CEIL(${backlog} / 16 + FILL(calls, 0) / 500) - FILL(tasks, 0)`);
    } finally {
      other.cleanup();
    }
  });
});
