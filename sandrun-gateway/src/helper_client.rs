//! The gateway's side of the conversation with `sandrund`: one Unix-socket connection per job.
//!
//! Hello → Submit, then the helper's verdict: `Accepted` (a slot is reserved) or an error. Only
//! after `Accepted` does the bundle follow: BundleChunk* → BundleEnd, then Started,
//! Stdout/Stderr*, Exited, (OutputFile OutputChunk*)* and OutputSkipped*, Done.
//!
//! Everything that goes wrong before `Accepted` (no socket, `Busy`, `Draining`, the connection
//! closing) means the helper never took the job: [`HelperError::is_retryable`] says so, and the
//! scheduler puts the job back at the front of its queue. A `Response::Error` after that ends the
//! job. Cancelling drops the connection, which makes the helper kill the sandbox. The connection
//! closing after `Accepted` and before `Done` is a failure with reason `internal`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::requirements::RequirementsReport;
use bytes::Bytes;
use sandrun_ipc::tokio_adapter::AsyncClientChannel;
use sandrun_ipc::{
    BundleEntry, ChannelError, ErrorCode, ExitReport, GrantedLimits, Hello, IpcError, JobSpec,
    Limits, NetworkPolicy, OutputFileHeader, OutputPattern, Request, Response, Role, SkipKind,
    MAX_CHUNK_BYTES, PROTOCOL_VERSION,
};
use sha2::{Digest, Sha256};
use tokio::io::BufReader;
use tokio::net::UnixStream;
use tokio::sync::Notify;

use crate::budget::{MemoryBudget, Reservation};
use crate::bundle::Bundle;
use crate::jobs::{OutputFile, PendingJob, SkippedOutput};
use crate::manifest::Manifest;

/// The helper connection. Reads are buffered: the helper often writes several frames at once
/// (`Accepted` and `Started`, `Exited` and `Done`), which then take one system call, not four.
type Channel = AsyncClientChannel<BufReader<UnixStream>>;

/// A connection to the helper at `socket`, past the handshake.
async fn connect(socket: &Path) -> Result<Channel, HelperError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| HelperError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    let mut channel = AsyncClientChannel::new(BufReader::new(stream));
    handshake(&mut channel).await?;
    Ok(channel)
}

/// Live events of a running job, delivered as they arrive.
#[derive(Debug)]
pub enum HelperEvent {
    Accepted(GrantedLimits),
    Started { spawn_us: u64 },
    Stdout(Bytes),
    Stderr(Bytes),
}

/// Everything the helper returned after the job's exit.
#[derive(Debug)]
pub struct HelperResult {
    /// The helper's report, with the reason the job's requirements came to
    /// ([`crate::requirements::Outcome::reason`]) and its record taken out (parsed into
    /// `requirements`).
    pub exit: ExitReport,
    /// What the job's requirements installed, or why they failed; `None` for a job without.
    pub requirements: Option<RequirementsReport>,
    pub outputs: Vec<OutputFile>,
    pub skipped: Vec<SkippedOutput>,
    /// The memory charged for `outputs`.
    pub reservation: Reservation,
}

/// Why a job's conversation ended without a result.
#[derive(Debug)]
#[non_exhaustive]
pub enum HelperError {
    /// The socket could not be opened. (Host or configuration.)
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Every sandbox slot is busy; the job should wait in the queue again. (Load.)
    Busy(IpcError),
    /// The helper is draining and takes no new jobs; another helper may. (Operations.)
    Draining(IpcError),
    /// The connection broke before the helper accepted the job, at the named step: the job
    /// never started, so it may be sent again. (Helper restarting, or overloaded.)
    NotAccepted { step: &'static str, message: String },
    /// The helper refused or failed the job with a typed error.
    Refused(IpcError),
    /// The connection broke or carried something unexpected, at the named step. (Helper's fault.)
    Protocol { step: &'static str, message: String },
    /// The job was cancelled by the client.
    Cancelled,
}

impl std::fmt::Display for HelperError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HelperError::Connect { path, source } => {
                write!(
                    f,
                    "cannot connect to sandrund at {}: {source}",
                    path.display()
                )
            }
            HelperError::Busy(e) => write!(f, "sandrund is busy: {e}"),
            HelperError::Draining(e) => write!(f, "sandrund is draining: {e}"),
            HelperError::NotAccepted { step, message } => write!(
                f,
                "connection to sandrund failed while {step}, before it took the job: {message}"
            ),
            HelperError::Refused(e) => write!(f, "sandrund refused the job: {e}"),
            HelperError::Protocol { step, message } => {
                write!(f, "connection to sandrund failed while {step}: {message}")
            }
            HelperError::Cancelled => write!(f, "cancelled"),
        }
    }
}

impl std::error::Error for HelperError {}

impl HelperError {
    /// Whether the helper never took the job, so that sending it again later is safe and the
    /// job must not be failed for it.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            HelperError::Connect { .. }
                | HelperError::Busy(_)
                | HelperError::Draining(_)
                | HelperError::NotAccepted { .. }
        )
    }
}

/// Builds the helper's job spec from a validated manifest and bundle, with `stdin_bytes` of
/// stdin. Returns the spec and the file contents in entry order.
pub fn job_spec(
    manifest: &Manifest,
    bundle: &Bundle,
    stdin_bytes: u64,
    label: String,
) -> (JobSpec, Vec<Bytes>) {
    let limits = Limits {
        wall_ms: Some(manifest.timeout_s.saturating_mul(1000)),
        memory_bytes: Some(manifest.memory_mb.saturating_mul(1 << 20)),
        cpu_ms: Some(manifest.cpu_seconds.saturating_mul(1000)),
        ..Limits::default()
    };
    let spec = JobSpec {
        argv: manifest.argv(),
        env: manifest.env.clone(),
        workdir: String::new(),
        bundle: bundle.entries(),
        limits,
        outputs: helper_patterns(&manifest.outputs),
        template: manifest.environment.clone(),
        network: NetworkPolicy::None,
        label,
        stdin_bytes,
        requirements: manifest.requirements.clone(),
        // Public jobs never get the build jobs' output-file limit.
        build: false,
    };
    let files = bundle.files().iter().map(|f| f.data.clone()).collect();
    (spec, files)
}

/// The patterns sent to the helper: the manifest's, or with none, `**` (every file of the work
/// directory). Then what comes back is what the job created or changed: an output identical to
/// an input is the input unchanged and is dropped ([`finish_output`]), byte for byte, so neither
/// timestamps nor sizes decide. The original Sandrun returned a job's files without a pattern.
fn helper_patterns(manifest: &[OutputPattern]) -> Vec<OutputPattern> {
    if !manifest.is_empty() {
        return manifest.to_vec();
    }
    OutputPattern::new("**")
        .map(|p| vec![p])
        .unwrap_or_default()
}

/// Runs one job to its end. `on_event` sees live events in order; `cancel` aborts the job by
/// dropping the connection.
pub async fn run_job(
    socket: &Path,
    pending: &PendingJob,
    budget: &Arc<MemoryBudget>,
    cancel: &Notify,
    on_event: impl FnMut(HelperEvent),
) -> Result<HelperResult, HelperError> {
    tokio::select! {
        result = converse(socket, pending, budget, on_event) => result,
        () = cancel.notified() => Err(HelperError::Cancelled),
    }
}

async fn converse(
    socket: &Path,
    pending: &PendingJob,
    budget: &Arc<MemoryBudget>,
    mut on_event: impl FnMut(HelperEvent),
) -> Result<HelperResult, HelperError> {
    let mut channel = connect(socket).await?;
    let limits = submit(&mut channel, pending).await?;
    on_event(HelperEvent::Accepted(limits));
    send_bundle(&mut channel, pending).await?;
    let template = pending.spec.template.is_some();
    let requirements = !pending.spec.requirements.is_empty();
    let mut exit = receive_run(&mut channel, template, requirements, &mut on_event).await?;
    let requirements = exit.requirements.take().map(|record| {
        let outcome = crate::requirements::parse(&record);
        exit.reason = outcome.reason(exit.reason);
        outcome.report
    });
    let inputs = input_files(pending);
    // Outputs are charged to the job's client, like its bundle.
    let reservation = budget.empty(pending.reservation.client());
    receive_outputs(&mut channel, exit, requirements, reservation, &inputs).await
}

/// The job's input files by path. An output identical to an input is the input coming back
/// unchanged (a pattern such as `*.py` also matches the uploaded code): it is not an output.
fn input_files(pending: &PendingJob) -> HashMap<&str, &Bytes> {
    let paths = pending.spec.bundle.iter().filter_map(|e| match e {
        BundleEntry::File { path, .. } => Some(path.as_str()),
        BundleEntry::Dir { .. } => None,
    });
    paths.zip(pending.files.iter()).collect()
}

/// A template as the helper listed it, with what its lock file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSummary {
    pub name: String,
    /// `None`: no usable lock file; a job naming this template is refused.
    pub lock: Option<LockSummary>,
}

/// What `GET /environments` shows of a lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockSummary {
    /// SHA-256 of the lock file's bytes (recomputed here from the bytes the helper sent).
    pub sha256: [u8; 32],
    /// The parsed lock file (`sandrun-lock/1`, written by `sandrunctl env build`).
    pub json: serde_json::Value,
}

/// The helper's template list ([`Request::ListTemplates`]) on a connection of its own.
pub async fn list_templates(socket: &Path) -> Result<Vec<TemplateSummary>, HelperError> {
    const STEP: &str = "listing templates";
    let mut channel = connect(socket).await?;
    send(&mut channel, Request::ListTemplates, STEP).await?;
    let mut out = Vec::new();
    loop {
        match recv(&mut channel, STEP).await? {
            Response::Template(info) => {
                if !sandrun_ipc::rules::is_template_name(&info.name)
                    || out.len() >= sandrun_ipc::rules::MAX_TEMPLATES
                {
                    return Err(protocol(STEP, "an invalid template entry".to_owned()));
                }
                let lock = match info.lock {
                    None => None,
                    Some(l) => {
                        let sha256: [u8; 32] = Sha256::digest(&l.bytes).into();
                        if sha256 != l.sha256 || l.bytes.len() > sandrun_ipc::rules::MAX_LOCK_BYTES
                        {
                            return Err(protocol(
                                STEP,
                                format!("the lock of {} does not match its hash", info.name),
                            ));
                        }
                        // A lock that is not JSON is listed with its hash, and nothing else.
                        let json =
                            serde_json::from_slice(&l.bytes).unwrap_or(serde_json::Value::Null);
                        Some(LockSummary { sha256, json })
                    }
                };
                out.push(TemplateSummary {
                    name: info.name,
                    lock,
                });
            }
            Response::TemplatesEnd { omitted } => {
                if omitted > 0 {
                    tracing::warn!(omitted, "the helper left templates out of its list");
                }
                return Ok(out);
            }
            Response::Error(e) => return Err(HelperError::Refused(e)),
            other => return Err(unexpected(STEP, &other)),
        }
    }
}

async fn handshake(channel: &mut Channel) -> Result<(), HelperError> {
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        role: Role::Submitter,
    };
    send(channel, Request::Hello(hello), "sending hello")
        .await
        .map_err(not_accepted)?;
    match recv(channel, "waiting for hello")
        .await
        .map_err(not_accepted)?
    {
        Response::Hello(h) if h.protocol_version == PROTOCOL_VERSION => Ok(()),
        Response::Hello(h) => Err(protocol(
            "waiting for hello",
            format!(
                "helper speaks protocol {}, we speak {PROTOCOL_VERSION}",
                h.protocol_version
            ),
        )),
        other => Err(unexpected("waiting for hello", &other)),
    }
}

/// Sends the job's spec and waits for the helper's verdict: the granted limits, or why not.
async fn submit(channel: &mut Channel, pending: &PendingJob) -> Result<GrantedLimits, HelperError> {
    const STEP: &str = "waiting for the helper to accept the job";
    let spec = Box::new(pending.spec.clone());
    send(channel, Request::Submit(spec), "sending the job spec")
        .await
        .map_err(not_accepted)?;
    match recv(channel, STEP).await.map_err(not_accepted)? {
        Response::Accepted { limits, .. } => Ok(limits),
        Response::Error(e) => Err(refusal(e)),
        other => Err(unexpected(STEP, &other)),
    }
}

/// A channel failure before the helper accepted the job: it never started.
fn not_accepted(e: HelperError) -> HelperError {
    match e {
        HelperError::Protocol { step, message } => HelperError::NotAccepted { step, message },
        other => other,
    }
}

/// The error a helper's typed refusal means.
fn refusal(e: IpcError) -> HelperError {
    match e.code {
        ErrorCode::Busy => HelperError::Busy(e),
        ErrorCode::Draining => HelperError::Draining(e),
        _ => HelperError::Refused(e),
    }
}

/// Sends the input files after `Accepted`.
async fn send_bundle(channel: &mut Channel, pending: &PendingJob) -> Result<(), HelperError> {
    for file in &pending.files {
        for chunk in file.chunks(MAX_CHUNK_BYTES) {
            send(
                channel,
                Request::BundleChunk(chunk.to_vec()),
                "sending the bundle",
            )
            .await?;
        }
    }
    // The stdin bytes follow the files' (protocol version 3).
    for chunk in pending.stdin.chunks(MAX_CHUNK_BYTES) {
        send(
            channel,
            Request::BundleChunk(chunk.to_vec()),
            "sending stdin",
        )
        .await?;
    }
    send(channel, Request::BundleEnd, "ending the bundle").await
}

/// Receives everything up to and including `Exited`.
async fn receive_run(
    channel: &mut Channel,
    template: bool,
    requirements: bool,
    on_event: &mut impl FnMut(HelperEvent),
) -> Result<ExitReport, HelperError> {
    const STEP: &str = "waiting for the job to run";
    loop {
        match recv(channel, STEP).await? {
            Response::Started { spawn_us } => on_event(HelperEvent::Started { spawn_us }),
            Response::Stdout(data) => on_event(HelperEvent::Stdout(Bytes::from(data))),
            Response::Stderr(data) => on_event(HelperEvent::Stderr(Bytes::from(data))),
            // The signed result of a job with a template carries its lock hash: a report
            // without one (or with one for a job without a template) is not signed.
            Response::Exited(report) if report.template_lock.is_some() != template => {
                return Err(protocol(
                    STEP,
                    "the exit report's template lock does not match the job's template".to_owned(),
                ))
            }
            // Likewise what a job's requirements installed.
            Response::Exited(report) if report.requirements.is_some() != requirements => {
                return Err(protocol(
                    STEP,
                    "the exit report's requirements do not match the job's".to_owned(),
                ))
            }
            Response::Exited(report) => return Ok(report),
            // A refusal before `Started` (a sandbox that could not be set up) is final: the
            // helper had taken the job.
            Response::Error(e) => return Err(HelperError::Refused(e)),
            other => return Err(unexpected(STEP, &other)),
        }
    }
}

/// An output file being received.
struct Incoming {
    header: OutputFileHeader,
    data: Vec<u8>,
    received: u64,
    /// The memory budget refused it: its bytes are read and dropped.
    dropped: bool,
}

/// Receives the output files up to `Done`.
async fn receive_outputs(
    channel: &mut Channel,
    exit: ExitReport,
    requirements: Option<RequirementsReport>,
    mut reservation: Reservation,
    inputs: &HashMap<&str, &Bytes>,
) -> Result<HelperResult, HelperError> {
    const STEP: &str = "receiving outputs";
    let mut outputs = Vec::new();
    let mut skipped = Vec::new();
    let mut current: Option<Incoming> = None;
    loop {
        let message = recv(channel, STEP).await?;
        if !matches!(message, Response::OutputChunk(_)) {
            if let Some(done) = current.take() {
                finish_output(done, inputs, &mut reservation, &mut outputs, &mut skipped)?;
            }
        }
        match message {
            Response::OutputFile(header) => {
                let dropped = !reservation.grow(header.size);
                let capacity = if dropped {
                    0
                } else {
                    usize::try_from(header.size).unwrap_or(0)
                };
                current = Some(Incoming {
                    header,
                    data: Vec::with_capacity(capacity),
                    received: 0,
                    dropped,
                });
            }
            Response::OutputChunk(chunk) => append_chunk(current.as_mut(), &chunk)?,
            Response::OutputSkipped { path, kind } => {
                skipped.push(SkippedOutput {
                    path: path.to_string(),
                    kind: skip_name(kind),
                });
            }
            Response::Done => {
                return Ok(HelperResult {
                    exit,
                    requirements,
                    outputs,
                    skipped,
                    reservation,
                })
            }
            Response::Error(e) => return Err(HelperError::Refused(e)),
            other => return Err(unexpected(STEP, &other)),
        }
    }
}

fn append_chunk(current: Option<&mut Incoming>, chunk: &[u8]) -> Result<(), HelperError> {
    const STEP: &str = "receiving outputs";
    let incoming =
        current.ok_or_else(|| protocol(STEP, "output chunk without a file header".to_owned()))?;
    incoming.received += chunk.len() as u64;
    if incoming.received > incoming.header.size {
        return Err(protocol(
            STEP,
            format!("{} is longer than announced", incoming.header.path),
        ));
    }
    if !incoming.dropped {
        incoming.data.extend_from_slice(chunk);
    }
    Ok(())
}

fn finish_output(
    incoming: Incoming,
    inputs: &HashMap<&str, &Bytes>,
    reservation: &mut Reservation,
    outputs: &mut Vec<OutputFile>,
    skipped: &mut Vec<SkippedOutput>,
) -> Result<(), HelperError> {
    const STEP: &str = "receiving outputs";
    let path = incoming.header.path.to_string();
    if incoming.received != incoming.header.size {
        return Err(protocol(STEP, format!("{path} is shorter than announced")));
    }
    if incoming.dropped {
        skipped.push(SkippedOutput {
            path,
            kind: "memory_budget".to_owned(),
        });
        return Ok(());
    }
    let digest: [u8; 32] = Sha256::digest(&incoming.data).into();
    if digest != incoming.header.sha256 {
        return Err(protocol(STEP, format!("{path} does not match its sha256")));
    }
    if inputs
        .get(path.as_str())
        .is_some_and(|input| input.as_ref() == incoming.data.as_slice())
    {
        // Not held after all (with no pattern, every unchanged input comes back this way).
        reservation.shrink(incoming.header.size);
        return Ok(());
    }
    outputs.push(OutputFile {
        path,
        sha256: digest,
        data: Bytes::from(incoming.data),
    });
    Ok(())
}

fn skip_name(kind: SkipKind) -> String {
    kind.as_str().to_owned()
}

async fn send(
    channel: &mut Channel,
    request: Request,
    step: &'static str,
) -> Result<(), HelperError> {
    channel
        .send(&request)
        .await
        .map_err(|e| channel_error(step, e))
}

async fn recv(channel: &mut Channel, step: &'static str) -> Result<Response, HelperError> {
    channel.recv().await.map_err(|e| channel_error(step, e))
}

fn channel_error(step: &'static str, e: ChannelError) -> HelperError {
    let message = match e {
        ChannelError::Closed => "sandrund closed the connection".to_owned(),
        other => other.to_string(),
    };
    HelperError::Protocol { step, message }
}

fn protocol(step: &'static str, message: String) -> HelperError {
    HelperError::Protocol { step, message }
}

fn unexpected(step: &'static str, got: &Response) -> HelperError {
    protocol(step, format!("unexpected {} message", got.name()))
}
