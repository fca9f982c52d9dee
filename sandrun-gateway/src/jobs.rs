//! The job table: every job the gateway knows, its state, its live event log, its results, and
//! how long it is kept.
//!
//! All state sits behind one short-held mutex (no `.await` while it is held). Logs and outputs
//! live in memory only, charged to a [`MemoryBudget`] and to the client's share of it. A finished
//! job expires after its TTL,
//! after its tarball is downloaded, or on `DELETE`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::requirements::RequirementsReport;
use bytes::Bytes;
use rand::RngCore;
use sandrun_ipc::{ExitReason, ExitReport, JobSpec};
use serde::Serialize;
use tokio::sync::{watch, Notify};

use crate::budget::{MemoryBudget, Reservation, SharedReservation};
use crate::queue::{FairQueue, QueueFull};
use crate::ratelimit::ClientKey;

/// A gateway job id: 128 random bits, shown as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JobId([u8; 16]);

impl JobId {
    pub fn random() -> JobId {
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        JobId(bytes)
    }

    /// Parses the hex form; anything else (other length, upper case, non-hex) is `None`.
    pub fn parse(s: &str) -> Option<JobId> {
        if s.len() != 32
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(s, &mut bytes).ok()?;
        Some(JobId(bytes))
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Completed,
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Failed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdout,
    Stderr,
}

/// One entry of a job's live log, replayed to late WebSocket subscribers.
#[derive(Debug, Clone)]
pub enum JobEvent {
    Status(JobStatus),
    Output(StreamKind, Bytes),
    Exit(ExitSummary),
    Error(String),
}

/// How a job ended, as events and `/status` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitSummary {
    pub status: JobStatus,
    pub reason: Option<ExitReason>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
}

/// One returned output file, held in memory until the job is deleted.
#[derive(Debug, Clone)]
pub struct OutputFile {
    pub path: String,
    pub sha256: [u8; 32],
    pub data: Bytes,
}

/// An output the helper (or the gateway's memory budget) refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedOutput {
    pub path: String,
    pub kind: String,
}

/// Facts about a job fixed at submission.
#[derive(Debug, Clone)]
pub struct JobInfo {
    pub interpreter: String,
    pub environment: Option<String>,
    pub job_hash: [u8; 32],
}

/// What the runner needs to send the job to the helper; dropped (with its memory) once sent.
#[derive(Debug)]
pub struct PendingJob {
    pub spec: JobSpec,
    /// File contents in bundle entry order.
    pub files: Vec<Bytes>,
    /// The job's stdin (`spec.stdin_bytes` of them), sent after the files.
    pub stdin: Bytes,
    pub reservation: Reservation,
}

/// Everything a finished runner reports.
#[derive(Debug)]
pub struct Finish {
    pub summary: ExitSummary,
    pub message: Option<String>,
    pub exit: Option<ExitReport>,
    /// What the job's requirements came to (parsed by the helper client).
    pub requirements: Option<RequirementsReport>,
    pub outputs: Vec<OutputFile>,
    pub skipped: Vec<SkippedOutput>,
    pub output_reservation: Option<Reservation>,
    pub signature: Option<String>,
    pub completed_at_unix: u64,
    pub ttl: Duration,
}

/// A job as the table holds it.
#[derive(Debug)]
pub struct Job {
    pub id: JobId,
    pub client: ClientKey,
    pub info: JobInfo,
    pub status: JobStatus,
    pub reason: Option<ExitReason>,
    pub message: Option<String>,
    pub submitted_at: Instant,
    pub finished_at: Option<Instant>,
    pub events: Vec<JobEvent>,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub exit: Option<ExitReport>,
    /// What the job's requirements installed, or why they failed; `None` without requirements.
    pub requirements: Option<RequirementsReport>,
    pub outputs: Vec<OutputFile>,
    pub skipped: Vec<SkippedOutput>,
    pub signature: Option<String>,
    pub completed_at_unix: Option<u64>,
    expires_at: Option<Instant>,
    pending: Option<PendingJob>,
    cancel: Arc<Notify>,
    changed: watch::Sender<u64>,
    /// The job's charge against the memory budget for what it produces: its retained log bytes (grown by `push_output`, up to the log cap
    /// and the client's share) and, once it finishes, its outputs (the helper's reservation is
    /// absorbed into it). The charge is the submitting client's. It is shared: a response body
    /// sending outputs, and a WebSocket reading the event log, hold a clone ([`Job::held`]), so
    /// the bytes stay charged until the last holder is done even if the job is deleted first;
    /// it is released when the last clone is dropped. The job's inputs are charged separately,
    /// to `PendingJob::reservation`, and released when the job ends (or is deleted queued).
    held: SharedReservation,
    /// Times the helper did not take the job (it waited in the queue again after each).
    helper_attempts: u32,
}

impl Job {
    pub fn new(
        id: JobId,
        client: ClientKey,
        info: JobInfo,
        pending: PendingJob,
        held: Reservation,
    ) -> Job {
        Job {
            id,
            client,
            info,
            status: JobStatus::Queued,
            reason: None,
            message: None,
            submitted_at: Instant::now(),
            finished_at: None,
            events: vec![JobEvent::Status(JobStatus::Queued)],
            stdout_bytes: 0,
            stderr_bytes: 0,
            stdout_truncated: false,
            stderr_truncated: false,
            exit: None,
            requirements: None,
            outputs: Vec::new(),
            skipped: Vec::new(),
            signature: None,
            completed_at_unix: None,
            expires_at: None,
            pending: Some(pending),
            cancel: Arc::new(Notify::new()),
            changed: watch::channel(0).0,
            held: SharedReservation::new(held),
            helper_attempts: 0,
        }
    }

    /// The retained bytes of one stream, exactly as the job wrote them.
    pub fn log_bytes(&self, kind: StreamKind) -> Vec<u8> {
        let held = match kind {
            StreamKind::Stdout => self.stdout_bytes,
            StreamKind::Stderr => self.stderr_bytes,
        };
        let mut bytes = Vec::with_capacity(usize::try_from(held).unwrap_or(0));
        for event in &self.events {
            if let JobEvent::Output(k, chunk) = event {
                if *k == kind {
                    bytes.extend_from_slice(chunk);
                }
            }
        }
        bytes
    }

    /// The retained bytes of one stream, lossily decoded (invalid UTF-8 becomes U+FFFD).
    pub fn log_text(&self, kind: StreamKind) -> String {
        String::from_utf8_lossy(&self.log_bytes(kind)).into_owned()
    }

    /// A clone of the job's charge for its logs and outputs (the field `held`), for a response
    /// that sends some of them: the bytes stay charged until that response is done.
    pub fn held(&self) -> SharedReservation {
        self.held.clone()
    }

    fn push_event(&mut self, event: JobEvent) {
        self.events.push(event);
        self.changed.send_modify(|v| *v += 1);
    }
}

/// A job taken from the queue to run.
#[derive(Debug)]
pub struct Dispatch {
    pub id: JobId,
    pub client: ClientKey,
    pub pending: PendingJob,
    pub cancel: Arc<Notify>,
    /// Earlier attempts the helper did not take.
    pub attempts: u32,
}

/// What `DELETE /jobs/{id}` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The job was queued; it is now failed with reason `cancelled`.
    CancelledQueued(ClientKey),
    /// The job was running; its runner was told to cancel.
    CancellingRunning,
    /// The job was finished; it and its data are gone.
    Deleted,
    NotFound,
}

/// Numbers for `/stats` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TableCounts {
    pub queued: usize,
    pub running: usize,
    pub finished: usize,
    pub queue_capacity: usize,
}

#[derive(Debug)]
struct Inner {
    jobs: HashMap<JobId, Job>,
    queue: FairQueue<ClientKey, JobId>,
    running: usize,
}

/// The job table and the queue, under one lock.
#[derive(Debug)]
pub struct JobTable {
    inner: Mutex<Inner>,
    budget: Arc<MemoryBudget>,
    log_cap: u64,
}

impl JobTable {
    /// A table whose queue holds `queue_capacity` jobs, at most `client_share` of one client.
    pub fn new(
        queue_capacity: usize,
        client_share: usize,
        budget: Arc<MemoryBudget>,
        log_cap: u64,
    ) -> JobTable {
        let inner = Inner {
            jobs: HashMap::new(),
            queue: FairQueue::new(queue_capacity, client_share),
            running: 0,
        };
        JobTable {
            inner: Mutex::new(inner),
            budget,
            log_cap,
        }
    }

    pub fn budget(&self) -> &Arc<MemoryBudget> {
        &self.budget
    }

    /// Whether `client` could queue one more job now (the global capacity and its share).
    pub fn queue_room(&self, client: ClientKey) -> Result<(), QueueFull> {
        self.lock().queue.check_room(&client)
    }

    /// Queues a new job; returns its 1-based queue position.
    pub fn enqueue(&self, job: Job) -> Result<usize, QueueFull> {
        let mut inner = self.lock();
        let (id, client) = (job.id, job.client);
        inner.queue.push(client, id)?;
        inner.jobs.insert(id, job);
        Ok(inner.queue.position(&id).unwrap_or(0))
    }

    /// Takes the next queued job if fewer than `max_running` jobs run.
    pub fn take_next(&self, max_running: usize) -> Option<Dispatch> {
        let mut inner = self.lock();
        if inner.running >= max_running {
            return None;
        }
        let (client, id) = inner.queue.pop()?;
        let job = inner.jobs.get_mut(&id)?;
        let pending = job.pending.take()?;
        job.status = JobStatus::Running;
        job.push_event(JobEvent::Status(JobStatus::Running));
        let cancel = Arc::clone(&job.cancel);
        let attempts = job.helper_attempts;
        inner.running += 1;
        Some(Dispatch {
            id,
            client,
            pending,
            cancel,
            attempts,
        })
    }

    /// Puts a job the helper did not take back at the front of its client's queue (it keeps its
    /// place: neither the capacity nor the client's share applies).
    pub fn requeue(&self, dispatch: Dispatch) {
        let mut inner = self.lock();
        inner.running = inner.running.saturating_sub(1);
        let Some(job) = inner.jobs.get_mut(&dispatch.id) else {
            return;
        };
        job.status = JobStatus::Queued;
        job.pending = Some(dispatch.pending);
        job.helper_attempts = dispatch.attempts;
        job.push_event(JobEvent::Status(JobStatus::Queued));
        inner.queue.push_front(dispatch.client, dispatch.id);
    }

    /// Appends live output, up to the per-stream cap and the memory budget.
    pub fn push_output(&self, id: JobId, kind: StreamKind, mut data: Bytes) {
        let mut inner = self.lock();
        let Some(job) = inner.jobs.get_mut(&id) else {
            return;
        };
        let (held, truncated) = match kind {
            StreamKind::Stdout => (job.stdout_bytes, job.stdout_truncated),
            StreamKind::Stderr => (job.stderr_bytes, job.stderr_truncated),
        };
        let room = self.log_cap.saturating_sub(held);
        let keep = room.min(data.len() as u64);
        if truncated || keep == 0 || job.held.try_grow(keep).is_err() {
            set_truncated(job, kind);
            return;
        }
        if keep < data.len() as u64 {
            data.truncate(usize::try_from(keep).unwrap_or(usize::MAX));
            set_truncated(job, kind);
        }
        match kind {
            StreamKind::Stdout => job.stdout_bytes += keep,
            StreamKind::Stderr => job.stderr_bytes += keep,
        }
        job.push_event(JobEvent::Output(kind, data));
    }

    /// Records the end of a running job. Returns the client and the job's age for quotas and
    /// metrics, or `None` if the job was deleted meanwhile.
    pub fn finish(&self, id: JobId, finish: Finish) -> Option<(ClientKey, Duration)> {
        let mut inner = self.lock();
        inner.running = inner.running.saturating_sub(1);
        let job = inner.jobs.get_mut(&id)?;
        apply_finish(job, finish);
        Some((job.client, job.submitted_at.elapsed()))
    }

    /// Cancels a queued or running job, or deletes a finished one.
    pub fn cancel_or_delete(&self, id: JobId, failed_ttl: Duration) -> DeleteOutcome {
        let mut inner = self.lock();
        let Some(job) = inner.jobs.get(&id) else {
            return DeleteOutcome::NotFound;
        };
        let client = job.client;
        match job.status {
            JobStatus::Queued => {
                inner.queue.remove(&client, &id);
                if let Some(job) = inner.jobs.get_mut(&id) {
                    fail_cancelled_in_queue(job, failed_ttl);
                }
                DeleteOutcome::CancelledQueued(client)
            }
            JobStatus::Running => {
                job.cancel.notify_one();
                DeleteOutcome::CancellingRunning
            }
            JobStatus::Completed | JobStatus::Failed => {
                inner.jobs.remove(&id);
                DeleteOutcome::Deleted
            }
        }
    }

    /// Removes a job and returns it (tarball download).
    pub fn remove(&self, id: JobId) -> Option<Job> {
        self.lock().jobs.remove(&id)
    }

    /// Runs `f` on a live (not expired) job.
    pub fn with_job<T>(&self, id: JobId, f: impl FnOnce(&Job, Option<usize>) -> T) -> Option<T> {
        let inner = self.lock();
        let job = inner.jobs.get(&id)?;
        if job.expires_at.is_some_and(|t| t <= Instant::now()) {
            return None;
        }
        let position = inner.queue.position(&id);
        Some(f(job, position))
    }

    /// A change notification receiver for a job (WebSocket).
    pub fn subscribe(&self, id: JobId) -> Option<watch::Receiver<u64>> {
        self.with_job(id, |job, _| job.changed.subscribe())
    }

    /// Events from `cursor` on, and the job's charge: the events share the job's bytes, so
    /// whoever holds them holds the charge too (the job may be deleted meanwhile). `None` once
    /// the job is gone.
    pub fn events_since(
        &self,
        id: JobId,
        cursor: usize,
    ) -> Option<(Vec<JobEvent>, SharedReservation)> {
        let inner = self.lock();
        let job = inner.jobs.get(&id)?;
        let events = job
            .events
            .get(cursor..)
            .map(<[JobEvent]>::to_vec)
            .unwrap_or_default();
        Some((events, job.held()))
    }

    /// Deletes expired jobs; returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut inner = self.lock();
        let before = inner.jobs.len();
        inner.jobs.retain(|_, job| match job.expires_at {
            Some(t) => t > now,
            None => true,
        });
        before - inner.jobs.len()
    }

    pub fn counts(&self) -> TableCounts {
        let inner = self.lock();
        let queued = inner.queue.len();
        let running = inner.running;
        let finished = inner
            .jobs
            .values()
            .filter(|j| j.status.is_finished())
            .count();
        TableCounts {
            queued,
            running,
            finished,
            queue_capacity: inner.queue.capacity(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every mutation keeps the table consistent before any call that could panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn set_truncated(job: &mut Job, kind: StreamKind) {
    match kind {
        StreamKind::Stdout => job.stdout_truncated = true,
        StreamKind::Stderr => job.stderr_truncated = true,
    }
}

fn apply_finish(job: &mut Job, finish: Finish) {
    job.status = finish.summary.status;
    job.reason = finish.summary.reason;
    job.message = finish.message.clone();
    if let Some(exit) = &finish.exit {
        job.stdout_truncated |= exit.stdout_truncated;
        job.stderr_truncated |= exit.stderr_truncated;
    }
    job.exit = finish.exit;
    job.requirements = finish.requirements;
    job.outputs = finish.outputs;
    job.skipped = finish.skipped;
    if let Some(reservation) = finish.output_reservation {
        job.held.absorb(reservation);
    }
    job.signature = finish.signature;
    job.completed_at_unix = Some(finish.completed_at_unix);
    job.finished_at = Some(Instant::now());
    job.expires_at = Some(Instant::now() + finish.ttl);
    job.pending = None;
    if let Some(message) = finish.message {
        job.push_event(JobEvent::Error(message));
    }
    job.push_event(JobEvent::Exit(finish.summary));
}

fn fail_cancelled_in_queue(job: &mut Job, ttl: Duration) {
    job.status = JobStatus::Failed;
    job.reason = Some(ExitReason::Cancelled);
    job.message = Some("cancelled before it started".to_owned());
    job.pending = None;
    job.finished_at = Some(Instant::now());
    job.expires_at = Some(Instant::now() + ttl);
    let summary = ExitSummary {
        status: JobStatus::Failed,
        reason: Some(ExitReason::Cancelled),
        exit_code: None,
        signal: None,
    };
    job.push_event(JobEvent::Exit(summary));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            argv: vec!["python3".into(), "main.py".into()],
            env: Vec::new(),
            workdir: String::new(),
            bundle: Vec::new(),
            limits: sandrun_ipc::Limits::default(),
            outputs: Vec::new(),
            template: None,
            network: sandrun_ipc::NetworkPolicy::None,
            label: String::new(),
            stdin_bytes: 0,
            requirements: Vec::new(),
            build: false,
        }
    }

    fn new_job(table: &JobTable, client: ClientKey) -> Job {
        let pending = PendingJob {
            spec: spec(),
            files: Vec::new(),
            stdin: bytes::Bytes::new(),
            reservation: table.budget().empty(client),
        };
        let info = JobInfo {
            interpreter: "python3".into(),
            environment: None,
            job_hash: [0; 32],
        };
        Job::new(
            JobId::random(),
            client,
            info,
            pending,
            table.budget().empty(client),
        )
    }

    fn client(n: u8) -> ClientKey {
        ClientKey::V4([10, 0, 0, n])
    }

    #[test]
    fn given_random_ids_then_they_are_32_hex_digits_and_parse_back() {
        let id = JobId::random();
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(JobId::parse(&text), Some(id));
        assert_ne!(JobId::random(), id);
        assert_eq!(JobId::parse(&text.to_uppercase()), None);
        assert_eq!(JobId::parse("../../etc/passwd"), None);
    }

    #[test]
    fn given_log_cap_when_output_exceeds_it_then_it_is_truncated_and_flagged() {
        let table = JobTable::new(4, 4, MemoryBudget::new(1 << 20, 1 << 20), 5);
        let job = new_job(&table, client(1));
        let id = job.id;
        table.enqueue(job).unwrap();
        table.take_next(1).unwrap();
        table.push_output(id, StreamKind::Stdout, Bytes::from_static(b"hello world"));
        table.push_output(id, StreamKind::Stdout, Bytes::from_static(b"more"));
        let (text, truncated) = table
            .with_job(id, |j, _| {
                (j.log_text(StreamKind::Stdout), j.stdout_truncated)
            })
            .unwrap();
        assert_eq!((text.as_str(), truncated), ("hello", true));
        assert_eq!(table.budget().used(), 5);
    }

    #[test]
    fn given_running_cap_then_take_next_waits_for_a_finish() {
        let table = JobTable::new(4, 4, MemoryBudget::new(1 << 20, 1 << 20), 5);
        for n in 1..=2 {
            table.enqueue(new_job(&table, client(n))).unwrap();
        }
        let first = table.take_next(1).unwrap();
        assert!(table.take_next(1).is_none());
        let summary = ExitSummary {
            status: JobStatus::Completed,
            reason: None,
            exit_code: Some(0),
            signal: None,
        };
        let finish = Finish {
            summary,
            message: None,
            exit: None,
            requirements: None,
            outputs: Vec::new(),
            skipped: Vec::new(),
            output_reservation: None,
            signature: None,
            completed_at_unix: 0,
            ttl: Duration::ZERO,
        };
        table.finish(first.id, finish).unwrap();
        assert!(table.take_next(1).is_some());
        // TTL zero: the finished job is already expired and swept.
        assert_eq!(table.with_job(first.id, |_, _| ()), None);
        assert_eq!(table.sweep(Instant::now()), 1);
    }

    #[test]
    fn given_queued_job_when_deleted_then_it_fails_cancelled_and_a_second_delete_removes_it() {
        let table = JobTable::new(4, 4, MemoryBudget::new(1 << 20, 1 << 20), 5);
        let job = new_job(&table, client(1));
        let id = job.id;
        table.enqueue(job).unwrap();
        let ttl = Duration::from_secs(60);
        assert_eq!(
            table.cancel_or_delete(id, ttl),
            DeleteOutcome::CancelledQueued(client(1))
        );
        let (status, reason) = table.with_job(id, |j, _| (j.status, j.reason)).unwrap();
        assert_eq!(
            (status, reason),
            (JobStatus::Failed, Some(ExitReason::Cancelled))
        );
        assert!(table.take_next(4).is_none());
        assert_eq!(table.cancel_or_delete(id, ttl), DeleteOutcome::Deleted);
        assert_eq!(table.cancel_or_delete(id, ttl), DeleteOutcome::NotFound);
    }
}
