//! The output collector's process: root never opens a file a job controlled (ARCHITECTURE.md
//! rule 5). After a job's processes are all gone, the helper forks a collector **K** that
//!
//! 1. joins the job's cgroup (v2: created there with `clone3(CLONE_INTO_CGROUP)`; v1: writes
//!    itself into each `cgroup.procs`), so its CPU and memory are charged to the job and bounded
//!    by the job's limits;
//! 2. resets its signals, names itself `sandrun-collect` and closes every fd but two: the job's
//!    `/work` (an `O_PATH` fd the helper holds) and its end of a socketpair;
//! 3. lowers `RLIMIT_NOFILE`, `RLIMIT_FSIZE` (0: it writes no file) and `RLIMIT_CORE`;
//! 4. drops to the job's uid and gid with no groups, no capabilities in any set,
//!    `NO_NEW_PRIVS`, not dumpable, `SIGKILL` when the helper dies ([`identity`]);
//! 5. enforces Landlock: every filesystem right handled, only `ReadFile | ReadDir` granted, and
//!    only beneath that `/work` fd; signals and abstract sockets scoped;
//! 6. installs its own seccomp filter ([`SeccompProgram::compile_collector`]), tighter than a
//!    job's: only what the walk, hashing and writing to its socket need; anything else kills it;
//! 7. runs the walk (`server::collect`) and writes a bounded, typed frame stream to the socket.
//!
//! K does not enter the job's mount namespace: the `/work` fd already is the job's tmpfs, and
//! reaching it through that fd (with `openat2(RESOLVE_BENEATH)` below it, and Landlock allowing
//! nothing else) needs no `setns` into a namespace that may already be gone with its init.
//! Any step that cannot be applied fails the collection: K reports it on the socket as an
//! `Error` frame and exits; it never collects unconfined.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use sandrun_ipc::{ErrorCode, IpcError, Response};

use super::seccomp::SeccompProgram;
use super::sys::{self, exit_now};
use super::{at, fail, identity, landlock, CgroupJoin, SetupError, SetupStep};
use crate::ids::{GroupId, ProcessId, UserId};

/// K's name (`/proc/<pid>/comm` and its command line), so operators and tests can find it.
pub const COLLECTOR_NAME: &std::ffi::CStr = c"sandrun-collect";
/// Descriptors K may hold: its two, the walk's open directories (at most
/// `sandrun_ipc::MAX_DEPTH` deep, each briefly duplicated to list it) and one file.
const COLLECTOR_MAX_FILES: u64 = 2 * sandrun_ipc::MAX_DEPTH as u64 + 16;
/// Exit code of K after a failed confinement step (reported on the socket first).
const EXIT_CONFINE_FAILED: i32 = 1;
/// Exit code of K when its work panicked (a bug).
const EXIT_PANIC: i32 = 101;

/// Who the collector runs as and where.
pub struct CollectorPlan<'a> {
    /// The job's `/work` (`O_PATH | O_DIRECTORY`), the only tree K can reach.
    pub workdir: BorrowedFd<'a>,
    pub uid: UserId,
    pub gid: GroupId,
    pub cgroup: CgroupJoin<'a>,
    pub filter: &'a SeccompProgram,
}

/// A running collector, as the helper sees it. Dropping it kills and reaps K.
#[derive(Debug)]
pub struct CollectorChild {
    pub pid: ProcessId,
    /// The helper's end of the socketpair (non-blocking): K's frames arrive here; end of file
    /// when K has exited.
    pub stream: UnixStream,
    reaped: bool,
}

impl CollectorChild {
    /// Kills K (it may have exited already) and reaps it. K runs only the walk and does no
    /// uninterruptible work but reading a tmpfs, so this returns promptly.
    pub fn kill_and_reap(&mut self) {
        if self.reaped {
            return;
        }
        self.reaped = true;
        // SAFETY: kill and waitpid take plain integers and a valid out-pointer; K is our own
        // unreaped child, so its pid cannot have been reused.
        unsafe {
            libc::kill(self.pid.0, libc::SIGKILL);
            let mut status = 0;
            while libc::waitpid(self.pid.0, &mut status, 0) < 0 && sys::errno() == Errno::EINTR {}
        }
    }
}

impl Drop for CollectorChild {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// Forks K, confines it (module docs) and runs `work` in it with the `/work` fd and K's end of
/// the socket; `work`'s return value is K's exit code. Returns at once in the helper.
///
/// The caller must be single-threaded (the helper is), as for [`super::prepare`].
pub fn spawn<F>(plan: &CollectorPlan<'_>, work: F) -> Result<CollectorChild, SetupError>
where
    F: FnOnce(OwnedFd, UnixStream) -> i32,
{
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(at(SetupStep::Clone, "collector socketpair"))?;
    let pid = match plan.cgroup {
        // SAFETY: the caller is single-threaded (documented precondition); K only runs
        // `run_collector`, which never returns.
        CgroupJoin::Into(dir) => unsafe { sys::fork_into_cgroup(0, dir) },
        // SAFETY: as above.
        CgroupJoin::Procs(_) | CgroupJoin::None => unsafe { sys::fork_raw(0) },
    }
    .map_err(|e| fail(SetupStep::Clone, e, "collector clone"))?;
    if pid == 0 {
        drop(ours);
        run_collector(plan, theirs, work);
    }
    drop(theirs);
    let child = CollectorChild {
        pid: ProcessId(pid),
        stream: UnixStream::from(ours),
        reaped: false,
    };
    child.stream.set_nonblocking(true).map_err(|e| {
        fail(
            SetupStep::Clone,
            Errno::from_raw(e.raw_os_error().unwrap_or(0)),
            "collector socket",
        )
    })?;
    Ok(child)
}

fn run_collector<F>(plan: &CollectorPlan<'_>, sock: OwnedFd, work: F) -> !
where
    F: FnOnce(OwnedFd, UnixStream) -> i32,
{
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        match confine(plan, sock.as_raw_fd()) {
            Ok(workdir) => work(workdir, UnixStream::from(sock)),
            Err(err) => {
                report(sock.as_raw_fd(), &err);
                EXIT_CONFINE_FAILED
            }
        }
    }));
    match outcome {
        Ok(code) => exit_now(code),
        Err(_) => exit_now(EXIT_PANIC),
    }
}

/// Tells the helper which step failed (best effort: the helper also sees K exit early).
fn report(sock: RawFd, err: &SetupError) {
    let msg = Response::Error(IpcError::new(
        ErrorCode::SandboxSetup,
        format!("output collector: {err}"),
    ));
    if let Ok(frame) = sandrun_ipc::encode(&msg) {
        let _ = sys::write_all(sock, &frame);
    }
}

/// Steps 1 to 6 of the module docs. Returns K's own copy of the `/work` fd.
fn confine(plan: &CollectorPlan<'_>, sock: RawFd) -> Result<OwnedFd, SetupError> {
    if let CgroupJoin::Procs(fds) = plan.cgroup {
        for fd in fds {
            sys::write_all(fd.as_raw_fd(), b"0")
                .map_err(|e| fail(SetupStep::JoinCgroup, e, "collector cgroup.procs"))?;
        }
    }
    sys::reset_signals().map_err(|e| fail(SetupStep::Signals, e, "collector"))?;
    sys::set_process_name(COLLECTOR_NAME).map_err(|e| fail(SetupStep::InitName, e, "collector"))?;
    let workdir = sys::relocate(plan.workdir.as_raw_fd())
        .map_err(|e| fail(SetupStep::CloseFds, e, "collector workdir"))?;
    sys::close_all_except(&[sock, workdir.as_raw_fd()])
        .map_err(|e| fail(SetupStep::CloseFds, e, "collector"))?;
    for (resource, value) in [
        (Resource::RLIMIT_NOFILE, COLLECTOR_MAX_FILES),
        (Resource::RLIMIT_FSIZE, 0),
        (Resource::RLIMIT_CORE, 0),
    ] {
        setrlimit(resource, value, value).map_err(at(SetupStep::Rlimits, "collector"))?;
    }
    identity::drop_privileges(plan.uid, plan.gid)?;
    landlock::restrict_to_read_beneath(workdir.as_fd())?;
    plan.filter
        .install()
        .map_err(|e| fail(SetupStep::Seccomp, Errno::from_raw(e), "collector"))?;
    Ok(workdir)
}
