//! A bound on uploads in progress at once.
//!
//! An upload holds a thread of tokio's blocking pool from its first byte to its last (the
//! assembler of [`super::parse_submission`] expands parts while they arrive), so many slow
//! uploads could take every thread of the pool and delay all other blocking work. Each upload
//! takes an [`UploadSlot`] before any of its body is read and gives it back when its body has
//! been read and assembled (or refused). An upload past the bound waits for a slot, at most the
//! configured wait; if none frees up in that time it is refused, and the caller answers 503
//! with `Retry-After`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

/// The slots: `max` uploads at once, a bounded wait for the others.
#[derive(Debug)]
pub struct UploadSlots {
    permits: Semaphore,
    max: usize,
    wait: Duration,
    waiting: AtomicUsize,
}

/// One upload's place; dropping it frees the slot.
#[derive(Debug)]
pub struct UploadSlot<'a> {
    _permit: SemaphorePermit<'a>,
}

/// No slot freed up within the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotsBusy;

impl UploadSlots {
    /// `max` uploads at once (at least one); others wait at most `wait` for a slot.
    pub fn new(max: usize, wait: Duration) -> UploadSlots {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        UploadSlots {
            permits: Semaphore::new(max),
            max,
            wait,
            waiting: AtomicUsize::new(0),
        }
    }

    /// Takes a slot, waiting at most the configured time for one to free up.
    pub async fn acquire(&self) -> Result<UploadSlot<'_>, SlotsBusy> {
        if let Ok(permit) = self.permits.try_acquire() {
            return Ok(UploadSlot { _permit: permit });
        }
        let _waiting = Waiting::count(&self.waiting);
        match tokio::time::timeout(self.wait, self.permits.acquire()).await {
            Ok(Ok(permit)) => Ok(UploadSlot { _permit: permit }),
            // Err(_) inside: the semaphore is never closed; treat it like a timeout.
            Ok(Err(_)) | Err(_) => Err(SlotsBusy),
        }
    }

    /// Uploads holding a slot now.
    pub fn in_progress(&self) -> usize {
        self.max.saturating_sub(self.permits.available_permits())
    }

    /// Uploads waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// Counts one waiter while it lives (also when its request is dropped mid-wait).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(counter: &'a AtomicUsize) -> Waiting<'a> {
        counter.fetch_add(1, Ordering::Relaxed);
        Waiting(counter)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn given_all_slots_taken_when_none_frees_up_then_acquire_is_refused_after_the_wait() {
        let slots = UploadSlots::new(1, Duration::from_millis(20));
        let first = slots.acquire().await.unwrap();
        assert_eq!(slots.in_progress(), 1);
        assert_eq!(slots.acquire().await.unwrap_err(), SlotsBusy);
        assert_eq!(slots.waiting(), 0);
        drop(first);
        assert_eq!(slots.in_progress(), 0);
        let _again = slots.acquire().await.unwrap();
    }

    #[tokio::test]
    async fn given_a_waiter_when_a_slot_frees_up_within_the_wait_then_it_gets_the_slot() {
        let slots = std::sync::Arc::new(UploadSlots::new(1, Duration::from_secs(3600)));
        let first = slots.acquire().await.unwrap();
        let waiter = {
            let slots = std::sync::Arc::clone(&slots);
            tokio::spawn(async move { slots.acquire().await.map(|_| ()) })
        };
        while slots.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(slots.waiting(), 0);
    }

    #[test]
    fn given_a_zero_bound_then_one_upload_is_still_allowed() {
        assert_eq!(UploadSlots::new(0, Duration::ZERO).max(), 1);
    }
}
