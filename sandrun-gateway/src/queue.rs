//! The bounded global queue, fair across clients.
//!
//! Each client has its own FIFO; the clients with waiting jobs form a ring. [`FairQueue::pop`]
//! takes the next job of the client at the head of the ring and moves that client to the back, so
//! a client with 50 queued jobs delays a client with one job by at most one job per other client.
//! The capacity is global: when `len() == capacity`, [`FairQueue::push`] refuses. Each client may
//! hold at most `client_share` of the positions (`client_shares.queue_percent` of the capacity),
//! so one client cannot fill the queue for everyone else.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Why [`FairQueue::push`] refused a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFull {
    /// Every position is taken; the caller answers 503 with `Retry-After`.
    Total,
    /// This client already holds its share of the positions (the share is given); the caller
    /// answers 429.
    ClientShare(usize),
}

/// A round-robin queue of jobs `J` per client `K`, bounded globally.
#[derive(Debug)]
pub struct FairQueue<K, J> {
    capacity: usize,
    client_share: usize,
    len: usize,
    ring: VecDeque<K>,
    per_client: HashMap<K, VecDeque<J>>,
}

impl<K: Clone + Eq + Hash, J: Clone + PartialEq> FairQueue<K, J> {
    /// A queue of `capacity` positions of which one client may hold `client_share`.
    pub fn new(capacity: usize, client_share: usize) -> Self {
        FairQueue {
            capacity,
            client_share,
            len: 0,
            ring: VecDeque::new(),
            per_client: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Jobs `client` has queued.
    pub fn client_len(&self, client: &K) -> usize {
        self.per_client.get(client).map_or(0, VecDeque::len)
    }

    /// Whether `client` could queue one more job now.
    /// A full queue is reported as such even to a client at its share.
    pub fn check_room(&self, client: &K) -> Result<(), QueueFull> {
        if self.len >= self.capacity {
            return Err(QueueFull::Total);
        }
        if self.client_len(client) >= self.client_share {
            return Err(QueueFull::ClientShare(self.client_share));
        }
        Ok(())
    }

    /// Appends a job at the back of its client's FIFO, within the capacity and the client's
    /// share.
    pub fn push(&mut self, client: K, job: J) -> Result<(), QueueFull> {
        self.check_room(&client)?;
        self.insert(client, job, false);
        Ok(())
    }

    /// Puts a job back at the front of its client's FIFO and that client at the front of the ring
    /// (a job the helper refused as busy keeps its turn). Ignores the capacity and the share: the
    /// job already held a place.
    pub fn push_front(&mut self, client: K, job: J) {
        self.insert(client, job, true);
    }

    /// Takes the next job in round-robin order.
    pub fn pop(&mut self) -> Option<(K, J)> {
        let client = self.ring.pop_front()?;
        let fifo = self.per_client.get_mut(&client)?;
        let job = fifo.pop_front()?;
        if fifo.is_empty() {
            self.per_client.remove(&client);
        } else {
            self.ring.push_back(client.clone());
        }
        self.len -= 1;
        Some((client, job))
    }

    /// Removes a queued job (cancel). Returns whether it was queued.
    pub fn remove(&mut self, client: &K, job: &J) -> bool {
        let Some(fifo) = self.per_client.get_mut(client) else {
            return false;
        };
        let Some(index) = fifo.iter().position(|j| j == job) else {
            return false;
        };
        fifo.remove(index);
        if fifo.is_empty() {
            self.per_client.remove(client);
            self.ring.retain(|k| k != client);
        }
        self.len -= 1;
        true
    }

    /// The 1-based place of a job in pop order, or `None` if it is not queued.
    pub fn position(&self, job: &J) -> Option<usize> {
        // Pop order: round r takes the r-th job of every client in ring order.
        let mut place = 0;
        let deepest = self
            .per_client
            .values()
            .map(VecDeque::len)
            .max()
            .unwrap_or(0);
        for round in 0..deepest {
            for client in &self.ring {
                let Some(candidate) = self.per_client.get(client).and_then(|f| f.get(round)) else {
                    continue;
                };
                place += 1;
                if candidate == job {
                    return Some(place);
                }
            }
        }
        None
    }

    fn insert(&mut self, client: K, job: J, front: bool) {
        let fifo = self.per_client.entry(client.clone()).or_default();
        let was_empty = fifo.is_empty();
        if front {
            fifo.push_front(job);
        } else {
            fifo.push_back(job);
        }
        if front {
            self.ring.retain(|k| k != &client);
            self.ring.push_front(client);
        } else if was_empty {
            self.ring.push_back(client);
        }
        self.len += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut FairQueue<&'static str, u32>) -> Vec<u32> {
        std::iter::from_fn(|| q.pop().map(|(_, j)| j)).collect()
    }

    #[test]
    fn given_two_clients_when_one_floods_then_pop_order_alternates() {
        let mut q = FairQueue::new(10, 10);
        for j in 1..=4 {
            q.push("flood", j).unwrap();
        }
        q.push("polite", 100).unwrap();
        assert_eq!(q.position(&100), Some(2));
        assert_eq!(drain(&mut q), vec![1, 100, 2, 3, 4]);
    }

    #[test]
    fn given_full_queue_when_pushing_then_it_is_refused_until_a_pop() {
        let mut q = FairQueue::new(2, 2);
        q.push("a", 1).unwrap();
        q.push("b", 2).unwrap();
        assert_eq!(q.push("c", 3), Err(QueueFull::Total));
        q.pop().unwrap();
        q.push("c", 3).unwrap();
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn given_queued_job_when_removed_then_positions_close_the_gap() {
        let mut q = FairQueue::new(10, 10);
        q.push("a", 1).unwrap();
        q.push("b", 2).unwrap();
        q.push("c", 3).unwrap();
        assert!(q.remove(&"b", &2));
        assert!(!q.remove(&"b", &2));
        assert_eq!(q.position(&3), Some(2));
        assert_eq!(drain(&mut q), vec![1, 3]);
        assert!(q.is_empty());
    }

    #[test]
    fn given_busy_job_when_pushed_front_then_it_runs_next() {
        let mut q = FairQueue::new(10, 10);
        q.push("a", 1).unwrap();
        q.push("b", 2).unwrap();
        let (client, job) = q.pop().unwrap();
        q.push_front(client, job);
        assert_eq!(drain(&mut q), vec![1, 2]);
    }

    #[test]
    fn given_a_client_at_its_share_then_it_is_refused_while_others_still_queue() {
        let mut q = FairQueue::new(8, 2);
        q.push("flood", 1).unwrap();
        q.push("flood", 2).unwrap();
        assert_eq!(q.push("flood", 3), Err(QueueFull::ClientShare(2)));
        q.push("polite", 100).unwrap();
        let (client, job) = q.pop().unwrap();
        assert_eq!((client, job), ("flood", 1));
        q.push("flood", 3).unwrap();
        // A job put back keeps its place even past the share.
        q.push_front("flood", 1);
        assert_eq!(q.client_len(&"flood"), 3);
        assert_eq!(drain(&mut q), vec![1, 100, 2, 3]);
    }
}
