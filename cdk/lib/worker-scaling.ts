/**
 * Worker autoscaling on the backlog, counting the jobs in flight, and on the
 * calls the load balancer sends.
 *
 * A task runs up to `workerConcurrency` jobs at once, so the backlog
 * (visible + in-flight messages of both work queues) needs
 * `backlog / concurrency` tasks; with the calls endpoint, a task is also sized
 * for `callsPerTaskPerMinute` calls a minute (the target group's request
 * count), and the two loads add up on the same tasks. The policies act on
 * the task deficit:
 *
 *     deficit = CEIL(backlog / concurrency + calls / callsPerTaskPerMinute) - desired tasks
 *
 * One deficit for both doors rather than a second policy (target tracking on
 * request count per target) beside the backlog one: each would scale in the
 * tasks the other one needs.
 *
 * - deficit ≥ 1 for one minute: add `deficit` tasks (rounded down to a step).
 *   From zero tasks the deficit is the whole need, so one waiting job starts
 *   one task — target tracking cannot scale out from zero, and
 *   ApproximateNumberOfMessagesVisible alone would read a drained queue with
 *   long jobs still running as "scale in".
 * - deficit ≤ -1 for five minutes: remove the surplus. In-flight jobs are part
 *   of the need, so this never goes below the tasks they occupy, and the tasks
 *   that run jobs hold ECS scale-in protection, so ECS stops idle ones. The
 *   service reaches its minimum only once nothing is queued or in flight:
 *   zero without the calls endpoint, one with it (a call needs a task that
 *   answers now, not one that starts in a minute).
 *
 * The desired count (Container Insights `DesiredTaskCount`) rather than the
 * running count keeps tasks that are still starting from being asked for twice.
 */
import { Duration } from 'aws-cdk-lib';
import * as appscaling from 'aws-cdk-lib/aws-applicationautoscaling';
import * as cloudwatch from 'aws-cdk-lib/aws-cloudwatch';
import type * as ecs from 'aws-cdk-lib/aws-ecs';
import type * as sqs from 'aws-cdk-lib/aws-sqs';
import type { Settings } from './settings';

export interface WorkerScalingProps {
  readonly settings: Settings;
  readonly clusterName: string;
  readonly workQueues: readonly sqs.IQueue[];
  /** The calls target group's RequestCount; needed when the settings have the calls endpoint. */
  readonly callRequests?: cloudwatch.Metric;
}

export interface WorkerScaling {
  readonly scalableTarget: ecs.ScalableTaskCount;
  /** Tasks the backlog needs minus tasks desired: what the policies act on. */
  readonly deficit: cloudwatch.MathExpression;
  /** Visible + in-flight messages per desired task (for the dashboard). */
  readonly backlogPerTask: cloudwatch.MathExpression;
  /** Calls a minute per desired task (for the dashboard); absent without the calls endpoint. */
  readonly callsPerTask?: cloudwatch.MathExpression;
  readonly desiredTasks: cloudwatch.Metric;
  readonly runningTasks: cloudwatch.Metric;
}

const PERIOD = Duration.minutes(1);

export function addWorkerScaling(service: ecs.FargateService, props: WorkerScalingProps): WorkerScaling {
  const s = props.settings;
  const taskMetric = (metricName: string) =>
    new cloudwatch.Metric({
      namespace: 'ECS/ContainerInsights',
      metricName,
      dimensionsMap: { ClusterName: props.clusterName, ServiceName: service.serviceName },
      statistic: cloudwatch.Stats.AVERAGE,
      period: PERIOD,
    });
  const desiredTasks = taskMetric('DesiredTaskCount');
  const runningTasks = taskMetric('RunningTaskCount');

  const usingMetrics: Record<string, cloudwatch.IMetric> = { tasks: desiredTasks };
  const backlogTerms: string[] = [];
  props.workQueues.forEach((q, i) => {
    usingMetrics[`visible${i}`] = q.metricApproximateNumberOfMessagesVisible({ statistic: 'Maximum', period: PERIOD });
    usingMetrics[`inflight${i}`] = q.metricApproximateNumberOfMessagesNotVisible({ statistic: 'Maximum', period: PERIOD });
    backlogTerms.push(`FILL(visible${i}, 0)`, `FILL(inflight${i}, 0)`);
  });
  const backlog = `(${backlogTerms.join(' + ')})`;
  let need = `${backlog} / ${s.workerConcurrency}`;
  const needMetrics = { ...usingMetrics };
  let callsPerTask: cloudwatch.MathExpression | undefined;
  if (s.calls) {
    if (!props.callRequests) throw new Error('internal: the calls endpoint is on, but scaling was not given its request count');
    const calls = props.callRequests.with({ statistic: 'Sum', period: PERIOD });
    needMetrics.calls = calls;
    need += ` + FILL(calls, 0) / ${s.calls.perTaskPerMinute}`;
    callsPerTask = new cloudwatch.MathExpression({
      expression: 'IF(FILL(tasks, 0) > 0, FILL(calls, 0) / FILL(tasks, 0), FILL(calls, 0))',
      usingMetrics: { tasks: desiredTasks, calls },
      period: PERIOD,
      label: 'calls a minute per task',
    });
  }

  const deficit = new cloudwatch.MathExpression({
    expression: `CEIL(${need}) - FILL(tasks, 0)`,
    usingMetrics: needMetrics,
    period: PERIOD,
    label: 'worker tasks needed minus desired',
  });
  const backlogPerTask = new cloudwatch.MathExpression({
    expression: `IF(FILL(tasks, 0) > 0, ${backlog} / FILL(tasks, 0), ${backlog})`,
    usingMetrics,
    period: PERIOD,
    label: 'jobs (queued + in flight) per task',
  });

  const scalableTarget = service.autoScaleTaskCount({ minCapacity: s.minWorkers, maxCapacity: s.maxWorkers });
  const steps = stepSizes(s.maxWorkers);
  scalableTarget.scaleOnMetric('ScaleOut', {
    metric: deficit,
    adjustmentType: appscaling.AdjustmentType.CHANGE_IN_CAPACITY,
    scalingSteps: [{ upper: 1, change: 0 }, ...steps.map((n) => ({ lower: n, change: n }))],
    evaluationPeriods: 1,
    // Another scale-out within a minute only adds what the first did not.
    cooldown: Duration.minutes(1),
  });
  scalableTarget.scaleOnMetric('ScaleIn', {
    metric: deficit,
    adjustmentType: appscaling.AdjustmentType.CHANGE_IN_CAPACITY,
    scalingSteps: [...[...steps].reverse().map((n) => ({ upper: -n, change: -n })), { lower: -1, change: 0 }],
    // Five quiet minutes, so a short gap between jobs does not stop a task.
    evaluationPeriods: 5,
    cooldown: Duration.minutes(5),
  });

  return { scalableTarget, deficit, backlogPerTask, callsPerTask, desiredTasks, runningTasks };
}

/** 1, 2, 3, 4, 6, 8, 12, 16, 24, … and `max` itself: at most 40 steps for any fleet size. */
export function stepSizes(max: number): number[] {
  const out = [1];
  for (let p = 2; p <= max; p *= 2) out.push(p, p + p / 2);
  const steps = out.filter((n) => n <= max);
  if (steps[steps.length - 1] !== max) steps.push(max);
  return steps;
}
