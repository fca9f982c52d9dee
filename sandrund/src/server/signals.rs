//! Signals: SIGTERM/SIGINT wake the loop through a self-pipe (SIGPIPE is ignored), and the
//! shutdown that follows kills every sandbox and waits, bounded, for its teardown.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use sandrun_ipc::ExitReason;

use super::conn::State;
use super::Server;

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
pub(super) fn install_signal_pipe() -> std::io::Result<OwnedFd> {
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
    /// Kills every sandbox and waits (bounded) for their teardown.
    pub(super) fn shutdown(&mut self) {
        self.empty_pool();
        for conn in self.conns.values_mut() {
            if let State::Running(job) = &mut conn.state {
                job.kill(ExitReason::Internal);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let running = self.end_all();
            for (_, e) in std::mem::take(&mut self.exiting) {
                e.kill_and_reap();
                self.teardown(e.cgroup, Some(e.slot));
            }
            self.tick(Instant::now());
            if !running && self.teardowns.is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        log::error!("some sandboxes did not finish tearing down before exit");
    }

    /// One round of the shutdown: releases every job that has ended, every collection and every
    /// start, and drops their connections. Whether a (killed) job still runs.
    fn end_all(&mut self) -> bool {
        let mut running = false;
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
                        running = true;
                        conn.state = State::Running(job);
                        self.conns.insert(id, conn);
                    }
                }
                State::Collecting(c) => self.release(*c.end()),
                State::Starting(s) => self.abandon_start(*s),
                _ => {}
            }
        }
        running
    }
}
