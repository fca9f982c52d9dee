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

use bytes::Bytes;
use rand::RngCore;
use sandrun_ipc::{ExitReason, ExitReport, JobSpec};
use serde::Serialize;
use tokio::sync::{watch, Notify};

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
    pub outputs: Vec<OutputFile>,
    pub skipped: Vec<SkippedOutput>,
    pub signature: Option<String>,
    pub completed_at_unix: Option<u64>,
    expires_at: Option<Instant>,
    pending: Option<PendingJob>,
    cancel: Arc<Notify>,
    changed: watch::Sender<u64>,
    /// Logs and outputs; response bodies sending outputs hold it too.
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

    /// The charge for the job's data, for a response that sends some of it.
    pub fn held(&self) -> SharedReservation {
        self.held.clone()
    }

    fn push_event(&mut self, event: JobEvent) {
        self.events.push(event);
        self.changed.send_modify(|v| *v += 1);
    }
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetFull {
    /// Everyone together holds the whole budget (503: the service is loaded).
    Global,
    /// The client already holds its share (429: the client's own doing).
    ClientShare,
    /// This one reservation alone would be larger than a client's whole share (413).
    LargerThanShare,
}

/// A byte budget for job data held in memory: global, and per client (`share` bytes at most to
/// one [`ClientKey`]), so no client can take the memory another client's job needs.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    share: u64,
    ledger: Mutex<Ledger>,
}

/// What is held, in total and by whom. Clients holding nothing have no entry.
#[derive(Debug, Default)]
struct Ledger {
    used: u64,
    by_client: HashMap<ClientKey, u64>,
}

impl MemoryBudget {
    /// A budget of `limit` bytes of which one client may hold `share` bytes.
    pub fn new(limit: u64, share: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit,
            share: share.min(limit),
            ledger: Mutex::new(Ledger::default()),
        })
    }

    pub fn used(&self) -> u64 {
        self.ledger().used
    }

    /// Bytes `client` holds.
    pub fn used_by(&self, client: &ClientKey) -> u64 {
        self.ledger().by_client.get(client).copied().unwrap_or(0)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes one client may hold at most.
    pub fn share(&self) -> u64 {
        self.share
    }

    /// Reserves `bytes` for `client`, or says which limit it would cross.
    pub fn reserve(
        self: &Arc<Self>,
        client: ClientKey,
        bytes: u64,
    ) -> Result<Reservation, BudgetFull> {
        let mut reservation = self.empty(client);
        reservation.try_grow(bytes)?;
        Ok(reservation)
    }

    /// A reservation of nothing yet, charged to `client` as it grows.
    pub fn empty(self: &Arc<Self>, client: ClientKey) -> Reservation {
        Reservation {
            budget: Arc::clone(self),
            client,
            bytes: 0,
        }
    }

    fn take(&self, client: ClientKey, held: u64, bytes: u64) -> Result<(), BudgetFull> {
        if held.saturating_add(bytes) > self.share {
            return Err(BudgetFull::LargerThanShare);
        }
        let mut ledger = self.ledger();
        let mine = ledger.by_client.get(&client).copied().unwrap_or(0);
        if mine.saturating_add(bytes) > self.share {
            return Err(BudgetFull::ClientShare);
        }
        if ledger.used.saturating_add(bytes) > self.limit {
            return Err(BudgetFull::Global);
        }
        if bytes > 0 {
            ledger.used += bytes;
            *ledger.by_client.entry(client).or_insert(0) += bytes;
        }
        Ok(())
    }

    /// Charges `bytes` to `client` within the whole budget only, past the client's share.
    fn take_past_share(&self, client: ClientKey, bytes: u64) -> Result<(), BudgetFull> {
        let mut ledger = self.ledger();
        if ledger.used.saturating_add(bytes) > self.limit {
            return Err(BudgetFull::Global);
        }
        ledger.used += bytes;
        *ledger.by_client.entry(client).or_insert(0) += bytes;
        Ok(())
    }

    fn give_back(&self, client: ClientKey, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut ledger = self.ledger();
        ledger.used = ledger.used.saturating_sub(bytes);
        if let Some(mine) = ledger.by_client.get_mut(&client) {
            *mine = mine.saturating_sub(bytes);
            if *mine == 0 {
                ledger.by_client.remove(&client);
            }
        }
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // Every update leaves the ledger consistent; nothing in it can panic halfway.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Bytes charged to the budget and to one client; released on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    client: ClientKey,
    bytes: u64,
}

impl Reservation {
    /// Charges `bytes` more; `false` (and nothing charged) if the budget or the client's share
    /// is exhausted.
    pub fn grow(&mut self, bytes: u64) -> bool {
        self.try_grow(bytes).is_ok()
    }

    /// Charges `bytes` more, or says which limit that would cross (and charges nothing).
    pub fn try_grow(&mut self, bytes: u64) -> Result<(), BudgetFull> {
        self.budget.take(self.client, self.bytes, bytes)?;
        self.bytes += bytes;
        Ok(())
    }

    /// Charges `bytes` more within the whole budget, even past the client's share (see
    /// [`SharedReservation::try_grow_past_share`]).
    pub fn try_grow_past_share(&mut self, bytes: u64) -> Result<(), BudgetFull> {
        self.budget.take_past_share(self.client, bytes)?;
        self.bytes += bytes;
        Ok(())
    }

    /// Charges `bytes` that are already held, even past the limits (see
    /// [`SharedReservation::charge_held`]).
    pub fn charge_held(&mut self, bytes: u64) {
        let mut ledger = self.budget.ledger();
        ledger.used = ledger.used.saturating_add(bytes);
        *ledger.by_client.entry(self.client).or_insert(0) += bytes;
        drop(ledger);
        self.bytes += bytes;
    }

    /// Releases up to `bytes` of this reservation.
    pub fn shrink(&mut self, bytes: u64) {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        self.budget.give_back(self.client, bytes);
    }

    /// Moves another reservation's bytes into this one.
    pub fn absorb(&mut self, mut other: Reservation) {
        let bytes = std::mem::take(&mut other.bytes);
        if other.client != self.client {
            // Charged to the wrong client: move the charge (the total is unchanged).
            self.budget.give_back(other.client, bytes);
            let mut ledger = self.budget.ledger();
            ledger.used += bytes;
            *ledger.by_client.entry(self.client).or_insert(0) += bytes;
        }
        self.bytes += bytes;
    }

    /// Takes this reservation's bytes out into a new one, leaving this one empty.
    pub fn take(&mut self) -> Reservation {
        Reservation {
            budget: Arc::clone(&self.budget),
            client: self.client,
            bytes: std::mem::take(&mut self.bytes),
        }
    }

    /// An empty reservation for the same client.
    pub fn sibling(&self) -> Reservation {
        self.budget.empty(self.client)
    }

    pub fn client(&self) -> ClientKey {
        self.client
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.client, self.bytes);
    }
}

/// A reservation shared by several holders, released when the last clone is dropped. An
/// upload's body reader (async) and assembler (blocking pool) both charge the bytes they are
/// about to hold to one; a job's data is charged to one that its table entry and every response
/// body sending some of that data hold, so the charge lasts until the last byte is sent.
#[derive(Debug, Clone)]
pub struct SharedReservation(Arc<Mutex<Reservation>>);

impl SharedReservation {
    pub fn new(reservation: Reservation) -> SharedReservation {
        SharedReservation(Arc::new(Mutex::new(reservation)))
    }

    /// A charge against a budget of its own with no limit: for parser tests and fuzzing.
    pub fn unlimited() -> SharedReservation {
        let budget = MemoryBudget::new(u64::MAX, u64::MAX);
        SharedReservation::new(budget.empty(ClientKey::V4([127, 0, 0, 1])))
    }

    /// Charges `bytes` more, or says which limit that would cross.
    pub fn try_grow(&self, bytes: u64) -> Result<(), BudgetFull> {
        self.lock().try_grow(bytes)
    }

    /// Releases up to `bytes`.
    pub fn shrink(&self, bytes: u64) {
        self.lock().shrink(bytes);
    }

    pub fn bytes(&self) -> u64 {
        self.lock().bytes()
    }

    /// Moves everything charged so far into a reservation of its own.
    pub fn take(&self) -> Reservation {
        self.lock().take()
    }

    /// Moves another reservation's bytes into this one.
    pub fn absorb(&self, other: Reservation) {
        self.lock().absorb(other);
    }

    /// Charges `bytes` more within the whole budget, even past the client's share: for a copy
    /// that replaces data already charged to the client and released soon after (a job's
    /// tarball, built from outputs that are freed once it is sent), so a client whose outputs
    /// fill its share can still download them, and the budget still bounds the gateway.
    pub fn try_grow_past_share(&self, bytes: u64) -> Result<(), BudgetFull> {
        self.lock().try_grow_past_share(bytes)
    }

    /// Charges `bytes` that are already held (they exist whether or not there is room), so the
    /// budget counts them and refuses others until they are released.
    pub fn charge_held(&self, bytes: u64) {
        self.lock().charge_held(bytes);
    }

    fn lock(&self) -> MutexGuard<'_, Reservation> {
        // A reservation's fields are updated after the ledger call that can fail: consistent.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
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
    fn given_budget_when_reservations_exceed_it_then_they_are_refused_and_released_on_drop() {
        let budget = MemoryBudget::new(100, 100);
        let a = budget.reserve(client(1), 60).unwrap();
        assert_eq!(
            budget.reserve(client(2), 50).err(),
            Some(BudgetFull::Global)
        );
        drop(a);
        assert_eq!(budget.used(), 0);
        assert!(budget.reserve(client(2), 100).is_ok());
    }

    #[test]
    fn given_one_client_at_its_share_then_it_is_refused_and_another_client_still_reserves() {
        let budget = MemoryBudget::new(100, 25);
        let mut a = budget.reserve(client(1), 20).unwrap();
        let b = budget.reserve(client(1), 5).unwrap();
        assert_eq!(a.try_grow(1), Err(BudgetFull::ClientShare));
        assert_eq!(
            budget.reserve(client(1), 26).err(),
            Some(BudgetFull::LargerThanShare)
        );
        let other = budget.reserve(client(2), 25).unwrap();
        assert_eq!((budget.used_by(&client(1)), budget.used()), (25, 50));
        a.shrink(10);
        assert!(a.grow(10));
        drop((a, b, other));
        assert_eq!(
            (
                budget.used(),
                budget.used_by(&client(1)),
                budget.used_by(&client(2))
            ),
            (0, 0, 0)
        );
    }

    #[test]
    fn given_a_reservation_absorbed_from_another_client_then_the_charge_moves_with_it() {
        let budget = MemoryBudget::new(100, 50);
        let mut a = budget.reserve(client(1), 10).unwrap();
        a.absorb(budget.reserve(client(2), 7).unwrap());
        assert_eq!(
            (budget.used_by(&client(1)), budget.used_by(&client(2))),
            (17, 0)
        );
        let taken = a.take();
        drop(a);
        assert_eq!(budget.used(), 17);
        drop(taken);
        assert_eq!(budget.used(), 0);
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
