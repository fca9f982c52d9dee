//! The cgroup worker: a process forked from the helper at start-up that creates and removes the
//! directories of job cgroups, so that the helper's loop never blocks in `mkdir` or `rmdir`.
//!
//! Both take the kernel's `cgroup_mutex`, which a cgroup v1 migration (a warm sandbox moving
//! into its cgroup) holds across an RCU grace period: measured on the development machine, 24
//! of 2,412 such calls in 200 serial jobs took 1.8–27 ms, 140 ms in all, each one a stall of
//! every other job's events while the loop made it. The worker makes them instead, one at a
//! time, and the loop carries on; it only writes limits and opens files of a cgroup whose
//! directories exist (`CgroupManager::adopt`), which do not take that lock.
//!
//! The worker is a `fork` of the helper (same uid, same confinement, no `execve`), made once the
//! helper has its listening socket and before its loop starts, so it holds no client
//! connection, no sandbox and no job's data (and it closes the listening socket at once). It closes every descriptor but its socket and stderr, names itself `sandrun-cgroups`,
//! dies with the helper (`PR_SET_PDEATHSIG`, and its socket's end; it ignores SIGTERM, SIGINT
//! and SIGHUP, which are the helper's to act on, so a stop signal sent to the whole unit does
//! not look like a failed worker), and does only what a
//! request names: [`Op::Make`] is `CgroupManager::make_dirs`, [`Op::Remove`] is
//! `CgroupManager::remove_dirs`, of one job cgroup name that `validate_name` accepts, below the
//! helper's own `sandrun/` cgroup directories. Requests and replies are single `SOCK_SEQPACKET`
//! messages, answered in order.
//!
//! If the worker dies, breaks the protocol or leaves a request unanswered for
//! [`STUCK_AFTER`], the helper logs it, stops it, does what it had not answered on the loop and
//! the rest of the work there from then on (as before there was a worker): nothing is lost, it
//! is only slower. A request that finds the socket full (at most [`MAX_IN_FLIGHT`] are in
//! flight) is done on the loop instead; the worker stays.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType};

use crate::cgroup::{CgroupError, CgroupManager};
use crate::sys;

/// What a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    /// Create the empty directories of a job cgroup.
    Make,
    /// Remove them (the cgroup has no process left).
    Remove,
}

impl Op {
    fn byte(self) -> u8 {
        match self {
            Op::Make => 1,
            Op::Remove => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Op> {
        match b {
            1 => Some(Op::Make),
            2 => Some(Op::Remove),
            _ => None,
        }
    }
}

/// The worker's answer to one request.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Reply {
    pub op: Op,
    pub name: String,
    /// Why it failed; `None` when it was done.
    pub error: Option<String>,
}

/// Longest job cgroup name a message carries (`job-w<u64>` and `job-<u64>` are far shorter).
const MAX_NAME: usize = 64;
/// Longest error text a reply carries.
const MAX_ERROR: usize = 400;
/// Largest message either way.
const MAX_MESSAGE: usize = 3 + MAX_NAME + MAX_ERROR;

/// `[op][name]`.
fn encode_request(op: Op, name: &str) -> Option<Vec<u8>> {
    if name.is_empty() || name.len() > MAX_NAME {
        return None;
    }
    let mut out = vec![op.byte()];
    out.extend_from_slice(name.as_bytes());
    Some(out)
}

fn decode_request(msg: &[u8]) -> Option<(Op, &str)> {
    let (&op, name) = msg.split_first()?;
    let name = std::str::from_utf8(name).ok()?;
    (!name.is_empty() && name.len() <= MAX_NAME).then_some((Op::from_byte(op)?, name))
}

/// `[op][0 = done, 1 = failed][name length][name][error]`.
fn encode_reply(op: Op, name: &str, result: &Result<(), CgroupError>) -> Vec<u8> {
    let name = &name.as_bytes()[..name.len().min(MAX_NAME)];
    let mut out = vec![op.byte(), u8::from(result.is_err())];
    // At most MAX_NAME (64) bytes: fits.
    out.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(name);
    if let Err(e) = result {
        let text = e.to_string();
        let mut end = text.len().min(MAX_ERROR);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        out.extend_from_slice(&text.as_bytes()[..end]);
    }
    out
}

fn decode_reply(msg: &[u8]) -> Option<Reply> {
    let [op, failed, len, rest @ ..] = msg else {
        return None;
    };
    let len = usize::from(*len);
    let name = std::str::from_utf8(rest.get(..len)?).ok()?.to_owned();
    let text = String::from_utf8_lossy(&rest[len..]).into_owned();
    let error = match failed {
        0 if text.is_empty() => None,
        1 => Some(text),
        _ => return None,
    };
    Some(Reply {
        op: Op::from_byte(*op)?,
        name,
        error,
    })
}

/// Most requests in flight; more are done on the loop (the pool asks for at most its size, each
/// teardown for one, so this is only reached by a worker that has stopped answering).
pub(super) const MAX_IN_FLIGHT: usize = 128;
/// A request unanswered this long means the worker is stuck: it is stopped.
pub(super) const STUCK_AFTER: Duration = Duration::from_secs(10);

/// The worker broke the protocol or went away; the helper carries on without it.
#[derive(Debug)]
pub(super) struct Gone(pub String);

/// Why a request was not sent.
#[derive(Debug)]
pub(super) enum NotSent {
    /// The socket is full or too many requests are in flight: do this one on the loop.
    Full,
    /// The worker is gone: stop it.
    Gone(Gone),
}

/// The helper's end of the worker: its socket, its pid and the requests it has not answered
/// (with when each was sent).
pub(super) struct CgroupWorker {
    sock: OwnedFd,
    pid: libc::pid_t,
    in_flight: VecDeque<(Op, String, Instant)>,
}

impl CgroupWorker {
    /// Forks the worker (start-up only: see `sys::fork_worker`).
    pub(super) fn start(
        one_thread: sys::SingleThreaded,
        cgroups: &dyn CgroupManager,
    ) -> Result<CgroupWorker, Errno> {
        let (ours, theirs) = seqpacket_pair()?;
        // The child closes `ours`, and the listening socket, with every other descriptor
        // (`serve`).
        let pid = sys::fork_worker(one_thread, || serve(theirs.as_fd(), cgroups))?;
        drop(theirs);
        Ok(CgroupWorker {
            sock: ours,
            pid,
            in_flight: VecDeque::new(),
        })
    }

    /// What the loop polls (readable: replies, or the worker is gone).
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// The requests not answered yet, oldest first.
    pub(super) fn in_flight(&self) -> impl Iterator<Item = (Op, &str)> {
        self.in_flight
            .iter()
            .map(|(op, name, _)| (*op, name.as_str()))
    }

    /// Whether the oldest request has waited longer than [`STUCK_AFTER`].
    pub(super) fn is_stuck(&self, now: Instant) -> bool {
        (self.in_flight.front()).is_some_and(|(_, _, sent)| now.duration_since(*sent) > STUCK_AFTER)
    }

    /// Sends one request without blocking.
    pub(super) fn send(&mut self, op: Op, name: &str) -> Result<(), NotSent> {
        let msg = encode_request(op, name)
            .ok_or_else(|| NotSent::Gone(Gone(format!("bad name {name:?}"))))?;
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            return Err(NotSent::Full);
        }
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        match socket::send(self.sock.as_raw_fd(), &msg, flags) {
            Ok(n) if n == msg.len() => {
                self.in_flight
                    .push_back((op, name.to_owned(), Instant::now()));
                Ok(())
            }
            Ok(_) => Err(NotSent::Gone(Gone("short send".to_owned()))),
            Err(Errno::EAGAIN | Errno::ENOBUFS) => Err(NotSent::Full),
            Err(e) => Err(NotSent::Gone(Gone(format!("send: {e}")))),
        }
    }

    /// Every reply the worker has sent, without blocking (each must answer the oldest request
    /// in flight), and whether it is gone: the replies read before it went are still returned.
    pub(super) fn replies(&mut self) -> (Vec<Reply>, Option<Gone>) {
        let mut out = Vec::new();
        let mut buf = [0u8; MAX_MESSAGE];
        loop {
            let n = match socket::recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => return (out, Some(Gone("the worker closed its socket".to_owned()))),
                Ok(n) => n,
                Err(Errno::EAGAIN) => return (out, None),
                Err(Errno::EINTR) => continue,
                Err(e) => return (out, Some(Gone(format!("recv: {e}")))),
            };
            let Some(reply) = decode_reply(&buf[..n]) else {
                return (out, Some(Gone("bad reply".to_owned())));
            };
            match self.in_flight.front() {
                Some((op, name, _)) if *op == reply.op && *name == reply.name => {
                    self.in_flight.pop_front();
                    out.push(reply);
                }
                _ => return (out, Some(Gone(format!("unexpected reply {reply:?}")))),
            }
        }
    }
}

impl Drop for CgroupWorker {
    fn drop(&mut self) {
        // Its socket closes with `self.sock`; it may be blocked in a syscall, so kill it, and
        // reap it if it goes within 200 ms. One stuck in the kernel (a cgroup operation that
        // does not return) is left unreaped rather than holding the loop. (Pid 0 is a test's
        // worker thread.)
        if self.pid <= 0 {
            return;
        }
        let _ = sys::sigkill(self.pid);
        let pid = nix::unistd::Pid::from_raw(self.pid);
        let no_hang = Some(nix::sys::wait::WaitPidFlag::WNOHANG);
        for _ in 0..200 {
            match nix::sys::wait::waitpid(pid, no_hang) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) | Err(Errno::EINTR) => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                _ => return,
            }
        }
        log::warn!(
            "the cgroup worker did not end within 200 ms of SIGKILL; left unreaped pid={}",
            self.pid
        );
    }
}

/// The two ends of the worker's socket (close-on-exec).
fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd), Errno> {
    socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}

/// The worker's whole life: one request at a time until the helper's end closes.
fn serve(sock: BorrowedFd<'_>, cgroups: &dyn CgroupManager) -> Infallible {
    let _ = sys::set_process_name(c"sandrun-cgroups");
    let keep = [libc::STDERR_FILENO, sock.as_raw_fd()];
    let set_up = sys::prctl(sys::Prctl::KillOnParentDeath).is_ok()
        && sys::ignore_stop_signals().is_ok()
        && sys::close_all_except(&keep).is_ok();
    if !set_up {
        sys::exit_now(1);
    }
    sys::exit_now(serve_requests(sock, cgroups))
}

/// Answers requests until the socket closes (0) or breaks (1), or a request is malformed (2):
/// the exit code of the worker.
fn serve_requests(sock: BorrowedFd<'_>, cgroups: &dyn CgroupManager) -> i32 {
    let mut buf = [0u8; MAX_MESSAGE];
    loop {
        let n = match socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(0) => return 0,
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(_) => return 1,
        };
        let Some((op, name)) = decode_request(&buf[..n]) else {
            log::error!("cgroup worker: malformed request; exiting");
            return 2;
        };
        let result = match op {
            Op::Make => cgroups.make_dirs(name),
            Op::Remove => cgroups.remove_dirs(name),
        };
        let reply = encode_reply(op, name, &result);
        if socket::send(sock.as_raw_fd(), &reply, MsgFlags::MSG_NOSIGNAL).is_err() {
            return 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::CgroupLayout;

    #[test]
    fn given_requests_and_replies_then_they_decode_as_encoded_and_bad_ones_are_refused() {
        let msg = encode_request(Op::Make, "job-w7").expect("encodes");
        assert_eq!(decode_request(&msg), Some((Op::Make, "job-w7")));
        assert_eq!(encode_request(Op::Remove, ""), None);
        assert_eq!(encode_request(Op::Remove, &"x".repeat(MAX_NAME + 1)), None);
        assert_eq!(decode_request(&[3, b'j']), None);
        assert_eq!(decode_request(&[1]), None);
        assert_eq!(decode_request(&[1, 0xff]), None);

        let ok = encode_reply(Op::Remove, "job-3", &Ok(()));
        let want = Reply {
            op: Op::Remove,
            name: "job-3".into(),
            error: None,
        };
        assert_eq!(decode_reply(&ok), Some(want));
        let err = CgroupError::Invalid {
            what: "name",
            detail: "é".repeat(MAX_ERROR),
        };
        let failed = encode_reply(Op::Make, "job-4", &Err(err));
        assert!(failed.len() <= MAX_MESSAGE);
        let got = decode_reply(&failed).expect("decodes");
        assert!(got.error.is_some_and(|e| e.starts_with("invalid name: é")));
        assert_eq!(decode_reply(&[1, 2, 0]), None);
        assert_eq!(decode_reply(&[1, 0, 9, b'a']), None);
        assert_eq!(decode_reply(&[1, 0, 1, b'a', b'x']), None);
    }

    /// `make_dirs` and `remove_dirs` as plain directories of a temporary directory.
    struct Dirs(std::path::PathBuf, CgroupLayout);

    fn check(name: &str) -> Result<(), CgroupError> {
        if name.contains('/') || name.starts_with('.') {
            return Err(CgroupError::Invalid {
                what: "cgroup name",
                detail: name.to_owned(),
            });
        }
        Ok(())
    }

    impl CgroupManager for Dirs {
        fn layout(&self) -> &CgroupLayout {
            &self.1
        }
        fn make_dirs(&self, name: &str) -> Result<(), CgroupError> {
            check(name)?;
            let dir = self.0.join(name);
            std::fs::create_dir(&dir).map_err(|source| CgroupError::Io {
                step: "create job cgroup",
                path: dir,
                source,
            })
        }
        fn adopt(
            &self,
            _: &str,
            _: &crate::cgroup::CgroupLimits,
        ) -> Result<Box<dyn crate::cgroup::JobCgroup>, CgroupError> {
            unreachable!("the worker never adopts")
        }
        fn remove_dirs(&self, name: &str) -> Result<(), CgroupError> {
            check(name)?;
            let dir = self.0.join(name);
            std::fs::remove_dir(&dir).map_err(|source| CgroupError::Io {
                step: "remove job cgroup",
                path: dir,
                source,
            })
        }
        fn cleanup_stale(&self) -> Result<usize, CgroupError> {
            unreachable!("the worker never cleans up")
        }
    }

    fn wait_readable(w: &CgroupWorker) {
        let mut fds = [nix::poll::PollFd::new(w.fd(), nix::poll::PollFlags::POLLIN)];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).expect("poll");
    }

    /// The worker's loop, on a thread of the test (not a fork: the harness is multi-threaded).
    #[test]
    fn given_a_worker_then_it_makes_and_removes_job_directories_in_order_and_reports_failures() {
        let root = tempfile::tempdir().expect("tempdir");
        let layout = CgroupLayout::V2 {
            base: root.path().to_owned(),
        };
        let manager = Dirs(root.path().to_owned(), layout);
        let (ours, theirs) = seqpacket_pair().expect("socketpair");
        let code = std::thread::scope(|s| {
            let worker = s.spawn(|| serve_requests(theirs.as_fd(), &manager));
            let mut w = CgroupWorker {
                sock: ours,
                pid: 0,
                in_flight: VecDeque::new(),
            };
            for (op, name) in [
                (Op::Make, "job-w1"),
                (Op::Make, "job-w1"),
                (Op::Make, "job-w2"),
                (Op::Remove, "job-w1"),
                (Op::Make, "../x"),
            ] {
                assert!(w.send(op, name).is_ok());
            }
            let mut got = Vec::new();
            while got.len() < 5 {
                wait_readable(&w);
                let (replies, gone) = w.replies();
                assert!(gone.is_none(), "{gone:?}");
                got.extend(replies);
            }
            let errors: Vec<bool> = got.iter().map(|r| r.error.is_some()).collect();
            assert_eq!(errors, [false, true, false, false, true], "{got:?}");
            assert!(got[1]
                .error
                .as_deref()
                .is_some_and(|e| e.contains("job-w1")));
            assert!(got[4]
                .error
                .as_deref()
                .is_some_and(|e| e.contains("invalid")));
            assert_eq!(w.in_flight().count(), 0);
            assert!(!w.is_stuck(Instant::now()));
            assert!(!root.path().join("job-w1").exists());
            assert!(root.path().join("job-w2").is_dir());
            assert!(!root.path().join("x").exists());
            // A reply to nothing in flight is the worker breaking the protocol.
            assert!(w.send(Op::Remove, "job-w2").is_ok());
            w.in_flight.clear();
            wait_readable(&w);
            let (replies, gone) = w.replies();
            assert!(replies.is_empty() && gone.is_some(), "{replies:?} {gone:?}");
            drop(w);
            worker.join().expect("worker thread")
        });
        // The helper's end closed: the worker ends with 0.
        assert_eq!(code, 0);
    }

    #[test]
    fn given_a_full_queue_or_an_old_request_then_send_says_full_and_the_worker_is_stuck() {
        let (ours, _theirs) = seqpacket_pair().expect("socketpair");
        let mut w = CgroupWorker {
            sock: ours,
            pid: 0,
            in_flight: VecDeque::new(),
        };
        let now = Instant::now();
        for i in 0..MAX_IN_FLIGHT {
            w.in_flight.push_back((Op::Make, format!("job-w{i}"), now));
        }
        assert!(matches!(w.send(Op::Make, "job-x"), Err(NotSent::Full)));
        assert_eq!(w.in_flight().count(), MAX_IN_FLIGHT);
        assert!(!w.is_stuck(now));
        assert!(w.is_stuck(now + STUCK_AFTER + Duration::from_millis(1)));
        assert!(matches!(w.send(Op::Make, ""), Err(NotSent::Gone(_))));
    }
}
