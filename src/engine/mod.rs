//! The engine: workers that take jobs from the queue, hold their lease, run
//! their steps in dependency order through the router, and checkpoint every
//! finished step. It sees storage only through `crate::storage`'s traits.

pub mod breaker;
mod job;
mod notify;
mod plan;
pub mod quota;
mod retry;
pub mod router;
mod sweep;
pub mod window;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::domain::Clock;
use crate::spec::SpecLimits;
use crate::storage::Backend;
use crate::telemetry::Telemetry;
pub use notify::JobNotifier;
pub use router::Router;

/// How the workers of one process behave.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Jobs in flight in this process.
    pub concurrency: usize,
    /// Steps of one job in flight, unless the job asks for fewer.
    pub step_parallelism: usize,
    /// The queue's visibility timeout and the job lease's time to live; the
    /// heartbeat renews both every third of it.
    pub lease_ttl: Duration,
    /// A job whose runs crashed this many times in a row without finishing
    /// a step is dead-lettered and failed: it keeps taking its workers down.
    /// Runs handed back (shutdown, a storage error) do not count.
    pub max_receives: u32,
    /// How long one receive waits for a message.
    pub poll_wait: Duration,
    /// On shutdown, how long running steps may take to finish and be
    /// checkpointed before their jobs are handed back.
    pub shutdown_grace: Duration,
    pub spec_limits: SpecLimits,
    /// This process's name in leases (`host:pid:random`).
    pub owner: String,
    /// How long a cached answer is served unless the job says otherwise.
    pub cache_ttl: Duration,
    /// How long a step waits for a primary org before fallback orgs may take
    /// it, unless the job says otherwise.
    pub fallback_after: Duration,
    /// How long after submission a job may take, unless the job says
    /// otherwise; `None`: no deadline.
    pub deadline: Option<Duration>,
    /// Tells a finished job's client (its webhook).
    pub notifier: Arc<dyn JobNotifier>,
    /// How long after its creation a job whose queue message is still not
    /// known to be sent is sent by the sweeper (`sweep`).
    pub resend_after: Duration,
}

impl EngineConfig {
    pub fn default_owner() -> String {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
        format!("{host}:{}:{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8])
    }
}

pub struct Engine {
    backend: Backend,
    router: Arc<Router>,
    telemetry: Arc<Telemetry>,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    /// Finished jobs' webhooks, as many at once as there are job slots.
    deliveries: notify::DeliveryPool,
}

impl Engine {
    pub fn new(
        backend: Backend,
        router: Arc<Router>,
        telemetry: Arc<Telemetry>,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
    ) -> Self {
        let deliveries = notify::DeliveryPool::new(config.concurrency);
        Self { backend, router, telemetry, clock, config, deliveries }
    }

    /// Runs workers until `shutdown` fires; then stops receiving, lets
    /// running steps finish for the grace period, hands the unfinished jobs
    /// back to the queue and returns.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.config.concurrency));
        let mut running = JoinSet::new();
        let stop = job::Stop::default();
        let sweeper = tokio::spawn(sweep::run(
            self.backend.clone(),
            self.clock.clone(),
            self.config.resend_after,
            shutdown.clone(),
        ));
        loop {
            while running.try_join_next().is_some() {}
            let first = tokio::select! {
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.cancelled() => break,
            };
            let want = 1 + slots.available_permits().min(9);
            // Not raced against `shutdown`: a receive dropped mid-look leaves
            // the messages it took hidden for a whole visibility timeout, so
            // a SIGTERM would delay those jobs instead of handing them back.
            // It returns within `poll_wait`; what it took after the signal
            // goes straight back to the queue.
            let received = self.backend.queue.receive(want, self.config.poll_wait).await;
            if shutdown.is_cancelled() {
                for d in received.unwrap_or_default() {
                    if let Err(e) = self.backend.queue.extend(&d.receipt, Duration::ZERO).await {
                        tracing::warn!(job = %d.message.job_id, error = %e, "could not hand back a message received while stopping");
                    }
                }
                break;
            }
            let deliveries = match received {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "queue receive failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
            };
            let mut first = Some(first);
            for delivery in deliveries {
                let permit = match first.take() {
                    Some(p) => p,
                    None => match slots.clone().try_acquire_owned() {
                        Ok(p) => p,
                        // Cannot happen (we asked for no more than were free);
                        // hand the message back rather than overcommit.
                        Err(_) => {
                            let _ = self.backend.queue.extend(&delivery.receipt, Duration::ZERO).await;
                            continue;
                        }
                    },
                };
                let engine = self.clone();
                let stop = stop.clone();
                running.spawn(async move {
                    engine.telemetry.jobs_in_flight().inc();
                    job::run_delivery(&engine, delivery, stop).await;
                    engine.telemetry.jobs_in_flight().dec();
                    drop(permit);
                });
            }
        }
        tracing::info!(jobs = running.len(), grace = ?self.config.shutdown_grace, "stopping: no new jobs; letting running steps finish");
        stop.drain.cancel();
        let grace = tokio::time::sleep(self.config.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                next = running.join_next() => if next.is_none() { break },
                _ = &mut grace, if !stop.abort.is_cancelled() => stop.abort.cancel(),
            }
        }
        self.deliveries.drain(self.config.shutdown_grace).await;
        let _ = sweeper.await;
        tracing::info!("workers stopped");
    }

    /// The router, for status reporting.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }
}
