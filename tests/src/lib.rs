//! # sandrun-tests: the harness for integration tests against the real daemons
//!
//! These tests sit outside the trust boundary and attack it: they start the real `sandrund` as
//! root ([`Helper::start`]), submit real jobs over the real socket ([`Helper::run`], or raw frames
//! for protocol abuse), and send the [`probe`](../sandrun_probe/index.html) binary into sandboxes
//! to report what a job can see and do. Each assertion is about what the kernel did.
//!
//! Every helper runs in its own child cgroup (so parallel tests never share job cgroups), with its
//! own socket, mount point and slot uid range, and is killed when the [`Helper`] is dropped.
//! Slot uid ranges come from an allocator ([`config`], see [`slots`]) that is safe across the
//! threads of a test binary and across test processes, so tests never pick one by hand.

pub mod cgroup;
pub mod client;
pub mod helper;
pub mod host;
pub mod hostile;
pub mod signature;
pub mod slots;
pub mod stack;

pub use client::{Job, JobConn, Outcome};
pub use helper::{ensure_built, Helper};
pub use slots::{config, Config};

/// Archive builders (tar.gz, zip, raw hostile entries), shared with the gateway's own tests.
pub use sandrun_test_support::archive;
pub use sandrun_test_support::noise;

/// Panics unless the test runs as root: these tests start a root daemon and build sandboxes.
pub fn require_root() {
    sandrun_test_support::require_root("it starts sandrund and real sandboxes");
}

/// Runs `run` (a `Command`'s `spawn` or `output`) again while it fails with `ETXTBSY`: a binary
/// a test has just copied can be briefly "busy" while another test thread's fork still holds
/// the copy's write descriptor, which clears as soon as that child execs. Panics after 2 s.
pub fn retry_while_busy<T>(what: &str, mut run: impl FnMut() -> std::io::Result<T>) -> T {
    for _ in 0..100 {
        match run() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => return other.unwrap_or_else(|e| panic!("{what}: {e}")),
        }
    }
    panic!("{what}: the binary stayed busy (ETXTBSY)");
}
