//! WebSocket `/ws/{id}` (alias `/stream/{id}`): the job's events as JSON text messages, live.
//!
//! A subscriber first gets the backlog (every event since the job was queued), then each new
//! event as it happens; after the `exit` event the server closes. Pings are answered. Events:
//! `{"type":"status","status":...}`, `{"type":"stdout"|"stderr","data":...}`,
//! `{"type":"exit","status":...,"reason":...,"exit_code":...,"signal":...}`,
//! `{"type":"error","error":...}`.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::Request;
use hyper_tungstenite::tungstenite::protocol::WebSocketConfig;
use hyper_tungstenite::tungstenite::Message;
use hyper_tungstenite::HyperWebsocketStream;
use serde_json::json;

use crate::gateway::AppState;
use crate::jobs::{JobEvent, JobId, StreamKind};
use crate::server::response::{ApiError, ApiResult};
use crate::server::routes::job_id;
use crate::server::ConnInfo;

/// Clients only send control frames; anything big is refused by the codec.
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

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
        ..WebSocketConfig::default()
    };
    let (response, socket) = hyper_tungstenite::upgrade(&mut req, Some(config))
        .map_err(|e| ApiError::bad_request(format!("bad WebSocket upgrade: {e}")))?;
    let state = Arc::clone(state);
    tokio::spawn(async move {
        // The connection slot stays taken while the socket lives.
        let _permit = conn.permit;
        match socket.await {
            Ok(ws) => stream_events(&state, id, ws, changes).await,
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
        }
    });
    Ok(response)
}

async fn stream_events(
    state: &AppState,
    id: JobId,
    mut ws: HyperWebsocketStream,
    mut changes: tokio::sync::watch::Receiver<u64>,
) {
    let mut cursor = 0;
    loop {
        let Some((events, _finished)) = state.jobs.events_since(id, cursor) else {
            let gone = json!({"type": "error", "error": "the job was deleted"});
            let _ = ws.send(Message::text(gone.to_string())).await;
            break;
        };
        cursor += events.len();
        for event in &events {
            if ws
                .send(Message::text(event_json(event).to_string()))
                .await
                .is_err()
            {
                return;
            }
            if matches!(event, JobEvent::Exit(_)) {
                let _ = ws.close(None).await;
                return;
            }
        }
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
    let _ = ws.close(None).await;
}

fn event_json(event: &JobEvent) -> serde_json::Value {
    match event {
        JobEvent::Status(status) => json!({"type": "status", "status": status}),
        JobEvent::Output(kind, data) => {
            let kind = match kind {
                StreamKind::Stdout => "stdout",
                StreamKind::Stderr => "stderr",
            };
            json!({"type": kind, "data": String::from_utf8_lossy(data)})
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
