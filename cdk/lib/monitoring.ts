/**
 * The CloudWatch dashboard and the alarms of a deployment.
 *
 * Per-org graphs are SEARCH expressions over the `Org` dimension the worker
 * publishes, so an org that starts sending shows up without a redeploy.
 * Alarms cannot use SEARCH; they are made per org from the orgs of the config
 * file the worker runs, so they cover every configured org.
 */
import { Aws, Duration, RemovalPolicy, Stack } from 'aws-cdk-lib';
import type * as apigw from 'aws-cdk-lib/aws-apigateway';
import * as cloudwatch from 'aws-cdk-lib/aws-cloudwatch';
import * as cw_actions from 'aws-cdk-lib/aws-cloudwatch-actions';
import * as elbv2 from 'aws-cdk-lib/aws-elasticloadbalancingv2';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as kms from 'aws-cdk-lib/aws-kms';
import type * as lambda from 'aws-cdk-lib/aws-lambda';
import * as sns from 'aws-cdk-lib/aws-sns';
import * as subs from 'aws-cdk-lib/aws-sns-subscriptions';
import type * as sqs from 'aws-cdk-lib/aws-sqs';
import { Construct } from 'constructs';
import type { CallsEndpoint } from './calls-endpoint';
import { METRICS_NAMESPACE } from './config-toml';
import type { OrgSettings, Settings } from './settings';
import type { WorkerScaling } from './worker-scaling';

export interface MonitoringProps {
  readonly settings: Settings;
  readonly interactiveQueue: sqs.IQueue;
  readonly batchQueue: sqs.IQueue;
  readonly deadLetterQueue: sqs.IQueue;
  readonly api: apigw.RestApi;
  readonly apiFunction: lambda.IFunction;
  readonly authorizerFunction: lambda.IFunction;
  readonly clusterName: string;
  readonly serviceName: string;
  readonly scaling: WorkerScaling;
  /** Absent without the calls endpoint. */
  readonly calls?: CallsEndpoint;
}

/** Alarm when more than this percentage of an org's calls are answered 429. */
export const RATE_LIMITED_ALARM_PERCENT = 1;

/** Alarm when more than this percentage of the calls endpoint's answers are 5xx. */
export const CALLS_5XX_ALARM_PERCENT = 5;

const MINUTE = Duration.minutes(1);
const FIVE_MINUTES = Duration.minutes(5);
const ORG_LABEL = "${PROP('Dim.Org')}";

export class Monitoring extends Construct {
  readonly dashboard: cloudwatch.Dashboard;
  readonly alarmTopic: sns.Topic;
  readonly alarms: cloudwatch.Alarm[] = [];

  constructor(scope: Construct, id: string, props: MonitoringProps) {
    super(scope, id);
    const s = props.settings;
    const stackName = Stack.of(this).stackName;

    // CloudWatch can publish to an encrypted topic only through a customer
    // managed key whose policy lets it (the AWS managed SNS key does not).
    const topicKey = new kms.Key(this, 'AlarmTopicKey', {
      description: 'ratepool alarm topic encryption',
      enableKeyRotation: true,
      removalPolicy: RemovalPolicy.DESTROY,
    });
    topicKey.addToResourcePolicy(
      new iam.PolicyStatement({
        sid: 'CloudWatchAlarmsPublish',
        principals: [new iam.ServicePrincipal('cloudwatch.amazonaws.com')],
        actions: ['kms:Decrypt', 'kms:GenerateDataKey*'],
        resources: ['*'],
        conditions: { StringEquals: { 'aws:SourceAccount': Aws.ACCOUNT_ID } },
      }),
    );
    this.alarmTopic = new sns.Topic(this, 'AlarmTopic', {
      displayName: 'ratepool alarms',
      masterKey: topicKey,
      enforceSSL: true,
    });
    if (s.alarmEmail) this.alarmTopic.addSubscription(new subs.EmailSubscription(s.alarmEmail));
    const notify = new cw_actions.SnsAction(this.alarmTopic);
    const alarm = (aid: string, p: cloudwatch.AlarmProps) => {
      const a = new cloudwatch.Alarm(this, aid, {
        treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
        ...p,
        alarmName: `${stackName}-${p.alarmName}`,
      });
      a.addAlarmAction(notify);
      a.addOkAction(notify);
      this.alarms.push(a);
      return a;
    };

    // ---- alarms ----
    alarm('DeadLetterQueueNotEmpty', {
      alarmName: 'dead-letter-queue-not-empty',
      alarmDescription: 'A job was dead-lettered: the worker gave up on it (see its error) or it kept killing workers.',
      metric: props.deadLetterQueue.metricApproximateNumberOfMessagesVisible({ statistic: 'Maximum', period: MINUTE }),
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
      threshold: 1,
      evaluationPeriods: 1,
    });
    const ageAlarm = (aid: string, name: string, queue: sqs.IQueue, maxSecs: number) =>
      alarm(aid, {
        alarmName: `${name}-queue-oldest-message-too-old`,
        alarmDescription: `A ${name} job has waited more than ${maxSecs} s: workers are missing, stuck, or at their maximum (ratepool:maxWorkers).`,
        metric: queue.metricApproximateAgeOfOldestMessage({ statistic: 'Maximum', period: MINUTE }),
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        threshold: maxSecs,
        evaluationPeriods: 1,
      });
    ageAlarm('InteractiveQueueTooOld', 'interactive', props.interactiveQueue, s.interactiveMaxAgeSecs);
    ageAlarm('BatchQueueTooOld', 'batch', props.batchQueue, s.batchMaxAgeSecs);
    s.orgs.forEach((org, i) => {
      alarm(`RateLimited-${org.name}`, {
        alarmName: `org-${org.name}-rate-limited`,
        alarmDescription:
          `More than ${RATE_LIMITED_ALARM_PERCENT}% of org ${org.name}'s calls were answered 429 (rate limit) in two of three 5-minute periods: ` +
          'its rpm/tpm in the config are above its real limits, or something else uses the org.',
        metric: rateLimitedPercent(org, i),
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        threshold: RATE_LIMITED_ALARM_PERCENT,
        evaluationPeriods: 3,
        datapointsToAlarm: 2,
      });
      alarm(`InsufficientQuota-${org.name}`, {
        alarmName: `org-${org.name}-insufficient-quota`,
        alarmDescription: `Org ${org.name} answered insufficient_quota (billing): it is out of rotation until its quota is raised.`,
        metric: orgMetric(org.name, 'InsufficientQuota', 'Sum', FIVE_MINUTES),
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        threshold: 0,
        evaluationPeriods: 1,
      });
    });
    const calls = props.calls && callsMetrics(props.calls);
    if (calls) {
      alarm('CallsUnhealthyTargets', {
        alarmName: 'calls-unhealthy-tasks',
        alarmDescription:
          'A worker task has failed the calls health check (GET /healthz) for three minutes: ECS replaces such tasks, ' +
          'so this lasting means new ones fail too (see the worker log).',
        metric: calls.unhealthy,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
        threshold: 1,
        evaluationPeriods: 3,
      });
      alarm('CallsNoHealthyTarget', {
        alarmName: 'calls-no-healthy-task',
        alarmDescription: 'No worker task passes the calls health check: the calls endpoint cannot answer.',
        metric: calls.healthy,
        comparisonOperator: cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
        threshold: 1,
        evaluationPeriods: 2,
      });
      alarm('Calls5xx', {
        alarmName: 'calls-5xx',
        alarmDescription:
          `More than ${CALLS_5XX_ALARM_PERCENT}% of the calls endpoint's answers were 5xx (the load balancer's own, ` +
          'such as 502/503/504, or the workers\') in two of three 5-minute periods.',
        metric: calls.errorPercent,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        threshold: CALLS_5XX_ALARM_PERCENT,
        evaluationPeriods: 3,
        datapointsToAlarm: 2,
      });
    }

    // ---- dashboard ----
    const graph = (title: string, left: cloudwatch.IMetric[], extra: Partial<cloudwatch.GraphWidgetProps> = {}) =>
      new cloudwatch.GraphWidget({ title, left, width: 6, height: 6, ...extra });
    const queueMetric = (q: sqs.IQueue, label: string, m: 'visible' | 'inflight' | 'age') => {
      const o = { statistic: 'Maximum', period: MINUTE, label };
      if (m === 'visible') return q.metricApproximateNumberOfMessagesVisible(o);
      if (m === 'inflight') return q.metricApproximateNumberOfMessagesNotVisible(o);
      return q.metricApproximateAgeOfOldestMessage(o);
    };
    const api = props.api;
    const fn = props.apiFunction;

    this.dashboard = new cloudwatch.Dashboard(this, 'Dashboard', {
      dashboardName: `${stackName}-ratepool`,
      defaultInterval: Duration.hours(3),
      widgets: [
        [
          new cloudwatch.TextWidget({
            markdown:
              '## ratepool\nPer-org graphs find every org that publishes metrics, without a redeploy. ' +
              'Alarms notify the SNS topic of the stack output AlarmTopicArn.',
            width: 24,
            height: 2,
          }),
        ],
        [
          graph('Calls per minute, by org', [perOrg('Calls', 'Sum')]),
          graph('Tokens per minute, by org', [
            perOrg('PromptTokens', 'Sum', `${ORG_LABEL} prompt`),
            perOrg('CompletionTokens', 'Sum', `${ORG_LABEL} completion`),
          ]),
          graph('429 rate-limited answers, by org', [perOrg('RateLimited', 'Sum')]),
          graph('Headroom, by org (0..1)', [perOrg('HeadroomRatio', 'Minimum')], {
            leftYAxis: { min: 0, max: 1 },
          }),
        ],
        [
          graph(`429 rate %, by org (alarm above ${RATE_LIMITED_ALARM_PERCENT}%)`, s.orgs.map((org, i) => rateLimitedPercent(org, i)), {
            leftAnnotations: [{ value: RATE_LIMITED_ALARM_PERCENT, label: 'alarm', color: cloudwatch.Color.RED }],
          }),
          graph('insufficient_quota answers, by org', [perOrg('InsufficientQuota', 'Sum')]),
          graph('Provider errors, by org', [
            perOrg('ServerErrors', 'Sum', `${ORG_LABEL} 5xx`),
            perOrg('Timeouts', 'Sum', `${ORG_LABEL} timeout`),
            perOrg('ConnectionErrors', 'Sum', `${ORG_LABEL} connection`),
          ]),
          graph('Provider latency, by org (ms)', [perOrg('LatencyMs', 'Average')]),
        ],
        [
          graph('Queue depth', [
            queueMetric(props.interactiveQueue, 'interactive waiting', 'visible'),
            queueMetric(props.interactiveQueue, 'interactive in flight', 'inflight'),
            queueMetric(props.batchQueue, 'batch waiting', 'visible'),
            queueMetric(props.batchQueue, 'batch in flight', 'inflight'),
          ]),
          graph('Oldest waiting message (s)', [
            queueMetric(props.interactiveQueue, 'interactive', 'age'),
            queueMetric(props.batchQueue, 'batch', 'age'),
          ], {
            leftAnnotations: [
              { value: s.interactiveMaxAgeSecs, label: 'interactive alarm', color: cloudwatch.Color.ORANGE },
              { value: s.batchMaxAgeSecs, label: 'batch alarm', color: cloudwatch.Color.RED },
            ],
          }),
          graph('Dead-letter queue depth', [queueMetric(props.deadLetterQueue, 'dead-lettered jobs', 'visible')]),
          graph('Worker tasks', [
            props.scaling.runningTasks.with({ label: 'running' }),
            props.scaling.desiredTasks.with({ label: 'desired' }),
          ], { leftYAxis: { min: 0 } }),
        ],
        [
          graph('Jobs finished', [
            appMetric('JobsSucceeded', 'Sum', 'succeeded'),
            appMetric('JobsFailed', 'Sum', 'failed'),
            appMetric('JobsCancelled', 'Sum', 'cancelled'),
          ]),
          graph('Job duration (s)', [
            appMetric('JobDurationSeconds', 'Average', 'average'),
            appMetric('JobDurationSeconds', 'Maximum', 'maximum'),
          ]),
          graph('Jobs in flight and ledger requests', [appMetric('InFlightJobs', 'Maximum', 'jobs in flight (largest worker)')], {
            right: [appMetric('LedgerRequests', 'Sum', 'ledger requests')],
          }),
          graph('Scaling signal', [props.scaling.backlogPerTask], {
            right: [props.scaling.deficit],
            leftAnnotations: [{ value: s.workerConcurrency, label: 'jobs one task runs at once' }],
          }),
        ],
        [
          graph('API requests and errors', [
            api.metricCount({ period: MINUTE, label: 'requests' }),
            api.metricClientError({ period: MINUTE, label: '4xx' }),
            api.metricServerError({ period: MINUTE, label: '5xx' }),
          ]),
          graph('API latency (ms)', [
            api.metricLatency({ period: MINUTE, statistic: 'p50', label: 'p50' }),
            api.metricLatency({ period: MINUTE, statistic: 'p99', label: 'p99' }),
            api.metricIntegrationLatency({ period: MINUTE, statistic: 'p99', label: 'Lambda p99' }),
          ]),
          graph('API Lambda and authorizer errors', [
            fn.metricErrors({ period: MINUTE, label: 'API errors' }),
            fn.metricThrottles({ period: MINUTE, label: 'API throttles' }),
            props.authorizerFunction.metricErrors({ period: MINUTE, label: 'authorizer errors' }),
            props.authorizerFunction.metricThrottles({ period: MINUTE, label: 'authorizer throttles' }),
          ]),
          graph('API Lambda invocations and duration', [fn.metricInvocations({ period: MINUTE, label: 'invocations' })], {
            right: [fn.metricDuration({ period: MINUTE, statistic: 'p99', label: 'duration p99 (ms)' })],
          }),
        ],
      ],
    });
    if (calls && s.calls && props.scaling.callsPerTask) {
      this.dashboard.addWidgets(
        graph('Calls per minute', [calls.requests], {
          right: [props.scaling.callsPerTask],
          rightAnnotations: [{ value: s.calls.perTaskPerMinute, label: 'calls a minute one task is sized for' }],
        }),
        graph(`Calls 5xx (alarm above ${CALLS_5XX_ALARM_PERCENT}%)`, [calls.elb5xx, calls.target5xx], {
          right: [calls.errorPercent],
          rightAnnotations: [{ value: CALLS_5XX_ALARM_PERCENT, label: 'alarm', color: cloudwatch.Color.RED }],
        }),
        graph('Calls: tasks in service', [calls.healthy, calls.unhealthy], { leftYAxis: { min: 0 } }),
        graph('Calls: time to first byte (s)', [calls.firstByteP50, calls.firstByteP99]),
      );
    }
  }
}

/** The load balancer's and the target group's metrics of the calls endpoint, one-minute periods. */
function callsMetrics(calls: CallsEndpoint) {
  const tg = calls.targetGroup.metrics;
  const requests = tg.requestCount({ period: MINUTE, statistic: 'Sum', label: 'calls' });
  const elb5xx = calls.loadBalancer.metrics.httpCodeElb(elbv2.HttpCodeElb.ELB_5XX_COUNT, {
    period: MINUTE,
    statistic: 'Sum',
    label: '5xx from the load balancer',
  });
  const target5xx = tg.httpCodeTarget(elbv2.HttpCodeTarget.TARGET_5XX_COUNT, {
    period: MINUTE,
    statistic: 'Sum',
    label: '5xx from the workers',
  });
  const five = { period: FIVE_MINUTES };
  return {
    requests,
    elb5xx,
    target5xx,
    // RequestCount leaves out what the load balancer refused before choosing
    // a task (503 with no task in service), so its own 5xx join the total.
    errorPercent: new cloudwatch.MathExpression({
      expression:
        'IF(FILL(requests, 0) + FILL(elb5xx, 0) > 0, ' +
        '100 * (FILL(elb5xx, 0) + FILL(target5xx, 0)) / (FILL(requests, 0) + FILL(elb5xx, 0)), 0)',
      usingMetrics: { requests: requests.with(five), elb5xx: elb5xx.with(five), target5xx: target5xx.with(five) },
      period: FIVE_MINUTES,
      label: '5xx %',
    }),
    healthy: tg.healthyHostCount({ period: MINUTE, statistic: 'Minimum', label: 'healthy' }),
    unhealthy: tg.unhealthyHostCount({ period: MINUTE, statistic: 'Maximum', label: 'unhealthy' }),
    // For a streamed call, the time until its first chunk.
    firstByteP50: tg.targetResponseTime({ period: MINUTE, statistic: 'p50', label: 'p50' }),
    firstByteP99: tg.targetResponseTime({ period: MINUTE, statistic: 'p99', label: 'p99' }),
  };
}

/** Every org's series of a worker metric, labelled with the org. */
function perOrg(metricName: string, statistic: string, label = ORG_LABEL): cloudwatch.MathExpression {
  return new cloudwatch.MathExpression({
    expression: `SEARCH('{${METRICS_NAMESPACE},Org} MetricName="${metricName}"', '${statistic}', 60)`,
    usingMetrics: {},
    label,
    period: MINUTE,
  });
}

function orgMetric(org: string, metricName: string, statistic: string, period: Duration): cloudwatch.Metric {
  return new cloudwatch.Metric({
    namespace: METRICS_NAMESPACE,
    metricName,
    dimensionsMap: { Org: org },
    statistic,
    period,
  });
}

function appMetric(metricName: string, statistic: string, label: string): cloudwatch.Metric {
  return new cloudwatch.Metric({ namespace: METRICS_NAMESPACE, metricName, statistic, label, period: FIVE_MINUTES });
}

/**
 * 429 answers as a percentage of the org's calls; 0 while it makes none.
 * `index` keeps the metric ids apart when several orgs share one graph.
 */
function rateLimitedPercent(org: OrgSettings, index: number): cloudwatch.MathExpression {
  const calls = `calls${index}`;
  const limited = `limited${index}`;
  return new cloudwatch.MathExpression({
    expression: `IF(${calls} > 0, 100 * FILL(${limited}, 0) / ${calls}, 0)`,
    usingMetrics: {
      [calls]: orgMetric(org.name, 'Calls', 'Sum', FIVE_MINUTES),
      [limited]: orgMetric(org.name, 'RateLimited', 'Sum', FIVE_MINUTES),
    },
    label: `${org.name} 429 %`,
    period: FIVE_MINUTES,
  });
}
