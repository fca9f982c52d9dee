//! Streaming multipart/form-data with bounded work and memory.
//!
//! `multer` does the parsing. Before it sees a byte, [`GuardedBody`] counts the body against
//! [`UploadLimits::max_body_bytes`] and follows the part structure with a small scanner, so a
//! preamble or a part header block longer than [`UploadLimits::max_part_header_bytes`] fails
//! as soon as it crosses the limit (multer itself would buffer it and search it again on every
//! chunk). The number of parts is capped while iterating, and the `manifest` part is capped at
//! [`MAX_MANIFEST_BYTES`].

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use multer::{Constraints, Multipart, SizeLimit};
use tokio::sync::mpsc::Sender;

use super::feed::PartMsg;
use super::{hand_over, Flow, UploadError, UploadLimits};
use crate::budget::SharedReservation;
use crate::manifest::MAX_MANIFEST_BYTES;

/// Reads every part of a multipart body and hands each one over as it arrives. Only `files`
/// (repeatable) and `manifest` (once) exist.
pub(crate) async fn collect<S, E>(
    boundary: &str,
    body: S,
    limits: &UploadLimits,
    tx: &Sender<PartMsg>,
    charge: &SharedReservation,
) -> Result<Flow, UploadError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display,
{
    check_boundary(boundary)?;
    let guarded = GuardedBody::new(body, boundary, limits);
    let sizes = SizeLimit::new()
        .whole_stream(limits.max_body_bytes)
        .per_field(limits.max_body_bytes)
        .for_field("manifest", MAX_MANIFEST_BYTES as u64)
        .for_field("stdin", limits.max_stdin_bytes);
    let mut multipart =
        Multipart::with_constraints(guarded, boundary, Constraints::new().size_limit(sizes));
    let mut seen_manifest = false;
    let mut seen_stdin = false;
    let mut parts = 0usize;
    while let Some(mut field) = multipart.next_field().await.map_err(map_multer)? {
        parts += 1;
        if parts > limits.max_parts {
            return Err(UploadError::TooManyParts {
                limit: limits.max_parts,
            });
        }
        let handed = match field.name() {
            Some("manifest") if seen_manifest => {
                return Err(UploadError::Malformed(
                    "more than one manifest part".to_owned(),
                ))
            }
            Some("manifest") => {
                seen_manifest = true;
                let json = read_field(&mut field).await?;
                hand_over(tx, PartMsg::Manifest(json)).await
            }
            Some("stdin") if seen_stdin => {
                return Err(UploadError::Malformed(
                    "more than one stdin part".to_owned(),
                ))
            }
            Some("stdin") => {
                seen_stdin = true;
                let bytes = read_charged(&mut field, charge).await?;
                hand_over(tx, PartMsg::Stdin(bytes)).await
            }
            Some("files") => forward_file(&mut field, tx, charge).await?,
            other => return Err(UploadError::UnexpectedPart(other.unwrap_or("").to_owned())),
        };
        if !handed {
            return Ok(Flow::AssemblerStopped);
        }
    }
    if hand_over(tx, PartMsg::BodyEnd).await {
        Ok(Flow::Complete)
    } else {
        Ok(Flow::AssemblerStopped)
    }
}

/// Hands a `files` part over chunk by chunk, each charged to the upload before it is queued;
/// `false` if the assembler has stopped.
async fn forward_file(
    field: &mut multer::Field<'_>,
    tx: &Sender<PartMsg>,
    charge: &SharedReservation,
) -> Result<bool, UploadError> {
    let filename = field.file_name().map(str::to_owned);
    if !hand_over(tx, PartMsg::FileStart { filename }).await {
        return Ok(false);
    }
    while let Some(chunk) = field.chunk().await.map_err(map_multer)? {
        charge
            .try_grow(chunk.len() as u64)
            .map_err(super::memory_error)?;
        if !hand_over(tx, PartMsg::Data(chunk)).await {
            return Ok(false);
        }
    }
    Ok(hand_over(tx, PartMsg::FileEnd).await)
}

/// Reads a whole part, charging each chunk to `charge` before it is held.
async fn read_charged(
    field: &mut multer::Field<'_>,
    charge: &SharedReservation,
) -> Result<Bytes, UploadError> {
    let mut data = BytesMut::new();
    while let Some(chunk) = field.chunk().await.map_err(map_multer)? {
        charge
            .try_grow(chunk.len() as u64)
            .map_err(super::memory_error)?;
        data.extend_from_slice(&chunk);
    }
    Ok(data.freeze())
}

async fn read_field(field: &mut multer::Field<'_>) -> Result<Bytes, UploadError> {
    let mut data = BytesMut::new();
    while let Some(chunk) = field.chunk().await.map_err(map_multer)? {
        data.extend_from_slice(&chunk);
    }
    Ok(data.freeze())
}

/// RFC 2046: 1 to 70 characters from a small set, not ending with a space. This also guarantees
/// the scanner's delimiter has no `\r` after its first byte.
fn check_boundary(boundary: &str) -> Result<(), UploadError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "'()+_,-./:=? ".contains(c);
    let ok = (1..=70).contains(&boundary.len())
        && boundary.chars().all(ok_char)
        && !boundary.ends_with(' ');
    if ok {
        Ok(())
    } else {
        Err(UploadError::Malformed(
            "multipart boundary is not a valid RFC 2046 boundary".into(),
        ))
    }
}

/// Maps multer's errors, recovering the guard's own error from inside multer's wrapper.
fn map_multer(e: multer::Error) -> UploadError {
    match e {
        multer::Error::StreamReadFailed(inner) => match inner.downcast_ref::<GuardError>() {
            Some(guard) => guard.clone().into(),
            None => UploadError::BodyRead(inner.to_string()),
        },
        multer::Error::StreamSizeExceeded { limit } => UploadError::BodyTooLarge { limit },
        multer::Error::FieldSizeExceeded { limit, field_name } => match field_name.as_deref() {
            Some("manifest") => {
                UploadError::Malformed(format!("the manifest part is larger than {limit} bytes"))
            }
            Some("stdin") => UploadError::StdinTooLarge { limit },
            _ => UploadError::BodyTooLarge { limit },
        },
        other => UploadError::Malformed(other.to_string()),
    }
}

/// Why the guard stopped the body.
#[derive(Debug, Clone)]
enum GuardError {
    TooLarge(u64),
    HeadersTooLarge(usize),
    Read(String),
}

impl std::fmt::Display for GuardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuardError::TooLarge(limit) => write!(f, "body larger than {limit} bytes"),
            GuardError::HeadersTooLarge(limit) => write!(f, "part headers over {limit} bytes"),
            GuardError::Read(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for GuardError {}

impl From<GuardError> for UploadError {
    fn from(e: GuardError) -> Self {
        match e {
            GuardError::TooLarge(limit) => UploadError::BodyTooLarge { limit },
            GuardError::HeadersTooLarge(limit) => UploadError::PartHeadersTooLarge { limit },
            GuardError::Read(m) => UploadError::BodyRead(m),
        }
    }
}

/// The request body, counted and scanned before multer sees it.
///
/// The end of the body reaches multer one poll late. multer 3.1 polls its stream twice while it
/// looks for the first boundary and, when the second poll brings the rest of the body *and* its
/// end at once, fails with "incomplete multipart stream" without looking at what it just read:
/// a valid upload refused with 400 whenever the whole body arrived between those two polls
/// (seen in CI under load). Answering that poll with `Pending` (and an immediate wake-up) means
/// multer only ever sees the end in a poll that brought nothing new.
struct GuardedBody<S> {
    inner: S,
    seen: u64,
    max_body: u64,
    scanner: Scanner,
    done: bool,
    /// The inner stream has ended; multer is told on the next poll.
    ended: bool,
}

impl<S> GuardedBody<S> {
    fn new(inner: S, boundary: &str, limits: &UploadLimits) -> Self {
        GuardedBody {
            inner,
            seen: 0,
            max_body: limits.max_body_bytes,
            scanner: Scanner::new(boundary, limits.max_part_header_bytes),
            done: false,
            ended: false,
        }
    }

    fn check(&mut self, chunk: &[u8]) -> Result<(), GuardError> {
        self.seen = self.seen.saturating_add(chunk.len() as u64);
        if self.seen > self.max_body {
            return Err(GuardError::TooLarge(self.max_body));
        }
        self.scanner.feed(chunk)
    }
}

impl<S, E> Stream for GuardedBody<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    type Item = Result<Bytes, GuardError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.ended {
            self.done = true;
            return Poll::Ready(None);
        }
        let item = match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                self.ended = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Some(Err(e))) => Some(Err(GuardError::Read(e.to_string()))),
            Poll::Ready(Some(Ok(chunk))) => Some(self.check(&chunk).map(|()| chunk)),
        };
        // After an error, end the stream: nothing more is read from the peer.
        self.done = !matches!(item, Some(Ok(_)));
        Poll::Ready(item)
    }
}

/// Where the scanner is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the first `--boundary`.
    Preamble,
    /// Just after a delimiter; counts `-` to spot the closing `--`.
    AfterDelimiter { dashes: u8 },
    /// In a part's header block, until `\r\n\r\n`.
    Headers,
    /// In a part's data, until `\r\n--boundary`.
    Body,
    /// After the closing delimiter: ignored.
    Epilogue,
}

/// Follows the part structure to bound the preamble and each header block. Work is linear in the
/// body length; state is a few bytes plus the delimiter.
#[derive(Debug)]
struct Scanner {
    first: Vec<u8>,
    delimiter: Vec<u8>,
    max_header: usize,
    phase: Phase,
    /// Bytes in the current preamble or header block.
    count: usize,
    /// Last bytes seen, for matching across chunk boundaries in the preamble and headers.
    window: Vec<u8>,
    /// How much of `delimiter` the last bytes of the body matched.
    matched: usize,
}

impl Scanner {
    fn new(boundary: &str, max_header: usize) -> Self {
        Scanner {
            first: format!("--{boundary}").into_bytes(),
            delimiter: format!("\r\n--{boundary}").into_bytes(),
            max_header,
            phase: Phase::Preamble,
            count: 0,
            window: Vec::new(),
            matched: 0,
        }
    }

    fn feed(&mut self, mut chunk: &[u8]) -> Result<(), GuardError> {
        while !chunk.is_empty() {
            let used = match self.phase {
                Phase::Body => self.scan_body(chunk),
                Phase::Epilogue => chunk.len(),
                _ => {
                    self.step(chunk[0])?;
                    1
                }
            };
            chunk = &chunk[used..];
        }
        Ok(())
    }

    /// Looks for the delimiter in body data; returns how many bytes were consumed. Correct
    /// without backtracking because `\r` occurs in the delimiter only at its start.
    fn scan_body(&mut self, chunk: &[u8]) -> usize {
        let mut i = 0;
        while i < chunk.len() {
            if self.matched == 0 {
                match chunk[i..].iter().position(|&b| b == b'\r') {
                    Some(at) => i += at,
                    None => return chunk.len(),
                }
            }
            let b = chunk[i];
            i += 1;
            if b == self.delimiter[self.matched] {
                self.matched += 1;
                if self.matched == self.delimiter.len() {
                    self.matched = 0;
                    self.phase = Phase::AfterDelimiter { dashes: 0 };
                    return i;
                }
            } else {
                self.matched = usize::from(b == b'\r');
            }
        }
        chunk.len()
    }

    /// One byte outside part data.
    fn step(&mut self, b: u8) -> Result<(), GuardError> {
        match self.phase {
            Phase::Preamble => {
                if self.push_counted(b, self.first.len())? && self.window.ends_with(&self.first) {
                    self.enter(Phase::AfterDelimiter { dashes: 0 });
                }
            }
            Phase::AfterDelimiter { dashes } if b == b'-' => {
                self.phase = if dashes == 1 {
                    Phase::Epilogue
                } else {
                    Phase::AfterDelimiter { dashes: 1 }
                };
            }
            Phase::AfterDelimiter { dashes } => {
                self.enter(Phase::Headers);
                self.count = usize::from(dashes);
                self.step(b)?;
            }
            Phase::Headers => {
                if self.push_counted(b, 4)? && self.window.ends_with(b"\r\n\r\n") {
                    self.enter(Phase::Body);
                }
            }
            Phase::Body | Phase::Epilogue => {}
        }
        Ok(())
    }

    /// Counts a byte of preamble or headers and keeps the last `keep` bytes.
    fn push_counted(&mut self, b: u8, keep: usize) -> Result<bool, GuardError> {
        self.count += 1;
        if self.count > self.max_header {
            return Err(GuardError::HeadersTooLarge(self.max_header));
        }
        if self.window.len() == keep {
            self.window.remove(0);
        }
        self.window.push(b);
        Ok(true)
    }

    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        self.count = 0;
        self.window.clear();
        self.matched = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]], max: usize) -> Result<Phase, GuardError> {
        let mut s = Scanner::new("XB", max);
        for c in chunks {
            s.feed(c)?;
        }
        Ok(s.phase)
    }

    #[test]
    fn given_a_well_formed_body_split_anywhere_then_the_scanner_reaches_the_epilogue() {
        let body: &[u8] = b"pre\r\n--XB\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n\
            data\r\n--X\r\n--XB\r\nH: v\r\n\r\n\r\n--XB--\r\nepilogue";
        for split in 0..body.len() {
            let (a, b) = body.split_at(split);
            assert_eq!(
                scan(&[a, b], 64).unwrap(),
                Phase::Epilogue,
                "split at {split}"
            );
        }
    }

    #[test]
    fn given_an_endless_header_block_then_the_scanner_fails_at_the_cap() {
        let mut body = b"--XB\r\n".to_vec();
        body.extend_from_slice(&[b'a'; 100]);
        assert!(matches!(
            scan(&[&body], 64),
            Err(GuardError::HeadersTooLarge(64))
        ));
        assert!(
            scan(&[&[b'x'; 65]], 64).is_err(),
            "endless preamble accepted"
        );
    }

    /// A body that is not ready when first polled, then arrives whole with its end in the next
    /// poll: the sequence under which multer 3.1 alone reports an incomplete stream.
    struct LateBody {
        polls: usize,
        body: Option<Bytes>,
    }

    impl Stream for LateBody {
        type Item = Result<Bytes, std::io::Error>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.polls += 1;
            if self.polls == 1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(self.body.take().map(Ok))
        }
    }

    fn late_body() -> LateBody {
        let body =
            "--XB\r\nContent-Disposition: form-data; name=\"files\"; filename=\"run.sh\"\r\n\r\n\
            echo hi\n\r\n--XB--\r\n";
        LateBody {
            polls: 0,
            body: Some(Bytes::from(body)),
        }
    }

    async fn field_names<S>(stream: S) -> Result<Vec<String>, multer::Error>
    where
        S: Stream<Item = Result<Bytes, GuardError>> + Send + 'static,
    {
        let mut multipart = Multipart::new(stream, "XB");
        let mut names = Vec::new();
        while let Some(mut field) = multipart.next_field().await? {
            names.push(field.name().unwrap_or_default().to_owned());
            while field.chunk().await?.is_some() {}
        }
        Ok(names)
    }

    #[tokio::test]
    async fn given_the_whole_body_and_its_end_in_one_poll_then_multer_still_parses_it() {
        let guarded = GuardedBody::new(late_body(), "XB", &UploadLimits::default());
        assert_eq!(field_names(guarded).await.unwrap(), ["files"]);
        // The same stream straight into multer is refused: what the guard works around.
        let bare =
            futures_util::TryStreamExt::map_err(late_body(), |e| GuardError::Read(e.to_string()));
        assert!(matches!(
            field_names(bare).await,
            Err(multer::Error::IncompleteStream)
        ));
    }

    #[test]
    fn given_boundaries_then_only_rfc_2046_ones_are_accepted() {
        assert!(check_boundary("----WebKitFormBoundary7MA4YWxkTrZu0gW").is_ok());
        for bad in ["", "a\rb", "a b ", &"x".repeat(71), "a\"b"] {
            assert!(check_boundary(bad).is_err(), "{bad:?}");
        }
    }
}
