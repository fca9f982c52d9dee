//! `sandrun-outputs` (package `sandrun-collect`): the output collector **K** of a finished job,
//! its own executable so that
//! its address space holds nothing of the root helper's (no other job's bundle, stdin or
//! connection buffers), and so that the walk is no part of the root binary.
//!
//! The helper (`sandrund`, `sandbox::collector`) forks K into the job's cgroup, closes every
//! descriptor but two, lowers its rlimits, drops it to the job's uid and gid (no groups, no
//! capabilities, `NO_NEW_PRIVS`) and `execveat`s this file through a descriptor it opened at
//! start-up, with an empty environment. K then finds
//!
//! - fd [`WORK_FD`]: the job's `/work` (`O_PATH | O_DIRECTORY`), the only tree it may read;
//! - fd [`SOCKET_FD`]: its end of a socketpair with the helper, holding one
//!   [`sandrun_ipc::CollectOrder`] frame (patterns and bounds).
//!
//! First thing, before reading its order or anything beneath `/work`, it confines itself
//! ([`confine`]: not dumpable, refuses uid 0 and any capability, Landlock, seccomp, and only
//! then the name `sandrun-collect`, so that a process of that name is always confined); then reads
//! the order with [`sandrun_ipc::MAX_ORDER_BYTES`] as its limit, walks and streams typed frames
//! ([`walk::serve`]). A failure is sent as an `Error` frame and K exits nonzero; it never
//! collects unconfined. The helper re-checks every frame (`job::Collection`).
//!
//! The binary has no Rust `main`: the standard runtime's start-up would open `/dev/null` on
//! the closed descriptors 0 to 2 before any confinement; K's C `main` runs nothing before
//! [`confine`].

#![cfg_attr(not(test), no_main)]

mod confine;
mod walk;

use std::io::{Read, Write};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use sandrun_ipc::{CollectOrder, ErrorCode, IpcError, Response, MAX_ORDER_BYTES};

/// The job's `/work`, where the helper puts it.
pub const WORK_FD: RawFd = 3;
/// K's end of the socket to the helper.
pub const SOCKET_FD: RawFd = 4;
/// Exit code after a refused confinement step or order (reported on the socket first).
const EXIT_REFUSED: i32 = 1;
/// Exit code when the walk panicked (a bug).
#[cfg_attr(test, allow(dead_code))]
const EXIT_PANIC: i32 = 101;

/// The process's entry point (no Rust runtime start-up: see the crate docs).
#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    std::panic::catch_unwind(run).unwrap_or(EXIT_PANIC)
}

#[cfg_attr(test, allow(dead_code))]
fn run() -> i32 {
    // SAFETY: both numbers are constants, not -1; `is_open` only queries the descriptor table.
    let (work, sock) = unsafe {
        (
            BorrowedFd::borrow_raw(WORK_FD),
            BorrowedFd::borrow_raw(SOCKET_FD),
        )
    };
    if !confine::is_open(sock) {
        return EXIT_REFUSED;
    }
    // SAFETY: the helper placed K's socket at SOCKET_FD and nothing else in this process
    // owns it (nothing ran before `main`).
    let mut sock = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(SOCKET_FD) });
    if !confine::is_open(work) {
        return refuse(&mut sock, "no work directory at fd 3".into());
    }
    if let Err(e) = confine::confine(work) {
        return refuse(&mut sock, e);
    }
    let order = match read_order(&mut sock) {
        Ok(order) => order,
        Err(e) => return refuse(&mut sock, format!("order: {e}")),
    };
    // SAFETY: as for the socket: fd 3 is the helper's `/work` descriptor, owned by no one else.
    let work = unsafe { OwnedFd::from_raw_fd(WORK_FD) };
    walk::serve(work, sock, &order.patterns, limits(&order))
}

/// Sends why K does not collect (the helper fails the collection with it) and returns K's exit
/// code.
fn refuse(sock: &mut impl Write, why: String) -> i32 {
    let msg = Response::Error(IpcError::new(
        ErrorCode::SandboxSetup,
        format!("output collector: {why}"),
    ));
    if let Ok(frame) = sandrun_ipc::encode(&msg) {
        let _ = sock.write_all(&frame);
    }
    EXIT_REFUSED
}

/// Reads the helper's one [`CollectOrder`] frame, refusing a payload over [`MAX_ORDER_BYTES`]
/// before reading it.
fn read_order(sock: &mut impl Read) -> Result<CollectOrder, String> {
    let mut header = [0u8; sandrun_ipc::codec::HEADER_BYTES];
    sock.read_exact(&mut header)
        .map_err(|e| format!("reading its header: {e}"))?;
    let len = sandrun_ipc::codec::payload_len(header).map_err(|e| e.to_string())?;
    if len > MAX_ORDER_BYTES {
        return Err(format!("{len} bytes, over {MAX_ORDER_BYTES}"));
    }
    let mut payload = vec![0u8; len];
    sock.read_exact(&mut payload)
        .map_err(|e| format!("reading its {len} bytes: {e}"))?;
    let order: CollectOrder =
        sandrun_ipc::codec::decode_payload(&payload).map_err(|e| e.to_string())?;
    if order.patterns.len() > sandrun_ipc::rules::MAX_OUTPUT_PATTERNS {
        return Err(format!("{} patterns", order.patterns.len()));
    }
    Ok(order)
}

fn limits(order: &CollectOrder) -> walk::CollectLimits {
    walk::CollectLimits {
        max_visited: usize::try_from(order.max_visited).unwrap_or(usize::MAX),
        max_total_bytes: order.max_total_bytes,
        max_files: usize::try_from(order.max_files).unwrap_or(usize::MAX),
        budget: Duration::from_millis(order.budget_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(n: usize) -> CollectOrder {
        CollectOrder {
            patterns: (0..n)
                .map(|i| sandrun_ipc::OutputPattern::new(format!("out{i}/")).unwrap())
                .collect(),
            max_visited: 10,
            max_total_bytes: 20,
            max_files: 30,
            budget_ms: 40,
        }
    }

    #[test]
    fn given_an_encoded_order_then_it_decodes_to_the_same_limits() {
        let frame = sandrun_ipc::encode(&order(2)).unwrap();
        let got = read_order(&mut &frame[..]).unwrap();
        assert_eq!(got, order(2));
        let l = limits(&got);
        assert_eq!(
            (l.max_visited, l.max_total_bytes, l.max_files),
            (10, 20, 30)
        );
        assert_eq!(l.budget, Duration::from_millis(40));
    }

    #[test]
    fn given_an_oversized_or_overfull_order_then_it_is_refused_before_decoding() {
        let mut big = (u32::try_from(MAX_ORDER_BYTES).unwrap() + 1)
            .to_le_bytes()
            .to_vec();
        big.extend(vec![0u8; 16]);
        let err = read_order(&mut &big[..]).unwrap_err();
        assert!(err.contains("over"), "{err}");
        let frame = sandrun_ipc::encode(&order(65)).unwrap();
        let err = read_order(&mut &frame[..]).unwrap_err();
        assert!(err.contains("65 patterns"), "{err}");
        let frame = sandrun_ipc::encode(&order(1)).unwrap();
        assert!(read_order(&mut &frame[..frame.len() - 1]).is_err());
    }
}
