//! cgroup v1: one directory per job in each of the memory, pids, cpu and cpuacct hierarchies
//! (`<helper's cgroup>/sandrun/<name>`; cpu and cpuacct may be one `cpu,cpuacct` mount, then
//! the job has one directory there).
//!
//! Limits, in the order they are written:
//! 1. `memory.limit_in_bytes` = the limit.
//! 2. `memory.memsw.limit_in_bytes` = the same, so memory + swap cannot exceed it (no swap).
//!    Without swap accounting that file is absent: if the host has swap the job is refused
//!    (`MissingController`); if it has none, `memory.swappiness` = 0 is written and the job
//!    runs. A swap area enabled later is checked at the next `create`, not for running jobs.
//! 3. `memory.oom_control` = 0: the OOM killer stays enabled inside the job.
//! 4. `pids.max`.
//! 5. `cpu.cfs_period_us`, then `cpu.cfs_quota_us`.
//!
//! CPU time comes from `cpuacct.usage`; OOM kills from the `oom_kill` line of
//! `memory.oom_control` (kernel ≥ 4.13; older kernels: `memory.failcnt > 0` counts as one, an
//! over-estimate since it also counts reclaim at the limit).

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use super::common::{self, SANDRUN_DIR, STALE_PREFIX};
use super::fs::Host;
use super::parse;
use super::{CgroupError, CgroupLayout, CgroupLimits, CgroupManager, CgroupStats, JobCgroup};

/// Creates job cgroups in the four v1 hierarchies.
#[derive(Debug)]
pub struct V1Manager {
    layout: CgroupLayout,
    helper: V1Dirs,
    host: Host,
}

/// One directory in each hierarchy (the helper's, the `sandrun/` parent's or a job's).
#[derive(Debug, Clone, PartialEq, Eq)]
struct V1Dirs {
    memory: PathBuf,
    pids: PathBuf,
    cpu: PathBuf,
    cpuacct: PathBuf,
}

impl V1Dirs {
    fn join(&self, rel: impl AsRef<Path>) -> V1Dirs {
        let rel = rel.as_ref();
        V1Dirs {
            memory: self.memory.join(rel),
            pids: self.pids.join(rel),
            cpu: self.cpu.join(rel),
            cpuacct: self.cpuacct.join(rel),
        }
    }

    /// The distinct directories, in the order memory, pids, cpu, cpuacct (shared mounts once).
    fn unique(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::with_capacity(4);
        for dir in [&self.memory, &self.pids, &self.cpu, &self.cpuacct] {
            if !dirs.contains(dir) {
                dirs.push(dir.clone());
            }
        }
        dirs
    }
}

/// Writes `limits` into a job's directories: all of them for a new cgroup (`previous` is
/// `None`), only those that changed otherwise. memsw may never be below memory, so a raise
/// writes memsw first and a cut writes memory first.
fn apply_limits(
    host: &Host,
    job: &V1Dirs,
    limits: &CgroupLimits,
    previous: Option<&CgroupLimits>,
) -> Result<(), CgroupError> {
    let changed = |f: fn(&CgroupLimits) -> u64| previous.is_none_or(|p| f(p) != f(limits));
    if changed(|l| l.memory_bytes) {
        let memory = limits.memory_bytes.to_string();
        let limit_file = job.memory.join("memory.limit_in_bytes");
        if previous.is_some_and(|p| limits.memory_bytes > p.memory_bytes) {
            forbid_swap(host, &job.memory, &memory)?;
            host.write("set memory limit", &limit_file, &memory)?;
        } else {
            host.write("set memory limit", &limit_file, &memory)?;
            forbid_swap(host, &job.memory, &memory)?;
        }
    }
    if previous.is_none() {
        host.write(
            "keep OOM killer on",
            &job.memory.join("memory.oom_control"),
            "0",
        )?;
    }
    if changed(|l| u64::from(l.pids)) {
        host.write(
            "set pids limit",
            &job.pids.join("pids.max"),
            &limits.pids.to_string(),
        )?;
    }
    if changed(|l| l.cpu_period_us) || changed(|l| l.cpu_quota_us) {
        let period = limits.cpu_period_us.to_string();
        host.write(
            "set cpu period",
            &job.cpu.join("cpu.cfs_period_us"),
            &period,
        )?;
        let quota = limits.cpu_quota_us.to_string();
        host.write("set cpu quota", &job.cpu.join("cpu.cfs_quota_us"), &quota)?;
    }
    Ok(())
}

/// memsw = memory when swap accounting exists; otherwise only a host without swap is safe.
fn forbid_swap(host: &Host, memory_dir: &Path, memory: &str) -> Result<(), CgroupError> {
    let memsw = memory_dir.join("memory.memsw.limit_in_bytes");
    if host.exists("check swap accounting", &memsw)? {
        return host.write("set memory+swap limit", &memsw, memory);
    }
    if host.swap_present() {
        return Err(CgroupError::MissingController {
            controller: "memory.memsw",
            detail: format!(
                "{} is absent (swap accounting off) and the host has swap, so a job could \
                 exceed its memory limit in swap; boot with swapaccount=1 or disable swap",
                memsw.display()
            ),
        });
    }
    let swappiness = memory_dir.join("memory.swappiness");
    host.write("set swappiness", &swappiness, "0")
}

impl V1Manager {
    /// A manager for a `CgroupLayout::V1`; creates nothing until the first job.
    pub fn new(layout: CgroupLayout, host: Host) -> Result<Self, CgroupError> {
        let CgroupLayout::V1 {
            memory,
            pids,
            cpu,
            cpuacct,
        } = &layout
        else {
            return Err(CgroupError::Invalid {
                what: "cgroup layout",
                detail: "V1Manager needs a v1 layout".to_owned(),
            });
        };
        let helper = V1Dirs {
            memory: memory.clone(),
            pids: pids.clone(),
            cpu: cpu.clone(),
            cpuacct: cpuacct.clone(),
        };
        Ok(V1Manager {
            layout,
            helper,
            host,
        })
    }

    fn open_join_fds(&self, job: &V1Dirs) -> Result<Vec<OwnedFd>, CgroupError> {
        job.unique()
            .iter()
            .map(|dir| {
                let procs = dir.join("cgroup.procs");
                self.host
                    .fs
                    .open_join(&procs)
                    .map_err(|e| super::fs::io_error("open cgroup.procs", &procs, e))
            })
            .collect()
    }

    fn job(&self, name: &str, join: Vec<OwnedFd>, limits: CgroupLimits) -> V1Job {
        V1Job {
            name: name.to_owned(),
            dirs: self.helper.join(SANDRUN_DIR).join(name),
            join,
            host: self.host.clone(),
            limits,
            removed: false,
        }
    }
}

impl CgroupManager for V1Manager {
    fn layout(&self) -> &CgroupLayout {
        &self.layout
    }

    fn make_dirs(&self, name: &str) -> Result<(), CgroupError> {
        common::validate_name(name)?;
        let parent = self.helper.join(SANDRUN_DIR);
        for dir in parent.unique() {
            self.host.ensure_dir(&dir)?;
        }
        common::create_with_rollback(&self.host, &parent.join(name).unique(), || Ok(()))
    }

    fn adopt(&self, name: &str, limits: &CgroupLimits) -> Result<Box<dyn JobCgroup>, CgroupError> {
        common::validate_name(name)?;
        common::validate_limits(limits)?;
        let dirs = self.helper.join(SANDRUN_DIR).join(name);
        apply_limits(&self.host, &dirs, limits, None)?;
        let join = self.open_join_fds(&dirs)?;
        Ok(Box::new(self.job(name, join, limits.clone())))
    }

    fn remove_dirs(&self, name: &str) -> Result<(), CgroupError> {
        common::validate_name(name)?;
        let dirs = self.helper.join(SANDRUN_DIR).join(name);
        common::remove_dirs(&self.host, &dirs.unique())
    }

    fn cleanup_stale(&self) -> Result<usize, CgroupError> {
        let mut names: Vec<String> = Vec::new();
        for parent in self.helper.join(SANDRUN_DIR).unique() {
            let found = match self.host.fs.subdirs(&parent) {
                Ok(found) => found,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(super::fs::io_error("list stale cgroups", &parent, e)),
            };
            for name in found {
                if name.starts_with(STALE_PREFIX) && !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        let mut first_error = None;
        for name in &names {
            if let Err(e) =
                common::remove_stale(&mut self.job(name, Vec::new(), CgroupLimits::default()))
            {
                log::warn!("cannot remove stale job cgroup cgroup={} error={}", name, e);
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(names.len()), Err)
    }
}

/// One v1 job: a directory in each hierarchy.
#[derive(Debug)]
pub struct V1Job {
    name: String,
    dirs: V1Dirs,
    join: Vec<OwnedFd>,
    host: Host,
    /// The limits in force.
    limits: CgroupLimits,
    removed: bool,
}

impl V1Job {
    fn oom_kills(&self) -> Result<u64, CgroupError> {
        let oom_control = self.dirs.memory.join("memory.oom_control");
        let text = self.host.read("read OOM kills", &oom_control)?;
        if let Some(kills) = parse::keyed_u64(&text, "oom_kill", &oom_control)? {
            return Ok(kills);
        }
        let failcnt = self.dirs.memory.join("memory.failcnt");
        Ok(u64::from(
            self.host.read_u64("read memory failcnt", &failcnt)? > 0,
        ))
    }
}

impl JobCgroup for V1Job {
    fn join_fds(&self) -> &[OwnedFd] {
        &self.join
    }

    fn set_limits(&mut self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        common::validate_limits(limits)?;
        apply_limits(&self.host, &self.dirs, limits, Some(&self.limits))?;
        self.limits = limits.clone();
        Ok(())
    }

    fn cpu_ns(&self) -> Result<u64, CgroupError> {
        let usage = self.dirs.cpuacct.join("cpuacct.usage");
        self.host.read_u64("read cpu usage", &usage)
    }

    fn stats(&self) -> Result<CgroupStats, CgroupError> {
        let (host, dirs) = (&self.host, &self.dirs);
        Ok(CgroupStats {
            cpu_ns: host.read_u64("read cpu usage", &dirs.cpuacct.join("cpuacct.usage"))?,
            memory_current_bytes: host.read_u64(
                "read memory usage",
                &dirs.memory.join("memory.usage_in_bytes"),
            )?,
            memory_peak_bytes: host.read_u64(
                "read memory peak",
                &dirs.memory.join("memory.max_usage_in_bytes"),
            )?,
            oom_kills: self.oom_kills()?,
            pids_max_events: host.read_key(
                "read pids events",
                &dirs.pids.join("pids.events"),
                "max",
            )?,
        })
    }

    /// Every job process joined all hierarchies at once, so the pids hierarchy lists them all.
    fn kill_all(&self) -> Result<(), CgroupError> {
        common::kill_by_procs(&self.host, &self.dirs.pids.join("cgroup.procs"))
    }

    fn is_empty(&self) -> Result<bool, CgroupError> {
        let procs = self.dirs.pids.join("cgroup.procs");
        Ok(self.host.pids("list job processes", &procs)?.is_empty())
    }

    fn remove(&mut self) -> Result<(), CgroupError> {
        common::remove_dirs(&self.host, &self.dirs.unique())?;
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

impl Drop for V1Job {
    fn drop(&mut self) {
        if !self.removed {
            log::warn!(
                "job cgroup dropped without remove(); it is left for cleanup_stale cgroup={}",
                self.dirs.pids.display()
            );
        }
    }
}
