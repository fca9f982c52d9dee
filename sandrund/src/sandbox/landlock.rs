//! Landlock for the job: read and execute on the system binds, read-write only on the work
//! directory, `/tmp` and `/dev/shm`, listing (names only) of `/` and the directories below it
//! (so `ls /` works; file modes still keep the helper's own directories closed), plus abstract-socket and signal scoping where the kernel's
//! ABI has them. Fails closed: if the kernel cannot enforce the rules, the job does not run.
//!
//! The ruleset handles every filesystem right of the best ABI the running kernel supports
//! (at least ABI 1, else an error), in the crate's `HardRequirement` mode: nothing is dropped
//! silently. TCP is not restricted (jobs may use their private loopback). After
//! `landlock_restrict_self`, anything but "fully enforced with `NO_NEW_PRIVS`" is an error.
//! The kernel's ABI is queried directly (the crate keeps its own query private), then capped at
//! the newest ABI the crate knows.

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use landlock::{
    Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

/// Paths and their access, as seen after `pivot_root`.
pub struct LandlockRules<'a> {
    /// Read and execute (files and directories).
    pub read_exec: &'a [&'a Path],
    /// Read and write (and execute: jobs may run what they built).
    pub read_write: &'a [&'a Path],
    /// Device files that may be read and written (`/dev/null` and friends).
    pub devices: &'a [&'a Path],
    /// Directories whose entries may be listed, and those of the directories below them:
    /// `ReadDir` only, so names can be seen but nothing new can be opened, read or run.
    pub list_only: &'a [&'a Path],
}

/// Restricts the calling process. `NO_NEW_PRIVS` must already be set. Tests only: the sandbox
/// prepares the ruleset early and restricts later.
#[cfg(test)]
pub fn restrict_self(rules: &LandlockRules<'_>) -> Result<(), String> {
    prepare(rules)?.restrict()
}

/// A ruleset built but not enforced yet: the sandbox builds it while it is prepared (its paths
/// are the same before and after the job arrives) and enforces it once privileges are dropped.
pub struct PreparedRuleset {
    created: RulesetCreated,
    abi: ABI,
}

/// Builds the ruleset for `rules` without enforcing it.
pub fn prepare(rules: &LandlockRules<'_>) -> Result<PreparedRuleset, String> {
    let abi = kernel_abi()?;
    let mut created = create_ruleset(abi)?;
    created = add_rules(created, abi, rules.read_exec, read_exec_access())?;
    created = add_rules(created, abi, rules.read_write, AccessFs::from_all(abi))?;
    created = add_rules(created, abi, rules.devices, device_access(abi))?;
    created = add_rules(created, abi, rules.list_only, AccessFs::ReadDir.into())?;
    Ok(PreparedRuleset { created, abi })
}

fn read_exec_access() -> BitFlags<AccessFs> {
    AccessFs::Execute | AccessFs::ReadFile | AccessFs::ReadDir
}

impl PreparedRuleset {
    /// Adds read and execute on more paths (the job's template).
    pub fn allow_read_exec(self, paths: &[&Path]) -> Result<Self, String> {
        let created = add_rules(self.created, self.abi, paths, read_exec_access())?;
        Ok(PreparedRuleset { created, ..self })
    }

    /// Enforces the ruleset on the calling process. `NO_NEW_PRIVS` must already be set.
    pub fn restrict(self) -> Result<(), String> {
        let status = self
            .created
            .restrict_self()
            .map_err(|e| format!("landlock: restrict_self: {e}"))?;
        if status.ruleset != RulesetStatus::FullyEnforced || !status.no_new_privs {
            return Err(format!(
                "landlock: not fully enforced (ruleset {:?}, no_new_privs {})",
                status.ruleset, status.no_new_privs
            ));
        }
        Ok(())
    }
}

/// A ruleset handling every filesystem right and every scope of `abi`, in hard-requirement mode.
fn create_ruleset(abi: ABI) -> Result<RulesetCreated, String> {
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
    ruleset
        .create()
        .map_err(|e| format!("landlock: create ruleset: {e}"))
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
        let errno = nix::errno::Errno::last();
        return Err(format!(
            "landlock: kernel does not support Landlock (version query: {errno})"
        ));
    }
    let version = i32::try_from(version).unwrap_or(i32::MAX);
    Ok(ABI::from(version))
}

/// Read and write on device files, plus device ioctls where the ABI handles them (ABI 5).
/// No truncate right is needed: `open(O_TRUNC)` on a device does not truncate (shells'
/// `> /dev/null` works, see the tests).
fn device_access(abi: ABI) -> BitFlags<AccessFs> {
    (AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev) & AccessFs::from_all(abi)
}

/// Adds one rule per path; each must exist. Directory-only rights are dropped for non-directories
/// (the kernel refuses them there), and rights the ABI does not handle are dropped.
fn add_rules(
    mut created: RulesetCreated,
    abi: ABI,
    paths: &[&Path],
    access: BitFlags<AccessFs>,
) -> Result<RulesetCreated, String> {
    let handled = AccessFs::from_all(abi);
    for path in paths {
        let fd =
            PathFd::new(path).map_err(|e| format!("landlock: open {}: {e}", path.display()))?;
        let stat = nix::sys::stat::fstat(fd.as_fd().as_raw_fd())
            .map_err(|e| format!("landlock: stat {}: {e}", path.display()))?;
        let is_dir = stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let rights = match is_dir {
            true => access & handled,
            false => access & handled & AccessFs::from_file(abi),
        };
        created = created
            .add_rule(PathBeneath::new(fd, rights))
            .map_err(|e| format!("landlock: add rule for {}: {e}", path.display()))?;
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    use std::path::PathBuf;

    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::Pid;

    use super::*;

    const ALL_CHECKS_PASSED: i32 = 0;
    const RESTRICT_FAILED: i32 = 99;
    /// A probe's syscall succeeded (distinct from every errno).
    const SYSCALL_SUCCEEDED: i32 = 200;

    fn cstring(path: &Path) -> CString {
        CString::new(path.as_os_str().as_bytes()).expect("test paths have no NUL")
    }

    fn first_existing(candidates: &[&str]) -> PathBuf {
        let found = candidates.iter().map(PathBuf::from).find(|p| p.exists());
        found.unwrap_or_else(|| panic!("none of {candidates:?} exists on this host"))
    }

    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test must run as root: Landlock must stop writes that DAC would allow"
        );
    }

    /// Forks a child that applies `rules`, then runs `probe` and exits with its code.
    /// `restrict_self` allocates; glibc's fork leaves malloc usable in the child, and the
    /// child takes no other lock (no printing).
    fn run_restricted(rules: &LandlockRules<'_>, probe: impl FnOnce() -> i32) -> WaitStatus {
        // SAFETY: see above; the child ends with `_exit` and never returns into the harness.
        match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", nix::errno::Errno::last()),
            0 => {
                let code = match restrict_self(rules) {
                    Ok(()) => probe(),
                    Err(_) => RESTRICT_FAILED,
                };
                // SAFETY: ends the child without unwinding into the test harness.
                unsafe { libc::_exit(code) }
            }
            pid => waitpid(Pid::from_raw(pid), None).expect("waitpid on our own child"),
        }
    }

    /// `open(2)`'s errno, or 0 on success (the fd is closed).
    fn open_errno(path: &CString, flags: libc::c_int) -> i32 {
        // SAFETY: `path` is NUL-terminated; mode is an integer.
        let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
        if fd < 0 {
            return nix::errno::Errno::last_raw();
        }
        // SAFETY: `fd` was just opened by us.
        unsafe { libc::close(fd) };
        0
    }

    #[test]
    fn given_usr_read_exec_and_tempdir_read_write_when_probing_then_only_those_are_reachable() {
        require_root();
        let tmp = tempfile::tempdir().expect("temp dir");
        let outside = cstring(&first_existing(&["/etc/hostname", "/etc/passwd"]));
        let usr_file = cstring(&first_existing(&["/usr/bin/env", "/usr/bin/sh"]));
        let usr_new = cstring(Path::new("/usr/.sandrun-landlock-probe"));
        let tmp_new = cstring(&tmp.path().join("created"));
        let null = cstring(Path::new("/dev/null"));
        let zero = cstring(Path::new("/dev/zero"));
        let (usr, work, dev_null) = (Path::new("/usr"), tmp.path(), Path::new("/dev/null"));
        let rules = LandlockRules {
            read_exec: &[usr],
            read_write: &[work],
            devices: &[dev_null],
            list_only: &[],
        };
        let status = run_restricted(&rules, || {
            let create = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY;
            let checks = [
                open_errno(&outside, libc::O_RDONLY) == libc::EACCES,
                open_errno(&usr_file, libc::O_RDONLY) == 0,
                open_errno(&usr_file, libc::O_WRONLY) == libc::EACCES,
                open_errno(&usr_new, create) == libc::EACCES,
                open_errno(&tmp_new, create) == 0,
                open_errno(&null, libc::O_RDWR) == 0,
                open_errno(&null, libc::O_WRONLY | libc::O_TRUNC) == 0,
                open_errno(&zero, libc::O_RDONLY) == libc::EACCES,
            ];
            match checks.iter().position(|ok| !ok) {
                Some(i) => 1 + i32::try_from(i).unwrap_or(50),
                None => ALL_CHECKS_PASSED,
            }
        });
        let _ = std::fs::remove_file("/usr/.sandrun-landlock-probe");
        assert_eq!(
            status,
            WaitStatus::Exited(status_pid(status), ALL_CHECKS_PASSED),
            "1-based index of the failed check (99: restrict failed)"
        );
        assert!(
            tmp.path().join("created").exists(),
            "the file made in the temp dir is real"
        );
    }

    fn status_pid(status: WaitStatus) -> Pid {
        status.pid().expect("an exited child has a pid")
    }

    #[test]
    fn given_signal_scope_when_signalling_the_parent_then_eperm() {
        let usr = Path::new("/usr");
        let rules = LandlockRules {
            read_exec: &[usr],
            read_write: &[],
            devices: &[],
            list_only: &[],
        };
        let status = run_restricted(&rules, || {
            // SAFETY: signal 0 only checks permission; getppid has no arguments.
            let rc = unsafe { libc::kill(libc::getppid(), 0) };
            if rc == 0 {
                SYSCALL_SUCCEEDED
            } else {
                nix::errno::Errno::last_raw()
            }
        });
        assert_eq!(status, WaitStatus::Exited(status_pid(status), libc::EPERM));
    }

    #[test]
    fn given_abstract_socket_scope_when_connecting_outside_then_eperm() {
        let name = format!("sandrun-landlock-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let _listener = UnixListener::bind_addr(&addr).expect("bind abstract socket");
        let usr = Path::new("/usr");
        let rules = LandlockRules {
            read_exec: &[usr],
            read_write: &[],
            devices: &[],
            list_only: &[],
        };
        let sun = abstract_sockaddr(name.as_bytes());
        let status = run_restricted(&rules, || connect_errno(&sun, name.len()));
        assert_eq!(status, WaitStatus::Exited(status_pid(status), libc::EPERM));
    }

    fn abstract_sockaddr(name: &[u8]) -> libc::sockaddr_un {
        // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
        let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        sun.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).expect("AF_UNIX is 1");
        for (dst, &src) in sun.sun_path[1..].iter_mut().zip(name) {
            *dst = src as libc::c_char;
        }
        sun
    }

    /// `connect(2)`'s errno on a fresh Unix socket, or `SYSCALL_SUCCEEDED`. Raw calls only (child side).
    fn connect_errno(sun: &libc::sockaddr_un, name_len: usize) -> i32 {
        let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name_len;
        // SAFETY: plain socket creation.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        // SAFETY: `sun` is a valid sockaddr_un and `len` does not exceed its size.
        let rc = unsafe {
            libc::connect(
                fd,
                std::ptr::from_ref(sun).cast(),
                libc::socklen_t::try_from(len).unwrap_or(0),
            )
        };
        if rc == 0 {
            SYSCALL_SUCCEEDED
        } else {
            nix::errno::Errno::last_raw()
        }
    }

    #[test]
    fn given_a_missing_path_when_restricting_then_it_is_an_error_not_a_skip() {
        let missing = Path::new("/nonexistent-sandrun-landlock");
        let rules = LandlockRules {
            read_exec: &[missing],
            read_write: &[],
            devices: &[],
            list_only: &[],
        };
        let status = run_restricted(&rules, || ALL_CHECKS_PASSED);
        assert_eq!(
            status,
            WaitStatus::Exited(status_pid(status), RESTRICT_FAILED)
        );
    }

    #[test]
    fn given_this_kernel_when_querying_the_abi_then_it_has_landlock() {
        let abi = kernel_abi().expect("CI kernels have Landlock");
        assert!(abi >= ABI::V1, "{abi:?}");
    }
}
