//! The poll loop: the poll set built from the current state, what each event is handed to,
//! accepting connections, and the 100 ms tick (limits, deadlines, teardown retries).

#![forbid(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use sandrun_ipc::{ErrorCode, Response};

use super::cgroup_worker::{Gone, Op};
use super::conn::{Conn, Incoming, State, HIGH_WATER};
use super::job::Stream;
use super::peer::{may_connect, Peer};
use super::{systemd, Server, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS};

const TICK: Duration = Duration::from_millis(100);

/// What a poll entry stands for.
#[derive(Clone, Copy)]
enum Token {
    Listener,
    Signal,
    Conn(u64),
    Pipe(u64, Stream),
    Pidfd(u64),
    Status(u64),
    /// C of a job already reported, on its way out.
    Exiting(u64),
    /// A job's output collector has sent something (or exited).
    Collector,
    /// A starting sandbox's control socket.
    Starting(u64),
    /// The cgroup worker has answered (or is gone).
    CgroupWorker,
}

/// The descriptors to poll, each with what it stands for.
#[derive(Default)]
struct PollSet<'a> {
    fds: Vec<PollFd<'a>>,
    tokens: Vec<Token>,
}

impl<'a> PollSet<'a> {
    fn add(&mut self, fd: BorrowedFd<'a>, events: PollFlags, token: Token) {
        self.fds.push(PollFd::new(fd, events));
        self.tokens.push(token);
    }

    /// A client's socket and whatever its job has to poll.
    fn add_conn(&mut self, id: u64, c: &'a Conn) {
        let room = c.pending_out() < HIGH_WATER;
        if let Some(s) = &c.stream {
            // A peer that does not read what it is sent is not read from either (hang-ups
            // are reported regardless), so it cannot make the helper queue without bound.
            let mut ev = PollFlags::empty();
            if room {
                ev |= PollFlags::POLLIN;
            }
            if c.pending_out() > 0 {
                ev |= PollFlags::POLLOUT;
            }
            self.add(s.as_fd(), ev, Token::Conn(id));
        }
        match &c.state {
            State::Starting(s) => {
                self.add(s.sandbox.ctrl(), PollFlags::POLLIN, Token::Starting(id))
            }
            State::Running(job) => {
                if room || c.stream.is_none() {
                    for stream in Stream::BOTH {
                        if let Some(fd) = job.pipe(stream).fd() {
                            self.add(fd, PollFlags::POLLIN, Token::Pipe(id, stream));
                        }
                    }
                }
                if !job.reaped {
                    self.add(job.pidfd(), PollFlags::POLLIN, Token::Pidfd(id));
                }
                if let Some(fd) = job.status_fd() {
                    self.add(fd, PollFlags::POLLIN, Token::Status(id));
                }
            }
            // K blocks on its socket while the client's buffer is full (back-pressure).
            State::Collecting(col) if room => {
                self.add(col.fd(), PollFlags::POLLIN, Token::Collector);
            }
            _ => {}
        }
    }

    /// Waits, and returns the entries that have events.
    fn poll(mut self, timeout: PollTimeout) -> std::io::Result<Vec<(Token, PollFlags)>> {
        match poll(&mut self.fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
        Ok((self.fds.iter())
            .zip(self.tokens)
            .filter_map(|(fd, t)| fd.revents().filter(|r| !r.is_empty()).map(|r| (t, r)))
            .collect())
    }
}

impl Server {
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
                    Token::Pipe(id, stream) => self.on_pipe(id, stream),
                    Token::Pidfd(id) => self.on_exit(id),
                    Token::Status(id) => self.on_status(id),
                    Token::Exiting(id) => self.on_exiting(id),
                    Token::Starting(id) => self.on_starting(id),
                    Token::CgroupWorker => self.on_cgroup_worker(),
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
    fn wait(&self, refill: bool) -> std::io::Result<Vec<(Token, PollFlags)>> {
        let mut set = PollSet::default();
        if self.conns.len() < MAX_CONNECTIONS && !self.accept_paused {
            set.add(self.listener.as_fd(), PollFlags::POLLIN, Token::Listener);
        }
        set.add(self.signal_pipe.as_fd(), PollFlags::POLLIN, Token::Signal);
        if let Some(w) = &self.cgroup_worker {
            set.add(w.fd(), PollFlags::POLLIN, Token::CgroupWorker);
        }
        for (&id, c) in &self.conns {
            set.add_conn(id, c);
        }
        for (&id, e) in &self.exiting {
            set.add(e.pidfd(), PollFlags::POLLIN, Token::Exiting(id));
        }
        set.poll(self.poll_timeout(refill))
    }

    /// None with `refill`, a tick while anything is pending, or else until an event.
    fn poll_timeout(&self, refill: bool) -> PollTimeout {
        let busy = !self.conns.is_empty()
            || !self.teardowns.is_empty()
            || !self.exiting.is_empty()
            || self.accept_paused;
        if refill {
            PollTimeout::ZERO
        } else if busy {
            PollTimeout::from(100u16)
        } else {
            PollTimeout::NONE
        }
    }

    /// Hands the worker's answers to the pool and the teardowns; a worker that is gone or
    /// broke the protocol is stopped and its work done on the loop from then on.
    fn on_cgroup_worker(&mut self) {
        let Some(worker) = self.cgroup_worker.as_mut() else {
            return;
        };
        // Replies read before the worker went are handled first: each was taken off the
        // requests in flight.
        let (replies, gone) = worker.replies();
        for r in replies {
            match r.op {
                Op::Make => self.made(r.name, r.error),
                Op::Remove => self.removed(&r.name, r.error),
            }
        }
        if let Some(gone) = gone {
            self.cgroup_worker_failed(&gone);
        }
    }

    /// Logs why the worker is given up and stops it.
    pub(super) fn cgroup_worker_failed(&mut self, gone: &Gone) {
        log::error!(
            "the cgroup worker failed; job cgroups are created and removed on the loop from now on error={}",
            gone.0
        );
        self.stop_cgroup_worker();
    }

    /// Stops the worker (it failed, or the helper is shutting down); what it had not answered
    /// is done on the loop: directories it was to make are removed, removals a teardown waits
    /// for are retried by that teardown, other removals are done now.
    pub(super) fn stop_cgroup_worker(&mut self) {
        let Some(worker) = self.cgroup_worker.take() else {
            return;
        };
        let unused: Vec<String> = (worker.in_flight())
            .filter(|&(op, name)| op == Op::Make || !self.teardown_waits_for(name))
            .map(|(_, name)| name.to_owned())
            .collect();
        drop(worker);
        self.unused_abandoned(unused);
        self.removals_abandoned();
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
            let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
            self.conns.insert(id, Conn::new(stream, peer, deadline));
        }
    }

    fn on_conn(&mut self, id: u64, revents: PollFlags) {
        self.with_conn(id, |server, conn| {
            if revents.intersects(PollFlags::POLLOUT) {
                conn.flush();
            }
            if revents.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                server.on_readable(conn);
            }
        });
    }

    fn on_readable(&mut self, conn: &mut Conn) {
        match conn.read() {
            Incoming::Messages(msgs) => {
                for msg in msgs {
                    self.handle(conn, msg);
                    if matches!(conn.state, State::Closing) {
                        break;
                    }
                }
            }
            Incoming::Closed => self.peer_gone(conn),
            Incoming::Malformed(e) => {
                self.counters.protocol_errors += 1;
                log::warn!("malformed frame; closing uid={} error={}", conn.peer.uid, e);
                self.abort_conn(conn, ErrorCode::MalformedFrame, e);
            }
        }
    }

    pub(super) fn tick(&mut self, now: Instant) {
        self.accept_paused = false;
        if self.cgroup_worker.as_ref().is_some_and(|w| w.is_stuck(now)) {
            self.cgroup_worker_failed(&Gone("a request has waited more than 10 s".to_owned()));
        }
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
                if let State::Bundle(upload) = &conn.state {
                    self.slots.free(upload.slot);
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
        self.retry_teardowns();
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
