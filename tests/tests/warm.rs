//! Warm sandboxes: the helper prepares a few sandboxes ahead of jobs. Each must be used for one
//! job only, must not be reachable by any job, and a broken one must not fail a job.

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use sandrun_tests::hostile::{eventually, is_idle_warm_init};
use sandrun_tests::{config, Helper, Job};

/// The helper's children that are idle warm sandbox inits (still root: an init drops to the
/// job's uid as soon as it gets its job).
fn idle_warm_inits(helper: &Helper) -> Vec<i32> {
    let pid = helper.pid();
    let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    children
        .split_whitespace()
        .filter(|p| is_idle_warm_init(p))
        .filter_map(|p| p.parse::<i32>().ok())
        .collect()
}

/// Whether the warm init `pid` has finished preparing: it is blocked in `recvmsg` on its
/// control socket, waiting for its job (`/proc/<pid>/syscall` starts with the call's number).
fn waits_for_its_job(pid: i32) -> bool {
    let syscall = fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    syscall.split_whitespace().next() == Some(libc::SYS_recvmsg.to_string().as_str())
}

fn ns(pid: i32, kind: &str) -> String {
    fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn given_a_started_helper_then_it_keeps_its_warm_sandboxes_each_in_namespaces_of_its_own() {
    let helper = Helper::start(&config("warm_sandboxes = 3"));
    // Prepared, so each is in its cgroup (on v1 an init joins it while it prepares).
    assert!(
        eventually(Duration::from_secs(10), || {
            let inits = idle_warm_inits(&helper);
            inits.len() == 3 && inits.iter().all(|&pid| waits_for_its_job(pid))
        }),
        "expected 3 warm sandboxes, found {:?}",
        idle_warm_inits(&helper)
    );
    let inits = idle_warm_inits(&helper);
    for kind in ["net", "pid_for_children", "mnt", "ipc", "uts"] {
        let mut seen: BTreeSet<String> = inits.iter().map(|&p| ns(p, kind)).collect();
        assert_eq!(
            seen.len(),
            3,
            "{kind} namespaces shared between warm sandboxes"
        );
        assert!(
            seen.insert(ns(std::process::id() as i32, kind)),
            "a warm sandbox shares the host's {kind} namespace"
        );
    }
    let names: BTreeSet<String> = (helper.cgroup().idle_warm_dirs().iter())
        .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    assert_eq!(names.len(), 3, "one cgroup per warm sandbox: {names:?}");
}

#[test]
fn given_back_to_back_jobs_then_none_sees_anything_the_previous_one_left() {
    let helper = Helper::start(&config("warm_sandboxes = 1"));
    // `count` sets $n to the `sleep` processes this job can see, with shell builtins only (no
    // `ps`, no `grep`): a count that needs a tool would read 0 where the tool is missing. A
    // process that exits between the glob and the read is simply not counted.
    let count = "count() { n=0; for c in /proc/[0-9]*/comm; do \
                 read -r name < $c && [ \"$name\" = sleep ] && n=$((n + 1)); done; return 0; }";
    // The first job checks that its own `sleep` is visible by that count (once it has exec'd:
    // until then its name is `sh`), so the second job's 0 means the sleep is gone, not that
    // the count cannot see one.
    let leave_traces = format!(
        "{count}; echo x > /work/mark && echo x > /tmp/mark && echo x > /dev/shm/mark \
         && (sleep 300 &) && i=0 && count && while [ $n = 0 ] && [ $i -lt 5000 ]; do \
         count; i=$((i + 1)); done; echo sleeps $n"
    );
    let look = format!(
        "{count}; for f in /work/mark /tmp/mark /dev/shm/mark; do test -e $f && echo found $f; \
         done; count; echo sleeps $n; ls /proc | grep -c '^[0-9]'"
    );
    for _ in 0..3 {
        let first = helper.run(&Job::new(&["/bin/sh", "-c", &leave_traces]));
        assert_eq!(first.report().exit_code, Some(0), "{}", first.describe());
        let left = String::from_utf8_lossy(&first.stdout).into_owned();
        assert_eq!(left.trim_end(), "sleeps 1", "the first job's sleep: {left}");
        let second = helper.run(&Job::new(&["/bin/sh", "-c", &look]));
        assert_eq!(second.report().exit_code, Some(0), "{}", second.describe());
        let out = String::from_utf8_lossy(&second.stdout).into_owned();
        assert!(!out.contains("found"), "a trace of the previous job: {out}");
        let lines: Vec<&str> = out.lines().collect();
        // No `sleep` of the previous job, and only this job's processes in /proc (sh, ls,
        // grep and the init).
        assert_eq!(lines.first(), Some(&"sleeps 0"), "{out}");
        let procs: u32 = lines
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no process count: {out}"));
        assert!(procs <= 4, "other processes visible: {out}");
    }
}

#[test]
fn given_warm_sandboxes_killed_before_use_when_a_job_arrives_then_it_runs_in_a_fresh_one() {
    let helper = Helper::start(&config("warm_sandboxes = 2"));
    assert!(eventually(Duration::from_secs(10), || idle_warm_inits(
        &helper
    )
    .len()
        == 2));
    let inits = idle_warm_inits(&helper);
    for &pid in &inits {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    // Dead, not yet reaped (the helper notices when it hands them a job).
    let zombie = |pid: i32| {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
    };
    assert!(eventually(Duration::from_secs(5), || inits
        .iter()
        .all(|&p| zombie(p))));
    let outcome = helper.run(&Job::new(&["/bin/sh", "-c", "echo ran"]));
    assert_eq!(
        outcome.report().exit_code,
        Some(0),
        "{}",
        outcome.describe()
    );
    assert_eq!(outcome.stdout, b"ran\n");
    assert!(
        helper.log().contains("a warm sandbox had failed"),
        "the broken warm sandbox was not noticed: {}",
        helper.log()
    );
}

#[test]
fn given_a_job_with_lower_limits_than_the_warm_default_then_its_own_limits_hold() {
    let helper = Helper::start(&config("warm_sandboxes = 1"));
    // The warm sandbox was prepared with the default limits (512 MiB, 64 pids): 200 MiB fits
    // there, so only the job's own 64 MiB, written when it started, can stop it.
    let job = Job::probe(&["membomb", "200"]).limits(|l| {
        l.memory_bytes = Some(64 << 20);
        l.pids = Some(8);
    });
    let outcome = helper.run(&job);
    assert_eq!(
        outcome.report().reason,
        sandrun_ipc::ExitReason::MemoryLimit,
        "{}",
        outcome.describe()
    );
    let forks = helper.run(
        &Job::new(&[
            "/bin/sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 5 & done; wait",
        ])
        .limits(|l| l.pids = Some(4)),
    );
    assert!(
        String::from_utf8_lossy(&forks.stderr).contains("fork")
            || forks.report().reason == sandrun_ipc::ExitReason::PidsLimit,
        "more than 4 processes ran: {}",
        forks.describe()
    );
}

#[test]
fn given_warm_sandboxes_whose_cgroups_were_removed_when_a_job_arrives_then_it_runs_in_a_fresh_one()
{
    let helper = Helper::start(&config("warm_sandboxes = 2"));
    // Both prepared (an init killed while still preparing is noticed as a failed warm sandbox,
    // before its cgroup is written to, which is not what this test is about).
    assert!(eventually(Duration::from_secs(10), || {
        let inits = idle_warm_inits(&helper);
        inits.len() == 2 && inits.iter().all(|&pid| waits_for_its_job(pid))
    }));
    // What another helper's stale-cgroup cleanup would do: kill what is inside, remove the dirs.
    let dirs = helper.cgroup().idle_warm_dirs();
    for pid in idle_warm_inits(&helper) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    assert!(eventually(Duration::from_secs(5), || dirs
        .iter()
        .all(|d| fs::remove_dir(d).is_ok() || !d.exists())));
    let outcome = helper.run(&Job::new(&["/bin/sh", "-c", "echo ran"]));
    assert_eq!(outcome.stdout, b"ran\n", "{}", outcome.describe());
    assert!(
        helper.log().contains("cgroup had failed"),
        "the broken warm sandbox was not noticed: {}",
        helper.log()
    );
}

/// The helper's one prepared sandbox, once it waits for its job, stopped (`SIGSTOP`): a job
/// given to it is held between `Go` and its `execve` until the test lets it go on.
fn stop_the_prepared_init(helper: &Helper) -> i32 {
    assert!(
        eventually(Duration::from_secs(10), || {
            let inits = idle_warm_inits(helper);
            inits.len() == 1 && waits_for_its_job(inits[0])
        }),
        "expected one prepared warm sandbox, found {:?}",
        idle_warm_inits(helper)
    );
    let init = idle_warm_inits(helper)[0];
    signal(init, nix::sys::signal::Signal::SIGSTOP);
    assert!(
        eventually(Duration::from_secs(5), || state(init) == Some('T')),
        "init {init} did not stop"
    );
    init
}

/// Every directory named `name` at or below `dir`.
fn dirs_named(dir: &std::path::Path, name: &str, found: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            if e.file_name() == name {
                found.push(path.clone());
            }
            dirs_named(&path, name, found);
        }
    }
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

/// The state letter of `/proc/<pid>/stat` (`None`: no such process).
fn state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

fn stats(helper: &Helper) -> sandrun_ipc::Stats {
    match helper.admin(sandrun_ipc::AdminRequest::Stats) {
        sandrun_ipc::Response::Admin(sandrun_ipc::AdminResponse::Stats(s)) => s,
        other => panic!("stats: {other:?}"),
    }
}

/// Issue 14: the loop does not wait on a starting sandbox. While one job's sandbox is held
/// between its order and its exec, the helper answers `Stats` (which counts the held job as
/// live) and runs a whole other job; the held job then starts and ends normally.
#[test]
fn given_a_sandbox_whose_start_is_held_then_the_helper_serves_other_clients_meanwhile() {
    let helper = Helper::start(&config("warm_sandboxes = 1"));
    let init = stop_the_prepared_init(&helper);
    let held = helper.submit(&Job::new(&["/bin/sh", "-c", "echo held"]));
    // A blocking helper would answer only once the held start had timed out (60 s), and then
    // with the job gone.
    let during = stats(&helper);
    assert_eq!(
        (during.running, during.jobs_started),
        (1, 0),
        "the held job is live and not started: {during:?}"
    );
    let other = helper.run(&Job::new(&["/bin/sh", "-c", "echo meanwhile"]));
    assert_eq!(other.report().exit_code, Some(0), "{}", other.describe());
    assert_eq!(other.stdout, b"meanwhile\n");
    assert_eq!(state(init), Some('T'), "the held sandbox was not held");
    assert_eq!(stats(&helper).jobs_started, 1, "only the other job started");
    signal(init, nix::sys::signal::Signal::SIGCONT);
    let held = held.finish();
    assert_eq!(held.report().exit_code, Some(0), "{}", held.describe());
    assert_eq!(held.stdout, b"held\n");
    assert!(held.spawn_us.is_some(), "{}", held.describe());
}

/// A start that never answers fails at `start_timeout_s` with a typed error; its init is killed
/// and reaped, its cgroup removed and its slot freed (with `max_concurrent = 1`, the next job
/// runs).
#[test]
fn given_a_start_that_never_answers_then_it_times_out_and_leaves_nothing() {
    let helper = Helper::start(&config(
        "warm_sandboxes = 1\nstart_timeout_s = 1\nmax_concurrent = 1",
    ));
    let init = stop_the_prepared_init(&helper);
    // Its cgroup's name (`job-w<n>`), from the init's own `/proc/<pid>/cgroup`.
    let cgroups = fs::read_to_string(format!("/proc/{init}/cgroup")).unwrap();
    let name = (cgroups.lines())
        .filter_map(|l| l.rsplit('/').next())
        .find(|n| n.starts_with("job-"))
        .unwrap_or_else(|| panic!("init {init} is in no job cgroup: {cgroups}"))
        .to_owned();
    let left = || {
        let mut found = Vec::new();
        for d in helper.cgroup().dirs() {
            dirs_named(d, &name, &mut found);
        }
        found
    };
    assert!(!left().is_empty(), "no cgroup {name} below the test's");
    let held = helper.run(&Job::new(&["/bin/true"]));
    let error = held
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("{}", held.describe()));
    assert_eq!(
        error.code,
        sandrun_ipc::ErrorCode::SandboxSetup,
        "{error:?}"
    );
    assert!(error.message.contains("timed out"), "{error:?}");
    assert_eq!(state(init), None, "the stopped init {init} is still there");
    let s = stats(&helper);
    assert_eq!((s.running, s.setup_failures), (0, 1), "{s:?}");
    assert!(
        eventually(Duration::from_secs(10), || left().is_empty()),
        "the timed-out sandbox's cgroup is left: {:?}",
        left()
    );
    assert!(
        helper.cgroup().job_dirs().is_empty(),
        "a job cgroup is left: {:?}",
        helper.cgroup().job_dirs()
    );
    let next = helper.run(&Job::new(&["/bin/sh", "-c", "echo next"]));
    assert_eq!(next.report().exit_code, Some(0), "{}", next.describe());
    assert_eq!(next.stdout, b"next\n");
}
