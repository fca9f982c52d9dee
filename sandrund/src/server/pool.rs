//! Warm sandboxes: a few sandboxes prepared ahead of jobs (namespaces cloned, cgroup joined,
//! root skeleton built; see `sandbox::prepare`), so a job only pays for its own part. Each is
//! used for exactly one job and then destroyed like any other; nothing is ever reused.
//!
//! The loop refills the pool only when it has nothing else to do (see `Server::wait`), so
//! preparing sandboxes never delays a running job's events.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use crate::cgroup::{CgroupLimits, CgroupManager, JobCgroup};
use crate::sandbox::{self, seccomp::SeccompProgram, CgroupJoin, SandboxSettings, Warm};

/// How long refilling stops after a failure, so a broken host does not spin the loop.
pub const BACKOFF: Duration = Duration::from_secs(1);

/// A prepared sandbox and the cgroup it has joined.
pub struct WarmSandbox {
    pub warm: Warm,
    pub cgroup: Box<dyn JobCgroup>,
}

/// The prepared sandboxes, oldest (most likely ready) first.
pub struct Pool {
    target: usize,
    ready: VecDeque<WarmSandbox>,
    next: u64,
    paused_until: Option<Instant>,
}

impl Pool {
    pub fn new(target: u32) -> Pool {
        Pool {
            target: target as usize,
            ready: VecDeque::new(),
            next: 0,
            paused_until: None,
        }
    }

    /// Whether the loop should prepare another sandbox now.
    pub fn wants_more(&self, now: Instant) -> bool {
        self.ready.len() < self.target && self.paused_until.is_none_or(|t| now >= t)
    }

    /// Whether at most half of the target is left.
    pub fn is_low(&self) -> bool {
        self.ready.len() * 2 <= self.target
    }

    /// The oldest sandbox that has finished its preparation, or else the oldest one (the job
    /// then waits for the rest of its preparation).
    pub fn take(&mut self) -> Option<WarmSandbox> {
        let i = (self.ready.iter())
            .position(|w| w.warm.is_prepared())
            .unwrap_or(0);
        self.ready.remove(i)
    }

    /// Stops refilling for [`BACKOFF`].
    pub fn pause(&mut self, now: Instant) {
        self.paused_until = Some(now + BACKOFF);
    }

    /// Empties the pool (drain, shutdown); the caller kills and tears them down.
    pub fn take_all(&mut self) -> Vec<WarmSandbox> {
        self.ready.drain(..).collect()
    }

    /// A fresh cgroup name for a sandbox prepared ahead (`job-w<n>`: the prefix makes a crashed
    /// helper's leftovers stale cgroups like any job's).
    fn next_name(&mut self) -> String {
        self.next += 1;
        format!("job-w{}", self.next)
    }

    /// Prepares one sandbox and adds it to the pool.
    pub fn fill_one(
        &mut self,
        cgroups: &dyn CgroupManager,
        settings: &SandboxSettings,
        filter: &SeccompProgram,
        limits: &CgroupLimits,
    ) -> Result<(), Failed> {
        let name = self.next_name();
        let sandbox = prepare(&name, cgroups, settings, filter, limits)?;
        self.ready.push_back(sandbox);
        Ok(())
    }
}

/// A preparation that failed: why, and the cgroup to tear down if it was created (C is already
/// killed and reaped).
pub struct Failed {
    pub message: String,
    pub cgroup: Option<Box<dyn JobCgroup>>,
}

/// Creates cgroup `name` with `limits` and prepares a sandbox in it.
pub fn prepare(
    name: &str,
    cgroups: &dyn CgroupManager,
    settings: &SandboxSettings,
    filter: &SeccompProgram,
    limits: &CgroupLimits,
) -> Result<WarmSandbox, Failed> {
    let cgroup = cgroups.create(name, limits).map_err(|e| Failed {
        message: format!("cgroup: {e}"),
        cgroup: None,
    })?;
    let join: Vec<_> = cgroup.join_fds().iter().map(AsFd::as_fd).collect();
    let how = match cgroup.clone_into() {
        Some(dir) => CgroupJoin::Into(dir),
        None => CgroupJoin::Procs(&join),
    };
    let prepared = sandbox::prepare(settings, filter, how);
    drop(join);
    match prepared {
        Ok(warm) => Ok(WarmSandbox { warm, cgroup }),
        Err(e) => Err(Failed {
            message: e.to_string(),
            cgroup: Some(cgroup),
        }),
    }
}
