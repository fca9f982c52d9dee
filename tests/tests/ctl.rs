//! `sandrunctl` against a real helper: `run` (exit codes, `--json`, outputs) and the admin
//! commands (`ps`, `kill`, `stats`, `drain`).

use std::fs;
use std::path::Path;
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
    let helper = Helper::start(&config(""));
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
    let helper = Helper::start(&config(""));
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

/// A small input goes with `Submit` in one write; one above 64 KiB waits for `Accepted`. Both
/// reach the job byte for byte, files first and then stdin.
#[test]
fn given_small_and_large_inputs_with_stdin_then_the_job_reads_them_exactly() {
    let helper = Helper::start(&config(""));
    let work = tempfile::tempdir().expect("tempdir");
    for size in [10usize, 300 * 1024] {
        let input = work.path().join(format!("in-{size}"));
        fs::create_dir_all(&input).expect("mkdir");
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251).to_le_bytes()[0]).collect();
        fs::write(input.join("blob"), &data).expect("write input");
        let stdin: Vec<u8> = (0..size).map(|i| (i * 13 % 253).to_le_bytes()[0]).collect();
        let stdin_path = work.path().join(format!("stdin-{size}"));
        fs::write(&stdin_path, &stdin).expect("write stdin");
        let out = helper.ctl(&[
            "run",
            "--json",
            "--input",
            input.to_str().expect("utf-8"),
            "--stdin",
            stdin_path.to_str().expect("utf-8"),
            "--",
            "/bin/sh",
            "-c",
            "sha256sum blob; sha256sum -",
        ]);
        let v = json_of(&out);
        assert_eq!(v["exit_code"], 0, "{size}: {v}");
        let expected = format!(
            "{}  blob\n{}  -\n",
            hex(&Sha256::digest(&data)),
            hex(&Sha256::digest(&stdin))
        );
        assert_eq!(v["stdout"], expected.as_str(), "{size}: {v}");
    }
}

#[test]
fn given_input_and_output_patterns_then_outputs_are_written_under_out_dir_with_sha256() {
    let helper = Helper::start(&config(""));
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
    let helper = Helper::start(&config(""));
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
    let helper = Helper::start(&config(""));
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
    let helper = Helper::start(&config(""));
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
    let helper = Helper::start(&config(""));
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
    let helper = Helper::start(&config(""));
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

/// Runs sandrunctl with `cwd` as its working directory (retrying a briefly busy binary).
fn ctl_in(helper: &Helper, cwd: &Path, args: &[&str]) -> Output {
    sandrun_tests::retry_while_busy("run sandrunctl", || {
        helper.ctl_command(args).current_dir(cwd).output()
    })
}

/// The names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn jobs_started(helper: &Helper) -> u64 {
    match helper.admin(AdminRequest::Stats) {
        Response::Admin(AdminResponse::Stats(s)) => s.jobs_started,
        other => panic!("stats: {other:?}"),
    }
}

#[test]
fn given_out_dir_holding_a_file_an_output_would_replace_then_run_is_refused_and_it_is_unchanged() {
    let helper = Helper::start(&config(""));
    let dir = tempfile::tempdir().expect("tempdir");
    let victim = dir.path().join("victim.txt");
    fs::write(&victim, b"precious\n").expect("write victim");
    let out = helper.ctl(&[
        "run",
        "--json",
        "--output",
        "*.txt",
        "--out-dir",
        dir.path().to_str().expect("utf-8"),
        "--",
        "/bin/sh",
        "-c",
        "echo pwned > victim.txt",
    ]);
    assert_eq!(out.status.code(), Some(73), "{out:?}");
    let v = json_of(&out);
    assert_eq!(v["code"], "out_dir_refused", "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("not empty")),
        "{v}"
    );
    assert_eq!(fs::read(&victim).expect("victim"), b"precious\n");
    assert_eq!(entries(dir.path()), ["victim.txt"]);
    // Refused before anything was submitted: no job ran.
    assert_eq!(jobs_started(&helper), 0);
}

#[test]
fn given_output_dot_ssh_run_from_a_home_then_authorized_keys_lands_only_in_a_new_directory() {
    let helper = Helper::start(&config(""));
    let home = tempfile::tempdir().expect("tempdir");
    fs::write(home.path().join(".profile"), b"keep\n").expect("write .profile");
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIattacker attacker@job\n";
    let script = format!(
        "mkdir .ssh && printf '{}' > .ssh/authorized_keys",
        key.trim_end()
    );
    let out = ctl_in(
        &helper,
        home.path(),
        &[
            "run", "--json", "--output", ".ssh/", "--", "/bin/sh", "-c", &script,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v = json_of(&out);
    assert!(
        fs::symlink_metadata(home.path().join(".ssh")).is_err(),
        "the job's .ssh/ was written into the directory sandrunctl ran in"
    );
    let out_dir = v["out_dir"].as_str().expect("out_dir named in the JSON");
    assert!(
        out_dir.starts_with("sandrun-") && !out_dir.contains('/'),
        "{v}"
    );
    let keys = fs::read_to_string(home.path().join(out_dir).join(".ssh/authorized_keys"))
        .expect("output in the new directory");
    assert_eq!(keys, key.trim_end());
    assert_eq!(entries(home.path()), [".profile", out_dir]);
    assert_eq!(entries(&home.path().join(out_dir)), [".ssh"]);
}

#[test]
fn given_a_symlink_in_the_out_dir_then_nothing_is_written_at_all() {
    let helper = Helper::start(&config(""));
    let work = tempfile::tempdir().expect("tempdir");
    let victim = work.path().join("victim.txt");
    fs::write(&victim, b"keep\n").expect("write victim");
    let elsewhere = work.path().join("elsewhere");
    fs::create_dir(&elsewhere).expect("mkdir elsewhere");
    let out_dir = work.path().join("out");
    fs::create_dir(&out_dir).expect("mkdir out");
    std::os::unix::fs::symlink(&victim, out_dir.join("b.txt")).expect("symlink b.txt");
    std::os::unix::fs::symlink(&elsewhere, out_dir.join("d")).expect("symlink d");
    let out = helper.ctl(&[
        "run",
        "--json",
        "--output",
        "*.txt",
        "--out-dir",
        out_dir.to_str().expect("utf-8"),
        "--",
        "/bin/sh",
        "-c",
        "echo a > a.txt; echo b > b.txt; mkdir d; echo x > d/x.txt",
    ]);
    assert_eq!(fs::read(&victim).expect("victim"), b"keep\n");
    assert_eq!(
        entries(&out_dir),
        ["b.txt", "d"],
        "something was written: {out:?}"
    );
    assert!(
        entries(&elsewhere).is_empty(),
        "written through the symlink"
    );
    assert_eq!(entries(work.path()), ["elsewhere", "out", "victim.txt"]);
    assert_eq!(out.status.code(), Some(73), "{out:?}");
    assert_eq!(json_of(&out)["code"], "out_dir_refused");
}

#[test]
fn given_runs_without_out_dir_then_each_job_gets_a_fresh_directory_and_none_is_reused() {
    let helper = Helper::start(&config(""));
    let cwd = tempfile::tempdir().expect("tempdir");
    // A directory left by an earlier helper's job 1 (job ids restart with the helper).
    let stale = cwd.path().join("sandrun-1");
    fs::create_dir(&stale).expect("mkdir stale");
    fs::write(stale.join("out.txt"), b"stale\n").expect("write stale");
    let mut dirs = Vec::new();
    for word in ["one", "two"] {
        let script = format!("echo {word} > out.txt");
        let args = [
            "run", "--json", "--output", "out.txt", "--", "/bin/sh", "-c", &script,
        ];
        let out = ctl_in(&helper, cwd.path(), &args);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let v = json_of(&out);
        let dir = v["out_dir"].as_str().expect("out_dir named").to_owned();
        assert!(dir.starts_with("sandrun-") && !dir.contains('/'), "{v}");
        let path = cwd.path().join(&dir);
        assert_eq!(entries(&path), ["out.txt"], "{dir} is not fresh");
        assert_eq!(
            fs::read_to_string(path.join("out.txt")).expect("output"),
            format!("{word}\n")
        );
        dirs.push(dir);
    }
    assert_ne!(dirs[0], dirs[1]);
    assert!(!dirs.contains(&"sandrun-1".to_owned()), "{dirs:?}");
    assert_eq!(fs::read(stale.join("out.txt")).expect("stale"), b"stale\n");
    assert_eq!(entries(&stale), ["out.txt"]);
    // Without --output no directory is made.
    let plain = ctl_in(&helper, cwd.path(), &["run", "--json", "--", "/bin/true"]);
    assert_eq!(plain.status.code(), Some(0), "{plain:?}");
    assert_eq!(json_of(&plain)["out_dir"], Value::Null);
    let mut expected = vec!["sandrun-1".to_owned(), dirs[0].clone(), dirs[1].clone()];
    expected.sort();
    assert_eq!(entries(cwd.path()), expected);
}
