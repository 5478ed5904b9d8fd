/**
 * How long a worker task's work may take, and the AWS limits it must fit, in
 * one place because each number depends on the others.
 *
 * Stopping a task (scale-in, deploy, replacement of an unhealthy task) goes:
 *
 * 1. ECS deregisters the task from the calls target group. The load balancer
 *    sends it no new call, lets the calls in flight finish, and reports the
 *    target unused once they are done or the deregistration delay has passed.
 *    ECS waits for that before anything else.
 * 2. SIGTERM. The worker stops taking jobs, lets running steps finish for
 *    `WORKER_SHUTDOWN_GRACE_SECS`, hands back the rest and exits: at most the
 *    SQS long poll in progress + the grace + the hand-back.
 * 3. SIGKILL `WORKER_STOP_TIMEOUT_SECS` after SIGTERM.
 *
 * A call lasts at most its wait for capacity (`[calls] max_wait_secs`; the
 * router starts no attempt past it) plus one provider timeout. While it
 * waits, and until a non-streamed answer arrives, no byte crosses the
 * connection, so the load balancer's idle timeout must outlast the whole
 * call, or it answers 504 in its place. The deregistration delay is the same
 * bound: a stopping task is then drained of calls before step 2, and the stop
 * timeout is left to the jobs alone.
 */

/** Fargate's maximum time from SIGTERM to SIGKILL. */
export const WORKER_STOP_TIMEOUT_SECS = 120;

/** SQS long polling (the queues' ReceiveMessageWaitTime; the worker polls as long). */
export const SQS_LONG_POLL_SECS = 20;

/**
 * Seconds a stopping worker lets running steps finish. SIGTERM to exit is at
 * most the 20 s long poll in progress + this + the hand-back: under the 100 s
 * the design allows, well inside the task's 120 s stop timeout.
 */
export const WORKER_SHUTDOWN_GRACE_SECS = 70;

/** Every org's `timeout_secs` in the rendered config: one provider attempt. */
export const PROVIDER_TIMEOUT_SECS = 120;

/**
 * What a call does besides waiting and the provider attempt: authentication
 * and admission before, the ledger update, a durable answer's write and the
 * response after.
 */
export const CALL_MARGIN_SECS = 30;

/** An ALB's largest idle timeout. */
export const ALB_MAX_IDLE_TIMEOUT_SECS = 4000;

/** A target group's largest deregistration delay. */
export const MAX_DEREGISTRATION_DELAY_SECS = 3600;

/**
 * The longest a call can take, with its margin: the ALB idle timeout and the
 * calls target group's deregistration delay.
 */
export function callDrainSecs(maxWaitSecs: number): number {
  return maxWaitSecs + PROVIDER_TIMEOUT_SECS + CALL_MARGIN_SECS;
}

/**
 * The largest `[calls] max_wait_secs` whose calls both limits can hold (the
 * deregistration delay is the smaller one).
 */
export const MAX_CALLS_MAX_WAIT_SECS =
  Math.min(ALB_MAX_IDLE_TIMEOUT_SECS, MAX_DEREGISTRATION_DELAY_SECS) - PROVIDER_TIMEOUT_SECS - CALL_MARGIN_SECS;
