//! The connection to `sandrund`: connect, handshake (pipelined with the first requests), and a
//! buffered read half.
//!
//! The helper reads a connection's messages in order and stops at the first it refuses, so a
//! client need not wait for `Hello`'s answer before sending what follows: [`send_hello`]
//! writes `Hello` and the caller's frames in one `write`, then reads the answers in order. A
//! refused `Hello` is still the first answer, and a write that fails because the helper already
//! closed is answered by reading the error it sent (see [`send`]), never by a bare `EPIPE`.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use sandrun_ipc::blocking::ClientChannel;
use sandrun_ipc::{ChannelError, Hello, Request, Response, Role, PROTOCOL_VERSION};

use crate::error::CtlError;

/// How many bytes one read asks for: a whole small frame (and its header) in one system call.
const READ_BUF_BYTES: usize = 64 * 1024;

/// The socket, with a read buffer so that a frame's header and payload (and often the next
/// frames) come in one `read`.
pub(crate) struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Conn {
    fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            buf: vec![0; READ_BUF_BYTES],
            start: 0,
            end: 0,
        }
    }

    /// The socket's descriptor (for the Ctrl-C handler, which writes one `Cancel` frame).
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

impl Read for Conn {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            // A large read bypasses the buffer: nothing is copied twice.
            if out.len() >= self.buf.len() {
                return self.stream.read(out);
            }
            self.end = self.stream.read(&mut self.buf)?;
            self.start = 0;
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(crate) type Channel = ClientChannel<Conn>;

/// Connects to `socket` and completes the handshake for `role`.
pub(crate) fn connect(socket: &Path, role: Role) -> Result<Channel, CtlError> {
    let mut chan = open(socket)?;
    send_hello(&mut chan, role, &[])?;
    await_hello(&mut chan)?;
    Ok(chan)
}

/// Connects to `socket`.
pub(crate) fn open(socket: &Path) -> Result<Channel, CtlError> {
    let stream = UnixStream::connect(socket).map_err(|source| CtlError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    Ok(ClientChannel::new(Conn::new(stream)))
}

/// Writes `Hello` for `role` followed by `then` (whole encoded frames) in one write. The
/// answers come in order: first `Hello`'s (see [`await_hello`]), then those to `then`.
pub(crate) fn send_hello(chan: &mut Channel, role: Role, then: &[u8]) -> Result<(), CtlError> {
    let hello = Request::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        role,
    });
    let mut frames = sandrun_ipc::encode(&hello).map_err(|e| CtlError::Channel {
        step: "sending hello",
        source: ChannelError::from(e),
    })?;
    frames.extend_from_slice(then);
    write_frames(chan, &frames, "sending hello")
}

/// Reads the helper's answer to `Hello`: its `Hello`, or its refusal as [`CtlError::Helper`].
pub(crate) fn await_hello(chan: &mut Channel) -> Result<(), CtlError> {
    match recv(chan, "waiting for hello")? {
        Response::Hello(_) => Ok(()),
        other => Err(unexpected("waiting for hello", &other)),
    }
}

/// Sends one request. If the helper already closed the connection, the error it sent first (for
/// example `busy`) is more useful than the broken pipe, so it is read and returned instead.
pub(crate) fn send(chan: &mut Channel, req: &Request, step: &'static str) -> Result<(), CtlError> {
    let frame = sandrun_ipc::encode(req).map_err(|e| CtlError::Channel {
        step,
        source: ChannelError::from(e),
    })?;
    write_frames(chan, &frame, step)
}

/// Writes whole encoded frames; on failure, prefers the helper's error (see [`send`]).
pub(crate) fn write_frames(
    chan: &mut Channel,
    frames: &[u8],
    step: &'static str,
) -> Result<(), CtlError> {
    // `&UnixStream` writes straight to the socket; the channel only keeps it.
    match (&chan.get_ref().stream).write_all(frames) {
        Ok(()) => Ok(()),
        Err(source) => match chan.recv() {
            Ok(Response::Error(e)) => Err(CtlError::Helper(e)),
            _ => Err(CtlError::Channel {
                step,
                source: ChannelError::Io(source),
            }),
        },
    }
}

/// Receives one response; a [`Response::Error`] becomes [`CtlError::Helper`].
pub(crate) fn recv(chan: &mut Channel, step: &'static str) -> Result<Response, CtlError> {
    match chan.recv() {
        Ok(Response::Error(e)) => Err(CtlError::Helper(e)),
        Ok(r) => Ok(r),
        Err(source) => Err(CtlError::Channel { step, source }),
    }
}

/// The error for a response that does not fit the conversation.
pub(crate) fn unexpected(step: &'static str, got: &Response) -> CtlError {
    CtlError::Protocol {
        step,
        detail: format!("unexpected {}", got.name()),
    }
}
