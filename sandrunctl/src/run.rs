//! `sandrunctl run`: submit one job, stream its output, write its output files.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicUsize, Ordering};

use sandrun_ipc::{
    ExitReport, JobId, JobSpec, Limits, NetworkPolicy, OutputFileHeader, OutputPattern,
    PrintablePath, Request, Response, Role, SkipKind,
};

use crate::bundle::{self, Bundle};
use crate::cli::RunArgs;
use crate::conn::{self, Channel};
use crate::error::CtlError;
use crate::outputs::{hex, OutFile, Outputs};

/// Runs the job described by `args` and returns the exit code to use.
pub(crate) fn run(socket: &Path, args: &RunArgs, json: bool) -> Result<i32, CtlError> {
    let bundle = match &args.input {
        Some(dir) => bundle::walk(dir)?,
        None => Bundle::default(),
    };
    let stdin = match &args.stdin {
        Some(path) => read_stdin(path)?,
        None => Vec::new(),
    };
    let mut spec = job_spec(args, &bundle)?;
    spec.stdin_bytes = stdin.len() as u64;
    // Before anything is submitted: a refused output directory costs no job.
    let outputs = Outputs::plan(args.out_dir.as_deref(), spec.outputs.clone())?;
    let _interrupts = Interrupts::install()?;
    let first = first_frames(spec, &bundle, &stdin)?;
    let mut chan = conn::open(socket)?;
    conn::send_hello(&mut chan, Role::Submitter, &first.frames)?;
    // Once the whole input is written, a first Ctrl-C may send `Cancel` (the helper reads it
    // after the input, in order); before, it exits at once. The output directory is made only
    // after `Accepted`, so exiting at once never leaves one behind.
    if first.with_input {
        Interrupts::submitted(chan.get_ref().raw_fd());
    }
    conn::await_hello(&mut chan)?;
    let mut outputs = outputs;
    let job_id = upload(&mut chan, &first, &bundle, &stdin)?;
    Interrupts::submitted(chan.get_ref().raw_fd());
    outputs.accepted(job_id)?;
    let mut job = JobResult::new(json, outputs);
    job.receive(&mut chan)?;
    job.finish()
}

fn job_spec(args: &RunArgs, bundle: &Bundle) -> Result<JobSpec, CtlError> {
    let outputs = args
        .outputs
        .iter()
        .map(|p| {
            OutputPattern::new(p.as_str()).map_err(|e| CtlError::Output {
                path: p.clone(),
                reason: format!("invalid pattern: {e}"),
            })
        })
        .collect::<Result<_, _>>()?;
    let limits = Limits {
        wall_ms: args.timeout_s.map(|s| s.saturating_mul(1000)),
        memory_bytes: args.memory_mb.map(|m| m.saturating_mul(1024 * 1024)),
        cpu_ms: args.cpu_s.map(|s| s.saturating_mul(1000)),
        pids: args.pids,
        ..Limits::default()
    };
    Ok(JobSpec {
        argv: args.argv.clone(),
        env: args.env.clone(),
        workdir: String::new(),
        bundle: bundle.entries.clone(),
        limits,
        outputs,
        template: None,
        network: NetworkPolicy::None,
        label: "sandrunctl".to_owned(),
        stdin_bytes: 0,
        requirements: Vec::new(),
        build: args.build,
    })
}

/// The most bytes `--stdin` reads; the helper's `max_stdin_bytes` (16 MiB by default) is the
/// cap that usually applies, this one only bounds what this client holds in memory.
const MAX_STDIN_BYTES: u64 = 1 << 30;

/// Reads the job's stdin: the file at `path`, or this process's own stdin for `-`.
fn read_stdin(path: &Path) -> Result<Vec<u8>, CtlError> {
    let io = |source| CtlError::InputIo {
        path: path.to_owned(),
        source,
    };
    let source: Box<dyn Read> = if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(path).map_err(io)?)
    };
    let mut bytes = Vec::new();
    source
        .take(MAX_STDIN_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_STDIN_BYTES {
        return Err(CtlError::Input {
            path: path.to_owned(),
            reason: format!("stdin is larger than {MAX_STDIN_BYTES} bytes"),
        });
    }
    Ok(bytes)
}

/// The most input bytes (files and stdin) sent together with `Hello` and `Submit`, before the
/// helper has accepted the job. A larger input waits for `Accepted`, so that a refused job (for
/// example `busy`) costs no upload.
const PIPELINED_INPUT_BYTES: u64 = 64 * 1024;

/// The frames written right after `Hello`: `Submit`, and for a small input the whole input
/// and `BundleEnd` too.
struct FirstFrames {
    frames: Vec<u8>,
    /// Whether the input went with them.
    with_input: bool,
}

fn encoded(req: &Request, step: &'static str) -> Result<Vec<u8>, CtlError> {
    sandrun_ipc::encode(req).map_err(|e| CtlError::Channel {
        step,
        source: e.into(),
    })
}

fn first_frames(spec: JobSpec, bundle: &Bundle, stdin: &[u8]) -> Result<FirstFrames, CtlError> {
    let mut frames = encoded(&Request::Submit(Box::new(spec)), "sending the job")?;
    let input: u64 = bundle.files.iter().map(|(_, size)| size).sum::<u64>() + stdin.len() as u64;
    let with_input = input <= PIPELINED_INPUT_BYTES;
    if with_input {
        input_frames(bundle, stdin, |frame| {
            frames.extend_from_slice(&frame);
            Ok(())
        })?;
    }
    Ok(FirstFrames { frames, with_input })
}

/// Encodes the input files, then the stdin bytes, then `BundleEnd`, handing each frame to `put`.
fn input_frames(
    bundle: &Bundle,
    stdin: &[u8],
    mut put: impl FnMut(Vec<u8>) -> Result<(), CtlError>,
) -> Result<(), CtlError> {
    bundle::stream_files(&bundle.files, |chunk| {
        put(encoded(
            &Request::BundleChunk(chunk),
            "sending input files",
        )?)
    })?;
    for chunk in stdin.chunks(sandrun_ipc::MAX_CHUNK_BYTES) {
        put(encoded(
            &Request::BundleChunk(chunk.to_vec()),
            "sending stdin",
        )?)?;
    }
    put(encoded(&Request::BundleEnd, "ending the input")?)
}

/// Waits for the helper's verdict on the job (`Accepted`, or its error such as `busy`) and,
/// unless it already went with `Submit`, only then sends the input files, then the stdin bytes.
/// Returns the accepted job's id.
fn upload(
    chan: &mut Channel,
    first: &FirstFrames,
    bundle: &Bundle,
    stdin: &[u8],
) -> Result<JobId, CtlError> {
    const STEP: &str = "waiting for the helper to accept the job";
    let job_id = match conn::recv(chan, STEP)? {
        Response::Accepted { job_id, .. } => job_id,
        other => return Err(conn::unexpected(STEP, &other)),
    };
    if !first.with_input {
        input_frames(bundle, stdin, |frame| {
            conn::write_frames(chan, &frame, "sending input files")
        })?;
    }
    Ok(job_id)
}

/// What the SIGINT/SIGTERM handler needs: whether the job is fully submitted, whether it was
/// already cancelled, the socket, and the encoded `Cancel` frame (made before the handler is
/// installed, so the handler allocates nothing).
static SUBMITTED: AtomicBool = AtomicBool::new(false);
static CANCELLED: AtomicBool = AtomicBool::new(false);
static SOCKET_FD: AtomicI32 = AtomicI32::new(-1);
static CANCEL_FRAME: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static CANCEL_LEN: AtomicUsize = AtomicUsize::new(0);

/// SIGINT and SIGTERM during `run`. The first one sends `Cancel` once the job is fully
/// submitted (the helper then reports it as cancelled); before that, or on a second one, the
/// client exits at once with 128 + the signal, and closing the connection kills the job too.
///
/// A signal handler rather than a thread waiting in `sigwait`: the main thread is the only one
/// that writes to the socket, and after submission it only reads, so the handler's one small
/// write cannot interleave with another frame. Dropping this restores "exit at once".
struct Interrupts;

impl Interrupts {
    fn install() -> Result<Interrupts, CtlError> {
        if CANCEL_FRAME.load(Ordering::SeqCst).is_null() {
            let frame = encoded(&Request::Cancel, "preparing cancel")?.into_boxed_slice();
            CANCEL_LEN.store(frame.len(), Ordering::SeqCst);
            // Leaked on purpose: the handler may read it at any time until the process ends.
            CANCEL_FRAME.store(Box::leak(frame).as_mut_ptr(), Ordering::SeqCst);
        }
        SUBMITTED.store(false, Ordering::SeqCst);
        CANCELLED.store(false, Ordering::SeqCst);
        SOCKET_FD.store(-1, Ordering::SeqCst);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: `action` is fully initialised (zeroed, then handler, mask and flags set);
            // `on_interrupt` only calls async-signal-safe functions (`write`, `_exit`) and
            // touches only atomics and the leaked, never-freed `Cancel` frame.
            let rc = unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as usize;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaddset(&mut action.sa_mask, libc::SIGINT);
                libc::sigaddset(&mut action.sa_mask, libc::SIGTERM);
                libc::sigaction(sig, &action, std::ptr::null_mut())
            };
            if rc != 0 {
                return Err(CtlError::Channel {
                    step: "installing the Ctrl-C handler",
                    source: std::io::Error::last_os_error().into(),
                });
            }
        }
        Ok(Interrupts)
    }

    /// The job is fully submitted on `fd`: a first signal now cancels it.
    fn submitted(fd: i32) {
        SOCKET_FD.store(fd, Ordering::SeqCst);
        SUBMITTED.store(true, Ordering::SeqCst);
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        // The socket is about to close: from now on a signal exits at once.
        SUBMITTED.store(false, Ordering::SeqCst);
        SOCKET_FD.store(-1, Ordering::SeqCst);
    }
}

extern "C" fn on_interrupt(sig: libc::c_int) {
    let code = 128 + sig;
    if CANCELLED.swap(true, Ordering::SeqCst) || !SUBMITTED.load(Ordering::SeqCst) {
        // SAFETY: `_exit` is async-signal-safe and ends the process; nothing is left half-done
        // that a destructor would have to finish (see `Interrupts`).
        unsafe { libc::_exit(code) };
    }
    // SAFETY: `__errno_location` returns this thread's errno; it is saved and restored so the
    // interrupted call sees its own.
    let saved_errno = unsafe { *libc::__errno_location() };
    const MSG: &[u8] = b"sandrunctl: cancelling the job (again to quit at once)\n";
    // SAFETY: `write` is async-signal-safe; `MSG` is a static buffer of `MSG.len()` bytes.
    let _ = unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
    let fd = SOCKET_FD.load(Ordering::SeqCst);
    let frame = CANCEL_FRAME.load(Ordering::SeqCst);
    let len = CANCEL_LEN.load(Ordering::SeqCst);
    let mut sent = 0;
    while sent < len {
        // SAFETY: `frame` points to the leaked `len`-byte `Cancel` frame (stored before the
        // handler was installed, never freed), so `frame + sent` has `len - sent` valid bytes;
        // `write` is async-signal-safe.
        let n = unsafe { libc::write(fd, frame.add(sent).cast(), len - sent) };
        if n > 0 {
            sent += n.unsigned_abs();
        // SAFETY: as above, this thread's errno.
        } else if n < 0 && unsafe { *libc::__errno_location() } == libc::EINTR {
            continue;
        } else {
            // SAFETY: as above.
            unsafe { libc::_exit(code) };
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// Everything received about the job.
struct JobResult {
    json: bool,
    /// Where output files go; dropped without `commit`, it removes what it wrote.
    out: Outputs,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    report: Option<ExitReport>,
    current: Option<OutFile>,
    outputs: Vec<OutputFileHeader>,
    skipped: Vec<(PrintablePath, SkipKind)>,
}

impl JobResult {
    fn new(json: bool, out: Outputs) -> Self {
        JobResult {
            json,
            out,
            stdout: Vec::new(),
            stderr: Vec::new(),
            report: None,
            current: None,
            outputs: Vec::new(),
            skipped: Vec::new(),
        }
    }

    /// Handles responses until `Done`.
    fn receive(&mut self, chan: &mut Channel) -> Result<(), CtlError> {
        loop {
            let resp = conn::recv(chan, "waiting for the job")?;
            if matches!(resp, Response::Done) {
                return self.check_complete();
            }
            self.handle(resp)?;
        }
    }

    fn handle(&mut self, resp: Response) -> Result<(), CtlError> {
        match resp {
            Response::Started { .. } => Ok(()),
            Response::Stdout(data) => self.stream(&data, true),
            Response::Stderr(data) => self.stream(&data, false),
            Response::Exited(report) => {
                self.report = Some(report);
                Ok(())
            }
            Response::OutputFile(header) => self.begin_output(header),
            Response::OutputChunk(data) => self.output_chunk(&data),
            Response::OutputSkipped { path, kind } => {
                if !self.json {
                    eprintln!("sandrunctl: output {path} skipped: {}", kind.as_str());
                }
                self.skipped.push((path, kind));
                Ok(())
            }
            other => Err(conn::unexpected("waiting for the job", &other)),
        }
    }

    fn stream(&mut self, data: &[u8], is_stdout: bool) -> Result<(), CtlError> {
        if self.json {
            let buf = if is_stdout {
                &mut self.stdout
            } else {
                &mut self.stderr
            };
            buf.extend_from_slice(data);
            return Ok(());
        }
        // A closed stdout/stderr (e.g. `| head`) must not abort the job's bookkeeping.
        if is_stdout {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(data).and_then(|()| out.flush());
        } else {
            let _ = std::io::stderr().lock().write_all(data);
        }
        Ok(())
    }

    fn begin_output(&mut self, header: OutputFileHeader) -> Result<(), CtlError> {
        if self.current.is_some() {
            return Err(protocol(
                "an output file started before the previous one ended",
            ));
        }
        if !self.out.asked() {
            return Err(protocol("output file not asked for"));
        }
        let dir = self
            .out
            .dir()
            .ok_or_else(|| protocol("output file before the job was accepted"))?;
        let file = dir.create(header)?;
        self.current = Some(file);
        self.close_if_complete()
    }

    fn output_chunk(&mut self, data: &[u8]) -> Result<(), CtlError> {
        let file = self
            .current
            .as_mut()
            .ok_or_else(|| protocol("output chunk without header"))?;
        file.write_chunk(data)?;
        self.close_if_complete()
    }

    fn close_if_complete(&mut self) -> Result<(), CtlError> {
        if let Some(file) = self.current.take_if(|f| f.is_complete()) {
            let header = file.finish()?;
            if !self.json {
                eprintln!(
                    "sandrunctl: received {} ({} bytes)",
                    header.path, header.size
                );
            }
            self.outputs.push(header);
        }
        Ok(())
    }

    fn check_complete(&self) -> Result<(), CtlError> {
        if let Some(f) = &self.current {
            return Err(protocol(&format!("output {} ended early", f.path())));
        }
        if self.report.is_none() {
            return Err(protocol("the job ended without an exit report"));
        }
        Ok(())
    }

    /// Prints the JSON summary if asked and returns the exit code.
    fn finish(mut self) -> Result<i32, CtlError> {
        let report = self
            .report
            .clone()
            .ok_or_else(|| protocol("no exit report"))?;
        let code = exit_code(&report);
        // Every file has been verified: only now does anything appear in the output directory.
        let out_dir = std::mem::replace(&mut self.out, Outputs::NotAsked).commit()?;
        if self.json {
            println!("{}", self.to_json(&report, out_dir.as_deref()));
        } else if let Some(dir) = &out_dir {
            eprintln!(
                "sandrunctl: {} output files in {}",
                self.outputs.len(),
                dir.display()
            );
        }
        if !self.json && report.reason != sandrun_ipc::ExitReason::None {
            eprintln!("sandrunctl: job ended: {}", report.reason.as_str());
        }
        Ok(code)
    }

    fn to_json(&self, r: &ExitReport, out_dir: Option<&Path>) -> serde_json::Value {
        let outputs: Vec<_> = self
            .outputs
            .iter()
            .map(|h| serde_json::json!({"path": h.path.as_str(), "size": h.size, "sha256": hex(&h.sha256)}))
            .collect();
        let skipped: Vec<_> = self
            .skipped
            .iter()
            .map(|(p, k)| serde_json::json!({"path": p.as_str(), "kind": k.as_str()}))
            .collect();
        serde_json::json!({
            "exit_code": r.exit_code,
            "signal": r.signal,
            "reason": r.reason.as_str(),
            "stdout": String::from_utf8_lossy(&self.stdout),
            "stderr": String::from_utf8_lossy(&self.stderr),
            "stdout_truncated": r.stdout_truncated,
            "stderr_truncated": r.stderr_truncated,
            "cpu_ms": r.cpu_ms,
            "wall_ms": r.wall_ms,
            "memory_peak_bytes": r.memory_peak_bytes,
            "out_dir": out_dir.map(|d| d.display().to_string()),
            "outputs": outputs,
            "skipped": skipped,
        })
    }
}

/// The job's exit code, 128 + signal, or 125 if the report has neither.
fn exit_code(r: &ExitReport) -> i32 {
    match (r.exit_code, r.signal) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => crate::error::EXIT_CLIENT_ERROR,
    }
}

fn protocol(detail: &str) -> CtlError {
    CtlError::Protocol {
        step: "receiving outputs",
        detail: detail.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandrun_ipc::ExitReason;

    fn report(exit_code: Option<i32>, signal: Option<i32>) -> ExitReport {
        ExitReport {
            exit_code,
            signal,
            reason: ExitReason::None,
            cpu_ms: 0,
            wall_ms: 0,
            memory_peak_bytes: 0,
            stdout_truncated: false,
            stderr_truncated: false,
            template_lock: None,
            requirements: None,
        }
    }

    #[test]
    fn given_exit_or_signal_then_exit_code_follows_shell_convention() {
        assert_eq!(exit_code(&report(Some(3), None)), 3);
        assert_eq!(exit_code(&report(None, Some(9))), 137);
        assert_eq!(exit_code(&report(None, None)), 125);
    }
}
