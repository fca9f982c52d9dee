//! A bound on uploads in progress at once.
//!
//! An upload holds a thread of tokio's blocking pool from its first byte to its last (the
//! assembler of [`super::parse_submission`] expands parts while they arrive), so many slow
//! uploads could take every thread of the pool and delay all other blocking work. Each upload
//! takes an [`UploadSlot`] before any of its body is read and gives it back when its body has
//! been read and assembled (or refused). An upload past the bound waits for a slot, at most the
//! configured wait; if none frees up in that time it is refused, and the caller answers 503
//! with `Retry-After`.
//!
//! One client (an IPv4 address or an IPv6 /64) may hold, or wait for, at most its share of the
//! slots (`client_shares.uploads_percent`); past it, an upload is refused at once, without
//! waiting, and the caller answers 429. So one address with many slow uploads cannot make
//! everyone else wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::ratelimit::ClientKey;

/// The slots: `max` uploads at once, `per_client` of them for one client, a bounded wait.
#[derive(Debug)]
pub struct UploadSlots {
    permits: Semaphore,
    max: usize,
    per_client: usize,
    wait: Duration,
    waiting: AtomicUsize,
    clients: Mutex<HashMap<ClientKey, usize>>,
}

/// One upload's place; dropping it frees the slot and the client's share of it.
#[derive(Debug)]
pub struct UploadSlot<'a> {
    _permit: SemaphorePermit<'a>,
    _share: ClientUpload<'a>,
}

/// Why no slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRefused {
    /// The client already holds or waits for `share` uploads (429).
    ClientShare { share: usize },
    /// No slot freed up within the wait (503).
    Busy,
}

impl UploadSlots {
    /// `max` uploads at once (at least one), `per_client` (at least one) of them for one
    /// client; others wait at most `wait` for a slot.
    pub fn new(max: usize, per_client: usize, wait: Duration) -> UploadSlots {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        UploadSlots {
            permits: Semaphore::new(max),
            max,
            per_client: per_client.clamp(1, max),
            wait,
            waiting: AtomicUsize::new(0),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a slot for `client`: refused at once past the client's share, otherwise waiting
    /// at most the configured time for one to free up.
    pub async fn acquire(&self, client: ClientKey) -> Result<UploadSlot<'_>, SlotRefused> {
        let share = ClientUpload::count(self, client).ok_or(SlotRefused::ClientShare {
            share: self.per_client,
        })?;
        if let Ok(permit) = self.permits.try_acquire() {
            return Ok(UploadSlot {
                _permit: permit,
                _share: share,
            });
        }
        let _waiting = Waiting::count(&self.waiting);
        match tokio::time::timeout(self.wait, self.permits.acquire()).await {
            Ok(Ok(permit)) => Ok(UploadSlot {
                _permit: permit,
                _share: share,
            }),
            // Err(_) inside: the semaphore is never closed; treat it like a timeout.
            Ok(Err(_)) | Err(_) => Err(SlotRefused::Busy),
        }
    }

    /// Uploads `client` holds or waits for now.
    pub fn of_client(&self, client: ClientKey) -> usize {
        self.lock_clients().get(&client).copied().unwrap_or(0)
    }

    fn lock_clients(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, usize>> {
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// One upload counted against its client while it lives (also while it waits for a slot).
#[derive(Debug)]
struct ClientUpload<'a> {
    slots: &'a UploadSlots,
    client: ClientKey,
}

impl<'a> ClientUpload<'a> {
    /// Counts an upload of `client`, unless it already has its share.
    fn count(slots: &'a UploadSlots, client: ClientKey) -> Option<ClientUpload<'a>> {
        let mut clients = slots.lock_clients();
        let n = clients.entry(client).or_insert(0);
        if *n >= slots.per_client {
            return None;
        }
        *n += 1;
        Some(ClientUpload { slots, client })
    }
}

impl Drop for ClientUpload<'_> {
    fn drop(&mut self) {
        let mut clients = self.slots.lock_clients();
        if let Some(n) = clients.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                clients.remove(&self.client);
            }
        }
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

    fn client(last: u8) -> ClientKey {
        ClientKey::V4([127, 0, 0, last])
    }

    #[tokio::test]
    async fn given_all_slots_taken_when_none_frees_up_then_acquire_is_refused_after_the_wait() {
        let slots = UploadSlots::new(1, 1, Duration::from_millis(20));
        let first = slots.acquire(client(1)).await.unwrap();
        assert_eq!(slots.in_progress(), 1);
        assert_eq!(
            slots.acquire(client(2)).await.unwrap_err(),
            SlotRefused::Busy
        );
        assert_eq!(slots.waiting(), 0);
        assert_eq!(slots.of_client(client(2)), 0);
        drop(first);
        assert_eq!(slots.in_progress(), 0);
        let _again = slots.acquire(client(2)).await.unwrap();
    }

    #[tokio::test]
    async fn given_a_client_at_its_share_then_its_next_upload_is_refused_at_once_and_others_are_not(
    ) {
        let slots = UploadSlots::new(4, 2, Duration::from_secs(3600));
        let held: Vec<_> = [
            slots.acquire(client(1)).await,
            slots.acquire(client(1)).await,
        ]
        .into_iter()
        .map(Result::unwrap)
        .collect();
        let refused = tokio::time::timeout(Duration::from_secs(1), slots.acquire(client(1))).await;
        assert_eq!(
            refused.expect("refused without waiting").unwrap_err(),
            SlotRefused::ClientShare { share: 2 }
        );
        let _other = slots.acquire(client(2)).await.unwrap();
        drop(held);
        assert_eq!(slots.of_client(client(1)), 0);
        let _again = slots.acquire(client(1)).await.unwrap();
    }

    #[tokio::test]
    async fn given_a_waiter_when_a_slot_frees_up_within_the_wait_then_it_gets_the_slot() {
        let slots = std::sync::Arc::new(UploadSlots::new(1, 1, Duration::from_secs(3600)));
        let first = slots.acquire(client(1)).await.unwrap();
        let waiter = {
            let slots = std::sync::Arc::clone(&slots);
            tokio::spawn(async move { slots.acquire(client(2)).await.map(|_| ()) })
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
        assert_eq!(UploadSlots::new(0, 0, Duration::ZERO).max(), 1);
    }
}
