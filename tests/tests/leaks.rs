//! Nothing outlives its job: 500 sequential jobs leave no cgroup, mount, process, descriptor or
//! memory growth behind. (One test in this binary, so the host-wide mount count is stable.)

use std::time::Duration;

use sandrun_tests::host::{mounts_mentioning, processes_with_uids, vm_rss_kib};
use sandrun_tests::hostile::{eventually, fd_count_once_at_most, settled_fd_count};
use sandrun_tests::{config, Helper, Job};

const WARMUP_JOBS: usize = 50;
const TOTAL_JOBS: usize = 500;
/// RSS growth allowed between job 50 and job 500 (allocator noise, not a per-job leak).
const RSS_SLACK_KIB: u64 = 2048;

fn run_true(helper: &Helper, n: usize) {
    let job = Job::new(&["/bin/true"]);
    for i in 0..n {
        let outcome = helper.run(&job);
        assert!(outcome.done, "job {i}: {}", outcome.describe());
        assert_eq!(
            outcome.report().exit_code,
            Some(0),
            "job {i}: {}",
            outcome.describe()
        );
    }
}

/// The leak checks below look in the right places: while a job runs, its cgroup and its
/// processes are visible there.
fn checks_see_a_running_job(helper: &Helper) {
    let mut job = helper.submit(&Job::new(&["/bin/sleep", "300"]));
    job.wait_started().expect("sleeping job started");
    assert!(
        !helper.cgroup().job_dirs().is_empty(),
        "no job cgroup found while a job runs"
    );
    let procs = processes_with_uids(&helper.slot_uids());
    assert!(
        !procs.is_empty(),
        "no slot-uid process found while a job runs"
    );
    job.cancel();
    let outcome = job.finish();
    assert!(outcome.done, "{}", outcome.describe());
}

fn host_mount_count() -> usize {
    mounts_mentioning("").len()
}

#[test]
fn given_500_sequential_jobs_then_no_cgroup_mount_process_fd_or_memory_leaks() {
    let helper = Helper::start(&config(""));
    checks_see_a_running_job(&helper);
    let dir = helper.dir().display().to_string();
    let mounts_at_start = mounts_mentioning(&dir);
    run_true(&helper, WARMUP_JOBS);
    let fds_after_warmup = settled_fd_count(helper.pid());
    let rss_after_warmup = vm_rss_kib(helper.pid());
    let host_mounts_after_warmup = host_mount_count();

    run_true(&helper, TOTAL_JOBS - WARMUP_JOBS);

    // The last job's init exits just after reporting; its cgroup goes when it is reaped.
    let gone = eventually(Duration::from_secs(1), || {
        helper.cgroup().job_dirs().is_empty() && processes_with_uids(&helper.slot_uids()).is_empty()
    });
    let cgroups = helper.cgroup().job_dirs();
    assert!(gone, "job cgroups left: {cgroups:?}");
    // The leak checks ignore idle warm sandboxes: there must be no more than the pool's size.
    let warm = helper.cgroup().idle_warm_count();
    assert!(
        warm <= 4,
        "{warm} idle warm sandboxes, more than warm_sandboxes = 4"
    );
    assert_eq!(
        mounts_mentioning(&dir),
        mounts_at_start,
        "mounts left under the test dir"
    );
    assert_eq!(
        host_mount_count(),
        host_mounts_after_warmup,
        "host mount count changed"
    );
    let procs = processes_with_uids(&helper.slot_uids());
    assert!(procs.is_empty(), "processes with slot uids left: {procs:?}");
    let fds = fd_count_once_at_most(helper.pid(), fds_after_warmup);
    assert!(
        fds <= fds_after_warmup,
        "the helper's descriptors grew: {fds_after_warmup} -> {fds}"
    );
    let rss = vm_rss_kib(helper.pid());
    assert!(
        rss <= rss_after_warmup + RSS_SLACK_KIB,
        "the helper's RSS grew from {rss_after_warmup} KiB to {rss} KiB"
    );
    eprintln!(
        "leaks: fds {fds_after_warmup}, rss {rss_after_warmup} -> {rss} KiB, mounts {}",
        host_mounts_after_warmup
    );
}
