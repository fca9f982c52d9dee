//! The collector's own confinement, applied first thing in `main`, before it reads its order or
//! anything beneath `/work`. The helper already dropped it to the job's uid (no groups, no
//! capability, `NO_NEW_PRIVS`) before the `execveat`; this re-checks all of that, since `exec`
//! is where the collector stops trusting anything but the kernel, and then
//!
//! 1. sets `PR_SET_DUMPABLE` 0 again (`execve` reset it to 1);
//! 2. refuses to run as uid or gid 0 (in any of the real, effective and saved ids), with any
//!    capability in any set (effective, permitted, inheritable, bounding, ambient), or without
//!    `NO_NEW_PRIVS`;
//! 3. enforces Landlock: every filesystem right of the kernel's ABI handled, only
//!    `ReadFile | ReadDir` granted, only beneath the `/work` fd; signals and abstract sockets
//!    scoped;
//! 4. installs its seccomp filter ([`COLLECTOR_FILTER`], compiled at build time from
//!    `COLLECTOR` in `seccomp/src/policy.rs`; anything else kills the process),
//!    then names itself `sandrun-collect` (the one `prctl` the filter allows).
//!
//! Any step that fails is returned as a message; `main` reports it to the helper and exits.

use std::os::fd::{AsRawFd, BorrowedFd};

use landlock::{
    Access, AccessFs, CompatLevel, Compatible, PathBeneath, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

/// The collector's name (`/proc/<pid>/comm`), so operators and tests can find it.
pub const NAME: &std::ffi::CStr = c"sandrun-collect";

// `static COLLECTOR_FILTER: [libc::sock_filter; N]`: the build script's compilation of
// `COLLECTOR` (`seccomp/src/policy.rs`): the collector's allow-list and `prctl(PR_SET_NAME)`;
// every other syscall, including every one a job may make that is not there, kills the
// collector (`SIGSYS`).
include!(concat!(env!("OUT_DIR"), "/collector_filter.rs"));
// What `sock_fprog::len` and the kernel (`BPF_MAXINSNS`) take, checked when this is compiled.
const _: () = assert!(!COLLECTOR_FILTER.is_empty() && COLLECTOR_FILTER.len() <= 4096);

/// Beyond the highest capability number of any kernel (`PR_CAPBSET_READ` says `EINVAL` there).
const CAP_PROBE_LIMIT: libc::c_ulong = 64;

/// Steps 1 to 4 of the module docs.
pub fn confine(work: BorrowedFd<'_>) -> Result<(), String> {
    prctl(libc::PR_SET_DUMPABLE, 0, 0).map_err(|e| format!("PR_SET_DUMPABLE: errno {e}"))?;
    check_unprivileged()?;
    restrict_to_read_beneath(work)?;
    install_filter().map_err(|e| format!("seccomp: install the collector filter: errno {e}"))?;
    // SAFETY: PR_SET_NAME reads at most 16 bytes of the NUL-terminated `NAME`.
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, NAME.as_ptr(), 0, 0, 0) };
    if rc != 0 {
        return Err(format!("PR_SET_NAME: errno {}", errno()));
    }
    Ok(())
}

/// Step 2: not root in any id, no capability in any set, `NO_NEW_PRIVS` set.
pub fn check_unprivileged() -> Result<(), String> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: getresuid and getresgid write three ids through the valid pointers given.
    let rc = unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if rc != 0 || r == 0 || e == 0 || s == 0 {
        return Err(format!("refusing to run as uid 0 (uids {r} {e} {s})"));
    }
    // SAFETY: as above.
    let rc = unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    if rc != 0 || r == 0 || e == 0 || s == 0 {
        return Err(format!("refusing to run as gid 0 (gids {r} {e} {s})"));
    }
    let mut header = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and the two-element data array have the layout capget(2) expects for
    // _LINUX_CAPABILITY_VERSION_3; both outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(format!("capget: errno {}", errno()));
    }
    if data
        .iter()
        .any(|d| d.effective | d.permitted | d.inheritable != 0)
    {
        return Err("refusing to run with capabilities".into());
    }
    let is_set = libc::c_ulong::try_from(libc::PR_CAP_AMBIENT_IS_SET).unwrap_or(1);
    for cap in 0..CAP_PROBE_LIMIT {
        match (
            prctl(libc::PR_CAPBSET_READ, cap, 0),
            prctl(libc::PR_CAP_AMBIENT, is_set, cap),
        ) {
            (Err(libc::EINVAL), _) => break,
            (Ok(0), Ok(0)) => {}
            (Ok(_), Ok(_)) => return Err(format!("refusing to run with capability {cap}")),
            (Err(e), _) | (_, Err(e)) => return Err(format!("capability probe: errno {e}")),
        }
    }
    if prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0) != Ok(1) {
        return Err("refusing to run without NO_NEW_PRIVS".into());
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Step 3: reading files and listing directories beneath `dir`, nothing else anywhere.
pub fn restrict_to_read_beneath(dir: BorrowedFd<'_>) -> Result<(), String> {
    let abi = kernel_abi()?;
    let rights = (AccessFs::ReadFile | AccessFs::ReadDir) & AccessFs::from_all(abi);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| format!("landlock: handle filesystem access (ABI {abi:?}): {e}"))?;
    let scopes = Scope::from_all(abi);
    if !scopes.is_empty() {
        ruleset = ruleset
            .scope(scopes)
            .map_err(|e| format!("landlock: scope signals and abstract sockets: {e}"))?;
    }
    let status = ruleset
        .create()
        .map_err(|e| format!("landlock: create ruleset: {e}"))?
        .add_rule(PathBeneath::new(dir, rights))
        .map_err(|e| format!("landlock: add rule for the work directory: {e}"))?
        .restrict_self()
        .map_err(|e| format!("landlock: restrict: {e}"))?;
    if status.ruleset != RulesetStatus::FullyEnforced || !status.no_new_privs {
        return Err(format!(
            "landlock: not fully enforced (ruleset {:?}, no_new_privs {})",
            status.ruleset, status.no_new_privs
        ));
    }
    Ok(())
}

/// The running kernel's Landlock ABI (capped at the newest the crate knows); at least ABI 1.
fn kernel_abi() -> Result<ABI, String> {
    // SAFETY: with a null attribute pointer, size 0 and LANDLOCK_CREATE_RULESET_VERSION, the
    // kernel reads no memory and returns the ABI version (or -1 with errno).
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    if version < 1 {
        return Err(format!(
            "landlock: kernel does not support Landlock (errno {})",
            errno()
        ));
    }
    Ok(ABI::from(i32::try_from(version).unwrap_or(i32::MAX)))
}

/// Step 4: installs [`COLLECTOR_FILTER`] on this (only) thread; `NO_NEW_PRIVS` must be set
/// (the helper set it, and [`check_unprivileged`] checked it). The kernel's errno on failure.
fn install_filter() -> Result<(), i32> {
    let prog = libc::sock_fprog {
        // At most 4,096 instructions (checked at compile time above), so the length fits.
        len: u16::try_from(COLLECTOR_FILTER.len()).map_err(|_| libc::EINVAL)?,
        // The kernel only reads the program; the pointer is `*mut` by C declaration only.
        filter: COLLECTOR_FILTER.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at the static program, whose `len` instructions are initialized
    // and live for the whole process; the kernel copies the program before returning.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0 as libc::c_uint,
            std::ptr::addr_of!(prog),
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(errno()),
    }
}

/// `prctl` with two integer arguments: its result, or the errno.
fn prctl(option: libc::c_int, arg2: libc::c_ulong, arg3: libc::c_ulong) -> Result<i32, i32> {
    let zero: libc::c_ulong = 0;
    // SAFETY: the options used here take integer arguments only and read no memory.
    let rc = unsafe { libc::prctl(option, arg2, arg3, zero, zero) };
    if rc < 0 {
        Err(errno())
    } else {
        Ok(rc)
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Whether `fd` is open (`F_GETFD` succeeds).
pub fn is_open(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: F_GETFD only reads the descriptor table.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) >= 0 }
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::os::fd::AsFd;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    use nix::sys::signal::Signal;
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::Pid;

    use super::*;

    /// Exit code of a probe whose syscall succeeded (errnos are all below it).
    const SUCCESS: i32 = 200;
    const SETUP_FAILED: i32 = 99;

    /// Forks a child that runs `setup` then `probe` and exits with the probe's code.
    /// `setup` allocates; glibc's fork leaves malloc usable in the child, and the child takes
    /// no other lock (no printing).
    fn in_child(setup: impl FnOnce() -> bool, probe: impl FnOnce() -> i32) -> WaitStatus {
        // SAFETY: see above; the child ends with `_exit` and never returns into the harness.
        match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", nix::errno::Errno::last()),
            0 => {
                let code = if setup() { probe() } else { SETUP_FAILED };
                // SAFETY: ends the child without unwinding into the test harness.
                unsafe { libc::_exit(code) }
            }
            pid => waitpid(Pid::from_raw(pid), None).expect("waitpid on our own child"),
        }
    }

    fn no_new_privs() -> bool {
        prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).is_ok()
    }

    fn filtered(probe: impl FnOnce() -> i32) -> WaitStatus {
        in_child(|| no_new_privs() && install_filter().is_ok(), probe)
    }

    fn syscall6(nr: libc::c_long, args: [libc::c_long; 6]) -> i32 {
        let [a, b, c, d, e, f] = args;
        // SAFETY: the probes only pass integers; a refused call never reaches the kernel.
        let rc = unsafe { libc::syscall(nr, a, b, c, d, e, f) };
        if rc >= 0 {
            SUCCESS
        } else {
            errno()
        }
    }

    fn cstring(path: &Path) -> CString {
        CString::new(path.as_os_str().as_bytes()).expect("test paths have no NUL")
    }

    /// `open(2)`'s errno, or 0 on success (the fd is closed).
    fn open_errno(path: &CString, flags: libc::c_int) -> i32 {
        // SAFETY: `path` is NUL-terminated; mode is an integer.
        let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
        if fd < 0 {
            return errno();
        }
        // SAFETY: `fd` was just opened by us.
        unsafe { libc::close(fd) };
        0
    }

    #[test]
    fn given_collector_filter_when_reading_writing_and_exiting_then_allowed() {
        // A zero-length write to stdout, then exit_group: both in the collector's list.
        let status = filtered(|| syscall6(libc::SYS_write, [1, 0, 0, 0, 0, 0]));
        assert!(
            matches!(status, WaitStatus::Exited(_, SUCCESS)),
            "write(1, _, 0) under the collector filter: {status:?}"
        );
        // The seed the collector's runtime draws right after the filter is in place.
        let mut seed = [0u8; 8];
        let (buf, len) = (seed.as_mut_ptr() as libc::c_long, 8);
        let getrandom = [buf, len, libc::c_long::from(libc::GRND_NONBLOCK), 0, 0, 0];
        let status = filtered(|| syscall6(libc::SYS_getrandom, getrandom));
        assert!(
            matches!(status, WaitStatus::Exited(_, SUCCESS)),
            "getrandom under the collector filter: {status:?}"
        );
        // The one prctl it makes, with the option's upper 32 bits set (the kernel reads an int).
        let name = c"probe".as_ptr() as libc::c_long;
        for option in [
            libc::PR_SET_NAME.into(),
            (1 << 32) | libc::c_long::from(libc::PR_SET_NAME),
        ] {
            let status = filtered(|| syscall6(libc::SYS_prctl, [option, name, 0, 0, 0, 0]));
            assert!(
                matches!(status, WaitStatus::Exited(_, SUCCESS)),
                "prctl({option:#x}) under the collector filter: {status:?}"
            );
        }
    }

    #[test]
    fn given_collector_filter_when_any_other_syscall_then_the_collector_is_killed() {
        // Allowed for jobs, but not for the collector: each kills it with SIGSYS.
        let dumpable = [libc::PR_SET_DUMPABLE.into(), 1, 0, 0, 0, 0];
        let high_name = libc::c_long::from(libc::PR_SET_NAME) << 32;
        let dumpable_named_high = [high_name | dumpable[0], 1, 0, 0, 0, 0];
        for (nr, args, what) in [
            (libc::SYS_getpid, [0; 6], "getpid"),
            (libc::SYS_socket, [0; 6], "socket"),
            (libc::SYS_openat, [0; 6], "openat"),
            (libc::SYS_execve, [0; 6], "execve"),
            (libc::SYS_kill, [0; 6], "kill"),
            (libc::SYS_connect, [0; 6], "connect"),
            (libc::SYS_prctl, dumpable, "prctl(PR_SET_DUMPABLE)"),
            // PR_SET_NAME in the upper 32 bits only: the kernel reads PR_SET_DUMPABLE.
            (
                libc::SYS_prctl,
                dumpable_named_high,
                "prctl((15 << 32) | PR_SET_DUMPABLE)",
            ),
            // A syscall of another ABI (x32 getpid): the architecture check.
            (0x4000_0000 | libc::SYS_getpid, [0; 6], "x32 getpid"),
        ] {
            let status = filtered(|| syscall6(nr, args));
            assert!(
                matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
                "{what} under the collector filter: {status:?}"
            );
        }
    }

    #[test]
    fn given_read_beneath_a_dir_when_probing_then_only_reading_inside_it_works() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test must run as root: Landlock must stop writes that DAC would allow"
        );
        let tmp = tempfile::tempdir().expect("temp dir");
        std::fs::write(tmp.path().join("inside"), b"x").expect("write a file");
        let dir = std::fs::File::open(tmp.path()).expect("open the temp dir");
        let inside = cstring(&tmp.path().join("inside"));
        let created = cstring(&tmp.path().join("created"));
        let outside = cstring(Path::new("/etc/passwd"));
        let usr_file = cstring(Path::new("/usr/bin/env"));
        let status = in_child(
            || no_new_privs() && restrict_to_read_beneath(dir.as_fd()).is_ok(),
            || {
                let create = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY;
                let checks = [
                    open_errno(&inside, libc::O_RDONLY) == 0,
                    open_errno(&inside, libc::O_WRONLY) == libc::EACCES,
                    open_errno(&created, create) == libc::EACCES,
                    open_errno(&outside, libc::O_RDONLY) == libc::EACCES,
                    open_errno(&usr_file, libc::O_RDONLY) == libc::EACCES,
                ];
                match checks.iter().position(|ok| !ok) {
                    Some(i) => 1 + i32::try_from(i).unwrap_or(50),
                    None => 0,
                }
            },
        );
        assert!(
            matches!(status, WaitStatus::Exited(_, 0)),
            "{status:?}: 1-based index of the failed check (99: restrict failed)"
        );
        assert!(!tmp.path().join("created").exists());
    }

    #[test]
    fn given_root_when_checking_then_the_collector_refuses_to_run() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test must run as root"
        );
        let err = check_unprivileged().expect_err("root must be refused");
        assert!(err.contains("uid 0"), "{err}");
    }
}
