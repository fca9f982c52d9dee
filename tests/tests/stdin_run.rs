//! A job's standard input and `POST /run`, against the real daemons: stdin from a form part, the
//! manifest and `sandrunctl run --stdin`, its cap, and the synchronous run's two answers. Each
//! test has its own slot uid range (`config(..)`, from the allocator).

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use sandrun_ipc::ErrorCode;
use sandrun_tests::stack::{Part, Stack};
use sandrun_tests::{config, Helper, Job};

/// The gateway's default `max_stdin_bytes`.
const STDIN_CAP: usize = 1 << 20;

/// `len` bytes that are not text and not a repeating pattern a truncation or reordering would
/// survive: every byte value, NULs included.
fn noise(len: usize) -> Vec<u8> {
    sandrun_tests::noise(len, 0x9e37_79b9_7f4a_7c15)
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Copies its stdin to stdout and prints the stdin's sha256 on stderr.
const ECHO_PY: &[u8] = b"import sys, hashlib\n\
    data = sys.stdin.buffer.read()\n\
    sys.stdout.buffer.write(data)\n\
    sys.stderr.write(hashlib.sha256(data).hexdigest())\n";

fn decoded(logs: &Value, field: &str) -> Vec<u8> {
    let text = logs[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field}: {logs}"));
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("valid base64")
}

#[test]
fn given_a_1_mib_stdin_part_when_the_job_copies_it_then_logs_return_it_intact() {
    let stack = Stack::start(&config(""), "");
    let input = noise(STDIN_CAP);
    let id = stack.submit_ok(&[
        Part::file("main.py", ECHO_PY),
        Part::manifest(&json!({"entrypoint": "main.py", "timeout": 60})),
        Part::Stdin(input.clone()),
    ]);
    let status = stack.wait_finished(&id);
    assert_eq!(status["status"], "completed", "{status}");
    let (code, logs) = stack.get_json(&format!("/logs/{id}"));
    assert_eq!(code, 200, "{logs}");
    assert_eq!(logs["stdout_truncated"], false, "{}", logs["stderr"]);
    let out = decoded(&logs, "stdout_base64");
    assert_eq!(out.len(), input.len(), "stderr: {}", logs["stderr"]);
    assert!(out == input, "stdout differs from the stdin sent");
    assert_eq!(
        logs["stderr"],
        sha256_hex(&input),
        "the job read other bytes"
    );
}

#[test]
fn given_stdin_over_the_cap_when_submitted_then_413_with_a_json_error_and_no_job() {
    let stack = Stack::start(&config(""), "");
    let r = stack.submit(&[
        Part::file("main.py", ECHO_PY),
        Part::Stdin(noise(STDIN_CAP + 1)),
    ]);
    assert_eq!(r.status, 413, "{}", r.text());
    let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("stdin") && error.contains("1048576"),
        "{error}"
    );
    // Nothing of the refused upload stays charged, and no job was queued.
    let (_, stats) = stack.get_json("/stats");
    // Apart from the HTTP/2 window of the connection asking.
    assert_eq!(
        stats["memory"]["used_bytes"], stats["memory"]["this_connection_bytes"],
        "{stats}"
    );
    assert_eq!(stats["system"]["queue_length"], 0, "{stats}");
    // Exactly the cap is accepted.
    let id = stack.submit_ok(&[
        Part::file("main.py", ECHO_PY),
        Part::Stdin(noise(STDIN_CAP)),
    ]);
    assert_eq!(stack.wait_finished(&id)["status"], "completed");
}

#[test]
fn given_stdin_in_the_manifest_then_the_job_reads_it_and_without_stdin_it_reads_eof() {
    let stack = Stack::start(&config(""), "");
    let with = stack.submit_ok(&[
        Part::file("main.py", ECHO_PY),
        Part::manifest(&json!({"entrypoint": "main.py", "stdin": "3 4\nnaïve\n"})),
    ]);
    let without = stack.submit_ok(&[Part::file("main.py", ECHO_PY)]);
    for id in [&with, &without] {
        assert_eq!(stack.wait_finished(id)["status"], "completed");
    }
    let (_, logs) = stack.get_json(&format!("/logs/{with}"));
    assert_eq!(logs["stdout"], "3 4\nnaïve\n", "{logs}");
    let (_, logs) = stack.get_json(&format!("/logs/{without}"));
    assert_eq!(logs["stdout"], "", "{logs}");
    assert_eq!(logs["stderr"], sha256_hex(b""), "{logs}");
    // Both a part and the manifest field: refused, naming both.
    let r = stack.submit(&[
        Part::file("main.py", ECHO_PY),
        Part::manifest(&json!({"entrypoint": "main.py", "stdin": "a"})),
        Part::Stdin(b"b".to_vec()),
    ]);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("stdin"), "{}", r.text());
}

#[test]
fn given_run_when_the_job_is_fast_then_one_response_holds_its_result() {
    let stack = Stack::start(&config(""), "");
    let main = b"import sys\nopen('out.txt', 'w').write('42')\nprint('hi', sys.stdin.read())\n";
    let r = stack.post_parts(
        "/run?wait=30",
        &[
            Part::file("main.py", main.as_slice()),
            Part::manifest(&json!({"entrypoint": "main.py", "outputs": ["out.txt"]})),
            Part::Stdin(b"there".to_vec()),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["exit_code"], 0, "{v}");
    assert_eq!(v["reason"], Value::Null, "{v}");
    assert_eq!(v["stdout"], "hi there\n", "{v}");
    assert_eq!(v["stdout_truncated"], false, "{v}");
    assert_eq!(v["outputs"][0]["name"], "out.txt", "{v}");
    assert_eq!(v["outputs"][0]["sha256"], sha256_hex(b"42"), "{v}");
    assert_eq!(v["output_files"]["out.txt"]["size_bytes"], 2, "{v}");
    assert!(v["worker_metadata"]["signature"].is_string(), "{v}");
    assert!(r.header("ratelimit-remaining").is_some(), "{}", r.headers);
    // The same job, as /status sees it.
    let id = v["job_id"].as_str().expect("job_id");
    let (_, status) = stack.get_json(&format!("/status/{id}"));
    assert_eq!(status["job_hash"], v["job_hash"]);
    assert_eq!(status["worker_metadata"], v["worker_metadata"]);
}

#[test]
fn given_run_when_the_job_outlasts_the_wait_then_202_with_its_id_and_it_still_completes() {
    let stack = Stack::start(&config(""), "");
    let main = b"import time\ntime.sleep(3)\nprint('slept')\n";
    let r = stack.post_parts("/run?wait=1", &[Part::file("main.py", main.as_slice())]);
    assert_eq!(r.status, 202, "{}", r.text());
    let v = r.json();
    let id = v["job_id"].as_str().expect("job_id").to_owned();
    assert!(
        matches!(v["status"].as_str(), Some("queued" | "running")),
        "{v}"
    );
    assert_eq!(v["status_url"], format!("/status/{id}"), "{v}");
    assert_eq!(v["stream_url"], format!("/ws/{id}"), "{v}");
    assert_eq!(r.header("location"), Some(format!("/status/{id}")));
    let status = stack.wait_finished(&id);
    assert_eq!(status["status"], "completed", "{status}");
    let (_, logs) = stack.get_json(&format!("/logs/{id}"));
    assert_eq!(logs["stdout"], "slept\n", "{logs}");
    // A bad wait is refused before anything runs.
    let r = stack.post_parts("/run?wait=soon", &[Part::file("main.py", main.as_slice())]);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("wait"), "{}", r.text());
}

#[test]
fn given_run_when_the_client_disconnects_while_waiting_then_the_job_still_completes() {
    let stack = Stack::start(&config(""), "");
    let scratch = tempfile::tempdir_in(stack.dir()).expect("scratch");
    let file = scratch.path().join("main.py");
    std::fs::write(&file, b"import time\ntime.sleep(3)\nprint('done')\n").expect("write");
    // curl gives up after 1 s, long before the job ends: the gateway sees the connection close.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "1", "--cacert"])
        .arg(stack.ca_path())
        .arg("-F")
        .arg(format!("files=@{};filename=main.py", file.display()))
        .arg(stack.url("/run?wait=30"))
        .output()
        .expect("run curl");
    assert_eq!(out.status.code(), Some(28), "curl should time out: {out:?}");
    // The job was neither lost nor cancelled: it completes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let completed = "sandrun_gateway_jobs_finished_total{status=\"completed\",reason=\"none\"} 1";
    loop {
        let metrics = stack.get("/metrics").text();
        if metrics.lines().any(|l| l == completed) {
            assert!(!metrics.contains("reason=\"cancelled\"} 1"), "{metrics}");
            break;
        }
        assert!(Instant::now() < deadline, "no job completed: {metrics}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn given_sandrunctl_stdin_from_a_file_or_dash_then_the_job_reads_exactly_it() {
    let helper = Helper::start(&config(""));
    let input = noise(300 * 1024);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("input.bin");
    std::fs::write(&file, &input).expect("write input");
    let path = file.to_str().expect("utf-8 path");
    let out = helper.ctl(&["run", "--stdin", path, "--", "/usr/bin/sha256sum"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.starts_with(&sha256_hex(&input)), "{printed}");

    let mut child = helper
        .ctl_command(&["run", "--stdin", "-", "--", "/usr/bin/cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sandrunctl");
    let mut pipe = child.stdin.take().expect("stdin pipe");
    let sent = input.clone();
    let writer = std::thread::spawn(move || pipe.write_all(&sent));
    let out = child.wait_with_output().expect("sandrunctl ends");
    writer.join().expect("writer thread").expect("write stdin");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == input,
        "cat returned {} other bytes",
        out.stdout.len()
    );

    // Without --stdin the job reads end of file at once.
    let out = helper.ctl(&["run", "--", "/usr/bin/wc", "-c"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{out:?}");
}

#[test]
fn given_stdin_over_the_helpers_cap_or_short_then_the_helper_refuses_it() {
    let helper = Helper::start(&config("max_stdin_bytes = 1000"));
    let mut job = Job::new(&["/usr/bin/cat"]);
    job.spec.stdin_bytes = 1001;
    let outcome = helper.run(&job);
    let error = outcome.error.as_ref().expect("refused");
    assert_eq!(
        error.code,
        ErrorCode::InvalidRequest,
        "{}",
        outcome.describe()
    );
    assert!(
        error.message.contains("max_stdin_bytes"),
        "{}",
        error.message
    );
    // Declared stdin that never comes: refused at BundleEnd, the job never runs.
    let mut job = Job::new(&["/usr/bin/cat"]);
    job.spec.stdin_bytes = 10;
    let outcome = helper.run(&job);
    let error = outcome.error.as_ref().expect("refused");
    assert_eq!(
        error.code,
        ErrorCode::InvalidRequest,
        "{}",
        outcome.describe()
    );
    assert!(outcome.exit.is_none(), "{}", outcome.describe());
}
