//! WebSocket `/ws/{id}` (alias `/stream/{id}`): the job's events as JSON text messages, live.
//!
//! A subscriber first gets the backlog (every event since the job was queued), then each new
//! event as it happens; after the `exit` event the server closes. Pings are answered. Events:
//! `{"type":"status","status":...}`, `{"type":"stdout"|"stderr","data":...,"data_base64":...}`,
//! `{"type":"exit","status":...,"reason":...,"exit_code":...,"signal":...}`,
//! `{"type":"error","error":...}`.
//!
//! An output event's `data_base64` is exactly the chunk's bytes; `data` is the chunk as lossy
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

use crate::gateway::AppState;
use crate::jobs::{JobEvent, JobId, Reservation, StreamKind};
use crate::server::response::{ApiError, ApiResult};
use crate::server::routes::{client_key, job_id};
use crate::server::text::{base64, Utf8Carry};
use crate::server::ConnInfo;

/// Clients only send control frames; anything big is refused by the codec.
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

/// Event messages queued on one socket before they are flushed (and the charge for them
/// released): the socket's backlog is at most this plus one message.
pub const WS_BACKLOG_BYTES: usize = 256 * 1024;

/// The hard cap on one socket's write buffer: the backlog bound plus the largest event message
/// (a 256 KiB chunk of control characters is 1.5 MiB of JSON text plus 342 KiB of base64).
pub const WS_MAX_WRITE_BUFFER: usize = WS_BACKLOG_BYTES + 2 * 1024 * 1024;

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
        max_write_buffer_size: WS_MAX_WRITE_BUFFER,
        ..WebSocketConfig::default()
    };
    // The messages queued for this socket are charged to the subscriber.
    let backlog = state
        .jobs
        .budget()
        .empty(client_key(state, conn.peer, &req));
    let (response, socket) = hyper_tungstenite::upgrade(&mut req, Some(config))
        .map_err(|e| ApiError::bad_request(format!("bad WebSocket upgrade: {e}")))?;
    let state = Arc::clone(state);
    tokio::spawn(async move {
        // Both connection slots, the global one and the client's, stay taken while the
        // socket lives: an upgrade must not let a client past its connection cap.
        let _slots = conn.slots();
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
        for event in &events {
            if matches!(event, JobEvent::Exit(_)) {
                for tail in text.flush() {
                    if queue(&mut ws, &mut backlog, tail.to_string())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            if queue(&mut ws, &mut backlog, text.event_json(event).to_string())
                .await
                .is_err()
            {
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

/// A close frame with a code, so a client never sees 1005 ("no status").
fn close_frame(code: CloseCode, reason: &'static str) -> CloseFrame<'static> {
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

/// Queues one message, charged to the subscriber first. When the backlog is full or the charge
/// is refused, what is queued is flushed (and its charge released) first; a message the budget
/// cannot hold even then ends the stream with an error event.
async fn queue(
    ws: &mut HyperWebsocketStream,
    backlog: &mut Reservation,
    message: String,
) -> Result<(), ()> {
    let size = message.len() as u64;
    let full = backlog.bytes().saturating_add(size) > WS_BACKLOG_BYTES as u64;
    if full || backlog.try_grow(size).is_err() {
        ws.flush().await.map_err(|_| ())?;
        backlog.shrink(backlog.bytes());
        if backlog.try_grow(size).is_err() {
            let full = json!({"type": "error",
                              "error": "the gateway's memory budget is full: reconnect later"});
            let _ = ws.send(Message::text(full.to_string())).await;
            let _ = ws
                .close(Some(close_frame(CloseCode::Again, "memory budget full")))
                .await;
            return Err(());
        }
    }
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
