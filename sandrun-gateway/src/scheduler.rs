//! The scheduler: takes jobs from the fair queue while fewer than `max_running` run, runs each
//! in its own task (one helper connection per job), records the result, signs it, and expires
//! old jobs. The state it shares with the handlers is [`AppState`].

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sandrun_ipc::{ExitReason, ExitReport};
use tokio::sync::watch;

use crate::helper_client::{self, HelperError, HelperEvent, HelperResult};
use crate::jobs::StreamKind;
use crate::jobs::{Dispatch, ExitSummary, Finish, JobId, JobStatus};
use crate::signing::{canonical_message, EnvironmentClaim, RequirementsClaim, ResultClaim};
use crate::state::AppState;

/// How often expired jobs and idle quota entries are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

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
async fn run_one(state: Arc<AppState>, mut dispatch: Dispatch) {
    let id = dispatch.id;
    let jobs = &state.jobs;
    let metrics = &state.metrics;
    let on_event = |event| match event {
        HelperEvent::Stdout(data) => jobs.push_output(id, StreamKind::Stdout, data),
        HelperEvent::Stderr(data) => jobs.push_output(id, StreamKind::Stderr, data),
        HelperEvent::Started { spawn_us } => metrics.job_spawned(Duration::from_micros(spawn_us)),
        HelperEvent::Accepted(_) => state.helper_accepted(),
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
    let finish = match result {
        Ok(done) => finish_from_result(&state, id, done),
        Err(error) if error.is_retryable() => {
            dispatch.attempts = dispatch.attempts.saturating_add(1);
            let Some(finish) = retry_or_give_up(&state, dispatch.attempts, &error) else {
                state.jobs.requeue(dispatch);
                state.wake_scheduler();
                return;
            };
            finish
        }
        Err(error) => finish_from_error(&state, &error),
    };
    record_finish(&state, dispatch, finish);
}

/// The helper never took the job (`error` is retryable) on its `attempts`-th try: `None` if the
/// job goes back to the front of its queue for another attempt after a pause, or its end (reason
/// `unavailable`) once `helper_attempts` attempts have been refused.
fn retry_or_give_up(state: &AppState, attempts: u32, error: &HelperError) -> Option<Finish> {
    state.set_busy();
    if attempts < state.config.helper_attempts {
        tracing::info!(attempts, error = %error, "sandrund did not take the job; queued again");
        return None;
    }
    tracing::warn!(attempts, error = %error, "sandrund did not take the job; giving up");
    let message = format!("sandrund could not take the job in {attempts} attempts: {error}");
    Some(failed(state, ExitReason::Unavailable, message))
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
    let signature = sign_result(state, id, &done, completed_at_unix);
    let ttl = state.config.ttl(summary.status == JobStatus::Failed);
    // Why the job's requirements could not be installed (reason `requirements`).
    let message = done
        .requirements
        .as_ref()
        .and_then(|r| r.error.as_ref())
        .map(|e| format!("requirements: {e}"));
    Finish {
        summary,
        message,
        exit: Some(done.exit),
        requirements: done.requirements,
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
        // The template was there when the job was submitted and is gone (or lost its lock)
        // now: the job's own reason, not the gateway's fault.
        HelperError::Refused(e) if e.code == sandrun_ipc::ErrorCode::TemplateMissing => {
            (ExitReason::Environment, e.message.clone())
        }
        // The helper refused the job's requirements (its wheelhouse is missing, a line it does
        // not accept): the job's own reason.
        HelperError::Refused(e)
            if e.code == sandrun_ipc::ErrorCode::InvalidRequest
                && e.message.starts_with("requirements") =>
        {
            (ExitReason::Requirements, e.message.clone())
        }
        other => (ExitReason::Internal, other.to_string()),
    };
    if reason == ExitReason::Internal {
        tracing::warn!(error = %message, "job failed in the helper conversation");
    }
    failed(state, reason, message)
}

/// A job that ended without a result from the helper.
fn failed(state: &AppState, reason: ExitReason, message: String) -> Finish {
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
        requirements: None,
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
    done: &HelperResult,
    completed_at: u64,
) -> Option<String> {
    let (exit, outputs) = (&done.exit, &done.outputs);
    let (job_hash, environment) = state.jobs.with_job(id, |job, _| {
        (job.info.job_hash, job.info.environment.clone())
    })?;
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
        // The helper client refuses a report whose lock does not match the job's template, so
        // both are set or neither is.
        environment: environment
            .as_deref()
            .zip(exit.template_lock.as_ref())
            .map(|(name, lock_sha256)| EnvironmentClaim { name, lock_sha256 }),
        requirements: done
            .requirements
            .as_ref()
            .map(RequirementsClaim::from_report),
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
