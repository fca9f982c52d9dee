//! # sandrun-test-support: what every sandrun test suite builds the same way
//!
//! Outside the trust boundary: nothing here runs in production. The gateway's in-process tests
//! (`sandrun-gateway/tests`), the integration tests against the real daemons (`sandrun-tests`)
//! and the benchmarks (`sandrun-bench`) share these builders, so an archive or a root check is
//! written once. It depends on no sandrun crate but the protocol crate `ipc`, so any of them can
//! use it without a cycle.
//!
//! Everything here panics on failure (with a message naming what failed): the callers are tests,
//! and a builder that cannot build must fail the test, never hand it something else.

pub mod archive;

/// Panics unless the process runs as root, naming `why` the test needs it. Tests that need root
/// fail instead of skipping: a skipped check is a check that passes without its tool.
pub fn require_root(why: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root ({why}): run it as root (CI does)"
    );
}

/// A job running `argv` with the protocol's defaults (no bundle, default limits, no outputs, no
/// network, no stdin), labelled `label`: what `sandrunctl run` sends for a bare command.
pub fn job_spec(argv: &[&str], label: &str) -> sandrun_ipc::JobSpec {
    sandrun_ipc::JobSpec {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        env: Vec::new(),
        workdir: String::new(),
        bundle: Vec::new(),
        limits: sandrun_ipc::Limits::default(),
        outputs: Vec::new(),
        template: None,
        network: sandrun_ipc::NetworkPolicy::None,
        label: label.to_owned(),
        stdin_bytes: 0,
        requirements: Vec::new(),
        build: false,
    }
}

/// `len` bytes that deflate cannot shrink and that hold every byte value, NULs included, in no
/// repeating pattern a truncation or reordering would survive (xorshift64 from `seed`; the same
/// `seed` gives the same bytes). No random number generator, so a failure reproduces.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The hard-link collection attacker of issue 9 (item 7), as Python for `python3 -c`: one
/// 200 MiB sparse file, 3,000 hard links to it whose names cannot travel (`a\n<i>`), a few more
/// with `*`, `?`, `\`, tab and invalid UTF-8, a file deeper than 32 levels, and four links with
/// good names (so collection has something to hash). Used by `tests/tests/collection.rs` (the
/// behaviour) and the bench's figure 12 (the timing).
pub const HARD_LINK_ATTACKER: &str = r#"
import os
fd = os.open('big', os.O_CREAT | os.O_WRONLY, 0o644)
os.ftruncate(fd, 200 << 20)
os.close(fd)
for i in range(3000):
    os.link('big', 'a\n%d' % i)
for i in range(4):
    os.link('big', '0ok%d' % i)
for name in [b'star*', b'q?', b'back\\slash', b'tab\tx', b'bad\xff']:
    os.link(b'big', name)
deep = '/'.join(['d'] * 40)
os.makedirs(deep)
os.link('big', deep + '/f')
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_seed_then_noise_is_reproducible_and_holds_every_byte_value() {
        let a = noise(1 << 16, 7);
        assert_eq!(a, noise(1 << 16, 7));
        assert_ne!(a, noise(1 << 16, 8));
        let mut seen = [false; 256];
        for b in &a {
            seen[usize::from(*b)] = true;
        }
        assert!(seen.iter().all(|s| *s), "a byte value is missing");
    }
}
