//! Soak: 2,000 jobs through the real gateway at concurrency 8, mixing successes, failures,
//! timeouts, memory kills and output floods. Afterwards every job reached its expected final
//! state, the gateway's `/metrics` and the helper's `stats` agree, nothing leaked (processes,
//! cgroups, mounts, helper descriptors, tmpfs memory) and both daemons' RSS is back within 10 %
//! of its level after a 200-job warm-up (or 4 MiB: allocator noise). One test in this binary, so host-wide figures (Shmem)
//! are its own.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use sandrun_tests::config;
use sandrun_tests::host::vm_rss_kib;
use sandrun_tests::hostile::{
    eventually, fd_count_once_at_most, helper_stats, host_shmem_kib, job_cgroups_below,
    live_processes_with_uids, mounts_anywhere_mentioning, raw_https, settled_fd_count,
    tls_client_config,
};
use sandrun_tests::stack::Stack;

const TOTAL_JOBS: usize = 2_000;
const WARMUP_JOBS: usize = 200;
const CONCURRENCY: usize = 8;
/// Daemon RSS may end at most this much above its level after warm-up (the 10 %)...
const RSS_TOLERANCE_PERCENT: u64 = 10;
/// ... or this many KiB, whichever is more: glibc's per-thread arenas make the gateway's RSS
/// wander by a few MiB with no trend (seen in one run: 20.0, 21.8 then 21.0 MiB at 200, 1,100
/// and 2,000 jobs; in another 20.3 -> 22.8 MiB, 12 %, which failed CI). A leak of 2 KiB per job
/// still exceeds it over the 1,800 jobs after warm-up.
const RSS_NOISE_KIB: u64 = 4 << 10;
/// Host `Shmem` (tmpfs pages) may end this much above its start: other processes on the host.
const SHMEM_SLACK_KIB: u64 = 16 << 10;
/// The gateway's per-stream log cap in the stack (its default, 1 MiB).
const LOG_CAP: usize = 1 << 20;

/// The kinds of job in the mix, by `i % 20`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Success,
    ExitCode,
    Timeout,
    MemoryKill,
    Flood,
}

fn kind_of(i: usize) -> Kind {
    match i % 20 {
        0..=13 => Kind::Success,
        14 | 15 => Kind::ExitCode,
        16 => Kind::Timeout,
        17 => Kind::MemoryKill,
        _ => Kind::Flood,
    }
}

/// (script, extra manifest fields) of job `i`.
fn job(i: usize) -> (String, String) {
    match kind_of(i) {
        Kind::Success => (format!("echo ok-{i}"), String::new()),
        Kind::ExitCode => ("echo failing >&2; exit 3".into(), String::new()),
        Kind::Timeout => ("sleep 30".into(), ",\"timeout\":1".into()),
        Kind::MemoryKill => (
            "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo ${#x}".into(),
            ",\"memory_mb\":32".into(),
        ),
        Kind::Flood => (
            "head -c 3000000 /dev/zero | tr '\\0' x".into(),
            String::new(),
        ),
    }
}

/// The final `(status, reason)` each kind must reach.
fn expected(kind: Kind) -> (&'static str, &'static str) {
    match kind {
        Kind::Success | Kind::Flood => ("completed", "none"),
        Kind::ExitCode => ("failed", "none"),
        Kind::Timeout => ("failed", "timeout"),
        Kind::MemoryKill => ("failed", "memory_limit"),
    }
}

/// An HTTPS client of the stack (raw requests, one connection each, never panicking).
struct Client {
    tls: Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
}

impl Client {
    fn request(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        let (status, answer) = raw_https(&self.tls, Ipv4Addr::LOCALHOST, self.addr, &req);
        let json = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .and_then(|p| serde_json::from_slice(&answer[p + 4..]).ok())
            .unwrap_or(Value::Null);
        (status, json)
    }

    fn submit(&self, i: usize) -> Result<String, String> {
        let (script, extra) = job(i);
        let manifest = format!("{{\"entrypoint\":\"run.sh\",\"interpreter\":\"sh\"{extra}}}");
        let body = format!(
            "--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"run.sh\"\r\n\r\n\
             {script}\n\r\n--b\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\r\n\
             {manifest}\r\n--b--\r\n"
        );
        let (status, json) = self.request(
            "POST",
            "/submit",
            "multipart/form-data; boundary=b",
            body.as_bytes(),
        );
        json["job_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or(format!("submit {i}: {status} {json}"))
    }

    /// Polls until the job is final; returns its status document.
    fn wait_final(&self, id: &str) -> Result<Value, String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let (_, status) = self.request("GET", &format!("/status/{id}"), "text/plain", b"");
            if status["status"] == "completed" || status["status"] == "failed" {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(40));
        }
        Err(format!("job {id} never finished"))
    }
}

/// What one job ended as, or why it could not be followed.
type Outcome = Result<(Kind, String, String), String>;

/// Runs job `i` to its end, checks its result against its kind, then deletes it (as a client
/// that fetched its results would) so the gateway holds nothing afterwards.
fn run_job(client: &Client, i: usize) -> Outcome {
    let kind = kind_of(i);
    let id = client.submit(i)?;
    let status = client.wait_final(&id)?;
    let (_, logs) = client.request("GET", &format!("/logs/{id}"), "text/plain", b"");
    client.request("DELETE", &format!("/jobs/{id}"), "text/plain", b"");
    let got = (
        status["status"].as_str().unwrap_or("?").to_owned(),
        status["reason"].as_str().unwrap_or("none").to_owned(),
    );
    let (want_status, want_reason) = expected(kind);
    if (got.0.as_str(), got.1.as_str()) != (want_status, want_reason) {
        return Err(format!("job {i} ({kind:?}) ended {got:?}: {status} {logs}"));
    }
    check_logs(i, kind, &status, &logs)?;
    Ok((kind, got.0, got.1))
}

fn check_logs(i: usize, kind: Kind, status: &Value, logs: &Value) -> Result<(), String> {
    let stdout = logs["stdout"].as_str().unwrap_or_default();
    let ok = match kind {
        Kind::Success => stdout == format!("ok-{i}\n"),
        Kind::ExitCode => status["execution_metadata"]["exit_code"] == 3,
        Kind::Flood => stdout.len() == LOG_CAP && logs["stdout_truncated"] == true,
        Kind::Timeout | Kind::MemoryKill => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "job {i} ({kind:?}) has wrong results: {status} {logs:.200}"
        ))
    }
}

/// Runs jobs `range` with [`CONCURRENCY`] workers; returns every outcome.
fn run_batch(client: &Arc<Client>, range: std::ops::Range<usize>) -> Vec<Outcome> {
    let next = Arc::new(AtomicUsize::new(range.start));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (client, next, outcomes, end) = (
                Arc::clone(client),
                Arc::clone(&next),
                Arc::clone(&outcomes),
                range.end,
            );
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    break;
                }
                let outcome = run_job(&client, i);
                outcomes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(outcome);
            })
        })
        .collect();
    for w in workers {
        w.join().expect("soak worker");
    }
    let mut guard = outcomes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    std::mem::take(&mut *guard)
}

/// `(status, reason) -> count` from the gateway's `jobs_finished_total`, plus `submitted`.
fn gateway_counts(metrics: &str) -> (BTreeMap<(String, String), u64>, u64) {
    let mut finished = BTreeMap::new();
    let mut submitted = 0;
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<u64>() else {
            continue;
        };
        if name == "sandrun_gateway_jobs_submitted_total" {
            submitted = value;
        }
        if let Some(labels) = name.strip_prefix("sandrun_gateway_jobs_finished_total{") {
            let label = |key: &str| {
                labels.split(',').find_map(|kv| {
                    let v = kv.strip_prefix(key)?.strip_prefix("=\"")?;
                    Some(v.trim_end_matches(['}', '"']).to_owned())
                })
            };
            if let (Some(s), Some(r)) = (label("status"), label("reason")) {
                finished.insert((s, r), value);
            }
        }
    }
    (finished, submitted)
}

fn gauge(metrics: &str, name: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn given_2000_mixed_jobs_at_concurrency_8_then_all_finish_counters_agree_and_nothing_leaks() {
    let started = Instant::now();
    let shmem_start = host_shmem_kib();
    let stack = Stack::start(&config(""), "");
    let client = Arc::new(Client {
        tls: tls_client_config(&stack.ca_path()),
        addr: stack.addr(),
    });
    let helper = stack.helper();
    let fds_idle = settled_fd_count(helper.pid());

    let mut outcomes = run_batch(&client, 0..WARMUP_JOBS);
    let rss_warm = (vm_rss_kib(helper.pid()), vm_rss_kib(stack.gateway_pid()));
    // Sampled half-way too, so a failure says whether RSS plateaus or keeps growing.
    let half = (WARMUP_JOBS + TOTAL_JOBS) / 2;
    outcomes.extend(run_batch(&client, WARMUP_JOBS..half));
    let rss_half = (vm_rss_kib(helper.pid()), vm_rss_kib(stack.gateway_pid()));
    outcomes.extend(run_batch(&client, half..TOTAL_JOBS));
    let elapsed = started.elapsed();

    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} jobs went wrong, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(outcomes.len(), TOTAL_JOBS);
    let mut tally: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (_, status, reason) in outcomes.iter().flatten() {
        *tally.entry((status.clone(), reason.clone())).or_default() += 1;
    }

    // The gateway's counters add up and match what the clients saw.
    // Over HTTP/1.1: an HTTP/2 connection's window would be charged while it asks.
    let metrics =
        String::from_utf8_lossy(&stack.curl(&["--http1.1"], "/metrics").body).into_owned();
    let (finished, submitted) = gateway_counts(&metrics);
    assert_eq!(submitted, TOTAL_JOBS as u64, "{metrics}");
    assert_eq!(finished, tally, "gateway metrics vs clients:\n{metrics}");
    assert_eq!(
        gauge(&metrics, "sandrun_gateway_jobs_held"),
        Some(0),
        "{metrics}"
    );
    assert_eq!(
        gauge(&metrics, "sandrun_gateway_memory_used_bytes"),
        Some(0),
        "{metrics}"
    );
    // ... and match the helper's own accounting.
    let stats = helper_stats(helper);
    assert_eq!(stats.jobs_started, TOTAL_JOBS as u64, "{stats:?}");
    let by_reason: BTreeMap<&str, u64> = stats
        .jobs_by_reason
        .iter()
        .map(|(r, n)| (r.as_str(), *n))
        .filter(|(_, n)| *n > 0)
        .collect();
    let mut expected_by_reason: BTreeMap<&str, u64> = BTreeMap::new();
    for ((_, reason), n) in &tally {
        *expected_by_reason.entry(reason.as_str()).or_default() += n;
    }
    assert_eq!(
        by_reason, expected_by_reason,
        "helper stats vs gateway: {stats:?}"
    );
    assert_eq!(stats.running, 0, "{stats:?}");

    assert_nothing_leaked(&stack, fds_idle, shmem_start);
    let rss_end = (vm_rss_kib(helper.pid()), vm_rss_kib(stack.gateway_pid()));
    eprintln!(
        "soak: {TOTAL_JOBS} jobs in {elapsed:?}; tally {tally:?}; RSS (KiB) after {WARMUP_JOBS}, \
         {half} and {TOTAL_JOBS} jobs: helper {} {} {}, gateway {} {} {}; Shmem {shmem_start} \
         -> {} KiB",
        rss_warm.0,
        rss_half.0,
        rss_end.0,
        rss_warm.1,
        rss_half.1,
        rss_end.1,
        host_shmem_kib()
    );
    let within = |warm: u64, end: u64| {
        end * 100 <= warm * (100 + RSS_TOLERANCE_PERCENT) || end <= warm + RSS_NOISE_KIB
    };
    assert!(
        within(rss_warm.0, rss_end.0),
        "helper RSS {} -> {} KiB",
        rss_warm.0,
        rss_end.0
    );
    assert!(
        within(rss_warm.1, rss_end.1),
        "gateway RSS {} -> {} KiB",
        rss_warm.1,
        rss_end.1
    );
}

fn assert_nothing_leaked(stack: &Stack, fds_idle: usize, shmem_start: u64) {
    let helper = stack.helper();
    // The last job's init exits just after reporting.
    eventually(Duration::from_secs(1), || {
        live_processes_with_uids(&helper.slot_uids()).is_empty()
    });
    let procs = live_processes_with_uids(&helper.slot_uids());
    assert!(procs.is_empty(), "slot processes left: {procs:?}");
    let roots = helper.cgroup().dirs().to_vec();
    let gone = eventually(Duration::from_secs(3), || {
        job_cgroups_below(&roots).is_empty()
    });
    assert!(gone, "job cgroups left: {:?}", job_cgroups_below(&roots));
    let mounts = mounts_anywhere_mentioning(&helper.dir().display().to_string());
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    let fds = fd_count_once_at_most(helper.pid(), fds_idle);
    assert!(fds <= fds_idle, "helper descriptors {fds_idle} -> {fds}");
    let mut shmem = host_shmem_kib();
    let settled = eventually(Duration::from_secs(3), || {
        shmem = host_shmem_kib();
        shmem <= shmem_start + SHMEM_SLACK_KIB
    });
    assert!(settled, "tmpfs memory (Shmem) {shmem_start} -> {shmem} KiB");
}
