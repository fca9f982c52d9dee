//! The gateway's shared state and its scheduler: takes jobs from the fair queue while fewer than
//! `max_running` run, runs each in its own task (one helper connection per job), records the
//! result, signs it, and expires old jobs.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sandrun_ipc::{ExitReason, ExitReport};
use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::helper_client::{self, HelperError, HelperEvent, HelperResult};
use crate::jobs::{Dispatch, ExitSummary, Finish, JobId, JobStatus, JobTable, MemoryBudget};
use crate::jobs::{OutputFile, StreamKind};
use crate::manifest::ManifestPolicy;
use crate::metrics::{Gauges, Metrics};
use crate::ratelimit::RateLimiter;
use crate::signing::{canonical_message, ResultClaim, WorkerKey};
use crate::upload::slots::UploadSlots;
use crate::upload::UploadLimits;

/// How often expired jobs and idle quota entries are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

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
    wake: Notify,
    busy_until: Mutex<Option<Instant>>,
}

impl AppState {
    pub fn new(config: Config, worker_key: WorkerKey) -> Arc<AppState> {
        let budget = MemoryBudget::new(config.retention.memory_budget_bytes);
        let jobs = JobTable::new(config.queue_capacity, budget, config.retention.log_bytes);
        Arc::new(AppState {
            policy: manifest_policy(&config),
            upload_limits: UploadLimits {
                max_body_bytes: config.max_body_bytes,
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
            busy_until: Mutex::new(None),
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

    fn busy_pause(&self) -> Option<Duration> {
        let mut guard = self
            .busy_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let until = (*guard)?;
        let left = until.checked_duration_since(Instant::now());
        if left.is_none() {
            *guard = None;
        }
        left
    }

    fn set_busy(&self) {
        let pause = Duration::from_millis(self.config.busy_retry_ms);
        *self
            .busy_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + pause);
    }
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

/// Runs the scheduler until `shutdown` turns true.
pub async fn run_scheduler(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let pause = state.busy_pause();
        if pause.is_none() {
            while let Some(dispatch) = state.jobs.take_next(state.config.max_running) {
                tokio::spawn(run_one(Arc::clone(&state), dispatch));
            }
        }
        tokio::select! {
            () = state.wake.notified() => {}
            () = tokio::time::sleep(pause.unwrap_or(SWEEP_EVERY)) => {}
            () = stopped(&mut shutdown) => return,
        }
        let now = Instant::now();
        state.jobs.sweep(now);
        state.limiter().sweep(now);
    }
}

/// Runs one job through the helper and records how it ended.
async fn run_one(state: Arc<AppState>, dispatch: Dispatch) {
    let id = dispatch.id;
    let jobs = &state.jobs;
    let metrics = &state.metrics;
    let on_event = |event| match event {
        HelperEvent::Stdout(data) => jobs.push_output(id, StreamKind::Stdout, data),
        HelperEvent::Stderr(data) => jobs.push_output(id, StreamKind::Stderr, data),
        HelperEvent::Started { spawn_us } => metrics.job_spawned(Duration::from_micros(spawn_us)),
        HelperEvent::Accepted(_) => {}
    };
    let socket = &state.config.helper_socket;
    let result = helper_client::run_job(
        socket,
        &dispatch.pending,
        jobs.budget(),
        &dispatch.cancel,
        on_event,
    )
    .await;
    if let Err(HelperError::Busy(_)) = result {
        tracing::info!(job = %id, "sandrund is busy; job queued again");
        state.set_busy();
        state.jobs.requeue(dispatch);
        state.wake_scheduler();
        return;
    }
    let finish = match result {
        Ok(done) => finish_from_result(&state, id, done),
        Err(error) => finish_from_error(&state, &error),
    };
    record_finish(&state, dispatch, finish);
}

fn record_finish(state: &AppState, dispatch: Dispatch, finish: Finish) {
    let status = finish.summary.status.as_str();
    let reason = finish.summary.reason.map_or("none", ExitReason::as_str);
    let cpu_ms = finish.exit.as_ref().map_or(0, |e| e.cpu_ms);
    tracing::info!(job = %dispatch.id, status, reason, "job finished");
    // The inputs are no longer needed: release their memory before recording the outputs.
    drop(dispatch.pending);
    if let Some((client, age)) = state.jobs.finish(dispatch.id, finish) {
        state.metrics.job_finished(status, reason, age);
        state.limiter().finish(client, cpu_ms, Instant::now());
    } else {
        state
            .limiter()
            .finish(dispatch.client, cpu_ms, Instant::now());
    }
    state.wake_scheduler();
}

/// The status and reason a helper's exit report means.
pub fn summarize(report: &ExitReport) -> ExitSummary {
    let reason = (report.reason != ExitReason::None).then_some(report.reason);
    let ok = reason.is_none() && report.exit_code == Some(0);
    ExitSummary {
        status: if ok {
            JobStatus::Completed
        } else {
            JobStatus::Failed
        },
        reason,
        exit_code: report.exit_code,
        signal: report.signal,
    }
}

fn finish_from_result(state: &AppState, id: JobId, done: HelperResult) -> Finish {
    let summary = summarize(&done.exit);
    let completed_at_unix = unix_now();
    let signature = sign_result(state, id, &done.exit, &done.outputs, completed_at_unix);
    let ttl = state.config.ttl(summary.status == JobStatus::Failed);
    Finish {
        summary,
        message: None,
        exit: Some(done.exit),
        outputs: done.outputs,
        skipped: done.skipped,
        output_reservation: Some(done.reservation),
        signature,
        completed_at_unix,
        ttl,
    }
}

fn finish_from_error(state: &AppState, error: &HelperError) -> Finish {
    let (reason, message) = match error {
        HelperError::Cancelled => (ExitReason::Cancelled, "cancelled while running".to_owned()),
        other => (ExitReason::Internal, other.to_string()),
    };
    if reason == ExitReason::Internal {
        tracing::warn!(error = %message, "job failed in the helper conversation");
    }
    let summary = ExitSummary {
        status: JobStatus::Failed,
        reason: Some(reason),
        exit_code: None,
        signal: None,
    };
    Finish {
        summary,
        message: Some(message),
        exit: None,
        outputs: Vec::new(),
        skipped: Vec::new(),
        output_reservation: None,
        signature: None,
        completed_at_unix: unix_now(),
        ttl: state.config.ttl(true),
    }
}

fn sign_result(
    state: &AppState,
    id: JobId,
    exit: &ExitReport,
    outputs: &[OutputFile],
    completed_at: u64,
) -> Option<String> {
    let job_hash = state.jobs.with_job(id, |job, _| job.info.job_hash)?;
    let pairs: Vec<(String, [u8; 32])> =
        outputs.iter().map(|o| (o.path.clone(), o.sha256)).collect();
    let id_text = id.to_string();
    let claim = ResultClaim {
        job_id: &id_text,
        job_hash: &job_hash,
        exit_code: exit.exit_code,
        cpu_ms: exit.cpu_ms,
        memory_peak_bytes: exit.memory_peak_bytes,
        outputs: &pairs,
        completed_at,
    };
    Some(state.worker_key.sign(&canonical_message(&claim)))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Resolves once `shutdown` is true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
