//! A job's start: from its received bundle to a sandbox that runs it (a warm one, or one
//! prepared now; once more, fresh, if a warm one turns out broken before it got the job), and
//! every way a start fails or is abandoned.

#![forbid(unsafe_code)]

use std::time::Instant;

use sandrun_ipc::{ErrorCode, ExitReason, Response};

use super::conn::{Conn, State, Upload};
use super::job::{Job, JobMeta, Launch, Starting};
use super::pool::WarmSandbox;
use super::Server;
use crate::cgroup::{CgroupLimits, JobCgroup};
use crate::ids::{GroupId, UserId};
use crate::sandbox::{self, JobPlan, SetupStep, StartPoll};

/// CPU bandwidth of one job: one full CPU.
const CPU_PERIOD_US: u64 = 100_000;

/// A sandbox cgroup's limits: `memory_bytes`, `pids` and one full CPU.
pub(super) fn one_cpu(memory_bytes: u64, pids: u32) -> CgroupLimits {
    CgroupLimits {
        memory_bytes,
        pids,
        cpu_quota_us: CPU_PERIOD_US,
        cpu_period_us: CPU_PERIOD_US,
    }
}

impl Server {
    /// The uid and gid of the job in `slot`.
    pub(super) fn slot_ids(&self, slot: super::slots::Slot) -> (UserId, GroupId) {
        let uid = self.cfg.slot_uid_base + slot.index;
        (UserId(uid), GroupId(uid))
    }

    /// The bundle is complete: write the job's order and hand it to a sandbox.
    pub(super) fn start_job(&mut self, conn: &mut Conn, upload: Upload) {
        conn.deadline = None;
        let Upload {
            job,
            id,
            slot,
            data,
        } = upload;
        let job = *job;
        let cgroup_limits = one_cpu(job.limits.memory_bytes, job.limits.pids);
        let (uid, gid) = self.slot_ids(slot);
        // The stdin bytes came last; validation made them part of `bundle_bytes`.
        let split = usize::try_from(job.bundle_bytes.saturating_sub(job.stdin_bytes))
            .unwrap_or(usize::MAX)
            .min(data.len());
        let (bundle_data, stdin) = data.split_at(split);
        let plan = JobPlan {
            argv: job.argv,
            env: job.env,
            workdir: job.workdir,
            uid,
            gid,
            limits: &job.limits,
            bundle: &job.bundle,
            bundle_data,
            stdin,
            template: job.template,
            wheelhouse: job.requirements,
        };
        let order = sandbox::write_order(&plan);
        drop(plan);
        drop(data);
        let meta = JobMeta {
            id,
            label: job.label,
            slot,
            limits: job.limits,
            outputs: job.outputs,
            max_output_files: job.max_output_files,
            collect_budget: job.collect_budget,
            cgroup_limits,
            cancelled: false,
        };
        match order {
            Ok(order) => {
                let warm = self.pool.take();
                self.launch(conn, meta, order, warm);
            }
            Err(e) => self.setup_failed(conn, &meta, &e),
        }
    }

    /// Hands `order` to a warm sandbox, or to one prepared now if there is none (or it turns
    /// out broken before the job had any part in it: then once more, fresh), and leaves the
    /// connection `Starting`: the loop polls the sandbox's control socket from here on.
    fn launch(
        &mut self,
        conn: &mut Conn,
        job: JobMeta,
        order: sandbox::JobOrder,
        mut warm: Option<WarmSandbox>,
    ) {
        loop {
            let was_warm = warm.is_some();
            let ws = match warm.take() {
                Some(ws) => ws,
                None => match self.prepare_now(job.id, &job.cgroup_limits) {
                    Ok(ws) => ws,
                    Err(msg) => {
                        return self.start_refused(conn, &job, ErrorCode::SandboxSetup, msg)
                    }
                },
            };
            let WarmSandbox {
                warm: sb,
                mut cgroup,
            } = ws;
            let cpu_base_ns = match set_job_limits(cgroup.as_mut(), &job.cgroup_limits) {
                Ok(base) => base,
                Err(msg) => {
                    drop(sb);
                    self.teardown(cgroup, None);
                    if was_warm {
                        // Its cgroup broke while it waited (removed by hand, or by another
                        // helper's stale-cgroup cleanup): the job had no part in it.
                        log::warn!("a warm sandbox's cgroup had failed; preparing a fresh one job={} error={}", job.id, msg);
                        self.pool.pause(Instant::now());
                        continue;
                    }
                    return self.start_refused(conn, &job, ErrorCode::SandboxSetup, msg);
                }
            };
            let launch = Launch {
                job,
                order,
                cgroup,
                cpu_base_ns,
                was_warm,
            };
            match sandbox::begin(&self.settings, sb, &launch.order) {
                Ok(sandbox) => conn.state = State::Starting(Box::new(Starting { sandbox, launch })),
                Err(e) => self.start_failed(conn, launch, e),
            }
            return;
        }
    }

    /// The control socket of a starting sandbox is readable: the job runs, or its start failed
    /// (retried in a fresh sandbox if a warm one failed before it got the job).
    pub(super) fn on_starting(&mut self, id: u64) {
        self.with_conn(id, |server, conn| {
            match std::mem::replace(&mut conn.state, State::Closing) {
                State::Starting(s) => {
                    let Starting { sandbox, launch } = *s;
                    match sandbox.poll() {
                        Ok(StartPoll::Pending(sandbox)) => {
                            conn.state = State::Starting(Box::new(Starting { sandbox, launch }));
                        }
                        Ok(StartPoll::Started(spawned)) => server.started(conn, launch, spawned),
                        Err(e) => server.start_failed(conn, launch, e),
                    }
                }
                other => conn.state = other,
            }
        });
    }

    /// J has `execve`d: tell the client and supervise the job.
    fn started(&mut self, conn: &mut Conn, launch: Launch, sb: sandbox::Spawned) {
        let Launch {
            job: meta,
            cgroup,
            cpu_base_ns,
            ..
        } = launch;
        let us = u64::try_from(sb.spawn_time.as_micros()).unwrap_or(u64::MAX);
        self.record_spawn(us);
        log::info!(
            "job started job={} label={} slot={} spawn_us={}",
            meta.id,
            meta.label,
            meta.slot.index,
            us
        );
        conn.send(&Response::Started { spawn_us: us });
        let cancelled = meta.cancelled;
        let mut j = Job::new(meta, cgroup, cpu_base_ns, sb);
        if cancelled || conn.stream.is_none() {
            j.kill(ExitReason::Cancelled);
        }
        conn.state = State::Running(Box::new(j));
    }

    /// A start failed (C reported a step, died, or timed out; C is killed and reaped).
    fn start_failed(&mut self, conn: &mut Conn, launch: Launch, e: sandbox::StartError) {
        self.teardown(launch.cgroup, None);
        if launch.was_warm && !e.prepared {
            log::warn!(
                "a warm sandbox had failed; preparing a fresh one job={} error={}",
                launch.job.id,
                e.error
            );
            self.pool.pause(Instant::now());
            return self.launch(conn, launch.job, launch.order, None);
        }
        self.setup_failed(conn, &launch.job, &e.error);
    }

    /// The job cannot run: `ExecFailed` for the program, `SandboxSetup` for any other step.
    fn setup_failed(&mut self, conn: &mut Conn, meta: &JobMeta, error: &sandbox::SetupError) {
        let code = if error.step == SetupStep::Exec {
            ErrorCode::ExecFailed
        } else {
            ErrorCode::SandboxSetup
        };
        self.start_refused(conn, meta, code, error.to_string());
    }

    /// Frees the slot of a job whose sandbox did not start (nothing of it runs: C, if there
    /// was one, is reaped and its cgroup handed to teardown) and tells the client.
    fn start_refused(&mut self, conn: &mut Conn, meta: &JobMeta, code: ErrorCode, msg: String) {
        self.counters.setup_failures += 1;
        log::error!("sandbox setup failed job={} error={}", meta.id, msg);
        self.slots.free(meta.slot);
        conn.fail(code, msg);
    }

    /// Drops a start in progress (the client went away, broke the protocol, or the helper
    /// stops): kills and reaps C, tears down its cgroup, frees the slot.
    pub(super) fn abandon_start(&mut self, s: Starting) {
        log::info!("sandbox start abandoned job={}", s.launch.job.id);
        drop(s.sandbox);
        self.teardown(s.launch.cgroup, None);
        self.slots.free(s.launch.job.slot);
    }

    /// Starts that have not answered by their deadline fail (`Protocol`, ETIMEDOUT).
    pub(super) fn check_starts(&mut self, now: Instant) {
        let late = |c: &Conn| matches!(&c.state, State::Starting(s) if now >= s.sandbox.deadline());
        self.with_conns(late, |server, conn| {
            if let State::Starting(s) = std::mem::replace(&mut conn.state, State::Closing) {
                let Starting { sandbox, launch } = *s;
                server.start_failed(conn, launch, sandbox.timed_out());
            }
        });
    }
}

/// Writes the job's limits into a (warm) sandbox's cgroup and returns the CPU time the cgroup
/// has used so far, which is not the job's.
fn set_job_limits(cgroup: &mut dyn JobCgroup, limits: &CgroupLimits) -> Result<u64, String> {
    cgroup
        .set_limits(limits)
        .map_err(|e| format!("cgroup: {e}"))?;
    cgroup.cpu_ns().map_err(|e| format!("cgroup: {e}"))
}
