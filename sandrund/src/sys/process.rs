//! Processes: `clone` in its three forms, leaving, pidfds, signals, waiting, `execve`, the
//! process's name, and the allocator's thresholds.

use std::convert::Infallible;
use std::ffi::{c_char, CStr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

use super::{check, errno};

/// Like `fork`, with extra `clone` flags (namespaces), straight through the raw syscall.
/// Returns 0 in the child and the child's pid in the parent.
///
/// # Safety
/// The calling process must be single-threaded, or the child must not touch any lock another
/// thread may have held at the time of the call. The raw syscall skips libc's fork handlers,
/// so in the child libc's cached thread id is stale: the child must not call `raise`, `abort`
/// or pthread functions, and must leave through [`exit_now`].
pub(crate) unsafe fn fork_raw(flags: libc::c_int) -> Result<libc::pid_t, Errno> {
    // SAFETY: with a zero stack pointer the child continues on a copy-on-write copy of the
    // caller's stack, exactly like fork(2); the parent/tid/tls pointers are unused (0). The
    // caller guarantees the thread-safety conditions documented above.
    let ret = check(unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::c_long::from(flags | libc::SIGCHLD),
            0usize,
            0usize,
            0usize,
            0usize,
        )
    })?;
    libc::pid_t::try_from(ret).map_err(|_| Errno::EOVERFLOW)
}

/// Like [`fork_raw`], through `clone3` with `CLONE_INTO_CGROUP`: the child is created directly
/// in the cgroup (v2) whose directory is `cgroup`, so it never has to migrate there.
///
/// # Safety
/// As [`fork_raw`].
pub(crate) unsafe fn fork_into_cgroup(
    flags: libc::c_int,
    cgroup: BorrowedFd<'_>,
) -> Result<libc::pid_t, Errno> {
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
    let namespaces = u64::try_from(flags).map_err(|_| Errno::EINVAL)?;
    let cgroup = u64::try_from(cgroup.as_raw_fd()).map_err(|_| Errno::EBADF)?;
    let args = CloneArgs {
        flags: namespaces | CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup,
        ..CloneArgs::default()
    };
    // SAFETY: `args` is a valid `clone_args` of the size passed; with a zero stack the child
    // continues on a copy-on-write copy of the caller's stack, exactly like fork(2). The caller
    // guarantees the thread-safety conditions of `fork_raw`.
    let ret = check(unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of!(args),
            std::mem::size_of::<CloneArgs>(),
        )
    })?;
    libc::pid_t::try_from(ret).map_err(|_| Errno::EOVERFLOW)
}

/// How [`clone_child`] creates the child.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CloneHow<'a> {
    /// The raw `clone` syscall ([`fork_raw`]).
    Plain,
    /// `clone3` with `CLONE_INTO_CGROUP` into the cgroup (v2) whose directory this is
    /// ([`fork_into_cgroup`]); `ENOSYS` where `clone3` is refused.
    IntoCgroup(BorrowedFd<'a>),
}

/// Proof, for the functions that fork, that the process has one thread: a child made with the
/// raw `clone` syscall (which skips libc's fork handlers) then inherits no lock and no
/// half-updated structure of another thread. The helper makes it once at start-up
/// ([`SingleThreaded::check`]) and never starts a thread (no code of the crate or of its
/// dependencies does); a child cloned from it is single-threaded too, so C hands its copy to
/// its own clone of J. Not `Send`: it cannot reach another thread.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SingleThreaded(std::marker::PhantomData<*const ()>);

impl SingleThreaded {
    /// Counts the threads of this process (`/proc/self/task`): `EBUSY` when there is more
    /// than one.
    pub(crate) fn check() -> Result<SingleThreaded, Errno> {
        match Self::threads()? {
            1 => Ok(SingleThreaded(std::marker::PhantomData)),
            _ => Err(Errno::EBUSY),
        }
    }

    /// How many threads this process has (the entries of `/proc/self/task`).
    fn threads() -> Result<usize, Errno> {
        let io = |e: std::io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
        Ok(std::fs::read_dir("/proc/self/task").map_err(io)?.count())
    }

    /// The token without the one-thread check, for the root crate's unit tests, which run in
    /// the test harness (`packaging/test.sh` runs them on one test thread). Panics when the
    /// harness runs tests beside each other: libtest's main thread plus the test's own is all
    /// `--test-threads=1` leaves.
    ///
    /// # Safety
    /// No other thread of the process may hold a lock or be changing memory the forked child
    /// will use (libtest with `--test-threads=1`: its other thread only waits for the test).
    #[cfg(test)]
    pub(crate) unsafe fn assume() -> SingleThreaded {
        let threads = Self::threads().unwrap_or(0);
        assert!(
            threads <= 2,
            "{threads} threads: run the root crate's tests with \
             `cargo test -p sandrund -- --test-threads=1`"
        );
        SingleThreaded(std::marker::PhantomData)
    }
}

/// Clones a child with the extra `clone` flags `flags` (namespaces), which runs `child` and
/// never returns to the caller's code; returns the child's pid. Nothing is forked on failure.
pub(crate) fn clone_child(
    _one_thread: SingleThreaded,
    flags: libc::c_int,
    how: CloneHow<'_>,
    child: impl FnOnce() -> Infallible,
) -> Result<libc::pid_t, Errno> {
    // The process is single-threaded (the token), so the child inherits no lock that another
    // thread held; the child only runs `child`, which cannot return (`Infallible` has no
    // value): it ends in `execve` or `exit_now` and never reaches libc code that trusts the
    // stale thread id. That is what `fork_raw` and `fork_into_cgroup` require.
    let pid = match how {
        // SAFETY: as above.
        CloneHow::Plain => unsafe { fork_raw(flags) },
        // SAFETY: as above.
        CloneHow::IntoCgroup(dir) => unsafe { fork_into_cgroup(flags, dir) },
    }?;
    match pid {
        0 => run_to_end(child),
        pid => Ok(pid),
    }
}

/// Runs `child` (which cannot return) as the whole rest of the process.
/// A panic in `child` must not unwind into the caller's frames, which in this copy of the
/// process are the helper's: it ends the child with exit code 101 instead.
fn run_to_end(child: impl FnOnce() -> Infallible) -> ! {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)) {
        Ok(never) => match never {},
        Err(_) => exit_now(101),
    }
}

/// Forks a long-lived helper process (the cgroup worker) that runs `child` to the end. Unlike
/// [`clone_child`] this is libc's `fork`, which runs libc's fork handlers and gives the child a
/// correct thread id, so the child may run ordinary code (allocate, log, even abort) for as long
/// as it lives. Returns the child's pid.
///
/// Called at start-up only.
pub(crate) fn fork_worker(
    _one_thread: SingleThreaded,
    child: impl FnOnce() -> Infallible,
) -> Result<libc::pid_t, Errno> {
    // SAFETY: the process is single-threaded (the token), so no other thread holds a lock the
    // child would inherit; the child runs `child`, which cannot return, and then never comes
    // back into the caller's frames (`run_to_end` catches a panic and exits).
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => run_to_end(child),
        nix::unistd::ForkResult::Parent { child } => Ok(child.as_raw()),
    }
}

/// Ignores SIGTERM, SIGINT and SIGHUP: the cgroup worker ends when the helper closes its
/// socket or dies, not when a signal meant for the helper's whole unit reaches it first.
pub(crate) fn ignore_stop_signals() -> Result<(), Errno> {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: SIG_IGN installs no handler code, so nothing runs in signal context.
        unsafe { signal(sig, SigHandler::SigIgn) }?;
    }
    Ok(())
}

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
unsafe fn vfork_run<F: FnOnce()>(child: F) -> Result<libc::pid_t, Errno> {
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

/// [`vfork_run`] for a `child` that cannot return; returns its pid once it has `execve`d or
/// exited. What `child` allocates and does not free before its `execve` stays allocated in the
/// caller's heap (a leak, not a fault): J's one allocation is freed before.
pub(crate) fn spawn_vforked(
    _one_thread: SingleThreaded,
    child: impl FnOnce() -> Infallible,
) -> Result<libc::pid_t, Errno> {
    // SAFETY: the caller is single-threaded (the token); `child` cannot return
    // (`Infallible` has no value), so it ends in `execve` or `exit_now`, and every allocation
    // it makes is complete by then (the caller is suspended meanwhile): the heap is sound.
    unsafe { vfork_run(|| run_to_end(child)) }
}

/// Leaves the current process at once, without running destructors or atexit handlers.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions; it never returns.
    unsafe { libc::_exit(code) }
}

/// `execve(argv[0], argv, env)`; returns only on failure, with its errno.
///
/// Both arrays must end with a null pointer, every other entry pointing to a NUL-terminated
/// string: [`ExecArgs`] guarantees it.
pub(crate) fn execve(args: &ExecArgs) -> Errno {
    // SAFETY: argv and env are null-terminated arrays of pointers to NUL-terminated strings
    // (built by `ExecArgs::new` from `CString`s that the borrow keeps alive) until execve.
    unsafe { libc::execve(args.argv[0], args.argv.as_ptr(), args.env.as_ptr()) };
    errno()
}

/// The argument and environment arrays of an [`execve`], built before the call so that the
/// process that executes allocates nothing then. The strings are borrowed: they stay alive.
pub(crate) struct ExecArgs<'a> {
    argv: Vec<*const c_char>,
    env: Vec<*const c_char>,
    _strings: std::marker::PhantomData<&'a CStr>,
}

impl<'a> ExecArgs<'a> {
    /// `argv` must not be empty (its first entry is the program).
    pub(crate) fn new(argv: &'a [std::ffi::CString], env: &'a [std::ffi::CString]) -> Option<Self> {
        if argv.is_empty() {
            return None;
        }
        let terminated = |strings: &'a [std::ffi::CString]| {
            let mut ptrs: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
            ptrs.push(std::ptr::null());
            ptrs
        };
        Some(ExecArgs {
            argv: terminated(argv),
            env: terminated(env),
            _strings: std::marker::PhantomData,
        })
    }
}

/// `pidfd_open(pid, 0)`.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes plain integers and returns a new fd or -1.
    let ret = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    let fd = RawFd::try_from(ret).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pidfd_send_signal(pidfd, SIGKILL, NULL, 0)`.
pub(crate) fn pidfd_kill(pidfd: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: pidfd is an open fd; the null siginfo and zero flags are the documented "like
    // kill(2)" form of pidfd_send_signal, which reads no memory of ours then.
    check(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    })
    .map(drop)
}

/// `kill(pid, SIGKILL)` for one process: `pid` must be positive (`EINVAL` otherwise), so that
/// no slip can signal a process group or, as root, every process of the host.
pub(crate) fn sigkill(pid: libc::pid_t) -> Result<(), Errno> {
    if pid <= 0 {
        return Err(Errno::EINVAL);
    }
    raw_sigkill(pid)
}

/// `kill(-1, SIGKILL)`: every process the caller may signal. Only for a sandbox's init C, pid 1
/// of the job's pid namespace, where that is every other process of the job.
pub(crate) fn sigkill_whole_pid_namespace() -> Result<(), Errno> {
    raw_sigkill(-1)
}

fn raw_sigkill(pid: libc::pid_t) -> Result<(), Errno> {
    // SAFETY: kill takes plain integers and only sends a signal.
    if unsafe { libc::kill(pid, libc::SIGKILL) } < 0 {
        return Err(errno());
    }
    Ok(())
}

/// `waitpid(pid, &status, 0)` once (no retry on `EINTR`): the reaped pid and its raw wait
/// status. `pid` -1 is any child.
pub(crate) fn wait_raw(pid: libc::pid_t) -> Result<(libc::pid_t, libc::c_int), Errno> {
    let mut wstatus: libc::c_int = 0;
    // SAFETY: wstatus is a valid, writable c_int.
    let reaped = unsafe { libc::waitpid(pid, &mut wstatus, 0) };
    if reaped < 0 {
        return Err(errno());
    }
    Ok((reaped, wstatus))
}

/// SIGKILLs our unreaped child `pid` and reaps it (retrying on `EINTR`). Being unreaped, its
/// pid cannot have been reused.
pub(crate) fn kill_and_reap(pid: libc::pid_t) {
    let _ = sigkill(pid);
    while wait_raw(pid) == Err(Errno::EINTR) {}
}

/// Resets every catchable signal to its default action and unblocks all signals, so nothing
/// the helper set up (an ignored `SIGPIPE`, an ignored `SIGCHLD`) leaks into the sandbox.
pub(crate) fn reset_signals() -> Result<(), Errno> {
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

/// Makes `name` the calling process's command name (`PR_SET_NAME`, `/proc/<pid>/comm`) and
/// overwrites its command line in place (`/proc/<pid>/cmdline`), so that what it was started
/// with is not shown. The command line area keeps its size: it gets `name` (cut to fit), a NUL,
/// zeros and a non-NUL last byte, which makes the kernel show it up to that NUL (the
/// `setproctitle` convention) rather than the whole area. Needs no capability
/// (`PR_SET_MM_ARG_START` would need `CAP_SYS_RESOURCE`). Only for a process that shares its
/// memory with no other (C is forked), and that no longer reads its `argv`. Allocates (it
/// reads `/proc/self/stat`).
pub(crate) fn set_process_name(name: &CStr) -> Result<(), Errno> {
    let zero: libc::c_ulong = 0;
    // SAFETY: PR_SET_NAME reads at most 16 bytes of the NUL-terminated string `name`; the
    // other arguments are integers.
    let ret = unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), zero, zero, zero) };
    if ret < 0 {
        return Err(errno());
    }
    let (start, end) = arg_area()?;
    let len = end.checked_sub(start).ok_or(Errno::EINVAL)?;
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
fn arg_area() -> Result<(usize, usize), Errno> {
    let stat = std::fs::read_to_string("/proc/self/stat")
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    // The command name (field 2) is in parentheses and may hold anything: count from the last.
    let rest = stat.rsplit_once(')').ok_or(Errno::EPROTO)?.1;
    let mut fields = rest.split_ascii_whitespace().skip(48 - 3);
    let mut next = || -> Result<usize, Errno> {
        let field = fields.next().ok_or(Errno::EPROTO)?;
        field.parse().map_err(|_| Errno::EPROTO)
    };
    Ok((next()?, next()?))
}

/// Pins glibc's mmap and trim thresholds at `bytes`, so large buffers live in their own
/// mappings, returned to the kernel on free. Call once, while single-threaded and before any
/// large allocation. A refusal (zero return) is harmless and ignored.
pub(crate) fn pin_malloc_thresholds(bytes: libc::c_int) {
    // SAFETY: mallopt only tunes the allocator; the caller calls it once, while the process is
    // single-threaded and before any large allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, bytes);
        libc::mallopt(libc::M_TRIM_THRESHOLD, bytes);
    }
}

/// Tests: runs `probe` in a forked child and returns how the child ended (its exit code is
/// `probe`'s result; 101 when it panics). The test harness may be multi-threaded: the child may
/// allocate (glibc's fork leaves malloc usable in the child) and start a thread (the token's
/// test does; libc's `fork` ran its handlers, so that is sound), but must take no other lock
/// (no printing).
#[cfg(test)]
pub(crate) fn in_forked_child(probe: impl FnOnce() -> i32) -> nix::sys::wait::WaitStatus {
    // SAFETY: see above; the child ends with `_exit` and never returns into the harness, not
    // even by unwinding (a panic becomes exit code 101).
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", errno()),
        0 => exit_now(std::panic::catch_unwind(std::panic::AssertUnwindSafe(probe)).unwrap_or(101)),
        pid => nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None)
            .expect("waitpid on our own child"),
    }
}

/// The self-pipe's write end, for [`on_signal`]; -1 until [`install_signal_pipe`] ran.
static SIGNAL_WRITE_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = SIGNAL_WRITE_FD.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; fd is the non-blocking write end of the
        // self-pipe, kept open for the life of the process; the buffer is a static byte.
        unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
    }
}

/// Installs SIGTERM/SIGINT handlers that wake the loop through a self-pipe (the returned read
/// end becomes readable), and ignores SIGPIPE so writes to vanished clients fail with EPIPE
/// instead of killing the helper.
pub(crate) fn install_signal_pipe() -> std::io::Result<OwnedFd> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    // The write end lives for the rest of the process: leak it on purpose.
    SIGNAL_WRITE_FD.store(
        std::os::fd::IntoRawFd::into_raw_fd(w),
        std::sync::atomic::Ordering::Relaxed,
    );
    let handler = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler only performs an async-signal-safe write to a pipe; no other handler
    // is installed for these signals in this process.
    unsafe {
        sigaction(Signal::SIGTERM, &handler)?;
        sigaction(Signal::SIGINT, &handler)?;
        sigaction(Signal::SIGPIPE, &ignore)?;
    }
    Ok(r)
}

/// `execveat(exe, "", [argv0, NULL], [NULL], AT_EMPTY_PATH)`: runs the executable open at
/// `exe` with no environment; returns only on failure, with its errno. Allocation-free.
pub(crate) fn execveat_no_env(exe: RawFd, argv0: &CStr) -> Errno {
    let argv = [argv0.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<c_char>()];
    // SAFETY: the empty path with AT_EMPTY_PATH names `exe` itself (EBADF if it is not open);
    // argv and envp are NULL-terminated arrays of pointers to NUL-terminated strings, alive in
    // this frame for the whole call.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            exe,
            c"".as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    errno()
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, 0, {len, filter})`: installs the classic-BPF program
/// `filter` on the calling thread (`NO_NEW_PRIVS` must be set). Allocation-free.
pub(crate) fn install_seccomp_filter(filter: &[libc::sock_filter]) -> Result<(), Errno> {
    let prog = libc::sock_fprog {
        len: u16::try_from(filter.len()).map_err(|_| Errno::EINVAL)?,
        // The kernel only reads the program; the pointer is `*mut` by C declaration only.
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `filter`, whose `len` instructions are initialized and outlive
    // the call; the kernel copies the program before returning.
    check(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0 as libc::c_uint,
            std::ptr::addr_of!(prog),
        )
    })
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::WaitStatus;

    #[test]
    fn given_one_thread_then_the_token_is_given_and_given_two_it_is_refused() {
        // In forked children: each is single-threaded whatever the harness runs beside it.
        let alone = in_forked_child(|| match SingleThreaded::check() {
            Ok(_) => 0,
            Err(e) => e as i32,
        });
        assert!(matches!(alone, WaitStatus::Exited(_, 0)), "{alone:?}");
        let with_a_thread = in_forked_child(|| {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let other = std::thread::spawn(move || rx.recv());
            let code = match SingleThreaded::check() {
                Err(Errno::EBUSY) => 0,
                Err(e) => e as i32,
                Ok(_) => 100,
            };
            drop(tx);
            let _ = other.join();
            code
        });
        assert!(
            matches!(with_a_thread, WaitStatus::Exited(_, 0)),
            "{with_a_thread:?}"
        );
    }
}
