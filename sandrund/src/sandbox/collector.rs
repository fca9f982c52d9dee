//! The output collector's process: root never opens a file a job controlled (ARCHITECTURE.md
//! rule 5), and the walk runs in its own executable, `sandrun-outputs` (`collector/`), whose
//! address space holds nothing of the helper's. After a job's processes are all gone, the
//! helper forks a collector **K** that
//!
//! 1. joins the job's cgroup (v2: created there with `clone3(CLONE_INTO_CGROUP)`; v1: writes
//!    itself into each `cgroup.procs`), so its CPU and memory are charged to the job and bounded
//!    by the job's limits;
//! 2. resets its signals and closes every fd but three: the job's `/work` (an `O_PATH` fd the
//!    helper holds) at fd 3, its end of a socketpair at fd 4 (the numbers `sandrun-outputs`
//!    expects) and the collector executable's descriptor (close-on-exec);
//! 3. lowers `RLIMIT_NOFILE`, `RLIMIT_FSIZE` (0: it writes no file) and `RLIMIT_CORE`;
//! 4. drops to the job's uid and gid with no groups, no capabilities in any set,
//!    `NO_NEW_PRIVS`, `SIGKILL` when the helper dies ([`identity`]);
//! 5. `execveat`s `sandrun-outputs` through the descriptor [`open_executable`] opened at
//!    helper start-up (so a later change of the path does not matter), with an empty
//!    environment.
//!
//! Before the fork the helper has written the collect order (patterns and bounds, one
//! [`CollectOrder`] frame) into the socket. The collector confines itself first thing
//! (not dumpable again, refuses uid 0 and capabilities, Landlock read-only beneath `/work`, its
//! own seccomp filter), then reads the order, walks and streams typed frames.
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

/// Writes `order` into a new socketpair, forks K, prepares it (module docs) and execs the
/// collector in it. Returns at once in the helper.
///
/// The caller must be single-threaded (the helper is), as for [`super::prepare`].
pub fn spawn(plan: &CollectorPlan<'_>, order: &CollectOrder) -> Result<CollectorChild, SetupError> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(at(SetupStep::Clone, "collector socketpair"))?;
    let stream = UnixStream::from(ours);
    let io = |e: std::io::Error, what: &str| {
        fail(
            SetupStep::Protocol,
            Errno::from_raw(e.raw_os_error().unwrap_or(0)),
            what,
        )
    };
    stream
        .set_nonblocking(true)
        .map_err(|e| io(e, "collector socket"))?;
    // Queued before K exists (a frame far below the socket's buffer: the helper never blocks).
    let frame = sandrun_ipc::encode(order)
        .ok()
        .filter(|f| f.len() <= MAX_ORDER_BYTES + sandrun_ipc::codec::HEADER_BYTES)
        .ok_or_else(|| fail(SetupStep::Protocol, Errno::E2BIG, "collector order"))?;
    match (&stream).write(&frame) {
        Ok(n) if n == frame.len() => {}
        Ok(_) => return Err(fail(SetupStep::Protocol, Errno::EAGAIN, "collector order")),
        Err(e) => return Err(io(e, "collector order")),
    }
    let how = match plan.cgroup {
        CgroupJoin::Into(dir) => CloneHow::IntoCgroup(dir),
        CgroupJoin::Procs(_) | CgroupJoin::None => CloneHow::Plain,
    };
    // K closes its copy of the helper's end with every other descriptor (`prepare`).
    let pid = sys::clone_child(plan.one_thread, 0, how, move || run_collector(plan, theirs))
        .map_err(|e| fail(SetupStep::Clone, e, "collector clone"))?;
    Ok(CollectorChild {
        pid: ProcessId(pid),
        stream,
        reaped: false,
    })
}

fn run_collector(plan: &CollectorPlan<'_>, sock: OwnedFd) -> ! {
    // Where K's socket is: moved to SOCKET_FD by `prepare`, never guessed.
    let mut at = sock.into_raw_fd();
    let err = match prepare(plan, &mut at) {
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

/// Steps 1 to 4 of the module docs; `sock` follows K's socket to its fixed number. Returns
/// the collector executable's fd, to exec.
fn prepare(plan: &CollectorPlan<'_>, sock: &mut RawFd) -> Result<RawFd, SetupError> {
    if let CgroupJoin::Procs(fds) = plan.cgroup {
        for fd in fds {
            sys::write_all(fd.as_raw_fd(), b"0")
                .map_err(|e| fail(SetupStep::JoinCgroup, e, "collector cgroup.procs"))?;
        }
    }
    sys::reset_signals().map_err(|e| fail(SetupStep::Signals, e, "collector"))?;
    let close = |e| fail(SetupStep::CloseFds, e, "collector");
    // Above the fixed numbers first, so that the dup2s below cannot overwrite each other.
    let work = sys::relocate_from(plan.workdir.as_raw_fd(), 10).map_err(close)?;
    let moved = sys::relocate_from(*sock, 10).map_err(close)?;
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
    sys::close_all_except(&[WORK_FD, SOCKET_FD, exe]).map_err(close)?;
    for (resource, value) in [
        (Resource::RLIMIT_NOFILE, COLLECTOR_MAX_FILES),
        (Resource::RLIMIT_FSIZE, 0),
        (Resource::RLIMIT_CORE, 0),
    ] {
        setrlimit(resource, value, value).map_err(at(SetupStep::Rlimits, "collector"))?;
    }
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
