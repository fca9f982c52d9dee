//! The conversation with a client: each message in each state (hello, list templates, admin,
//! submit, the bundle's chunks and end, cancel), protocol violations and a peer that goes away.

#![forbid(unsafe_code)]

use std::time::Instant;

use sandrun_ipc::{ErrorCode, ExitReason, Hello, JobId, Request, Response, Role, PROTOCOL_VERSION};

use super::conn::{Conn, State, Upload};
use super::peer::{authorize, may_build};
use super::request::{validate, RequestError};
use super::slots::Slot;
use super::{Server, BUNDLE_TIMEOUT, IDLE_TIMEOUT};

impl Server {
    pub(super) fn handle(&mut self, conn: &mut Conn, msg: Request) {
        let state = std::mem::replace(&mut conn.state, State::Closing);
        match (state, msg) {
            (State::AwaitHello, Request::Hello(h)) => self.on_hello(conn, h),
            (State::Idle(Role::Submitter), Request::Submit(spec)) => self.on_submit(conn, *spec),
            (State::Idle(role), Request::ListTemplates) => {
                idle(conn, role);
                let (templates, omitted) = crate::template::list(&self.cfg.template_dir);
                for info in templates {
                    conn.send(&Response::Template(info));
                }
                conn.send(&Response::TemplatesEnd { omitted });
            }
            (State::Idle(Role::Admin), Request::Admin(req)) => {
                idle(conn, Role::Admin);
                let resp = self.on_admin(req);
                conn.send(&resp);
            }
            (State::Bundle(upload), Request::BundleChunk(chunk)) => {
                self.on_chunk(conn, upload, &chunk)
            }
            (State::Bundle(upload), Request::BundleEnd) => self.on_bundle_end(conn, upload),
            (State::Running(mut job), Request::Cancel) => {
                job.kill(ExitReason::Cancelled);
                conn.state = State::Running(job);
            }
            // Killed as soon as it runs (see `JobMeta::cancelled`).
            (State::Starting(mut s), Request::Cancel) => {
                s.launch.job.cancelled = true;
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
                    "unexpected message; closing uid={} message={what}",
                    conn.peer.uid
                );
                self.abort_conn(
                    conn,
                    ErrorCode::UnexpectedMessage,
                    format!("unexpected {what} message"),
                );
            }
        }
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
        idle(conn, hello.role);
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
        conn.state = State::Bundle(Upload {
            job: Box::new(job),
            id,
            slot,
            data: Vec::with_capacity(cap),
        });
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
    fn reserve_slot(&mut self) -> Option<Slot> {
        if self.live_jobs() >= self.cfg.max_concurrent as usize {
            return None;
        }
        self.slots.reserve()
    }

    /// Jobs that count against `max_concurrent` (see [`Server::reserve_slot`]).
    pub(super) fn live_jobs(&self) -> usize {
        (self.conns.values())
            .filter(|c| {
                matches!(
                    c.state,
                    State::Bundle(_)
                        | State::Starting(_)
                        | State::Running(_)
                        | State::Collecting(_)
                )
            })
            .count()
    }

    fn on_chunk(&mut self, conn: &mut Conn, mut upload: Upload, chunk: &[u8]) {
        if upload.data.len() as u64 + chunk.len() as u64 > upload.job.bundle_bytes {
            self.slots.free(upload.slot);
            self.protocol_error(conn, "bundle data exceeds the declared file sizes");
            return;
        }
        upload.data.extend_from_slice(chunk);
        conn.state = State::Bundle(upload);
    }

    fn on_bundle_end(&mut self, conn: &mut Conn, upload: Upload) {
        if upload.data.len() as u64 != upload.job.bundle_bytes {
            self.slots.free(upload.slot);
            self.protocol_error(conn, "bundle data is shorter than the declared file sizes");
            return;
        }
        self.start_job(conn, upload);
    }

    fn protocol_error(&mut self, conn: &mut Conn, msg: &str) {
        self.counters.protocol_errors += 1;
        log::warn!("{msg} uid={}", conn.peer.uid);
        conn.fail(ErrorCode::InvalidRequest, msg);
    }

    /// The peer closed: a running job is cancelled, anything else given up ([`Server::abandon`]).
    pub(super) fn peer_gone(&mut self, conn: &mut Conn) {
        conn.stream = None;
        match std::mem::replace(&mut conn.state, State::Closing) {
            State::Running(mut job) => {
                log::info!("client went away; killing the job job={}", job.id);
                job.kill(ExitReason::Cancelled);
                conn.state = State::Running(job);
            }
            other => self.abandon(other),
        }
    }

    /// A protocol violation: kill what runs, send the error, close.
    pub(super) fn abort_conn(&mut self, conn: &mut Conn, code: ErrorCode, msg: String) {
        match std::mem::replace(&mut conn.state, State::Closing) {
            State::Running(mut job) => {
                job.kill(ExitReason::Cancelled);
                conn.send(&Response::Error(sandrun_ipc::IpcError::new(code, msg)));
                conn.state = State::Running(job);
                return;
            }
            other => self.abandon(other),
        }
        conn.fail(code, msg);
    }

    /// Gives up a job that does not run: a start in progress is abandoned, an upload's slot
    /// freed, a collection ended and its job released (its cgroup removed, then its slot freed).
    /// Any other state holds nothing.
    fn abandon(&mut self, state: State) {
        match state {
            State::Starting(s) => self.abandon_start(*s),
            State::Bundle(upload) => self.slots.free(upload.slot),
            State::Collecting(c) => self.release(*c.end()),
            _ => {}
        }
    }
}

/// Handshake done (or an idle request answered): the next request may take [`IDLE_TIMEOUT`].
fn idle(conn: &mut Conn, role: Role) {
    conn.state = State::Idle(role);
    conn.deadline = Some(Instant::now() + IDLE_TIMEOUT);
}
