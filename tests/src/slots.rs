//! Slot uid ranges handed out by an allocator, so no two helpers under test share one.
//!
//! A helper runs job `n` as uid `slot_uid_base + n`, and several tests look at the host's
//! processes and files by those uids; two helpers with overlapping ranges would see (and kill)
//! each other's jobs. [`config`] therefore takes a free range of [`RANGE_WIDTH`] uids from
//! [`RANGES`] of them, starting at [`FIRST_BASE`]. A range is taken by holding an exclusive
//! `flock` on `/run/sandrun-tests/slots/<n>.lock` for as long as the returned [`Config`] (or any
//! [`Helper`](crate::Helper) or [`Stack`](crate::stack::Stack) started from it) lives. `flock`
//! locks belong to an open file description, so they exclude each other between the threads of
//! one test binary as well as between test processes running at the same time, and the kernel
//! drops them when a test process dies, so a crashed run leaves nothing to clean up.
//!
//! The ranges lie above anything chosen by hand before the allocator existed (`300000 +
//! 1000 * k` with small `k`, and the benchmarks' `300000`).

use std::fs::{self, File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Where the lock files live (root-only, like the tests).
pub const LOCK_DIR: &str = "/run/sandrun-tests/slots";
/// The slot uid base of range 0.
pub const FIRST_BASE: u32 = 400_000;
/// Uids between the bases of two neighbouring ranges.
pub const RANGE_WIDTH: u32 = 1000;
/// How many ranges there are (more than the tests of one binary that run at once).
pub const RANGES: u32 = 512;
/// `slot_count` in every config [`config`] writes; a range holds at most [`RANGE_WIDTH`].
pub const SLOT_COUNT: u32 = 16;

/// One slot uid range, held until this is dropped.
#[derive(Debug)]
pub struct SlotLease {
    base: u32,
    _lock: Flock<File>,
}

impl SlotLease {
    /// Takes the first free range. Panics when all [`RANGES`] are held or the lock directory
    /// cannot be used (the tests run as root).
    pub fn acquire() -> SlotLease {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(LOCK_DIR)
            .unwrap_or_else(|e| panic!("create {LOCK_DIR}: {e} (the tests run as root)"));
        for n in 0..RANGES {
            let path = lock_path(n);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => {
                    return SlotLease {
                        base: FIRST_BASE + n * RANGE_WIDTH,
                        _lock: lock,
                    }
                }
                Err((_, Errno::EWOULDBLOCK)) => continue,
                Err((_, e)) => panic!("flock {}: {e}", path.display()),
            }
        }
        panic!("all {RANGES} slot uid ranges under {LOCK_DIR} are held by running tests");
    }

    /// The first uid of the range.
    pub fn base(&self) -> u32 {
        self.base
    }
}

fn lock_path(n: u32) -> PathBuf {
    Path::new(LOCK_DIR).join(format!("{n}.lock"))
}

/// A helper configuration with a slot uid range of its own: what [`Helper::start`] and
/// [`Stack::start`] take. Clones share the range; it is released when the last clone and the
/// last helper started from it are gone.
///
/// [`Helper::start`]: crate::Helper::start
/// [`Stack::start`]: crate::stack::Stack::start
#[derive(Debug, Clone)]
pub struct Config {
    toml: String,
    lease: Arc<SlotLease>,
}

/// A config with a freshly allocated slot uid range and `extra` appended (top-level keys
/// first, then tables).
pub fn config(extra: &str) -> Config {
    let lease = SlotLease::acquire();
    Config {
        toml: format!(
            "slot_uid_base = {}\nslot_count = {SLOT_COUNT}\n{extra}\n",
            lease.base()
        ),
        lease: Arc::new(lease),
    }
}

impl Config {
    /// The TOML text for `sandrund`.
    pub fn toml(&self) -> &str {
        &self.toml
    }

    /// The first slot uid of this config's range.
    pub fn slot_uid_base(&self) -> u32 {
        self.lease.base()
    }

    /// The uids this config's jobs run as.
    pub fn slot_uids(&self) -> Range<u32> {
        self.slot_uid_base()..self.slot_uid_base() + SLOT_COUNT
    }

    /// The same range with top-level `keys` put before the rest (they must not be in it).
    pub fn with_top_level(&self, keys: &str) -> Config {
        Config {
            toml: format!("{keys}\n{}", self.toml),
            lease: Arc::clone(&self.lease),
        }
    }

    /// Keeps the range held by whoever holds the returned handle.
    pub(crate) fn lease(&self) -> Arc<SlotLease> {
        Arc::clone(&self.lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_configs_alive_at_once_then_their_ranges_differ_and_a_dropped_one_is_reused() {
        crate::require_root();
        let a = config("");
        let b = config("");
        let c = b.clone();
        assert_ne!(a.slot_uid_base(), b.slot_uid_base());
        assert_eq!(b.slot_uid_base(), c.slot_uid_base());
        assert!(a
            .toml()
            .contains(&format!("slot_uid_base = {}\n", a.slot_uid_base())));
        let freed = a.slot_uid_base();
        drop(a);
        // A free range is taken again (the lowest free one; other tests may hold lower ones).
        let mut again = Vec::new();
        while again.last().map(Config::slot_uid_base) != Some(freed) {
            let next = config("");
            assert_ne!(
                next.slot_uid_base(),
                b.slot_uid_base(),
                "a held range was given out"
            );
            assert!(
                again.len() < RANGES as usize,
                "the freed range never came back"
            );
            again.push(next);
        }
    }
}
