//! What is left of a job once it has been reported: its init C on its way out, its cgroup to
//! kill and remove (retried on later ticks while the kernel still reports members), and its
//! slot, freed only once the cgroup is gone.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

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
}

impl Teardown {
    /// Kills what is left in the cgroup and removes it; then frees the slot.
    fn try_remove(&mut self, slots: &mut Slots) -> bool {
        let _ = self.cgroup.kill_all();
        match self.cgroup.remove() {
            Ok(()) => {
                if let Some(slot) = self.slot {
                    slots.free(slot);
                }
                true
            }
            Err(e) => {
                if self.since.elapsed() > Duration::from_secs(10) {
                    log::error!(
                        "job cgroup still not removable slot={:?} error={}",
                        self.slot.map(|s| s.index),
                        e
                    );
                }
                false
            }
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
        };
        if !t.try_remove(&mut self.slots) {
            self.teardowns.push(t);
        }
    }

    /// Retries every pending teardown once.
    pub(super) fn retry_teardowns(&mut self) {
        let slots = &mut self.slots;
        self.teardowns.retain_mut(|t| !t.try_remove(slots));
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
