//! Supervision of one running sandbox: its output pipes, its limits, its end.

#![forbid(unsafe_code)]

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use sandrun_ipc::{
    CollectOrder, ExitReason, ExitReport, FrameDecoder, GrantedLimits, JobId, OutputPattern,
    Response,
};

use super::conn::{Conn, HIGH_WATER};
use super::slots::Slot;
use crate::cgroup::{CgroupStats, JobCgroup};
use crate::ids::{GroupId, UserId};
use crate::sandbox::collector::{self, CollectorChild, CollectorPlan};
use crate::sandbox::{self, CgroupJoin, Spawned};

/// What the helper keeps of an accepted job between its bundle and its start.
pub struct JobMeta {
    pub id: JobId,
    pub label: String,
    pub slot: Slot,
    pub limits: GrantedLimits,
    pub outputs: Vec<OutputPattern>,
    /// The most output files returned (1000, or `max_build_output_files` for a build).
    pub max_output_files: usize,
    /// The output collection's CPU budget (longer for a build).
    pub collect_budget: Duration,
    /// The limits written into the sandbox's cgroup (also for a sandbox prepared on retry).
    pub cgroup_limits: crate::cgroup::CgroupLimits,
    /// `Cancel` (or an admin kill) arrived while starting: the job is killed once it runs, so
    /// the client gets `Started` and then `Exited` with reason `cancelled`, as before.
    pub cancelled: bool,
}

/// A job whose sandbox has been sent its order and has not yet reported that J has `execve`d
/// (the loop polls its control socket). Holds the job's slot; dropping the sandbox kills and
/// reaps C, after which the caller tears the cgroup down.
pub struct Starting {
    pub sandbox: sandbox::Starting,
    pub launch: Launch,
}

/// A job handed to a sandbox, all but the sandbox itself: what the job needs once it runs, and
/// what a retry in a fresh sandbox needs.
pub struct Launch {
    pub job: JobMeta,
    /// Kept so that a warm sandbox that turns out broken before it got the job can be replaced.
    pub order: sandbox::JobOrder,
    pub cgroup: Box<dyn JobCgroup>,
    /// CPU time the cgroup had used before the job (see [`Job::cpu_base_ns`]).
    pub cpu_base_ns: u64,
    /// The sandbox came from the pool (a failure it had before the job may be retried fresh).
    pub was_warm: bool,
}

/// One of the job's two output streams.
#[derive(Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub const BOTH: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

    /// The message that carries `chunk` of this stream to the client.
    pub fn message(self, chunk: Vec<u8>) -> Response {
        match self {
            Stream::Stdout => Response::Stdout(chunk),
            Stream::Stderr => Response::Stderr(chunk),
        }
    }
}

/// One output stream of the job (stdout or stderr).
pub struct Pipe {
    fd: Option<OwnedFd>,
    /// Bytes forwarded so far (at most the cap).
    pub kept: u64,
    pub truncated: bool,
}

impl Pipe {
    fn new(fd: OwnedFd) -> Self {
        Pipe {
            fd: Some(fd),
            kept: 0,
            truncated: false,
        }
    }

    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    pub fn is_open(&self) -> bool {
        self.fd.is_some()
    }

    /// Bytes waiting in the pipe (`FIONREAD`); 0 when closed or unknown.
    pub fn unread(&self) -> usize {
        let Some(fd) = self.fd.as_ref() else { return 0 };
        crate::sys::bytes_readable(fd.as_fd()).unwrap_or(0)
    }

    /// Reads once. Returns the bytes to forward (within `cap`); past the cap bytes are read and
    /// dropped, and the stream is flagged truncated. EOF closes the pipe.
    pub fn read_chunk(&mut self, cap: u64, buf: &mut [u8]) -> Option<Vec<u8>> {
        let fd = self.fd.as_ref()?;
        match nix::unistd::read(fd.as_raw_fd(), buf) {
            Ok(0) => {
                self.fd = None;
                None
            }
            Ok(n) => {
                let room = usize::try_from(cap.saturating_sub(self.kept)).unwrap_or(usize::MAX);
                let keep = n.min(room);
                if keep < n {
                    self.truncated = true;
                }
                self.kept += keep as u64;
                (keep > 0).then(|| buf[..keep].to_vec())
            }
            Err(Errno::EAGAIN | Errno::EINTR) => None,
            Err(_) => {
                self.fd = None;
                None
            }
        }
    }
}

/// A job whose sandbox is running (or has exited and is being drained).
pub struct Job {
    pub id: JobId,
    pub label: String,
    pub slot: Slot,
    pub started: Instant,
    pub limits: GrantedLimits,
    pub outputs: Vec<OutputPattern>,
    /// The most output files returned (see [`JobMeta::max_output_files`]).
    pub max_output_files: usize,
    /// The output collection's CPU budget (see [`JobMeta::collect_budget`]).
    pub collect_budget: Duration,
    pub cgroup: Box<dyn JobCgroup>,
    /// C's pid and pidfd.
    pub pid: crate::ids::ProcessId,
    pidfd: OwnedFd,
    /// Read end of the status pipe (non-blocking), until the status is read or C is reaped.
    status_pipe: Option<OwnedFd>,
    /// `/work` of the job's tmpfs; taken when outputs are streamed.
    pub workdir: Option<OwnedFd>,
    pub stdout: Pipe,
    pub stderr: Pipe,
    /// C has been reaped.
    pub reaped: bool,
    /// J's raw wait status, from the status pipe.
    pub status: Option<i32>,
    /// Why the helper killed the job, if it did.
    pub kill_reason: Option<ExitReason>,
    pub last_stats: CgroupStats,
    /// CPU time the cgroup had used before the job was started (a warm sandbox's preparation),
    /// subtracted from every reading so the job is charged only its own.
    pub cpu_base_ns: u64,
    /// Consecutive failed reads of the cgroup's figures.
    stats_failures: u32,
    /// When C exited; pipes still open long after that are closed by force.
    reaped_at: Option<Instant>,
    /// The lock hash of the job's template, for its exit report.
    template_lock: Option<[u8; 32]>,
    /// For a job that installed requirements first: the read end of its record pipe, relayed
    /// unread in its exit report.
    requirements: Option<OwnedFd>,
}

impl Job {
    /// The job `meta` runs in `sandbox`, whose cgroup had used `cpu_base_ns` before it.
    pub fn new(
        meta: JobMeta,
        cgroup: Box<dyn JobCgroup>,
        cpu_base_ns: u64,
        sandbox: Spawned,
    ) -> Job {
        let Spawned {
            pid,
            pidfd,
            stdout,
            stderr,
            status,
            workdir,
            template_lock,
            requirements,
            ..
        } = sandbox;
        // Read when poll says so (`on_status`); a blocking read could stall the loop.
        let _ = nix::fcntl::fcntl(
            status.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        Job {
            id: meta.id,
            label: meta.label,
            slot: meta.slot,
            started: Instant::now(),
            limits: meta.limits,
            outputs: meta.outputs,
            max_output_files: meta.max_output_files,
            collect_budget: meta.collect_budget,
            cgroup,
            pid,
            pidfd,
            status_pipe: Some(status),
            workdir: Some(workdir),
            stdout: Pipe::new(stdout),
            stderr: Pipe::new(stderr),
            reaped: false,
            status: None,
            kill_reason: None,
            last_stats: CgroupStats::default(),
            cpu_base_ns,
            stats_failures: 0,
            reaped_at: None,
            template_lock,
            requirements,
        }
    }

    /// Kills every process of the job and remembers why (the first reason wins).
    pub fn kill(&mut self, reason: ExitReason) {
        // Once signalled, repeating it (a flood of Cancel, every tick past a limit) only costs.
        if self.ended() || self.kill_reason.is_some() {
            return;
        }
        self.kill_reason = Some(reason);
        // SIGKILL to C ends the whole pid namespace; the cgroup kill catches anything that is
        // mid-fork. Errors are fine here: the process may already be gone.
        let _ = crate::sys::pidfd_kill(self.pidfd.as_fd());
        if let Err(e) = self.cgroup.kill_all() {
            log::warn!("cgroup kill failed job={} error={}", self.id, e);
        }
    }

    /// Periodic check of the wall-clock and CPU limits.
    pub fn check_limits(&mut self, now: Instant) {
        if self.ended() {
            return;
        }
        if now.duration_since(self.started) >= Duration::from_millis(self.limits.wall_ms) {
            self.kill(ExitReason::Timeout);
            return;
        }
        match self.stats() {
            Ok(stats) => {
                self.stats_failures = 0;
                self.last_stats = stats;
                if stats.cpu_ns / 1_000_000 >= self.limits.cpu_ms {
                    self.kill(ExitReason::CpuLimit);
                }
            }
            // Fail closed: a job whose CPU use cannot be read cannot be held to its limit.
            Err(e) => {
                self.stats_failures += 1;
                if self.stats_failures >= MAX_STATS_FAILURES {
                    log::error!(
                        "cannot read the job's cgroup; killing it job={} error={}",
                        self.id,
                        e
                    );
                    self.kill(ExitReason::Internal);
                }
            }
        }
    }

    /// The cgroup's figures, with the CPU time used before the job started taken out.
    fn stats(&self) -> Result<CgroupStats, crate::cgroup::CgroupError> {
        let mut stats = self.cgroup.stats()?;
        stats.cpu_ns = stats.cpu_ns.saturating_sub(self.cpu_base_ns);
        Ok(stats)
    }

    /// The status pipe, while the job has not ended.
    pub fn status_fd(&self) -> Option<BorrowedFd<'_>> {
        self.status_pipe.as_ref().map(AsFd::as_fd)
    }

    /// Called when the status pipe is readable. C writes J's status only after it has killed
    /// and reaped every other process of the job, so a status means nothing of the job runs any
    /// more (C itself is on its way out and is reaped later): the job has ended. End of file
    /// without a status means C died (killed): its exit is what ends the job, seen on the pidfd.
    pub fn on_status(&mut self) {
        let Some(fd) = self.status_pipe.take() else {
            return;
        };
        let mut buf = [0u8; 4];
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(4) => {
                self.status = Some(i32::from_ne_bytes(buf));
                self.reaped_at = Some(Instant::now());
            }
            // Not ready after all (spurious wake-up): keep waiting.
            Err(Errno::EAGAIN | Errno::EINTR) => self.status_pipe = Some(fd),
            // End of file or a short read: C died without reporting; the pidfd tells when.
            _ => {}
        }
    }

    /// Whether nothing of the job runs any more except, perhaps, C on its way out.
    pub fn ended(&self) -> bool {
        self.reaped || self.status.is_some()
    }

    /// Called when C's pidfd is readable: reaps C and reads J's status.
    pub fn reap(&mut self) {
        if self.reaped {
            return;
        }
        let pid = Pid::from_raw(self.pid.0);
        // Anything but "still alive" means C is gone (ECHILD included: nothing left to reap).
        if let Ok(WaitStatus::StillAlive) = waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            return;
        }
        self.reaped = true;
        self.reaped_at.get_or_insert_with(Instant::now);
        let mut buf = [0u8; 4];
        if let Some(fd) = self.status_pipe.take() {
            if std::fs::File::from(fd).read_exact(&mut buf).is_ok() {
                self.status = Some(i32::from_ne_bytes(buf));
            }
        }
        // Whatever is left in the pid namespace died with C; make sure of it.
        let _ = self.cgroup.kill_all();
    }

    pub fn pipe(&self, stream: Stream) -> &Pipe {
        match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        }
    }

    pub fn pipe_mut(&mut self, stream: Stream) -> &mut Pipe {
        match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        }
    }

    /// C's pidfd: readable once C has exited.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Whether the job has fully ended: nothing of it runs (see [`Job::ended`]) and both pipes
    /// are at EOF (or given up on).
    pub fn is_finished(&mut self, now: Instant) -> bool {
        if !self.ended() {
            return false;
        }
        if self.stdout.is_open() || self.stderr.is_open() {
            // Every writer died with the namespace, so the pipes end once drained. Unread data
            // means the client is slow (backpressure): wait for it, but not forever. An empty
            // pipe still open after a second means something holds it that should not.
            let since = self
                .reaped_at
                .map_or(Duration::ZERO, |t| now.duration_since(t));
            let unread = self.stdout.unread() + self.stderr.unread();
            let limit = if unread > 0 {
                DRAIN_TIMEOUT
            } else {
                Duration::from_secs(1)
            };
            if since <= limit {
                return false;
            }
            for pipe in [&mut self.stdout, &mut self.stderr] {
                if pipe.unread() > 0 {
                    pipe.truncated = true;
                }
                pipe.fd = None;
            }
            log::warn!(
                "output pipes still open after exit; closed job={} unread={}",
                self.id,
                unread
            );
        }
        true
    }

    /// Builds the exit report from the status and the cgroup's figures (and, for a job with
    /// requirements, what its record pipe holds).
    pub fn report(&mut self) -> ExitReport {
        if let Ok(stats) = self.stats() {
            self.last_stats = stats;
        }
        let s = self.last_stats;
        let (exit_code, signal) = decode_status(self.status);
        let success = exit_code == Some(0);
        let reason = if self.kill_reason == Some(ExitReason::Cancelled) {
            ExitReason::Cancelled
        } else if s.oom_kills > 0 {
            ExitReason::MemoryLimit
        } else if s.pids_max_events > 0 && !success {
            ExitReason::PidsLimit
        } else if let Some(r) = self.kill_reason {
            r
        } else if s.cpu_ns / 1_000_000 >= self.limits.cpu_ms {
            // RLIMIT_CPU (the backstop) ended it before the helper's check did.
            ExitReason::CpuLimit
        } else if self.status.is_none() {
            ExitReason::Internal
        } else if self.stdout.truncated || self.stderr.truncated {
            ExitReason::OutputLimit
        } else {
            ExitReason::None
        };
        let requirements = (self.requirements.as_ref())
            .map(|record| super::requirements::read_record(record.as_fd()));
        ExitReport {
            exit_code,
            signal,
            reason,
            cpu_ms: s.cpu_ns / 1_000_000,
            wall_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            memory_peak_bytes: s.memory_peak_bytes,
            stdout_truncated: self.stdout.truncated,
            stderr_truncated: self.stderr.truncated,
            template_lock: self.template_lock,
            requirements,
        }
    }
}

/// What is left of a job once it has been reported: its cgroup and slot, free now if C has been
/// reaped, or once C (already past the end of the job) has exited.
pub enum Released {
    Free {
        cgroup: Box<dyn JobCgroup>,
        slot: Slot,
    },
    Exiting(Exiting),
}

/// C after the end of its job, on its way out; its cgroup and slot are released once it is
/// reaped.
pub struct Exiting {
    pub pid: crate::ids::ProcessId,
    pidfd: OwnedFd,
    pub cgroup: Box<dyn JobCgroup>,
    pub slot: Slot,
    pub since: Instant,
}

impl Exiting {
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Reaps C if it has exited.
    pub fn try_reap(&self) -> bool {
        let pid = Pid::from_raw(self.pid.0);
        !matches!(
            waitpid(pid, Some(WaitPidFlag::WNOHANG)),
            Ok(WaitStatus::StillAlive)
        )
    }

    /// Kills C (it should have exited on its own).
    pub fn kill(&self) {
        let _ = crate::sys::pidfd_kill(self.pidfd.as_fd());
    }

    /// Kills C and waits for it.
    pub fn kill_and_reap(&self) {
        self.kill();
        let _ = waitpid(Pid::from_raw(self.pid.0), None);
    }
}

impl Job {
    /// Gives back the cgroup and slot, or what must be waited for before they are free.
    pub fn release(self) -> Released {
        if self.reaped {
            return Released::Free {
                cgroup: self.cgroup,
                slot: self.slot,
            };
        }
        Released::Exiting(Exiting {
            pid: self.pid,
            pidfd: self.pidfd,
            cgroup: self.cgroup,
            slot: self.slot,
            since: Instant::now(),
        })
    }
}

/// Consecutive failed cgroup reads after which a job is killed (reason `internal`).
const MAX_STATS_FAILURES: u32 = 10;
/// How long the pipes of an exited job wait for a client that does not read.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// The most CPU time one output collection's walk and hashing may take.
pub const COLLECT_BUDGET: Duration = Duration::from_secs(2);
/// The same for a template build (`JobSpec::build`: thousands of files, hundreds of MB to hash).
/// Below the helper's `COLLECT_STALL` (30 s without a frame from the collector), because the
/// walk sends nothing until it has hashed everything.
pub const BUILD_COLLECT_BUDGET: Duration = Duration::from_secs(20);

/// Splits a raw wait status into exit code or signal. No status (C died first): SIGKILL.
pub fn decode_status(status: Option<i32>) -> (Option<i32>, Option<i32>) {
    match status {
        Some(st) if libc::WIFEXITED(st) => (Some(libc::WEXITSTATUS(st)), None),
        Some(st) if libc::WIFSIGNALED(st) => (None, Some(libc::WTERMSIG(st))),
        _ => (None, Some(libc::SIGKILL)),
    }
}

/// A finished job's outputs being collected by its collector K (`sandbox::collector`, running
/// the `sandrun-outputs` executable) and relayed to the client. Holds the job (its cgroup, in which K runs,
/// and its slot) until K is done; K holds the job's tmpfs.
pub struct Collection {
    pub job: Box<Job>,
    child: CollectorChild,
    decoder: FrameDecoder,
    /// Bytes still due of the file being relayed.
    left: Option<u64>,
    files: usize,
    bytes: u64,
    /// Frames other than chunks relayed so far.
    frames: usize,
    /// When K last sent something (or the client last held the relay up).
    pub last_progress: Instant,
    eof: bool,
}

/// What a turn of [`Collection::relay`] came to.
pub enum Relayed {
    /// More is to come (K is working, or the client's buffer is full).
    Pending,
    /// K sent `Done` after a well-formed stream.
    Done,
    /// K could not be confined: its report (the collection does not run).
    Refused(String),
    /// K's stream was malformed or oversized, or K died before `Done`.
    Failed(String),
}

/// Largest number of bytes the helper reads from K per turn (the decoder then holds at most one
/// frame plus this).
const RELAY_READ: usize = 64 * 1024;

impl Collection {
    /// Forks K (a raw clone of the single-threaded helper, `one_thread`) for `job` (which has
    /// ended) as `uid`/`gid` in the job's cgroup, to collect beneath `workdir` (the helper's copy
    /// is closed once K has its own) with the collector executable `exe`.
    pub fn start(
        mut job: Box<Job>,
        workdir: OwnedFd,
        ids: (UserId, GroupId),
        (exe, one_thread): (BorrowedFd<'_>, crate::sys::SingleThreaded),
    ) -> Result<Collection, (Box<Job>, String)> {
        let order = CollectOrder {
            patterns: std::mem::take(&mut job.outputs),
            max_visited: u64::from(job.limits.file_count),
            max_total_bytes: job.limits.tmpfs_bytes,
            max_files: u64::try_from(job.max_output_files).unwrap_or(u64::MAX),
            budget_ms: u64::try_from(job.collect_budget.as_millis()).unwrap_or(u64::MAX),
        };
        let join: Vec<_> = job.cgroup.join_fds().iter().map(AsFd::as_fd).collect();
        let cgroup = match job.cgroup.clone_into() {
            Some(dir) => CgroupJoin::Into(dir),
            None => CgroupJoin::Procs(&join),
        };
        let plan = CollectorPlan {
            workdir: workdir.as_fd(),
            uid: ids.0,
            gid: ids.1,
            cgroup,
            exe,
            one_thread,
        };
        let spawned = collector::spawn(&plan, &order);
        drop(join);
        match spawned {
            Ok(child) => Ok(Collection {
                job,
                child,
                decoder: FrameDecoder::new(),
                left: None,
                files: 0,
                bytes: 0,
                frames: 0,
                last_progress: Instant::now(),
                eof: false,
            }),
            Err(e) => Err((job, format!("cannot start the output collector: {e}"))),
        }
    }

    /// K's socket, to poll for input.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.child.stream.as_fd()
    }

    /// Whether a file has been announced to the client and not all of its bytes sent.
    pub fn mid_file(&self) -> bool {
        self.left.is_some()
    }

    /// Relays what K has sent while the client's buffer has room (back-pressure: K blocks on a
    /// full socket meanwhile), checking every frame.
    pub fn relay(&mut self, conn: &mut Conn) -> Relayed {
        let mut buf = [0u8; RELAY_READ];
        loop {
            while conn.pending_out() < HIGH_WATER {
                let msg = match self.decoder.next_message::<Response>() {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        return Relayed::Failed(format!("malformed frame from the collector: {e}"))
                    }
                };
                match self.check(msg) {
                    Ok(Some(m)) => conn.send(&m),
                    Ok(None) => return Relayed::Done,
                    Err(r) => return r,
                }
            }
            if conn.pending_out() >= HIGH_WATER {
                // The client is slow, not K.
                self.last_progress = Instant::now();
                return Relayed::Pending;
            }
            if self.eof {
                return Relayed::Failed("the collector ended before its last message".into());
            }
            match (&self.child.stream).read(&mut buf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.decoder.push(&buf[..n]);
                    self.last_progress = Instant::now();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Relayed::Pending,
                Err(e) => return Relayed::Failed(format!("reading from the collector: {e}")),
            }
        }
    }

    /// One frame of K's stream: the message to relay, `None` for `Done`, or why the stream is
    /// refused. The order is that of the protocol (`OutputFile` then exactly its size in
    /// `OutputChunk`s; `OutputSkipped` and `Done` between files), and the counts and bytes are
    /// bounded by the job's own limits.
    fn check(&mut self, msg: Response) -> Result<Option<Response>, Relayed> {
        let bad = |what: &str| Err(Relayed::Failed(format!("collector stream: {what}")));
        if !matches!(msg, Response::OutputChunk(_)) {
            self.frames += 1;
            let most = usize::try_from(self.job.limits.file_count)
                .unwrap_or(usize::MAX)
                .saturating_add(self.job.max_output_files)
                .saturating_add(2);
            if self.frames > most {
                return bad("too many entries");
            }
        }
        match (&msg, self.left) {
            (Response::OutputChunk(c), Some(left)) => {
                let n = c.len() as u64;
                if n == 0 || n > left {
                    return bad("a chunk longer than its file");
                }
                self.left = Some(left - n).filter(|&l| l > 0);
            }
            (_, Some(_)) => return bad("a file cut short"),
            (Response::OutputFile(h), None) => {
                self.files += 1;
                self.bytes = self.bytes.saturating_add(h.size);
                if self.files > self.job.max_output_files
                    || self.bytes > self.job.limits.tmpfs_bytes
                {
                    return bad("more files or bytes than the job's limits");
                }
                self.left = Some(h.size).filter(|&s| s > 0);
            }
            (Response::OutputSkipped { .. }, None) => {}
            (Response::Done, None) => return Ok(None),
            (Response::Error(e), None) => return Err(Relayed::Refused(e.message.clone())),
            (other, None) => return bad(other.name()),
        }
        Ok(Some(msg))
    }

    /// Kills and reaps K (done or not) and gives back the job, to be released.
    pub fn end(mut self) -> Box<Job> {
        self.child.kill_and_reap();
        self.job
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_wait_statuses_then_exit_code_and_signal_are_decoded() {
        assert_eq!(decode_status(Some(3 << 8)), (Some(3), None));
        assert_eq!(
            decode_status(Some(libc::SIGSEGV)),
            (None, Some(libc::SIGSEGV))
        );
        assert_eq!(decode_status(None), (None, Some(libc::SIGKILL)));
    }

    #[test]
    fn given_output_past_the_cap_then_it_is_dropped_and_flagged() {
        let (r, w) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&w, &[b'x'; 100]).unwrap();
        drop(w);
        let mut p = Pipe::new(r);
        let mut buf = vec![0u8; 64];
        let mut got = Vec::new();
        while p.is_open() {
            if let Some(c) = p.read_chunk(70, &mut buf) {
                got.extend(c);
            }
        }
        assert_eq!(got.len(), 70);
        assert!(p.truncated);
        assert_eq!(p.kept, 70);
    }
}
