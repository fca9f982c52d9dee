//! Machine-wide CPU time from `/proc/stat`, the bench cgroup's CPU time from `cpuacct.usage`,
//! and the load average: what a job costs the whole machine (helper, sandbox processes and
//! kernel workers alike), and how busy the machine was meanwhile.

use std::path::{Path, PathBuf};

use crate::env::EnvError;

/// Busy CPU time of the whole machine so far, in milliseconds: user + nice + system + irq +
/// softirq of the `cpu` line of `/proc/stat` (idle, iowait and steal are not work done here;
/// guest time is already part of user).
pub fn machine_busy_ms() -> Result<f64, EnvError> {
    let text = std::fs::read_to_string("/proc/stat").map_err(|e| EnvError {
        step: "reading /proc/stat",
        detail: e.to_string(),
    })?;
    parse_busy_ticks(&text)
        .map(|ticks| ticks * 1000.0 / crate::env::clock_ticks_per_second())
        .ok_or_else(|| EnvError {
            step: "parsing /proc/stat",
            detail: "no aggregate cpu line".into(),
        })
}

/// The busy ticks of the aggregate `cpu` line: fields user, nice, system, (idle, iowait,) irq,
/// softirq.
fn parse_busy_ticks(stat: &str) -> Option<f64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(7)
        .map(str::parse::<f64>)
        .collect::<Result<_, _>>()
        .ok()?;
    match fields.as_slice() {
        [user, nice, system, _idle, _iowait, irq, softirq] => {
            Some(user + nice + system + irq + softirq)
        }
        _ => None,
    }
}

/// The first three fields of `/proc/loadavg` ("1.02 0.80 0.61"), for printing next to figures.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// CPU time charged to a cgroup and its descendants (v1 `cpuacct`), in milliseconds.
#[derive(Debug, Clone)]
pub struct CgroupCpu {
    usage: PathBuf,
}

impl CgroupCpu {
    /// `dir` is a cgroup directory of the `cpuacct` hierarchy.
    pub fn new(dir: &Path) -> Option<CgroupCpu> {
        let usage = dir.join("cpuacct.usage");
        usage.exists().then_some(CgroupCpu { usage })
    }

    pub fn ms(&self) -> Result<f64, EnvError> {
        let text = std::fs::read_to_string(&self.usage).map_err(|e| EnvError {
            step: "reading cpuacct.usage",
            detail: e.to_string(),
        })?;
        let ns: u64 = text.trim().parse().map_err(|e| EnvError {
            step: "parsing cpuacct.usage",
            detail: format!("{}: {e}", self.usage.display()),
        })?;
        // Display only: nanosecond counts far below 2^53 ms.
        #[allow(clippy::cast_precision_loss)]
        let ms = ns as f64 / 1e6;
        Ok(ms)
    }
}

/// CPU spent over an interval, per job: the whole machine's, and the bench cgroup's (which
/// holds the bench, its helper and every sandbox and reference process it starts, but not the
/// kernel workers, nor other work on the machine).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSpent {
    pub machine_ms: f64,
    pub cgroup_ms: Option<f64>,
    pub jobs: usize,
}

impl CpuSpent {
    pub fn add(&mut self, other: CpuSpent) {
        self.machine_ms += other.machine_ms;
        self.cgroup_ms = match (self.cgroup_ms, other.cgroup_ms) {
            (Some(a), Some(b)) => Some(a + b),
            (None, b) if self.jobs == 0 => b,
            _ => None,
        };
        self.jobs += other.jobs;
    }

    pub fn machine_per_job(&self) -> f64 {
        self.machine_ms / crate::usize_as_f64(self.jobs.max(1))
    }

    pub fn cgroup_per_job(&self) -> Option<f64> {
        self.cgroup_ms
            .map(|ms| ms / crate::usize_as_f64(self.jobs.max(1)))
    }
}

/// Runs `f`, which runs `jobs` jobs, and returns what it returned and the CPU spent meanwhile.
pub fn measure<T, E>(
    cgroup: Option<&CgroupCpu>,
    jobs: usize,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<(T, CpuSpent), E>
where
    E: From<EnvError>,
{
    let machine_before = machine_busy_ms()?;
    let cgroup_before = cgroup.map(CgroupCpu::ms).transpose()?;
    let value = f()?;
    let machine_after = machine_busy_ms()?;
    let cgroup_after = cgroup.map(CgroupCpu::ms).transpose()?;
    let cgroup_ms = match (cgroup_before, cgroup_after) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok((
        value,
        CpuSpent {
            machine_ms: machine_after - machine_before,
            cgroup_ms,
            jobs,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_proc_stat_then_busy_is_user_nice_system_irq_softirq() {
        let stat = "cpu  100 2 30 5000 7 1 4 9 0 0\ncpu0 50 1 15 2500 3 0 2 4 0 0\n";
        assert_eq!(parse_busy_ticks(stat), Some(137.0));
        assert_eq!(parse_busy_ticks("cpu0 1 2 3 4 5 6 7\n"), None);
        assert_eq!(parse_busy_ticks("cpu  1 2 3\n"), None);
    }

    #[test]
    fn given_two_intervals_then_their_cpu_adds_up_per_job() {
        let mut total = CpuSpent::default();
        total.add(CpuSpent {
            machine_ms: 30.0,
            cgroup_ms: Some(20.0),
            jobs: 10,
        });
        total.add(CpuSpent {
            machine_ms: 50.0,
            cgroup_ms: Some(40.0),
            jobs: 10,
        });
        assert_eq!(total.machine_per_job(), 4.0);
        assert_eq!(total.cgroup_per_job(), Some(3.0));
    }
}
