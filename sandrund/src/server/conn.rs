//! One client connection: a non-blocking Unix stream, its frame decoder, its outgoing buffer and
//! where it is in the conversation.

#![forbid(unsafe_code)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use sandrun_ipc::{codec, ErrorCode, FrameDecoder, IpcError, JobId, Request, Response, Role};

use super::job::{Collection, Job, Starting};
use super::peer::Peer;
use super::request::ValidJob;
use super::slots::Slot;

/// Time a closing connection has to take its last messages before it is dropped.
pub const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// Stop reading a job's pipes while this many bytes wait to be sent to its client.
pub const HIGH_WATER: usize = 1 << 20;
/// Bytes read from a socket per wake-up.
const READ_CHUNK: usize = 64 * 1024;
/// Reads per wake-up, at most.
const READS_PER_WAKE: usize = 16;

/// Where a connection is in the conversation.
pub enum State {
    /// Waiting for `Hello`.
    AwaitHello,
    /// Handshake done; a submitter may send `Submit`, an admin any number of admin requests.
    Idle(Role),
    /// Receiving the bundle of an accepted job (a slot is reserved).
    Bundle(Upload),
    /// The sandbox has its order; the loop waits (polls) for J's `execve`.
    Starting(Box<Starting>),
    /// The sandbox runs.
    Running(Box<Job>),
    /// After `Exited`: the job's collector walks its `/work`; its outputs are relayed.
    Collecting(Box<Collection>),
    /// Nothing more to do; closes once the outgoing buffer is flushed.
    Closing,
}

/// An accepted job whose bundle (and stdin) is arriving.
pub struct Upload {
    pub job: Box<ValidJob>,
    pub id: JobId,
    pub slot: Slot,
    pub data: Vec<u8>,
}

pub struct Conn {
    /// `None` once the peer is gone (a job may still be tearing down).
    pub stream: Option<UnixStream>,
    pub peer: Peer,
    decoder: FrameDecoder,
    out: Vec<u8>,
    pub state: State,
    /// Deadline for the current conversation step (handshake, bundle upload, idle admin).
    pub deadline: Option<Instant>,
}

/// What reading from the socket produced.
pub enum Incoming {
    Messages(Vec<Request>),
    /// The peer closed (or reset) the connection.
    Closed,
    /// Undecodable bytes: the connection must be closed.
    Malformed(String),
}

impl Conn {
    pub fn new(stream: UnixStream, peer: Peer, deadline: Instant) -> Conn {
        Conn {
            stream: Some(stream),
            peer,
            decoder: FrameDecoder::new(),
            out: Vec::new(),
            state: State::AwaitHello,
            deadline: Some(deadline),
        }
    }

    /// Reads what is available and decodes complete frames.
    pub fn read(&mut self) -> Incoming {
        let Some(stream) = self.stream.as_mut() else {
            return Incoming::Closed;
        };
        let mut buf = [0u8; READ_CHUNK];
        let mut msgs = Vec::new();
        // A few reads per wake-up keep large bundles fast without letting one client starve
        // the others; the decoder never holds more than one frame plus one read.
        for _ in 0..READS_PER_WAKE {
            let n = match stream.read(&mut buf) {
                Ok(0) if msgs.is_empty() => return Incoming::Closed,
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) if msgs.is_empty() => return Incoming::Closed,
                Err(_) => break,
            };
            self.decoder.push(&buf[..n]);
            loop {
                match self.decoder.next_message::<Request>() {
                    Ok(Some(m)) => msgs.push(m),
                    Ok(None) => break,
                    Err(e) => return Incoming::Malformed(e.to_string()),
                }
            }
            if n < READ_CHUNK {
                break;
            }
        }
        Incoming::Messages(msgs)
    }

    /// Queues one message. Encoding cannot fail for messages the helper builds (their chunks are
    /// bounded); if it did, that is a bug and the connection is closed.
    pub fn send(&mut self, msg: &Response) {
        if self.stream.is_none() {
            return;
        }
        match codec::encode(msg) {
            Ok(frame) => self.out.extend_from_slice(&frame),
            Err(e) => {
                log::error!("cannot encode a response (bug) error={}", e);
                self.stream = None;
            }
        }
    }

    /// Sends an error and moves to `Closing`.
    pub fn fail(&mut self, code: ErrorCode, message: impl Into<String>) {
        self.send(&Response::Error(IpcError::new(code, message)));
        self.state = State::Closing;
        // The error gets a short grace period to be read; then the connection is dropped
        // whether or not the peer reads.
        self.deadline = Some(Instant::now() + CLOSE_GRACE);
    }

    /// Writes as much of the outgoing buffer as the socket takes.
    pub fn flush(&mut self) {
        let Some(stream) = self.stream.as_mut() else {
            self.out.clear();
            return;
        };
        let mut written = 0;
        while written < self.out.len() {
            match stream.write(&self.out[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.stream = None;
                    self.out.clear();
                    return;
                }
            }
        }
        self.out.drain(..written);
        if self.out.capacity() > 4 * HIGH_WATER && self.out.len() < HIGH_WATER {
            self.out.shrink_to(HIGH_WATER);
        }
    }

    pub fn pending_out(&self) -> usize {
        self.out.len()
    }

    /// Whether the connection can be forgotten: closing with nothing left to send, or peer gone
    /// with no job to tear down.
    pub fn is_done(&self) -> bool {
        // A job's cgroup and slot, and its collector, are released by the loop, not dropped.
        let job_alive = matches!(
            self.state,
            State::Starting(_) | State::Running(_) | State::Collecting(_)
        );
        (self.stream.is_none() && !job_alive)
            || (matches!(self.state, State::Closing) && self.out.is_empty())
    }
}
