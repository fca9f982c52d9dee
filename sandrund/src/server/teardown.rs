//! What is left of a job once it has been reported: its init C on its way out, its cgroup to
//! kill and remove (retried on later ticks while the kernel still reports members), and its
//! slot, freed only once the cgroup is gone.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use super::cgroup_worker::{CgroupWorker, Op};
use super::job::{Exiting, Job, Released};
use super::slots::{Slot, Slots};
use super::Server;
use crate::cgroup::JobCgroup;

/// A job cgroup whose removal must be retried, and the slot it holds until then (a warm
/// sandbox that never ran a job holds none).
pub(super) struct Teardown {
    cgroup: Box<dyn JobCgroup>,
    slot: Option<Slot>,
    since: Instant,
    /// The cgroup worker has been asked to remove the directories and has not answered.
    removing: bool,
}

/// What one attempt at a teardown came to.
enum Attempt {
    Done,
    /// The worker was asked; its answer decides.
    Asked,
    /// Not yet (processes left, or an error): retried at the next tick.
    Later,
}

impl Teardown {
    /// Kills what is left in the cgroup and removes it (through `worker` when there is one,
    /// once the cgroup is empty; else at once); then frees the slot.
    fn attempt(&mut self, slots: &mut Slots, worker: Option<&mut CgroupWorker>) -> Attempt {
        if self.removing {
            return Attempt::Asked;
        }
        let _ = self.cgroup.kill_all();
        if let Some(worker) = worker {
            // `rmdir` fails while any process is left; ask only when it can succeed. A cgroup
            // that cannot be read (already gone) is left to `remove`, which says what it is.
            match self.cgroup.is_empty() {
                Ok(true) if worker.send(Op::Remove, self.cgroup.name()).is_ok() => {
                    self.removing = true;
                    return Attempt::Asked;
                }
                Ok(false) => {
                    self.log_if_stuck("processes left");
                    return Attempt::Later;
                }
                _ => {}
            }
        }
        match self.cgroup.remove() {
            Ok(()) => {
                self.done(slots);
                Attempt::Done
            }
            Err(e) => {
                self.log_if_stuck(&e.to_string());
                Attempt::Later
            }
        }
    }

    /// The directories are gone: free the slot.
    fn done(&mut self, slots: &mut Slots) {
        if let Some(slot) = self.slot {
            slots.free(slot);
        }
    }

    fn log_if_stuck(&self, error: &str) {
        if self.since.elapsed() > Duration::from_secs(10) {
            log::error!(
                "job cgroup still not removable slot={:?} error={}",
                self.slot.map(|s| s.index),
                error
            );
        }
    }
}

impl Server {
    /// Kills and removes a job cgroup, freeing the slot; retried on later ticks if the kernel
    /// still reports members.
    pub(super) fn teardown(&mut self, cgroup: Box<dyn JobCgroup>, slot: Option<Slot>) {
        let mut t = Teardown {
            cgroup,
            slot,
            since: Instant::now(),
            removing: false,
        };
        if !matches!(
            t.attempt(&mut self.slots, self.cgroup_worker.as_mut()),
            Attempt::Done
        ) {
            self.teardowns.push(t);
        }
    }

    /// Retries every pending teardown once.
    pub(super) fn retry_teardowns(&mut self) {
        let (slots, mut worker) = (&mut self.slots, self.cgroup_worker.as_mut());
        self.teardowns
            .retain_mut(|t| !matches!(t.attempt(slots, worker.as_deref_mut()), Attempt::Done));
    }

    /// The worker removed (or failed to remove) the directories of cgroup `name`.
    pub(super) fn removed(&mut self, name: &str, error: Option<String>) {
        let Some(i) = self.waiting_for(name) else {
            // A directory made for the pool after it was drained: nothing waits for it.
            if let Some(e) = error {
                log::warn!("cannot remove an unused job cgroup cgroup={name} error={e}");
            }
            return;
        };
        let t = &mut self.teardowns[i];
        t.removing = false;
        match error {
            None => {
                t.cgroup.forget();
                t.done(&mut self.slots);
                self.teardowns.swap_remove(i);
            }
            // Retried at the next tick.
            Some(e) => t.log_if_stuck(&e),
        }
    }

    /// The teardown waiting for the worker to remove cgroup `name`.
    fn waiting_for(&self, name: &str) -> Option<usize> {
        (self.teardowns.iter()).position(|t| t.removing && t.cgroup.name() == name)
    }

    /// Whether a teardown waits for the worker to remove cgroup `name`.
    pub(super) fn teardown_waits_for(&self, name: &str) -> bool {
        self.waiting_for(name).is_some()
    }

    /// The worker is gone: what it was asked to remove is retried on the loop.
    pub(super) fn removals_abandoned(&mut self) {
        for t in &mut self.teardowns {
            t.removing = false;
        }
    }

    /// Frees a reported job's cgroup and slot now, or once its init has exited.
    pub(super) fn release(&mut self, job: Job) {
        match job.release() {
            Released::Free { cgroup, slot } => self.teardown(cgroup, Some(slot)),
            Released::Exiting(e) => {
                self.next_exiting += 1;
                self.exiting.insert(self.next_exiting, e);
            }
        }
    }

    /// The init of a reported job has exited: reap it, then free its cgroup and slot.
    pub(super) fn on_exiting(&mut self, id: u64) {
        if self.exiting.get(&id).is_some_and(Exiting::try_reap) {
            if let Some(e) = self.exiting.remove(&id) {
                self.teardown(e.cgroup, Some(e.slot));
            }
        }
    }
}
