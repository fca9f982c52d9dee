//! WebSocket `/ws/{id}` (alias `/stream/{id}`): the job's events as JSON text messages, live.
//!
//! A subscriber first gets the backlog (every event since the job was queued), then each new
//! event as it happens; after the `exit` event the server closes. Pings are answered. Events:
//! `{"type":"status","status":...}`, `{"type":"stdout"|"stderr","data":...,"data_base64":...}`,
//! `{"type":"exit","status":...,"reason":...,"exit_code":...,"signal":...}`,
//! `{"type":"error","error":...}`.
//!
//! An output event carries at most [`WS_EVENT_CHUNK`] bytes of output (a larger chunk from the
//! helper is sent as several events). Its `data_base64` is exactly the chunk's bytes; `data` is the chunk as lossy
//! UTF-8 text, decoded per subscriber with [`Utf8Carry`]: a multi-byte sequence left incomplete at
//! the end of a chunk is held back and decoded with the next chunk of the same stream, so a
//! character split between chunks arrives whole in the later event. A sequence still incomplete
//! when the job ends is sent before `exit` as one more event with `data` U+FFFD and an empty
//! `data_base64`.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::Request;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::protocol::CloseFrame;
use hyper_tungstenite::tungstenite::protocol::WebSocketConfig;
use hyper_tungstenite::tungstenite::Message;
use hyper_tungstenite::HyperWebsocketStream;
use serde_json::json;

use crate::budget::Reservation;
use crate::jobs::{JobEvent, JobId, StreamKind};
use crate::server::params::{client_key, job_id};
use crate::server::refusals::budget_refusal;
use crate::server::response::{ApiError, ApiResult};
use crate::server::text::{base64, Utf8Carry};
use crate::server::ConnInfo;
use crate::state::AppState;

/// Clients only send control frames; anything big is refused by the codec.
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

/// Event messages queued on one socket before they are flushed (and the charge for them
/// released): the socket's backlog is at most this.
pub const WS_BACKLOG_BYTES: usize = 128 * 1024;

/// Bytes of job output in one event message: a larger chunk from the helper is sent as several
/// events, so the largest message (16 KiB of control characters: 96 KiB of JSON text plus
/// 22 KiB of base64) fits well within the backlog.
pub const WS_EVENT_CHUNK: usize = 16 * 1024;

/// The hard cap on one socket's write buffer: the backlog plus room for control frames (a pong,
/// the close frame). A write past it fails and ends the stream.
pub const WS_MAX_WRITE_BUFFER: usize = WS_BACKLOG_BYTES + 4 * 1024;

/// What one socket is charged for its whole life: its write buffer's capacity, which it keeps
/// after a flush. The buffer grows by doubling up to at most [`WS_MAX_WRITE_BUFFER`] bytes in
/// use, so its capacity stays below twice that.
pub const WS_SOCKET_CHARGE: u64 = 2 * WS_MAX_WRITE_BUFFER as u64;

/// tungstenite writes its buffer out once it holds this much.
const WS_WRITE_BUFFER: usize = 64 * 1024;

// tungstenite panics on a configuration whose cap is not above its write threshold.
const _: () = assert!(WS_WRITE_BUFFER < WS_MAX_WRITE_BUFFER);

pub fn upgrade(
    state: &Arc<AppState>,
    conn: ConnInfo,
    id: &str,
    mut req: Request<Incoming>,
) -> ApiResult {
    let id = job_id(id)?;
    let Some(changes) = state.jobs.subscribe(id) else {
        return Err(ApiError::not_found("job"));
    };
    if !hyper_tungstenite::is_upgrade_request(&req) {
        return Err(ApiError::bad_request(
            "expected a WebSocket upgrade request",
        ));
    }
    let config = WebSocketConfig {
        max_message_size: Some(MAX_CLIENT_MESSAGE),
        max_frame_size: Some(MAX_CLIENT_MESSAGE),
        write_buffer_size: WS_WRITE_BUFFER,
        max_write_buffer_size: WS_MAX_WRITE_BUFFER,
        ..WebSocketConfig::default()
    };
    // The socket's write buffer is charged to the subscriber for the socket's life, before
    // the upgrade: one past its share is refused with the budget's JSON error.
    let client = client_key(state, conn.peer, &req);
    let socket_charge = state
        .jobs
        .budget()
        .reserve(client, WS_SOCKET_CHARGE)
        .map_err(|full| budget_refusal(state, full))?;
    // The messages queued for this socket are charged to the subscriber too, until flushed.
    let backlog = state.jobs.budget().empty(client);
    let (response, socket) = hyper_tungstenite::upgrade(&mut req, Some(config))
        .map_err(|e| ApiError::bad_request(format!("bad WebSocket upgrade: {e}")))?;
    let state = Arc::clone(state);
    tokio::spawn(async move {
        // Both connection slots, the global one and the client's, stay taken while the
        // socket lives: an upgrade must not let a client past its connection cap.
        let _slots = conn.slots();
        let _socket_charge = socket_charge;
        match socket.await {
            Ok(ws) => stream_events(&state, id, ws, changes, backlog).await,
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
        }
    });
    // The 101 answer has no body.
    Ok(response.map(|_| crate::server::response::Body::default()))
}

async fn stream_events(
    state: &AppState,
    id: JobId,
    mut ws: HyperWebsocketStream,
    mut changes: tokio::sync::watch::Receiver<u64>,
    mut backlog: Reservation,
) {
    let mut cursor = 0;
    let mut text = TextDecoders::default();
    loop {
        // `_job_charge` keeps the job's data charged while this round holds its events.
        let Some((events, _job_charge)) = state.jobs.events_since(id, cursor) else {
            let gone = json!({"type": "error", "error": "the job was deleted"});
            let _ = ws.send(Message::text(gone.to_string())).await;
            let _ = ws
                .close(Some(close_frame(CloseCode::Away, "job deleted")))
                .await;
            return;
        };
        cursor += events.len();
        // The new events are queued, then written together (one TLS record, one system call),
        // up to WS_BACKLOG_BYTES at a time.
        for event in events.iter().flat_map(messages_of) {
            let event = &event;
            if matches!(event, JobEvent::Exit(_)) {
                for tail in text.flush() {
                    let tail = tail.to_string();
                    let bound = tail.len() as u64;
                    if queue(&mut ws, &mut backlog, bound, || tail).await.is_err() {
                        return;
                    }
                }
            }
            let bound = event_bound(event);
            let build = || text.event_json(event).to_string();
            if queue(&mut ws, &mut backlog, bound, build).await.is_err() {
                return;
            }
            if matches!(event, JobEvent::Exit(_)) {
                // Closing flushes what is queued, the close frame included.
                let _ = ws
                    .close(Some(close_frame(CloseCode::Normal, "job finished")))
                    .await;
                return;
            }
        }
        if ws.flush().await.is_err() {
            return;
        }
        backlog.shrink(backlog.bytes());
        tokio::select! {
            // An error means the job was removed: the next round reports it.
            _ = changes.changed() => {}
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Ping(_))) => {
                    // tungstenite queues the pong; flushing sends it now.
                    if ws.flush().await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// The events one event becomes on the socket: an output chunk larger than [`WS_EVENT_CHUNK`]
/// is split (the text decoders carry a character split between two pieces into the later one).
fn messages_of(event: &JobEvent) -> Vec<JobEvent> {
    match event {
        JobEvent::Output(kind, bytes) if bytes.len() > WS_EVENT_CHUNK => (0..bytes.len())
            .step_by(WS_EVENT_CHUNK)
            .map(|at| {
                let end = (at + WS_EVENT_CHUNK).min(bytes.len());
                JobEvent::Output(*kind, bytes.slice(at..end))
            })
            .collect(),
        other => vec![other.clone()],
    }
}

/// A close frame with a code, so a client never sees 1005 ("no status").
fn close_frame(code: CloseCode, reason: &'static str) -> CloseFrame<'static> {
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

/// The most bytes the JSON message of `event` can take, known before it is made: an output
/// chunk (with up to 3 bytes carried over from the previous one) is at most 6 bytes of JSON text
/// a byte (`\u0001`), plus its base64.
fn event_bound(event: &JobEvent) -> u64 {
    const FIELDS: u64 = 128;
    match event {
        JobEvent::Output(_, bytes) => {
            let n = bytes.len() as u64;
            6 * (n + 3) + n.div_ceil(3) * 4 + FIELDS
        }
        JobEvent::Error(message) => 6 * message.len() as u64 + FIELDS,
        JobEvent::Status(_) | JobEvent::Exit(_) => 2 * FIELDS,
    }
}

/// Queues one message, charged to the subscriber before it is made (`bound` bytes, then its
/// real size). When the backlog is full or the charge is refused, what is queued is flushed
/// (and its charge released) first, before the message exists; a message the budget cannot
/// hold even then ends the stream with an error event.
async fn queue(
    ws: &mut HyperWebsocketStream,
    backlog: &mut Reservation,
    bound: u64,
    build: impl FnOnce() -> String,
) -> Result<(), ()> {
    let full = backlog.bytes().saturating_add(bound) > WS_BACKLOG_BYTES as u64;
    if full || backlog.try_grow(bound).is_err() {
        ws.flush().await.map_err(|_| ())?;
        backlog.shrink(backlog.bytes());
        if backlog.try_grow(bound).is_err() {
            let full = json!({"type": "error",
                              "error": "the gateway's memory budget is full: reconnect later"});
            let _ = ws.send(Message::text(full.to_string())).await;
            let _ = ws
                .close(Some(close_frame(CloseCode::Again, "memory budget full")))
                .await;
            return Err(());
        }
    }
    let message = build();
    backlog.shrink(bound.saturating_sub(message.len() as u64));
    ws.feed(Message::text(message)).await.map_err(|_| ())
}

/// One subscriber's text decoders, one per stream.
#[derive(Debug, Default)]
struct TextDecoders {
    stdout: Utf8Carry,
    stderr: Utf8Carry,
}

impl TextDecoders {
    fn event_json(&mut self, event: &JobEvent) -> serde_json::Value {
        match event {
            JobEvent::Status(status) => json!({"type": "status", "status": status}),
            JobEvent::Output(kind, bytes) => {
                let text = match kind {
                    StreamKind::Stdout => self.stdout.decode(bytes),
                    StreamKind::Stderr => self.stderr.decode(bytes),
                };
                output_json(*kind, &text, &base64(bytes))
            }
            JobEvent::Exit(summary) => json!({
                "type": "exit",
                "status": summary.status,
                "reason": summary.reason.map(sandrun_ipc::ExitReason::as_str),
                "exit_code": summary.exit_code,
                "signal": summary.signal,
            }),
            JobEvent::Error(message) => json!({"type": "error", "error": message}),
        }
    }

    /// The incomplete sequences the streams ended in, as output events with no bytes.
    fn flush(&mut self) -> Vec<serde_json::Value> {
        [
            (StreamKind::Stdout, self.stdout.flush()),
            (StreamKind::Stderr, self.stderr.flush()),
        ]
        .into_iter()
        .filter_map(|(kind, tail)| tail.map(|text| output_json(kind, &text, "")))
        .collect()
    }
}

fn output_json(kind: StreamKind, text: &str, bytes_base64: &str) -> serde_json::Value {
    let kind = match kind {
        StreamKind::Stdout => "stdout",
        StreamKind::Stderr => "stderr",
    };
    json!({"type": kind, "data": text, "data_base64": bytes_base64})
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn given_a_large_output_chunk_then_it_becomes_pieces_whose_messages_fit_the_backlog() {
        let big = Bytes::from(vec![1u8; 3 * WS_EVENT_CHUNK + 5]);
        let pieces = messages_of(&JobEvent::Output(StreamKind::Stderr, big.clone()));
        let sizes: Vec<usize> = pieces
            .iter()
            .map(|p| match p {
                JobEvent::Output(StreamKind::Stderr, b) => b.len(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sizes, [WS_EVENT_CHUNK, WS_EVENT_CHUNK, WS_EVENT_CHUNK, 5]);
        let joined: Vec<u8> = pieces
            .iter()
            .flat_map(|p| match p {
                JobEvent::Output(_, b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(joined, big);
        // The largest message, with the carry and the framing, fits the backlog and the cap.
        let largest = event_bound(&pieces[0]) + 14;
        assert!(largest <= WS_BACKLOG_BYTES as u64, "{largest}");
        // A split character arrives whole in the later piece.
        let euro = "€".as_bytes();
        let mut text = vec![b'a'; WS_EVENT_CHUNK - 1];
        text.extend_from_slice(euro);
        let pieces = messages_of(&JobEvent::Output(StreamKind::Stdout, Bytes::from(text)));
        let mut decoders = TextDecoders::default();
        let last = pieces
            .iter()
            .map(|p| decoders.event_json(p))
            .last()
            .expect("two pieces");
        assert_eq!(last["data"], "€");
    }

    #[test]
    fn given_worst_case_chunks_then_their_messages_fit_the_bound() {
        let mut decoders = TextDecoders::default();
        // A character split at the chunk's end is carried over into the next chunk.
        let first = JobEvent::Output(StreamKind::Stdout, Bytes::from_static(&[b'a', 0xe2, 0x82]));
        let json = decoders.event_json(&first).to_string();
        assert!(json.len() as u64 <= event_bound(&first), "{json}");
        // Then control characters (6 bytes of JSON each) and invalid bytes (U+FFFD).
        let mut worst = vec![1u8; 4096];
        worst.extend(std::iter::repeat_n(0xff, 4096));
        let event = JobEvent::Output(StreamKind::Stdout, Bytes::from(worst));
        let json = decoders.event_json(&event).to_string();
        assert!(json.len() as u64 <= event_bound(&event), "{}", json.len());
        let error = JobEvent::Error("\u{1}\"\\".repeat(100));
        let json = decoders.event_json(&error).to_string();
        assert!(json.len() as u64 <= event_bound(&error));
    }
}
