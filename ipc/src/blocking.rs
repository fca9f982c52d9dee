//! Blocking adapter, used by `sandrunctl` and by tests. The helper itself uses
//! [`crate::FrameDecoder`] on non-blocking sockets.

use std::io::{ErrorKind, Read, Write};
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{self, HEADER_BYTES};
use crate::message::{Request, Response};
use crate::ChannelError;

/// A framed stream that sends `Out` and receives `In`.
pub struct Channel<Out, In, S> {
    stream: S,
    _dir: PhantomData<fn(Out) -> In>,
}

/// The client side: sends requests, receives responses.
pub type ClientChannel<S> = Channel<Request, Response, S>;
/// The helper side: sends responses, receives requests.
pub type HelperChannel<S> = Channel<Response, Request, S>;

impl<Out: Serialize, In: DeserializeOwned, S: Read + Write> Channel<Out, In, S> {
    pub fn new(stream: S) -> Self {
        Channel {
            stream,
            _dir: PhantomData,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Sends one message as one frame.
    pub fn send(&mut self, msg: &Out) -> Result<(), ChannelError> {
        let frame = codec::encode(msg)?;
        self.stream.write_all(&frame)?;
        self.stream.flush()?;
        Ok(())
    }

    /// Receives one message. A clean end of stream before a frame starts is
    /// [`ChannelError::Closed`]; an end in the middle of a frame is an I/O error.
    pub fn recv(&mut self) -> Result<In, ChannelError> {
        let mut header = [0u8; HEADER_BYTES];
        let mut got = 0;
        while got < HEADER_BYTES {
            match self.stream.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Err(ChannelError::Closed),
                Ok(0) => return Err(ChannelError::Io(ErrorKind::UnexpectedEof.into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let len = codec::payload_len(header)?;
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload)?;
        Ok(codec::decode_payload(&payload)?)
    }
}
