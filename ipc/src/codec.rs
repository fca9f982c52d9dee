//! Frames: a little-endian `u32` payload length, then a bincode 2 payload of at most
//! [`MAX_FRAME_BYTES`]. The length is checked before anything is allocated, and bincode decodes
//! with the same explicit limit, so no frame can make a peer allocate more than that.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest payload of one frame.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// Largest data chunk a sender puts in one frame (bundle, logs, output files), leaving room for
/// the enum tag and the length prefix of the byte vector.
pub const MAX_CHUNK_BYTES: usize = 256 * 1024;
/// Length of the frame header.
pub const HEADER_BYTES: usize = 4;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME_BYTES>,
>;

fn config() -> Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit()
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    /// The header announces more than [`MAX_FRAME_BYTES`].
    FrameTooLarge(u64),
    /// The payload is not a valid message (includes failed path validation).
    Malformed(String),
    /// The payload decoded but did not use every byte.
    TrailingBytes(usize),
    /// The message could not be encoded (it is larger than a frame).
    Encode(String),
}

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CodecError::FrameTooLarge(n) => {
                write!(
                    f,
                    "frame of {n} bytes exceeds the maximum of {MAX_FRAME_BYTES}"
                )
            }
            CodecError::Malformed(e) => write!(f, "malformed frame: {e}"),
            CodecError::TrailingBytes(n) => write!(f, "frame has {n} trailing bytes"),
            CodecError::Encode(e) => write!(f, "cannot encode message: {e}"),
        }
    }
}

impl std::error::Error for CodecError {}

/// Encodes `msg` as one complete frame (header and payload).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![0u8; HEADER_BYTES];
    bincode::serde::encode_into_std_write(msg, &mut out, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    let len = out.len() - HEADER_BYTES;
    if len > MAX_FRAME_BYTES {
        return Err(CodecError::FrameTooLarge(len as u64));
    }
    let len32 = u32::try_from(len).map_err(|_| CodecError::FrameTooLarge(len as u64))?;
    out[..HEADER_BYTES].copy_from_slice(&len32.to_le_bytes());
    Ok(out)
}

/// Reads a frame header and returns the payload length, refusing oversized frames.
pub fn payload_len(header: [u8; HEADER_BYTES]) -> Result<usize, CodecError> {
    let len = u32::from_le_bytes(header);
    let len = usize::try_from(len).map_err(|_| CodecError::FrameTooLarge(u64::from(len)))?;
    if len > MAX_FRAME_BYTES {
        return Err(CodecError::FrameTooLarge(len as u64));
    }
    Ok(len)
}

/// Decodes one payload (without its header). Every byte must be used.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    if payload.len() > MAX_FRAME_BYTES {
        return Err(CodecError::FrameTooLarge(payload.len() as u64));
    }
    let (msg, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::TrailingBytes(payload.len() - used));
    }
    Ok(msg)
}

/// Decodes the first complete frame in `buf`. Returns `Ok(None)` if `buf` holds only part of a
/// frame, or the message and the number of bytes it used.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, CodecError> {
    let Some(header) = buf.get(..HEADER_BYTES) else {
        return Ok(None);
    };
    let mut h = [0u8; HEADER_BYTES];
    h.copy_from_slice(header);
    let len = payload_len(h)?;
    let Some(payload) = buf.get(HEADER_BYTES..HEADER_BYTES + len) else {
        return Ok(None);
    };
    Ok(Some((decode_payload(payload)?, HEADER_BYTES + len)))
}

/// An incremental decoder for non-blocking readers: push bytes as they arrive, pop messages.
/// Its buffer never holds more than one frame plus one read's worth of bytes. Popping advances an
/// offset and a push compacts once, so a burst of many small frames costs linear time.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of the first undecoded byte in `buf`.
    start: usize,
}

impl FrameDecoder {
    pub fn new() -> Self {
        FrameDecoder::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Pops the next complete message, if any. After an error the stream is unusable.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, CodecError> {
        match decode(&self.buf[self.start..])? {
            None => Ok(None),
            Some((msg, used)) => {
                self.start += used;
                Ok(Some(msg))
            }
        }
    }

    /// Bytes buffered but not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}
