//! Protocol abuse and authorization against a real helper: every bad connection is closed on
//! its own while a concurrent job on another connection still completes.

use std::fs;
use std::net::Shutdown;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Output;

use sandrun_ipc::{ErrorCode, Hello, Request, Response, Role};
use sandrun_tests::client::{
    assert_closed, frame, hello_frame, read_until_closed, send_raw_and_read,
};
use sandrun_tests::{config, Config, Helper, Job};

/// `nobody`, made the gateway user in the authorization tests.
const GATEWAY_UID: u32 = 65534;
const GATEWAY_GID: u32 = 65534;
/// An unprivileged uid in the socket's group that is not the gateway user.
const STRANGER_UID: u32 = 65533;

/// Runs `abuse` while a job runs on another connection, then checks that job completed.
fn with_concurrent_job(helper: &Helper, abuse: impl FnOnce()) {
    let mut job = helper.submit(&Job::new(&["/bin/sh", "-c", "sleep 1; echo survived"]));
    job.wait_started().expect("the concurrent job started");
    abuse();
    let outcome = job.finish();
    assert_eq!(
        outcome.report().exit_code,
        Some(0),
        "{}",
        outcome.describe()
    );
    assert_eq!(outcome.stdout, b"survived\n", "{}", outcome.describe());
}

fn assert_still_serves(helper: &Helper) {
    let outcome = helper.run(&Job::new(&["/bin/echo", "still here"]));
    assert_eq!(outcome.stdout, b"still here\n", "{}", outcome.describe());
}

#[test]
fn given_garbage_bytes_then_only_that_connection_is_closed() {
    let helper = Helper::start(&config(""));
    with_concurrent_job(&helper, || {
        let http = b"GET / HTTP/1.1\r\nHost: sandrund\r\n\r\n";
        assert_closed(&send_raw_and_read(&mut helper.raw(), http), "http request");
        let mut junk = vec![8, 0, 0, 0];
        junk.extend_from_slice(&[0xff; 8]);
        assert_closed(
            &send_raw_and_read(&mut helper.raw(), &junk),
            "undecodable payload",
        );
    });
    assert_still_serves(&helper);
}

#[test]
fn given_header_announcing_4_gib_then_the_connection_is_closed_without_waiting() {
    let helper = Helper::start(&config(""));
    with_concurrent_job(&helper, || {
        // The stream stays open: a helper that waited for the payload would never answer.
        let mut stream = helper.raw();
        let end = send_raw_and_read(&mut stream, &[0xff, 0xff, 0xff, 0xff]);
        assert_closed(&end, "4 GiB header");
        let mut after_hello = hello_frame(Role::Submitter);
        after_hello.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_closed(
            &send_raw_and_read(&mut helper.raw(), &after_hello),
            "4 GiB after hello",
        );
    });
    assert_still_serves(&helper);
}

#[test]
fn given_truncated_frame_then_other_jobs_run_meanwhile_and_it_is_closed_at_eof() {
    let helper = Helper::start(&config(""));
    let mut stream = helper.raw();
    let hello = hello_frame(Role::Submitter);
    std::io::Write::write_all(&mut stream, &hello[..hello.len() - 1]).expect("write half");
    // The half-sent frame must not stall the single-threaded helper.
    with_concurrent_job(&helper, || {});
    stream.shutdown(Shutdown::Write).expect("shutdown");
    assert_closed(&read_until_closed(&mut stream), "truncated frame");
    assert_still_serves(&helper);
}

#[test]
fn given_bundle_chunk_before_submit_then_the_connection_is_closed() {
    let helper = Helper::start(&config(""));
    with_concurrent_job(&helper, || {
        let mut bytes = hello_frame(Role::Submitter);
        bytes.extend(frame(&Request::BundleChunk(vec![0; 16])));
        let end = send_raw_and_read(&mut helper.raw(), &bytes);
        assert_closed(&end, "chunk before submit");
        assert!(
            end.responses
                .iter()
                .any(|r| matches!(r, Response::Error(e) if e.code == ErrorCode::UnexpectedMessage)),
            "{:?}",
            end.responses
        );
    });
    assert_still_serves(&helper);
}

#[test]
fn given_submit_before_hello_then_the_connection_is_closed() {
    let helper = Helper::start(&config(""));
    with_concurrent_job(&helper, || {
        let submit = frame(&Request::Submit(Box::new(Job::new(&["/bin/true"]).spec)));
        let end = send_raw_and_read(&mut helper.raw(), &submit);
        assert_closed(&end, "submit before hello");
        assert!(
            !end.responses
                .iter()
                .any(|r| matches!(r, Response::Hello(_))),
            "{:?}",
            end.responses
        );
    });
    assert_still_serves(&helper);
}

#[test]
fn given_other_protocol_version_then_version_mismatch_and_close() {
    let helper = Helper::start(&config(""));
    let hello = Request::Hello(Hello {
        protocol_version: 999,
        role: Role::Submitter,
    });
    let end = send_raw_and_read(&mut helper.raw(), &frame(&hello));
    assert_closed(&end, "version 999");
    assert!(
        matches!(end.responses.first(), Some(Response::Error(e)) if e.code == ErrorCode::VersionMismatch),
        "{:?}",
        end.responses
    );
    assert_still_serves(&helper);
}

/// Runs sandrunctl as `uid`:`gid` (no supplementary groups).
fn ctl_as(helper: &Helper, uid: u32, gid: u32, args: &[&str]) -> Output {
    let mut cmd = helper.ctl_command(args);
    cmd.uid(uid).gid(gid).current_dir(helper.dir());
    cmd.output().expect("run sandrunctl as another user")
}

fn json_code(out: &Output) -> String {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["code"].as_str().unwrap_or_default().to_owned()
}

fn gateway_config() -> Config {
    config(&format!(
        "gateway_user = \"{GATEWAY_UID}\"\ngateway_group = \"{GATEWAY_GID}\""
    ))
}

#[test]
fn given_peer_with_another_uid_then_it_is_refused_and_the_helper_keeps_serving() {
    let helper = Helper::start(&gateway_config());
    // The stranger is in the socket's group, so only the helper's SO_PEERCRED check can stop it.
    let out = ctl_as(
        &helper,
        STRANGER_UID,
        GATEWAY_GID,
        &["run", "--json", "--", "/bin/true"],
    );
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let code = json_code(&out);
    assert!(
        code == "not_authorized" || code == "connection_failed",
        "{code}: {out:?}"
    );
    // Control: the gateway user, through the same path, is served.
    let ok = ctl_as(
        &helper,
        GATEWAY_UID,
        GATEWAY_GID,
        &["run", "--json", "--", "/bin/true"],
    );
    assert_eq!(
        ok.status.code(),
        Some(0),
        "the gateway user was refused: {ok:?}"
    );
    assert_still_serves(&helper);
}

#[test]
fn given_submitter_only_peer_when_sending_admin_requests_then_they_are_refused() {
    let helper = Helper::start(&gateway_config());
    for cmd in ["stats", "ps", "drain"] {
        let out = ctl_as(&helper, GATEWAY_UID, GATEWAY_GID, &["--json", cmd]);
        assert_eq!(out.status.code(), Some(125), "{cmd}: {out:?}");
        assert_eq!(json_code(&out), "not_authorized", "{cmd}: {out:?}");
    }
    // The refused drain did not take effect.
    assert_still_serves(&helper);
}

/// `sandrunctl run` writes `Hello`, `Submit` and the input in one write without waiting for
/// `Hello`'s answer: a peer that may connect (an admin) but not submit must still get the
/// helper's `not_authorized`, not a broken pipe or a closed connection, and no job runs.
#[test]
fn given_admin_only_peer_when_run_pipelines_its_job_then_the_refused_hello_is_reported() {
    let helper = Helper::start(&config(&format!(
        "gateway_user = \"{GATEWAY_UID}\"\ngateway_group = \"{GATEWAY_GID}\"\n\
         admin_group = \"{GATEWAY_GID}\""
    )));
    let dir = tempfile::tempdir_in(helper.dir()).expect("input dir");
    fs::write(dir.path().join("small"), b"pipelined with the job").expect("input file");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let input = dir.path().to_str().expect("utf-8 path");
    for args in [
        &["run", "--json", "--", "/bin/true"][..],
        &["run", "--json", "--input", input, "--", "/bin/true"][..],
    ] {
        let out = ctl_as(&helper, STRANGER_UID, GATEWAY_GID, args);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {out:?}");
        assert_eq!(json_code(&out), "not_authorized", "{args:?}: {out:?}");
    }
    // The same admin is served as an admin on the same socket.
    let stats = ctl_as(&helper, STRANGER_UID, GATEWAY_GID, &["--json", "stats"]);
    assert_eq!(stats.status.code(), Some(0), "{stats:?}");
    let v: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("stats json");
    assert_eq!(v["Stats"]["jobs_started"], 0, "{v}");
    assert_still_serves(&helper);
}

/// A refused `Submit` whose input was pipelined behind it (see the test above) is reported as
/// the helper's `busy`, and the running job is untouched.
#[test]
fn given_all_slots_busy_when_run_pipelines_a_small_input_then_busy_is_reported() {
    let helper = Helper::start(&config("max_concurrent = 1"));
    let mut first = helper.submit(&Job::new(&["/bin/sleep", "300"]));
    first.wait_started().expect("first job started");
    let dir = tempfile::tempdir_in(helper.dir()).expect("input dir");
    fs::write(dir.path().join("small"), b"pipelined with the job").expect("input file");
    let input = dir.path().to_str().expect("utf-8 path");
    let out = helper.ctl(&["run", "--json", "--input", input, "--", "/bin/true"]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert_eq!(json_code(&out), "busy", "{out:?}");
    first.cancel();
    let first = first.finish();
    assert_eq!(
        first.report().reason,
        sandrun_ipc::ExitReason::Cancelled,
        "{}",
        first.describe()
    );
    assert_still_serves(&helper);
}

#[test]
fn given_max_concurrent_one_when_a_second_job_arrives_then_it_gets_busy_at_once() {
    let helper = Helper::start(&config("max_concurrent = 1"));
    let mut first = helper.submit(&Job::new(&["/bin/sleep", "300"]));
    first.wait_started().expect("first job started");
    let second = helper.run(&Job::new(&["/bin/true"]));
    assert_eq!(
        second.error.as_ref().map(|e| e.code),
        Some(ErrorCode::Busy),
        "{}",
        second.describe()
    );
    assert!(second.accepted.is_none(), "{}", second.describe());
    first.cancel();
    let first = first.finish();
    assert_eq!(
        first.report().reason,
        sandrun_ipc::ExitReason::Cancelled,
        "{}",
        first.describe()
    );
    assert_still_serves(&helper);
}
