//! The hand-over from the body reader (async, on a runtime worker) to the assembler (tokio's
//! blocking pool), so archives are expanded while the body is still arriving.
//!
//! The body reader sends [`PartMsg`]s in body order over a bounded channel: a full channel stops
//! it from reading, which pushes back on the client instead of buffering. The assembler reads a
//! `files` part as a [`PartReader`] (a [`BufRead`] over the part's chunks, no copy) and can ask
//! the [`Feed`] for more of the part without consuming it ([`Feed::pull`]), which is how the
//! expansion meter waits for more compressed bytes instead of refusing an archive early.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{BufRead, Read};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

/// What the body reader hands the assembler, in body order.
#[derive(Debug)]
pub(crate) enum PartMsg {
    /// A `files` part (or the legacy body) starts.
    FileStart { filename: Option<String> },
    /// Bytes of the current `files` part.
    Data(Bytes),
    /// The current `files` part is complete.
    FileEnd,
    /// The whole `manifest` part (small: capped by the multipart reader).
    Manifest(Bytes),
    /// The whole `stdin` part (capped at `max_stdin_bytes` and charged while it arrived).
    Stdin(Bytes),
    /// The body was read to its end without error.
    BodyEnd,
}

/// Messages that may wait in the channel. A body chunk is at most a TLS record or a socket read,
/// so this keeps a few MiB in flight: enough to overlap reading and expanding, small next to
/// the upload.
pub(crate) const CHANNEL_DEPTH: usize = 256;

pub(crate) fn channel() -> (mpsc::Sender<PartMsg>, Feed) {
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    (tx, Feed::new(rx))
}

/// Where the current part is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartState {
    /// More data of the part may come.
    Open,
    /// `FileEnd` arrived.
    Ended,
    /// The channel closed or carried something else inside the part: the body reader failed.
    Truncated,
}

/// The assembler's end of the channel.
#[derive(Debug)]
pub(crate) struct Feed {
    rx: mpsc::Receiver<PartMsg>,
    /// Data of the current part received and not yet read.
    queue: VecDeque<Bytes>,
    /// Bytes of the current part received so far.
    received: u64,
    state: PartState,
}

impl Feed {
    fn new(rx: mpsc::Receiver<PartMsg>) -> Self {
        Feed {
            rx,
            queue: VecDeque::new(),
            received: 0,
            state: PartState::Ended,
        }
    }

    /// The next message between parts (`None` when the channel closed). After a `FileStart`, the
    /// part's data is read with [`PartReader`] or [`Feed::read_part`].
    pub fn next_message(&mut self) -> Option<PartMsg> {
        let msg = self.rx.blocking_recv()?;
        if matches!(msg, PartMsg::FileStart { .. }) {
            self.queue.clear();
            self.received = 0;
            self.state = PartState::Open;
        }
        Some(msg)
    }

    /// Bytes of the current part received so far, and whether that is all of them.
    pub fn progress(&self) -> (u64, bool) {
        (self.received, self.state != PartState::Open)
    }

    /// Whether the body reader stopped inside the current part.
    pub fn truncated(&self) -> bool {
        self.state == PartState::Truncated
    }

    /// Receives one more message of the current part into the queue (blocking); false once the
    /// part is complete.
    pub fn pull(&mut self) -> bool {
        if self.state != PartState::Open {
            return false;
        }
        match self.rx.blocking_recv() {
            Some(PartMsg::Data(chunk)) => {
                self.received = self.received.saturating_add(chunk.len() as u64);
                if !chunk.is_empty() {
                    self.queue.push_back(chunk);
                }
            }
            Some(PartMsg::FileEnd) => self.state = PartState::Ended,
            Some(_) | None => self.state = PartState::Truncated,
        }
        self.state == PartState::Open
    }

    /// The next unread chunk of the current part (never empty), or `None` at its end.
    fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if let Some(chunk) = self.queue.pop_front() {
                return Some(chunk);
            }
            if !self.pull() {
                return None;
            }
        }
    }

    /// Reads the rest of the current part into one buffer (no copy when it is one chunk). The
    /// buffer is allocated once, at its exact size, so the part is held at most twice (its
    /// chunks and the buffer) for the moment of the copy, never a growing buffer's slack.
    pub fn read_part(&mut self, first: Bytes) -> Bytes {
        let mut chunks = vec![first];
        while let Some(chunk) = self.next_chunk() {
            chunks.push(chunk);
        }
        if chunks.len() == 1 {
            return chunks.pop().unwrap_or_default();
        }
        let mut all = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
        for chunk in chunks {
            all.extend_from_slice(&chunk);
        }
        all.freeze()
    }

    /// Discards the rest of the current part.
    pub fn skip_part(&mut self) {
        while self.next_chunk().is_some() {}
    }
}

/// The current part as a [`BufRead`]: borrows each chunk, copies nothing. Ends with an error if
/// the body reader stopped inside the part.
pub(crate) struct PartReader<'f> {
    feed: &'f RefCell<Feed>,
    current: Bytes,
}

impl<'f> PartReader<'f> {
    pub fn new(feed: &'f RefCell<Feed>) -> Self {
        PartReader {
            feed,
            current: Bytes::new(),
        }
    }

    /// The first `n` bytes of the part (fewer if it is shorter), without consuming them.
    pub fn peek(&mut self, n: usize) -> std::io::Result<&[u8]> {
        while self.current.len() < n {
            let Some(next) = self.feed.borrow_mut().next_chunk() else {
                break;
            };
            if self.current.is_empty() {
                self.current = next;
            } else {
                // Only when a client splits the first bytes across chunks: a few bytes copied.
                let mut joined = BytesMut::from(&self.current[..]);
                joined.extend_from_slice(&next);
                self.current = joined.freeze();
            }
        }
        self.check_truncated()?;
        Ok(&self.current[..n.min(self.current.len())])
    }

    /// Whatever of the part is not read yet, as one buffer.
    pub fn into_rest(self) -> std::io::Result<Bytes> {
        let rest = self.feed.borrow_mut().read_part(self.current);
        if self.feed.borrow().truncated() {
            return Err(truncated());
        }
        Ok(rest)
    }

    fn check_truncated(&self) -> std::io::Result<()> {
        if self.feed.borrow().truncated() {
            Err(truncated())
        } else {
            Ok(())
        }
    }
}

fn truncated() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the request body ended inside this part",
    )
}

impl Read for PartReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for PartReader<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.current.is_empty() {
            match self.feed.borrow_mut().next_chunk() {
                Some(chunk) => self.current = chunk,
                None => self.current = Bytes::new(),
            }
            self.check_truncated()?;
        }
        Ok(&self.current)
    }

    fn consume(&mut self, amt: usize) {
        let _ = self.current.split_to(amt.min(self.current.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_of(msgs: Vec<PartMsg>) -> RefCell<Feed> {
        let (tx, feed) = channel();
        for m in msgs {
            tx.try_send(m).unwrap();
        }
        drop(tx);
        RefCell::new(feed)
    }

    fn data(s: &'static str) -> PartMsg {
        PartMsg::Data(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn given_a_part_in_chunks_then_the_reader_sees_its_bytes_and_stops_at_its_end() {
        let feed = feed_of(vec![
            PartMsg::FileStart { filename: None },
            data("ab"),
            data(""),
            data("cde"),
            PartMsg::FileEnd,
            PartMsg::BodyEnd,
        ]);
        assert!(matches!(
            feed.borrow_mut().next_message(),
            Some(PartMsg::FileStart { .. })
        ));
        let mut reader = PartReader::new(&feed);
        assert_eq!(reader.peek(4).unwrap(), b"abcd");
        let mut all = String::new();
        reader.read_to_string(&mut all).unwrap();
        assert_eq!(all, "abcde");
        assert_eq!(feed.borrow().progress(), (5, true));
        assert!(matches!(
            feed.borrow_mut().next_message(),
            Some(PartMsg::BodyEnd)
        ));
    }

    #[test]
    fn given_the_body_reader_stops_inside_a_part_then_reading_it_fails() {
        let feed = feed_of(vec![PartMsg::FileStart { filename: None }, data("ab")]);
        feed.borrow_mut().next_message();
        let mut reader = PartReader::new(&feed);
        let err = reader.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(feed.borrow().truncated());
    }

    #[test]
    fn given_pulls_then_progress_counts_received_bytes_before_they_are_read() {
        let feed = feed_of(vec![
            PartMsg::FileStart { filename: None },
            data("abc"),
            data("de"),
            PartMsg::FileEnd,
        ]);
        feed.borrow_mut().next_message();
        assert!(feed.borrow_mut().pull());
        assert_eq!(feed.borrow().progress(), (3, false));
        assert!(feed.borrow_mut().pull());
        assert!(!feed.borrow_mut().pull());
        assert_eq!(feed.borrow().progress(), (5, true));
        let rest = PartReader::new(&feed).into_rest().unwrap();
        assert_eq!(&rest[..], b"abcde");
    }
}
