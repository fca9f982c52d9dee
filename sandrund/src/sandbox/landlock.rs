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

#![forbid(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use landlock::{
    Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreated, RulesetCreatedAttr, RulesetError, RulesetStatus, Scope, ABI,
};
use nix::errno::Errno;

use super::{fail, SetupError, SetupStep};
use crate::sys;

/// Why Landlock could not be applied. The job does not run (fails closed).
#[derive(Debug)]
#[non_exhaustive]
pub enum LandlockError {
    /// The host's kernel has no Landlock (not built in, or not in the `lsm=` list).
    Unsupported(Errno),
    /// A path of a rule cannot be opened or examined: the sandbox's layout lacks it (a bind the
    /// operator configured, or a bug).
    Path { what: String, source: String },
    /// The kernel or the `landlock` crate refused a step (`what`) of building the ruleset or
    /// enforcing it.
    Ruleset { what: String, source: RulesetError },
    /// The ruleset was enforced only in part (a bug, or a kernel that lost a feature).
    NotEnforced {
        ruleset: RulesetStatus,
        no_new_privs: bool,
    },
}

impl std::fmt::Display for LandlockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LandlockError::Unsupported(errno) => write!(
                f,
                "landlock: kernel does not support Landlock (version query: {errno})"
            ),
            LandlockError::Path { what, source } => write!(f, "landlock: {what}: {source}"),
            LandlockError::Ruleset { what, source } => write!(f, "landlock: {what}: {source}"),
            LandlockError::NotEnforced {
                ruleset,
                no_new_privs,
            } => write!(
                f,
                "landlock: not fully enforced (ruleset {ruleset:?}, no_new_privs {no_new_privs})"
            ),
        }
    }
}

impl std::error::Error for LandlockError {}

impl From<LandlockError> for SetupError {
    fn from(e: LandlockError) -> SetupError {
        fail(SetupStep::Landlock, Errno::UnknownErrno, e.to_string())
    }
}

fn refused(what: impl Into<String>) -> impl FnOnce(RulesetError) -> LandlockError {
    let what = what.into();
    move |source| LandlockError::Ruleset { what, source }
}

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
pub fn restrict_self(rules: &LandlockRules<'_>) -> Result<(), LandlockError> {
    prepare(rules)?.restrict()
}

/// A ruleset built but not enforced yet: the sandbox builds it while it is prepared (its paths
/// are the same before and after the job arrives) and enforces it once privileges are dropped.
pub struct PreparedRuleset {
    created: RulesetCreated,
    abi: ABI,
}

/// Builds the ruleset for `rules` without enforcing it.
pub fn prepare(rules: &LandlockRules<'_>) -> Result<PreparedRuleset, LandlockError> {
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
    pub fn allow_read_exec(self, paths: &[&Path]) -> Result<Self, LandlockError> {
        let created = add_rules(self.created, self.abi, paths, read_exec_access())?;
        Ok(PreparedRuleset { created, ..self })
    }

    /// Enforces the ruleset on the calling process. `NO_NEW_PRIVS` must already be set.
    pub fn restrict(self) -> Result<(), LandlockError> {
        let status = self
            .created
            .restrict_self()
            .map_err(refused("restrict_self"))?;
        if status.ruleset != RulesetStatus::FullyEnforced || !status.no_new_privs {
            return Err(LandlockError::NotEnforced {
                ruleset: status.ruleset,
                no_new_privs: status.no_new_privs,
            });
        }
        Ok(())
    }
}

/// A ruleset handling every filesystem right and every scope of `abi`, in hard-requirement mode.
fn create_ruleset(abi: ABI) -> Result<RulesetCreated, LandlockError> {
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))
        .map_err(refused(format!("handle filesystem access (ABI {abi:?})")))?;
    let scopes = Scope::from_all(abi);
    if !scopes.is_empty() {
        ruleset = ruleset
            .scope(scopes)
            .map_err(refused("scope signals and abstract sockets"))?;
    }
    ruleset.create().map_err(refused("create ruleset"))
}

/// The running kernel's Landlock ABI (capped at the newest the crate knows); at least ABI 1.
fn kernel_abi() -> Result<ABI, LandlockError> {
    let version = sys::landlock_abi_version().map_err(LandlockError::Unsupported)?;
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
) -> Result<RulesetCreated, LandlockError> {
    let handled = AccessFs::from_all(abi);
    for path in paths {
        let fd = PathFd::new(path).map_err(|e| path_error(path, "open", e))?;
        let stat = nix::sys::stat::fstat(fd.as_fd().as_raw_fd())
            .map_err(|e| path_error(path, "stat", e))?;
        let is_dir = stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let rights = match is_dir {
            true => access & handled,
            false => access & handled & AccessFs::from_file(abi),
        };
        created = created
            .add_rule(PathBeneath::new(fd, rights))
            .map_err(refused(format!("add rule for {}", path.display())))?;
    }
    Ok(created)
}

fn path_error(path: &Path, what: &str, e: impl std::fmt::Display) -> LandlockError {
    let (what, source) = (format!("{what} {}", path.display()), e.to_string());
    LandlockError::Path { what, source }
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    use std::path::PathBuf;

    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    use nix::sys::wait::WaitStatus;
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
    fn run_restricted(rules: &LandlockRules<'_>, probe: impl FnOnce() -> i32) -> WaitStatus {
        sys::in_forked_child(|| match restrict_self(rules) {
            Ok(()) => probe(),
            Err(_) => RESTRICT_FAILED,
        })
    }

    /// `open(2)`'s outcome (the fd is closed).
    fn open_errno(path: &CString, flags: OFlag) -> Result<(), Errno> {
        sys::open(
            path.as_c_str(),
            flags | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map(drop)
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
            let create = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY;
            let checks = [
                open_errno(&outside, OFlag::O_RDONLY) == Err(Errno::EACCES),
                open_errno(&usr_file, OFlag::O_RDONLY).is_ok(),
                open_errno(&usr_file, OFlag::O_WRONLY) == Err(Errno::EACCES),
                open_errno(&usr_new, create) == Err(Errno::EACCES),
                open_errno(&tmp_new, create).is_ok(),
                open_errno(&null, OFlag::O_RDWR).is_ok(),
                open_errno(&null, OFlag::O_WRONLY | OFlag::O_TRUNC).is_ok(),
                open_errno(&zero, OFlag::O_RDONLY) == Err(Errno::EACCES),
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
            match nix::sys::signal::kill(nix::unistd::getppid(), None) {
                Ok(()) => SYSCALL_SUCCEEDED,
                Err(e) => e as i32,
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
        let status = run_restricted(&rules, || connect_errno(name.as_bytes()));
        assert_eq!(status, WaitStatus::Exited(status_pid(status), libc::EPERM));
    }

    /// `connect(2)`'s errno on a fresh Unix socket to abstract `name`, or `SYSCALL_SUCCEEDED`.
    fn connect_errno(name: &[u8]) -> i32 {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let outcome = UnixAddr::new_abstract(name).and_then(|addr| {
            let sock = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::empty(),
                None,
            )?;
            connect(sock.as_raw_fd(), &addr)
        });
        match outcome {
            Ok(()) => SYSCALL_SUCCEEDED,
            Err(e) => e as i32,
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
