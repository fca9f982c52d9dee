//! Small syscall wrappers for the sandbox's processes, and the helpers that turn a failed
//! syscall into a [`SetupError`] naming the step.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

use super::{SetupError, SetupStep};

/// Builds the error of one step.
pub(super) fn fail(step: SetupStep, errno: i32, detail: impl Into<String>) -> SetupError {
    SetupError {
        step,
        errno,
        detail: detail.into(),
    }
}

/// Maps a nix error to the error of `step`, with `detail` (a path or a value, never job data).
pub(super) fn at(step: SetupStep, detail: &str) -> impl FnOnce(Errno) -> SetupError + '_ {
    move |e| fail(step, e as i32, detail)
}

/// The calling thread's errno after a failed libc call.
pub(super) fn errno() -> i32 {
    Errno::last_raw()
}

/// Like `fork`, with extra `clone` flags (namespaces), straight through the raw syscall.
/// Returns 0 in the child and the child's pid in the parent.
///
/// # Safety
/// The calling process must be single-threaded, or the child must not touch any lock another
/// thread may have held at the time of the call. The raw syscall skips libc's fork handlers,
/// so in the child libc's cached thread id is stale: the child must not call `raise`, `abort`
/// or pthread functions, and must leave through [`exit_now`].
pub(super) unsafe fn fork_raw(flags: libc::c_int) -> Result<libc::pid_t, i32> {
    // SAFETY: with a zero stack pointer the child continues on a copy-on-write copy of the
    // caller's stack, exactly like fork(2); the parent/tid/tls pointers are unused (0). The
    // caller guarantees the thread-safety conditions documented above.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::c_long::from(flags | libc::SIGCHLD),
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if ret < 0 {
        return Err(errno());
    }
    libc::pid_t::try_from(ret).map_err(|_| libc::EOVERFLOW)
}

/// Leaves the current process at once, without running destructors or atexit handlers.
pub(super) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions; it never returns.
    unsafe { libc::_exit(code) }
}

/// `pidfd_open(pid, 0)`.
pub(super) fn pidfd_open(pid: libc::pid_t) -> Result<OwnedFd, i32> {
    // SAFETY: pidfd_open takes plain integers and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(errno());
    }
    let fd = RawFd::try_from(ret).map_err(|_| libc::EBADF)?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Duplicates `fd` to a new close-on-exec fd numbered 3 or more.
pub(super) fn relocate(fd: RawFd) -> Result<OwnedFd, i32> {
    // SAFETY: F_DUPFD_CLOEXEC only reads fd and returns a new fd or -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(errno());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Closes every fd of the process except those in `keep`, with `close_range` (Linux 5.9+).
/// Fails with `ENOSYS` on older kernels rather than leaving fds open.
pub(super) fn close_all_except(keep: &[RawFd]) -> Result<(), i32> {
    let mut keep: Vec<u32> = keep
        .iter()
        .map(|&fd| u32::try_from(fd).map_err(|_| libc::EBADF))
        .collect::<Result<_, _>>()?;
    keep.sort_unstable();
    keep.dedup();
    let mut first = 0u32;
    for fd in keep {
        if fd > first {
            close_range(first, fd - 1)?;
        }
        first = fd.saturating_add(1);
    }
    close_range(first, u32::MAX)
}

fn close_range(first: u32, last: u32) -> Result<(), i32> {
    // SAFETY: close_range only closes fds of this process; no Rust object in this (forked,
    // never returning) process will use or close the fds in the range again.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if ret < 0 {
        return Err(errno());
    }
    Ok(())
}

/// Writes all of `buf`, retrying on `EINTR` and short writes.
pub(super) fn write_all(fd: RawFd, mut buf: &[u8]) -> Result<(), i32> {
    while !buf.is_empty() {
        // SAFETY: buf is a valid readable slice of buf.len() bytes.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        let n = usize::try_from(n).map_err(|_| libc::EIO)?;
        if n == 0 {
            return Err(libc::EIO);
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// Reads into `buf` until it is full or end of file; returns the number of bytes read.
pub(super) fn read_full(fd: RawFd, buf: &mut [u8]) -> Result<usize, i32> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: rest is a valid writable slice of rest.len() bytes.
        let n = unsafe { libc::read(fd, rest.as_mut_ptr().cast(), rest.len()) };
        if n < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        let n = usize::try_from(n).map_err(|_| libc::EIO)?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Resets every catchable signal to its default action and unblocks all signals, so nothing
/// the helper set up (an ignored `SIGPIPE`, an ignored `SIGCHLD`) leaks into the sandbox.
pub(super) fn reset_signals() -> Result<(), i32> {
    for sig in 1..libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL involves no handler code; EINVAL for signals reserved by
        // libc is expected and ignored.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    // SAFETY: an all-zero sigset_t is a valid (empty) set, and sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t; a null old-set pointer is allowed.
    let ret = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut())
    };
    if ret < 0 {
        return Err(errno());
    }
    Ok(())
}

/// `prctl` with up to two integer arguments.
pub(super) fn prctl(
    option: libc::c_int,
    arg2: libc::c_ulong,
    arg3: libc::c_ulong,
) -> Result<libc::c_int, i32> {
    let zero: libc::c_ulong = 0;
    // SAFETY: the options used with this wrapper take integer arguments only.
    let ret = unsafe { libc::prctl(option, arg2, arg3, zero, zero) };
    if ret < 0 {
        return Err(errno());
    }
    Ok(ret)
}
