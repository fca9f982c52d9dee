//! The state every handler and the scheduler share ([`AppState`]): the configuration, the job
//! table, the upload slots, the rate limiter, the metrics, the worker key, and the scheduler's
//! wake-up and the backoff that pauses it while the helper refuses jobs.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::budget::MemoryBudget;
use crate::config::{ClientShares, Config};
use crate::jobs::JobTable;
use crate::manifest::ManifestPolicy;
use crate::metrics::{Gauges, Metrics};
use crate::ratelimit::RateLimiter;
use crate::signing::WorkerKey;
use crate::upload::slots::UploadSlots;
use crate::upload::UploadLimits;

/// Everything the handlers and the scheduler share.
#[derive(Debug)]
pub struct AppState {
    pub config: Config,
    pub policy: ManifestPolicy,
    pub upload_limits: UploadLimits,
    /// Uploads in progress at once.
    pub uploads: UploadSlots,
    pub jobs: JobTable,
    pub limiter: Mutex<RateLimiter>,
    pub metrics: Metrics,
    pub worker_key: WorkerKey,
    /// Wakes the scheduler ([`AppState::wake_scheduler`]).
    pub(crate) wake: Notify,
    busy: Mutex<Backoff>,
    /// The helper's template list, shared for a moment (`server::templates`).
    pub(crate) templates: crate::server::templates::TemplateCache,
}

/// The pause before the queue is offered to the helper again after it could not take a job:
/// `busy_retry_ms`, doubled after each refusal that came after the last pause ended, up to
/// `busy_retry_max_ms`; back to the start once the helper accepts a job.
#[derive(Debug, Default)]
struct Backoff {
    until: Option<Instant>,
    /// Refusals in a row (one per pause).
    streak: u32,
}

impl AppState {
    pub fn new(config: Config, worker_key: WorkerKey) -> Arc<AppState> {
        let limit = config.retention.memory_budget_bytes;
        let budget = MemoryBudget::new(
            limit,
            ClientShares::of(limit, config.client_shares.memory_percent),
        );
        let queue_share =
            ClientShares::of_count(config.queue_capacity, config.client_shares.queue_percent);
        let jobs = JobTable::new(
            config.queue_capacity,
            queue_share,
            budget,
            config.retention.log_bytes,
        );
        Arc::new(AppState {
            policy: manifest_policy(&config),
            upload_limits: UploadLimits {
                max_body_bytes: config.max_body_bytes,
                max_stdin_bytes: config.max_stdin_bytes,
                ..UploadLimits::default()
            },
            uploads: UploadSlots::new(
                config.max_concurrent_uploads,
                config.uploads_per_client(),
                Duration::from_millis(config.upload_wait_ms),
            ),
            jobs,
            limiter: Mutex::new(RateLimiter::new(config.client_limits.clone())),
            metrics: Metrics::new(),
            worker_key,
            wake: Notify::new(),
            busy: Mutex::new(Backoff::default()),
            templates: Default::default(),
            config,
        })
    }

    /// Tells the scheduler that the queue or the running set changed.
    pub fn wake_scheduler(&self) {
        self.wake.notify_one();
    }

    pub fn limiter(&self) -> std::sync::MutexGuard<'_, RateLimiter> {
        // The limiter's maps stay consistent across a panic in a caller.
        self.limiter.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn gauges(&self) -> Gauges {
        let counts = self.jobs.counts();
        Gauges {
            queued: counts.queued,
            running: counts.running,
            finished_held: counts.finished,
            memory_used_bytes: self.jobs.budget().used(),
            memory_budget_bytes: self.jobs.budget().limit(),
            uploads_in_progress: self.uploads.in_progress(),
            uploads_waiting: self.uploads.waiting(),
        }
    }

    fn backoff(&self) -> std::sync::MutexGuard<'_, Backoff> {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn busy_pause(&self) -> Option<Duration> {
        let mut backoff = self.backoff();
        let until = backoff.until?;
        let left = until.checked_duration_since(Instant::now());
        if left.is_none() {
            backoff.until = None;
        }
        left
    }

    /// The helper could not take a job: pause the queue, longer each time in a row. Refusals
    /// during a pause (jobs sent just before it) do not lengthen it.
    pub(crate) fn set_busy(&self) {
        let mut backoff = self.backoff();
        let now = Instant::now();
        if backoff.until.is_some_and(|until| until > now) {
            return;
        }
        let pause = pause_ms(
            self.config.busy_retry_ms,
            self.config.busy_retry_max_ms,
            backoff.streak,
        );
        backoff.streak = backoff.streak.saturating_add(1);
        backoff.until = Some(now + Duration::from_millis(pause));
    }

    /// The helper took a job: the next refusal starts the backoff from the beginning.
    pub(crate) fn helper_accepted(&self) {
        self.backoff().streak = 0;
    }
}

/// The pause after `streak` earlier pauses in a row: `first` doubled each time, at most `max`.
fn pause_ms(first: u64, max: u64, streak: u32) -> u64 {
    let factor = 1u64 << streak.min(16);
    first.saturating_mul(factor).min(max.max(first))
}

fn manifest_policy(config: &Config) -> ManifestPolicy {
    let p = &config.policy;
    ManifestPolicy {
        interpreters: p.interpreters.clone(),
        environments: p.environments.clone(),
        max_timeout_s: p.max_timeout_s,
        max_memory_mb: p.max_memory_mb,
        max_cpu_seconds: p.max_cpu_seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::pause_ms;

    #[test]
    fn given_refusals_in_a_row_then_the_pause_doubles_up_to_the_maximum() {
        let pauses: Vec<u64> = (0..8).map(|n| pause_ms(500, 8000, n)).collect();
        assert_eq!(pauses, [500, 1000, 2000, 4000, 8000, 8000, 8000, 8000]);
        assert_eq!(pause_ms(500, 8000, u32::MAX), 8000);
        assert_eq!(pause_ms(500, 100, 3), 500, "max below first: first");
    }
}
