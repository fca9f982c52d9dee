//! `sandrunctl` against a real helper: `run` (exit codes, `--json`, outputs) and the admin
//! commands (`ps`, `kill`, `stats`, `drain`).

use std::fs;
use std::process::Output;

use sandrun_ipc::{AdminRequest, AdminResponse, ErrorCode, ExitReason, Response};
use sandrun_tests::{config, Helper, Job};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn json_of(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "not one JSON object ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn given_run_when_job_exits_with_code_then_sandrunctl_exits_with_it_and_streams_output() {
    let helper = Helper::start(&config(40, ""));
    let out = helper.ctl(&[
        "run",
        "--",
        "/bin/sh",
        "-c",
        "echo hello; echo oops >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(out.stdout, b"hello\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("oops"),
        "{out:?}"
    );
}

#[test]
fn given_run_json_then_one_object_with_the_documented_fields_is_printed() {
    let helper = Helper::start(&config(41, ""));
    let script = "echo out; echo err >&2; exit 3";
    let out = helper.ctl(&["run", "--json", "--", "/bin/sh", "-c", script]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let v = json_of(&out);
    assert_eq!(v["exit_code"], 3, "{v}");
    assert_eq!(v["signal"], Value::Null, "{v}");
    assert_eq!(v["reason"], "none", "{v}");
    assert_eq!(v["stdout"], "out\n", "{v}");
    assert_eq!(v["stderr"], "err\n", "{v}");
    assert_eq!(v["stdout_truncated"], false, "{v}");
    assert_eq!(v["stderr_truncated"], false, "{v}");
    for key in ["cpu_ms", "wall_ms", "memory_peak_bytes"] {
        assert!(v[key].is_u64(), "{key} missing: {v}");
    }
    assert_eq!(v["outputs"], serde_json::json!([]), "{v}");
    assert_eq!(v["skipped"], serde_json::json!([]), "{v}");
}

#[test]
fn given_input_and_output_patterns_then_outputs_are_written_under_out_dir_with_sha256() {
    let helper = Helper::start(&config(42, ""));
    let work = tempfile::tempdir().expect("tempdir");
    let input = work.path().join("in");
    fs::create_dir_all(input.join("data")).expect("mkdir");
    fs::write(input.join("data/numbers.txt"), b"1\n2\n3\n").expect("write input");
    let out_dir = work.path().join("out");
    let script = "mkdir -p result/deep && sort -r data/numbers.txt > result/deep/rev.txt \
                  && ln -s /etc/passwd result/link";
    let args = [
        "run",
        "--json",
        "--input",
        input.to_str().expect("utf-8"),
        "--output",
        "result/",
    ];
    let mut args = args.to_vec();
    args.extend([
        "--out-dir",
        out_dir.to_str().expect("utf-8"),
        "--",
        "/bin/sh",
        "-c",
        script,
    ]);
    let out = helper.ctl(&args);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v = json_of(&out);
    let written = fs::read(out_dir.join("result/deep/rev.txt")).expect("output written");
    assert_eq!(written, b"3\n2\n1\n");
    let expected = serde_json::json!([{
        "path": "result/deep/rev.txt",
        "size": 6,
        "sha256": hex(&Sha256::digest(&written)),
    }]);
    assert_eq!(v["outputs"], expected, "{v}");
    assert_eq!(
        v["skipped"],
        serde_json::json!([{"path": "result/link", "kind": "symlink"}])
    );
    assert!(
        fs::symlink_metadata(out_dir.join("result/link")).is_err(),
        "symlink was written"
    );
}

#[test]
fn given_symlink_in_input_then_sandrunctl_refuses_naming_it() {
    let helper = Helper::start(&config(43, ""));
    let input = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink("/etc/shadow", input.path().join("sneaky")).expect("symlink");
    let dir = input.path().to_str().expect("utf-8");
    let out = helper.ctl(&["run", "--json", "--input", dir, "--", "/bin/true"]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let v = json_of(&out);
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("sneaky")),
        "{v}"
    );
    assert_eq!(v["code"], "invalid_input", "{v}");
}

#[test]
fn given_timeout_then_sandrunctl_reports_timeout_and_exits_128_plus_signal() {
    let helper = Helper::start(&config(44, ""));
    let out = helper.ctl(&[
        "run",
        "--json",
        "--timeout-s",
        "1",
        "--",
        "/bin/sleep",
        "60",
    ]);
    let v = json_of(&out);
    assert_eq!(v["reason"], "timeout", "{v}");
    assert_eq!(v["signal"], libc::SIGKILL, "{v}");
    assert_eq!(out.status.code(), Some(128 + libc::SIGKILL), "{out:?}");
}

#[test]
fn given_missing_socket_then_sandrunctl_exits_125_with_a_json_error() {
    let helper = Helper::start(&config(45, ""));
    let ctl = sandrun_tests::helper::bin_dir().join("sandrunctl");
    let out = std::process::Command::new(ctl)
        .arg("--socket")
        .arg(helper.dir().join("nope.sock"))
        .args(["run", "--json", "--", "/bin/true"])
        .output()
        .expect("run sandrunctl");
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert_eq!(json_of(&out)["code"], "connect_failed");
}

#[test]
fn given_running_job_then_ps_lists_it_kill_cancels_it_stats_count_and_drain_refuses_new() {
    let helper = Helper::start(&config(46, ""));
    let mut job = helper.submit(&Job::new(&["/bin/sleep", "300"]).label("admin-test-job"));
    let id = job.wait_started().expect("job started");

    let ps = helper.ctl(&["ps", "--json"]);
    assert_eq!(ps.status.code(), Some(0), "{ps:?}");
    let list = json_of(&ps);
    let jobs = list["List"].as_array().expect("List");
    assert!(
        jobs.iter()
            .any(|j| j["job_id"] == id.0 && j["label"] == "admin-test-job"),
        "ps does not show job {id}: {list}"
    );
    let human = helper.ctl(&["ps"]);
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("admin-test-job"),
        "{human:?}"
    );

    let kill = helper.ctl(&["kill", &id.0.to_string()]);
    assert_eq!(kill.status.code(), Some(0), "{kill:?}");
    let outcome = job.finish();
    assert_eq!(
        outcome.report().reason,
        ExitReason::Cancelled,
        "{}",
        outcome.describe()
    );

    let stats = json_of(&helper.ctl(&["stats", "--json"]));
    assert_eq!(stats["Stats"]["jobs_started"], 1, "{stats}");
    let by_reason = stats["Stats"]["jobs_by_reason"]
        .as_array()
        .expect("jobs_by_reason");
    assert!(
        by_reason.contains(&serde_json::json!(["Cancelled", 1])),
        "{stats}"
    );

    let drain = helper.ctl(&["drain"]);
    assert_eq!(drain.status.code(), Some(0), "{drain:?}");
    let refused = helper.ctl(&["run", "--json", "--", "/bin/true"]);
    assert_eq!(refused.status.code(), Some(125), "{refused:?}");
    assert_eq!(json_of(&refused)["code"], "draining");
    let direct = helper.run(&Job::new(&["/bin/true"]));
    assert_eq!(direct.error.map(|e| e.code), Some(ErrorCode::Draining));
    match helper.admin(AdminRequest::Stats) {
        Response::Admin(AdminResponse::Stats(s)) => assert!(s.draining, "{s:?}"),
        other => panic!("stats: {other:?}"),
    }
}

#[test]
fn given_ctrl_c_during_run_then_the_job_is_cancelled_and_reported() {
    let helper = Helper::start(&config(47, ""));
    let child = helper
        .ctl_command(&["run", "--json", "--", "/bin/sleep", "300"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sandrunctl");
    // Wait until the job runs (ps shows it), then interrupt the client like a terminal would.
    loop {
        match helper.admin(AdminRequest::List) {
            Response::Admin(AdminResponse::List(jobs)) if !jobs.is_empty() => break,
            Response::Admin(AdminResponse::List(_)) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => panic!("ps: {other:?}"),
        }
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let out = child.wait_with_output().expect("sandrunctl ends");
    let v = json_of(&out);
    assert_eq!(v["reason"], "cancelled", "{v}");
    assert_eq!(out.status.code(), Some(128 + libc::SIGKILL), "{out:?}");
}
