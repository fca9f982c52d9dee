//! The helper's single thread stays available and bounded whatever one client does: findings of
//! the security review of `sandrund`, each reproduced against the real daemon.

use std::io::{ErrorKind, Write};
use std::time::{Duration, Instant};

use sandrun_ipc::{AdminRequest, AdminResponse, ExitReason, Request, Response, Role};
use sandrun_tests::client::{frame, hello_frame};
use sandrun_tests::host::{fd_count, vm_rss_kib};
use sandrun_tests::{config, Helper, Job};

/// Polls `cond` until it holds; a hang guard, not a timing assertion.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn running(helper: &Helper) -> usize {
    match helper.admin(AdminRequest::List) {
        Response::Admin(AdminResponse::List(l)) => l.len(),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn given_a_client_that_stops_reading_a_thousand_outputs_then_the_helper_holds_no_fd_per_file() {
    let helper = Helper::start(&config("warm_sandboxes = 2"));
    // The baseline counts the warm pool's descriptors too: wait until it is full (it fills
    // after the helper is ready; a baseline taken earlier made this test flaky).
    wait_until("the warm pool to fill", || {
        helper.cgroup().idle_warm_count() == 2
    });
    let baseline = fd_count(helper.pid());
    let job = Job::new(&[
        "/bin/sh",
        "-c",
        "for i in $(seq 1000); do echo $i > f$i.txt; done",
    ])
    .output("*.txt");
    // Submit, then never read: the helper collects the outputs and must stream them lazily.
    let mut stalled = helper.submit(&job);
    stalled.wait_started().expect("job started");
    wait_until("the job to end", || running(&helper) == 0);
    let held = fd_count(helper.pid());
    assert!(
        held <= baseline + 16,
        "helper holds {held} fds with a stalled output stream (baseline {baseline})"
    );
    // Other jobs still start and finish meanwhile.
    let other = helper.run(&Job::new(&["/bin/true"]));
    assert_eq!(other.report().exit_code, Some(0), "{}", other.describe());
    // And the stalled client still gets every file once it reads.
    let outcome = stalled.finish();
    assert!(outcome.done, "{}", outcome.describe());
    assert_eq!(outcome.outputs.len(), 1000);
}

#[test]
fn given_an_admin_flood_that_never_reads_then_the_helper_stops_reading_and_memory_stays_bounded() {
    let helper = Helper::start(&config(""));
    let before = vm_rss_kib(helper.pid());
    let mut stream = helper.raw();
    stream.write_all(&hello_frame(Role::Admin)).expect("hello");
    stream.set_nonblocking(true).expect("non-blocking");
    let stats = frame(&Request::Admin(AdminRequest::Stats));
    let burst: Vec<u8> = stats
        .iter()
        .copied()
        .cycle()
        .take(stats.len() * 4096)
        .collect();
    // Write until the helper has not taken a byte for a whole second (it stopped reading).
    let mut last_progress = Instant::now();
    let mut sent = 0usize;
    while last_progress.elapsed() < Duration::from_secs(1) && sent < (64 << 20) {
        match stream.write(&burst) {
            Ok(n) => {
                sent += n;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    let after = vm_rss_kib(helper.pid());
    assert!(
        after < before + 16 * 1024,
        "helper RSS grew from {before} KiB to {after} KiB after {sent} bytes of requests"
    );
    assert!(
        sent < (64 << 20),
        "the helper kept reading {sent} bytes without replies being read"
    );
    // Everyone else is still served.
    assert!(matches!(
        helper.admin(AdminRequest::Stats),
        Response::Admin(AdminResponse::Stats(_))
    ));
}

#[test]
fn given_pathological_output_patterns_then_other_jobs_limits_are_still_enforced() {
    let helper = Helper::start(&config(""));
    let deep = (0..24)
        .map(|i| format!("d{i}"))
        .collect::<Vec<_>>()
        .join("/");
    let script =
        format!("mkdir -p {deep} && : > {deep}/y && for i in $(seq 500); do : > {deep}/n$i; done");
    let pattern = format!("{}x", "**/".repeat(22));
    let mut nasty = Job::new(&["/bin/sh", "-c", &script]);
    for _ in 0..64 {
        nasty = nasty.output(&pattern);
    }
    let sleeper = Job::new(&["/bin/sleep", "60"]).limits(|l| l.wall_ms = Some(1_000));
    let mut sleeping = helper.submit(&sleeper);
    sleeping.wait_started().expect("sleeper started");
    let nasty_outcome = helper.run(&nasty);
    assert!(nasty_outcome.done, "{}", nasty_outcome.describe());
    let outcome = sleeping.finish();
    let report = outcome.report();
    assert_eq!(report.reason, ExitReason::Timeout, "{}", outcome.describe());
    // The 1 s limit held while the other job's outputs were matched (generous bound: the loop
    // may be busy for at most the collection budget).
    assert!(
        report.wall_ms < 10_000,
        "timeout enforced only after {} ms",
        report.wall_ms
    );
}

/// A client that hangs up while its job's outputs stream to it: the collection ends and the
/// job's cgroup is removed (its slot freed with it), not dropped and left behind.
#[test]
fn given_a_client_that_leaves_while_its_outputs_stream_then_the_jobs_cgroup_is_removed() {
    let helper = Helper::start(&config(""));
    let job = Job::new(&["/bin/sh", "-c", "head -c 16000000 /dev/zero > big.bin"]).output("*.bin");
    let mut conn = helper.submit(&job);
    conn.wait_started().expect("job started");
    wait_until("the job to end", || running(&helper) == 0);
    // The helper is relaying the 16 MB file, at most about 1 MiB ahead of this client, which has
    // not read it: the collection is mid-file when the client goes.
    drop(conn);
    wait_until("the job's cgroup to be removed", || {
        helper.cgroup().job_dirs().is_empty()
    });
    let log = helper.log();
    assert!(!log.contains("dropped without remove"), "{log}");
}

/// The helper's cgroup worker (`sandrund/src/server/cgroup_worker.rs`): its child named
/// `sandrun-cgroups`.
fn cgroup_worker(helper: &Helper) -> Option<i32> {
    let pid = helper.pid();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().find_map(|p| {
        let name = sandrun_tests::host::status_field(p, "Name")?;
        (name == "sandrun-cgroups").then(|| p.parse().ok())?
    })
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal");
}

/// The job cgroups below the helper's test cgroup that are not an idle warm sandbox's, and how
/// many idle warm sandboxes there are.
fn leftover_cgroups(helper: &Helper) -> (Vec<std::path::PathBuf>, usize) {
    let cgroups = helper.cgroup();
    let warm = cgroups.idle_warm_dirs();
    let mut jobs = cgroups.job_dirs();
    jobs.retain(|d| !warm.contains(d));
    (jobs, cgroups.idle_warm_count())
}

#[test]
fn given_a_helper_whose_cgroup_worker_dies_then_jobs_still_run_and_no_job_cgroup_is_left() {
    let helper = Helper::start(&config("warm_sandboxes = 2"));
    let mut worker = None;
    wait_until("the cgroup worker and two warm sandboxes", || {
        worker = cgroup_worker(&helper);
        worker.is_some() && helper.cgroup().idle_warm_count() == 2
    });
    let worker = worker.expect("found");
    // It holds nothing of the helper's: its socket and stderr only.
    assert_eq!(
        fd_count(worker),
        2,
        "the cgroup worker holds more descriptors"
    );
    // Stopped, it answers nothing: the next job's teardown (a removal) and the pool's refill (a
    // directory to make) wait on it when it dies.
    signal(worker, nix::sys::signal::Signal::SIGSTOP);
    let outcome = helper.run(&Job::new(&["/bin/sh", "-c", "echo before"]));
    assert_eq!(outcome.stdout, b"before\n", "{}", outcome.describe());
    wait_until("a warm sandbox's cgroup asked for", || {
        leftover_cgroups(&helper).1 < 2
    });
    std::thread::sleep(Duration::from_millis(300));
    signal(worker, nix::sys::signal::Signal::SIGKILL);
    // Reaped by the helper once it sees the worker's socket close.
    wait_until("the worker reaped", || {
        sandrun_tests::host::status_field(&worker.to_string(), "Name").is_none()
    });
    for i in 0..4 {
        let outcome = helper.run(&Job::new(&["/bin/sh", "-c", &format!("echo {i}")]));
        assert_eq!(
            outcome.stdout,
            format!("{i}\n").as_bytes(),
            "{}",
            outcome.describe()
        );
    }
    assert!(
        helper.log().contains("the cgroup worker failed"),
        "the worker's death was not logged: {}",
        helper.log()
    );
    // Every job's cgroup was removed (on the loop now), and what the worker was asked to make
    // too: only the idle warm sandboxes' are left.
    let clean = sandrun_tests::hostile::eventually(Duration::from_secs(30), || {
        leftover_cgroups(&helper) == (Vec::new(), 2)
    });
    assert!(
        clean,
        "left (not idle warm), idle warm: {:?}\n{}",
        leftover_cgroups(&helper),
        helper.log()
    );
}

#[test]
fn given_a_drain_then_a_stop_while_the_cgroup_worker_is_stuck_then_no_job_cgroup_is_left() {
    let mut helper = Helper::start(&config("warm_sandboxes = 2"));
    let mut worker = None;
    wait_until("the cgroup worker and two warm sandboxes", || {
        worker = cgroup_worker(&helper);
        worker.is_some() && helper.cgroup().idle_warm_count() == 2
    });
    let worker = worker.expect("found");
    signal(worker, nix::sys::signal::Signal::SIGSTOP);
    // The drain kills the warm sandboxes and asks the (stopped) worker to remove their cgroups;
    // the stop must then do it on the loop.
    let drained = helper.admin(AdminRequest::Drain);
    assert!(
        matches!(drained, Response::Admin(AdminResponse::Draining { .. })),
        "{drained:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    signal(helper.pid(), nix::sys::signal::Signal::SIGTERM);
    wait_until("the helper exited", || !helper.is_alive());
    let left = helper.cgroup().job_dirs();
    assert!(
        left.is_empty(),
        "job cgroups left: {left:?}\n{}",
        helper.log()
    );
    assert!(
        sandrun_tests::host::status_field(&worker.to_string(), "Name").is_none(),
        "the worker outlived the helper"
    );
}
