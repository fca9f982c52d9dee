//! Per-job cgroups behind one interface, for cgroup v1 (separate memory, pids, cpu and cpuacct
//! hierarchies) and cgroup v2 (one unified hierarchy). The version is detected at runtime from
//! `/proc/self/cgroup` and `/proc/self/mountinfo`; there is no silent fallback: if a controller
//! the sandbox needs is missing, [`detect`] fails.
//!
//! Every function takes its root paths from a [`CgroupLayout`], so the v2 (and v1) code is
//! unit-tested against a fake tree in a temporary directory.

// `root_tests` (tests only) still makes raw calls of its own.
#![cfg_attr(not(test), forbid(unsafe_code))]

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

mod common;
mod fs;
mod parse;
mod v1;
mod v2;

#[cfg(test)]
mod fake_tests;
#[cfg(test)]
#[allow(unsafe_code)]
mod root_tests;

pub use fs::Host;
pub use v1::V1Manager;
pub use v2::V2Manager;
// The tests name these; the helper reaches them through `Host` and the managers.
#[cfg(test)]
pub use fs::{CgroupFs, RealFs};

use parse::{MountEntry, ProcCgroupEntry};

/// Limits applied to one job's cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// memory limit; swap is set to 0 (v1: memsw = memory; v2: memory.swap.max = 0).
    pub memory_bytes: u64,
    /// pids.max
    pub pids: u32,
    /// CPU bandwidth: `quota_us` per `period_us` (v1 cpu.cfs_*; v2 cpu.max).
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
}

/// Usage read from a job's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStats {
    pub cpu_ns: u64,
    pub memory_current_bytes: u64,
    pub memory_peak_bytes: u64,
    /// OOM kills in this cgroup (v1 memory.oom_control oom_kill; v2 memory.events oom_kill).
    pub oom_kills: u64,
    /// Times a fork was refused by pids.max (pids.events max).
    pub pids_max_events: u64,
}

/// Where the hierarchies are and which version they are. Discovered by [`detect`], or built by
/// hand in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupLayout {
    /// v1: the helper's own cgroup directory in each needed controller hierarchy (for example
    /// `/sys/fs/cgroup/memory/<helper's cgroup>`). Job cgroups are created below `<dir>/sandrun`.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
        cpuacct: PathBuf,
    },
    /// v2: the directory under which job cgroups are created (with memory, pids and cpu enabled
    /// in its `cgroup.subtree_control`).
    V2 { base: PathBuf },
}

/// The failure of a cgroup operation, naming the step and the path.
#[derive(Debug)]
#[non_exhaustive]
pub enum CgroupError {
    /// A controller the sandbox needs is not available.
    MissingController {
        controller: &'static str,
        detail: String,
    },
    Io {
        step: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file had unexpected contents.
    Parse { path: PathBuf, detail: String },
    /// The caller asked for something malformed (a job name that is not one safe path
    /// component, a zero or out-of-range limit, a layout of the wrong version).
    Invalid { what: &'static str, detail: String },
    /// Processes were still listed in `path` after every kill round; retry later.
    KillIncomplete { path: PathBuf, remaining: usize },
}

impl std::fmt::Display for CgroupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CgroupError::MissingController { controller, detail } => {
                write!(f, "cgroup controller {controller} unavailable: {detail}")
            }
            CgroupError::Io { step, path, source } => {
                write!(f, "cgroup {step} failed on {}: {source}", path.display())
            }
            CgroupError::Parse { path, detail } => {
                write!(f, "cannot parse {}: {detail}", path.display())
            }
            CgroupError::Invalid { what, detail } => write!(f, "invalid {what}: {detail}"),
            CgroupError::KillIncomplete { path, remaining } => {
                write!(
                    f,
                    "{remaining} processes still in {} after killing",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for CgroupError {}

/// One job's cgroup (one directory per hierarchy on v1).
pub trait JobCgroup {
    /// Files opened `O_WRONLY|O_CLOEXEC` before fork: the sandbox child writes `0` into each to
    /// move itself into the job's cgroup before it unshares its cgroup namespace.
    fn join_fds(&self) -> &[OwnedFd];
    /// The job cgroup's directory fd, where the kernel can create a process directly in it
    /// (`clone3` with `CLONE_INTO_CGROUP`, cgroup v2): no migration afterwards. `None` on v1.
    fn clone_into(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// Replaces the limits (a warm sandbox's cgroup gets the job's limits just before the job
    /// starts). Fails if any limit cannot be written; the cgroup must then not run the job.
    fn set_limits(&mut self, limits: &CgroupLimits) -> Result<(), CgroupError>;
    /// CPU time used so far (the `cpu_ns` of [`JobCgroup::stats`], read alone).
    fn cpu_ns(&self) -> Result<u64, CgroupError>;
    /// Current usage.
    fn stats(&self) -> Result<CgroupStats, CgroupError>;
    /// Kills every process in the cgroup, including double-forked ones (v2 `cgroup.kill`; v1
    /// freeze-free loop of SIGKILL over `cgroup.procs` until empty). With `cgroup.kill` it
    /// returns once the kill is requested: poll [`JobCgroup::is_empty`] (or reap) before
    /// [`JobCgroup::remove`].
    fn kill_all(&self) -> Result<(), CgroupError>;
    /// Whether no process is left.
    fn is_empty(&self) -> Result<bool, CgroupError>;
    /// Removes the cgroup directories. Fails (and may be retried) while processes remain.
    fn remove(&mut self) -> Result<(), CgroupError>;
    /// The job's name (its directories' last component), for [`CgroupManager::remove_dirs`].
    fn name(&self) -> &str;
    /// Records that the directories were removed by [`CgroupManager::remove_dirs`] (in the
    /// cgroup worker), so dropping this is not a leak.
    fn forget(&mut self);
}

/// Creates job cgroups in one layout.
pub trait CgroupManager {
    fn layout(&self) -> &CgroupLayout;
    /// Creates `name` (for example `job-17`) with its limits applied; fails if any limit cannot
    /// be written (and then leaves nothing behind).
    fn create(&self, name: &str, limits: &CgroupLimits) -> Result<Box<dyn JobCgroup>, CgroupError> {
        common::validate_limits(limits)?;
        self.make_dirs(name)?;
        self.adopt_or_remove(name, limits)
    }
    /// [`Self::adopt`], removing the directories if it fails (nothing is left).
    fn adopt_or_remove(
        &self,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<Box<dyn JobCgroup>, CgroupError> {
        self.adopt(name, limits).inspect_err(|_| {
            if let Err(e) = self.remove_dirs(name) {
                log::warn!(
                    "cannot remove a job cgroup whose limits failed cgroup={name} error={e}"
                );
            }
        })
    }
    /// Creates the (empty) directories of job cgroup `name`: the part of [`Self::create`] that
    /// can block behind other cgroup operations of the kernel, so the helper's loop has the
    /// cgroup worker do it (`server/cgroup_worker.rs`). On failure nothing is left.
    fn make_dirs(&self, name: &str) -> Result<(), CgroupError>;
    /// Takes over job cgroup `name`, whose directories [`Self::make_dirs`] created: writes
    /// `limits` and opens what the sandbox needs. On failure the directories are left.
    fn adopt(&self, name: &str, limits: &CgroupLimits) -> Result<Box<dyn JobCgroup>, CgroupError>;
    /// Removes the directories of job cgroup `name` (no process may be left in it); one that
    /// is already gone counts as removed.
    fn remove_dirs(&self, name: &str) -> Result<(), CgroupError>;
    /// Removes job cgroups left behind by an earlier helper that crashed (called at start-up).
    fn cleanup_stale(&self) -> Result<usize, CgroupError>;
}

/// Detects the host's cgroup layout for this process and returns a manager for it. On v2 this
/// prepares the tree (see [`V2Manager::new`]), which may move the helper into a leaf cgroup.
pub fn detect() -> Result<Box<dyn CgroupManager>, CgroupError> {
    let proc_cgroup = read_proc(Path::new("/proc/self/cgroup"))?;
    let mountinfo = read_proc(Path::new("/proc/self/mountinfo"))?;
    let layout = detect_from(&proc_cgroup, &mountinfo, Path::new("/"))?;
    manager_for(layout, Host::real())
}

/// Builds the manager for `layout` on `host` (a fake host in tests).
pub fn manager_for(
    layout: CgroupLayout,
    host: Host,
) -> Result<Box<dyn CgroupManager>, CgroupError> {
    Ok(match layout {
        CgroupLayout::V1 { .. } => Box::new(V1Manager::new(layout, host)?),
        CgroupLayout::V2 { .. } => Box::new(V2Manager::new(layout, host)?),
    })
}

/// Chooses the layout from the texts of `/proc/self/cgroup` and `/proc/self/mountinfo`. Mount
/// points are taken relative to `root` (`/` on a real host, a temporary directory in tests),
/// where the v2 `cgroup.controllers` file is read.
///
/// v2 is chosen when the unified hierarchy is mounted and the helper's cgroup there offers
/// memory, pids and cpu; a hybrid host's empty unified mount is not chosen. Otherwise v1 needs
/// memory, pids, cpu and cpuacct hierarchies; else [`CgroupError::MissingController`].
pub fn detect_from(
    proc_cgroup: &str,
    mountinfo: &str,
    root: &Path,
) -> Result<CgroupLayout, CgroupError> {
    let entries = parse::parse_proc_cgroup(proc_cgroup)?;
    let mounts = parse::parse_mountinfo(mountinfo)?;
    let v2_problem = match unified_helper_dir(&entries, &mounts, root) {
        Ok(helper) => {
            return Ok(CgroupLayout::V2 {
                base: helper.join(common::SANDRUN_DIR),
            })
        }
        Err(problem) => problem,
    };
    let v1_dir = |controller| {
        v1_helper_dir(&entries, &mounts, root, controller).map_err(|detail| {
            CgroupError::MissingController {
                controller,
                detail: format!("{detail}; cgroup v2 is not usable either: {v2_problem}"),
            }
        })
    };
    Ok(CgroupLayout::V1 {
        memory: v1_dir("memory")?,
        pids: v1_dir("pids")?,
        cpu: v1_dir("cpu")?,
        cpuacct: v1_dir("cpuacct")?,
    })
}

/// The helper's cgroup in the unified hierarchy, if that offers every job controller. A helper
/// already in its `helper` leaf (a restart, or systemd's `DelegateSubgroup=helper`) counts as
/// being in the leaf's parent.
fn unified_helper_dir(
    entries: &[ProcCgroupEntry],
    mounts: &[MountEntry],
    root: &Path,
) -> Result<PathBuf, String> {
    let entry = entries
        .iter()
        .find(|e| e.hierarchy_id == 0 && e.controllers.is_empty())
        .ok_or("no unified hierarchy in /proc/self/cgroup")?;
    let mut dir = mounts
        .iter()
        .filter(|m| m.fstype == "cgroup2")
        .find_map(|m| dir_in_mount(root, m, &entry.path))
        .ok_or("no cgroup2 mount shows this process's cgroup")?;
    let controllers_file = dir.join("cgroup.controllers");
    let controllers = std::fs::read_to_string(&controllers_file)
        .map_err(|e| format!("cannot read {}: {e}", controllers_file.display()))?;
    if !parse::has_controllers(&controllers, &v2::CONTROLLERS) {
        return Err(format!(
            "{} offers {:?}, not all of memory, pids and cpu",
            controllers_file.display(),
            controllers.trim()
        ));
    }
    if dir.file_name().is_some_and(|name| name == v2::HELPER_LEAF) {
        dir.pop();
    }
    Ok(dir)
}

/// The helper's cgroup in the v1 hierarchy that has `controller`.
fn v1_helper_dir(
    entries: &[ProcCgroupEntry],
    mounts: &[MountEntry],
    root: &Path,
    controller: &str,
) -> Result<PathBuf, String> {
    let has = |list: &[String]| list.iter().any(|c| c == controller);
    let entry = entries
        .iter()
        .find(|e| e.hierarchy_id != 0 && has(&e.controllers))
        .ok_or_else(|| format!("no v1 {controller} hierarchy in /proc/self/cgroup"))?;
    mounts
        .iter()
        .filter(|m| m.fstype == "cgroup" && has(&m.super_options))
        .find_map(|m| dir_in_mount(root, m, &entry.path))
        .ok_or_else(|| format!("no cgroup mount of {controller} shows this process's cgroup"))
}

/// Where `cgroup_path` (absolute in its hierarchy) is under `mount`, or `None` if that mount
/// only shows another part of the hierarchy. Paths with `..` or `.` are refused.
fn dir_in_mount(root: &Path, mount: &MountEntry, cgroup_path: &str) -> Option<PathBuf> {
    let rel = cgroup_path.strip_prefix(mount.root.trim_end_matches('/'))?;
    if !(rel.is_empty() || rel.starts_with('/')) {
        return None;
    }
    let rel = Path::new(rel.trim_start_matches('/'));
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    let mount_point = mount
        .mount_point
        .strip_prefix("/")
        .unwrap_or(&mount.mount_point);
    Some(root.join(mount_point).join(rel))
}

/// Whether moving a process into a cgroup waits for an RCU grace period here: the kernel
/// offers `favordynmods` (`/sys/kernel/cgroup/features`) and no cgroup hierarchy is mounted
/// with it. Then every write to a `cgroup.procs` takes the global threadgroup lock for writing,
/// which waits for a grace period (several milliseconds on a busy host) with `cgroup_mutex`
/// held. On cgroup v1 every sandbox and every output collector joins its cgroup that way; the
/// collector's join, and that of a sandbox prepared for a waiting job, are on a job's path
/// (docs/operations.md, "cgroup v1 hosts"). A kernel without the features file (before 4.15)
/// or without the option (before 6.0) has no choice to offer: `false`.
pub fn migrations_wait_for_rcu() -> Result<bool, CgroupError> {
    let features = match std::fs::read_to_string("/sys/kernel/cgroup/features") {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(CgroupError::Io {
                step: "read the cgroup features",
                path: "/sys/kernel/cgroup/features".into(),
                source,
            })
        }
    };
    let mountinfo = read_proc(Path::new("/proc/self/mountinfo"))?;
    migrations_wait_for_rcu_in(&features, &mountinfo)
}

fn migrations_wait_for_rcu_in(features: &str, mountinfo: &str) -> Result<bool, CgroupError> {
    let offered = features.lines().any(|l| l.trim() == "favordynmods");
    let favoured = (parse::parse_mountinfo(mountinfo)?.iter())
        .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
        .any(|m| m.super_options.iter().any(|o| o == "favordynmods"));
    Ok(offered && !favoured)
}

fn read_proc(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        step: "detect cgroup layout",
        path: path.to_owned(),
        source,
    })
}
