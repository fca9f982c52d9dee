//! Attacks from inside a sandbox, asserting what the kernel and the helper did about them.

use sandrun_ipc::{ExitReason, SkipKind};
use std::time::Duration;

use sandrun_tests::host::{mounts_mentioning, processes_with_uids};
use sandrun_tests::hostile::{eventually, INIT_NAME};
use sandrun_tests::{config, Helper, Job, Outcome};

/// Live (non-zombie) host processes running as one of the helper's slot uids.
fn live_slot_processes(helper: &Helper) -> Vec<(i32, u32, String)> {
    processes_with_uids(&helper.slot_uids())
        .into_iter()
        .filter(|(pid, _, _)| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            !matches!(state, Some('Z') | None)
        })
        .collect()
}

/// Checks that nothing of a finished job runs: at once, no job process is left (the sandbox's
/// init kills and reaps the rest before it reports the end); within a second the init itself
/// (a fork of the helper, named `sandrun-init`, on its way out) is gone too.
fn assert_nothing_of_the_job_left(helper: &Helper) {
    let jobs: Vec<_> = live_slot_processes(helper)
        .into_iter()
        .filter(|(_, _, name)| name != INIT_NAME)
        .collect();
    assert!(jobs.is_empty(), "processes outlived their job: {jobs:?}");
    assert!(
        eventually(Duration::from_secs(1), || live_slot_processes(helper)
            .is_empty()),
        "the sandbox's init outlived its job: {:?}",
        live_slot_processes(helper)
    );
}

fn assert_true_runs(helper: &Helper) {
    let next = helper.run(&Job::new(&["/bin/true"]));
    assert_eq!(
        next.report().exit_code,
        Some(0),
        "next job: {}",
        next.describe()
    );
}

fn reason(o: &Outcome) -> ExitReason {
    o.report().reason
}

#[test]
fn given_fork_bomb_then_pids_limit_stops_it_and_the_next_job_runs() {
    let mut helper = Helper::start(&config(""));
    let job = Job::probe(&["forkbomb"]).limits(|l| {
        l.pids = Some(16);
        l.wall_ms = Some(5_000);
    });
    let outcome = helper.run(&job);
    let r = reason(&outcome);
    assert!(
        r == ExitReason::PidsLimit || r == ExitReason::Timeout,
        "fork bomb ended with {r:?}: {}",
        outcome.describe()
    );
    assert!(helper.is_alive(), "the helper died");
    assert_nothing_of_the_job_left(&helper);
    assert_true_runs(&helper);
}

#[test]
fn given_memory_bomb_then_the_job_ends_with_memory_limit() {
    let helper = Helper::start(&config(""));
    let job = Job::probe(&["membomb", "1024"]).limits(|l| l.memory_bytes = Some(64 << 20));
    let outcome = helper.run(&job);
    assert_eq!(
        reason(&outcome),
        ExitReason::MemoryLimit,
        "{}",
        outcome.describe()
    );
    assert_ne!(
        outcome.report().exit_code,
        Some(0),
        "{}",
        outcome.describe()
    );
    assert_true_runs(&helper);
}

#[test]
fn given_busy_loop_then_the_wall_clock_timeout_ends_it() {
    let helper = Helper::start(&config(""));
    let job = Job::probe(&["spin"]).limits(|l| l.wall_ms = Some(1_500));
    let outcome = helper.run(&job);
    assert_eq!(
        reason(&outcome),
        ExitReason::Timeout,
        "{}",
        outcome.describe()
    );
    assert_eq!(
        outcome.report().signal,
        Some(libc::SIGKILL),
        "{}",
        outcome.describe()
    );
}

#[test]
fn given_busy_loop_with_short_cpu_limit_and_long_wall_then_cpu_limit_ends_it() {
    let helper = Helper::start(&config(""));
    let job = Job::probe(&["spin"]).limits(|l| {
        l.cpu_ms = Some(1_000);
        l.wall_ms = Some(120_000);
    });
    let outcome = helper.run(&job);
    assert_eq!(
        reason(&outcome),
        ExitReason::CpuLimit,
        "{}",
        outcome.describe()
    );
}

#[test]
fn given_double_forked_daemon_then_it_is_killed_when_the_job_ends() {
    let helper = Helper::start(&config(""));
    let outcome = helper.run(&Job::probe(&["daemon"]).output("daemon.pid"));
    assert_eq!(
        outcome.report().exit_code,
        Some(0),
        "{}",
        outcome.describe()
    );
    // The daemon really ran: it wrote its (namespace) pid and uid.
    let pid_file = outcome.output("daemon.pid").expect("daemon.pid returned");
    let text = String::from_utf8_lossy(pid_file);
    let uid: u32 = text
        .split_whitespace()
        .nth(1)
        .and_then(|u| u.parse().ok())
        .expect("uid");
    assert!(
        helper.slot_uids().contains(&uid),
        "daemon uid {uid}: {text}"
    );
    assert_nothing_of_the_job_left(&helper);
}

#[test]
fn given_200_mb_stdout_flood_then_output_is_truncated_at_the_cap_and_status_kept() {
    let helper = Helper::start(&config(""));
    let job = Job::probe(&["flood", "209715200"]).limits(|l| l.output_bytes = Some(1 << 20));
    let outcome = helper.run(&job);
    let cap = outcome.accepted.as_ref().expect("accepted").1.output_bytes;
    assert_eq!(cap, 1 << 20);
    let report = outcome.report();
    assert!(report.stdout_truncated, "{}", outcome.describe());
    assert_eq!(
        outcome.stdout.len() as u64,
        cap,
        "kept stdout must equal the cap"
    );
    assert_eq!(
        report.exit_code,
        Some(3),
        "the exit status was lost: {}",
        outcome.describe()
    );
    assert!(!report.stderr_truncated);
}

#[test]
fn given_job_filling_its_tmpfs_then_it_gets_enospc_and_the_host_is_unaffected() {
    let helper = Helper::start(&config(""));
    let host_tmp_before = nix::sys::statvfs::statvfs("/tmp").expect("statvfs /tmp");
    let job = Job::probe(&["fill"]).limits(|l| l.tmpfs_bytes = Some(256 << 20));
    let outcome = helper.run(&job);
    let r = outcome.probe();
    assert_eq!(r["errno"], libc::ENOSPC, "{r}");
    assert_eq!(r["fs_type"], libc::TMPFS_MAGIC, "/work is not a tmpfs: {r}");
    let granted = outcome.accepted.as_ref().expect("accepted").1.tmpfs_bytes;
    let written = r["bytes"].as_u64().expect("bytes");
    assert!(
        written <= granted,
        "wrote {written} bytes into a {granted}-byte tmpfs"
    );
    // The job's data lived in RAM and is gone: nothing stays mounted under the test directory
    // and host /tmp did not absorb the writes (other tests write a little there meanwhile, far
    // less than half the job's 256 MiB).
    let dir = helper.dir().display().to_string();
    assert!(
        mounts_mentioning(&dir).is_empty(),
        "{:?}",
        mounts_mentioning(&dir)
    );
    let host_tmp_after = nix::sys::statvfs::statvfs("/tmp").expect("statvfs /tmp");
    let before = host_tmp_before.blocks_available() * host_tmp_before.fragment_size();
    let after = host_tmp_after.blocks_available() * host_tmp_after.fragment_size();
    assert!(
        after + (granted / 2) > before,
        "host /tmp lost {} bytes",
        before - after
    );
}

#[test]
fn given_symlink_and_fifo_outputs_then_they_are_refused_without_blocking() {
    let helper = Helper::start(&config(""));
    let script = "ln -s /etc/shadow link.txt && mkfifo fifo.txt && echo ok > real.txt";
    let job = Job::new(&["/bin/sh", "-c", script]).output("*.txt");
    let outcome = helper.run(&job);
    assert_eq!(
        outcome.report().exit_code,
        Some(0),
        "{}",
        outcome.describe()
    );
    assert!(outcome.done, "{}", outcome.describe());
    let kind_of = |name: &str| {
        outcome
            .skipped
            .iter()
            .find(|(p, _)| p.as_str() == name)
            .map(|s| s.1)
    };
    assert_eq!(
        kind_of("link.txt"),
        Some(SkipKind::Symlink),
        "{}",
        outcome.describe()
    );
    assert_eq!(
        kind_of("fifo.txt"),
        Some(SkipKind::Fifo),
        "{}",
        outcome.describe()
    );
    assert_eq!(
        outcome.output("real.txt"),
        Some(&b"ok\n"[..]),
        "{}",
        outcome.describe()
    );
    assert_eq!(outcome.outputs.len(), 1, "{}", outcome.describe());
}

#[test]
fn given_forbidden_syscalls_then_each_is_refused_with_eperm() {
    let helper = Helper::start(&config(""));
    let outcome = helper.run(&Job::probe(&["syscalls"]));
    let r = outcome.probe();
    for name in [
        "unshare",
        "unshare_ns",
        "mount",
        "ptrace",
        "bpf",
        "perf_event_open",
        "io_uring_setup",
        "keyctl",
        "add_key",
        "userfaultfd",
        "tiocsti",
        "tiocsti_high_bits",
        "setns",
        "clone_newuser",
    ] {
        assert_eq!(
            r[name],
            libc::EPERM,
            "{name} was not refused with EPERM: {r}"
        );
    }
    assert_eq!(
        r["clone3"],
        libc::ENOSYS,
        "clone3 must be ENOSYS so libc falls back: {r}"
    );
    for name in ["socket_netlink", "socket_packet"] {
        assert_ne!(r[name], 0, "{name} succeeded: {r}");
    }
}
