//! The uid slots: the job in slot `n` runs as uid `slot_uid_base + n`. A slot is held from the
//! job's acceptance until its last process and its cgroup are gone, so no two jobs ever share a
//! uid, and a uid is never reused while it may still own something.

#![forbid(unsafe_code)]

/// A held slot. Each reservation is a new lease, so a stale handle (one already freed) can never
/// free the slot again after another job has reserved it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    lease: u64,
}

/// Which slots are held, and by which lease.
pub struct Slots {
    leases: Vec<Option<u64>>,
    next_lease: u64,
}

impl Slots {
    pub fn new(count: u32) -> Slots {
        Slots {
            leases: vec![None; count as usize],
            next_lease: 0,
        }
    }

    /// Holds the lowest free slot; `None` when every slot is held.
    pub fn reserve(&mut self) -> Option<Slot> {
        let i = self.leases.iter().position(Option::is_none)?;
        let index = u32::try_from(i).ok()?;
        self.next_lease += 1;
        self.leases[i] = Some(self.next_lease);
        Some(Slot {
            index,
            lease: self.next_lease,
        })
    }

    /// Frees `slot`. Freeing a slot twice is a bug (the second free could hand a uid that may
    /// still own something to another job): it is logged and changes nothing, whether the slot
    /// is free or has been reserved again since.
    pub fn free(&mut self, slot: Slot) {
        match self.leases.get_mut(slot.index as usize) {
            Some(lease) if *lease == Some(slot.lease) => *lease = None,
            _ => log::error!("slot freed twice (bug); ignored slot={}", slot.index),
        }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.leases.iter().filter(|l| l.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_all_slots_held_then_reserve_is_none_until_one_is_freed() {
        let mut slots = Slots::new(3);
        let held: Vec<Slot> = (0..3).map(|_| slots.reserve().unwrap()).collect();
        assert_eq!(held.iter().map(|s| s.index).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(slots.reserve(), None);
        slots.free(held[1]);
        let again = slots.reserve().unwrap();
        assert_eq!(again.index, 1, "the freed slot is reused");
        assert_eq!(slots.reserve(), None);
        assert_eq!(Slots::new(0).reserve(), None);
    }

    #[test]
    fn given_a_slot_freed_twice_then_the_count_is_unchanged() {
        let mut slots = Slots::new(2);
        let a = slots.reserve().unwrap();
        let b = slots.reserve().unwrap();
        slots.free(a);
        slots.free(a);
        assert_eq!(slots.held(), 1);
        // The slot's next holder keeps it when the stale handle is freed once more.
        let c = slots.reserve().unwrap();
        assert_eq!(c.index, a.index);
        slots.free(a);
        assert_eq!(slots.held(), 2);
        assert_eq!(slots.reserve(), None);
        slots.free(b);
        slots.free(c);
        assert_eq!(slots.held(), 0);
    }
}
