//! One sandbox per job. [`spawn`] forks a child into fresh namespaces and sets it up step by step
//! (the list in `docs/sandrund.md`); every step that fails becomes a [`SetupError`] naming the
//! step, and the job does not run.
//!
//! Process model, in two phases so that the costly part runs before a job arrives:
//! - [`prepare`]: the helper `clone`s child **C** with new pid, mount, ipc, uts and net
//!   namespaces; C is pid 1 of the job's pid namespace and acts as its init. C moves itself into
//!   the job's cgroup (on cgroup v1 that waits for an RCU grace period), builds the
//!   job-independent part of its tmpfs root (system overlays, `/etc`, masked `/proc`, `/dev`),
//!   `pivot_root`s into it, brings up `lo`, builds its Landlock ruleset, sends the helper its
//!   `/work` fd, and waits. This is a *warm* sandbox; the helper keeps a few ready, each used
//!   for exactly one job;
//! - [`begin`]: the helper writes the job's limits into the sandbox's cgroup, clones the job's
//!   template (if any) as a detached read-only mount, and sends C the job order (a sealed memfd
//!   from [`write_order`]: argv, env, ids, limits, bundle) with it. It does not wait: the
//!   helper's loop polls the returned [`Starting`]'s control socket with everything else and
//!   calls [`Starting::poll`] when it is readable, until C reports `Ready` or a failure (or
//!   [`Starting::timed_out`] past its deadline). C resizes its tmpfs to the job's caps, writes
//!   `/etc/passwd` and `/etc/group`, attaches the template at `/env`, unshares the cgroup
//!   namespace, drops to the slot's uid/gid, drops every capability, sets `NO_NEW_PRIVS`,
//!   enforces Landlock, writes the input bundle into `/work` as the job's uid, then starts the
//!   job process **J** (`CLONE_VM | CLONE_VFORK`);
//! - J sets up stdio, rlimits, `setsid`, closes every other fd, installs the seccomp filter
//!   compiled when sandrund was built (`seccomp.rs`), and `execve`s the program;
//! - C reaps every process of the namespace; when J exits, C kills and reaps the rest, writes
//!   J's wait status to the status pipe and exits.
//!
//! An idle warm C exits when its control socket closes (the helper is gone); from its job on,
//! `PR_SET_PDEATHSIG` kills it with the helper.

// Unsafe code only in the tests' module (raw clones and probes of their own).
#![cfg_attr(not(test), forbid(unsafe_code))]

mod bundle;
mod channel;
mod child;
pub mod collector;
mod etc;
mod identity;
pub mod landlock;
mod mounts;
mod net;
mod order;
pub mod seccomp;
#[cfg(test)]
#[allow(unsafe_code)]
mod tests;

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::pipe2;

use sandrun_ipc::{BundleEntry, GrantedLimits};

use crate::ids::{GroupId, ProcessId, UserId};
use crate::sys;

/// Host-wide settings for every sandbox, from the helper's configuration.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    /// An empty root-owned directory (mode 0700) that each job's private mount namespace mounts
    /// its tmpfs root on. Default `/run/sandrun/root`.
    pub mount_point: PathBuf,
    /// Directory holding read-only environment templates (`<dir>/<name>`), bound at `/env`.
    pub template_dir: PathBuf,
    /// The operator's wheelhouse, bound read-only at `/wheelhouse` for a job with requirements.
    pub wheelhouse_dir: PathBuf,
    /// How long C may take from `Go` to J's `execve` before the helper gives up and kills it.
    pub start_timeout: Duration,
    /// The helper is single-threaded: what cloning C, J and the collector needs.
    pub one_thread: sys::SingleThreaded,
}

/// Everything one job needs. All of it was validated and clamped by the server.
pub struct JobPlan<'a> {
    /// Absolute path of the program inside the sandbox, then its arguments.
    pub argv: Vec<CString>,
    /// Complete environment (`KEY=VALUE`); nothing is inherited from the helper.
    pub env: Vec<CString>,
    /// Working directory relative to `/work` (empty: `/work`).
    pub workdir: String,
    pub uid: UserId,
    pub gid: GroupId,
    pub limits: &'a GrantedLimits,
    /// Bundle entries in order, and the concatenated contents of their files.
    pub bundle: &'a [BundleEntry],
    pub bundle_data: &'a [u8],
    /// The job's standard input: fd 0 reads exactly these bytes, then end of file. Empty means
    /// `/dev/null`.
    pub stdin: &'a [u8],
    /// Name of the template (a directory below `SandboxSettings::template_dir`) to bind
    /// read-only at `/env`, if any.
    pub template: Option<String>,
    /// Whether to bind `SandboxSettings::wheelhouse_dir` read-only at `/wheelhouse` (the job
    /// installs its requirements from it).
    pub wheelhouse: bool,
}

/// A running sandbox, as the helper supervises it.
#[derive(Debug)]
pub struct Spawned {
    /// C, pid 1 of the job's pid namespace, as seen from the helper.
    pub pid: ProcessId,
    /// pidfd of C; readable when C has exited. The helper must reap C (`waitid(P_PIDFD)`).
    pub pidfd: OwnedFd,
    /// Read ends of J's stdout and stderr, non-blocking and close-on-exec.
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Read end of the status pipe (blocking, close-on-exec): C writes J's raw wait status
    /// (4 bytes, native endian) there just before it exits; end of file without 4 bytes means
    /// C died without reporting (it was killed).
    pub status: OwnedFd,
    /// `O_PATH|O_DIRECTORY` fd of `/work` on the job's tmpfs. Holding it keeps the tmpfs alive
    /// after the job's mount namespace is gone, so outputs can be collected; dropping it frees
    /// the tmpfs.
    pub workdir: OwnedFd,
    /// Time from the start of [`start`] (or [`spawn`]) to J's successful `execve`.
    pub spawn_time: Duration,
    /// SHA-256 of the lock file of the job's template, read from the very clone mounted at
    /// `/env`; `None` without a template.
    pub template_lock: Option<[u8; 32]>,
    /// For a job with requirements: the read end (non-blocking, close-on-exec) of the pipe on
    /// which its install step writes its one record (see `server/requirements.rs`). Nothing
    /// else of the helper or the sandbox keeps a write end once J has `execve`d.
    pub requirements: Option<OwnedFd>,
}

/// How C gets into its job's cgroup.
#[derive(Debug, Clone, Copy)]
pub enum CgroupJoin<'a> {
    /// cgroup v1: C writes itself into each `cgroup.procs` (opened for writing) before anything
    /// else; on v1 each migration waits for an RCU grace period.
    Procs(&'a [BorrowedFd<'a>]),
    /// cgroup v2: the kernel creates C directly in the cgroup whose directory this is (`clone3`
    /// with `CLONE_INTO_CGROUP`); nothing migrates.
    Into(BorrowedFd<'a>),
    /// No cgroup (tests of the sandbox alone). Not behind `cfg(test)` only because the clone
    /// arms that match it (here and in the collector) are being changed on another branch.
    #[cfg_attr(not(test), allow(dead_code))]
    None,
}

/// A prepared sandbox waiting for its job (see the module docs): C is cloned, and is joining its
/// cgroup and building its root, or has done so. Dropping it kills and reaps C.
#[derive(Debug)]
pub struct Warm {
    guard: InitGuard,
    pidfd: OwnedFd,
    ctrl: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    status: OwnedFd,
}

impl Warm {
    /// Whether C has finished its preparation (or failed): its first message is waiting on the
    /// control socket. Does not block.
    pub fn is_prepared(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let mut fds = [PollFd::new(self.ctrl.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }
}

/// Why [`start`] failed, and in which phase.
#[derive(Debug)]
pub struct StartError {
    pub error: SetupError,
    /// `false` when C failed or died before it got the job (it had not finished its
    /// job-independent preparation, or the job order could not be sent to it): the job had no
    /// part in it, and another sandbox may well succeed.
    pub prepared: bool,
}

/// The sandbox setup steps, in order. Each failure names one.
///
/// `CloseFds` and `Signals` happen twice: first in C (detail `init`), then in J (`job`).
/// `Protocol` is a broken or timed-out conversation between the helper and C.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
#[repr(u8)]
pub enum SetupStep {
    Clone,
    JoinCgroup,
    UnshareCgroupNs,
    MakeRootPrivate,
    MountTmpfsRoot,
    OverlaySystemDirs,
    WriteEtc,
    MountProc,
    MakeDev,
    BindTemplate,
    MakeWorkDirs,
    PivotRoot,
    Hostname,
    LoopbackUp,
    DropGroups,
    SetGid,
    SetUid,
    DropCapabilities,
    NoNewPrivs,
    Landlock,
    WriteBundle,
    ForkJob,
    Stdio,
    Rlimits,
    Setsid,
    CloseFds,
    Seccomp,
    Exec,
    Protocol,
    /// Changing into `/work/<workdir>`.
    WorkDir,
    /// Resetting signal dispositions and the signal mask inherited from the helper.
    Signals,
    /// Masking `/proc`'s host-wide files and making its kernel knobs read-only.
    MaskProc,
    /// Giving C its own name and command line, so the job does not see the helper's.
    InitName,
    /// Writing the job's stdin into its tmpfs and opening it for J's fd 0.
    WriteStdin,
    /// Binding the operator's wheelhouse read-only at `/wheelhouse`.
    BindWheelhouse,
}

impl SetupStep {
    /// Every step, indexed by its `repr(u8)` value (the wire encoding of the control channel).
    const ALL: [SetupStep; 35] = [
        SetupStep::Clone,
        SetupStep::JoinCgroup,
        SetupStep::UnshareCgroupNs,
        SetupStep::MakeRootPrivate,
        SetupStep::MountTmpfsRoot,
        SetupStep::OverlaySystemDirs,
        SetupStep::WriteEtc,
        SetupStep::MountProc,
        SetupStep::MakeDev,
        SetupStep::BindTemplate,
        SetupStep::MakeWorkDirs,
        SetupStep::PivotRoot,
        SetupStep::Hostname,
        SetupStep::LoopbackUp,
        SetupStep::DropGroups,
        SetupStep::SetGid,
        SetupStep::SetUid,
        SetupStep::DropCapabilities,
        SetupStep::NoNewPrivs,
        SetupStep::Landlock,
        SetupStep::WriteBundle,
        SetupStep::ForkJob,
        SetupStep::Stdio,
        SetupStep::Rlimits,
        SetupStep::Setsid,
        SetupStep::CloseFds,
        SetupStep::Seccomp,
        SetupStep::Exec,
        SetupStep::Protocol,
        SetupStep::WorkDir,
        SetupStep::Signals,
        SetupStep::MaskProc,
        SetupStep::InitName,
        SetupStep::WriteStdin,
        SetupStep::BindWheelhouse,
    ];

    fn index(self) -> u8 {
        self as u8
    }

    fn from_index(index: u8) -> Option<SetupStep> {
        Self::ALL.get(usize::from(index)).copied()
    }
}

/// The failure of one setup step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupError {
    pub step: SetupStep,
    /// errno, when the step failed in a syscall; `Errno::UnknownErrno` (0) otherwise.
    pub errno: Errno,
    /// Extra detail: the path or value concerned. Never job contents.
    pub detail: String,
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sandbox setup step {:?} failed", self.step)?;
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        if self.errno != Errno::UnknownErrno {
            write!(f, ": {}", std::io::Error::from(self.errno))?;
        }
        Ok(())
    }
}

impl std::error::Error for SetupError {}

/// Builds the error of one step.
pub(crate) fn fail(step: SetupStep, errno: Errno, detail: impl Into<String>) -> SetupError {
    SetupError {
        step,
        errno,
        detail: detail.into(),
    }
}

/// Maps a nix error to the error of `step`, with `detail` (a path or a value, never job data).
pub(crate) fn at(step: SetupStep, detail: &str) -> impl FnOnce(Errno) -> SetupError + '_ {
    move |e| fail(step, e, detail)
}

/// The namespaces C is cloned into (the cgroup namespace comes later, after C joined its
/// cgroup).
const NAMESPACES: libc::c_int = libc::CLONE_NEWPID
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWNET;

/// Runs every setup step and starts the job: [`prepare`] then [`start`] at once. Returns once J
/// has `execve`d, or the first failure (after killing and reaping C, so nothing of the job is
/// left). The preconditions are those of [`prepare`]. Tests only: the helper keeps a prepared
/// sandbox warm between the two.
#[cfg(test)]
pub fn spawn(
    settings: &SandboxSettings,
    plan: &JobPlan<'_>,
    filter: &seccomp::SeccompProgram,
    cgroup: CgroupJoin<'_>,
) -> Result<Spawned, SetupError> {
    let warm = prepare(settings, filter, cgroup)?;
    start(settings, warm, plan).map_err(|e| e.error)
}

/// Clones a new C and lets it prepare everything that does not depend on a job (see the module
/// docs) while the helper goes on: returns at once, without waiting for C.
///
/// C is created with a raw `clone` (`sys::clone_child`: the process is single-threaded, as
/// `settings.one_thread` says), and the calling thread must outlive the sandbox: an idle C exits when its control socket closes,
/// and from its job on C gets `SIGKILL` when the thread that created it exits
/// (`PR_SET_PDEATHSIG`), so a dead helper leaves nothing running. The helper must not ignore
/// `SIGCHLD`, so it can reap C (`waitid(P_PIDFD)` or `waitpid`). `cgroup` says how C gets
/// into the job's cgroup.
pub fn prepare(
    settings: &SandboxSettings,
    filter: &seccomp::SeccompProgram,
    cgroup: CgroupJoin<'_>,
) -> Result<Warm, SetupError> {
    let ends = Ends::create()?;
    let mut procs: Vec<RawFd> = match &cgroup {
        CgroupJoin::Procs(fds) => fds.iter().map(AsRawFd::as_raw_fd).collect(),
        CgroupJoin::Into(_) | CgroupJoin::None => Vec::new(),
    };
    // C's whole life: `run_init` never returns.
    let init = |procs: &[RawFd]| -> std::convert::Infallible {
        let fds = child::InitFds {
            ctrl: ends.ctrl_child.as_raw_fd(),
            stdout: ends.stdout_w.as_raw_fd(),
            stderr: ends.stderr_w.as_raw_fd(),
            status: ends.status_w.as_raw_fd(),
            cgroup: procs,
        };
        child::run_init(settings, filter, fds)
    };
    // The job cgroup's `cgroup.procs` when `clone3` is unavailable; open until C has its copy.
    let mut fallback_procs = None;
    let plain = sys::CloneHow::Plain;
    let pid = match cgroup {
        CgroupJoin::Into(dir) => {
            let how = sys::CloneHow::IntoCgroup(dir);
            match sys::clone_child(settings.one_thread, NAMESPACES, how, || init(&procs)) {
                Err(Errno::ENOSYS) => {
                    // clone3 is refused (seccomp of systemd's RestrictNamespaces=, an old
                    // container profile, gVisor): plain clone, and C joins the cgroup through
                    // its cgroup.procs as its first step, before anything of a job (as on v1).
                    let fd = sys::open_cgroup_procs(dir)
                        .map_err(|e| fail(SetupStep::JoinCgroup, e, "cgroup.procs"))?;
                    procs.push(fd.as_raw_fd());
                    fallback_procs = Some(fd);
                    note_clone3_fallback();
                    sys::clone_child(settings.one_thread, NAMESPACES, plain, || init(&procs))
                        .map_err(|e| fail(SetupStep::Clone, e, "clone"))
                }
                other => other.map_err(|e| fail(SetupStep::Clone, e, "clone3")),
            }
        }
        CgroupJoin::Procs(_) | CgroupJoin::None => {
            sys::clone_child(settings.one_thread, NAMESPACES, plain, || init(&procs))
                .map_err(|e| fail(SetupStep::Clone, e, "clone"))
        }
    }?;
    drop(fallback_procs);
    let guard = InitGuard(pid);
    let (ctrl, stdout, stderr, status) = ends.into_parent_ends();
    let pidfd = sys::pidfd_open(pid).map_err(|e| fail(SetupStep::Clone, e, "pidfd_open"))?;
    Ok(Warm {
        guard,
        pidfd,
        ctrl,
        stdout,
        stderr,
        status,
    })
}

/// How many sandboxes were created with `clone` and a `cgroup.procs` write because `clone3`
/// answered ENOSYS (since the helper started).
static CLONE3_FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// The number of `clone3` fallbacks so far (the admin stats report it).
pub fn clone3_fallbacks() -> u64 {
    CLONE3_FALLBACKS.load(Ordering::Relaxed)
}

/// Counts a fallback; the first one is logged (they all have the same cause, the host's
/// seccomp policy, so once is enough to tell the operator).
fn note_clone3_fallback() {
    if CLONE3_FALLBACKS.fetch_add(1, Ordering::Relaxed) == 0 {
        log::warn!(
            "clone3 is not available (ENOSYS: a seccomp filter of the host or service \
             manager?); sandboxes are created with clone and then moved into their cgroup \
             through cgroup.procs (counted as clone3_fallbacks in the stats)"
        );
    }
}

/// A job's order, written once (a sealed memfd, see `order.rs`): it can be handed to another
/// sandbox if the first one failed before it had any part in the job.
#[derive(Debug)]
pub struct JobOrder {
    memfd: OwnedFd,
    /// The template to clone for the sandbox that gets the order, if any.
    template: Option<String>,
    /// Whether the sandbox that gets the order gets the wheelhouse too.
    wheelhouse: bool,
}

/// Checks the plan and writes its order. The plan's data may be dropped afterwards.
pub fn write_order(plan: &JobPlan<'_>) -> Result<JobOrder, SetupError> {
    check_plan(plan)?;
    Ok(JobOrder {
        memfd: order::write(plan)?,
        template: plan.template.clone(),
        wheelhouse: plan.wheelhouse,
    })
}

/// A sandbox that has been sent its job and has not yet reported that J has `execve`d. The
/// helper polls [`Starting::ctrl`] and calls [`Starting::poll`] when it is readable, so it
/// never waits on one sandbox. Dropping it kills and reaps C.
#[derive(Debug)]
pub struct Starting {
    warm: Warm,
    wait: channel::ReadyWait,
    /// `Go` went out (otherwise C was gone before it got the job).
    sent: bool,
    started: Instant,
    deadline: Instant,
    /// sha256 of the job's template lock file, read from the job's own clone.
    template_lock: Option<[u8; 32]>,
    /// Read end of the requirements record pipe, for a job with requirements.
    requirements: Option<OwnedFd>,
}

/// What a readable control socket came to.
#[derive(Debug)]
pub enum StartPoll {
    /// More is to come: poll again.
    Pending(Starting),
    /// J has `execve`d.
    Started(Spawned),
}

/// Gives a prepared sandbox its job: clones the job's template (if any) and sends C the order,
/// without waiting for C (see [`Starting`]). The caller must have written the job's limits
/// into the sandbox's cgroup first.
pub fn begin(
    settings: &SandboxSettings,
    warm: Warm,
    order: &JobOrder,
) -> Result<Starting, StartError> {
    let started = Instant::now();
    let template = match &order.template {
        Some(name) => Some(
            clone_template(&settings.template_dir, name).map_err(|error| StartError {
                error,
                prepared: true,
            })?,
        ),
        None => None,
    };
    let template_lock = match &template {
        // The lock of the tree this job gets: read through the clone's fd, after it was made
        // read-only, so it cannot be another template's or change before the job sees it.
        Some(tree) => Some(
            crate::template::read_lock(tree.as_fd())
                .map_err(|e| {
                    fail(
                        SetupStep::BindTemplate,
                        Errno::from_raw(e.errno()),
                        e.to_string(),
                    )
                })
                .map_err(|error| StartError {
                    error,
                    prepared: true,
                })?
                .sha256,
        ),
        None => None,
    };
    let wheelhouse = match order.wheelhouse {
        true => Some(
            clone_tree(&settings.wheelhouse_dir, SetupStep::BindWheelhouse).map_err(|error| {
                StartError {
                    error,
                    prepared: true,
                }
            })?,
        ),
        false => None,
    };
    // The install step's only way to report (see `server/requirements.rs`): C hands the write
    // end to J alone, and the helper's copy is closed as soon as it is sent.
    let record = match order.wheelhouse {
        true => Some(
            output_pipe(SetupStep::BindWheelhouse, "requirements record pipe").map_err(
                |error| StartError {
                    error,
                    prepared: true,
                },
            )?,
        ),
        false => None,
    };
    let (record_r, record_w) = record.unzip();
    let template_fd = template.as_ref().map(AsRawFd::as_raw_fd);
    let wheelhouse_fds = wheelhouse
        .as_ref()
        .zip(record_w.as_ref())
        .map(|(tree, record)| (tree.as_raw_fd(), record.as_raw_fd()));
    let sent = channel::send_go(
        warm.ctrl.as_raw_fd(),
        order.memfd.as_raw_fd(),
        template_fd,
        wheelhouse_fds,
    );
    drop((template, wheelhouse, record_w));
    // If C already failed or died, its report (or the closed channel) is waiting on the
    // channel, and `poll` returns it. A `Go` that could not even be sent means C was gone
    // before it got the job: the job had no part in that failure.
    Ok(Starting {
        warm,
        wait: channel::ReadyWait::default(),
        sent: sent.is_ok(),
        started,
        deadline: started + settings.start_timeout,
        template_lock,
        requirements: record_r,
    })
}

impl Starting {
    /// The control socket: readable when C has sent something (or closed it).
    pub fn ctrl(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.warm.ctrl.as_fd()
    }

    /// When the start is given up on ([`Starting::timed_out`]).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Reads what C has sent, without blocking. A failure kills and reaps C.
    pub fn poll(mut self) -> Result<StartPoll, StartError> {
        let workdir = match self.wait.poll(&self.warm.ctrl) {
            Ok(Some(workdir)) => workdir,
            Ok(None) => return Ok(StartPoll::Pending(self)),
            Err(f) => {
                return Err(StartError {
                    error: f.error,
                    prepared: f.prepared && self.sent,
                })
            }
        };
        let Warm {
            guard,
            pidfd,
            stdout,
            stderr,
            status,
            ..
        } = self.warm;
        let pid = guard.0;
        guard.release();
        Ok(StartPoll::Started(Spawned {
            pid: ProcessId(pid),
            pidfd,
            stdout,
            stderr,
            status,
            workdir,
            spawn_time: self.started.elapsed(),
            template_lock: self.template_lock,
            requirements: self.requirements,
        }))
    }

    /// Gives up: C did not answer by the deadline. Kills and reaps C.
    pub fn timed_out(self) -> StartError {
        StartError {
            error: fail(
                SetupStep::Protocol,
                Errno::ETIMEDOUT,
                "sandbox setup timed out",
            ),
            prepared: self.wait.prepared() && self.sent,
        }
    }
}

/// [`write_order`], [`begin`], then waits (blocking) until J has `execve`d. Tests only: the
/// helper polls [`Starting`] in its loop.
#[cfg(test)]
pub fn start(
    settings: &SandboxSettings,
    warm: Warm,
    plan: &JobPlan<'_>,
) -> Result<Spawned, StartError> {
    let order = write_order(plan).map_err(|error| StartError {
        error,
        prepared: true,
    })?;
    let mut starting = begin(settings, warm, &order)?;
    loop {
        if let Err(error) = channel::wait_readable(&starting.warm.ctrl, starting.deadline) {
            let prepared = starting.wait.prepared() && starting.sent;
            return Err(StartError { error, prepared });
        }
        match starting.poll()? {
            StartPoll::Pending(s) => starting = s,
            StartPoll::Started(spawned) => return Ok(spawned),
        }
    }
}

/// A detached, read-only, nosuid, nodev copy of the mount tree of template `name` (one plain
/// path component below `template_dir`, a directory, not a symlink), taken in the helper's
/// mount namespace now, for this job only: a template changed or mounted since the sandbox was
/// prepared is the one the job gets, and C never holds more than the job's own template.
fn clone_template(template_dir: &std::path::Path, name: &str) -> Result<OwnedFd, SetupError> {
    let step = SetupStep::BindTemplate;
    let mut parts = std::path::Path::new(name).components();
    let (Some(std::path::Component::Normal(_)), None) = (parts.next(), parts.next()) else {
        return Err(fail(step, Errno::EINVAL, "template name"));
    };
    clone_tree(&template_dir.join(name), step)
}

/// A detached, read-only, nosuid, nodev copy of the mount tree at `path` (a directory; a
/// symlink at its last component is not followed), for one job.
fn clone_tree(path: &std::path::Path, step: SetupStep) -> Result<OwnedFd, SetupError> {
    let name = path.display().to_string();
    let tree = sys::open_tree_clone(path).map_err(|e| fail(step, e, &name))?;
    let stat = nix::sys::stat::fstat(tree.as_raw_fd()).map_err(at(step, &name))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(fail(step, Errno::ENOTDIR, name));
    }
    sys::make_tree_readonly(&tree).map_err(|e| fail(step, e, &name))?;
    Ok(tree)
}

/// Refuses plans no sandbox may run, before anything is created.
fn check_plan(plan: &JobPlan<'_>) -> Result<(), SetupError> {
    if plan.uid.0 == 0 {
        return Err(fail(SetupStep::SetUid, Errno::EINVAL, "job uid 0"));
    }
    if plan.gid.0 == 0 {
        return Err(fail(SetupStep::SetGid, Errno::EINVAL, "job gid 0"));
    }
    match plan.argv.first() {
        Some(program) if program.as_bytes().starts_with(b"/") => Ok(()),
        Some(_) => Err(fail(
            SetupStep::Exec,
            Errno::EINVAL,
            "argv[0] is not absolute",
        )),
        None => Err(fail(SetupStep::Exec, Errno::EINVAL, "empty argv")),
    }
}

/// Both ends of the control socketpair and of the three pipes.
struct Ends {
    ctrl_parent: OwnedFd,
    ctrl_child: OwnedFd,
    stdout_r: OwnedFd,
    stdout_w: OwnedFd,
    stderr_r: OwnedFd,
    stderr_w: OwnedFd,
    status_r: OwnedFd,
    status_w: OwnedFd,
}

impl Ends {
    fn create() -> Result<Ends, SetupError> {
        let step = SetupStep::Clone;
        let (ctrl_parent, ctrl_child) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(at(step, "socketpair"))?;
        let (stdout_r, stdout_w) = output_pipe(SetupStep::Clone, "output pipe")?;
        let (stderr_r, stderr_w) = output_pipe(SetupStep::Clone, "output pipe")?;
        let (status_r, status_w) = pipe2(OFlag::O_CLOEXEC).map_err(at(step, "status pipe"))?;
        Ok(Ends {
            ctrl_parent,
            ctrl_child,
            stdout_r,
            stdout_w,
            stderr_r,
            stderr_w,
            status_r,
            status_w,
        })
    }

    /// Closes C's ends in the helper and returns the helper's: control, stdout, stderr, status.
    fn into_parent_ends(self) -> (OwnedFd, OwnedFd, OwnedFd, OwnedFd) {
        (
            self.ctrl_parent,
            self.stdout_r,
            self.stderr_r,
            self.status_r,
        )
    }
}

/// A pipe whose read end (the helper's) is non-blocking; both ends close-on-exec.
fn output_pipe(step: SetupStep, what: &'static str) -> Result<(OwnedFd, OwnedFd), SetupError> {
    let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(at(step, what))?;
    let flags = OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(r.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(at(step, what))?;
    Ok((r, w))
}

/// Kills and reaps C unless released: a failed spawn leaves no process behind (C is pid 1 of
/// the job's namespace, so its death takes every other process of the job with it).
#[derive(Debug)]
struct InitGuard(libc::pid_t);

impl InitGuard {
    fn release(self) {
        std::mem::forget(self);
    }
}

impl Drop for InitGuard {
    fn drop(&mut self) {
        sys::kill_and_reap(self.0);
    }
}
