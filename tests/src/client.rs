//! Submitting jobs with the ipc crate directly, and raw frames for protocol abuse.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use sandrun_ipc::blocking::ClientChannel;
use sandrun_ipc::{
    BundleEntry, BundlePath, ChannelError, ExitReport, GrantedLimits, Hello, IpcError, JobId,
    JobSpec, Limits, OutputFileHeader, OutputPattern, PrintablePath, Request, Response, Role,
    SkipKind, MAX_CHUNK_BYTES, PROTOCOL_VERSION,
};

use crate::helper::{probe_binary, Helper, HANG_GUARD};

/// Where the probe lands inside the sandbox.
pub const PROBE_IN_SANDBOX: &str = "/work/sandrun-probe";

/// A job to submit: the spec and the concatenated contents of its files.
#[derive(Debug, Clone)]
pub struct Job {
    pub spec: JobSpec,
    contents: Vec<u8>,
}

impl Job {
    pub fn new(argv: &[&str]) -> Job {
        Job {
            spec: sandrun_test_support::job_spec(argv, "sandrun-tests"),
            contents: Vec::new(),
        }
    }

    /// Runs `/work/sandrun-probe ARGS`, with the probe sent as input (mode 0755).
    pub fn probe(args: &[&str]) -> Job {
        let bin = std::fs::read(probe_binary()).expect("read the probe binary");
        let mut argv = vec![PROBE_IN_SANDBOX];
        argv.extend_from_slice(args);
        Job::new(&argv).file("sandrun-probe", 0o755, &bin)
    }

    pub fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Job {
        let path = BundlePath::new(path).expect("valid test path");
        let size = data.len() as u64;
        self.spec
            .bundle
            .push(BundleEntry::File { path, mode, size });
        self.contents.extend_from_slice(data);
        self
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Job {
        let path = BundlePath::new(path).expect("valid test path");
        self.spec.bundle.push(BundleEntry::Dir { path, mode });
        self
    }

    pub fn output(mut self, pattern: &str) -> Job {
        self.spec
            .outputs
            .push(OutputPattern::new(pattern).expect("valid test pattern"));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Job {
        self.spec.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn label(mut self, label: &str) -> Job {
        label.clone_into(&mut self.spec.label);
        self
    }

    pub fn limits(mut self, f: impl FnOnce(&mut Limits)) -> Job {
        f(&mut self.spec.limits);
        self
    }
}

/// Everything the helper sent about one job.
#[derive(Debug, Default)]
pub struct Outcome {
    pub accepted: Option<(JobId, GrantedLimits)>,
    pub spawn_us: Option<u64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: Option<ExitReport>,
    pub outputs: Vec<(OutputFileHeader, Vec<u8>)>,
    pub skipped: Vec<(PrintablePath, SkipKind)>,
    pub error: Option<IpcError>,
    pub done: bool,
    /// How the connection ended if not with `Done` or `Error` (closed, I/O error).
    pub broken: Option<String>,
}

impl Outcome {
    /// The exit report; panics with everything received if there is none.
    pub fn report(&self) -> &ExitReport {
        match &self.exit {
            Some(r) => r,
            None => panic!("no exit report; outcome: {}", self.describe()),
        }
    }

    /// The `result` of the probe's JSON line.
    pub fn probe(&self) -> serde_json::Value {
        let text = String::from_utf8_lossy(&self.stdout);
        let line = text.lines().rev().find(|l| l.starts_with('{'));
        let parsed = line.and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok());
        match parsed {
            Some(v) => v["result"].clone(),
            None => panic!("the probe printed no JSON; outcome: {}", self.describe()),
        }
    }

    /// The content of a returned output file.
    pub fn output(&self, path: &str) -> Option<&[u8]> {
        self.outputs
            .iter()
            .find(|(h, _)| h.path.as_str() == path)
            .map(|(_, d)| d.as_slice())
    }

    /// A readable summary for assertion messages (stdout and stderr shortened).
    pub fn describe(&self) -> String {
        format!(
            "accepted={:?} exit={:?} error={:?} done={} broken={:?} skipped={:?} outputs={:?}\n\
             stdout: {}\nstderr: {}",
            self.accepted.as_ref().map(|a| a.0),
            self.exit,
            self.error,
            self.done,
            self.broken,
            self.skipped,
            self.outputs
                .iter()
                .map(|(h, _)| h.path.as_str())
                .collect::<Vec<_>>(),
            shorten(&self.stdout),
            shorten(&self.stderr),
        )
    }
}

fn shorten(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(2000)]).into_owned();
    if b.len() > 2000 {
        format!("{s}... ({} bytes)", b.len())
    } else {
        s
    }
}

/// What the probe prints on stderr once its watch or lock is in place.
pub const PROBE_READY: &str = "sandrun-probe: ready";

/// A connection carrying one submitted job.
pub struct JobConn {
    chan: ClientChannel<UnixStream>,
    pub outcome: Outcome,
}

impl JobConn {
    /// Reads until `Started` (or the end). Returns the job id once started.
    pub fn wait_started(&mut self) -> Option<JobId> {
        while self.outcome.spawn_us.is_none() && !self.is_over() {
            self.step();
        }
        self.outcome
            .spawn_us
            .and(self.outcome.accepted.as_ref().map(|a| a.0))
    }

    /// Reads until the job's stderr contains `needle` (or the end); whether it did.
    pub fn wait_stderr(&mut self, needle: &str) -> bool {
        let seen = |o: &Outcome| {
            o.stderr
                .windows(needle.len())
                .any(|w| w == needle.as_bytes())
        };
        while !seen(&self.outcome) && !self.is_over() {
            self.step();
        }
        seen(&self.outcome)
    }

    /// Sends `Cancel`.
    pub fn cancel(&mut self) {
        self.chan.send(&Request::Cancel).expect("send Cancel");
    }

    /// Reads until `Done`, an error or the end of the connection.
    pub fn finish(mut self) -> Outcome {
        while !self.is_over() {
            self.step();
        }
        self.outcome
    }

    fn is_over(&self) -> bool {
        self.outcome.done || self.outcome.error.is_some() || self.outcome.broken.is_some()
    }

    fn step(&mut self) {
        let o = &mut self.outcome;
        match self.chan.recv() {
            Ok(Response::Accepted { job_id, limits }) => o.accepted = Some((job_id, limits)),
            Ok(Response::Started { spawn_us }) => o.spawn_us = Some(spawn_us),
            Ok(Response::Stdout(d)) => o.stdout.extend_from_slice(&d),
            Ok(Response::Stderr(d)) => o.stderr.extend_from_slice(&d),
            Ok(Response::Exited(r)) => o.exit = Some(r),
            Ok(Response::OutputFile(h)) => o.outputs.push((h, Vec::new())),
            Ok(Response::OutputChunk(d)) => match o.outputs.last_mut() {
                Some((_, data)) => data.extend_from_slice(&d),
                None => o.broken = Some("OutputChunk without OutputFile".into()),
            },
            Ok(Response::OutputSkipped { path, kind }) => o.skipped.push((path, kind)),
            Ok(Response::Done) => o.done = true,
            Ok(Response::Error(e)) => o.error = Some(e),
            Ok(other) => o.broken = Some(format!("unexpected {other:?}")),
            Err(ChannelError::Closed) => o.broken = Some("closed".into()),
            Err(e) => o.broken = Some(e.to_string()),
        }
    }
}

impl Helper {
    /// Connects and completes the handshake; `Err` holds what the helper answered instead.
    pub fn try_connect(&self, role: Role) -> Result<ClientChannel<UnixStream>, String> {
        let stream = self.raw();
        let mut chan = ClientChannel::new(stream);
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            role,
        };
        chan.send(&Request::Hello(hello))
            .map_err(|e| format!("send hello: {e}"))?;
        match chan.recv() {
            Ok(Response::Hello(_)) => Ok(chan),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(format!("recv hello: {e}")),
        }
    }

    /// Connects as `role`; panics if refused.
    pub fn connect(&self, role: Role) -> ClientChannel<UnixStream> {
        self.try_connect(role)
            .unwrap_or_else(|e| panic!("handshake refused: {e}"))
    }

    /// Submits `job` (spec, bundle chunks, end) on a new connection.
    pub fn submit(&self, job: &Job) -> JobConn {
        let chan = self.connect(Role::Submitter);
        let mut conn = JobConn {
            chan,
            outcome: Outcome::default(),
        };
        if let Err(e) = send_job(&mut conn.chan, job) {
            // The helper may have refused already (busy, draining): read its answer.
            conn.step();
            if conn.outcome.error.is_none() && conn.outcome.broken.is_none() {
                conn.outcome.broken = Some(format!("send job: {e}"));
            }
        }
        conn
    }

    /// Submits `job` and waits for the whole result.
    pub fn run(&self, job: &Job) -> Outcome {
        self.submit(job).finish()
    }

    /// Sends one admin request on a new connection.
    pub fn admin(&self, req: sandrun_ipc::AdminRequest) -> Response {
        let mut chan = self.connect(Role::Admin);
        chan.send(&Request::Admin(req)).expect("send admin request");
        chan.recv().expect("admin answer")
    }

    /// A plain connection with a read timeout (a hang guard), for raw frames.
    pub fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(self.socket()).expect("connect to the helper");
        s.set_read_timeout(Some(HANG_GUARD))
            .expect("set read timeout");
        s
    }
}

fn send_job(chan: &mut ClientChannel<UnixStream>, job: &Job) -> Result<(), ChannelError> {
    chan.send(&Request::Submit(Box::new(job.spec.clone())))?;
    for chunk in job.contents.chunks(MAX_CHUNK_BYTES) {
        chan.send(&Request::BundleChunk(chunk.to_vec()))?;
    }
    chan.send(&Request::BundleEnd)
}

/// One encoded frame.
pub fn frame(req: &Request) -> Vec<u8> {
    sandrun_ipc::encode(req).expect("encode a test frame")
}

/// The encoded `Hello` for `role`.
pub fn hello_frame(role: Role) -> Vec<u8> {
    frame(&Request::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        role,
    }))
}

/// What a raw connection received until the helper closed it.
#[derive(Debug, Default)]
pub struct RawEnd {
    pub responses: Vec<Response>,
    /// `true` if the helper closed the connection (EOF or reset), `false` if the read timed out.
    pub closed: bool,
}

/// Panics unless the helper closed the connection and sent nothing on it but a handshake answer
/// and errors; `what` names the abuse in the message.
pub fn assert_closed(end: &RawEnd, what: &str) {
    assert!(
        end.closed,
        "{what}: the helper kept the connection open: {:?}",
        end.responses
    );
    let non_errors: Vec<&Response> = end
        .responses
        .iter()
        .filter(|r| !matches!(r, Response::Error(_) | Response::Hello(_)))
        .collect();
    assert!(
        non_errors.is_empty(),
        "{what}: unexpected answers {non_errors:?}"
    );
}

/// Writes `bytes` (errors ignored: the helper may close first), then reads responses until the
/// helper closes the connection.
pub fn send_raw_and_read(stream: &mut UnixStream, bytes: &[u8]) -> RawEnd {
    let _ = stream.write_all(bytes);
    read_until_closed(stream)
}

/// Reads and decodes responses until EOF.
pub fn read_until_closed(stream: &mut UnixStream) -> RawEnd {
    let mut buf = Vec::new();
    let mut end = RawEnd::default();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => {
                end.closed = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                end.closed = true;
                break;
            }
            Err(_) => break,
        }
    }
    let mut rest = buf.as_slice();
    while let Ok(Some((msg, used))) = sandrun_ipc::decode::<Response>(rest) {
        end.responses.push(msg);
        rest = &rest[used..];
    }
    end
}
