//! The messages of the protocol, typed by direction.
//!
//! A client (the gateway or `sandrunctl`) sends [`Request`]s; the helper sends [`Response`]s. The
//! two enums share no variant type, so neither side can send the other's kind of message.

use serde::{Deserialize, Serialize};

use crate::error::IpcError;
use crate::limits::{GrantedLimits, Limits};
use crate::validate::{BundlePath, OutputPattern, PrintablePath};

/// The protocol version. A peer with another version gets [`crate::ErrorCode::VersionMismatch`].
pub const PROTOCOL_VERSION: u32 = 8;

/// Who a connecting client claims to be. The helper checks the claim against `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Submits jobs (the gateway user, `sandrunctl run`, or root).
    Submitter,
    /// Lists, kills, drains (root or the admin group).
    Admin,
}

/// The first message on every connection, in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub role: Role,
}

/// A job id assigned by the helper. Unique for the life of one helper process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub u64);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Network policy of a job. Only `None` exists: the job has a private loopback and nothing else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkPolicy {
    #[default]
    None,
}

/// One entry of the input bundle. File contents follow the [`Request::Submit`] as
/// [`Request::BundleChunk`]s, concatenated in entry order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BundleEntry {
    Dir {
        path: BundlePath,
        mode: u32,
    },
    File {
        path: BundlePath,
        mode: u32,
        size: u64,
    },
}

/// Everything about a job except the bytes of its input files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// `argv[0]` is an interpreter name from the helper's allow-list (`python3`) or an absolute
    /// path as seen inside the sandbox (`/usr/bin/true`).
    pub argv: Vec<String>,
    /// Extra environment variables (`KEY=VALUE` split). Sandbox variables cannot be overridden.
    pub env: Vec<(String, String)>,
    /// Working directory relative to the job's work directory; empty means the work directory.
    pub workdir: String,
    pub bundle: Vec<BundleEntry>,
    pub limits: Limits,
    /// Patterns of files to return after the job exits.
    pub outputs: Vec<OutputPattern>,
    /// Optional read-only environment template, by name.
    pub template: Option<String>,
    pub network: NetworkPolicy,
    /// A label for logs and `ps` (for example the gateway's job id). Never interpreted.
    pub label: String,
    /// Bytes of the job's standard input. They follow the bundle's file contents in the bundle
    /// stream; the job's fd 0 reads exactly them, then end of file. 0 means `/dev/null`.
    /// At most the helper's `max_stdin_bytes`, and counted against `tmpfs_bytes`.
    pub stdin_bytes: u64,
    /// A template build (`sandrunctl env build`): the job may return up to the helper's
    /// `max_build_output_files` files instead of 1000. Accepted only from a root peer that is
    /// not the gateway's uid; the gateway never sets it.
    pub build: bool,
    /// Python requirements to install offline from the helper's wheelhouse before the job's
    /// command runs (one requirement per entry, [`crate::rules::check_requirements`]); empty
    /// means none and no wheelhouse is mounted.
    pub requirements: Vec<String>,
}

/// Most bytes of a job's requirements record the helper relays ([`RequirementsRecord`]). The
/// install step writes at most 60,000 (less than a pipe's 64 KiB, so its write never blocks).
pub const MAX_REQUIREMENTS_RECORD_BYTES: usize = 64 * 1024;

/// What a job's install step wrote on the job's record pipe, relayed by the helper without
/// reading it: the gateway parses it (the helper never interprets bytes a job-uid process
/// wrote). The install step (`sandrund/src/server/install_requirements.py`) writes it before
/// any code of the job runs and closes the pipe before it `execve`s the job's command, so the
/// job cannot add to it; its format is documented there and in `sandrun-gateway/src/requirements.rs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequirementsRecord {
    /// The first bytes the pipe held once the job had ended, at most
    /// [`MAX_REQUIREMENTS_RECORD_BYTES`].
    #[serde(with = "crate::bytes")]
    pub bytes: Vec<u8>,
    /// The pipe held more than [`MAX_REQUIREMENTS_RECORD_BYTES`] (the rest was not read).
    pub overflowed: bool,
}

/// Admin requests (role [`Role::Admin`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    List,
    Kill(JobId),
    Stats,
    Drain,
}

/// Messages from a client to the helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Hello(Hello),
    /// Starts a job. Followed by exactly as many bundle bytes as the spec's files declare plus
    /// its `stdin_bytes`, in [`Request::BundleChunk`]s, then [`Request::BundleEnd`].
    Submit(Box<JobSpec>),
    BundleChunk(#[serde(with = "crate::bytes")] Vec<u8>),
    BundleEnd,
    /// Kills the job of this connection (reason `cancelled`). Closing the connection does too.
    Cancel,
    Admin(AdminRequest),
    /// Lists the templates of the helper's template directory (either role; the gateway answers
    /// `GET /environments` and checks a manifest's `environment` with it). Answered by one
    /// [`Response::Template`] per template, then [`Response::TemplatesEnd`]; the connection then
    /// stays idle for the next request.
    ListTemplates,
}

impl Request {
    /// The variant's name, for logs and error messages (never its contents).
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello(_) => "Hello",
            Request::Submit(_) => "Submit",
            Request::BundleChunk(_) => "BundleChunk",
            Request::BundleEnd => "BundleEnd",
            Request::Cancel => "Cancel",
            Request::Admin(_) => "Admin",
            Request::ListTemplates => "ListTemplates",
        }
    }
}

/// Why a job ended the way it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExitReason {
    None,
    Timeout,
    MemoryLimit,
    CpuLimit,
    OutputLimit,
    PidsLimit,
    Cancelled,
    Internal,
    /// The helper could not take the job (not running, busy or draining) on any of the
    /// gateway's attempts. Set by the gateway; the helper never reports it.
    Unavailable,
    /// The job's environment template does not exist (or has no lock file) when the job was to
    /// start. Set by the gateway from the helper's [`crate::ErrorCode::TemplateMissing`].
    Environment,
    /// The job's requirements could not be installed from the wheelhouse (a distribution it
    /// lacks, a hash that does not match, the job's tmpfs full); the job's command did not run.
    /// Set by the gateway from the job's [`RequirementsRecord`]; the helper never reports it.
    Requirements,
}

impl ExitReason {
    pub const ALL: [ExitReason; 11] = [
        ExitReason::None,
        ExitReason::Timeout,
        ExitReason::MemoryLimit,
        ExitReason::CpuLimit,
        ExitReason::OutputLimit,
        ExitReason::PidsLimit,
        ExitReason::Cancelled,
        ExitReason::Internal,
        ExitReason::Unavailable,
        ExitReason::Environment,
        ExitReason::Requirements,
    ];

    /// The stable snake_case name used in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::None => "none",
            ExitReason::Timeout => "timeout",
            ExitReason::MemoryLimit => "memory_limit",
            ExitReason::CpuLimit => "cpu_limit",
            ExitReason::OutputLimit => "output_limit",
            ExitReason::PidsLimit => "pids_limit",
            ExitReason::Cancelled => "cancelled",
            ExitReason::Internal => "internal",
            ExitReason::Unavailable => "unavailable",
            ExitReason::Environment => "environment",
            ExitReason::Requirements => "requirements",
        }
    }
}

/// How the job's main process ended, with the resources the whole job used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitReport {
    /// Exit code if the main process exited.
    pub exit_code: Option<i32>,
    /// Signal number if the main process was killed by a signal.
    pub signal: Option<i32>,
    pub reason: ExitReason,
    pub cpu_ms: u64,
    pub wall_ms: u64,
    pub memory_peak_bytes: u64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// SHA-256 of the `sandrun-lock.json` of the template the job ran with, read by the helper
    /// from the job's own read-only clone of the template (the tree mounted at `/env`); `None`
    /// for a job without a template.
    pub template_lock: Option<[u8; 32]>,
    /// The install step's record of what the job's requirements installed (or why they
    /// failed), for the gateway to parse; `None` exactly for a job without requirements.
    pub requirements: Option<RequirementsRecord>,
}

/// Why a path matching an output pattern was not returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SkipKind {
    Symlink,
    Fifo,
    Socket,
    Device,
    TooLarge,
    TooMany,
    Unreadable,
    /// The name cannot travel as a [`BundlePath`]: newline or another control character, `*`,
    /// `?`, `\`, invalid UTF-8, or longer than [`crate::MAX_PATH_BYTES`]. Nothing was read.
    InvalidName,
    /// A directory at [`crate::MAX_DEPTH`] components: nothing beneath it was examined.
    TooDeep,
}

impl SkipKind {
    pub const ALL: [SkipKind; 9] = [
        SkipKind::Symlink,
        SkipKind::Fifo,
        SkipKind::Socket,
        SkipKind::Device,
        SkipKind::TooLarge,
        SkipKind::TooMany,
        SkipKind::Unreadable,
        SkipKind::InvalidName,
        SkipKind::TooDeep,
    ];

    /// The stable snake_case name used in JSON and messages (by the gateway and `sandrunctl`).
    pub fn as_str(self) -> &'static str {
        match self {
            SkipKind::Symlink => "symlink",
            SkipKind::Fifo => "fifo",
            SkipKind::Socket => "socket",
            SkipKind::Device => "device",
            SkipKind::TooLarge => "too_large",
            SkipKind::TooMany => "too_many",
            SkipKind::Unreadable => "unreadable",
            SkipKind::InvalidName => "invalid_name",
            SkipKind::TooDeep => "too_deep",
        }
    }
}

/// Header of one returned output file; its content follows as [`Response::OutputChunk`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFileHeader {
    pub path: BundlePath,
    pub size: u64,
    pub sha256: [u8; 32],
}

/// One running sandbox, as `ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxInfo {
    pub job_id: JobId,
    pub label: String,
    pub uid_slot: u32,
    pub pid: i32,
    pub age_ms: u64,
    pub cpu_ms: u64,
    pub memory_bytes: u64,
}

/// A latency summary in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// Helper-wide counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub running: u32,
    pub max_concurrent: u32,
    pub draining: bool,
    pub jobs_started: u64,
    /// Finished jobs by reason, as (reason, count), for every reason.
    pub jobs_by_reason: Vec<(ExitReason, u64)>,
    pub refused_busy: u64,
    pub refused_peer: u64,
    pub protocol_errors: u64,
    pub setup_failures: u64,
    pub spawn_latency: LatencySummary,
    /// Sandboxes created with `clone` plus a `cgroup.procs` write because `clone3` answered
    /// ENOSYS (cgroup v2 only; 0 where `clone3` works or on cgroup v1).
    pub clone3_fallbacks: u64,
}

/// Admin answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminResponse {
    List(Vec<SandboxInfo>),
    Killed(JobId),
    Stats(Stats),
    Draining { running: u32 },
}

/// A template's lock file, as the helper read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateLock {
    pub sha256: [u8; 32],
    /// The file's bytes (at most [`crate::rules::MAX_LOCK_BYTES`]): JSON the helper does not
    /// parse; the gateway reads the interpreter and the packages from it.
    #[serde(with = "crate::bytes")]
    pub bytes: Vec<u8>,
}

/// One template of the helper's template directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInfo {
    /// A valid template name ([`crate::rules::is_template_name`]).
    pub name: String,
    /// `None`: the template has no usable lock file (absent, not a regular file, or larger than
    /// [`crate::rules::MAX_LOCK_BYTES`]); a job naming it is refused.
    pub lock: Option<TemplateLock>,
}

/// Messages from the helper to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Hello(Hello),
    /// The request passed validation; limits are the clamped values that will be enforced.
    Accepted {
        job_id: JobId,
        limits: GrantedLimits,
    },
    /// The sandbox is set up and the job's program is about to run.
    Started {
        spawn_us: u64,
    },
    Stdout(#[serde(with = "crate::bytes")] Vec<u8>),
    Stderr(#[serde(with = "crate::bytes")] Vec<u8>),
    Exited(ExitReport),
    OutputFile(OutputFileHeader),
    OutputChunk(#[serde(with = "crate::bytes")] Vec<u8>),
    /// A matching entry that is not returned. Its name may be one no [`BundlePath`] can hold,
    /// so it travels as a printable rendering ([`PrintablePath::render`]).
    OutputSkipped {
        path: PrintablePath,
        kind: SkipKind,
    },
    /// The last message of a job.
    Done,
    Error(IpcError),
    Admin(AdminResponse),
    /// One template, in answer to [`Request::ListTemplates`].
    Template(TemplateInfo),
    /// The end of the template list; `omitted` templates were left out (past
    /// [`crate::rules::MAX_TEMPLATES`] or [`crate::rules::MAX_TEMPLATE_LIST_BYTES`]).
    TemplatesEnd {
        omitted: u32,
    },
}

impl Response {
    /// The variant's name, for logs and error messages (never its contents).
    pub fn name(&self) -> &'static str {
        match self {
            Response::Hello(_) => "Hello",
            Response::Accepted { .. } => "Accepted",
            Response::Started { .. } => "Started",
            Response::Stdout(_) => "Stdout",
            Response::Stderr(_) => "Stderr",
            Response::Exited(_) => "Exited",
            Response::OutputFile(_) => "OutputFile",
            Response::OutputChunk(_) => "OutputChunk",
            Response::OutputSkipped { .. } => "OutputSkipped",
            Response::Done => "Done",
            Response::Error(_) => "Error",
            Response::Admin(_) => "Admin",
            Response::Template(_) => "Template",
            Response::TemplatesEnd { .. } => "TemplatesEnd",
        }
    }
}
