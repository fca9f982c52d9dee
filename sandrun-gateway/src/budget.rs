//! The gateway's memory budget: one limit for everything the gateway holds for its callers
//! (uploads being expanded, queued bundles, logs, outputs awaiting download, answers being sent,
//! WebSocket backlogs), and each client's share of it. [`MemoryBudget`] keeps the ledger;
//! a [`Reservation`] is one charge against it, grown and shrunk as its bytes come and go and
//! released when dropped; a [`SharedReservation`] is one charge several holders grow together.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::ratelimit::ClientKey;

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetFull {
    /// Everyone together holds the whole budget (503: the service is loaded).
    Global,
    /// The client already holds its share (429: the client's own doing).
    ClientShare,
    /// This one reservation alone would be larger than a client's whole share (413).
    LargerThanShare,
}

/// A byte budget for job data held in memory: global, and per client (`share` bytes at most to
/// one [`ClientKey`]), so no client can take the memory another client's job needs.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    share: u64,
    ledger: Mutex<Ledger>,
}

/// What is held, in total and by whom. Clients holding nothing have no entry.
#[derive(Debug, Default)]
struct Ledger {
    used: u64,
    by_client: HashMap<ClientKey, u64>,
}

impl MemoryBudget {
    /// A budget of `limit` bytes of which one client may hold `share` bytes.
    pub fn new(limit: u64, share: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit,
            share: share.min(limit),
            ledger: Mutex::new(Ledger::default()),
        })
    }

    pub fn used(&self) -> u64 {
        self.ledger().used
    }

    /// Bytes `client` holds.
    pub fn used_by(&self, client: &ClientKey) -> u64 {
        self.ledger().by_client.get(client).copied().unwrap_or(0)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes one client may hold at most.
    pub fn share(&self) -> u64 {
        self.share
    }

    /// Reserves `bytes` for `client`, or says which limit it would cross.
    pub fn reserve(
        self: &Arc<Self>,
        client: ClientKey,
        bytes: u64,
    ) -> Result<Reservation, BudgetFull> {
        let mut reservation = self.empty(client);
        reservation.try_grow(bytes)?;
        Ok(reservation)
    }

    /// A reservation of nothing yet, charged to `client` as it grows.
    pub fn empty(self: &Arc<Self>, client: ClientKey) -> Reservation {
        Reservation {
            budget: Arc::clone(self),
            client,
            bytes: 0,
        }
    }

    fn take(&self, client: ClientKey, held: u64, bytes: u64) -> Result<(), BudgetFull> {
        if held.saturating_add(bytes) > self.share {
            return Err(BudgetFull::LargerThanShare);
        }
        let mut ledger = self.ledger();
        let mine = ledger.by_client.get(&client).copied().unwrap_or(0);
        if mine.saturating_add(bytes) > self.share {
            return Err(BudgetFull::ClientShare);
        }
        if ledger.used.saturating_add(bytes) > self.limit {
            return Err(BudgetFull::Global);
        }
        if bytes > 0 {
            ledger.used += bytes;
            *ledger.by_client.entry(client).or_insert(0) += bytes;
        }
        Ok(())
    }

    /// Charges `bytes` to `client` within the whole budget only, past the client's share.
    fn take_past_share(&self, client: ClientKey, bytes: u64) -> Result<(), BudgetFull> {
        let mut ledger = self.ledger();
        if ledger.used.saturating_add(bytes) > self.limit {
            return Err(BudgetFull::Global);
        }
        ledger.used += bytes;
        *ledger.by_client.entry(client).or_insert(0) += bytes;
        Ok(())
    }

    fn give_back(&self, client: ClientKey, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut ledger = self.ledger();
        ledger.used = ledger.used.saturating_sub(bytes);
        if let Some(mine) = ledger.by_client.get_mut(&client) {
            *mine = mine.saturating_sub(bytes);
            if *mine == 0 {
                ledger.by_client.remove(&client);
            }
        }
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // Every update leaves the ledger consistent; nothing in it can panic halfway.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Bytes charged to the budget and to one client; released on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    client: ClientKey,
    bytes: u64,
}

impl Reservation {
    /// Charges `bytes` more; `false` (and nothing charged) if the budget or the client's share
    /// is exhausted.
    pub fn grow(&mut self, bytes: u64) -> bool {
        self.try_grow(bytes).is_ok()
    }

    /// Charges `bytes` more, or says which limit that would cross (and charges nothing).
    pub fn try_grow(&mut self, bytes: u64) -> Result<(), BudgetFull> {
        self.budget.take(self.client, self.bytes, bytes)?;
        self.bytes += bytes;
        Ok(())
    }

    /// Charges `bytes` more within the whole budget, even past the client's share (see
    /// [`SharedReservation::try_grow_past_share`]).
    pub fn try_grow_past_share(&mut self, bytes: u64) -> Result<(), BudgetFull> {
        self.budget.take_past_share(self.client, bytes)?;
        self.bytes += bytes;
        Ok(())
    }

    /// Charges `bytes` that are already held, even past the limits (see
    /// [`SharedReservation::charge_held`]).
    pub fn charge_held(&mut self, bytes: u64) {
        let mut ledger = self.budget.ledger();
        ledger.used = ledger.used.saturating_add(bytes);
        *ledger.by_client.entry(self.client).or_insert(0) += bytes;
        drop(ledger);
        self.bytes += bytes;
    }

    /// Releases up to `bytes` of this reservation.
    pub fn shrink(&mut self, bytes: u64) {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        self.budget.give_back(self.client, bytes);
    }

    /// Moves another reservation's bytes into this one.
    pub fn absorb(&mut self, mut other: Reservation) {
        let bytes = std::mem::take(&mut other.bytes);
        if other.client != self.client {
            // Charged to the wrong client: move the charge (the total is unchanged).
            self.budget.give_back(other.client, bytes);
            let mut ledger = self.budget.ledger();
            ledger.used += bytes;
            *ledger.by_client.entry(self.client).or_insert(0) += bytes;
        }
        self.bytes += bytes;
    }

    /// Takes this reservation's bytes out into a new one, leaving this one empty.
    pub fn take(&mut self) -> Reservation {
        Reservation {
            budget: Arc::clone(&self.budget),
            client: self.client,
            bytes: std::mem::take(&mut self.bytes),
        }
    }

    /// An empty reservation for the same client.
    pub fn sibling(&self) -> Reservation {
        self.budget.empty(self.client)
    }

    pub fn client(&self) -> ClientKey {
        self.client
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.client, self.bytes);
    }
}

/// A reservation shared by several holders, released when the last clone is dropped. An
/// upload's body reader (async) and assembler (blocking pool) both charge the bytes they are
/// about to hold to one; a job's data is charged to one that its table entry and every response
/// body sending some of that data hold, so the charge lasts until the last byte is sent.
#[derive(Debug, Clone)]
pub struct SharedReservation(Arc<Mutex<Reservation>>);

impl SharedReservation {
    pub fn new(reservation: Reservation) -> SharedReservation {
        SharedReservation(Arc::new(Mutex::new(reservation)))
    }

    /// A charge against a budget of its own with no limit: for parser tests and fuzzing.
    pub fn unlimited() -> SharedReservation {
        let budget = MemoryBudget::new(u64::MAX, u64::MAX);
        SharedReservation::new(budget.empty(ClientKey::V4([127, 0, 0, 1])))
    }

    /// Charges `bytes` more, or says which limit that would cross.
    pub fn try_grow(&self, bytes: u64) -> Result<(), BudgetFull> {
        self.lock().try_grow(bytes)
    }

    /// Releases up to `bytes`.
    pub fn shrink(&self, bytes: u64) {
        self.lock().shrink(bytes);
    }

    pub fn bytes(&self) -> u64 {
        self.lock().bytes()
    }

    /// Moves everything charged so far into a reservation of its own.
    pub fn take(&self) -> Reservation {
        self.lock().take()
    }

    /// Moves another reservation's bytes into this one.
    pub fn absorb(&self, other: Reservation) {
        self.lock().absorb(other);
    }

    /// Charges `bytes` more within the whole budget, even past the client's share: for a copy
    /// that replaces data already charged to the client and released soon after (a job's
    /// tarball, built from outputs that are freed once it is sent), so a client whose outputs
    /// fill its share can still download them, and the budget still bounds the gateway.
    pub fn try_grow_past_share(&self, bytes: u64) -> Result<(), BudgetFull> {
        self.lock().try_grow_past_share(bytes)
    }

    /// Charges `bytes` that are already held (they exist whether or not there is room), so the
    /// budget counts them and refuses others until they are released.
    pub fn charge_held(&self, bytes: u64) {
        self.lock().charge_held(bytes);
    }

    fn lock(&self) -> MutexGuard<'_, Reservation> {
        // A reservation's fields are updated after the ledger call that can fail: consistent.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(n: u8) -> ClientKey {
        ClientKey::V4([10, 0, 0, n])
    }

    #[test]
    fn given_budget_when_reservations_exceed_it_then_they_are_refused_and_released_on_drop() {
        let budget = MemoryBudget::new(100, 100);
        let a = budget.reserve(client(1), 60).unwrap();
        assert_eq!(
            budget.reserve(client(2), 50).err(),
            Some(BudgetFull::Global)
        );
        drop(a);
        assert_eq!(budget.used(), 0);
        assert!(budget.reserve(client(2), 100).is_ok());
    }

    #[test]
    fn given_one_client_at_its_share_then_it_is_refused_and_another_client_still_reserves() {
        let budget = MemoryBudget::new(100, 25);
        let mut a = budget.reserve(client(1), 20).unwrap();
        let b = budget.reserve(client(1), 5).unwrap();
        assert_eq!(a.try_grow(1), Err(BudgetFull::ClientShare));
        assert_eq!(
            budget.reserve(client(1), 26).err(),
            Some(BudgetFull::LargerThanShare)
        );
        let other = budget.reserve(client(2), 25).unwrap();
        assert_eq!((budget.used_by(&client(1)), budget.used()), (25, 50));
        a.shrink(10);
        assert!(a.grow(10));
        drop((a, b, other));
        assert_eq!(
            (
                budget.used(),
                budget.used_by(&client(1)),
                budget.used_by(&client(2))
            ),
            (0, 0, 0)
        );
    }

    #[test]
    fn given_a_reservation_absorbed_from_another_client_then_the_charge_moves_with_it() {
        let budget = MemoryBudget::new(100, 50);
        let mut a = budget.reserve(client(1), 10).unwrap();
        a.absorb(budget.reserve(client(2), 7).unwrap());
        assert_eq!(
            (budget.used_by(&client(1)), budget.used_by(&client(2))),
            (17, 0)
        );
        let taken = a.take();
        drop(a);
        assert_eq!(budget.used(), 17);
        drop(taken);
        assert_eq!(budget.used(), 0);
    }
}
