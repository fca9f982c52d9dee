//! A running job to its end: its output pipes, its status and exit, its exit report, the
//! collection of its outputs (relayed from its collector K) and how a collection fails.

#![forbid(unsafe_code)]

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use sandrun_ipc::{ErrorCode, Response};

use super::conn::{Conn, State};
use super::job::{Collection, Job, Relayed, Stream};
use super::{Server, BUNDLE_TIMEOUT};

/// A collector that sends nothing for this long (while its client reads) is killed: its walk is
/// bounded to 2 s of CPU time, so this is far past any honest collection, even on a busy host.
const COLLECT_STALL: Duration = Duration::from_secs(30);

impl Server {
    /// Applies `f` to the job of connection `id`, if it is running.
    fn with_running(
        &mut self,
        id: u64,
        f: impl FnOnce(&mut Job, &mut Vec<u8>) -> Option<Response>,
    ) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if let State::Running(job) = &mut conn.state {
            if let Some(msg) = f(job, &mut self.pipe_buf) {
                conn.send(&msg);
            }
        }
    }

    pub(super) fn on_pipe(&mut self, id: u64, stream: Stream) {
        self.with_running(id, |job, buf| {
            let cap = job.limits.output_bytes;
            let chunk = job.pipe_mut(stream).read_chunk(cap, buf)?;
            Some(stream.message(chunk))
        });
    }

    pub(super) fn on_status(&mut self, id: u64) {
        self.with_running(id, |job, _| {
            job.on_status();
            None
        });
    }

    pub(super) fn on_exit(&mut self, id: u64) {
        self.with_running(id, |job, _| {
            job.reap();
            None
        });
    }

    pub(super) fn progress(&mut self, conn: &mut Conn, now: Instant) {
        match std::mem::replace(&mut conn.state, State::Closing) {
            State::Running(mut job) => {
                if job.is_finished(now) {
                    self.finish(conn, job);
                    // Relay at once what the collector may already have sent.
                    if matches!(conn.state, State::Collecting(_)) {
                        self.progress(conn, now);
                    }
                } else {
                    conn.state = State::Running(job);
                }
            }
            State::Collecting(c) => self.relay(conn, c),
            other => conn.state = other,
        }
    }

    /// Relays what the collector has sent, and ends the collection when it is done or broken.
    fn relay(&mut self, conn: &mut Conn, mut c: Box<Collection>) {
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
                    "output collector failed before collecting job={} error={msg}",
                    c.job.id
                );
                self.release(*c.end());
                conn.fail(ErrorCode::SandboxSetup, msg);
            }
            Relayed::Failed(why) => self.collection_failed(conn, *c, &why),
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
        let report = job.report();
        self.record_end(&job, &report);
        let client_here = conn.stream.is_some();
        if client_here {
            conn.send(&Response::Exited(report));
            // The client learns the result now, not after the outputs are listed and the
            // cgroup is removed.
            conn.flush();
        }
        // A client that stops reading must not pin the job's tmpfs forever.
        conn.deadline = Some(Instant::now() + BUNDLE_TIMEOUT);
        let collect = client_here && !job.outputs.is_empty();
        match job.workdir.take() {
            Some(workdir) if collect => {
                let ids = self.slot_ids(job.slot);
                let exe = (self.collector_exe.as_fd(), self.settings.one_thread);
                match Collection::start(job, workdir, ids, exe) {
                    Ok(c) => conn.state = State::Collecting(Box::new(c)),
                    Err((job, msg)) => {
                        log::error!("output collection not started job={} error={}", job.id, msg);
                        self.release(*job);
                        conn.fail(ErrorCode::SandboxSetup, msg);
                    }
                }
            }
            _ => {
                self.release(*job);
                if client_here {
                    conn.send(&Response::Done);
                }
            }
        }
    }

    /// Ends every collection past its deadline (a client that does not read) or whose collector
    /// has sent nothing for [`COLLECT_STALL`].
    pub(super) fn check_collections(&mut self, now: Instant) {
        let overrun = |c: &Conn| match &c.state {
            State::Collecting(col) => {
                c.deadline.is_some_and(|d| now >= d)
                    || now.duration_since(col.last_progress) > COLLECT_STALL
            }
            _ => false,
        };
        self.with_conns(overrun, |server, conn| {
            if let State::Collecting(c) = std::mem::replace(&mut conn.state, State::Closing) {
                server.collection_failed(conn, *c, "the collection overran its time");
            }
        });
    }
}
