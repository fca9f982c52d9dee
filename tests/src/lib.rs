//! # sandrun-tests: the harness for integration tests against the real daemons
//!
//! These tests sit outside the trust boundary and attack it: they start the real `sandrund` as
//! root ([`Helper::start`]), submit real jobs over the real socket ([`Helper::run`], or raw frames
//! for protocol abuse), and send the [`probe`](../sandrun_probe/index.html) binary into sandboxes
//! to report what a job can see and do. Each assertion is about what the kernel did.
//!
//! Every helper runs in its own child cgroup (so parallel tests never share job cgroups), with its
//! own socket, mount point and slot uid range, and is killed when the [`Helper`] is dropped.

pub mod cgroup;
pub mod client;
pub mod helper;
pub mod host;
pub mod hostile;
pub mod stack;

pub use client::{Job, JobConn, Outcome};
pub use helper::Helper;

/// Panics unless the test runs as root: these tests start a root daemon and build sandboxes.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this integration test needs root (it starts sandrund and real sandboxes); run it as root"
    );
}

/// A config with a test-specific slot uid range (`300000 + 1000 * k`) and `extra` appended
/// (top-level keys first, then tables).
pub fn config(k: u32, extra: &str) -> String {
    format!(
        "slot_uid_base = {}\nslot_count = 16\n{extra}\n",
        slot_uid_base(k)
    )
}

/// The slot uid base [`config`] uses for test number `k`.
pub fn slot_uid_base(k: u32) -> u32 {
    300_000 + 1000 * k
}
