//! Admin requests (list, kill, stats, drain) and the helper-wide counters the `stats` answer is
//! built from.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, VecDeque};

use sandrun_ipc::{
    AdminRequest, AdminResponse, ErrorCode, ExitReason, ExitReport, JobId, LatencySummary,
    Response, SandboxInfo, Stats,
};

use super::conn::State;
use super::job::Job;
use super::Server;

/// Spawn latency samples kept for the summary.
const LATENCY_SAMPLES: usize = 1024;

/// Helper-wide counters (the admin `stats` answer is built from these).
#[derive(Default)]
pub(super) struct Counters {
    pub jobs_started: u64,
    /// Jobs ended, by [`ExitReason::as_str`].
    by_reason: BTreeMap<&'static str, u64>,
    pub refused_busy: u64,
    pub refused_peer: u64,
    pub protocol_errors: u64,
    pub setup_failures: u64,
    spawn_us: VecDeque<u64>,
}

impl Server {
    pub(super) fn on_admin(&mut self, req: AdminRequest) -> Response {
        let resp = match req {
            AdminRequest::List => AdminResponse::List(self.list()),
            AdminRequest::Kill(id) => return self.admin_kill(id),
            AdminRequest::Stats => AdminResponse::Stats(self.stats()),
            AdminRequest::Drain => {
                self.draining = true;
                self.empty_pool();
                log::info!("draining: no new jobs accepted");
                AdminResponse::Draining {
                    running: self.running(),
                }
            }
        };
        Response::Admin(resp)
    }

    /// Kills a running job, or one starting as soon as it runs (see `JobMeta::cancelled`).
    fn admin_kill(&mut self, id: JobId) -> Response {
        let found = (self.conns.values_mut()).find(|c| match &c.state {
            State::Running(j) => j.id == id,
            State::Starting(s) => s.launch.job.id == id,
            _ => false,
        });
        let Some(conn) = found else {
            return Response::Error(sandrun_ipc::IpcError::new(
                ErrorCode::NotFound,
                format!("no running job {id}"),
            ));
        };
        log::info!("killed by admin job={}", id);
        match &mut conn.state {
            State::Running(job) => job.kill(ExitReason::Cancelled),
            State::Starting(s) => s.launch.job.cancelled = true,
            _ => {}
        }
        Response::Admin(AdminResponse::Killed(id))
    }

    /// The live jobs (see [`Server::live_jobs`]), as `Stats` and `Draining` report them: a job
    /// still receiving its bundle, collecting or streaming its outputs is not finished either,
    /// and an operator waiting for 0 before a restart must not cut it off.
    fn running(&self) -> u32 {
        u32::try_from(self.live_jobs()).unwrap_or(u32::MAX)
    }

    fn list(&self) -> Vec<SandboxInfo> {
        self.conns
            .values()
            .filter_map(|c| match &c.state {
                State::Running(j) => Some(SandboxInfo {
                    job_id: j.id,
                    label: j.label.clone(),
                    uid_slot: j.slot.index,
                    pid: j.pid.0,
                    age_ms: u64::try_from(j.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    cpu_ms: j.last_stats.cpu_ns / 1_000_000,
                    memory_bytes: j.last_stats.memory_current_bytes,
                }),
                _ => None,
            })
            .collect()
    }

    fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            running: self.running(),
            max_concurrent: self.cfg.max_concurrent,
            draining: self.draining,
            jobs_started: c.jobs_started,
            jobs_by_reason: ExitReason::ALL
                .iter()
                .map(|r| (*r, c.by_reason.get(r.as_str()).copied().unwrap_or(0)))
                .collect(),
            refused_busy: c.refused_busy,
            refused_peer: c.refused_peer,
            protocol_errors: c.protocol_errors,
            setup_failures: c.setup_failures,
            spawn_latency: summarize(&c.spawn_us),
            clone3_fallbacks: crate::sandbox::clone3_fallbacks(),
        }
    }

    pub(super) fn record_spawn(&mut self, us: u64) {
        self.counters.jobs_started += 1;
        if self.counters.spawn_us.len() == LATENCY_SAMPLES {
            self.counters.spawn_us.pop_front();
        }
        self.counters.spawn_us.push_back(us);
    }

    /// Counts and logs a job's end.
    pub(super) fn record_end(&mut self, job: &Job, report: &ExitReport) {
        *self
            .counters
            .by_reason
            .entry(report.reason.as_str())
            .or_insert(0) += 1;
        log::info!(
            "job ended job={} label={} reason={} exit_code={:?} signal={:?} cpu_ms={} wall_ms={}",
            job.id,
            job.label,
            report.reason.as_str(),
            report.exit_code,
            report.signal,
            report.cpu_ms,
            report.wall_ms
        );
    }
}

fn summarize(samples: &VecDeque<u64>) -> LatencySummary {
    if samples.is_empty() {
        return LatencySummary::default();
    }
    let mut v: Vec<u64> = samples.iter().copied().collect();
    v.sort_unstable();
    let at = |q: usize| v[(v.len() - 1) * q / 100];
    LatencySummary {
        count: v.len() as u64,
        p50_us: at(50),
        p99_us: at(99),
        max_us: v[v.len() - 1],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_latency_samples_then_percentiles_are_computed() {
        let s: VecDeque<u64> = (1..=100).collect();
        let l = summarize(&s);
        assert_eq!((l.count, l.p50_us, l.p99_us, l.max_us), (100, 50, 99, 100));
        assert_eq!(summarize(&VecDeque::new()), LatencySummary::default());
    }
}
