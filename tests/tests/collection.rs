//! Output collection under attack (issue 9, item 7): a job's collection can never delay another
//! job, names that cannot travel are reported instead of vanishing, and every matched byte counts
//! toward the collection's cap.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandrun_tests::{config, Helper, Job};

/// The issue's bound on a trivial job's p99 latency while attackers collect.
const P99_BOUND: Duration = Duration::from_millis(50);
/// No time limit on a series of trivial jobs (the hang guard still applies to each).
const LONG: Duration = Duration::from_secs(3600);

/// A job that leaves one 200 MiB (sparse) file and 3,000 hard links to it whose names cannot
/// travel (`a\n<i>`), a few more with `*`, `?`, `\`, tab and invalid UTF-8, a file deeper than
/// 32 levels, and four links with good names (so collection has something to hash).
const ATTACKER: &str = r#"
import os
fd = os.open('big', os.O_CREAT | os.O_WRONLY, 0o644)
os.ftruncate(fd, 200 << 20)
os.close(fd)
for i in range(3000):
    os.link('big', 'a\n%d' % i)
for i in range(4):
    os.link('big', '0ok%d' % i)
for name in [b'star*', b'q?', b'back\\slash', b'tab\tx', b'bad\xff']:
    os.link(b'big', name)
deep = '/'.join(['d'] * 40)
os.makedirs(deep)
os.link('big', deep + '/f')
"#;

fn attacker() -> Job {
    Job::new(&["/usr/bin/python3", "-c", ATTACKER])
        .output("*")
        .limits(|l| l.wall_ms = Some(60_000))
}

/// The `q`-quantile of `samples` (nearest rank).
fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

/// Runs `/bin/echo` `n` times (or until `within` has passed: the old code needed seconds per
/// run) and returns each run's latency (submit to `Done`).
fn trivial_latencies(helper: &Helper, n: usize, within: Duration) -> Vec<Duration> {
    let start = Instant::now();
    let mut out = Vec::with_capacity(n);
    while out.len() < n && start.elapsed() < within {
        let t = Instant::now();
        let o = helper.run(&Job::new(&["/bin/echo", "hi"]));
        out.push(t.elapsed());
        assert_eq!(o.report().exit_code, Some(0), "{}", o.describe());
        assert!(o.done, "{}", o.describe());
    }
    out
}

#[test]
fn given_four_attackers_collecting_hard_links_then_a_trivial_jobs_p99_stays_low() {
    let helper = Arc::new(Helper::start(&config(460, "")));
    // Warm up (first exec of /bin/echo, page cache), then the control without attackers.
    trivial_latencies(&helper, 5, LONG);
    let mut control = trivial_latencies(&helper, 60, LONG);
    let control_p99 = quantile(&mut control, 0.99);

    let stop = Arc::new(AtomicBool::new(false));
    let collections = Arc::new(AtomicU32::new(0));
    let attackers: Vec<_> = (0..4)
        .map(|_| {
            let (helper, stop, collections) = (helper.clone(), stop.clone(), collections.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let o = helper.run(&attacker());
                    assert_eq!(o.report().exit_code, Some(0), "{}", o.describe());
                    assert!(o.done, "attacker: {}", o.describe());
                    collections.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Let every attacker reach its first collection before measuring.
    std::thread::sleep(Duration::from_secs(3));
    let before = collections.load(Ordering::Relaxed);
    let mut attacked = trivial_latencies(&helper, 100, Duration::from_secs(40));
    let during = collections.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().expect("attacker thread");
    }
    let attacked_p99 = quantile(&mut attacked, 0.99);
    let attacked_max = attacked.last().copied().unwrap_or_default();
    eprintln!(
        "trivial job latency: control p99 {control_p99:?}; under 4 attackers p99 \
         {attacked_p99:?}, max {attacked_max:?}; {during} attacker collections meanwhile"
    );
    assert!(
        during >= 4,
        "the attackers finished only {during} collections while the trivial jobs ran; \
         the measurement did not overlap the attack"
    );
    // The issue's bound is 50 ms; on a machine whose own p99 is higher, twice that.
    let bound = P99_BOUND.max(control_p99 * 2);
    assert!(
        attacked_p99 < bound,
        "trivial job p99 {attacked_p99:?} under attack (bound {bound:?}, control p99 \
         {control_p99:?})"
    );
}
