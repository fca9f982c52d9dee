//! The output collector's process: root never opens a file a job controlled (ARCHITECTURE.md
//! rule 5), and the walk runs in its own executable, `sandrun-outputs` (`collector/`), whose
//! address space holds nothing of the helper's. For a job that asked for outputs, the helper
//! forks a collector **K** when the job starts ([`prepare`], where `collector_at_start` is set:
//! by default on cgroup v1 hosts whose cgroup joins wait for a grace period) or once every
//! process of the job is gone ([`spawn`]: steps 1 to 6 at once). K
//!
//! 1. resets its signals and keeps only the job's `/work` (an `O_PATH` fd the helper holds) at
//!    fd 3, its end of a socketpair at fd 4 (the numbers `sandrun-outputs` expects), the
//!    collector executable's descriptor (close-on-exec), the read end of its `go` pipe and,
//!    on cgroup v1, the job cgroup's `cgroup.procs` files;
//! 2. lowers `RLIMIT_NOFILE`, `RLIMIT_FSIZE` (0: it writes no file) and `RLIMIT_CORE`;
//! 3. joins the job's cgroup (v2: created there with `clone3(CLONE_INTO_CGROUP)`; v1: writes
//!    itself into each `cgroup.procs`), so what it does for the job is charged to the job and
//!    bounded by its limits. On v1 that write can wait for an RCU grace period (docs/operations.md,
//!    "cgroup v1 hosts"): done now, the wait overlaps the job instead of delaying its outputs.
//!    The job's `pids.max` has one more for K (`server/start.rs`);
//! 4. waits, still root and doing nothing, until the helper writes `go` ([`Waiting::go`]) once
//!    the job's processes are all gone; it exits if the pipe ends instead (the helper dropped it,
//!    or died);
//! 5. drops to the job's uid and gid with no groups, no capabilities in any set,
//!    `NO_NEW_PRIVS`, `SIGKILL` when the helper dies ([`identity`]);
//! 6. `execveat`s `sandrun-outputs` through the descriptor [`open_executable`] opened at
//!    helper start-up (so a later change of the path does not matter), with an empty
//!    environment.
//!
//! Before `go` the helper writes the collect order (patterns and bounds, one [`CollectOrder`]
//! frame) into the socket. The collector confines itself first thing (not dumpable again,
//! refuses uid 0 and capabilities, Landlock read-only beneath `/work`, its own seccomp filter),
//! then reads the order, walks and streams typed frames. A job killed by the helper (time-out,
//! cancel, a limit) loses its waiting K to the cgroup kill, and the memory-cgroup OOM killer may
//! pick a waiting K (a copy of the helper: its resident pages count, though they are charged to
//! the helper) when the job overruns its memory with many small processes; its outputs are then
//! collected by a K forked after its end ([`spawn`]: steps 1 to 6 at once). (Lowering its
//! `oom_score_adj` would need `CAP_SYS_RESOURCE`, which the helper does not hold.)
//!
//! K does not enter the job's mount namespace: the `/work` fd already is the job's tmpfs, and
//! reaching it through that fd (with `openat2(RESOLVE_BENEATH)` below it, and Landlock allowing
//! nothing else) needs no `setns` into a namespace that may already be gone with its init.
//! Any step that cannot be applied fails the collection: K reports it on the socket as an
//! `Error` frame and exits; it never collects unconfined.

#![forbid(unsafe_code)]

use std::ffi::CStr;
use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use sandrun_ipc::{CollectOrder, ErrorCode, IpcError, Response, MAX_ORDER_BYTES};

use nix::errno::Errno;

use super::{at, fail, identity, CgroupJoin, SetupError, SetupStep};
use crate::ids::{GroupId, ProcessId, UserId};
use crate::sys::{self, exit_now, CloneHow};

/// The collector executable's file name (package `sandrun-collect`), looked up next to the
/// helper's own executable. K names itself `sandrun-collect` once it has confined itself.
pub const COLLECTOR_FILE: &str = "sandrun-outputs";
/// K's `argv[0]`.
const COLLECTOR_ARGV0: &CStr = c"sandrun-outputs";
/// Where `sandrun-outputs` expects the job's `/work` and its socket.
const WORK_FD: RawFd = 3;
const SOCKET_FD: RawFd = 4;
/// Descriptors K may hold: its two, the walk's open directories (at most
/// `sandrun_ipc::MAX_DEPTH` deep, each briefly duplicated to list it) and one file.
const COLLECTOR_MAX_FILES: u64 = 2 * sandrun_ipc::MAX_DEPTH as u64 + 16;
/// Exit code of K after a failed step before the `execveat` (reported on the socket first).
const EXIT_CONFINE_FAILED: i32 = 1;

/// Opens the collector executable at helper start-up: `sandrun-outputs` in the directory of
/// the helper's own executable (`/proc/self/exe`). Refuses (the helper does not start) a
/// missing file, a symlink or anything but a regular file, one not owned by root, one
/// writable by group or others, or one others cannot execute (K runs as a job's uid). The
/// descriptor (`O_PATH`, close-on-exec) is what every K executes.
pub fn open_executable() -> Result<OwnedFd, String> {
    let exe = std::fs::read_link("/proc/self/exe")
        .map_err(|e| format!("output collector: cannot read /proc/self/exe: {e}"))?;
    let path = exe.parent().unwrap_or(Path::new("/")).join(COLLECTOR_FILE);
    open_checked(&path)
}

fn open_checked(path: &Path) -> Result<OwnedFd, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("output collector {shown}: cannot open: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("output collector {shown}: cannot stat: {e}"))?;
    let mode = meta.mode();
    let refused = if !meta.file_type().is_file() {
        Some("is not a regular file")
    } else if meta.uid() != 0 {
        Some("is not owned by root")
    } else if mode & 0o022 != 0 {
        Some("is writable by group or others")
    } else if mode & 0o001 == 0 {
        Some("is not executable by others (it runs as a job's uid)")
    } else {
        None
    };
    match refused {
        Some(why) => Err(format!(
            "output collector {shown} {why} (mode {:o}, owner {})",
            mode & 0o7777,
            meta.uid()
        )),
        None => Ok(file.into()),
    }
}

/// Who the collector runs as and where.
pub struct CollectorPlan<'a> {
    /// The job's `/work` (`O_PATH | O_DIRECTORY`), the only tree K can reach.
    pub workdir: BorrowedFd<'a>,
    pub uid: UserId,
    pub gid: GroupId,
    pub cgroup: CgroupJoin<'a>,
    /// The collector executable ([`open_executable`]).
    pub exe: BorrowedFd<'a>,
    /// The helper is single-threaded: K is a raw clone of it.
    pub one_thread: sys::SingleThreaded,
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
        sys::kill_and_reap(self.pid.0);
    }
}

impl Drop for CollectorChild {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// A collector forked ahead of its job's end (module docs, steps 1 to 4): K is in the job's
/// cgroup and waits, still root, for [`Waiting::go`]. Dropping it kills and reaps K.
#[derive(Debug)]
pub struct Waiting {
    child: CollectorChild,
    /// The write end of K's `go` pipe (close-on-exec).
    go: OwnedFd,
}

/// Forks K for the job `plan` describes and lets it prepare (module docs, steps 1 to 4).
/// Returns at once in the helper. The caller must be single-threaded (`plan.one_thread`).
pub fn prepare(plan: &CollectorPlan<'_>) -> Result<Waiting, SetupError> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(at(SetupStep::Clone, "collector socketpair"))?;
    let stream = UnixStream::from(ours);
    stream
        .set_nonblocking(true)
        .map_err(|e| io_error(e, "collector socket"))?;
    let (go_r, go_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(at(SetupStep::Clone, "collector go pipe"))?;
    let how = match plan.cgroup {
        CgroupJoin::Into(dir) => CloneHow::IntoCgroup(dir),
        CgroupJoin::Procs(_) | CgroupJoin::None => CloneHow::Plain,
    };
    // K closes its copies of the helper's ends with every other descriptor (`prepare_in_child`).
    let ends = (theirs, go_r);
    let pid = sys::clone_child(plan.one_thread, 0, how, move || run_collector(plan, ends))
        .map_err(|e| fail(SetupStep::Clone, e, "collector clone"))?;
    Ok(Waiting {
        child: CollectorChild {
            pid: ProcessId(pid),
            stream,
            reaped: false,
        },
        go: go_w,
    })
}

/// Forks K and sends it `order` at once: [`prepare`], then [`Waiting::go`].
pub fn spawn(plan: &CollectorPlan<'_>, order: &CollectOrder) -> Result<CollectorChild, SetupError> {
    prepare(plan)?.go(order)
}

impl Waiting {
    /// Queues `order` on K's socket and tells K to go on (module docs, steps 5 and 6). Fails,
    /// killing and reaping K, when K is gone (its end of the socket or the pipe is closed: the
    /// cgroup kill of a killed job took it) or the order does not fit: the caller then
    /// collects with a fresh K, or reports the failure.
    pub fn go(self, order: &CollectOrder) -> Result<CollectorChild, SetupError> {
        // On an error `child` is dropped here, which kills and reaps K.
        let Waiting { child, go } = self;
        // A frame far below the socket's buffer, on an empty socket: the helper never blocks.
        let frame = sandrun_ipc::encode(order)
            .ok()
            .filter(|f| f.len() <= MAX_ORDER_BYTES + sandrun_ipc::codec::HEADER_BYTES)
            .ok_or_else(|| fail(SetupStep::Protocol, Errno::E2BIG, "collector order"))?;
        match (&child.stream).write(&frame) {
            Ok(n) if n == frame.len() => {}
            Ok(_) => return Err(fail(SetupStep::Protocol, Errno::EAGAIN, "collector order")),
            Err(e) => return Err(io_error(e, "collector order")),
        }
        sys::write_all(go.as_raw_fd(), b"g")
            .map_err(|e| fail(SetupStep::Protocol, e, "collector go"))?;
        Ok(child)
    }
}

fn io_error(e: std::io::Error, what: &str) -> SetupError {
    fail(
        SetupStep::Protocol,
        Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        what,
    )
}

fn run_collector(plan: &CollectorPlan<'_>, (sock, go): (OwnedFd, OwnedFd)) -> ! {
    // Where K's socket is: moved to SOCKET_FD by `prepare_in_child`, never guessed.
    let mut at = sock.into_raw_fd();
    let err = match prepare_in_child(plan, &mut at, go) {
        Ok(exe) => fail(
            SetupStep::Exec,
            sys::execveat_no_env(exe, COLLECTOR_ARGV0),
            "execveat sandrun-outputs",
        ),
        Err(err) => err,
    };
    report(at, &err);
    exit_now(EXIT_CONFINE_FAILED)
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

/// Steps 1 to 5 of the module docs; `sock` follows K's socket to its fixed number. Returns
/// the collector executable's fd, to exec.
fn prepare_in_child(
    plan: &CollectorPlan<'_>,
    sock: &mut RawFd,
    go: OwnedFd,
) -> Result<RawFd, SetupError> {
    sys::reset_signals().map_err(|e| fail(SetupStep::Signals, e, "collector"))?;
    let close = |e| fail(SetupStep::CloseFds, e, "collector");
    // Above the fixed numbers first, so that the dup2s below cannot overwrite each other (or a
    // cgroup.procs descriptor, kept until the join).
    let procs: Vec<OwnedFd> = match plan.cgroup {
        CgroupJoin::Procs(fds) => (fds.iter())
            .map(|fd| sys::relocate_from(fd.as_raw_fd(), 10))
            .collect::<Result<_, _>>()
            .map_err(close)?,
        CgroupJoin::Into(_) | CgroupJoin::None => Vec::new(),
    };
    let work = sys::relocate_from(plan.workdir.as_raw_fd(), 10).map_err(close)?;
    let moved = sys::relocate_from(*sock, 10).map_err(close)?;
    // `into_raw_fd`: the inherited number is closed below with the rest, owned by nothing.
    let go = sys::relocate_from(go.into_raw_fd(), 10).map_err(close)?;
    let exe = sys::relocate_from(plan.exe.as_raw_fd(), 10)
        .map_err(close)?
        .into_raw_fd();
    for (from, to) in [
        (work.into_raw_fd(), WORK_FD),
        (moved.into_raw_fd(), SOCKET_FD),
    ] {
        sys::dup_onto(from, to).map_err(close)?;
    }
    *sock = SOCKET_FD;
    // `exe` stays open (close-on-exec) until the execveat.
    let mut keep = vec![WORK_FD, SOCKET_FD, exe, go.as_raw_fd()];
    keep.extend(procs.iter().map(AsRawFd::as_raw_fd));
    sys::close_all_except(&keep).map_err(close)?;
    for (resource, value) in [
        (Resource::RLIMIT_NOFILE, COLLECTOR_MAX_FILES),
        (Resource::RLIMIT_FSIZE, 0),
        (Resource::RLIMIT_CORE, 0),
    ] {
        setrlimit(resource, value, value).map_err(at(SetupStep::Rlimits, "collector"))?;
    }
    for fd in procs {
        sys::write_all(fd.as_raw_fd(), b"0")
            .map_err(|e| fail(SetupStep::JoinCgroup, e, "collector cgroup.procs"))?;
    }
    let mut byte = [0u8; 1];
    match sys::read_full(go.as_raw_fd(), &mut byte) {
        Ok(1) => {}
        // The helper dropped this collector (or died): nothing to collect.
        _ => exit_now(0),
    }
    drop(go);
    identity::drop_privileges(plan.uid, plan.gid)?;
    Ok(exe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn given_collector_files_then_only_a_root_owned_one_nobody_else_can_write_is_opened() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join(COLLECTOR_FILE);
        std::fs::write(&file, b"\x7fELF").unwrap();
        let chmod = |mode| std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode));
        chmod(0o755).unwrap();
        assert!(open_checked(&file).is_ok(), "root's 0755 file");
        for (mode, why) in [
            (0o775, "writable by group or others"),
            (0o757, "writable by group or others"),
            (0o750, "not executable by others"),
        ] {
            chmod(mode).unwrap();
            let err = open_checked(&file).unwrap_err();
            assert!(err.contains(why), "{mode:o}: {err}");
        }
        chmod(0o755).unwrap();
        std::os::unix::fs::chown(&file, Some(1), None).unwrap();
        assert!(open_checked(&file)
            .unwrap_err()
            .contains("not owned by root"));
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(open_checked(&link)
            .unwrap_err()
            .contains("not a regular file"));
        let missing = open_checked(&d.path().join("missing")).unwrap_err();
        assert!(missing.contains("cannot open"), "{missing}");
    }
}
