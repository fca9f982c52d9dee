//! Counters and histograms, rendered as Prometheus text for `GET /metrics`.
//!
//! Metrics never carry job contents or client addresses: only statuses, reasons, causes and
//! latencies.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Histogram bucket upper bounds in seconds.
const BUCKETS_S: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS_S.len()],
    count: u64,
    sum_s: f64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (bound, count) in BUCKETS_S.iter().zip(self.counts.iter_mut()) {
            if s <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum_s += s;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS_S.iter().zip(self.counts.iter()) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum_s);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Finished jobs by (status, reason).
    finished: BTreeMap<(&'static str, &'static str), u64>,
    /// Refused requests by cause.
    rejections: BTreeMap<&'static str, u64>,
    submitted: u64,
    /// Requests for the helper's template list (the rest were answered from the cache).
    template_list_fetches: u64,
    spawn: Histogram,
    end_to_end: Histogram,
}

/// Gauges read from the job table at render time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub queued: usize,
    pub running: usize,
    pub finished_held: usize,
    pub memory_used_bytes: u64,
    pub memory_budget_bytes: u64,
    pub uploads_in_progress: usize,
    pub uploads_waiting: usize,
}

/// The gateway's metrics registry.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn new() -> Self {
        Metrics::default()
    }

    pub fn job_submitted(&self) {
        self.with(|m| m.submitted += 1);
    }

    pub fn job_finished(&self, status: &'static str, reason: &'static str, total: Duration) {
        self.with(|m| {
            *m.finished.entry((status, reason)).or_default() += 1;
            m.end_to_end.observe(total);
        });
    }

    pub fn job_spawned(&self, spawn: Duration) {
        self.with(|m| m.spawn.observe(spawn));
    }

    pub fn template_list_fetched(&self) {
        self.with(|m| m.template_list_fetches += 1);
    }

    pub fn template_list_fetches(&self) -> u64 {
        self.with(|m| m.template_list_fetches)
    }

    pub fn rejected(&self, cause: &'static str) {
        self.with(|m| *m.rejections.entry(cause).or_default() += 1);
    }

    pub fn rejections(&self, cause: &str) -> u64 {
        self.with(|m| m.rejections.get(cause).copied().unwrap_or(0))
    }

    /// The Prometheus text exposition.
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::new();
        self.with(|m| {
            render_counters(&mut out, m);
            m.spawn.render(
                &mut out,
                "sandrun_gateway_spawn_seconds",
                "Time from submission to the helper until the job's program started.",
            );
            m.end_to_end.render(
                &mut out,
                "sandrun_gateway_job_seconds",
                "Time from submission to the end of the job.",
            );
        });
        render_gauges(&mut out, gauges);
        out
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        // A panic while holding this lock leaves counters that are still valid numbers.
        let mut guard = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }
}

fn render_counters(out: &mut String, m: &Inner) {
    let _ = writeln!(
        out,
        "# HELP sandrun_gateway_jobs_submitted_total Jobs accepted into the queue."
    );
    let _ = writeln!(out, "# TYPE sandrun_gateway_jobs_submitted_total counter");
    let _ = writeln!(out, "sandrun_gateway_jobs_submitted_total {}", m.submitted);
    let _ = writeln!(
        out,
        "# HELP sandrun_gateway_jobs_finished_total Finished jobs by status and reason."
    );
    let _ = writeln!(out, "# TYPE sandrun_gateway_jobs_finished_total counter");
    for ((status, reason), n) in &m.finished {
        let _ = writeln!(
            out,
            "sandrun_gateway_jobs_finished_total{{status=\"{status}\",reason=\"{reason}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP sandrun_gateway_template_list_fetches_total Requests to the helper for its \
         template list (GET /, GET /environments and submissions share a 2 s cache)."
    );
    let _ = writeln!(
        out,
        "# TYPE sandrun_gateway_template_list_fetches_total counter"
    );
    let _ = writeln!(
        out,
        "sandrun_gateway_template_list_fetches_total {}",
        m.template_list_fetches
    );
    let _ = writeln!(
        out,
        "# HELP sandrun_gateway_rejections_total Refused requests by cause."
    );
    let _ = writeln!(out, "# TYPE sandrun_gateway_rejections_total counter");
    for (cause, n) in &m.rejections {
        let _ = writeln!(
            out,
            "sandrun_gateway_rejections_total{{cause=\"{cause}\"}} {n}"
        );
    }
}

fn render_gauges(out: &mut String, g: Gauges) {
    let gauges: [(&str, &str, u64); 7] = [
        (
            "sandrun_gateway_queue_length",
            "Jobs waiting in the queue.",
            g.queued as u64,
        ),
        (
            "sandrun_gateway_jobs_running",
            "Jobs running in the helper.",
            g.running as u64,
        ),
        (
            "sandrun_gateway_jobs_held",
            "Finished jobs whose results are held.",
            g.finished_held as u64,
        ),
        (
            "sandrun_gateway_memory_used_bytes",
            "Bytes of job data held.",
            g.memory_used_bytes,
        ),
        (
            "sandrun_gateway_memory_budget_bytes",
            "Memory budget for job data.",
            g.memory_budget_bytes,
        ),
        (
            "sandrun_gateway_uploads_in_progress",
            "Uploads being read and expanded.",
            g.uploads_in_progress as u64,
        ),
        (
            "sandrun_gateway_uploads_waiting",
            "Uploads waiting for a slot.",
            g.uploads_waiting as u64,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_events_then_render_has_labelled_counters_and_histograms() {
        let m = Metrics::new();
        m.job_submitted();
        m.job_finished("failed", "timeout", Duration::from_millis(20));
        m.rejected("queue_full");
        m.job_spawned(Duration::from_millis(3));
        let text = m.render(Gauges {
            queued: 4,
            ..Gauges::default()
        });
        assert!(text.contains(
            "sandrun_gateway_jobs_finished_total{status=\"failed\",reason=\"timeout\"} 1"
        ));
        assert!(text.contains("sandrun_gateway_rejections_total{cause=\"queue_full\"} 1"));
        assert!(text.contains("sandrun_gateway_spawn_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("sandrun_gateway_spawn_seconds_bucket{le=\"0.001\"} 0"));
        assert!(text.contains("sandrun_gateway_queue_length 4"));
        assert_eq!(m.rejections("queue_full"), 1);
    }
}
