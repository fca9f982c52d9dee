//! The helper's single-threaded event loop: `poll` over the listening socket, client connections,
//! each starting sandbox's control socket, each job's pidfd and output pipes, and a self-pipe for
//! SIGTERM/SIGINT. Nothing waits on one sandbox: a start is a `Starting` state that completes
//! when its control message arrives, while the loop serves everyone else. A 100 ms tick (the poll
//! timeout while anything is pending) checks wall-clock and CPU limits, conversation deadlines
//! and retries cgroup removal.
//!
//! This file holds the [`Server`] state; its methods are grouped by concern:
//! `event_loop.rs` (the poll set, accepting, the tick), `protocol.rs` (the conversation with a
//! client), `start.rs` (an accepted job into a sandbox), `finish.rs` (a running job's output,
//! end, report and collection), `teardown.rs` (freeing cgroups and slots), `pool.rs` (warm
//! sandboxes), `admin.rs` (admin requests and counters), `signals.rs` (signals and shutdown).

#![forbid(unsafe_code)]

mod admin;
mod cgroup_worker;
pub(crate) mod collect;
mod conn;
mod event_loop;
mod finish;
mod job;
mod peer;
mod pool;
mod protocol;
mod request;
mod requirements;
mod signals;
mod slots;
mod start;
pub mod systemd;
mod teardown;

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use crate::cgroup::CgroupManager;
use crate::config::Config;
use crate::sandbox::{seccomp::SeccompProgram, SandboxSettings};
use admin::Counters;
use cgroup_worker::CgroupWorker;
use conn::Conn;
use job::Exiting;
use pool::Pool;
use slots::Slots;
use teardown::Teardown;

/// Most client connections at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 256;
/// Time a client has for the handshake and for each idle step.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time a client has to send its whole bundle.
const BUNDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Everything the loop owns.
pub struct Server {
    cfg: Config,
    listener: UnixListener,
    cgroups: Box<dyn CgroupManager>,
    /// Makes and removes job cgroup directories off the loop; `None` once it has died.
    cgroup_worker: Option<CgroupWorker>,
    filter: SeccompProgram,
    /// The output collector executable, opened at start-up (`sandbox::collector`).
    collector_exe: OwnedFd,
    settings: SandboxSettings,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    next_job: u64,
    /// The slots whose uid may still own a process or a cgroup.
    slots: Slots,
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

impl Server {
    pub fn new(
        cfg: Config,
        listener: UnixListener,
        cgroups: Box<dyn CgroupManager>,
        filter: SeccompProgram,
        collector_exe: OwnedFd,
        one_thread: crate::sys::SingleThreaded,
    ) -> std::io::Result<Server> {
        listener.set_nonblocking(true)?;
        let settings = SandboxSettings {
            mount_point: cfg.mount_point.clone(),
            template_dir: cfg.template_dir.clone(),
            wheelhouse_dir: cfg.wheelhouse_dir.clone(),
            start_timeout: Duration::from_secs(u64::from(cfg.start_timeout_s)),
            one_thread,
        };
        let slots = Slots::new(cfg.slot_count);
        let pool = Pool::new(cfg.warm_sandboxes);
        // Forked before the signal handlers are installed. Without it (a failed fork) the
        // helper does the same work on its loop, only slower.
        let cgroup_worker = CgroupWorker::start(one_thread, &*cgroups)
            .inspect_err(|e| log::error!("cannot start the cgroup worker; cgroups are created and removed on the loop error={e}"))
            .ok();
        Ok(Server {
            cfg,
            listener,
            cgroups,
            cgroup_worker,
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
            signal_pipe: crate::sys::install_signal_pipe()?,
        })
    }

    /// Takes connection `id` out of the map, lets `f` act on it, and puts it back.
    fn with_conn(&mut self, id: u64, f: impl FnOnce(&mut Self, &mut Conn)) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        f(self, &mut conn);
        self.conns.insert(id, conn);
    }

    /// [`Server::with_conn`] for every connection that `pick` selects.
    fn with_conns(
        &mut self,
        pick: impl Fn(&Conn) -> bool,
        mut f: impl FnMut(&mut Self, &mut Conn),
    ) {
        let ids: Vec<u64> = (self.conns.iter())
            .filter(|(_, c)| pick(c))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.with_conn(id, &mut f);
        }
    }
}
