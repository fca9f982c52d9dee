//! # sandrun-ipc: the protocol across the trust boundary
//!
//! `sandrun-gateway` (unprivileged, parses everything untrusted) and `sandrunctl` talk to
//! `sandrund` (root) over a Unix socket with this protocol. It is the only input the root helper
//! accepts, so it is small, typed and bounded:
//!
//! - A frame is a little-endian `u32` length and a bincode 2 payload of at most
//!   [`MAX_FRAME_BYTES`]; the length is checked before allocation and bincode decodes with the
//!   same explicit limit ([`codec`]).
//! - Requests ([`Request`]) and responses ([`Response`]) are distinct types, and the channel
//!   adapters are typed by direction ([`blocking::ClientChannel`], [`blocking::HelperChannel`]).
//! - Paths and patterns are validated while decoding ([`BundlePath`], [`OutputPattern`]), so the
//!   helper validates again whatever the gateway already checked.
//! - Large data (input bundle, logs, output files) travels in chunks of at most
//!   [`MAX_CHUNK_BYTES`].
//! - Errors carry stable codes ([`ErrorCode`]).
//! - The rules both sides apply to environment names and to the size of a job's argv, env and
//!   output list live once, in [`rules`].
//!
//! See `docs/protocol.md` for the conversation.

#![forbid(unsafe_code)]

pub mod blocking;
mod bytes;
pub mod codec;
mod error;
mod limits;
mod message;
mod order;
pub mod rules;
#[cfg(feature = "tokio")]
pub mod tokio_adapter;
mod validate;

pub use codec::{decode, encode, CodecError, FrameDecoder, MAX_CHUNK_BYTES, MAX_FRAME_BYTES};
pub use error::{ErrorCode, IpcError, UnknownErrorCode};
pub use limits::{GrantedLimits, Limits, ZeroLimit, MIN_FILE_COUNT, MIN_MEMORY_BYTES, MIN_PIDS};
pub use message::*;
pub use order::{CollectOrder, MAX_ORDER_BYTES};
pub use validate::{
    sanitize_mode, BundlePath, OutputPattern, PathError, PrintablePath, ALLOWED_MODE_BITS,
    MAX_COMPONENT_BYTES, MAX_DEPTH, MAX_PATH_BYTES, MAX_PRINTABLE_BYTES,
};

/// Failure of a channel operation.
#[derive(Debug)]
#[non_exhaustive]
pub enum ChannelError {
    /// The peer closed the connection between frames.
    Closed,
    Io(std::io::Error),
    Codec(CodecError),
}

impl std::fmt::Display for ChannelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelError::Closed => write!(f, "connection closed by peer"),
            ChannelError::Io(e) => write!(f, "i/o error: {e}"),
            ChannelError::Codec(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ChannelError {}

impl From<std::io::Error> for ChannelError {
    fn from(e: std::io::Error) -> Self {
        ChannelError::Io(e)
    }
}

impl From<CodecError> for ChannelError {
    fn from(e: CodecError) -> Self {
        ChannelError::Codec(e)
    }
}
