//! Small syscall wrappers for the sandbox's processes, and the helpers that turn a failed
//! syscall into a [`SetupError`] naming the step.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

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

/// Like [`fork_raw`], through `clone3` with `CLONE_INTO_CGROUP`: the child is created directly
/// in the cgroup (v2) whose directory is `cgroup`, so it never has to migrate there.
///
/// # Safety
/// As [`fork_raw`].
pub(super) unsafe fn fork_into_cgroup(
    flags: libc::c_int,
    cgroup: std::os::fd::BorrowedFd<'_>,
) -> Result<libc::pid_t, i32> {
    /// `struct clone_args` of `<linux/sched.h>` (version 2, with `cgroup`).
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    let namespaces = u64::try_from(flags).map_err(|_| libc::EINVAL)?;
    let cgroup = u64::try_from(cgroup.as_raw_fd()).map_err(|_| libc::EBADF)?;
    let args = CloneArgs {
        flags: namespaces | CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup,
        ..CloneArgs::default()
    };
    // SAFETY: `args` is a valid `clone_args` of the size passed; with a zero stack the child
    // continues on a copy-on-write copy of the caller's stack, exactly like fork(2). The caller
    // guarantees the thread-safety conditions of `fork_raw`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of!(args),
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if ret < 0 {
        return Err(errno());
    }
    libc::pid_t::try_from(ret).map_err(|_| libc::EOVERFLOW)
}

/// Opens `cgroup.procs` of the cgroup (v2) whose directory is `cgroup`, for writing a pid.
pub(super) fn open_cgroup_procs(cgroup: std::os::fd::BorrowedFd<'_>) -> Result<OwnedFd, i32> {
    let flags = OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    nix::fcntl::openat(
        Some(cgroup.as_raw_fd()),
        "cgroup.procs",
        flags,
        Mode::empty(),
    )
    .map(|fd| {
        // SAFETY: openat just returned this fd to us; nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(fd) }
    })
    .map_err(|e| e as i32)
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
    relocate_from(fd, 3)
}

/// Duplicates `fd` to a new close-on-exec fd numbered `lowest` or more.
pub(super) fn relocate_from(fd: RawFd, lowest: RawFd) -> Result<OwnedFd, i32> {
    // SAFETY: F_DUPFD_CLOEXEC only reads fd and returns a new fd or -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, lowest) };
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

/// Makes `name` the calling process's command name (`PR_SET_NAME`, `/proc/<pid>/comm`) and
/// overwrites its command line in place (`/proc/<pid>/cmdline`), so that what it was started
/// with is not shown. The command line area keeps its size: it gets `name` (cut to fit), a NUL,
/// zeros and a non-NUL last byte, which makes the kernel show it up to that NUL (the
/// `setproctitle` convention) rather than the whole area. Needs no capability
/// (`PR_SET_MM_ARG_START` would need `CAP_SYS_RESOURCE`). Only for a process that shares its
/// memory with no other (C is forked), and that no longer reads its `argv`.
pub(super) fn set_process_name(name: &std::ffi::CStr) -> Result<(), i32> {
    let zero: libc::c_ulong = 0;
    // SAFETY: PR_SET_NAME reads at most 16 bytes of the NUL-terminated string `name`; the
    // other arguments are integers.
    let ret = unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), zero, zero, zero) };
    if ret < 0 {
        return Err(errno());
    }
    let (start, end) = arg_area()?;
    let len = end.checked_sub(start).ok_or(libc::EINVAL)?;
    if len < 2 {
        // An empty command line: nothing to hide.
        return Ok(());
    }
    let name = name.to_bytes();
    let keep = name.len().min(len - 2);
    let area = start as *mut u8;
    // SAFETY: [start, end) is this process's command line area as the kernel reports it: the
    // argument strings on the initial stack, mapped and writable for the process's life. This
    // process's memory is its own (forked, not CLONE_VM), so the helper's is not touched, and
    // nothing here reads `argv` afterwards (what it would read is still NUL-terminated). The
    // writes stay inside the area: `keep <= len - 2` and the last write is at `len - 1`.
    unsafe {
        std::ptr::write_bytes(area, 0, len);
        std::ptr::copy_nonoverlapping(name.as_ptr(), area, keep);
        area.add(len - 1).write(b' ');
    }
    Ok(())
}

/// `arg_start` and `arg_end` of the calling process (fields 48 and 49 of `/proc/self/stat`).
fn arg_area() -> Result<(usize, usize), i32> {
    let stat = std::fs::read_to_string("/proc/self/stat")
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    // The command name (field 2) is in parentheses and may hold anything: count from the last.
    let rest = stat.rsplit_once(')').ok_or(libc::EPROTO)?.1;
    let mut fields = rest.split_ascii_whitespace().skip(48 - 3);
    let mut next = || -> Result<usize, i32> {
        let field = fields.next().ok_or(libc::EPROTO)?;
        field.parse().map_err(|_| libc::EPROTO)
    };
    Ok((next()?, next()?))
}

/// `open_tree(path, OPEN_TREE_CLONE | AT_RECURSIVE | OPEN_TREE_CLOEXEC | AT_SYMLINK_NOFOLLOW)`:
/// a detached copy of the mount tree at `path`, held by the returned fd.
pub(super) fn open_tree_clone(path: &std::path::Path) -> Result<OwnedFd, i32> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| libc::EINVAL)?;
    let flags = OPEN_TREE_CLONE
        | libc::O_CLOEXEC as libc::c_uint
        | libc::AT_RECURSIVE as libc::c_uint
        | libc::AT_SYMLINK_NOFOLLOW as libc::c_uint;
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call; open_tree
    // returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
    if ret < 0 {
        return Err(errno());
    }
    let fd = RawFd::try_from(ret).map_err(|_| libc::EBADF)?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `mount_setattr(tree, "", AT_EMPTY_PATH | AT_RECURSIVE)` setting read-only, nosuid and nodev
/// on every mount of a (detached) tree.
pub(super) fn make_tree_readonly(tree: &OwnedFd) -> Result<(), i32> {
    /// `struct mount_attr` of `<linux/mount.h>`.
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const MOUNT_ATTR_NODEV: u64 = 0x4;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = libc::AT_EMPTY_PATH | libc::AT_RECURSIVE;
    // SAFETY: the path is an empty NUL-terminated string, `attr` is a valid `mount_attr` whose
    // size is passed, and `tree` is an open fd; the kernel only reads them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags,
            std::ptr::addr_of!(attr),
            std::mem::size_of::<MountAttr>(),
        )
    };
    if ret < 0 {
        return Err(errno());
    }
    Ok(())
}

/// `move_mount(tree, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)`: attaches a detached mount
/// tree at `target` in the caller's mount namespace.
pub(super) fn move_mount_here(tree: &OwnedFd, target: &std::path::Path) -> Result<(), i32> {
    use std::os::unix::ffi::OsStrExt;
    let target = std::ffi::CString::new(target.as_os_str().as_bytes()).map_err(|_| libc::EINVAL)?;
    // SAFETY: both strings are valid and NUL-terminated for the duration of the call, and
    // `tree` is an open fd; move_mount only reads them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if ret < 0 {
        return Err(errno());
    }
    Ok(())
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

/// Size of the stack J runs on until its `execve` (its setup needs a few KiB).
const VFORK_STACK_BYTES: usize = 256 << 10;

/// Runs `child` in a new process that shares this process's memory (`CLONE_VM |
/// CLONE_VFORK`), on a stack of its own, like `posix_spawn`: there is no page-table copy and no
/// copy-on-write fault, and the caller is suspended until the child has `execve`d or exited.
/// Returns the child's pid.
///
/// # Safety
/// The caller must be single-threaded. `child` runs in the caller's address space while the
/// caller is suspended: it must end in `execve` or [`exit_now`] (it cannot return), must not
/// leave allocations or locks half-done, and everything it changes in memory is seen by the
/// caller afterwards. Its own file table, signal handlers, limits and seccomp filter are its
/// own (no `CLONE_FILES`, `CLONE_SIGHAND`, `CLONE_THREAD`).
pub(super) unsafe fn vfork_run<F: FnOnce()>(child: F) -> Result<libc::pid_t, i32> {
    extern "C" fn trampoline<F: FnOnce()>(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the `Option<F>` on the suspended parent's stack, alive until the
        // child has exec'd or exited (CLONE_VFORK), and only the child touches it meanwhile.
        let child = unsafe { (*arg.cast::<Option<F>>()).take() };
        if let Some(f) = child {
            f();
        }
        // `child` must not return; if it does (a bug), the child still must not go on.
        exit_now(101)
    }
    // SAFETY: a fresh private anonymous mapping; the kernel picks the address.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            VFORK_STACK_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(errno());
    }
    // The lowest page is a guard: an overflow faults instead of writing into other memory.
    // SAFETY: the first page of the mapping just created.
    if unsafe { libc::mprotect(stack, 4096, libc::PROT_NONE) } != 0 {
        let err = errno();
        // SAFETY: the mapping created above, used by nobody.
        unsafe { libc::munmap(stack, VFORK_STACK_BYTES) };
        return Err(err);
    }
    let mut slot = Some(child);
    // SAFETY: the stack top is the end of the mapping (16-byte aligned: mmap is page aligned);
    // `slot` outlives the child's use of it (see the trampoline); the caller guarantees the
    // conditions documented above.
    let pid = unsafe {
        libc::clone(
            trampoline::<F>,
            stack.cast::<u8>().add(VFORK_STACK_BYTES).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::addr_of_mut!(slot).cast(),
        )
    };
    let clone_errno = errno();
    // The child has exec'd or exited: its stack is free again.
    // SAFETY: the mapping created above, no longer used by anyone.
    unsafe { libc::munmap(stack, VFORK_STACK_BYTES) };
    if pid < 0 {
        return Err(clone_errno);
    }
    Ok(pid)
}
