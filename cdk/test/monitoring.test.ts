import { Match, Template } from 'aws-cdk-lib/assertions';
import { buildApp, Built, flatten, JOBS_ONLY, logicalId, only, tempConfig, templates } from './helpers';

let built: Built;
let t: Template;
let widgets: any[];
beforeAll(() => {
  built = buildApp({ 'ratepool:alarmEmail': 'ops@example.test' });
  t = templates(built).main;
  widgets = JSON.parse(flatten(only(t, 'AWS::CloudWatch::Dashboard').props.DashboardBody)).widgets;
});
afterAll(() => built.cleanup());

const titled = (title: string) => {
  const w = widgets.find((x) => x.properties?.title === title);
  if (!w) throw new Error(`no widget "${title}" among ${widgets.map((x) => x.properties?.title).join(' | ')}`);
  return w.properties;
};
/** The `expression` of every math/search entry of a graph. */
const expressions = (title: string): string[] =>
  titled(title)
    .metrics.map((m: any[]) => m.find((x) => x && typeof x === 'object' && 'expression' in x)?.expression)
    .filter(Boolean);
const labels = (title: string): string[] =>
  titled(title).metrics.map((m: any[]) => m.find((x) => x && typeof x === 'object')?.label);

describe('dashboard', () => {
  const search = (metric: string, stat: string) => `SEARCH('{Ratepool,Org} MetricName="${metric}"', '${stat}', 60)`;

  test.each([
    ['Calls per minute, by org', [search('Calls', 'Sum')]],
    ['Tokens per minute, by org', [search('PromptTokens', 'Sum'), search('CompletionTokens', 'Sum')]],
    ['429 rate-limited answers, by org', [search('RateLimited', 'Sum')]],
    ['Headroom, by org (0..1)', [search('HeadroomRatio', 'Minimum')]],
    ['insufficient_quota answers, by org', [search('InsufficientQuota', 'Sum')]],
    ['Provider errors, by org', [search('ServerErrors', 'Sum'), search('Timeouts', 'Sum'), search('ConnectionErrors', 'Sum')]],
    ['Provider latency, by org (ms)', [search('LatencyMs', 'Average')]],
  ])('%s: a SEARCH over the Org dimension, labelled per org', (title, expected) => {
    expect(expressions(title)).toEqual(expected);
    for (const label of labels(title)) expect(label).toMatch(/^\$\{PROP\('Dim\.Org'\)\}/);
  });

  test('429 rate % per configured org, with the 1% alarm line', () => {
    const exprs = expressions('429 rate %, by org (alarm above 1%)');
    expect(exprs).toEqual([0, 1, 2, 3].map((i) => `IF(calls${i} > 0, 100 * FILL(limited${i}, 0) / calls${i}, 0)`));
    expect(titled('429 rate %, by org (alarm above 1%)').annotations.horizontal[0].value).toBe(1);
  });

  test('queues: depth visible and in flight, oldest message age, DLQ depth', () => {
    const metricNames = (title: string) => titled(title).metrics.map((m: any[]) => `${m[0]}/${m[1]}`);
    expect(metricNames('Queue depth')).toEqual([
      'AWS/SQS/ApproximateNumberOfMessagesVisible',
      'AWS/SQS/ApproximateNumberOfMessagesNotVisible',
      'AWS/SQS/ApproximateNumberOfMessagesVisible',
      'AWS/SQS/ApproximateNumberOfMessagesNotVisible',
    ]);
    expect(metricNames('Oldest waiting message (s)')).toEqual([
      'AWS/SQS/ApproximateAgeOfOldestMessage',
      'AWS/SQS/ApproximateAgeOfOldestMessage',
    ]);
    const dlq = titled('Dead-letter queue depth').metrics[0];
    expect(dlq).toEqual(
      expect.arrayContaining([
        'AWS/SQS',
        'ApproximateNumberOfMessagesVisible',
        `<GetAtt:${logicalId(t, 'AWS::SQS::Queue', 'DeadLetterQueue')}.QueueName>`,
      ]),
    );
  });

  test('jobs: succeeded/failed/cancelled, duration, in flight', () => {
    const names = (title: string) => titled(title).metrics.map((m: any[]) => m[1]);
    expect(names('Jobs finished')).toEqual(['JobsSucceeded', 'JobsFailed', 'JobsCancelled']);
    expect(names('Job duration (s)')).toEqual(['JobDurationSeconds', 'JobDurationSeconds']);
    expect(names('Jobs in flight and ledger requests')).toEqual(['InFlightJobs', 'LedgerRequests']);
    for (const title of ['Jobs finished', 'Job duration (s)']) {
      for (const m of titled(title).metrics) expect(m[0]).toBe('Ratepool');
    }
  });

  test('API 4xx/5xx/latency, Lambda errors, worker task count, scaling signal', () => {
    const names = (title: string) => titled(title).metrics.map((m: any[]) => m[1]);
    expect(names('API requests and errors')).toEqual(['Count', '4XXError', '5XXError']);
    expect(names('API latency (ms)')).toEqual(['Latency', 'Latency', 'IntegrationLatency']);
    expect(names('API Lambda and authorizer errors')).toEqual(['Errors', 'Throttles', 'Errors', 'Throttles']);
    const fns = titled('API Lambda and authorizer errors').metrics.map((m: any[]) => m[3]);
    expect(fns).toEqual([
      ...Array(2).fill(`<Ref:${logicalId(t, 'AWS::Lambda::Function', 'ApiFunction')}>`),
      ...Array(2).fill(`<Ref:${logicalId(t, 'AWS::Lambda::Function', 'AuthorizerFunction')}>`),
    ]);
    expect(names('Worker tasks')).toEqual(['RunningTaskCount', 'DesiredTaskCount']);
    expect(titled('Worker tasks').metrics[0][0]).toBe('ECS/ContainerInsights');
    expect(expressions('Scaling signal')[0]).toMatch(/^IF\(FILL\(tasks, 0\) > 0, \(.*\) \/ FILL\(tasks, 0\), \(.*\)\)$/);
  });

  describe('calls endpoint', () => {
    const tg = () => `<GetAtt:${logicalId(t, 'AWS::ElasticLoadBalancingV2::TargetGroup', 'CallsTargets')}.TargetGroupFullName>`;
    const lb = () => `<GetAtt:${logicalId(t, 'AWS::ElasticLoadBalancingV2::LoadBalancer', 'CallsLoadBalancer')}.LoadBalancerFullName>`;
    /** `[namespace, name, dimension name, value, ...]` of each plain metric a graph shows (not an expression's inputs). */
    const plain = (title: string) =>
      titled(title).metrics.filter(
        (m: any[]) => typeof m[0] === 'string' && !m.some((x) => x && typeof x === 'object' && x.visible === false),
      );

    test('calls a minute, in all and per task, against what one task is sized for', () => {
      const [requests] = plain('Calls per minute');
      expect(requests.slice(0, 2)).toEqual(['AWS/ApplicationELB', 'RequestCount']);
      expect(requests).toEqual(expect.arrayContaining(['TargetGroup', tg()]));
      expect(expressions('Calls per minute')).toEqual(['IF(FILL(tasks, 0) > 0, FILL(calls, 0) / FILL(tasks, 0), FILL(calls, 0))']);
      expect(titled('Calls per minute').annotations.horizontal).toEqual([
        expect.objectContaining({ value: 3000, yAxis: 'right' }),
      ]);
    });

    test('5xx: the load balancer\'s and the workers\', and their share with the alarm line', () => {
      const counts = plain('Calls 5xx (alarm above 5%)');
      expect(counts.map((m: any[]) => m[1])).toEqual(['HTTPCode_ELB_5XX_Count', 'HTTPCode_Target_5XX_Count']);
      expect(counts[0]).toEqual(expect.arrayContaining(['LoadBalancer', lb()]));
      expect(counts[1]).toEqual(expect.arrayContaining(['TargetGroup', tg()]));
      expect(expressions('Calls 5xx (alarm above 5%)')).toEqual([CALLS_5XX]);
      expect(titled('Calls 5xx (alarm above 5%)').annotations.horizontal).toEqual([
        expect.objectContaining({ value: 5, yAxis: 'right' }),
      ]);
    });

    test('tasks in service and time to first byte, per target group', () => {
      expect(plain('Calls: tasks in service').map((m: any[]) => m[1])).toEqual(['HealthyHostCount', 'UnHealthyHostCount']);
      expect(plain('Calls: time to first byte (s)').map((m: any[]) => m[1])).toEqual(['TargetResponseTime', 'TargetResponseTime']);
      for (const title of ['Calls: tasks in service', 'Calls: time to first byte (s)']) {
        for (const m of plain(title)) expect(m).toEqual(expect.arrayContaining(['AWS/ApplicationELB', 'TargetGroup', tg()]));
      }
    });
  });
});

const CALLS_5XX =
  'IF(FILL(requests, 0) + FILL(elb5xx, 0) > 0, 100 * (FILL(elb5xx, 0) + FILL(target5xx, 0)) / (FILL(requests, 0) + FILL(elb5xx, 0)), 0)';

describe('alarms', () => {
  const alarms = () => Object.values(t.findResources('AWS::CloudWatch::Alarm')).map((a) => a.Properties);
  const named = (suffix: string) => {
    const a = alarms().find((x) => typeof x.AlarmName === 'string' && x.AlarmName.endsWith(suffix));
    if (!a) throw new Error(`no alarm named *${suffix}`);
    return a;
  };
  const topic = () => ({ Ref: logicalId(t, 'AWS::SNS::Topic', 'MonitoringAlarmTopic') });

  test('every alarm except the scaling ones notifies the SNS topic on alarm and on recovery', () => {
    const own = alarms().filter((a) => typeof a.AlarmName === 'string');
    expect(own).toHaveLength(2 + 1 + 2 * 4 + 3); // DLQ, two ages, two per org (four in the example), three for calls
    for (const a of own) {
      expect(a.AlarmActions).toEqual([topic()]);
      expect(a.OKActions).toEqual([topic()]);
      expect(a.TreatMissingData).toBe('notBreaching');
    }
  });

  test('dead-letter queue not empty', () => {
    const a = named('-dead-letter-queue-not-empty');
    expect(a).toEqual(
      expect.objectContaining({
        MetricName: 'ApproximateNumberOfMessagesVisible',
        Namespace: 'AWS/SQS',
        ComparisonOperator: 'GreaterThanOrEqualToThreshold',
        Threshold: 1,
      }),
    );
    expect(a.Dimensions).toEqual([
      { Name: 'QueueName', Value: { 'Fn::GetAtt': [logicalId(t, 'AWS::SQS::Queue', 'DeadLetterQueue'), 'QueueName'] } },
    ]);
  });

  test('oldest message too old, per queue, thresholds from context', () => {
    expect(named('-interactive-queue-oldest-message-too-old')).toEqual(
      expect.objectContaining({ MetricName: 'ApproximateAgeOfOldestMessage', Threshold: 300 }),
    );
    expect(named('-batch-queue-oldest-message-too-old')).toEqual(
      expect.objectContaining({ MetricName: 'ApproximateAgeOfOldestMessage', Threshold: 3600 }),
    );
  });

  test.each(['org-a', 'org-b', 'org-c'])('%s: 429 rate over 1% by metric math on RateLimited / Calls', (org) => {
    const a = named(`-org-${org}-rate-limited`);
    expect(a.ComparisonOperator).toBe('GreaterThanThreshold');
    expect(a.Threshold).toBe(1);
    const expr = a.Metrics.find((m: any) => m.Expression);
    expect(expr.Expression).toMatch(/^IF\(calls\d > 0, 100 \* FILL\(limited\d, 0\) \/ calls\d, 0\)$/);
    const stats = a.Metrics.filter((m: any) => m.MetricStat).map((m: any) => m.MetricStat);
    expect(stats.map((s: any) => s.Metric.MetricName).sort()).toEqual(['Calls', 'RateLimited']);
    for (const s of stats) {
      expect(s.Metric.Namespace).toBe('Ratepool');
      expect(s.Metric.Dimensions).toEqual([{ Name: 'Org', Value: org }]);
      expect(s.Stat).toBe('Sum');
    }
  });

  test.each(['org-a', 'org-b', 'org-c'])('%s: any insufficient_quota answer', (org) => {
    expect(named(`-org-${org}-insufficient-quota`)).toEqual(
      expect.objectContaining({
        Namespace: 'Ratepool',
        MetricName: 'InsufficientQuota',
        Dimensions: [{ Name: 'Org', Value: org }],
        Statistic: 'Sum',
        ComparisonOperator: 'GreaterThanThreshold',
        Threshold: 0,
      }),
    );
  });

  describe('calls endpoint', () => {
    /** The one metric of a single-metric alarm that has a label (rendered as `Metrics`). */
    const metricOf = (a: any) => {
      expect(a.Metrics).toHaveLength(1);
      return a.Metrics[0].MetricStat;
    };
    const tgDimension = () => ({
      Name: 'TargetGroup',
      Value: { 'Fn::GetAtt': [logicalId(t, 'AWS::ElasticLoadBalancingV2::TargetGroup', 'CallsTargets'), 'TargetGroupFullName'] },
    });

    test('a task failing its health check for three minutes', () => {
      const a = named('-calls-unhealthy-tasks');
      expect(a).toEqual(
        expect.objectContaining({ ComparisonOperator: 'GreaterThanOrEqualToThreshold', Threshold: 1, EvaluationPeriods: 3 }),
      );
      const m = metricOf(a);
      expect(m).toEqual(expect.objectContaining({ Stat: 'Maximum', Period: 60 }));
      expect(m.Metric.MetricName).toBe('UnHealthyHostCount');
      expect(m.Metric.Dimensions).toEqual(expect.arrayContaining([tgDimension()]));
    });

    test('no task in service for two minutes', () => {
      const a = named('-calls-no-healthy-task');
      expect(a).toEqual(expect.objectContaining({ ComparisonOperator: 'LessThanThreshold', Threshold: 1, EvaluationPeriods: 2 }));
      const m = metricOf(a);
      expect(m).toEqual(expect.objectContaining({ Stat: 'Minimum', Period: 60 }));
      expect(m.Metric.MetricName).toBe('HealthyHostCount');
      expect(m.Metric.Dimensions).toEqual(expect.arrayContaining([tgDimension()]));
    });

    test('5xx over 5% of the answers in two of three 5-minute periods, counting the load balancer\'s own refusals', () => {
      const a = named('-calls-5xx');
      expect(a).toEqual(
        expect.objectContaining({ ComparisonOperator: 'GreaterThanThreshold', Threshold: 5, EvaluationPeriods: 3, DatapointsToAlarm: 2 }),
      );
      expect(a.Metrics.find((m: any) => m.Expression).Expression).toBe(CALLS_5XX);
      const byId = Object.fromEntries(a.Metrics.filter((m: any) => m.MetricStat).map((m: any) => [m.Id, m.MetricStat]));
      expect(Object.keys(byId).sort()).toEqual(['elb5xx', 'requests', 'target5xx']);
      expect(byId.requests.Metric.MetricName).toBe('RequestCount');
      expect(byId.requests.Metric.Dimensions).toEqual(expect.arrayContaining([tgDimension()]));
      expect(byId.target5xx.Metric.MetricName).toBe('HTTPCode_Target_5XX_Count');
      expect(byId.target5xx.Metric.Dimensions).toEqual(expect.arrayContaining([tgDimension()]));
      expect(byId.elb5xx.Metric).toEqual({
        Namespace: 'AWS/ApplicationELB',
        MetricName: 'HTTPCode_ELB_5XX_Count',
        Dimensions: [
          {
            Name: 'LoadBalancer',
            Value: { 'Fn::GetAtt': [logicalId(t, 'AWS::ElasticLoadBalancingV2::LoadBalancer', 'CallsLoadBalancer'), 'LoadBalancerFullName'] },
          },
        ],
      });
      for (const m of Object.values(byId) as any[]) expect(m).toEqual(expect.objectContaining({ Stat: 'Sum', Period: 300 }));
    });

    test('jobs only: no calls alarms or graphs', () => {
      const other = buildApp(JOBS_ONLY);
      try {
        const o = Template.fromStack(other.main);
        const names = Object.values(o.findResources('AWS::CloudWatch::Alarm')).map((x) => String(x.Properties.AlarmName));
        expect(names.filter((n) => n.includes('calls'))).toEqual([]);
        expect(flatten(only(o, 'AWS::CloudWatch::Dashboard').props.DashboardBody)).not.toContain('ApplicationELB');
      } finally {
        other.cleanup();
      }
    });
  });

  test('topic: KMS-encrypted with a rotating key CloudWatch may use, TLS only, email from context', () => {
    const key = logicalId(t, 'AWS::KMS::Key', 'MonitoringAlarmTopicKey');
    t.hasResourceProperties('AWS::SNS::Topic', { KmsMasterKeyId: { 'Fn::GetAtt': [key, 'Arn'] } });
    const keyProps = t.toJSON().Resources[key].Properties;
    expect(keyProps.EnableKeyRotation).toBe(true);
    expect(keyProps.KeyPolicy.Statement).toEqual(
      expect.arrayContaining([
        expect.objectContaining({
          Principal: { Service: 'cloudwatch.amazonaws.com' },
          Action: ['kms:Decrypt', 'kms:GenerateDataKey*'],
        }),
      ]),
    );
    t.hasResourceProperties('AWS::SNS::TopicPolicy', {
      PolicyDocument: {
        Statement: [Match.objectLike({ Effect: 'Deny', Condition: { Bool: { 'aws:SecureTransport': 'false' } } })],
      },
    });
    t.hasResourceProperties('AWS::SNS::Subscription', { Protocol: 'email', Endpoint: 'ops@example.test' });
  });

  test('an org of the config file gets its alarms without code edits', () => {
    const text = '[[orgs]]\nname = "org-z"\napi_key_env = "ORG_Z_KEY"\n[orgs.models."gpt-4o-mini"]\nrpm = 1\ntpm = 1\n\n' +
      '[[tenants]]\nname = "t"\napi_key_env = "T_KEY"\n';
    const other = buildApp({ 'ratepool:configFile': tempConfig(text) });
    try {
      const names = Object.values(Template.fromStack(other.main).findResources('AWS::CloudWatch::Alarm'))
        .map((a) => a.Properties.AlarmName)
        .filter((n) => typeof n === 'string' && n.includes('-org-'));
      expect(names.sort()).toEqual(['Ratepool-org-org-z-insufficient-quota', 'Ratepool-org-org-z-rate-limited']);
    } finally {
      other.cleanup();
    }
  });
});
