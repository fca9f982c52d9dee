//! The parts of a job cgroup's life that v1 and v2 share: checking the request, creating the
//! directories with rollback, killing by `cgroup.procs`, removing, and start-up cleanup.

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;

use super::fs::{io_error, Host};
use super::{CgroupError, CgroupLimits, JobCgroup};
use crate::sys;

/// The directory below the helper's cgroup that holds every job cgroup.
pub(crate) const SANDRUN_DIR: &str = "sandrun";
/// Job cgroups the server creates are named `job-<n>`; only those are removed as stale.
pub(crate) const STALE_PREFIX: &str = "job-";
/// Rounds of "read cgroup.procs, SIGKILL each" before giving up.
const KILL_ROUNDS: u32 = 50;
/// Rounds of waiting for a killed stale cgroup to empty before its removal.
const EMPTY_ROUNDS: u32 = 100;
const MAX_NAME_LEN: usize = 64;
/// Kernel bounds for a CFS period (1 ms ..= 1 s) and the smallest quota.
const MIN_PERIOD_US: u64 = 1_000;
const MAX_PERIOD_US: u64 = 1_000_000;
const MIN_QUOTA_US: u64 = 1_000;

/// A job cgroup name is one path component of `[A-Za-z0-9_-]`, so it cannot escape `sandrun/`.
pub(crate) fn validate_name(name: &str) -> Result<(), CgroupError> {
    let well_formed = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if well_formed {
        Ok(())
    } else {
        Err(CgroupError::Invalid {
            what: "job cgroup name",
            detail: format!("{name:?}"),
        })
    }
}

/// Refuses limits the kernel would reject or that mean "unlimited".
pub(crate) fn validate_limits(limits: &CgroupLimits) -> Result<(), CgroupError> {
    let max_signed = u64::try_from(i64::MAX).unwrap_or(u64::MAX);
    let checks = [
        (
            "memory_bytes",
            limits.memory_bytes,
            (1..=max_signed).contains(&limits.memory_bytes),
        ),
        ("pids", u64::from(limits.pids), limits.pids > 0),
        (
            "cpu_period_us",
            limits.cpu_period_us,
            (MIN_PERIOD_US..=MAX_PERIOD_US).contains(&limits.cpu_period_us),
        ),
        (
            "cpu_quota_us",
            limits.cpu_quota_us,
            (MIN_QUOTA_US..=max_signed).contains(&limits.cpu_quota_us),
        ),
    ];
    match checks.iter().find(|(_, _, ok)| !ok) {
        Some((field, value, _)) => Err(CgroupError::Invalid {
            what: "cgroup limit",
            detail: format!("{field}={value}"),
        }),
        None => Ok(()),
    }
}

/// Creates `dirs` (in order), then runs `setup`; if anything fails, removes the directories it
/// created (deepest/last first) and returns the first error.
pub(crate) fn create_with_rollback<T>(
    host: &Host,
    dirs: &[PathBuf],
    setup: impl FnOnce() -> Result<T, CgroupError>,
) -> Result<T, CgroupError> {
    let mut created: Vec<&Path> = Vec::new();
    let mut result = Ok(());
    for dir in dirs {
        result = host
            .fs
            .mkdir(dir)
            .map_err(|e| io_error("create job cgroup", dir, e));
        if result.is_err() {
            break;
        }
        created.push(dir);
    }
    let result = result.and_then(|()| setup());
    if result.is_err() {
        for dir in created.iter().rev() {
            if let Err(e) = host.fs.rmdir(dir) {
                log::warn!(
                    "cannot remove partially created job cgroup path={} error={}",
                    dir.display(),
                    e
                );
            }
        }
    }
    result
}

/// Removes job cgroup directories, last first. A directory that is already gone counts as
/// removed, so a failed `remove` can be retried.
pub(crate) fn remove_dirs(host: &Host, dirs: &[PathBuf]) -> Result<(), CgroupError> {
    for dir in dirs.iter().rev() {
        match host.fs.rmdir(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_error("remove job cgroup", dir, e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Sends SIGKILL to every process listed in `procs` until the file is empty.
///
/// Each round opens a pidfd for every listed pid, then reads the list again and signals only
/// the pidfds whose pid is still listed. A pid that was reused by an unrelated process before
/// its pidfd was opened is then not listed (only the job's own processes are in its cgroup), so
/// the helper never signals a process outside the job. A killed process cannot fork again, and
/// `pids.max` bounds how many there are, so the loop converges without the freezer.
pub(crate) fn kill_by_procs(host: &Host, procs: &Path) -> Result<(), CgroupError> {
    for round in 0..KILL_ROUNDS {
        let listed = host.pids("list job processes", procs)?;
        if listed.is_empty() {
            return Ok(());
        }
        let opened = open_pidfds(&listed)?;
        let still_listed = host.pids("list job processes", procs)?;
        for (pid, pidfd) in &opened {
            if still_listed.contains(pid) {
                send_sigkill(pidfd).map_err(|e| io_error("kill job process", procs, e))?;
            }
        }
        std::thread::sleep(Duration::from_millis(u64::from(round.min(10)) + 1));
    }
    let remaining = host.pids("list job processes", procs)?.len();
    if remaining == 0 {
        Ok(())
    } else {
        Err(CgroupError::KillIncomplete {
            path: procs.to_owned(),
            remaining,
        })
    }
}

/// Kills and removes one stale job cgroup left by a crashed helper.
pub(crate) fn remove_stale(job: &mut dyn JobCgroup) -> Result<(), CgroupError> {
    // A stale cgroup may be partly removed already (a crash between two hierarchies' rmdir, or
    // another helper on the host removing it at the same time): a directory that is not there
    // has no process to kill.
    gone_is_done(job.kill_all())?;
    for _ in 0..EMPTY_ROUNDS {
        if gone_is_done(job.is_empty())?.unwrap_or(true) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    job.remove()
}

/// `Ok(None)` for an I/O error saying the file is not there; the result otherwise.
fn gone_is_done<T>(r: Result<T, CgroupError>) -> Result<Option<T>, CgroupError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn open_pidfds(pids: &[i32]) -> Result<Vec<(i32, OwnedFd)>, CgroupError> {
    let mut opened = Vec::with_capacity(pids.len());
    for &pid in pids {
        match pidfd_open(pid) {
            Ok(fd) => opened.push((pid, fd)),
            // Exited since the list was read.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(io_error("open pidfd", Path::new("pidfd_open"), e)),
        }
    }
    Ok(opened)
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    sys::pidfd_open(pid).map_err(io::Error::from)
}

fn send_sigkill(pidfd: &OwnedFd) -> io::Result<()> {
    match sys::pidfd_kill(pidfd.as_fd()) {
        // ESRCH: the process exited (and may be a zombie) since the pidfd was opened.
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> CgroupLimits {
        CgroupLimits {
            memory_bytes: 64 << 20,
            pids: 16,
            cpu_quota_us: 50_000,
            cpu_period_us: 100_000,
        }
    }

    #[test]
    fn given_names_with_separators_or_dots_when_validated_then_refused() {
        for name in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "job 1",
            "job\n",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(validate_name(name), Err(CgroupError::Invalid { .. })),
                "{name:?} must be refused"
            );
        }
        validate_name("job-17").unwrap();
        validate_name("test-123_4").unwrap();
    }

    #[test]
    fn given_zero_or_out_of_range_limits_when_validated_then_refused() {
        validate_limits(&limits()).unwrap();
        let bad = [
            CgroupLimits {
                memory_bytes: 0,
                ..limits()
            },
            CgroupLimits {
                memory_bytes: u64::MAX,
                ..limits()
            },
            CgroupLimits {
                pids: 0,
                ..limits()
            },
            CgroupLimits {
                cpu_period_us: 999,
                ..limits()
            },
            CgroupLimits {
                cpu_period_us: 1_000_001,
                ..limits()
            },
            CgroupLimits {
                cpu_quota_us: 0,
                ..limits()
            },
        ];
        for bad_limits in bad {
            assert!(
                matches!(
                    validate_limits(&bad_limits),
                    Err(CgroupError::Invalid { .. })
                ),
                "{bad_limits:?} must be refused"
            );
        }
    }
}
