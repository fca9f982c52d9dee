//! Warm sandboxes: a few sandboxes prepared ahead of jobs (namespaces cloned, cgroup joined,
//! root skeleton built; see `sandbox::prepare`), so a job only pays for its own part. Each is
//! used for exactly one job and then destroyed like any other; nothing is ever reused.
//!
//! The loop refills the pool only when it has nothing else to do (see `Server::wait`), so
//! preparing sandboxes never delays a running job's events. This file holds the pool and the
//! `Server`'s part in it (refill, prepare now, empty).

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use sandrun_ipc::JobId;

use super::conn::State;
use super::start::one_cpu;
use super::Server;
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

impl Server {
    /// Prepares a sandbox for job `id` at once (the pool was empty).
    pub(super) fn prepare_now(
        &mut self,
        id: JobId,
        limits: &CgroupLimits,
    ) -> Result<WarmSandbox, String> {
        let name = format!("job-{}", id.0);
        let prepared = prepare(&name, &*self.cgroups, &self.settings, &self.filter, limits);
        prepared.map_err(|f| self.discard(f))
    }

    /// Whether the loop should prepare a sandbox ahead when it is idle. While jobs run, only a
    /// pool down to its last half is refilled: cloning takes most of a millisecond of the loop,
    /// which a job that is about to end would otherwise wait for before its end is reported;
    /// under a steady load the pool still never runs dry.
    pub(super) fn wants_refill(&self, now: Instant) -> bool {
        if self.draining || !self.pool.wants_more(now) {
            return false;
        }
        let running = (self.conns.values())
            .any(|c| matches!(c.state, State::Starting(_) | State::Running(_)));
        !running || self.pool.is_low()
    }

    /// Prepares one sandbox for the pool, with the default limits (each job's own are written
    /// when it starts).
    pub(super) fn refill_one(&mut self) {
        let limits = one_cpu(self.cfg.defaults.memory_bytes, self.cfg.defaults.pids);
        if let Err(f) = self
            .pool
            .fill_one(&*self.cgroups, &self.settings, &self.filter, &limits)
        {
            self.counters.setup_failures += 1;
            let message = self.discard(f);
            log::error!("cannot prepare a warm sandbox; retrying in 1 s error={message}");
            self.pool.pause(Instant::now());
        }
    }

    /// Tears down what a failed preparation left (its cgroup; C is already reaped) and returns
    /// why it failed.
    fn discard(&mut self, failed: Failed) -> String {
        if let Some(cgroup) = failed.cgroup {
            self.teardown(cgroup, None);
        }
        failed.message
    }

    /// Kills the warm sandboxes and removes their cgroups.
    pub(super) fn empty_pool(&mut self) {
        for ws in self.pool.take_all() {
            drop(ws.warm);
            self.teardown(ws.cgroup, None);
        }
    }
}
