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

use super::cgroup_worker::{NotSent, Op};
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

/// The prepared sandboxes, oldest (most likely ready) first, and the cgroup directories the
/// cgroup worker made for the next ones.
pub struct Pool {
    target: usize,
    ready: VecDeque<WarmSandbox>,
    next: u64,
    paused_until: Option<Instant>,
    /// Job cgroups whose (empty) directories exist, for the next sandboxes.
    made: Vec<String>,
    /// Directories the worker has been asked to make and has not answered.
    making: usize,
}

impl Pool {
    pub fn new(target: u32) -> Pool {
        Pool {
            target: target as usize,
            ready: VecDeque::new(),
            next: 0,
            paused_until: None,
            made: Vec::new(),
            making: 0,
        }
    }

    /// Whether the loop should prepare another sandbox now: the pool is short and there is
    /// something to do about it (a made directory to use, one to ask the worker for, or no
    /// worker).
    pub fn wants_more(&self, now: Instant, worker: bool) -> bool {
        let short = self.ready.len() < self.target && self.paused_until.is_none_or(|t| now >= t);
        short && (!worker || !self.made.is_empty() || self.ready.len() + self.making < self.target)
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

    /// Empties the pool (drain, shutdown); the caller kills and tears them down, and removes
    /// the made directories.
    pub fn take_all(&mut self) -> (Vec<WarmSandbox>, Vec<String>) {
        (
            self.ready.drain(..).collect(),
            std::mem::take(&mut self.made),
        )
    }

    /// A fresh cgroup name for a sandbox prepared ahead (`job-w<n>`: the prefix makes a crashed
    /// helper's leftovers stale cgroups like any job's).
    fn next_name(&mut self) -> String {
        self.next += 1;
        format!("job-w{}", self.next)
    }
}

/// A preparation that failed: why, and the cgroup to tear down if it was created (C is already
/// killed and reaped).
pub struct Failed {
    pub message: String,
    pub cgroup: Option<Box<dyn JobCgroup>>,
}

/// Where a sandbox's cgroup comes from.
enum Cgroup {
    /// Created now, on the loop.
    Create(String),
    /// Made by the cgroup worker; its directories exist.
    Made(String),
}

/// Creates (or takes over) the cgroup with `limits` and prepares a sandbox in it.
fn prepare(
    cgroup: Cgroup,
    cgroups: &dyn CgroupManager,
    settings: &SandboxSettings,
    filter: &SeccompProgram,
    limits: &CgroupLimits,
) -> Result<WarmSandbox, Failed> {
    let created = match &cgroup {
        Cgroup::Create(name) => cgroups.create(name, limits),
        Cgroup::Made(name) => cgroups.adopt_or_remove(name, limits),
    };
    let cgroup = created.map_err(|e| Failed {
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
    /// Prepares a sandbox for job `id` at once (the pool was empty), in a cgroup the worker
    /// made if there is one.
    pub(super) fn prepare_now(
        &mut self,
        id: JobId,
        limits: &CgroupLimits,
    ) -> Result<WarmSandbox, String> {
        let cgroup = match self.pool.made.pop() {
            Some(name) => Cgroup::Made(name),
            None => Cgroup::Create(format!("job-{}", id.0)),
        };
        let prepared = prepare(cgroup, &*self.cgroups, &self.settings, &self.filter, limits);
        prepared.map_err(|f| self.discard(f))
    }

    /// Whether the loop should prepare a sandbox ahead when it is idle. While jobs run, only a
    /// pool down to its last half is refilled: cloning takes most of a millisecond of the loop,
    /// which a job that is about to end would otherwise wait for before its end is reported;
    /// under a steady load the pool still never runs dry.
    pub(super) fn wants_refill(&self, now: Instant) -> bool {
        if self.draining || !self.pool.wants_more(now, self.cgroup_worker.is_some()) {
            return false;
        }
        let running = (self.conns.values())
            .any(|c| matches!(c.state, State::Starting(_) | State::Running(_)));
        !running || self.pool.is_low()
    }

    /// One step towards a full pool, with the default limits (each job's own are written when
    /// it starts): a sandbox in a cgroup the worker made; else the worker is asked for the
    /// directories still missing; without a worker, a cgroup created on the loop.
    pub(super) fn refill_one(&mut self) {
        let cgroup = match (self.pool.made.pop(), self.cgroup_worker.as_mut()) {
            (Some(name), _) => Cgroup::Made(name),
            (None, Some(worker)) => {
                let pool = &mut self.pool;
                let name = pool.next_name();
                match worker.send(Op::Make, &name) {
                    Ok(()) => {
                        pool.making += 1;
                        return;
                    }
                    // This one on the loop; the worker stays.
                    Err(NotSent::Full) => Cgroup::Create(name),
                    Err(NotSent::Gone(gone)) => {
                        self.cgroup_worker_failed(&gone);
                        return;
                    }
                }
            }
            (None, None) => Cgroup::Create(self.pool.next_name()),
        };
        let limits = one_cpu(self.cfg.defaults.memory_bytes, self.cfg.defaults.pids);
        match prepare(
            cgroup,
            &*self.cgroups,
            &self.settings,
            &self.filter,
            &limits,
        ) {
            Ok(sandbox) => self.pool.ready.push_back(sandbox),
            Err(f) => {
                self.counters.setup_failures += 1;
                let message = self.discard(f);
                log::error!("cannot prepare a warm sandbox; retrying in 1 s error={message}");
                self.pool.pause(Instant::now());
            }
        }
    }

    /// The worker made (or failed to make) the directories of cgroup `name` for the pool.
    pub(super) fn made(&mut self, name: String, error: Option<String>) {
        self.pool.making = self.pool.making.saturating_sub(1);
        match error {
            Some(e) => {
                self.counters.setup_failures += 1;
                log::error!("cannot create a job cgroup; retrying in 1 s error={e}");
                self.pool.pause(Instant::now());
            }
            None if self.draining
                || self.pool.ready.len() + self.pool.made.len() >= self.pool.target =>
            {
                self.remove_unused(name);
            }
            None => self.pool.made.push(name),
        }
    }

    /// Removes the directories of a cgroup nothing ever joined (through the worker if there is
    /// one).
    fn remove_unused(&mut self, name: String) {
        if let Some(worker) = self.cgroup_worker.as_mut() {
            if worker.send(Op::Remove, &name).is_ok() {
                return;
            }
        }
        self.remove_unused_now(&name);
    }

    /// Removes the directories of a cgroup nothing ever joined, on the loop.
    fn remove_unused_now(&self, name: &str) {
        if let Err(e) = self.cgroups.remove_dirs(name) {
            log::warn!("cannot remove an unused job cgroup cgroup={name} error={e}");
        }
    }

    /// The worker is gone: what it was asked to make may exist, and what it was asked to
    /// remove for no teardown (an unused directory) may not be gone; both are removed on the
    /// loop.
    pub(super) fn unused_abandoned(&mut self, names: Vec<String>) {
        self.pool.making = 0;
        for name in names {
            self.remove_unused_now(&name);
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

    /// Kills the warm sandboxes and removes their cgroups and the directories made for more.
    pub(super) fn empty_pool(&mut self) {
        let (ready, made) = self.pool.take_all();
        for ws in ready {
            drop(ws.warm);
            self.teardown(ws.cgroup, None);
        }
        for name in made {
            self.remove_unused(name);
        }
    }
}
