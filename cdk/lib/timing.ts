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
 *    the config file's `[workers] shutdown_grace_secs`, hands back the rest
 *    and exits: at most the SQS long poll in progress + the grace + the
 *    hand-back.
 * 3. SIGKILL `WORKER_STOP_TIMEOUT_SECS` after SIGTERM.
 *
 * A call lasts at most its wait for capacity (`[calls] max_wait_secs`, or up
 * to `max_wait_cap_secs` when it asks; the router starts no attempt past it)
 * plus one provider timeout (its org's `timeout_secs`). While it
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

/** What a stopping worker takes after its grace: handing back the jobs it still holds. */
export const HAND_BACK_SECS = 10;

/**
 * SIGTERM to exit, at most: the design leaves 20 s of the 120 s stop timeout
 * as a margin before SIGKILL.
 */
export const MAX_SIGTERM_TO_EXIT_SECS = 100;

/**
 * The largest `[workers] shutdown_grace_secs`: the long poll in progress +
 * the grace + the hand-back must fit `MAX_SIGTERM_TO_EXIT_SECS`.
 */
export const MAX_SHUTDOWN_GRACE_SECS = MAX_SIGTERM_TO_EXIT_SECS - SQS_LONG_POLL_SECS - HAND_BACK_SECS;

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

/** SQS's largest visibility timeout (12 hours). */
export const MAX_VISIBILITY_TIMEOUT_SECS = 43200;

/**
 * The longest a call can take, with its margin: the ALB idle timeout and the
 * calls target group's deregistration delay. `longestWaitSecs` is the config
 * file's `[calls] max_wait_cap_secs` (a `Ratepool-Max-Wait` header may ask
 * for that much), `providerTimeoutSecs` the largest `timeout_secs` of its orgs.
 */
export function callDrainSecs(longestWaitSecs: number, providerTimeoutSecs: number): number {
  return longestWaitSecs + providerTimeoutSecs + CALL_MARGIN_SECS;
}

/** The longest call both limits can hold (the deregistration delay is the smaller one). */
export const MAX_CALL_DRAIN_SECS = Math.min(ALB_MAX_IDLE_TIMEOUT_SECS, MAX_DEREGISTRATION_DELAY_SECS);
