//! The two processes inside the sandbox: C, the init of the job's pid namespace, which sets
//! everything up and then reaps, and J, the job, which finishes its own setup and `execve`s.
//! Neither ever returns: both leave through `_exit`.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{fchdir, pipe2, sethostname, setsid};
use sandrun_ipc::GrantedLimits;

use super::landlock::{self, LandlockRules, PreparedRuleset};
use super::mounts::{self, DEVICES};
use super::seccomp::SeccompProgram;
use super::{at, fail, SandboxSettings, SetupError, SetupStep};
use super::{bundle, channel, etc, identity, net, order};
use crate::ids::{GroupId, UserId};
use crate::sys::{self, exit_now};

/// Exit code of C or J when it panicked (a bug).
const EXIT_PANIC: i32 = 101;
/// Exit code of C after reporting a failed step.
const EXIT_SETUP_FAILED: i32 = 1;
/// Exit code of J after reporting a failed step (the shell's "cannot execute").
const EXIT_EXEC_FAILED: i32 = 127;
const STACK_BYTES: u64 = 8 << 20;
/// C's name and command line as the job sees them (`/proc/1/comm`, `/proc/1/cmdline`): C is a
/// clone of the helper, and would otherwise show the helper's command line.
const INIT_NAME: &std::ffi::CStr = c"sandrun-init";
const MAX_OPEN_FILES: u64 = 1024;

/// C's ends of the channels, as numbers in the helper's fd table at the time of the clone.
pub(super) struct InitFds<'a> {
    pub(super) ctrl: RawFd,
    pub(super) stdout: RawFd,
    pub(super) stderr: RawFd,
    pub(super) status: RawFd,
    /// The job cgroup's `cgroup.procs` files, opened for writing.
    pub(super) cgroup: &'a [RawFd],
}

/// C's private copies of its ends except the control socket (every other fd is closed).
struct Owned {
    stdout: OwnedFd,
    stderr: OwnedFd,
    status: OwnedFd,
    cgroup: Vec<OwnedFd>,
}

/// C's entry point, right after the clone. Reports the first failed step to the helper.
pub(super) fn run_init(settings: &SandboxSettings, filter: &SeccompProgram, fds: InitFds<'_>) -> ! {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let (ctrl, owned) = match take_fds(&fds) {
            Ok(taken) => taken,
            Err(err) => {
                let _ = channel::send_failure(fds.ctrl, &err);
                return;
            }
        };
        let err = match init(settings, filter, &ctrl, owned) {
            Ok(never) => match never {},
            Err(err) => err,
        };
        let _ = channel::send_failure(ctrl.as_raw_fd(), &err);
    }));
    match outcome {
        Ok(()) => exit_now(EXIT_SETUP_FAILED),
        Err(_) => exit_now(EXIT_PANIC),
    }
}

/// Copies C's ends above 2 and closes everything else inherited from the helper (its other
/// clients, other jobs' pipes and work dirs).
fn take_fds(fds: &InitFds) -> Result<(OwnedFd, Owned), SetupError> {
    let err = |e| fail(SetupStep::CloseFds, e, "init fds");
    let ctrl = sys::relocate(fds.ctrl).map_err(err)?;
    let owned = Owned {
        stdout: sys::relocate(fds.stdout).map_err(err)?,
        stderr: sys::relocate(fds.stderr).map_err(err)?,
        status: sys::relocate(fds.status).map_err(err)?,
        cgroup: (fds.cgroup.iter())
            .map(|&fd| sys::relocate(fd))
            .collect::<Result<_, _>>()
            .map_err(err)?,
    };
    let mut keep = vec![
        ctrl.as_raw_fd(),
        owned.stdout.as_raw_fd(),
        owned.stderr.as_raw_fd(),
        owned.status.as_raw_fd(),
    ];
    keep.extend(owned.cgroup.iter().map(AsRawFd::as_raw_fd));
    sys::close_all_except(&keep).map_err(err)?;
    Ok((ctrl, owned))
}

/// Every step of C, in order (the list in `docs/sandrund.md`). Only returns on failure.
///
/// The first part does not depend on the job, so the helper can run it ahead of time (a warm
/// sandbox); C then waits for the job order and finishes.
fn init(
    settings: &SandboxSettings,
    filter: &SeccompProgram,
    ctrl: &OwnedFd,
    mut fds: Owned,
) -> Result<Infallible, SetupError> {
    umask(Mode::empty());
    sys::reset_signals().map_err(|e| fail(SetupStep::Signals, e, "init"))?;
    sys::set_process_name(INIT_NAME).map_err(|e| fail(SetupStep::InitName, e, "command line"))?;
    join_cgroup(std::mem::take(&mut fds.cgroup))?;
    let prepared = mounts::prepare_root(&settings.mount_point)?;
    sethostname(etc::HOSTNAME).map_err(at(SetupStep::Hostname, etc::HOSTNAME))?;
    net::loopback_up()?;
    let ruleset = prepare_landlock(&prepared.bound_dirs)?;
    channel::send_workdir(ctrl.as_raw_fd(), prepared.work.as_raw_fd())
        .map_err(|e| fail(SetupStep::Protocol, e, "send work dir"))?;
    // Prepared. Nothing of any job has been seen, run or written before this point.
    let (order_fd, trees) = channel::wait_for_go(ctrl)?;
    let mapped = order::map(&order_fd)?;
    drop(order_fd);
    let order::Read {
        order,
        files: data,
        stdin,
    } = order::read(mapped.bytes())?;
    let (uid, gid) = (UserId(order.uid), GroupId(order.gid));
    check_identity(uid, gid)?;
    // The wheelhouse comes with the write end of the requirements record pipe.
    let want = usize::from(order.template.is_some()) + 2 * usize::from(order.wheelhouse);
    if trees.len() != want {
        let detail = "the mounts that came with the order are not the ones it names";
        return Err(fail(SetupStep::Protocol, Errno::EPROTO, detail));
    }
    let mut trees = trees.into_iter();
    let template = order.template.as_ref().and_then(|_| trees.next());
    let wheelhouse = trees.next();
    let has_wheelhouse = wheelhouse.is_some();
    // Above the fd J gives it (RECORD_FD), so J's dup2 onto 0-2 and 3 clobbers nothing it needs.
    let record = match trees.next() {
        Some(fd) => Some(
            sys::relocate_from(fd.as_raw_fd(), RECORD_FD + 1)
                .map_err(|e| fail(SetupStep::ForkJob, e, "requirements record pipe"))?,
        ),
        None => None,
    };
    let has_env = mounts::finish_root(&order.limits, uid, gid, template, wheelhouse)?;
    unshare(CloneFlags::CLONE_NEWCGROUP).map_err(at(SetupStep::UnshareCgroupNs, ""))?;
    give_output_pipes(&fds, &order)?;
    identity::drop_privileges(uid, gid)?;
    apply_landlock(ruleset, has_env, has_wheelhouse)?;
    let work = prepared.work;
    bundle::write_bundle(work.as_raw_fd(), &order.bundle, data)?;
    let stdin = write_stdin(stdin)?;
    drop(mapped);
    let dir = bundle::open_workdir(work.as_raw_fd(), &order.workdir)?;
    fchdir(dir.as_raw_fd()).map_err(at(SetupStep::WorkDir, "fchdir"))?;
    drop((dir, work));
    let one_thread = settings.one_thread;
    let job = start_job(
        one_thread, &order, filter, stdin, record, fds.stdout, fds.stderr,
    )?;
    if channel::send_ready(ctrl.as_raw_fd()).is_err() {
        // The helper is gone: exiting kills J with the whole pid namespace.
        exit_now(EXIT_SETUP_FAILED);
    }
    supervise(job, fds.status)
}

/// Moves C into the job's cgroup (`0` = the writing process). On cgroup v1 each write waits for
/// an RCU grace period; C pays it while it is being prepared, not the job.
fn join_cgroup(fds: Vec<OwnedFd>) -> Result<(), SetupError> {
    for fd in fds {
        sys::write_all(fd.as_raw_fd(), b"0")
            .map_err(|e| fail(SetupStep::JoinCgroup, e, "cgroup.procs"))?;
    }
    Ok(())
}

/// The helper checks the plan before writing the order; C checks again what it would be
/// dangerous to get wrong.
fn check_identity(uid: UserId, gid: GroupId) -> Result<(), SetupError> {
    if uid.0 == 0 {
        return Err(fail(SetupStep::SetUid, Errno::EINVAL, "job uid 0"));
    }
    if gid.0 == 0 {
        return Err(fail(SetupStep::SetGid, Errno::EINVAL, "job gid 0"));
    }
    Ok(())
}

/// Builds the job's Landlock ruleset (as seen after `pivot_root`) while the sandbox is
/// prepared; `/env` is added once the job's template is known.
fn prepare_landlock(bound_dirs: &[&'static str]) -> Result<PreparedRuleset, SetupError> {
    let mut read_exec: Vec<PathBuf> = ["/usr", "/etc", "/proc"].map(PathBuf::from).into();
    read_exec.extend(bound_dirs.iter().map(|d| Path::new("/").join(d)));
    let devices: Vec<PathBuf> = DEVICES.iter().map(|d| Path::new("/dev").join(d)).collect();
    let read_exec: Vec<&Path> = read_exec.iter().map(PathBuf::as_path).collect();
    let devices: Vec<&Path> = devices.iter().map(PathBuf::as_path).collect();
    let read_write = [Path::new("/work"), Path::new("/tmp"), Path::new("/dev/shm")];
    let rules = LandlockRules {
        read_exec: &read_exec,
        read_write: &read_write,
        devices: &devices,
        // `ls /` (the original's jobs could): names only, no new file can be opened.
        list_only: &[Path::new("/")],
    };
    Ok(landlock::prepare(&rules)?)
}

/// Enforces the prepared ruleset, with read and execute on `/env` if the job has a template
/// and on `/wheelhouse` if it has requirements (both are read-only mounts).
fn apply_landlock(
    ruleset: PreparedRuleset,
    has_env: bool,
    has_wheelhouse: bool,
) -> Result<(), SetupError> {
    let mut extra: Vec<&Path> = Vec::new();
    if has_env {
        extra.push(Path::new("/env"));
    }
    if has_wheelhouse {
        extra.push(Path::new(sandrun_ipc::rules::WHEELHOUSE_MOUNT));
    }
    let ruleset = match extra.is_empty() {
        false => ruleset.allow_read_exec(&extra),
        true => Ok(ruleset),
    };
    Ok(ruleset.and_then(PreparedRuleset::restrict)?)
}

/// Makes the job's uid the owner of its stdout and stderr pipes, while C is still root. J's
/// programs reopen them by name (`/dev/stdout` is `/proc/self/fd/1`), which checks the pipe's
/// own owner and mode: as the helper made them (root, 0600) `echo x >/dev/stdout` was refused
/// with EACCES in every job.
fn give_output_pipes(fds: &Owned, order: &order::Order) -> Result<(), SetupError> {
    let (uid, gid) = (
        nix::unistd::Uid::from_raw(order.uid),
        nix::unistd::Gid::from_raw(order.gid),
    );
    for pipe in [&fds.stdout, &fds.stderr] {
        nix::unistd::fchown(pipe.as_raw_fd(), Some(uid), Some(gid))
            .map_err(at(SetupStep::ForkJob, "chown of the output pipes"))?;
    }
    Ok(())
}

/// Where C writes a job's stdin: the tmpfs's `/tmp`, outside `/work`, so it counts against the
/// job's tmpfs size and is never taken for an output. The name is unlinked before J exists.
const STDIN_FILE: &str = "/tmp/.sandrun-stdin";

/// Writes `bytes` (as the job's uid) into a file of the job's tmpfs and opens it read-only for
/// J's fd 0, then unlinks it: J reads exactly those bytes, then end of file, and finds no name
/// for them. No process of the job exists yet, so nothing can race for the name. `None` (no
/// stdin) leaves fd 0 to `/dev/null`.
fn write_stdin(bytes: &[u8]) -> Result<Option<OwnedFd>, SetupError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let step = SetupStep::WriteStdin;
    let create = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_WRONLY;
    let writer = sys::open(
        STDIN_FILE,
        create | OFlag::O_CLOEXEC,
        Mode::S_IRUSR | Mode::S_IWUSR,
    )
    .map_err(at(step, STDIN_FILE))?;
    sys::write_all(writer.as_raw_fd(), bytes).map_err(|e| fail(step, e, STDIN_FILE))?;
    drop(writer);
    let read = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let reader = sys::open(STDIN_FILE, read, Mode::empty()).map_err(at(step, STDIN_FILE))?;
    nix::unistd::unlink(STDIN_FILE).map_err(at(step, STDIN_FILE))?;
    // C closed 0-2, so the fd may sit there; J's dup2 onto 0-2 must not clobber it.
    let high = sys::relocate(reader.as_raw_fd()).map_err(|e| fail(step, e, STDIN_FILE))?;
    Ok(Some(high))
}

/// J's fd for the requirements record pipe (see `server/requirements.rs`).
pub(super) const RECORD_FD: RawFd = 3;

/// What J needs for `execve`, prepared by C so that J allocates nothing after seccomp.
struct Exec<'a> {
    /// J's fd 0: the job's stdin file, or `None` for `/dev/null`.
    stdin: Option<RawFd>,
    /// The write end of the requirements record pipe, J's [`RECORD_FD`] (a job with
    /// requirements only; above `RECORD_FD`).
    record: Option<RawFd>,
    args: sys::ExecArgs<'a>,
    filter: &'a SeccompProgram,
    limits: &'a GrantedLimits,
}

/// Forks J (C is a clone of the single-threaded helper: single-threaded too) and waits until it
/// has `execve`d (the exec-error pipe reaches end of file) or
/// reported its failed step.
fn start_job(
    one_thread: sys::SingleThreaded,
    plan: &order::Order,
    filter: &SeccompProgram,
    stdin: Option<OwnedFd>,
    record: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> Result<libc::pid_t, SetupError> {
    let step = SetupStep::ForkJob;
    let (report_r, low_report_w) = pipe2(OFlag::O_CLOEXEC).map_err(at(step, "exec-error pipe"))?;
    // C closed 0-2, so the pipe may sit there; J's dup2 onto 0-2 and RECORD_FD must not
    // clobber it.
    let report_w = sys::relocate_from(low_report_w.as_raw_fd(), RECORD_FD + 1)
        .map_err(|e| fail(step, e, "exec-error pipe"))?;
    drop(low_report_w);
    let exec = Exec {
        stdin: stdin.as_ref().map(AsRawFd::as_raw_fd),
        record: record.as_ref().map(AsRawFd::as_raw_fd),
        args: sys::ExecArgs::new(&plan.argv, &plan.env)
            .ok_or_else(|| fail(SetupStep::Exec, Errno::EINVAL, "empty argv"))?,
        filter,
        limits: &plan.limits,
    };
    let (out, err, report) = (stdout.as_raw_fd(), stderr.as_raw_fd(), report_w.as_raw_fd());
    // J runs `run_job`, which ends in execve or _exit; its only allocation (in
    // close_all_except) is freed before either, and the rest of its changes (signal
    // dispositions, stdio, limits, session, seccomp) belong to J's own process.
    let pid = sys::spawn_vforked(one_thread, || run_job(&exec, out, err, report))
        .map_err(|e| fail(step, e, "fork"))?;
    // C keeps no copy of the record pipe: a process of the job (same uid) could reach it
    // through /proc/1/fd.
    drop((report_w, stdin, record, stdout, stderr));
    wait_for_exec(&report_r, pid)
}

fn wait_for_exec(report: &OwnedFd, job: libc::pid_t) -> Result<libc::pid_t, SetupError> {
    let mut buf = [0u8; channel::MESSAGE_LEN];
    let read = sys::read_full(report.as_raw_fd(), &mut buf)
        .map_err(|e| fail(SetupStep::Protocol, e, "exec-error pipe"))?;
    if read == 0 {
        return Ok(job);
    }
    let err = match channel::decode(&buf[..read]) {
        Ok(channel::Message::Failed(err)) => err,
        Ok(_) => fail(SetupStep::Protocol, Errno::EPROTO, "exec-error pipe"),
        Err(err) => err,
    };
    Err(err)
}

/// C after J's `execve`: reap every process of the namespace. When J exits, C kills whatever
/// else of the job is left (everything in the pid namespace runs as the job's uid, like C) and
/// reaps it, and only then writes J's wait status: a status on the pipe tells the helper that
/// nothing of the job runs any more, so it can report the end without waiting for C's own exit
/// (which tears down the namespaces). Then C exits.
fn supervise(job: libc::pid_t, status: OwnedFd) -> ! {
    loop {
        match sys::wait_raw(-1) {
            Ok((pid, wstatus)) if pid == job => {
                if kill_the_rest().is_ok() {
                    let _ = sys::write_all(status.as_raw_fd(), &wstatus.to_ne_bytes());
                }
                exit_now(0);
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => exit_now(EXIT_SETUP_FAILED),
        }
    }
}

/// SIGKILLs every other process of the pid namespace and reaps them all (orphans are C's
/// children too). A fork racing with the kill is refused by the kernel (the forking process
/// has a fatal signal pending), and the loop repeats until nothing is left.
pub(super) fn kill_the_rest() -> Result<(), Errno> {
    loop {
        // kill(-1): every process C may signal in its namespace.
        let _ = sys::sigkill_whole_pid_namespace();
        match sys::wait_raw(-1) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// J's entry point: finish the job's own setup and `execve`; report any failure to C.
fn run_job(exec: &Exec<'_>, stdout: RawFd, stderr: RawFd, report: RawFd) -> ! {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        match job_steps(exec, stdout, stderr, report) {
            Ok(never) => match never {},
            Err(failure) => failure,
        }
    }));
    match outcome {
        Ok((step, errno, detail)) => {
            let msg = channel::encode_failure(step, errno, detail);
            let _ = sys::write_all(report, &msg);
            exit_now(EXIT_EXEC_FAILED)
        }
        Err(_) => exit_now(EXIT_PANIC),
    }
}

type JobFailure = (SetupStep, Errno, &'static str);

fn job_steps(
    exec: &Exec<'_>,
    stdout: RawFd,
    stderr: RawFd,
    report: RawFd,
) -> Result<Infallible, JobFailure> {
    sys::reset_signals().map_err(|e| (SetupStep::Signals, e, "job"))?;
    stdio(exec.stdin, stdout, stderr)?;
    rlimits(exec.limits)?;
    setsid().map_err(|e| (SetupStep::Setsid, e, ""))?;
    umask(Mode::from_bits_truncate(0o022));
    // The record pipe, at RECORD_FD without close-on-exec (dup2 clears it; `record` is above
    // RECORD_FD, so never equal): the install step writes its record there and closes it
    // before it executes the job's command. Without requirements RECORD_FD is closed below.
    if let Some(record) = exec.record {
        nix::unistd::dup2(record, RECORD_FD).map_err(|e| (SetupStep::Stdio, e, "dup2"))?;
    }
    let keep = [
        0,
        1,
        2,
        report,
        if exec.record.is_some() { RECORD_FD } else { 0 },
    ];
    sys::close_all_except(&keep).map_err(|e| (SetupStep::CloseFds, e, "job"))?;
    exec.filter
        .install()
        .map_err(|e| (SetupStep::Seccomp, e, ""))?;
    Err((SetupStep::Exec, sys::execve(&exec.args), "execve"))
}

/// stdin is the job's stdin file, or `/dev/null` inside the sandbox; stdout and stderr are the
/// helper's pipes.
fn stdio(stdin: Option<RawFd>, stdout: RawFd, stderr: RawFd) -> Result<(), JobFailure> {
    let step = SetupStep::Stdio;
    let input = match stdin {
        Some(fd) => fd,
        None => nix::fcntl::open("/dev/null", OFlag::O_RDWR, Mode::empty())
            .map_err(|e| (step, e, "/dev/null"))?,
    };
    for (from, to) in [(input, 0), (stdout, 1), (stderr, 2)] {
        nix::unistd::dup2(from, to).map_err(|e| (step, e, "dup2"))?;
    }
    Ok(())
}

fn rlimits(limits: &GrantedLimits) -> Result<(), JobFailure> {
    let cpu_seconds = limits.cpu_ms.div_ceil(1000).saturating_add(1);
    let wanted = [
        (Resource::RLIMIT_NOFILE, MAX_OPEN_FILES),
        (Resource::RLIMIT_FSIZE, limits.tmpfs_bytes),
        (Resource::RLIMIT_CORE, 0),
        (Resource::RLIMIT_STACK, STACK_BYTES),
        (Resource::RLIMIT_CPU, cpu_seconds),
    ];
    for (resource, value) in wanted {
        let err = |e: Errno| (SetupStep::Rlimits, e, "setrlimit");
        let (_, hard) = getrlimit(resource).map_err(err)?;
        // Lowering needs no privilege; never try to raise a hard limit.
        let value = value.min(hard);
        setrlimit(resource, value, value).map_err(err)?;
    }
    Ok(())
}
