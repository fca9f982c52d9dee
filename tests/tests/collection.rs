//! Output collection under attack (issue 9, item 7): a job's collection can never delay another
//! job, names that cannot travel are reported instead of vanishing, and every matched byte counts
//! toward the collection's cap.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandrun_ipc::SkipKind;
use sandrun_tests::{config, Helper, Job};

/// The issue's bound on what another job's collection may add to a trivial job's p99 latency
/// (the walking-collector test; the four-attacker figure is sandrun-bench figure 12).
const P99_BOUND: Duration = Duration::from_millis(50);
/// No time limit on a series of trivial jobs (the hang guard still applies to each).
const LONG: Duration = Duration::from_secs(3600);

/// Held by each test that measures latency, so that one's attackers are not the other's load.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn measuring() -> std::sync::MutexGuard<'static, ()> {
    MEASURING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The attacker of issue 9 item 7 (`sandrun_test_support::HARD_LINK_ATTACKER`).
const ATTACKER: &str = sandrun_test_support::HARD_LINK_ATTACKER;

/// The attacker job; with `collect` false its output pattern matches nothing, so it loads the
/// machine the same way (python, 3,000 links, spawn and teardown) without any collection.
fn attacker(collect: bool) -> Job {
    Job::new(&["/usr/bin/python3", "-c", ATTACKER])
        .output(if collect { "*" } else { "no-such-output" })
        .limits(|l| l.wall_ms = Some(60_000))
}

/// The `percent`-th percentile of `samples` (nearest rank).
fn percentile(samples: &mut [Duration], percent: usize) -> Duration {
    samples.sort();
    let rank = (samples.len() * percent)
        .div_ceil(100)
        .clamp(1, samples.len());
    samples[rank - 1]
}

/// Runs `/bin/echo` `n` times (or until `within` has passed) and returns each run's latency (submit to `Done`).
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

/// What a series of trivial jobs saw while 4 attackers ran.
struct Attacked {
    p99: Duration,
    max: Duration,
    runs: usize,
    /// Attacker jobs that finished while the trivial jobs ran.
    attacks: u32,
}

/// Runs trivial jobs while 4 attacker threads each run [`attacker`]`(collect)` in a loop.
fn under_attackers(helper: &Arc<Helper>, collect: bool) -> Attacked {
    let stop = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicU32::new(0));
    let attackers: Vec<_> = (0..4)
        .map(|_| {
            let (helper, stop, finished) = (helper.clone(), stop.clone(), finished.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let o = helper.run(&attacker(collect));
                    assert_eq!(o.report().exit_code, Some(0), "{}", o.describe());
                    assert!(o.done, "attacker: {}", o.describe());
                    finished.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Let every attacker reach its first collection before measuring.
    std::thread::sleep(Duration::from_secs(3));
    // Measure for at least 200 runs and 4 complete attacker jobs (at most 60 s: the old code
    // needed seconds per run).
    let before = finished.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut samples = Vec::new();
    while (samples.len() < 200 || finished.load(Ordering::Relaxed) - before < 4)
        && start.elapsed() < Duration::from_secs(60)
    {
        samples.extend(trivial_latencies(helper, 1, LONG));
    }
    let attacks = finished.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().expect("attacker thread");
    }
    let p99 = percentile(&mut samples, 99);
    Attacked {
        p99,
        max: samples.last().copied().unwrap_or_default(),
        runs: samples.len(),
        attacks,
    }
}

/// Behaviour only: every trivial job completes, with its `Done`, while four attackers collect
/// (and the measurement overlaps at least four of their collections). How long the trivial jobs
/// take, against the same attackers collecting nothing and against no attacker, is sandrun-bench
/// figure 12: a time bound here flaked with the machine's load.
#[test]
fn given_four_attackers_collecting_hard_links_then_trivial_jobs_keep_completing() {
    let _alone = measuring();
    let helper = Arc::new(Helper::start(&config("")));
    // Warm up (first exec of /bin/echo, page cache).
    trivial_latencies(&helper, 5, LONG);
    let attacked = under_attackers(&helper, true);
    eprintln!(
        "trivial job latency under 4 attackers collecting: p99 {:?} (max {:?}, {} runs, {} \
         attacker collections meanwhile)",
        attacked.p99, attacked.max, attacked.runs, attacked.attacks
    );
    assert!(
        attacked.attacks >= 4,
        "the attackers finished only {} collections while the trivial jobs ran; the \
         measurement did not overlap the attack",
        attacked.attacks
    );
}

/// Two hard links with names that cannot travel, then a good name for the same 3 MiB file
/// (`big`), a small file, bad names of every kind and a file deeper than 32 levels.
const BAD_NAMES: &str = r#"
import os
with open('a\n0', 'wb') as f:
    f.write(b'x' * (3 << 20))
os.link('a\n0', 'a\n1')
os.link('a\n0', 'big')
with open('small', 'wb') as f:
    f.write(b'y')
for name in [b'star*', b'q?', b'back\\slash', b'tab\tx', b'bad\xff']:
    with open(name, 'wb') as f:
        f.write(b'z')
deep = '/'.join(['d'] * 40)
os.makedirs(deep)
with open(deep + '/f', 'wb') as f:
    f.write(b'z')
"#;

#[test]
fn given_bad_names_and_hard_links_then_every_one_is_skipped_by_name_and_counted() {
    let helper = Helper::start(&config(""));
    let job = Job::new(&["/usr/bin/python3", "-c", BAD_NAMES])
        .output("*")
        .limits(|l| l.tmpfs_bytes = Some(8 << 20));
    let o = helper.run(&job);
    assert_eq!(o.report().exit_code, Some(0), "{}", o.describe());
    assert!(o.done, "{}", o.describe());
    let kind_of = |name: &str| {
        o.skipped
            .iter()
            .find(|(p, _)| p.as_str() == name)
            .map(|s| s.1)
    };
    for name in [
        "a\\n0",
        "a\\n1",
        "star*",
        "q?",
        "back\\\\slash",
        "tab\\tx",
        "bad\\xff",
    ] {
        assert_eq!(
            kind_of(name),
            Some(SkipKind::InvalidName),
            "{name}: {}",
            o.describe()
        );
    }
    let at_limit = vec!["d"; sandrun_ipc::MAX_DEPTH].join("/");
    assert_eq!(
        kind_of(&at_limit),
        Some(SkipKind::TooDeep),
        "{}",
        o.describe()
    );
    // 3 + 3 MiB of links that are not returned, then `big` (3 MiB more) is over the 8 MiB cap,
    // and so is everything after it.
    assert_eq!(kind_of("big"), Some(SkipKind::TooLarge), "{}", o.describe());
    assert_eq!(
        kind_of("small"),
        Some(SkipKind::TooLarge),
        "{}",
        o.describe()
    );
    assert!(o.outputs.is_empty(), "{}", o.describe());
}

/// A job leaves two files only root could read (mode 000, owned by the job's uid) and a
/// directory only root could list, next to an ordinary file. Root (with `CAP_DAC_OVERRIDE`)
/// would return all of them; the collector, which has the job's uid and no capability, cannot
/// open them: they are skipped as unreadable, and the ordinary file still comes back.
const ROOT_ONLY: &str = r#"
import os
for name, data in [('secret.txt', b'root would read this'), ('plain.txt', b'fine')]:
    with open(name, 'wb') as f:
        f.write(data)
os.chmod('secret.txt', 0)
os.mkdir('locked')
with open('locked/inner.txt', 'wb') as f:
    f.write(b'inside')
os.chmod('locked', 0)
"#;

#[test]
fn given_files_only_root_could_read_then_the_collector_cannot_open_them() {
    let helper = Helper::start(&config(""));
    let job = Job::new(&["/usr/bin/python3", "-c", ROOT_ONLY])
        .output("*.txt")
        .output("locked/");
    let o = helper.run(&job);
    assert_eq!(o.report().exit_code, Some(0), "{}", o.describe());
    assert!(o.done, "{}", o.describe());
    assert_eq!(
        o.output("plain.txt"),
        Some(&b"fine"[..]),
        "{}",
        o.describe()
    );
    for name in ["secret.txt", "locked/inner.txt"] {
        assert!(
            o.output(name).is_none(),
            "root read {name}: {}",
            o.describe()
        );
    }
    let kind_of = |name: &str| {
        o.skipped
            .iter()
            .find(|(p, _)| p.as_str() == name)
            .map(|s| s.1)
    };
    assert_eq!(
        kind_of("secret.txt"),
        Some(SkipKind::Unreadable),
        "{}",
        o.describe()
    );
    assert_eq!(
        kind_of("locked"),
        Some(SkipKind::Unreadable),
        "{}",
        o.describe()
    );
}

/// A flat directory of 99,000 entries, and 60 patterns that match none of them but must each
/// be tried on every name (so the walk takes a while).
const FLAT_DIR: &str = r#"
import os
os.mkdir('flat')
for i in range(99000):
    open('flat/%06d' % i, 'wb').close()
"#;

fn flat_dir_attacker() -> Job {
    let mut job = Job::new(&["/usr/bin/python3", "-c", FLAT_DIR]).limits(|l| {
        l.file_count = Some(100_000);
        l.wall_ms = Some(60_000);
    });
    for i in 0..60 {
        job = job.output(&format!("flat/**/*q*z*y*x*w.none{i}"));
    }
    job
}

/// `/proc/<pid>/status` of each live output collector whose uid is one of `uids`.
fn collectors(uids: &std::ops::Range<u32>) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("")
                .to_owned()
        };
        let uid = field("Uid:");
        let first = uid
            .split_whitespace()
            .next()
            .and_then(|u| u.parse::<u32>().ok());
        if field("Name:") == "sandrun-collect" && first.is_some_and(|u| uids.contains(&u)) {
            found.push((pid, status));
        }
    }
    found
}

#[test]
fn given_a_long_collection_then_its_collector_is_the_jobs_uid_confined_and_others_are_not_delayed()
{
    let _alone = measuring();
    let helper = Arc::new(Helper::start(&config("")));
    trivial_latencies(&helper, 5, LONG);
    let mut before = trivial_latencies(&helper, 50, LONG);
    let attacker = {
        let helper = helper.clone();
        std::thread::spawn(move || helper.run(&flat_dir_attacker()))
    };
    // Find the collector while it walks (the job itself takes a few seconds to create 99,000
    // files first).
    let start = Instant::now();
    let (pid, status) = loop {
        if let Some(c) = collectors(&helper.slot_uids()).pop() {
            break c;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120) && !attacker.is_finished(),
            "no output collector of this helper's slot uids was ever seen: {}",
            helper.log()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let uid = field("Uid:")[0].to_owned();
    assert_eq!(field("Uid:"), vec![uid.as_str(); 4], "{status}");
    assert_eq!(field("Gid:"), vec![uid.as_str(); 4], "{status}");
    assert!(field("Groups:").is_empty(), "{status}");
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(caps), vec!["0000000000000000"], "{caps} {status}");
    }
    assert_eq!(field("NoNewPrivs:"), vec!["1"], "{status}");
    assert_eq!(field("Seccomp:"), vec!["2"], "{status}");
    // It is charged to the job's cgroup, beneath the helper's own, not to the helper.
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", helper.pid())).unwrap_or_default();
    let memory_of = |text: &str| {
        text.lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_owned()))
            .unwrap_or_default()
    };
    let (theirs, ours) = (memory_of(&cgroups), memory_of(&own));
    let unified = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("")
            .to_owned()
    };
    let (theirs, ours) = if theirs.is_empty() {
        (unified(&cgroups), unified(&own))
    } else {
        (theirs, ours)
    };
    assert!(
        theirs.starts_with(ours.trim_end_matches('/')) && theirs.len() > ours.len(),
        "collector cgroup {theirs:?} is not below the helper's {ours:?}"
    );
    // While it walks, trivial jobs run as fast as ever (the helper's loop is not walking).
    let mut during = Vec::new();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() && during.len() < 100 {
        during.extend(trivial_latencies(&helper, 1, LONG));
    }
    let o = attacker.join().expect("attacker thread");
    let mut after = trivial_latencies(&helper, 50, LONG);
    assert_eq!(o.report().exit_code, Some(0), "{}", o.describe());
    assert!(o.done, "{}", o.describe());
    assert!(o.outputs.is_empty(), "{}", o.describe());
    assert!(
        !during.is_empty(),
        "no trivial job ran while the collector walked"
    );
    // Compared with the same host's load just before and after (other work on a shared host
    // moves absolute figures): the collection adds less than the issue's 50 ms to the p99.
    let control = percentile(&mut before, 99).max(percentile(&mut after, 99));
    let runs = during.len();
    let p99 = percentile(&mut during, 99);
    eprintln!(
        "trivial job latency while a 99,000-entry collection walked: p99 {p99:?} ({runs} runs); \
         without it p99 {control:?}"
    );
    assert!(
        p99 < control + P99_BOUND,
        "trivial job p99 {p99:?} while another job's collection walked ({control:?} without)"
    );
}

/// The collector is its own executable (`sandrun-outputs`), exec'd by the helper: nothing of
/// the root helper's address space (its heap, with other jobs' bundles and stdin) is mapped
/// in it, only the collector binary, shared libraries and the kernel's anonymous regions.
#[test]
fn given_a_collection_then_its_collector_runs_the_collector_binary_with_none_of_the_helpers_memory()
{
    // Its 99,000-entry job must not be the load of another test's latency measurement.
    let _alone = measuring();
    let helper = Arc::new(Helper::start(&config("")));
    let attacker = {
        let helper = helper.clone();
        std::thread::spawn(move || helper.run(&flat_dir_attacker()))
    };
    let collector = sandrun_tests::helper::bin_dir()
        .join("sandrun-outputs")
        .canonicalize()
        .expect("the collector binary exists");
    let start = Instant::now();
    // The collector may exit between being found and being read: look again until one is read.
    let (exe, maps, status) = loop {
        let read = collectors(&helper.slot_uids())
            .pop()
            .and_then(|(pid, status)| {
                let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
                let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
                let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
                (alive && !maps.is_empty()).then_some((exe, maps, status))
            });
        if let Some(found) = read {
            break found;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120) && !attacker.is_finished(),
            "no output collector of this helper's slot uids was ever read: {}",
            helper.log()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(exe, collector, "{status}");
    let helper_exe = std::fs::read_link(format!("/proc/{}/exe", helper.pid())).expect("helper exe");
    for line in maps.lines() {
        // `start-end perms offset dev inode [path]`: the path, if any, is the sixth field.
        let path = line.split_whitespace().nth(5).unwrap_or("");
        assert!(
            !path.contains("sandrund") && std::path::Path::new(path) != helper_exe,
            "the collector maps the helper: {line}\n{maps}"
        );
        let library = path.starts_with('/') && path.contains(".so");
        let kernel = path.is_empty() || path.starts_with('[');
        assert!(
            kernel || library || std::path::Path::new(path) == collector,
            "unexpected mapping in the collector: {line}\n{maps}"
        );
    }
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    eprintln!("collector VmRSS while walking: {rss_kib} KiB");
    let o = attacker.join().expect("attacker thread");
    assert!(o.done, "{}", o.describe());
}

/// A collector executable that a non-root user could have replaced is refused at start-up: the
/// helper exits with an error naming the file rather than ever running it as a collector.
#[test]
fn given_a_group_writable_collector_then_the_helper_refuses_to_start() {
    use std::os::unix::fs::PermissionsExt;
    sandrun_tests::require_root();
    sandrun_tests::ensure_built();
    let bins = sandrun_tests::helper::bin_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    for (bin, mode) in [("sandrund", 0o755), ("sandrun-outputs", 0o775)] {
        let copy = dir.path().join(bin);
        std::fs::copy(bins.join(bin), &copy).expect("copy a binary");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let cfg = config("");
    let cfg_path = dir.path().join("sandrund.toml");
    let text = format!(
        "mount_point = \"{}\"\n{}",
        dir.path().join("root").display(),
        cfg.toml()
    );
    std::fs::write(&cfg_path, text).expect("write the config");
    std::fs::set_permissions(&cfg_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut child = sandrun_tests::retry_while_busy("spawn the copied sandrund", || {
        std::process::Command::new(dir.path().join("sandrund"))
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .arg("--config")
            .arg(&cfg_path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for sandrund") {
            break status;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sandrund started with a group-writable collector");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("sandrun-outputs") && stderr.contains("writable by group or others"),
        "{stderr}"
    );
    assert!(!dir.path().join("s.sock").exists(), "{stderr}");
}

/// A job the helper kills (here at its wall-clock limit) still gets its outputs: the collector
/// runs after the kill, on what the job had written.
#[test]
fn given_a_job_killed_at_its_time_limit_then_its_outputs_are_still_collected() {
    let helper = Helper::start(&config(""));
    let job = Job::new(&["/bin/sh", "-c", "echo partial > out.txt; exec sleep 30"])
        .output("out.txt")
        .limits(|l| l.wall_ms = Some(1500));
    let o = helper.run(&job);
    assert_eq!(
        o.report().reason,
        sandrun_ipc::ExitReason::Timeout,
        "{}",
        o.describe()
    );
    assert!(o.done, "{}", o.describe());
    assert_eq!(
        o.output("out.txt"),
        Some(&b"partial\n"[..]),
        "{}",
        o.describe()
    );
}
