//! A sandbox setup step that fails reaches the job's result and the helper's log with its name
//! and errno, on the cold path too (issue 10: it used to surface as a `Protocol` failure,
//! "recvmsg on the control channel: Connection reset by peer").
//!
//! The failure is real, not injected: the helper runs under `sandrun-deny-syscalls`, which
//! answers `sethostname` with EPERM the way systemd's `ProtectHostname=yes` does, so the
//! sandbox's `Hostname` step fails before it has read its job order. Slots from the allocator.

use std::ffi::OsStr;

use sandrun_ipc::ErrorCode;
use sandrun_tests::helper::deny_syscalls_binary;
use sandrun_tests::{config, Helper, Job};

const HOSTNAME_EPERM: &str =
    "sandbox setup step Hostname failed (sandrun): Operation not permitted";

fn helper_without_sethostname(extra: &str) -> Helper {
    let wrapper = deny_syscalls_binary();
    let args = [
        wrapper.as_os_str(),
        OsStr::new("sethostname=EPERM"),
        OsStr::new("--"),
    ];
    Helper::start_under(&args, &config(extra))
}

#[test]
fn given_a_setup_step_failing_on_the_cold_path_then_the_result_names_the_step_and_errno() {
    let helper = helper_without_sethostname("warm_sandboxes = 0");
    let outcome = helper.run(&Job::new(&["/bin/true"]));
    let error = outcome.error.as_ref().unwrap_or_else(|| {
        panic!(
            "the job ran without a hostname step: {}",
            outcome.describe()
        )
    });
    assert_eq!(
        error.code,
        ErrorCode::SandboxSetup,
        "{}",
        outcome.describe()
    );
    assert!(
        error.message.contains(HOSTNAME_EPERM),
        "the error does not name the step and errno: {:?}",
        error.message
    );
    assert!(
        !error.message.contains("Connection reset"),
        "{:?}",
        error.message
    );
    let log = helper.log();
    assert!(
        log.lines()
            .any(|l| l.contains("sandbox setup failed") && l.contains(HOSTNAME_EPERM)),
        "the helper's log does not name the step and errno:\n{log}"
    );
    let ctl = helper.ctl(&["run", "--", "/bin/true"]);
    let said = String::from_utf8_lossy(&ctl.stderr);
    assert!(!ctl.status.success(), "sandrunctl run succeeded: {said}");
    assert!(said.contains(HOSTNAME_EPERM), "sandrunctl said: {said}");
}

/// `sandrunctl stats` shows the `clone3` fallback counter (the fallback itself is tested at the
/// spawn level in `sandrund/src/sandbox/tests.rs`: this host's job controllers are cgroup v1,
/// where the helper never calls `clone3`, so here the counter stays 0).
#[test]
fn given_a_helper_whose_clone3_is_refused_then_stats_show_the_clone3_fallback_counter() {
    let wrapper = deny_syscalls_binary();
    let args = [
        wrapper.as_os_str(),
        OsStr::new("clone3=ENOSYS"),
        OsStr::new("--"),
    ];
    let helper = Helper::start_under(&args, &config(""));
    let outcome = helper.run(&Job::new(&["/bin/sh", "-c", "echo ran"]));
    assert_eq!(outcome.stdout, b"ran\n", "{}", outcome.describe());
    let text = helper.ctl(&["stats"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines().any(|l| l.starts_with("clone3 fallbacks")),
        "{text}"
    );
    let json = helper.ctl(&["stats", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("stats --json");
    assert_eq!(v["Stats"]["clone3_fallbacks"], 0, "{v}");
}
