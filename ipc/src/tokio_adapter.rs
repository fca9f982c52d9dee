//! Async adapter for the gateway (feature `tokio`).

use std::io::ErrorKind;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{self, HEADER_BYTES};
use crate::message::{Request, Response};
use crate::ChannelError;

/// An async framed stream that sends `Out` and receives `In`.
pub struct AsyncChannel<Out, In, S> {
    stream: S,
    _dir: PhantomData<fn(Out) -> In>,
}

/// The gateway's side of a helper connection.
pub type AsyncClientChannel<S> = AsyncChannel<Request, Response, S>;

impl<Out, In, S> AsyncChannel<Out, In, S>
where
    Out: Serialize,
    In: DeserializeOwned,
    S: AsyncRead + AsyncWrite + Unpin,
{
    pub fn new(stream: S) -> Self {
        AsyncChannel {
            stream,
            _dir: PhantomData,
        }
    }

    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Sends one message as one frame.
    pub async fn send(&mut self, msg: &Out) -> Result<(), ChannelError> {
        let frame = codec::encode(msg)?;
        self.stream.write_all(&frame).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Receives one message; see [`crate::blocking::Channel::recv`]. Cancel-safe only between
    /// messages: dropping the future mid-frame leaves the stream unusable.
    pub async fn recv(&mut self) -> Result<In, ChannelError> {
        let mut header = [0u8; HEADER_BYTES];
        let mut got = 0;
        while got < HEADER_BYTES {
            match self.stream.read(&mut header[got..]).await {
                Ok(0) if got == 0 => return Err(ChannelError::Closed),
                Ok(0) => return Err(ChannelError::Io(ErrorKind::UnexpectedEof.into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let len = codec::payload_len(header)?;
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload).await?;
        Ok(codec::decode_payload(&payload)?)
    }
}
