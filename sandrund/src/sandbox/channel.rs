//! The control channel from the sandbox's init process C to the helper: a `SOCK_SEQPACKET`
//! socketpair carrying fixed-size binary messages (no serde). C sends, in order, the work
//! directory fd (`WorkDir`, with the fd attached through `SCM_RIGHTS`) and then `Ready`, or a
//! `Failed` message naming the step at any point. C sends `WorkDir` once its job-independent
//! setup is done (it is then a prepared, "warm" sandbox); the helper sends one message the other
//! way, `Go`, with the job order's memfd attached (see `order.rs`), when a job is assigned to
//! C. The same `Failed` encoding travels on the exec-error pipe from the job process J to C.
//!
//! Message layout (`MESSAGE_LEN` bytes): kind (u8), step index (u8), errno (i32, little
//! endian), detail length (u8), detail (UTF-8, at most `DETAIL_MAX` bytes, zero padded).

#![forbid(unsafe_code)]

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
#[cfg(test)]
use std::time::Instant;

use nix::errno::Errno;
#[cfg(test)]
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use super::{fail, SetupError, SetupStep};
use crate::sys;

/// Size of every message.
pub(super) const MESSAGE_LEN: usize = 128;
const HEADER_LEN: usize = 7;
/// Longest detail a message carries; longer details are cut at a character boundary.
pub(super) const DETAIL_MAX: usize = MESSAGE_LEN - HEADER_LEN;

const KIND_WORKDIR: u8 = 1;
const KIND_READY: u8 = 2;
const KIND_FAILED: u8 = 3;
const KIND_GO: u8 = 4;

/// One message from C (or, `Failed` only, from J).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Message {
    WorkDir,
    Ready,
    Failed(SetupError),
    /// From the helper to C: here is your job (the order's memfd is attached).
    Go,
}

/// Encodes a message.
pub(super) fn encode(msg: &Message) -> [u8; MESSAGE_LEN] {
    match msg {
        Message::WorkDir => header(KIND_WORKDIR),
        Message::Ready => header(KIND_READY),
        Message::Go => header(KIND_GO),
        Message::Failed(e) => encode_failure(e.step, e.errno, &e.detail),
    }
}

/// Encodes a `Failed` message without allocating (usable after seccomp is installed).
pub(super) fn encode_failure(step: SetupStep, errno: Errno, detail: &str) -> [u8; MESSAGE_LEN] {
    let mut buf = header(KIND_FAILED);
    buf[1] = step.index();
    buf[2..6].copy_from_slice(&(errno as i32).to_le_bytes());
    let detail = truncate(detail, DETAIL_MAX);
    let len = detail.len();
    // DETAIL_MAX < 256, so the length fits in the u8 field.
    buf[6] = u8::try_from(len).unwrap_or(u8::MAX);
    buf[HEADER_LEN..HEADER_LEN + len].copy_from_slice(detail.as_bytes());
    buf
}

/// Decodes a message; anything malformed is a `Protocol` error.
pub(super) fn decode(buf: &[u8]) -> Result<Message, SetupError> {
    if buf.len() != MESSAGE_LEN {
        return Err(protocol(Errno::EPROTO, "control message of the wrong size"));
    }
    match buf[0] {
        KIND_WORKDIR => Ok(Message::WorkDir),
        KIND_READY => Ok(Message::Ready),
        KIND_GO => Ok(Message::Go),
        KIND_FAILED => decode_failure(buf),
        _ => Err(protocol(Errno::EPROTO, "unknown control message kind")),
    }
}

fn decode_failure(buf: &[u8]) -> Result<Message, SetupError> {
    let step = SetupStep::from_index(buf[1])
        .ok_or_else(|| protocol(Errno::EPROTO, "unknown setup step index"))?;
    let mut errno = [0u8; 4];
    errno.copy_from_slice(&buf[2..6]);
    let len = usize::from(buf[6]);
    if len > DETAIL_MAX {
        return Err(protocol(Errno::EPROTO, "control message detail too long"));
    }
    let detail = String::from_utf8_lossy(&buf[HEADER_LEN..HEADER_LEN + len]).into_owned();
    Ok(Message::Failed(fail(
        step,
        Errno::from_raw(i32::from_le_bytes(errno)),
        detail,
    )))
}

fn header(kind: u8) -> [u8; MESSAGE_LEN] {
    let mut buf = [0u8; MESSAGE_LEN];
    buf[0] = kind;
    buf
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn protocol(errno: Errno, detail: &str) -> SetupError {
    fail(SetupStep::Protocol, errno, detail)
}

/// C's side: sends the work directory fd.
pub(super) fn send_workdir(sock: RawFd, workdir: RawFd) -> Result<(), Errno> {
    send(sock, &Message::WorkDir, Some(workdir))
}

/// C's side: tells the helper that J has `execve`d.
pub(super) fn send_ready(sock: RawFd) -> Result<(), Errno> {
    send(sock, &Message::Ready, None)
}

/// C's side: reports the failed step.
pub(super) fn send_failure(sock: RawFd, err: &SetupError) -> Result<(), Errno> {
    send(sock, &Message::Failed(err.clone()), None)
}

/// The helper's side: hands C its job order, and the detached mounts of the job's template and
/// of the wheelhouse if it has them, then the write end of the requirements record pipe (with
/// the wheelhouse), in that order.
pub(super) fn send_go(
    sock: RawFd,
    order: RawFd,
    template: Option<RawFd>,
    wheelhouse: Option<(RawFd, RawFd)>,
) -> Result<(), Errno> {
    let fds: Vec<RawFd> = std::iter::once(order)
        .chain(template)
        .chain(
            wheelhouse
                .into_iter()
                .flat_map(|(tree, record)| [tree, record]),
        )
        .collect();
    send_fds(sock, &Message::Go, &fds)
}

/// C's side: blocks until the helper sends `Go` and returns the order's fd and the mounts that
/// came with it (the order says which they are). The helper closing the channel (it dropped
/// this prepared sandbox) or any other message is a `Protocol` failure.
pub(super) fn wait_for_go(sock: &OwnedFd) -> Result<(OwnedFd, Vec<OwnedFd>), SetupError> {
    let (msg, fds) = recv(sock, true)?
        .ok_or_else(|| protocol(Errno::EPROTO, "no message on a blocking read"))?;
    let mut fds = fds.into_iter();
    match (msg, fds.next()) {
        (Message::Go, Some(order)) => Ok((order, fds.collect())),
        _ => Err(protocol(Errno::EPROTO, "expected the job order")),
    }
}

fn send(sock: RawFd, msg: &Message, fd: Option<RawFd>) -> Result<(), Errno> {
    let fds: Vec<RawFd> = fd.into_iter().collect();
    send_fds(sock, msg, &fds)
}

fn send_fds(sock: RawFd, msg: &Message, fds: &[RawFd]) -> Result<(), Errno> {
    let buf = encode(msg);
    let iov = [IoSlice::new(&buf)];
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    loop {
        match sendmsg::<()>(sock, &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A failure reported while the helper waited for `Ready`, and whether C had finished its
/// job-independent preparation (sent `WorkDir`) before it.
#[derive(Debug)]
pub(super) struct ReadyFailure {
    pub(super) error: SetupError,
    pub(super) prepared: bool,
}

/// The helper's side of the wait for the work directory fd and then `Ready` (or the failure C
/// reports), one readable event at a time: the helper's loop keeps this per starting sandbox
/// and calls [`ReadyWait::poll`] when the control socket is readable, so it never blocks on a
/// sandbox. C exiting without a word is a `Protocol` error.
#[derive(Debug, Default)]
pub(super) struct ReadyWait {
    workdir: Option<OwnedFd>,
}

impl ReadyWait {
    /// Whether C has sent `WorkDir` (finished its job-independent preparation).
    pub(super) fn prepared(&self) -> bool {
        self.workdir.is_some()
    }

    /// Reads every message C has queued, without blocking: the work directory fd once C sent
    /// `Ready`, `None` while more is to come.
    pub(super) fn poll(&mut self, sock: &OwnedFd) -> Result<Option<OwnedFd>, ReadyFailure> {
        loop {
            let prepared = self.prepared();
            let failed = |error| ReadyFailure { error, prepared };
            let Some((msg, fds)) = recv(sock, false).map_err(failed)? else {
                return Ok(None);
            };
            if fds.len() > 1 {
                return Err(failed(protocol(Errno::EPROTO, "unexpected fds")));
            }
            match (msg, fds.into_iter().next(), prepared) {
                (Message::Failed(e), _, _) => return Err(failed(e)),
                (Message::WorkDir, Some(fd), false) => self.workdir = Some(fd),
                (Message::Ready, None, true) => return Ok(self.workdir.take()),
                _ => {
                    return Err(failed(protocol(
                        Errno::EPROTO,
                        "unexpected control message",
                    )))
                }
            }
        }
    }
}

/// The helper's side, blocking (tests): [`ReadyWait`] until `deadline`.
#[cfg(test)]
pub(super) fn wait_for_ready(sock: &OwnedFd, deadline: Instant) -> Result<OwnedFd, ReadyFailure> {
    let mut wait = ReadyWait::default();
    loop {
        wait_readable(sock, deadline).map_err(|error| ReadyFailure {
            error,
            prepared: wait.prepared(),
        })?;
        if let Some(workdir) = wait.poll(sock)? {
            return Ok(workdir);
        }
    }
}

/// Most fds one message carries: the order, a template, the wheelhouse and the requirements
/// record pipe.
const MAX_FDS: usize = 4;

/// Receives one message and at most [`MAX_FDS`] fds. Blocking, it waits until one arrives or
/// the peer closes; non-blocking, `None` means nothing is queued yet.
fn recv(sock: &OwnedFd, block: bool) -> Result<Option<(Message, Vec<OwnedFd>)>, SetupError> {
    let mut buf = [0u8; MESSAGE_LEN + 1];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut flags = MsgFlags::empty();
    if !block {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    let mut resets = 0;
    let received = loop {
        match sys::recv_with_fds(sock.as_raw_fd(), &mut buf, &mut cmsg, flags) {
            Err((Errno::EINTR, _)) => continue,
            // C closed its end with a message of ours still unread in its queue (it failed
            // before it read `Go`). The kernel then sets ECONNRESET on our socket, and recvmsg
            // reports that pending error *before* the messages queued for us, and clears it
            // (net/core/datagram.c checks sock_error first). So read again: C's `Failed`
            // report, if it sent one, comes next, and then end of file. The error is set once
            // per close, so a second one is a real failure.
            Err((Errno::ECONNRESET, _)) if resets == 0 => resets += 1,
            Err((Errno::EAGAIN, _)) if !block => return Ok(None),
            other => break other,
        }
    };
    let sys::Received {
        bytes,
        fds,
        truncated,
    } = received.map_err(|(e, what)| protocol(e, what))?;
    if bytes == 0 {
        let detail = "the other end of the sandbox channel closed without a report";
        return Err(protocol(Errno::UnknownErrno, detail));
    }
    if truncated || fds.len() > MAX_FDS {
        return Err(protocol(Errno::EPROTO, "oversized control message"));
    }
    let msg = decode(&buf[..bytes])?;
    Ok(Some((msg, fds)))
}

/// Blocks until `sock` is readable or `deadline` passes (a `Protocol` timeout).
#[cfg(test)]
pub(super) fn wait_readable(sock: &OwnedFd, deadline: Instant) -> Result<(), SetupError> {
    use std::os::fd::AsFd;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(protocol(Errno::ETIMEDOUT, "sandbox setup timed out"));
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => return Ok(()),
            Err(e) => return Err(protocol(e, "poll on the control channel")),
        }
    }
}
