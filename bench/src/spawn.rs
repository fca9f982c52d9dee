//! Figures 1 (spawn) and 7 (scaling): a full-isolation `/bin/true` through the helper's socket,
//! exactly as `sandrunctl run` submits it, against bubblewrap and a plain fork+exec.
//!
//! A sandrun sample is timed twice: from the `Submit` frame sent to the `Exited` frame received
//! (the "request sent → exit reported"; the connection and its `Hello` exchange are done
//! first), and from `connect()` to `Exited` (handshake included). The job's outputs and `Done`
//! are read after the clock stops. Samples of the three kinds are interleaved, so that noise
//! from other work on the machine hits them alike.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandrun_ipc::blocking::ClientChannel;
use sandrun_ipc::{Hello, JobSpec, Request, Response, Role};

use crate::stats::{Row, Summary};
use crate::BenchError;

/// The bubblewrap reference: every namespace, read-only `/usr`, the usual symlinks, tmpfs
/// `/tmp`, fresh `/proc` and `/dev`.
pub const BWRAP_ARGS: [&str; 20] = [
    "--unshare-all",
    "--die-with-parent",
    "--ro-bind",
    "/usr",
    "/usr",
    "--symlink",
    "usr/lib",
    "/lib",
    "--symlink",
    "usr/lib64",
    "/lib64",
    "--symlink",
    "usr/bin",
    "/bin",
    "--tmpfs",
    "/tmp",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
];

/// The two intervals of one sandrun sample.
#[derive(Debug, Clone, Copy)]
pub struct SpawnTiming {
    /// `Submit` sent → `Exited` received.
    pub request: Duration,
    /// `connect()` → `Exited` received.
    pub connection: Duration,
}

/// One sandrun job running `/bin/true`.
pub fn sandrun_true(socket: &Path) -> Result<SpawnTiming, BenchError> {
    let connected = Instant::now();
    let mut ch = connect_submitter(socket)?;
    let requested = Instant::now();
    send(&mut ch, &Request::Submit(Box::new(true_spec())))?;
    send(&mut ch, &Request::BundleEnd)?;
    let timing = loop {
        match recv(&mut ch)? {
            Response::Exited(r) if r.exit_code == Some(0) => {
                break SpawnTiming {
                    request: requested.elapsed(),
                    connection: connected.elapsed(),
                }
            }
            Response::Exited(r) => return Err(BenchError::job(format!("/bin/true: {r:?}"))),
            Response::Error(e) => return Err(BenchError::job(format!("helper: {e}"))),
            _ => {}
        }
    };
    while !matches!(recv(&mut ch)?, Response::Done) {}
    Ok(timing)
}

/// One sandrun job that writes three small files, with (`collect`) or without an output pattern
/// that returns them; `Submit` sent → `Done` received (the outputs' collection included).
pub fn sandrun_outputs(socket: &Path, collect: bool) -> Result<Duration, BenchError> {
    let mut ch = connect_submitter(socket)?;
    let mut spec = true_spec();
    spec.argv = [
        "/bin/sh",
        "-c",
        "echo 1 > a.txt; echo 2 > b.txt; echo 3 > c.txt",
    ]
    .map(String::from)
    .into();
    if collect {
        spec.outputs = vec![sandrun_ipc::OutputPattern::new("*.txt")
            .map_err(|e| BenchError::job(format!("pattern: {e}")))?];
    }
    let requested = Instant::now();
    send(&mut ch, &Request::Submit(Box::new(spec)))?;
    send(&mut ch, &Request::BundleEnd)?;
    let mut files = 0;
    loop {
        match recv(&mut ch)? {
            Response::Exited(r) if r.exit_code != Some(0) => {
                return Err(BenchError::job(format!("outputs job: {r:?}")))
            }
            Response::OutputFile(_) => files += 1,
            Response::Done => break,
            Response::Error(e) => return Err(BenchError::job(format!("helper: {e}"))),
            _ => {}
        }
    }
    let elapsed = requested.elapsed();
    let want = if collect { 3 } else { 0 };
    if files != want {
        return Err(BenchError::job(format!("{files} outputs, expected {want}")));
    }
    Ok(elapsed)
}

/// Figure 10: a job with three small outputs, Submit → Done, against the same job returning
/// nothing (no collection at all), interleaved; then the same at concurrency 4.
pub fn figure_outputs(socket: &Path, runs: usize) -> Result<Vec<Row>, BenchError> {
    for _ in 0..5 {
        sandrun_outputs(socket, true)?;
        sandrun_outputs(socket, false)?;
    }
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        with.push(sandrun_outputs(socket, true)?);
        without.push(sandrun_outputs(socket, false)?);
    }
    let with4 = concurrent(4, runs, || sandrun_outputs(socket, true))?;
    let without4 = concurrent(4, runs, || sandrun_outputs(socket, false))?;
    let row = |what: &str, value: &[Duration], reference: &[Duration]| Row {
        figure: "10 outputs".into(),
        what: what.into(),
        unit: "ms",
        value: Summary::of_ms(value),
        reference: Some(("same job, no outputs".into(), Summary::of_ms(reference))),
        target: String::new(),
    };
    Ok(vec![
        row("3 small outputs, Submit → Done", &with, &without),
        row(
            "3 small outputs, Submit → Done, concurrency 4",
            &with4,
            &without4,
        ),
    ])
}

/// Connects to the helper and says `Hello` as a submitter.
pub fn connect_submitter(socket: &Path) -> Result<ClientChannel<UnixStream>, BenchError> {
    let stream = UnixStream::connect(socket).map_err(|e| BenchError::io("connect", e))?;
    let mut ch: ClientChannel<UnixStream> = ClientChannel::new(stream);
    let hello = Hello {
        protocol_version: sandrun_ipc::PROTOCOL_VERSION,
        role: Role::Submitter,
    };
    send(&mut ch, &Request::Hello(hello))?;
    match recv(&mut ch)? {
        Response::Hello(_) => Ok(ch),
        other => Err(BenchError::job(format!("helper greeted with {other:?}"))),
    }
}

fn true_spec() -> JobSpec {
    sandrun_test_support::job_spec(&["/bin/true"], "bench")
}

pub fn send(ch: &mut ClientChannel<UnixStream>, req: &Request) -> Result<(), BenchError> {
    ch.send(req)
        .map_err(|e| BenchError::job(format!("sending to the helper: {e}")))
}

pub fn recv(ch: &mut ClientChannel<UnixStream>) -> Result<Response, BenchError> {
    ch.recv()
        .map_err(|e| BenchError::job(format!("reading from the helper: {e}")))
}

/// `bwrap ... /bin/true`, start to exit.
pub fn bwrap_true() -> Result<Duration, BenchError> {
    let mut cmd = Command::new("bwrap");
    cmd.args(BWRAP_ARGS).arg("/bin/true");
    run_timed(cmd, "bwrap")
}

/// Plain fork+exec of `/bin/true`, start to exit.
pub fn fork_exec_true() -> Result<Duration, BenchError> {
    run_timed(Command::new("/bin/true"), "/bin/true")
}

fn run_timed(mut cmd: Command, what: &str) -> Result<Duration, BenchError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    let started = Instant::now();
    let status = cmd.status().map_err(|e| BenchError::io("spawn", e))?;
    let elapsed = started.elapsed();
    if !status.success() {
        return Err(BenchError::job(format!("{what} exited with {status}")));
    }
    Ok(elapsed)
}

/// Figure 1: `runs` samples of each kind, interleaved, after a short warm-up.
pub fn figure_spawn(socket: &Path, runs: usize) -> Result<Vec<Row>, BenchError> {
    for _ in 0..10 {
        sandrun_true(socket)?;
        bwrap_true()?;
    }
    let (mut ours, mut bwrap, mut fork) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        ours.push(sandrun_true(socket)?);
        bwrap.push(bwrap_true()?);
        fork.push(fork_exec_true()?);
    }
    let request: Vec<Duration> = ours.iter().map(|t| t.request).collect();
    let connection: Vec<Duration> = ours.iter().map(|t| t.connection).collect();
    let (bwrap, fork) = (Summary::of_ms(&bwrap), Summary::of_ms(&fork));
    let row = |what: &str, value: Summary, reference: &str, s: Summary, target: &str| Row {
        figure: "1 spawn".into(),
        what: what.into(),
        unit: "ms",
        value,
        reference: Some((reference.into(), s)),
        target: target.into(),
    };
    let (request, connection) = (Summary::of_ms(&request), Summary::of_ms(&connection));
    let submit = "sandrun /bin/true, Submit sent → Exited";
    let connect = "sandrun /bin/true, connect → Exited (handshake included)";
    Ok(vec![
        row(
            submit,
            request,
            "bwrap --unshare-all",
            bwrap,
            "p50 ≤ 0.4 × bwrap, p99 < 10 ms",
        ),
        row(submit, request, "fork+exec /bin/true", fork, ""),
        row(connect, connection, "bwrap --unshare-all", bwrap, ""),
    ])
}

/// Figure 7: `per_level` samples at each concurrency, sandrun and bwrap.
pub fn figure_scaling(socket: &Path, per_level: usize) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    for level in [1usize, 2, 4, 8] {
        let ours = concurrent(level, per_level, || sandrun_true(socket).map(|t| t.request))?;
        let bwrap = concurrent(level, per_level, bwrap_true)?;
        rows.push(Row {
            figure: "7 scaling".into(),
            what: format!("spawn at concurrency {level}"),
            unit: "ms",
            value: Summary::of_ms(&ours),
            reference: Some(("bwrap, same concurrency".into(), Summary::of_ms(&bwrap))),
            target: String::new(),
        });
    }
    Ok(rows)
}

/// Runs `f` on `level` threads until `total` samples are taken; returns them.
fn concurrent<F>(level: usize, total: usize, f: F) -> Result<Vec<Duration>, BenchError>
where
    F: Fn() -> Result<Duration, BenchError> + Sync,
{
    let per_thread = total.div_ceil(level);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..level)
            .map(|_| s.spawn(|| (0..per_thread).map(|_| f()).collect::<Result<Vec<_>, _>>()))
            .collect();
        let mut all = Vec::with_capacity(total);
        for h in handles {
            let samples = h
                .join()
                .map_err(|_| BenchError::job("a scaling thread panicked".to_owned()))??;
            all.extend(samples);
        }
        Ok(all)
    })
}
