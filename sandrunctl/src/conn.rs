//! The connection to `sandrund`: connect, handshake, and a write half that a second thread (the
//! Ctrl-C handler) can share without interleaving frames.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use sandrun_ipc::blocking::ClientChannel;
use sandrun_ipc::{Hello, Request, Response, Role, PROTOCOL_VERSION};

use crate::error::CtlError;

/// The write half, shared. Each `write` call writes a whole buffer under the lock, and
/// [`ClientChannel::send`] writes a whole frame in one `write_all`, so frames never interleave.
#[derive(Clone)]
pub(crate) struct SharedWriter(Arc<Mutex<UnixStream>>);

impl SharedWriter {
    /// Writes one complete frame.
    pub(crate) fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        let mut stream = self
            .0
            .lock()
            .map_err(|_| io::Error::other("writer lock poisoned"))?;
        stream.write_all(frame)?;
        stream.flush()
    }
}

/// A socket whose reads go to the read half and whose writes go through [`SharedWriter`].
pub(crate) struct Conn {
    read: UnixStream,
    write: SharedWriter,
}

impl Conn {
    pub(crate) fn writer(&self) -> SharedWriter {
        self.write.clone()
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read.read(buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write.write_frame(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(crate) type Channel = ClientChannel<Conn>;

/// Connects to `socket` and completes the handshake for `role`.
pub(crate) fn connect(socket: &Path, role: Role) -> Result<Channel, CtlError> {
    let stream = UnixStream::connect(socket).map_err(|source| CtlError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    let write = stream.try_clone().map_err(|source| CtlError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    let conn = Conn {
        read: stream,
        write: SharedWriter(Arc::new(Mutex::new(write))),
    };
    let mut chan = ClientChannel::new(conn);
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        role,
    };
    send(&mut chan, &Request::Hello(hello), "sending hello")?;
    match recv(&mut chan, "waiting for hello")? {
        Response::Hello(_) => Ok(chan),
        other => Err(unexpected("waiting for hello", &other)),
    }
}

/// Sends one request. If the helper already closed the connection, the error it sent first (for
/// example `busy`) is more useful than the broken pipe, so it is read and returned instead.
pub(crate) fn send(chan: &mut Channel, req: &Request, step: &'static str) -> Result<(), CtlError> {
    match chan.send(req) {
        Ok(()) => Ok(()),
        Err(source) => match chan.recv() {
            Ok(Response::Error(e)) => Err(CtlError::Helper(e)),
            _ => Err(CtlError::Channel { step, source }),
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
