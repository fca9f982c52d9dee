//! Looking at the host from outside the sandboxes: processes, mounts, descriptors, memory.

use std::fs;
use std::ops::Range;
use std::path::Path;
use std::process::Command;

/// The unprivileged user `sandrunctl env build` and `env wheelhouse add` download as.
pub const BUILD_USER: &str = "sandrun-build";

/// Creates [`BUILD_USER`] (a system user with no home and no shell) unless it exists, as the
/// package's sysusers entry would.
pub fn ensure_build_user() {
    if nix::unistd::User::from_name(BUILD_USER)
        .ok()
        .flatten()
        .is_some()
    {
        return;
    }
    let out = Command::new("useradd")
        .args(["--system", "--user-group", "--no-create-home", "--home-dir"])
        .args(["/nonexistent", "--shell", "/usr/sbin/nologin", BUILD_USER])
        .output()
        .expect("run useradd");
    // Exit status 9: created meanwhile by another test.
    assert!(
        out.status.success() || out.status.code() == Some(9),
        "useradd {BUILD_USER}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One field of `/proc/<pid>/status` (`Name`, `PPid`, `Uid`, ...), trimmed; `None` if the process
/// or the field is not there.
pub fn status_field(pid: &str, key: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    field(&status, key).map(str::to_owned)
}

/// Whether every uid (real, effective, saved, filesystem) of `pid` is 0.
pub fn runs_as_root(pid: &str) -> bool {
    status_field(pid, "Uid").is_some_and(|ids| ids.split_whitespace().all(|id| id == "0"))
}

/// Host processes whose real or effective uid is in `uids`, as (pid, uid, name).
pub fn processes_with_uids(uids: &Range<u32>) -> Vec<(i32, u32, String)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(status) = fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let name = field(&status, "Name").unwrap_or_default().to_owned();
        let ids: Vec<u32> = field(&status, "Uid")
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if let Some(uid) = ids.iter().take(2).find(|u| uids.contains(u)) {
            out.push((pid, *uid, name));
        }
    }
    out
}

/// Lines of this process's mountinfo that mention `needle`.
pub fn mounts_mentioning(needle: &str) -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// Number of open descriptors of `pid`. Panics when they cannot be listed (the process is
/// gone): a count of 0 would pass every "no descriptor leaked" bound.
pub fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd: {e}"))
        .count()
}

/// Resident set size of `pid` in KiB. Panics when it cannot be read (see
/// [`crate::hostile::status_kib`]).
pub fn vm_rss_kib(pid: i32) -> u64 {
    crate::hostile::status_kib(pid, "VmRSS")
}

/// Whether `pid` exists on the host.
pub fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then_some(v.trim())
    })
}
