/**
 * Worker autoscaling on the backlog, counting the jobs in flight.
 *
 * A task runs up to `workerConcurrency` jobs at once, so the backlog
 * (visible + in-flight messages of both work queues) needs
 * `CEIL(backlog / concurrency)` tasks. The policies act on the task deficit:
 *
 *     deficit = CEIL(backlog / concurrency) - desired tasks
 *
 * - deficit ≥ 1 for one minute: add `deficit` tasks (rounded down to a step).
 *   From zero tasks the deficit is the whole need, so one waiting job starts
 *   one task — target tracking cannot scale out from zero, and
 *   ApproximateNumberOfMessagesVisible alone would read a drained queue with
 *   long jobs still running as "scale in".
 * - deficit ≤ -1 for five minutes: remove the surplus. In-flight jobs are part
 *   of the need, so this never goes below the tasks they occupy, and the tasks
 *   that run jobs hold ECS scale-in protection, so ECS stops idle ones. The
 *   service reaches zero only once nothing is queued or in flight.
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
}

export interface WorkerScaling {
  readonly scalableTarget: ecs.ScalableTaskCount;
  /** Tasks the backlog needs minus tasks desired: what the policies act on. */
  readonly deficit: cloudwatch.MathExpression;
  /** Visible + in-flight messages per desired task (for the dashboard). */
  readonly backlogPerTask: cloudwatch.MathExpression;
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

  const deficit = new cloudwatch.MathExpression({
    expression: `CEIL(${backlog} / ${s.workerConcurrency}) - FILL(tasks, 0)`,
    usingMetrics,
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

  return { scalableTarget, deficit, backlogPerTask, desiredTasks, runningTasks };
}

/** 1, 2, 3, 4, 6, 8, 12, 16, 24, … and `max` itself: at most 40 steps for any fleet size. */
export function stepSizes(max: number): number[] {
  const out = [1];
  for (let p = 2; p <= max; p *= 2) out.push(p, p + p / 2);
  const steps = out.filter((n) => n <= max);
  if (steps[steps.length - 1] !== max) steps.push(max);
  return steps;
}
