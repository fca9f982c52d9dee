//! # sandrund: sandrun's root helper
//!
//! This crate is the only part of sandrun that runs as root. It accepts typed, bounded requests
//! (the `sandrun-ipc` protocol) on a Unix socket from the gateway user and the admin group,
//! validates and clamps them again, and runs each job in a sandbox (namespaces, tmpfs root,
//! cgroup, rlimits, unprivileged per-slot uid, no capabilities, Landlock, seccomp). It parses no
//! HTTP, TLS, JSON, multipart or archive data: the gateway does, unprivileged.
//!
//! The process is single-threaded: a `poll` loop over the listening socket, client connections,
//! pidfds, output pipes and one tick timer ([`server`]). That is what makes `fork` safe here;
//! every clone takes the `sys::SingleThreaded` token that start-up checks for.
//! See `docs/sandrund.md` for the sandbox steps in the order [`sandbox::prepare`] and
//! [`sandbox::start`] perform them.

// Every raw syscall is in `sys` (the FFI module); every other module file forbids unsafe code
// (`sandbox/mod.rs`, `sandbox/seccomp.rs` and `cgroup/mod.rs` outside their tests, whose test
// modules make raw syscalls of their own).
#![deny(unsafe_code)]

// Only `daemon::main_with_args` is public: the `sandrund` binary (src/main.rs) is the library's
// one user (the tests crate and the bench start the binary, they do not link this library), so
// everything else is crate-private and the compiler flags code nothing calls.
pub(crate) mod cgroup;
pub(crate) mod config;
pub mod daemon;
pub(crate) mod ids;
mod logger;
pub(crate) mod sandbox;
pub(crate) mod server;
#[allow(unsafe_code)]
pub(crate) mod sys;
pub(crate) mod template;
