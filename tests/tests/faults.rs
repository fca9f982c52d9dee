//! Faults on a real stack: `kill -9` of the helper during a job, `kill -9` of the gateway with
//! jobs running, and the helper dying under a queued backlog. What must hold afterwards: the
//! sandboxes are gone within 1 s, nothing is orphaned (processes, cgroups, mounts), every job
//! reaches a final state with a clear reason (a queued job the helper never took waits for it),
//! and the stack serves again once the helper is back.
//! Each test has its own stack (`config(..)`, from the allocator).

use std::time::Duration;

use serde_json::{json, Value};

use sandrun_tests::hostile::{
    eventually, fd_count_once_at_most, fd_count_with_full_pool, helper_stats, job_cgroups_below,
    live_processes_with_uids, mounts_anywhere_mentioning,
};
use sandrun_tests::stack::{Part, Stack};
use sandrun_tests::{config, Job};

/// The deadline for sandboxes to disappear after a daemon is killed.
/// Warm sandboxes of the gateway-kill test's helper: its descriptor counts are taken with the
/// pool full.
const WARM: usize = 2;
const SANDBOXES_GONE_WITHIN: Duration = Duration::from_secs(1);
/// Time the helper has to remove the job cgroups once the processes are gone (the removal is
/// retried on the helper's 100 ms tick).
const CGROUPS_GONE_WITHIN: Duration = Duration::from_secs(3);

fn sh_job(script: &str) -> Vec<Part> {
    let manifest = json!({"entrypoint": "run.sh", "interpreter": "sh", "timeout": 300});
    vec![Part::file("run.sh", script), Part::manifest(&manifest)]
}

fn wait_running(stack: &Stack, id: &str) -> Value {
    stack.wait_status(id, |s| s == "running" || s == "completed" || s == "failed")
}

/// The sandbox's `sleep` really runs (as a slot uid) before the fault is injected.
fn wait_sandboxes(stack: &Stack, n: usize) {
    let uids = stack.helper().slot_uids();
    let seen = eventually(Duration::from_secs(30), || {
        let sleepers = live_processes_with_uids(&uids);
        sleepers
            .iter()
            .filter(|(_, _, name)| name == "sleep")
            .count()
            >= n
    });
    assert!(
        seen,
        "the sandboxes never ran: {:?}",
        live_processes_with_uids(&uids)
    );
}

fn assert_serves(stack: &Stack) {
    let id = stack.submit_ok(&sh_job("echo back"));
    let status = stack.wait_finished(&id);
    assert_eq!(status["status"], "completed", "{status}");
}

#[test]
fn given_helper_killed_during_a_job_then_it_fails_internal_its_sandbox_dies_and_the_next_job_runs()
{
    let mut stack = Stack::start(&config(""), "");
    let id = stack.submit_ok(&sh_job("sleep 300"));
    assert_eq!(wait_running(&stack, &id)["status"], "running");
    wait_sandboxes(&stack, 1);
    let uids = stack.helper().slot_uids();
    let helper_dir = stack.helper().dir().display().to_string();

    stack.kill_helper();

    let gone = eventually(SANDBOXES_GONE_WITHIN, || {
        live_processes_with_uids(&uids).is_empty()
    });
    assert!(
        gone,
        "sandbox processes outlived the helper: {:?}",
        live_processes_with_uids(&uids)
    );
    let mounts = mounts_anywhere_mentioning(&helper_dir);
    assert!(
        mounts.is_empty(),
        "sandbox mounts outlived the helper: {mounts:?}"
    );
    let status = stack.wait_finished(&id);
    assert_eq!(status["status"], "failed", "{status}");
    assert_eq!(status["reason"], "internal", "{status}");
    assert!(
        status["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{status}"
    );
    assert!(stack.gateway_is_alive(), "the gateway died with the helper");

    stack.restart_helper();
    assert_serves(&stack);
}

#[test]
fn given_gateway_killed_with_jobs_running_then_the_helper_kills_every_sandbox_and_leaks_nothing() {
    let mut stack = Stack::start(&config(&format!("warm_sandboxes = {WARM}")), "");
    let fds_idle = fd_count_with_full_pool(stack.helper().pid(), WARM);
    let ids: Vec<String> = (0..3)
        .map(|_| stack.submit_ok(&sh_job("sleep 300")))
        .collect();
    for id in &ids {
        assert_eq!(wait_running(&stack, id)["status"], "running");
    }
    wait_sandboxes(&stack, 3);
    let helper = stack.helper();
    let uids = helper.slot_uids();
    let cgroup_roots = helper.cgroup().dirs().to_vec();
    let helper_dir = helper.dir().display().to_string();
    // The checks below look in the right place: the running jobs' cgroups are there now.
    let before = job_cgroups_below(&cgroup_roots);
    assert!(
        !before.is_empty(),
        "no job cgroup found below {cgroup_roots:?}"
    );

    stack.kill_gateway();

    let gone = eventually(SANDBOXES_GONE_WITHIN, || {
        live_processes_with_uids(&uids).is_empty()
    });
    assert!(
        gone,
        "sandboxes outlived the gateway: {:?}",
        live_processes_with_uids(&uids)
    );
    let cgroups_gone = eventually(CGROUPS_GONE_WITHIN, || {
        job_cgroups_below(&cgroup_roots).is_empty()
    });
    assert!(
        cgroups_gone,
        "job cgroups left: {:?}",
        job_cgroups_below(&cgroup_roots)
    );
    let mounts = mounts_anywhere_mentioning(&helper_dir);
    assert!(mounts.is_empty(), "sandbox mounts left: {mounts:?}");
    let helper = stack.helper_mut();
    assert!(helper.is_alive(), "the helper died with the gateway");
    let stats = helper_stats(helper);
    assert_eq!(stats.running, 0, "{stats:?}");
    let _ = fd_count_with_full_pool(helper.pid(), WARM);
    let fds = fd_count_once_at_most(helper.pid(), fds_idle);
    assert!(fds <= fds_idle, "helper descriptors {fds_idle} -> {fds}");
    let next = helper.run(&Job::new(&["/bin/echo", "helper alone"]));
    assert_eq!(next.stdout, b"helper alone\n", "{}", next.describe());
}

#[test]
fn given_helper_dies_under_a_queued_backlog_then_no_job_is_lost_and_the_backlog_runs_after_restart()
{
    // Long enough a retry window (100 attempts, pauses of at most 400 ms) for the restart below.
    let gateway =
        "max_running = 1\nbusy_retry_ms = 100\nbusy_retry_max_ms = 400\nhelper_attempts = 100\n";
    let mut stack = Stack::start(&config(""), gateway);
    let running = stack.submit_ok(&sh_job("sleep 300"));
    assert_eq!(wait_running(&stack, &running)["status"], "running");
    wait_sandboxes(&stack, 1);
    let queued: Vec<String> = (0..6)
        .map(|i| stack.submit_ok(&sh_job(&format!("echo {i}"))))
        .collect();
    for id in &queued {
        let (_, status) = stack.get_json(&format!("/status/{id}"));
        assert_eq!(status["status"], "queued", "{status}");
    }

    stack.kill_helper();

    // The running job fails with reason `internal` and a message (the helper that ran it is
    // gone); the backlog, which the helper never took, waits instead of failing.
    let status = stack.wait_finished(&running);
    assert_eq!(status["reason"], "internal", "{status}");
    assert!(
        status["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{status}"
    );
    std::thread::sleep(Duration::from_secs(1));
    for id in &queued {
        let (_, status) = stack.get_json(&format!("/status/{id}"));
        assert!(
            matches!(status["status"].as_str(), Some("queued" | "running")),
            "job {id} did not wait for the helper: {status}"
        );
    }

    stack.restart_helper();
    for id in &queued {
        let status = stack.wait_finished(id);
        assert_eq!(status["status"], "completed", "job {id}: {status}");
    }
    let metrics = stack.get("/metrics").text();
    let finished = metric_sum(&metrics, "sandrun_gateway_jobs_finished_total");
    let submitted = metric_sum(&metrics, "sandrun_gateway_jobs_submitted_total");
    assert_eq!(finished, submitted, "jobs unaccounted for:\n{metrics}");
    let after: Vec<String> = (0..3)
        .map(|i| stack.submit_ok(&sh_job(&format!("echo {i}"))))
        .collect();
    for id in &after {
        let status = stack.wait_finished(id);
        assert_eq!(status["status"], "completed", "{status}");
    }
}

/// The sum of every sample of `name` in a Prometheus text exposition.
fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
