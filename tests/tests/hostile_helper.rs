//! Attacks on the helper's socket that `protocol.rs` does not cover: unknown messages (valid
//! frames whose enum tag is out of range), thousands of abusive connections (the helper's memory,
//! descriptors and slots must stay flat), and a client asking for more than the helper's maxima.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use sandrun_ipc::{ErrorCode, ExitReason, GrantedLimits, Request, Response, Role};
use sandrun_tests::client::{
    assert_closed, frame, hello_frame, read_until_closed, send_raw_and_read,
};
use sandrun_tests::host::vm_rss_kib;
use sandrun_tests::hostile::{fd_count_once_at_most, helper_stats, settled_fd_count};
use sandrun_tests::{config, Helper, Job};

/// Tags one past the last variant of `Request` (7 variants, `ListTemplates` the last), `Role` (2) and `AdminRequest` (4).
const UNKNOWN_REQUEST_TAG: u8 = 7;
const UNKNOWN_ROLE_TAG: u8 = 2;
const UNKNOWN_ADMIN_TAG: u8 = 4;

/// A frame around a raw payload.
fn raw_frame(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small test payload");
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

#[test]
fn given_unknown_message_tags_then_only_that_connection_is_closed_and_counted() {
    let helper = Helper::start(&config(""));
    let mut survivor = helper.submit(&Job::new(&["/bin/sh", "-c", "sleep 2; echo survived"]));
    survivor.wait_started().expect("the concurrent job started");
    let errors_before = helper_stats(&helper).protocol_errors;

    let before_hello = raw_frame(&[UNKNOWN_REQUEST_TAG]);
    let mut after_hello = hello_frame(Role::Submitter);
    after_hello.extend(raw_frame(&[UNKNOWN_REQUEST_TAG]));
    // Hello { protocol_version: 1, role: <out of range> }.
    let bad_role = raw_frame(&[0, 1, UNKNOWN_ROLE_TAG]);
    let mut bad_admin = hello_frame(Role::Admin);
    bad_admin.extend(raw_frame(&[5, UNKNOWN_ADMIN_TAG]));
    // A huge varint tag (u32::MAX).
    let huge_tag = raw_frame(&[0xfb, 0xff, 0xff, 0xff, 0xff]);
    let cases = [
        ("unknown request before hello", before_hello),
        ("unknown request after hello", after_hello),
        ("unknown role in hello", bad_role),
        ("unknown admin request", bad_admin),
        ("u32::MAX tag", huge_tag),
    ];
    for (what, bytes) in &cases {
        let end = send_raw_and_read(&mut helper.raw(), bytes);
        assert_closed(&end, what);
        let malformed = end
            .responses
            .iter()
            .any(|r| matches!(r, Response::Error(e) if e.code == ErrorCode::MalformedFrame));
        assert!(
            malformed,
            "{what}: no MalformedFrame error: {:?}",
            end.responses
        );
    }

    let counted = helper_stats(&helper).protocol_errors - errors_before;
    assert_eq!(
        counted,
        cases.len() as u64,
        "every unknown message is a protocol error"
    );
    let outcome = survivor.finish();
    assert_eq!(outcome.stdout, b"survived\n", "{}", outcome.describe());
    assert_eq!(
        outcome.report().exit_code,
        Some(0),
        "{}",
        outcome.describe()
    );
}

/// One kind of abusive connection, by index.
fn abuse(helper: &Helper, kind: usize) {
    let mut s = helper.raw();
    match kind % 9 {
        0 => drop(send_raw_and_read(
            &mut s,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        )),
        1 => drop(send_raw_and_read(&mut s, &u32::MAX.to_le_bytes())),
        2 => truncated_frame(s),
        3 => drop(send_raw_and_read(
            &mut s,
            &raw_frame(&[UNKNOWN_REQUEST_TAG]),
        )),
        4 => {
            let submit = frame(&Request::Submit(Box::new(Job::new(&["/bin/true"]).spec)));
            drop(send_raw_and_read(&mut s, &submit));
        }
        5 => {
            // Hello, then gone without reading the answer.
            let _ = s.write_all(&hello_frame(Role::Submitter));
        }
        6 => abandoned_bundle(s),
        7 => oversized_bundle(s),
        _ => {
            let mut bytes = hello_frame(Role::Submitter);
            bytes.extend(raw_frame(&[UNKNOWN_REQUEST_TAG]));
            drop(send_raw_and_read(&mut s, &bytes));
        }
    }
}

/// Protocol errors the kinds of [`abuse`] are counted as, per round of nine.
const COUNTED_PER_ROUND: u64 = 6;

fn truncated_frame(mut s: UnixStream) {
    let hello = hello_frame(Role::Submitter);
    let _ = s.write_all(&hello[..hello.len() - 1]);
    let _ = s.shutdown(Shutdown::Write);
    drop(read_until_closed(&mut s));
}

fn bundle_job() -> Job {
    Job::new(&["/bin/true"]).file("data.bin", 0o644, &[7u8; 1000])
}

/// Accepted (a slot is reserved), ten of 1000 bundle bytes sent, then the client hangs up. The
/// helper must release the slot (waiting for it to close keeps the next connection from racing
/// the release).
fn abandoned_bundle(mut s: UnixStream) {
    let mut bytes = hello_frame(Role::Submitter);
    bytes.extend(frame(&Request::Submit(Box::new(bundle_job().spec))));
    bytes.extend(frame(&Request::BundleChunk(vec![7; 10])));
    let _ = s.write_all(&bytes);
    let _ = s.shutdown(Shutdown::Write);
    drop(read_until_closed(&mut s));
}

/// More bundle bytes than the spec declares.
fn oversized_bundle(mut s: UnixStream) {
    let mut bytes = hello_frame(Role::Submitter);
    bytes.extend(frame(&Request::Submit(Box::new(bundle_job().spec))));
    bytes.extend(frame(&Request::BundleChunk(vec![7; 2000])));
    drop(send_raw_and_read(&mut s, &bytes));
}

const WARMUP_ABUSE: usize = 198;
const MEASURED_ABUSE: usize = 2007;
/// RSS growth allowed over 2000 abusive connections: allocator noise, far below a per-connection
/// leak of even 1 KiB (2 MiB).
const RSS_SLACK_KIB: u64 = 1024;

#[test]
fn given_2000_abusive_connections_then_the_helper_stays_flat_and_keeps_its_slots() {
    let helper = Helper::start(&config("max_concurrent = 2"));
    let mut survivor = helper.submit(&Job::new(&["/bin/sleep", "600"]));
    survivor.wait_started().expect("the concurrent job started");
    for i in 0..WARMUP_ABUSE {
        abuse(&helper, i);
    }
    let rss_warm = vm_rss_kib(helper.pid());
    let fds_warm = settled_fd_count(helper.pid());
    let errors_warm = helper_stats(&helper).protocol_errors;

    for i in 0..MEASURED_ABUSE {
        abuse(&helper, i);
    }

    let rss = vm_rss_kib(helper.pid());
    let fds = fd_count_once_at_most(helper.pid(), fds_warm);
    let counted = helper_stats(&helper).protocol_errors - errors_warm;
    eprintln!("abuse: rss {rss_warm} -> {rss} KiB, fds {fds_warm} -> {fds}, errors {counted}");
    assert!(
        rss <= rss_warm + RSS_SLACK_KIB,
        "helper RSS grew {rss_warm} -> {rss} KiB"
    );
    assert!(
        fds <= fds_warm,
        "helper descriptors grew {fds_warm} -> {fds}"
    );
    let rounds = (MEASURED_ABUSE / 9) as u64;
    assert!(
        counted >= rounds * COUNTED_PER_ROUND,
        "only {counted} protocol errors counted"
    );
    // The long job's connection was never touched: it ends only when we cancel it.
    survivor.cancel();
    let outcome = survivor.finish();
    assert_eq!(
        outcome.report().reason,
        ExitReason::Cancelled,
        "{}",
        outcome.describe()
    );
    assert_both_slots_free(&helper);
}

/// Two jobs (`max_concurrent = 2`) start side by side: no slot was leaked by the abuse.
fn assert_both_slots_free(helper: &Helper) {
    let mut a = helper.submit(&Job::new(&["/bin/sleep", "600"]));
    let mut b = helper.submit(&Job::new(&["/bin/sleep", "600"]));
    let started = (a.wait_started(), b.wait_started());
    a.cancel();
    b.cancel();
    let (a, b) = (a.finish(), b.finish());
    assert!(started.0.is_some(), "first slot leaked: {}", a.describe());
    assert!(started.1.is_some(), "second slot leaked: {}", b.describe());
}

/// Small maxima, so that enforcing them is quick to observe.
const MAXIMA: &str = "[maxima]\nwall_ms = 1500\nmemory_bytes = 67108864\ncpu_ms = 1000\n\
                      pids = 16\noutput_bytes = 4096\ntmpfs_bytes = 8388608\nfile_count = 128\n";

fn expected_maxima() -> GrantedLimits {
    GrantedLimits {
        wall_ms: 1500,
        memory_bytes: 64 << 20,
        cpu_ms: 1000,
        pids: 16,
        output_bytes: 4096,
        tmpfs_bytes: 8 << 20,
        file_count: 128,
    }
}

fn greedy(job: Job) -> Job {
    job.limits(|l| {
        l.wall_ms = Some(u64::MAX);
        l.memory_bytes = Some(u64::MAX);
        l.cpu_ms = Some(u64::MAX);
        l.pids = Some(u32::MAX);
        l.output_bytes = Some(u64::MAX);
        l.tmpfs_bytes = Some(u64::MAX);
        l.file_count = Some(u32::MAX);
    })
}

#[test]
fn given_limits_above_the_maxima_then_they_are_clamped_and_the_clamped_values_enforced() {
    let helper = Helper::start(&config(MAXIMA));
    let sleeper = helper.run(&greedy(Job::new(&["/bin/sleep", "30"])));
    let granted = &sleeper.accepted.as_ref().expect("accepted").1;
    assert_eq!(granted, &expected_maxima(), "{}", sleeper.describe());
    let report = sleeper.report();
    assert_eq!(report.reason, ExitReason::Timeout, "{}", sleeper.describe());
    assert!(
        report.wall_ms < 10_000,
        "the 1.5 s wall clock was not enforced: {report:?}"
    );

    let flood = helper.run(&greedy(Job::new(&[
        "/bin/sh",
        "-c",
        "head -c 100000 /dev/zero",
    ])));
    assert_eq!(flood.stdout.len(), 4096, "{}", flood.describe());
    assert!(flood.report().stdout_truncated, "{}", flood.describe());

    let fill = "head -c 16777216 /dev/zero > /work/big; echo $? > /dev/null; ls -l /work/big";
    let filled = helper.run(&greedy(Job::new(&["/bin/sh", "-c", fill])));
    let size: u64 = String::from_utf8_lossy(&filled.stdout)
        .split_whitespace()
        .nth(4)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no size listed: {}", filled.describe()));
    assert!(size <= 8 << 20, "wrote {size} bytes into an 8 MiB tmpfs");
}
