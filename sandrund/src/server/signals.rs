//! Signals: SIGTERM/SIGINT wake the loop through a self-pipe (SIGPIPE is ignored), and the
//! shutdown that follows kills every sandbox and waits, bounded, for its teardown (the
//! handler and the self-pipe are `sys::install_signal_pipe`).

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use sandrun_ipc::ExitReason;

use super::conn::State;
use super::Server;

impl Server {
    /// Kills every sandbox and waits (bounded) for their teardown.
    pub(super) fn shutdown(&mut self) {
        // Everything from here is done on the loop, bounded by the deadline below.
        self.stop_cgroup_worker();
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
