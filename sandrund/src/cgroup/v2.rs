//! cgroup v2: one directory per job at `<helper's cgroup>/sandrun/<name>`.
//!
//! The no-internal-process rule: a non-root cgroup that has processes cannot enable domain
//! controllers (memory, pids) for its children. So [`V2Manager::new`] prepares the tree once:
//! 1. enable `+memory +pids +cpu` in `<helper's cgroup>/cgroup.subtree_control`; if the kernel
//!    answers `EBUSY` because the helper itself is in that cgroup, move the helper into the leaf
//!    `<helper's cgroup>/helper` and retry (under systemd the unit needs `Delegate=yes`, and
//!    `DelegateSubgroup=helper` makes systemd start it in that leaf already);
//! 2. create `<helper's cgroup>/sandrun/` and enable the same controllers in its
//!    `cgroup.subtree_control`, so each job directory below it gets its own limit files.
//!
//! Limits, in the order they are written: `memory.max`; `memory.swap.max` = 0 (if the file is
//! absent, a host with swap refuses the job with `MissingController`, a host without swap runs
//! it); `memory.oom.group` = 1 (an OOM kills the whole job); `pids.max`; `cpu.max` =
//! `"<quota> <period>"`.
//!
//! `memory.peak` needs Linux ≥ 5.19; without it the peak is the largest `memory.current` seen
//! by `stats()`, which can miss a short spike between two reads.

#![forbid(unsafe_code)]

use std::cell::Cell;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::common::{self, STALE_PREFIX};
use super::fs::{io_error, Host};
use super::parse;
use super::{CgroupError, CgroupLayout, CgroupLimits, CgroupManager, CgroupStats, JobCgroup};

/// The controllers a job needs, as `cgroup.controllers` names them.
pub(crate) const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
/// What is written to `cgroup.subtree_control` to enable them.
const ENABLE_CONTROLLERS: &str = "+memory +pids +cpu";
/// The leaf the helper moves itself into when its own cgroup must delegate controllers.
pub(crate) const HELPER_LEAF: &str = "helper";

/// Creates job cgroups under one v2 base directory.
#[derive(Debug)]
pub struct V2Manager {
    layout: CgroupLayout,
    base: PathBuf,
    host: Host,
}

impl V2Manager {
    /// Prepares `CgroupLayout::V2 { base }` (see the module docs): enables the controllers in
    /// the base's parent (the helper's cgroup), creates the base and enables them there.
    pub fn new(layout: CgroupLayout, host: Host) -> Result<Self, CgroupError> {
        let CgroupLayout::V2 { base } = &layout else {
            return Err(invalid_layout("V2Manager needs a v2 layout"));
        };
        let base = base.clone();
        let helper = base
            .parent()
            .ok_or_else(|| invalid_layout("v2 base has no parent"))?;
        enable_controllers(&host, helper, true)?;
        host.ensure_dir(&base)?;
        enable_controllers(&host, &base, false)?;
        Ok(V2Manager { layout, base, host })
    }

    fn job(&self, name: &str, join: Vec<OwnedFd>, dir_fd: Option<OwnedFd>) -> V2Job {
        V2Job {
            name: name.to_owned(),
            dir: self.base.join(name),
            join,
            dir_fd,
            host: self.host.clone(),
            peak_seen: Cell::new(0),
            removed: false,
        }
    }
}

/// Writes `limits` into a job's directory (`memory.max` has no ordering constraint).
fn apply_limits(host: &Host, dir: &Path, limits: &CgroupLimits) -> Result<(), CgroupError> {
    host.write(
        "set memory limit",
        &dir.join("memory.max"),
        &limits.memory_bytes.to_string(),
    )?;
    forbid_swap(host, dir)?;
    host.write("kill whole job on OOM", &dir.join("memory.oom.group"), "1")?;
    host.write(
        "set pids limit",
        &dir.join("pids.max"),
        &limits.pids.to_string(),
    )?;
    let cpu_max = format!("{} {}", limits.cpu_quota_us, limits.cpu_period_us);
    host.write("set cpu quota", &dir.join("cpu.max"), &cpu_max)
}

/// `memory.swap.max` = 0, or a host without swap.
fn forbid_swap(host: &Host, dir: &Path) -> Result<(), CgroupError> {
    let swap_max = dir.join("memory.swap.max");
    if host.exists("check swap controller", &swap_max)? {
        return host.write("forbid swap", &swap_max, "0");
    }
    if host.swap_present() {
        return Err(CgroupError::MissingController {
            controller: "memory.swap",
            detail: format!(
                "{} is absent and the host has swap, so a job could exceed its memory \
                 limit in swap; enable swap accounting or disable swap",
                swap_max.display()
            ),
        });
    }
    Ok(())
}

impl CgroupManager for V2Manager {
    fn layout(&self) -> &CgroupLayout {
        &self.layout
    }

    fn make_dirs(&self, name: &str) -> Result<(), CgroupError> {
        common::validate_name(name)?;
        let dir = self.base.join(name);
        common::create_with_rollback(&self.host, std::slice::from_ref(&dir), || Ok(()))
    }

    fn adopt(&self, name: &str, limits: &CgroupLimits) -> Result<Box<dyn JobCgroup>, CgroupError> {
        common::validate_name(name)?;
        common::validate_limits(limits)?;
        let dir = self.base.join(name);
        apply_limits(&self.host, &dir, limits)?;
        let procs = dir.join("cgroup.procs");
        let join = (self.host.fs.open_join(&procs))
            .map_err(|e| io_error("open cgroup.procs", &procs, e))?;
        let dir_fd = (self.host.fs.open_dir(&dir))
            .map_err(|e| io_error("open the cgroup directory", &dir, e))?;
        Ok(Box::new(self.job(name, vec![join], Some(dir_fd))))
    }

    fn remove_dirs(&self, name: &str) -> Result<(), CgroupError> {
        common::validate_name(name)?;
        common::remove_dirs(&self.host, std::slice::from_ref(&self.base.join(name)))
    }

    fn cleanup_stale(&self) -> Result<usize, CgroupError> {
        let names = self
            .host
            .fs
            .subdirs(&self.base)
            .map_err(|e| io_error("list stale cgroups", &self.base, e))?;
        let stale: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with(STALE_PREFIX))
            .collect();
        let mut first_error = None;
        for name in &stale {
            if let Err(e) = common::remove_stale(&mut self.job(name, Vec::new(), None)) {
                log::warn!("cannot remove stale job cgroup cgroup={} error={}", name, e);
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(stale.len()), Err)
    }
}

/// One v2 job cgroup.
#[derive(Debug)]
pub struct V2Job {
    name: String,
    dir: PathBuf,
    join: Vec<OwnedFd>,
    /// The directory, for `CLONE_INTO_CGROUP`.
    dir_fd: Option<OwnedFd>,
    host: Host,
    /// Largest `memory.current` seen, for kernels without `memory.peak`.
    peak_seen: Cell<u64>,
    removed: bool,
}

impl V2Job {
    fn memory_peak(&self, current: u64) -> Result<u64, CgroupError> {
        let peak_file = self.dir.join("memory.peak");
        let peak = if self.host.exists("check memory.peak", &peak_file)? {
            self.host.read_u64("read memory peak", &peak_file)?
        } else {
            current
        };
        self.peak_seen.set(self.peak_seen.get().max(peak));
        Ok(self.peak_seen.get())
    }
}

impl JobCgroup for V2Job {
    fn join_fds(&self) -> &[OwnedFd] {
        &self.join
    }

    fn clone_into(&self) -> Option<BorrowedFd<'_>> {
        self.dir_fd.as_ref().map(AsFd::as_fd)
    }

    fn set_limits(&mut self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        common::validate_limits(limits)?;
        apply_limits(&self.host, &self.dir, limits)
    }

    fn cpu_ns(&self) -> Result<u64, CgroupError> {
        let stat = self.dir.join("cpu.stat");
        let usage_usec = self.host.read_key("read cpu usage", &stat, "usage_usec")?;
        Ok(usage_usec.saturating_mul(1000))
    }

    fn stats(&self) -> Result<CgroupStats, CgroupError> {
        let (host, dir) = (&self.host, &self.dir);
        let usage_usec = host.read_key("read cpu usage", &dir.join("cpu.stat"), "usage_usec")?;
        let current = host.read_u64("read memory usage", &dir.join("memory.current"))?;
        Ok(CgroupStats {
            cpu_ns: usage_usec.saturating_mul(1000),
            memory_current_bytes: current,
            memory_peak_bytes: self.memory_peak(current)?,
            oom_kills: host.read_key("read OOM kills", &dir.join("memory.events"), "oom_kill")?,
            pids_max_events: host.read_key("read pids events", &dir.join("pids.events"), "max")?,
        })
    }

    /// `cgroup.kill` (Linux ≥ 5.14) kills every process at once; older kernels loop over
    /// `cgroup.procs`.
    fn kill_all(&self) -> Result<(), CgroupError> {
        let kill = self.dir.join("cgroup.kill");
        if self.host.exists("check cgroup.kill", &kill)? {
            return self.host.write("kill job cgroup", &kill, "1");
        }
        common::kill_by_procs(&self.host, &self.dir.join("cgroup.procs"))
    }

    fn is_empty(&self) -> Result<bool, CgroupError> {
        let events = self.dir.join("cgroup.events");
        Ok(self
            .host
            .read_key("read cgroup events", &events, "populated")?
            == 0)
    }

    fn remove(&mut self) -> Result<(), CgroupError> {
        common::remove_dirs(&self.host, std::slice::from_ref(&self.dir))?;
        self.removed = true;
        Ok(())
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn forget(&mut self) {
        self.removed = true;
    }
}

impl Drop for V2Job {
    fn drop(&mut self) {
        if !self.removed {
            log::warn!(
                "job cgroup dropped without remove(); it is left for cleanup_stale cgroup={}",
                self.dir.display()
            );
        }
    }
}

/// Enables the job controllers in `dir/cgroup.subtree_control` unless they already are. With
/// `move_self_if_busy`, an `EBUSY` (this process is inside `dir`) moves the process into the
/// leaf `dir/helper` and retries once.
fn enable_controllers(host: &Host, dir: &Path, move_self_if_busy: bool) -> Result<(), CgroupError> {
    let subtree = dir.join("cgroup.subtree_control");
    let enabled = host.read("read subtree controllers", &subtree)?;
    if parse::has_controllers(&enabled, &CONTROLLERS) {
        return Ok(());
    }
    match host.fs.write(&subtree, ENABLE_CONTROLLERS) {
        Err(e) if move_self_if_busy && e.raw_os_error() == Some(libc::EBUSY) => {
            let leaf = dir.join(HELPER_LEAF);
            host.ensure_dir(&leaf)?;
            host.write(
                "move helper into its leaf cgroup",
                &leaf.join("cgroup.procs"),
                "0",
            )?;
            host.write("enable job controllers", &subtree, ENABLE_CONTROLLERS)
        }
        result => result.map_err(|e| io_error("enable job controllers", &subtree, e)),
    }
}

fn invalid_layout(detail: &str) -> CgroupError {
    CgroupError::Invalid {
        what: "cgroup layout",
        detail: detail.to_owned(),
    }
}
