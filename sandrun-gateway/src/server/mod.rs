//! The HTTPS server: a TCP listener, rustls, hyper 1 (HTTP/1.1 and HTTP/2), a semaphore capping
//! connections, header and body timeouts, and graceful shutdown.
//!
//! [`run`] is a library function: the binary calls it with the configured listener, tests call it
//! on `127.0.0.1:0`.

mod body;
mod outputs;
pub mod response;
mod routes;
mod text;
pub mod tls;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::ratelimit::ClientKey;

use crate::gateway::{run_scheduler, stopped, AppState};

/// How long shutdown waits for open connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What a handler knows about its connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Held by every task serving this connection, including an upgraded WebSocket.
    pub permit: Arc<OwnedSemaphorePermit>,
    /// This connection's place in its client's connection count (released on drop).
    pub client_slot: Arc<Option<ClientConnection>>,
}

/// Open connections per client, so one client cannot hold every connection slot.
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    counts: std::sync::Mutex<std::collections::HashMap<ClientKey, usize>>,
}

/// One counted connection; dropping it gives the slot back.
#[derive(Debug)]
pub struct ClientConnection {
    counts: Arc<ConnectionCounts>,
    key: ClientKey,
}

impl ConnectionCounts {
    /// Counts a new connection of `key`, unless it already holds `max`.
    fn try_add(self: &Arc<Self>, key: ClientKey, max: usize) -> Option<ClientConnection> {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = counts.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientConnection {
            counts: Arc::clone(self),
            key,
        })
    }
}

impl Drop for ClientConnection {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Counts the connection against its client, or `Err` if the client is at its cap. Trusted
/// proxies carry many clients' traffic and are not counted.
fn admit_connection(
    state: &AppState,
    counts: &Arc<ConnectionCounts>,
    peer: SocketAddr,
) -> Result<Option<ClientConnection>, ()> {
    let limits = &state.config;
    if limits.trusted_proxies.contains(&peer.ip()) {
        return Ok(None);
    }
    let key = ClientKey::from_ip(peer.ip());
    counts
        .try_add(key, limits.http.max_connections_per_client)
        .map(Some)
        .ok_or(())
}

/// Serves HTTPS on `listener` and runs the job scheduler until `shutdown` turns true, then stops
/// accepting, lets open connections finish (up to a grace period) and returns.
pub async fn run(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    state: Arc<AppState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let max = state.config.http.max_connections;
    let slots = Arc::new(Semaphore::new(max));
    let acceptor = TlsAcceptor::from(tls);
    let counts = Arc::new(ConnectionCounts::default());
    let scheduler = tokio::spawn(run_scheduler(Arc::clone(&state), shutdown.clone()));
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => permit,
            () = stopped(&mut shutdown) => break,
        };
        // Invariant: the semaphore is never closed.
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopped(&mut shutdown) => break,
        };
        match accepted {
            Ok((tcp, peer)) => {
                // Responses and WebSocket events are small writes that must leave at once; Nagle
                // would hold one back until the previous one is acknowledged.
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                let Ok(client_slot) = admit_connection(&state, &counts, peer) else {
                    // Closing at once frees the slot for everyone else.
                    state.metrics.rejected("connections_per_client");
                    drop(tcp);
                    continue;
                };
                let conn = ConnInfo {
                    peer,
                    permit: Arc::new(permit),
                    client_slot: Arc::new(client_slot),
                };
                let task = serve_connection(tcp, acceptor.clone(), Arc::clone(&state), conn);
                tokio::spawn(task.with_shutdown(shutdown.clone()));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    drop(listener);
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, slots.acquire_many(all)).await;
    let _ = scheduler.await;
}

/// One connection: TLS handshake (bounded by the header timeout), then HTTP.
struct Connection {
    tcp: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    state: Arc<AppState>,
    conn: ConnInfo,
}

fn serve_connection(
    tcp: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    state: Arc<AppState>,
    conn: ConnInfo,
) -> Connection {
    Connection {
        tcp,
        acceptor,
        state,
        conn,
    }
}

impl Connection {
    async fn with_shutdown(self, mut shutdown: watch::Receiver<bool>) {
        let http = &self.state.config.http;
        let header_timeout = Duration::from_millis(http.header_timeout_ms);
        let lifetime = Duration::from_secs(http.max_connection_s);
        let max_header_bytes = http.max_header_bytes;
        let handshake = tokio::time::timeout(header_timeout, self.acceptor.accept(self.tcp));
        let tls = match handshake.await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
            Err(_) => return tracing::debug!("TLS handshake timed out"),
        };
        let state = self.state;
        let conn = self.conn;
        let service = service_fn(move |req| {
            let (state, conn) = (Arc::clone(&state), conn.clone());
            async move { Ok::<_, std::convert::Infallible>(routes::handle(state, conn, req).await) }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(max_header_bytes.max(8192))
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(32)
            .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(Duration::from_secs(30)));
        let served = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
        tokio::pin!(served);
        let deadline = tokio::time::sleep(lifetime);
        tokio::pin!(deadline);
        tokio::select! {
            result = served.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
            () = &mut deadline => tracing::debug!("connection reached its maximum lifetime"),
            () = stopped(&mut shutdown) => {
                served.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, served).await;
            }
        }
    }
}
