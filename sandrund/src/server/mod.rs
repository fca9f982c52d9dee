//! The helper's single-threaded event loop: `poll` over the listening socket, client connections,
//! each starting sandbox's control socket, each job's pidfd and output pipes, and a self-pipe for
//! SIGTERM/SIGINT. Nothing waits on one sandbox: a start is a `Starting` state that completes
//! when its control message arrives, while the loop serves everyone else. A 100 ms tick (the poll
//! timeout while anything is pending) checks wall-clock and CPU limits, conversation deadlines
//! and retries cgroup removal.

pub(crate) mod collect;
mod conn;
mod job;
mod peer;
mod pool;
mod request;
mod requirements;
pub mod systemd;

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use sandrun_ipc::{
    AdminRequest, AdminResponse, ErrorCode, ExitReason, Hello, JobId, LatencySummary, Request,
    Response, Role, SandboxInfo, Stats, PROTOCOL_VERSION,
};

use crate::cgroup::{CgroupLimits, CgroupManager, JobCgroup};
use crate::config::Config;
use crate::ids::{GroupId, UserId};
use crate::sandbox::{
    self, seccomp::SeccompProgram, JobPlan, SandboxSettings, SetupStep, StartPoll,
};
use conn::{Conn, Incoming, State, HIGH_WATER};
use job::{Collection, Exiting, Job, JobMeta, Relayed, Released, Starting};
use peer::{authorize, may_build, may_connect, Peer};
use pool::{Pool, WarmSandbox};
use request::{validate, RequestError};

/// Most client connections at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 256;
/// Time a client has for the handshake and for each idle step.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time a client has to send its whole bundle.
const BUNDLE_TIMEOUT: Duration = Duration::from_secs(300);
const TICK: Duration = Duration::from_millis(100);
/// CPU bandwidth of one job: one full CPU.
const CPU_PERIOD_US: u64 = 100_000;
/// A collector that sends nothing for this long (while its client reads) is killed: its walk is
/// bounded to 2 s of CPU time, so this is far past any honest collection, even on a busy host.
const COLLECT_STALL: Duration = Duration::from_secs(30);
/// Spawn latency samples kept for the summary.
const LATENCY_SAMPLES: usize = 1024;

/// Helper-wide counters (the admin `stats` answer is built from these).
#[derive(Default)]
struct Counters {
    jobs_started: u64,
    by_reason: BTreeMap<&'static str, (ExitReason, u64)>,
    refused_busy: u64,
    refused_peer: u64,
    protocol_errors: u64,
    setup_failures: u64,
    spawn_us: VecDeque<u64>,
}

/// A job cgroup whose removal must be retried, and the slot it holds until then (a warm
/// sandbox that never ran a job holds none).
struct Teardown {
    cgroup: Box<dyn JobCgroup>,
    slot: Option<u32>,
    since: Instant,
}

/// Everything the loop owns.
pub struct Server {
    cfg: Config,
    listener: UnixListener,
    cgroups: Box<dyn CgroupManager>,
    filter: SeccompProgram,
    /// The output collector executable, opened at start-up (`sandbox::collector`).
    collector_exe: OwnedFd,
    settings: SandboxSettings,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    next_job: u64,
    /// `true` while a slot's uid may still own a process or a cgroup.
    slots: Vec<bool>,
    teardowns: Vec<Teardown>,
    /// Inits of jobs already reported, until they are reaped.
    exiting: BTreeMap<u64, Exiting>,
    next_exiting: u64,
    /// Sandboxes prepared ahead of jobs.
    pool: Pool,
    draining: bool,
    /// Set after an accept error (such as EMFILE) until the next tick.
    accept_paused: bool,
    /// One read buffer for every job's pipes (the loop reads one pipe at a time).
    pipe_buf: Vec<u8>,
    counters: Counters,
    signal_pipe: OwnedFd,
}

/// What a poll entry stands for.
#[derive(Clone, Copy)]
enum Token {
    Listener,
    Signal,
    Conn(u64),
    Stdout(u64),
    Stderr(u64),
    Pidfd(u64),
    Status(u64),
    /// C of a job already reported, on its way out.
    Exiting(u64),
    /// A job's output collector has sent something (or exited).
    Collector,
    /// A starting sandbox's control socket.
    Starting(u64),
}

static SIGNAL_WRITE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = SIGNAL_WRITE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; fd is the non-blocking write end of the
        // self-pipe, kept open for the life of the process; the buffer is a static byte.
        unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
    }
}

/// Installs SIGTERM/SIGINT handlers that wake the loop through a self-pipe, and ignores SIGPIPE so
/// writes to vanished clients fail with EPIPE instead of killing the helper.
fn install_signal_pipe() -> std::io::Result<OwnedFd> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    // The write end lives for the rest of the process: leak it on purpose.
    SIGNAL_WRITE_FD.store(std::os::fd::IntoRawFd::into_raw_fd(w), Ordering::Relaxed);
    let handler = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler only performs an async-signal-safe write to a pipe; no other handler
    // is installed for these signals in this process.
    unsafe {
        sigaction(Signal::SIGTERM, &handler)?;
        sigaction(Signal::SIGINT, &handler)?;
        sigaction(Signal::SIGPIPE, &ignore)?;
    }
    Ok(r)
}

impl Server {
    pub fn new(
        cfg: Config,
        listener: UnixListener,
        cgroups: Box<dyn CgroupManager>,
        filter: SeccompProgram,
        collector_exe: OwnedFd,
    ) -> std::io::Result<Server> {
        listener.set_nonblocking(true)?;
        let settings = SandboxSettings {
            mount_point: cfg.mount_point.clone(),
            template_dir: cfg.template_dir.clone(),
            wheelhouse_dir: cfg.wheelhouse_dir.clone(),
            start_timeout: Duration::from_secs(u64::from(cfg.start_timeout_s)),
        };
        let slots = vec![false; cfg.slot_count as usize];
        let pool = Pool::new(cfg.warm_sandboxes);
        Ok(Server {
            cfg,
            listener,
            cgroups,
            filter,
            collector_exe,
            settings,
            conns: BTreeMap::new(),
            next_conn: 0,
            next_job: 1,
            slots,
            teardowns: Vec::new(),
            exiting: BTreeMap::new(),
            next_exiting: 0,
            pool,
            draining: false,
            accept_paused: false,
            pipe_buf: vec![0u8; 64 * 1024],
            counters: Counters::default(),
            signal_pipe: install_signal_pipe()?,
        })
    }

    /// Runs until SIGTERM or SIGINT; then kills every sandbox, tears it down and returns.
    pub fn run(&mut self) -> std::io::Result<()> {
        let mut last_tick = Instant::now();
        loop {
            let refill = self.wants_refill(Instant::now());
            let events = self.wait(refill)?;
            if refill && events.is_empty() {
                // Nothing else to do: prepare one more sandbox ahead of the next job.
                self.refill_one();
            }
            let mut stop = false;
            for (token, revents) in events {
                match token {
                    Token::Listener => self.accept_all(),
                    Token::Signal => stop = true,
                    Token::Conn(id) => self.on_conn(id, revents),
                    Token::Stdout(id) => self.on_pipe(id, true),
                    Token::Stderr(id) => self.on_pipe(id, false),
                    Token::Pidfd(id) => self.on_exit(id),
                    Token::Status(id) => self.on_status(id),
                    Token::Exiting(id) => self.on_exiting(id),
                    Token::Starting(id) => self.on_starting(id),
                    // Relayed by `progress_all`, below.
                    Token::Collector => {}
                }
            }
            if stop {
                log::info!("signal received: killing sandboxes and exiting");
                let _ = systemd::notify("STOPPING=1");
                self.shutdown();
                return Ok(());
            }
            let now = Instant::now();
            if now.duration_since(last_tick) >= TICK {
                last_tick = now;
                self.tick(now);
            }
            self.progress_all();
        }
    }

    /// Builds the poll set from the current state and waits (not at all with `refill`: the
    /// caller prepares a sandbox if nothing is ready).
    fn wait(&mut self, refill: bool) -> std::io::Result<Vec<(Token, PollFlags)>> {
        let mut tokens = Vec::new();
        let mut fds: Vec<PollFd<'_>> = Vec::new();
        let full = self.conns.len() >= MAX_CONNECTIONS || self.accept_paused;
        if !full {
            fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
            tokens.push(Token::Listener);
        }
        fds.push(PollFd::new(self.signal_pipe.as_fd(), PollFlags::POLLIN));
        tokens.push(Token::Signal);
        for (&id, c) in &self.conns {
            if let Some(s) = &c.stream {
                // A peer that does not read what it is sent is not read from either (hang-ups
                // are reported regardless), so it cannot make the helper queue without bound.
                let mut ev = PollFlags::empty();
                if c.pending_out() < HIGH_WATER {
                    ev |= PollFlags::POLLIN;
                }
                if c.pending_out() > 0 {
                    ev |= PollFlags::POLLOUT;
                }
                fds.push(PollFd::new(s.as_fd(), ev));
                tokens.push(Token::Conn(id));
            }
            if let State::Starting(s) = &c.state {
                fds.push(PollFd::new(s.sandbox.ctrl(), PollFlags::POLLIN));
                tokens.push(Token::Starting(id));
            }
            if let State::Running(job) = &c.state {
                let room = c.pending_out() < HIGH_WATER || c.stream.is_none();
                for (fd, tok) in [
                    (job.stdout.fd(), Token::Stdout(id)),
                    (job.stderr.fd(), Token::Stderr(id)),
                ] {
                    if let (Some(fd), true) = (fd, room) {
                        fds.push(PollFd::new(fd, PollFlags::POLLIN));
                        tokens.push(tok);
                    }
                }
                if !job.reaped {
                    fds.push(PollFd::new(job.pidfd(), PollFlags::POLLIN));
                    tokens.push(Token::Pidfd(id));
                }
                if let Some(fd) = job.status_fd() {
                    fds.push(PollFd::new(fd, PollFlags::POLLIN));
                    tokens.push(Token::Status(id));
                }
            }
            // K blocks on its socket while the client's buffer is full (back-pressure).
            if let State::Collecting(col) = &c.state {
                if c.pending_out() < HIGH_WATER {
                    fds.push(PollFd::new(col.fd(), PollFlags::POLLIN));
                    tokens.push(Token::Collector);
                }
            }
        }
        for (&id, e) in &self.exiting {
            fds.push(PollFd::new(e.pidfd(), PollFlags::POLLIN));
            tokens.push(Token::Exiting(id));
        }
        let busy = !self.conns.is_empty()
            || !self.teardowns.is_empty()
            || !self.exiting.is_empty()
            || self.accept_paused;
        // A job whose wheels are being hashed goes on at the next turn, after the others.
        let hashing = self
            .conns
            .values()
            .any(|c| matches!(&c.state, State::Running(job) if job.is_hashing()));
        let timeout = if refill || hashing {
            PollTimeout::ZERO
        } else if busy {
            PollTimeout::from(100u16)
        } else {
            PollTimeout::NONE
        };
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
        Ok(fds
            .iter()
            .zip(tokens)
            .filter_map(|(fd, t)| fd.revents().filter(|r| !r.is_empty()).map(|r| (t, r)))
            .collect())
    }

    fn accept_all(&mut self) {
        while self.conns.len() < MAX_CONNECTIONS {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE and friends: stop polling the listener until the next tick
                    // instead of spinning on it.
                    log::warn!("accept failed; pausing accepts for a tick error={}", e);
                    self.accept_paused = true;
                    return;
                }
            };
            let peer = match Peer::of(&stream) {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("cannot read peer credentials; closing error={}", e);
                    continue;
                }
            };
            if !may_connect(&self.cfg, &peer) {
                self.counters.refused_peer += 1;
                log::warn!(
                    "refused connection from unauthorized peer uid={} gid={} pid={}",
                    peer.uid,
                    peer.gid,
                    peer.pid
                );
                refuse(stream);
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let id = self.next_conn;
            self.next_conn += 1;
            self.conns.insert(
                id,
                Conn::new(stream, peer, Instant::now() + HANDSHAKE_TIMEOUT),
            );
        }
    }

    fn on_conn(&mut self, id: u64, revents: PollFlags) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        if revents.intersects(PollFlags::POLLOUT) {
            conn.flush();
        }
        if revents.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            match conn.read() {
                Incoming::Messages(msgs) => {
                    for msg in msgs {
                        self.handle(&mut conn, msg);
                        if matches!(conn.state, State::Closing) {
                            break;
                        }
                    }
                }
                Incoming::Closed => self.peer_gone(&mut conn),
                Incoming::Malformed(e) => {
                    self.counters.protocol_errors += 1;
                    log::warn!("malformed frame; closing uid={} error={}", conn.peer.uid, e);
                    self.abort_conn(&mut conn, ErrorCode::MalformedFrame, e);
                }
            }
        }
        self.conns.insert(id, conn);
    }

    /// The peer closed: a running job is cancelled, anything else is dropped.
    fn peer_gone(&mut self, conn: &mut Conn) {
        conn.stream = None;
        match std::mem::replace(&mut conn.state, State::Closing) {
            State::Running(mut job) => {
                log::info!("client went away; killing the job job={}", job.id);
                job.kill(ExitReason::Cancelled);
                conn.state = State::Running(job);
            }
            State::Starting(s) => self.abandon_start(*s),
            State::Bundle { slot, .. } => self.slots[slot as usize] = false,
            _ => {}
        }
    }

    /// A protocol violation: kill what runs, send the error, close.
    fn abort_conn(&mut self, conn: &mut Conn, code: ErrorCode, msg: String) {
        match std::mem::replace(&mut conn.state, State::Closing) {
            State::Running(mut job) => {
                job.kill(ExitReason::Cancelled);
                conn.send(&Response::Error(sandrun_ipc::IpcError::new(code, msg)));
                conn.state = State::Running(job);
                return;
            }
            State::Starting(s) => self.abandon_start(*s),
            State::Bundle { slot, .. } => self.slots[slot as usize] = false,
            _ => {}
        }
        conn.fail(code, msg);
    }

    fn handle(&mut self, conn: &mut Conn, msg: Request) {
        let state = std::mem::replace(&mut conn.state, State::Closing);
        match (state, msg) {
            (State::AwaitHello, Request::Hello(h)) => self.on_hello(conn, h),
            (State::Idle(Role::Submitter), Request::Submit(spec)) => self.on_submit(conn, *spec),
            (State::Idle(role), Request::ListTemplates) => {
                conn.state = State::Idle(role);
                conn.deadline = Some(Instant::now() + IDLE_TIMEOUT);
                let (templates, omitted) = crate::template::list(&self.cfg.template_dir);
                for info in templates {
                    conn.send(&Response::Template(info));
                }
                conn.send(&Response::TemplatesEnd { omitted });
            }
            (State::Idle(Role::Admin), Request::Admin(req)) => {
                conn.state = State::Idle(Role::Admin);
                conn.deadline = Some(Instant::now() + IDLE_TIMEOUT);
                let resp = self.on_admin(req);
                conn.send(&resp);
            }
            (
                State::Bundle {
                    job,
                    id,
                    slot,
                    mut data,
                },
                Request::BundleChunk(chunk),
            ) => {
                if data.len() as u64 + chunk.len() as u64 > job.bundle_bytes {
                    self.slots[slot as usize] = false;
                    self.protocol_error(conn, "bundle data exceeds the declared file sizes");
                    return;
                }
                data.extend_from_slice(&chunk);
                conn.state = State::Bundle {
                    job,
                    id,
                    slot,
                    data,
                };
            }
            (
                State::Bundle {
                    job,
                    id,
                    slot,
                    data,
                },
                Request::BundleEnd,
            ) => {
                if data.len() as u64 != job.bundle_bytes {
                    self.slots[slot as usize] = false;
                    self.protocol_error(
                        conn,
                        "bundle data is shorter than the declared file sizes",
                    );
                    return;
                }
                self.start_job(conn, *job, id, slot, data);
            }
            (State::Running(mut job), Request::Cancel) => {
                job.kill(ExitReason::Cancelled);
                conn.state = State::Running(job);
            }
            // Killed as soon as it runs (see `Starting::cancelled`).
            (State::Starting(mut s), Request::Cancel) => {
                s.cancelled = true;
                conn.state = State::Starting(s);
            }
            // A Cancel that crossed the job's end: the job is over, its outputs still come.
            (state @ State::Collecting(_), Request::Cancel) => {
                conn.state = state;
            }
            (state, msg) => {
                conn.state = state;
                let what = msg.name();
                self.counters.protocol_errors += 1;
                log::warn!(
                    "unexpected message; closing uid={} message={}",
                    conn.peer.uid,
                    what
                );
                self.abort_conn(
                    conn,
                    ErrorCode::UnexpectedMessage,
                    format!("unexpected {what} message"),
                );
            }
        }
    }

    fn protocol_error(&mut self, conn: &mut Conn, msg: &str) {
        self.counters.protocol_errors += 1;
        log::warn!("{msg} uid={}", conn.peer.uid);
        conn.fail(ErrorCode::InvalidRequest, msg);
    }

    fn on_hello(&mut self, conn: &mut Conn, hello: Hello) {
        if hello.protocol_version != PROTOCOL_VERSION {
            self.counters.protocol_errors += 1;
            conn.fail(
                ErrorCode::VersionMismatch,
                format!(
                    "helper speaks protocol {PROTOCOL_VERSION}, peer {}",
                    hello.protocol_version
                ),
            );
            return;
        }
        if !authorize(&self.cfg, &conn.peer, hello.role) {
            self.counters.refused_peer += 1;
            log::warn!(
                "role refused for peer uid={} role={:?}",
                conn.peer.uid,
                hello.role
            );
            conn.fail(
                ErrorCode::NotAuthorized,
                format!("uid {} may not act as {:?}", conn.peer.uid, hello.role),
            );
            return;
        }
        conn.send(&Response::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            role: hello.role,
        }));
        conn.state = State::Idle(hello.role);
        conn.deadline = Some(Instant::now() + IDLE_TIMEOUT);
    }

    fn on_submit(&mut self, conn: &mut Conn, spec: sandrun_ipc::JobSpec) {
        if self.draining {
            conn.fail(
                ErrorCode::Draining,
                "the helper is draining and accepts no new jobs",
            );
            return;
        }
        let job = match validate(&self.cfg, spec) {
            Ok(j) => j,
            Err(RequestError::Invalid(m)) => return conn.fail(ErrorCode::InvalidRequest, m),
            Err(RequestError::NotFound(m)) => return conn.fail(ErrorCode::NotFound, m),
            Err(RequestError::TemplateMissing(m)) => {
                return conn.fail(ErrorCode::TemplateMissing, m)
            }
        };
        if job.build && !may_build(&self.cfg, &conn.peer) {
            return conn.fail(
                ErrorCode::InvalidRequest,
                "build: only root's sandrunctl env build may submit a template build job",
            );
        }
        let Some(slot) = self.reserve_slot() else {
            self.counters.refused_busy += 1;
            conn.fail(
                ErrorCode::Busy,
                format!("all {} sandbox slots are busy", self.cfg.max_concurrent),
            );
            return;
        };
        let id = JobId(self.next_job);
        self.next_job += 1;
        conn.send(&Response::Accepted {
            job_id: id,
            limits: job.limits.clone(),
        });
        conn.deadline = Some(Instant::now() + BUNDLE_TIMEOUT);
        let cap = usize::try_from(job.bundle_bytes)
            .unwrap_or(usize::MAX)
            .min(16 << 20);
        conn.state = State::Bundle {
            job: Box::new(job),
            id,
            slot,
            data: Vec::with_capacity(cap),
        };
    }

    /// A free slot, if fewer than `max_concurrent` jobs are live.
    ///
    /// A live job is one receiving its bundle, running, or collecting or streaming its outputs
    /// (it still holds its tmpfs): at most `max_concurrent` of them exist. A job whose `Done` has
    /// been sent is not live: its processes are all gone (C reports the status only after it has
    /// killed and reaped the rest), and only its cgroup's removal, or C's own exit, may still be pending.
    /// Such a slot keeps its uid until then (a uid is never reused while it may own anything),
    /// but it does not count against the cap, so a client that got `Done` and submits at once
    /// is not told `Busy`. The uids (`slot_count >= max_concurrent`) run out only if teardowns
    /// are stuck.
    fn reserve_slot(&mut self) -> Option<u32> {
        if self.live_jobs() >= self.cfg.max_concurrent as usize {
            return None;
        }
        let i = self.slots.iter().position(|s| !s)?;
        self.slots[i] = true;
        u32::try_from(i).ok()
    }

    /// Jobs that count against `max_concurrent` (see [`Server::reserve_slot`]).
    fn live_jobs(&self) -> usize {
        self.conns
            .values()
            .filter(|c| {
                matches!(
                    c.state,
                    State::Bundle { .. }
                        | State::Starting(_)
                        | State::Running(_)
                        | State::Collecting(_)
                )
            })
            .count()
    }

    fn start_job(
        &mut self,
        conn: &mut Conn,
        job: request::ValidJob,
        id: JobId,
        slot: u32,
        data: Vec<u8>,
    ) {
        conn.deadline = None;
        let cgroup_limits = CgroupLimits {
            memory_bytes: job.limits.memory_bytes,
            pids: job.limits.pids,
            cpu_quota_us: CPU_PERIOD_US,
            cpu_period_us: CPU_PERIOD_US,
        };
        let uid = self.cfg.slot_uid_base + slot;
        // The stdin bytes came last; validation made them part of `bundle_bytes`.
        let split = usize::try_from(job.bundle_bytes.saturating_sub(job.stdin_bytes))
            .unwrap_or(usize::MAX)
            .min(data.len());
        let (bundle_data, stdin) = data.split_at(split);
        let plan = JobPlan {
            argv: job.argv,
            env: job.env,
            workdir: job.workdir,
            uid: UserId(uid),
            gid: GroupId(uid),
            limits: &job.limits,
            bundle: &job.bundle,
            bundle_data,
            stdin,
            template: job.template,
            wheelhouse: job.requirements,
        };
        let order = sandbox::write_order(&plan);
        drop(plan);
        drop(data);
        let meta = JobMeta {
            id,
            label: job.label,
            slot,
            limits: job.limits,
            outputs: job.outputs,
            max_output_files: job.max_output_files,
            collect_budget: job.collect_budget,
            cgroup_limits,
        };
        match order {
            Ok(order) => {
                let warm = self.pool.take();
                self.launch(conn, meta, order, warm, false);
            }
            Err(e) => self.setup_failed(conn, &meta, &e),
        }
    }

    /// Hands `order` to a warm sandbox, or to one prepared now if there is none (or it turns
    /// out broken before the job had any part in it: then once more, fresh), and leaves the
    /// connection `Starting`: the loop polls the sandbox's control socket from here on.
    fn launch(
        &mut self,
        conn: &mut Conn,
        meta: JobMeta,
        order: sandbox::JobOrder,
        mut warm: Option<WarmSandbox>,
        cancelled: bool,
    ) {
        loop {
            let was_warm = warm.is_some();
            let ws = match warm.take() {
                Some(ws) => ws,
                None => match self.prepare_now(meta.id, &meta.cgroup_limits) {
                    Ok(ws) => ws,
                    Err((code, msg)) => return self.start_refused(conn, &meta, code, msg),
                },
            };
            let WarmSandbox {
                warm: sb,
                mut cgroup,
            } = ws;
            let base = match set_job_limits(cgroup.as_mut(), &meta.cgroup_limits) {
                Ok(base) => base,
                Err(msg) => {
                    drop(sb);
                    self.teardown(cgroup, None);
                    if was_warm {
                        // Its cgroup broke while it waited (removed by hand, or by another
                        // helper's stale-cgroup cleanup): the job had no part in it.
                        log::warn!("a warm sandbox's cgroup had failed; preparing a fresh one job={} error={}", meta.id, msg);
                        self.pool.pause(Instant::now());
                        continue;
                    }
                    return self.start_refused(conn, &meta, ErrorCode::SandboxSetup, msg);
                }
            };
            match sandbox::begin(&self.settings, sb, &order) {
                Ok(starting) => {
                    conn.state = State::Starting(Box::new(Starting {
                        job: meta,
                        order,
                        sandbox: starting,
                        cgroup,
                        cpu_base_ns: base,
                        was_warm,
                        cancelled,
                    }));
                    return;
                }
                Err(e) => {
                    return self.start_failed(conn, meta, order, cgroup, was_warm, cancelled, e)
                }
            }
        }
    }

    /// The control socket of a starting sandbox is readable: the job runs, or its start failed
    /// (retried in a fresh sandbox if a warm one failed before it got the job).
    fn on_starting(&mut self, id: u64) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        match std::mem::replace(&mut conn.state, State::Closing) {
            State::Starting(s) => {
                let Starting {
                    job,
                    order,
                    sandbox,
                    cgroup,
                    cpu_base_ns,
                    was_warm,
                    cancelled,
                } = *s;
                match sandbox.poll() {
                    Ok(StartPoll::Pending(sandbox)) => {
                        conn.state = State::Starting(Box::new(Starting {
                            job,
                            order,
                            sandbox,
                            cgroup,
                            cpu_base_ns,
                            was_warm,
                            cancelled,
                        }));
                    }
                    Ok(StartPoll::Started(spawned)) => {
                        self.started(&mut conn, job, spawned, cgroup, cpu_base_ns, cancelled);
                    }
                    Err(e) => {
                        self.start_failed(&mut conn, job, order, cgroup, was_warm, cancelled, e)
                    }
                }
            }
            other => conn.state = other,
        }
        self.conns.insert(id, conn);
    }

    /// J has `execve`d: tell the client and supervise the job.
    fn started(
        &mut self,
        conn: &mut Conn,
        meta: JobMeta,
        sb: sandbox::Spawned,
        cgroup: Box<dyn JobCgroup>,
        cpu_base_ns: u64,
        cancelled: bool,
    ) {
        let us = u64::try_from(sb.spawn_time.as_micros()).unwrap_or(u64::MAX);
        self.record_spawn(us);
        log::info!(
            "job started job={} label={} slot={} spawn_us={}",
            meta.id,
            meta.label,
            meta.slot,
            us
        );
        conn.send(&Response::Started { spawn_us: us });
        let JobMeta {
            id,
            label,
            slot,
            limits,
            outputs,
            max_output_files,
            collect_budget,
            ..
        } = meta;
        let mut j = Job::new(id, label, slot, limits, outputs, cgroup, sb);
        j.cpu_base_ns = cpu_base_ns;
        j.max_output_files = max_output_files;
        j.collect_budget = collect_budget;
        if cancelled || conn.stream.is_none() {
            j.kill(ExitReason::Cancelled);
        }
        conn.state = State::Running(Box::new(j));
    }

    /// A start failed (C reported a step, died, or timed out; C is killed and reaped).
    #[allow(clippy::too_many_arguments)]
    fn start_failed(
        &mut self,
        conn: &mut Conn,
        meta: JobMeta,
        order: sandbox::JobOrder,
        cgroup: Box<dyn JobCgroup>,
        was_warm: bool,
        cancelled: bool,
        e: sandbox::StartError,
    ) {
        self.teardown(cgroup, None);
        if was_warm && !e.prepared {
            log::warn!(
                "a warm sandbox had failed; preparing a fresh one job={} error={}",
                meta.id,
                e.error
            );
            self.pool.pause(Instant::now());
            return self.launch(conn, meta, order, None, cancelled);
        }
        self.setup_failed(conn, &meta, &e.error);
    }

    /// The job cannot run: `ExecFailed` for the program, `SandboxSetup` for any other step.
    fn setup_failed(&mut self, conn: &mut Conn, meta: &JobMeta, error: &sandbox::SetupError) {
        let code = if error.step == SetupStep::Exec {
            ErrorCode::ExecFailed
        } else {
            ErrorCode::SandboxSetup
        };
        self.start_refused(conn, meta, code, error.to_string());
    }

    /// Frees the slot of a job whose sandbox did not start (nothing of it runs: C, if there
    /// was one, is reaped and its cgroup handed to teardown) and tells the client.
    fn start_refused(&mut self, conn: &mut Conn, meta: &JobMeta, code: ErrorCode, msg: String) {
        self.counters.setup_failures += 1;
        log::error!("sandbox setup failed job={} error={}", meta.id, msg);
        self.slots[meta.slot as usize] = false;
        conn.fail(code, msg);
    }

    /// Drops a start in progress (the client went away, broke the protocol, or the helper
    /// stops): kills and reaps C, tears down its cgroup, frees the slot.
    fn abandon_start(&mut self, s: Starting) {
        log::info!("sandbox start abandoned job={}", s.job.id);
        drop(s.sandbox);
        self.teardown(s.cgroup, None);
        self.slots[s.job.slot as usize] = false;
    }

    /// Starts that have not answered by their deadline fail (`Protocol`, ETIMEDOUT).
    fn check_starts(&mut self, now: Instant) {
        let late: Vec<u64> = (self.conns.iter())
            .filter(|(_, c)| matches!(&c.state, State::Starting(s) if now >= s.sandbox.deadline()))
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            let Some(mut conn) = self.conns.remove(&id) else {
                continue;
            };
            if let State::Starting(s) = std::mem::replace(&mut conn.state, State::Closing) {
                let s = *s;
                let e = s.sandbox.timed_out();
                self.start_failed(
                    &mut conn,
                    s.job,
                    s.order,
                    s.cgroup,
                    s.was_warm,
                    s.cancelled,
                    e,
                );
            }
            self.conns.insert(id, conn);
        }
    }

    /// Prepares a sandbox for job `id` at once (the pool was empty).
    fn prepare_now(
        &mut self,
        id: JobId,
        limits: &CgroupLimits,
    ) -> Result<WarmSandbox, (ErrorCode, String)> {
        let name = format!("job-{}", id.0);
        let prepared = pool::prepare(&name, &*self.cgroups, &self.settings, &self.filter, limits);
        prepared.map_err(|f| (ErrorCode::SandboxSetup, self.discard(f)))
    }

    /// Whether the loop should prepare a sandbox ahead when it is idle. While jobs run, only a
    /// pool down to its last half is refilled: cloning takes most of a millisecond of the loop,
    /// which a job that is about to end would otherwise wait for before its end is reported;
    /// under a steady load the pool still never runs dry.
    fn wants_refill(&self, now: Instant) -> bool {
        if self.draining || !self.pool.wants_more(now) {
            return false;
        }
        let running = self
            .conns
            .values()
            .any(|c| matches!(c.state, State::Starting(_) | State::Running(_)));
        !running || self.pool.is_low()
    }

    /// Prepares one sandbox for the pool, with the default limits (each job's own are written
    /// when it starts).
    fn refill_one(&mut self) {
        let d = &self.cfg.defaults;
        let limits = CgroupLimits {
            memory_bytes: d.memory_bytes,
            pids: d.pids,
            cpu_quota_us: CPU_PERIOD_US,
            cpu_period_us: CPU_PERIOD_US,
        };
        if let Err(f) = self
            .pool
            .fill_one(&*self.cgroups, &self.settings, &self.filter, &limits)
        {
            self.counters.setup_failures += 1;
            let message = self.discard(f);
            log::error!(
                "cannot prepare a warm sandbox; retrying in 1 s error={}",
                message
            );
            self.pool.pause(Instant::now());
        }
    }

    /// Tears down what a failed preparation left (its cgroup; C is already reaped) and returns
    /// why it failed.
    fn discard(&mut self, failed: pool::Failed) -> String {
        if let Some(cgroup) = failed.cgroup {
            self.teardown(cgroup, None);
        }
        failed.message
    }

    /// Kills the warm sandboxes and removes their cgroups.
    fn empty_pool(&mut self) {
        for ws in self.pool.take_all() {
            drop(ws.warm);
            self.teardown(ws.cgroup, None);
        }
    }

    fn record_spawn(&mut self, us: u64) {
        self.counters.jobs_started += 1;
        if self.counters.spawn_us.len() == LATENCY_SAMPLES {
            self.counters.spawn_us.pop_front();
        }
        self.counters.spawn_us.push_back(us);
    }

    fn on_pipe(&mut self, id: u64, stdout: bool) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let State::Running(job) = &mut conn.state else {
            return;
        };
        let cap = job.limits.output_bytes;
        let pipe = if stdout {
            &mut job.stdout
        } else {
            &mut job.stderr
        };
        if let Some(chunk) = pipe.read_chunk(cap, &mut self.pipe_buf) {
            let msg = if stdout {
                Response::Stdout(chunk)
            } else {
                Response::Stderr(chunk)
            };
            conn.send(&msg);
        }
    }

    fn on_status(&mut self, id: u64) {
        if let Some(conn) = self.conns.get_mut(&id) {
            if let State::Running(job) = &mut conn.state {
                job.on_status();
            }
        }
    }

    /// The init of a reported job has exited: reap it, then free its cgroup and slot.
    fn on_exiting(&mut self, id: u64) {
        if self.exiting.get(&id).is_some_and(Exiting::try_reap) {
            if let Some(e) = self.exiting.remove(&id) {
                self.teardown(e.cgroup, Some(e.slot));
            }
        }
    }

    /// Frees a reported job's cgroup and slot now, or once its init has exited.
    fn release(&mut self, job: Job) {
        match job.release() {
            Released::Free(cgroup, slot) => self.teardown(cgroup, Some(slot)),
            Released::Exiting(e) => {
                self.next_exiting += 1;
                self.exiting.insert(self.next_exiting, e);
            }
        }
    }

    fn on_exit(&mut self, id: u64) {
        if let Some(conn) = self.conns.get_mut(&id) {
            if let State::Running(job) = &mut conn.state {
                job.reap();
            }
        }
    }

    /// Moves every connection forward where it can: finished jobs report and collect their
    /// outputs, collections are relayed into the send buffer, buffers are flushed, finished
    /// connections dropped.
    fn progress_all(&mut self) {
        let now = Instant::now();
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(mut conn) = self.conns.remove(&id) else {
                continue;
            };
            self.progress(&mut conn, now);
            conn.flush();
            if !conn.is_done() {
                self.conns.insert(id, conn);
            }
        }
    }

    fn progress(&mut self, conn: &mut Conn, now: Instant) {
        match std::mem::replace(&mut conn.state, State::Closing) {
            State::Running(mut job) => {
                if job.is_finished(now) && job.requirements_hashed(&self.cfg.wheelhouse_dir) {
                    self.finish(conn, job);
                    // Relay at once what the collector may already have sent.
                    if matches!(conn.state, State::Collecting(_)) {
                        self.progress(conn, now);
                    }
                } else {
                    conn.state = State::Running(job);
                }
            }
            State::Collecting(mut c) => {
                if conn.stream.is_none() {
                    // The client is gone: nobody wants the outputs.
                    self.release(*c.end());
                    return;
                }
                match c.relay(conn) {
                    Relayed::Pending => conn.state = State::Collecting(c),
                    Relayed::Done => {
                        conn.send(&Response::Done);
                        self.release(*c.end());
                    }
                    Relayed::Refused(msg) => {
                        log::error!(
                            "output collector could not be confined job={} error={}",
                            c.job.id,
                            msg
                        );
                        self.release(*c.end());
                        conn.fail(ErrorCode::SandboxSetup, msg);
                    }
                    Relayed::Failed(why) => self.collection_failed(conn, *c, &why),
                }
            }
            other => conn.state = other,
        }
    }

    /// The job's collection failed (its collector misbehaved, died or overran): the job's own
    /// failure. Outside a file the client gets it as a skipped `.` and `Done`; a file already
    /// announced cannot be completed, so the conversation ends with an error.
    fn collection_failed(&mut self, conn: &mut Conn, c: Collection, why: &str) {
        log::warn!("output collection failed job={} error={}", c.job.id, why);
        let mid_file = c.mid_file();
        self.release(*c.end());
        if mid_file {
            conn.fail(
                ErrorCode::Internal,
                format!("output collection failed while sending a file: {why}"),
            );
        } else {
            conn.send(&Response::OutputSkipped {
                path: sandrun_ipc::PrintablePath::render(b"."),
                kind: sandrun_ipc::SkipKind::Unreadable,
            });
            conn.send(&Response::Done);
        }
    }

    /// The job ended: report, start its collector (or release the cgroup and the slot).
    fn finish(&mut self, conn: &mut Conn, mut job: Box<Job>) {
        let report = job.report(&self.cfg.wheelhouse_dir);
        let entry = self
            .counters
            .by_reason
            .entry(report.reason.as_str())
            .or_insert((report.reason, 0));
        entry.1 += 1;
        log::info!(
            "job ended job={} label={} reason={} exit_code={:?} signal={:?} cpu_ms={} wall_ms={}",
            job.id,
            job.label,
            report.reason.as_str(),
            report.exit_code,
            report.signal,
            report.cpu_ms,
            report.wall_ms
        );
        let client_here = conn.stream.is_some();
        if client_here {
            conn.send(&Response::Exited(report));
            // The client learns the result now, not after the outputs are listed and the
            // cgroup is removed.
            conn.flush();
        }
        // A client that stops reading must not pin the job's tmpfs forever.
        conn.deadline = Some(Instant::now() + BUNDLE_TIMEOUT);
        let workdir = job.workdir.take();
        let (Some(workdir), true, false) = (workdir, client_here, job.outputs.is_empty()) else {
            self.release(*job);
            if client_here {
                conn.send(&Response::Done);
            }
            return;
        };
        let uid = self.cfg.slot_uid_base + job.slot;
        let ids = (UserId(uid), GroupId(uid));
        match Collection::start(job, workdir, ids, self.collector_exe.as_fd()) {
            Ok(c) => conn.state = State::Collecting(Box::new(c)),
            Err((job, msg)) => {
                log::error!("output collection not started job={} error={}", job.id, msg);
                self.release(*job);
                conn.fail(ErrorCode::SandboxSetup, msg);
            }
        }
    }

    /// Kills and removes a job cgroup, freeing the slot; retried on later ticks if the kernel
    /// still reports members.
    fn teardown(&mut self, cgroup: Box<dyn JobCgroup>, slot: Option<u32>) {
        let mut t = Teardown {
            cgroup,
            slot,
            since: Instant::now(),
        };
        if !self.try_teardown(&mut t) {
            self.teardowns.push(t);
        }
    }

    fn try_teardown(&mut self, t: &mut Teardown) -> bool {
        let _ = t.cgroup.kill_all();
        match t.cgroup.remove() {
            Ok(()) => {
                if let Some(slot) = t.slot {
                    self.slots[slot as usize] = false;
                }
                true
            }
            Err(e) => {
                if t.since.elapsed() > Duration::from_secs(10) {
                    log::error!(
                        "job cgroup still not removable slot={:?} error={}",
                        t.slot,
                        e
                    );
                }
                false
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        self.accept_paused = false;
        self.check_starts(now);
        self.check_collections(now);
        for conn in self.conns.values_mut() {
            if let State::Running(job) = &mut conn.state {
                job.check_limits(now);
            } else if conn.deadline.is_some_and(|d| now >= d) {
                if matches!(conn.state, State::Closing) {
                    // It had its grace period and did not read: drop it.
                    conn.stream = None;
                    continue;
                }
                log::warn!("conversation timed out; closing uid={}", conn.peer.uid);
                if let State::Bundle { slot, .. } = conn.state {
                    self.slots[slot as usize] = false;
                }
                conn.fail(
                    ErrorCode::UnexpectedMessage,
                    "timed out waiting for the next message",
                );
            }
        }
        // An init that reported its job's end exits at once; one still there a second later is
        // stuck: kill it (its pidfd then wakes the loop).
        for e in self.exiting.values() {
            if now.duration_since(e.since) > Duration::from_secs(1) {
                e.kill();
            }
        }
        let pending = std::mem::take(&mut self.teardowns);
        for mut t in pending {
            if !self.try_teardown(&mut t) {
                self.teardowns.push(t);
            }
        }
    }

    /// Ends every collection past its deadline (a client that does not read) or whose collector
    /// has sent nothing for [`COLLECT_STALL`].
    fn check_collections(&mut self, now: Instant) {
        let overrun: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| match &c.state {
                State::Collecting(col) => {
                    c.deadline.is_some_and(|d| now >= d)
                        || now.duration_since(col.last_progress) > COLLECT_STALL
                }
                _ => false,
            })
            .map(|(&id, _)| id)
            .collect();
        for id in overrun {
            let Some(mut conn) = self.conns.remove(&id) else {
                continue;
            };
            if let State::Collecting(c) = std::mem::replace(&mut conn.state, State::Closing) {
                self.collection_failed(&mut conn, *c, "the collection overran its time");
            }
            self.conns.insert(id, conn);
        }
    }

    fn on_admin(&mut self, req: AdminRequest) -> Response {
        let resp = match req {
            AdminRequest::List => AdminResponse::List(self.list()),
            AdminRequest::Kill(id) => {
                let found = self.conns.values_mut().find_map(|c| match &mut c.state {
                    State::Running(j) if j.id == id => Some(Ok(j)),
                    State::Starting(s) if s.job.id == id => Some(Err(s)),
                    _ => None,
                });
                match found {
                    Some(job) => {
                        log::info!("killed by admin job={}", id);
                        match job {
                            Ok(job) => job.kill(ExitReason::Cancelled),
                            // Killed as soon as it runs (see `Starting::cancelled`).
                            Err(starting) => starting.cancelled = true,
                        }
                        AdminResponse::Killed(id)
                    }
                    None => {
                        return Response::Error(sandrun_ipc::IpcError::new(
                            ErrorCode::NotFound,
                            format!("no running job {id}"),
                        ))
                    }
                }
            }
            AdminRequest::Stats => AdminResponse::Stats(self.stats()),
            AdminRequest::Drain => {
                self.draining = true;
                self.empty_pool();
                log::info!("draining: no new jobs accepted");
                AdminResponse::Draining {
                    running: self.running(),
                }
            }
        };
        Response::Admin(resp)
    }

    /// The live jobs (see [`Server::live_jobs`]), as `Stats` and `Draining` report them: a job
    /// still receiving its bundle, collecting or streaming its outputs is not finished either,
    /// and an operator waiting for 0 before a restart must not cut it off.
    fn running(&self) -> u32 {
        u32::try_from(self.live_jobs()).unwrap_or(u32::MAX)
    }

    fn list(&self) -> Vec<SandboxInfo> {
        self.conns
            .values()
            .filter_map(|c| match &c.state {
                State::Running(j) => Some(SandboxInfo {
                    job_id: j.id,
                    label: j.label.clone(),
                    uid_slot: j.slot,
                    pid: j.pid.0,
                    age_ms: u64::try_from(j.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    cpu_ms: j.last_stats.cpu_ns / 1_000_000,
                    memory_bytes: j.last_stats.memory_current_bytes,
                }),
                _ => None,
            })
            .collect()
    }

    fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            running: self.running(),
            max_concurrent: self.cfg.max_concurrent,
            draining: self.draining,
            jobs_started: c.jobs_started,
            jobs_by_reason: ExitReason::ALL
                .iter()
                .map(|r| (*r, c.by_reason.get(r.as_str()).map_or(0, |e| e.1)))
                .collect(),
            refused_busy: c.refused_busy,
            refused_peer: c.refused_peer,
            protocol_errors: c.protocol_errors,
            setup_failures: c.setup_failures,
            spawn_latency: summarize(&c.spawn_us),
            clone3_fallbacks: crate::sandbox::clone3_fallbacks(),
        }
    }

    /// Kills every sandbox and waits (bounded) for their teardown.
    fn shutdown(&mut self) {
        self.empty_pool();
        for conn in self.conns.values_mut() {
            if let State::Running(job) = &mut conn.state {
                job.kill(ExitReason::Internal);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let mut any = false;
            let ids: Vec<u64> = self.conns.keys().copied().collect();
            for id in ids {
                let Some(mut conn) = self.conns.remove(&id) else {
                    continue;
                };
                match std::mem::replace(&mut conn.state, State::Closing) {
                    State::Running(mut job) => {
                        job.reap();
                        if job.is_finished(Instant::now()) {
                            self.release(*job);
                        } else {
                            any = true;
                            conn.state = State::Running(job);
                            self.conns.insert(id, conn);
                        }
                    }
                    State::Collecting(c) => self.release(*c.end()),
                    State::Starting(s) => self.abandon_start(*s),
                    _ => {}
                }
            }
            for (_, e) in std::mem::take(&mut self.exiting) {
                e.kill_and_reap();
                self.teardown(e.cgroup, Some(e.slot));
            }
            self.tick(Instant::now());
            if !any && self.teardowns.is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        log::error!("some sandboxes did not finish tearing down before exit");
    }
}

/// Best effort: tell a refused peer why, then drop the connection.
fn refuse(stream: std::os::unix::net::UnixStream) {
    let _ = stream.set_nonblocking(true);
    if let Ok(frame) = sandrun_ipc::encode(&Response::Error(sandrun_ipc::IpcError::new(
        ErrorCode::NotAuthorized,
        "this uid may not use sandrund",
    ))) {
        let _ = std::io::Write::write(&mut &stream, &frame);
    }
}

fn summarize(samples: &VecDeque<u64>) -> LatencySummary {
    if samples.is_empty() {
        return LatencySummary::default();
    }
    let mut v: Vec<u64> = samples.iter().copied().collect();
    v.sort_unstable();
    let at = |q: usize| v[(v.len() - 1) * q / 100];
    LatencySummary {
        count: v.len() as u64,
        p50_us: at(50),
        p99_us: at(99),
        max_us: v[v.len() - 1],
    }
}

/// Writes the job's limits into a (warm) sandbox's cgroup and returns the CPU time the cgroup
/// has used so far, which is not the job's.
fn set_job_limits(cgroup: &mut dyn JobCgroup, limits: &CgroupLimits) -> Result<u64, String> {
    cgroup
        .set_limits(limits)
        .map_err(|e| format!("cgroup: {e}"))?;
    cgroup.cpu_ns().map_err(|e| format!("cgroup: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_latency_samples_then_percentiles_are_computed() {
        let s: VecDeque<u64> = (1..=100).collect();
        let l = summarize(&s);
        assert_eq!((l.count, l.p50_us, l.p99_us, l.max_us), (100, 50, 99, 100));
        assert_eq!(summarize(&VecDeque::new()), LatencySummary::default());
    }
}
