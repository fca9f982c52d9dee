//! The HTTPS server: a TCP listener, rustls, hyper 1 (HTTP/1.1 and HTTP/2), a semaphore capping
//! connections, a per-client connection cap, a timeout for every phase of a connection (TLS
//! handshake, first request, request head, keep-alive, HTTP/2 with no open stream, bodies) and
//! graceful shutdown.
//!
//! The first byte of a connection tells TLS from plain HTTP ([`plain`]): plain HTTP is told to use
//! `https://` (or, with `--dev` and a loopback peer, served), under the same phase timeouts.
//! Every response carries the CORS headers of [`cors`].
//!
//! [`run`] is a library function: the binary calls it with the configured listener, tests call it
//! on `127.0.0.1:0`.

mod body;
pub mod cors;
mod outputs;
mod params;
mod phases;
mod plain;
mod refusals;
pub mod response;
mod routes;
mod run;
mod submit;
pub(crate) mod templates;
mod text;
pub mod tls;
mod ui;
pub(crate) mod ws;

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

use crate::budget::{BudgetFull, Reservation};
use crate::config::H2_MIN_WINDOW;
use crate::ratelimit::ClientKey;
use phases::{InFlightBody, PhaseTimeouts, Phases, Watched};

use crate::scheduler::{run_scheduler, stopped};
use crate::state::AppState;

/// How long shutdown waits for open connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long a connection that ran out of an idle phase has to finish its HTTP/2 GOAWAY.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What a handler knows about its connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Held by every task serving this connection, including an upgraded WebSocket.
    pub permit: Arc<OwnedSemaphorePermit>,
    /// This connection's place in its client's connection count (released on drop), also
    /// held by an upgraded WebSocket.
    pub client_slot: Arc<Option<ClientConnection>>,
    /// Bytes this connection holds charged to the address it comes from for its whole life
    /// (an HTTP/2 connection's flow-control window; 0 for HTTP/1.1): `/stats` reports it, so a
    /// caller can tell its own connection from what it holds otherwise.
    pub window_charge: u64,
}

/// A connection's places in the global pool and in its client's count, held together.
#[derive(Debug)]
pub struct ConnSlots {
    _permit: Arc<OwnedSemaphorePermit>,
    _client_slot: Arc<Option<ClientConnection>>,
}

impl ConnInfo {
    /// Both places, for a task that outlives the HTTP connection (an upgraded WebSocket).
    pub fn slots(&self) -> ConnSlots {
        ConnSlots {
            _permit: Arc::clone(&self.permit),
            _client_slot: Arc::clone(&self.client_slot),
        }
    }
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

/// Counts the connection against its client, or `Err` if the client is at its cap (the smaller
/// of `http.max_connections_per_client` and its share of `http.max_connections`). Trusted
/// proxies carry many clients' traffic and are not counted.
fn admit_connection(
    state: &AppState,
    counts: &Arc<ConnectionCounts>,
    peer: SocketAddr,
) -> Result<Option<ClientConnection>, ()> {
    let limits = &state.config;
    // The same test as `client_ip`'s: on a dual-stack listener an IPv4 proxy is a mapped
    // address, and a plain `contains` would hold it to one client's connection cap.
    if crate::ratelimit::is_trusted_proxy(peer.ip(), &limits.trusted_proxies) {
        return Ok(None);
    }
    let key = ClientKey::from_ip(peer.ip());
    counts
        .try_add(key, limits.connections_per_client())
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
    // Invariant: `Config::validate` (run before the gateway starts) parsed this list.
    let cors = Arc::new(
        cors::AllowedOrigins::parse(&state.config.cors_allowed_origins)
            .expect("cors_allowed_origins was validated"),
    );
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
                    window_charge: 0,
                };
                let task = Connection {
                    tcp,
                    acceptor: acceptor.clone(),
                    state: Arc::clone(&state),
                    cors: Arc::clone(&cors),
                    conn,
                };
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

/// One connection: its first byte, the TLS handshake (both bounded by the handshake timeout),
/// then HTTP with a phase clock.
struct Connection {
    tcp: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    state: Arc<AppState>,
    cors: Arc<cors::AllowedOrigins>,
    conn: ConnInfo,
}

/// What a connection's requests get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Serve {
    /// The API.
    Api,
    /// A plain HTTP connection that is not served: every request is told to use `https://`.
    UseHttps,
    /// An HTTP/2 connection whose flow-control window could not be charged to its client: it
    /// serves only the requests of [`frees_or_reads_held`], every other request gets the
    /// budget's refusal (429 or 503 JSON), on the protocol's smallest windows.
    OverBudget(BudgetFull),
}

/// The requests an HTTP/2 connection whose window did not fit its client's share still serves:
/// the ones that free the memory the client holds (`DELETE /jobs/{id}`) or only read what is
/// already charged or small (`/download/*`, `/outputs/*`, `/status/{id}`, `/stats`). Without
/// them a client whose finished jobs fill its share could not fetch or delete them over HTTP/2
/// (browsers, curl) until their TTL. None of them has a request body, and the connection keeps
/// the protocol's smallest windows; an answer that is not charged yet is still charged (and
/// refused past the share) as on any connection.
fn frees_or_reads_held<B>(req: &hyper::Request<B>) -> bool {
    use hyper::Method;
    let path = req.uri().path().trim_start_matches('/');
    let first = path.split('/').next().unwrap_or("");
    let has_id = path.split('/').nth(1).is_some_and(|id| !id.is_empty());
    match *req.method() {
        Method::DELETE => first == "jobs" && has_id,
        Method::GET => match first {
            "download" | "outputs" | "status" => has_id,
            "stats" => path == "stats",
            _ => false,
        },
        _ => false,
    }
}

/// Charges an HTTP/2 connection's flow-control window (the request-body bytes its client may
/// send before the gateway reads them) to the client's memory share, for the connection's life.
/// A trusted proxy carries many clients' streams: its connections are charged within the whole
/// budget only.
fn charge_h2_window(state: &AppState, peer: SocketAddr) -> Result<Reservation, BudgetFull> {
    let window = u64::from(state.config.http.http2_connection_window_bytes);
    let mut charge = state.jobs.budget().empty(ClientKey::from_ip(peer.ip()));
    if crate::ratelimit::is_trusted_proxy(peer.ip(), &state.config.trusted_proxies) {
        charge.try_grow_past_share(window)?;
    } else {
        charge.try_grow(window)?;
    }
    Ok(charge)
}

fn phase_timeouts(http: &crate::config::HttpLimits) -> PhaseTimeouts {
    PhaseTimeouts {
        first_request: Duration::from_millis(http.first_request_timeout_ms),
        header: Duration::from_millis(http.header_timeout_ms),
        keep_alive: Duration::from_millis(http.keep_alive_timeout_ms),
        http2_idle: Duration::from_millis(http.http2_idle_timeout_ms),
    }
}

impl Connection {
    async fn with_shutdown(mut self, shutdown: watch::Receiver<bool>) {
        let http = &self.state.config.http;
        let handshake_timeout = Duration::from_millis(http.tls_handshake_timeout_ms);
        // The first byte is part of the handshake phase: a silent connection is closed at its end.
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout(handshake_timeout, self.tcp.peek(&mut first)).await;
        let kind = match peeked {
            Ok(Ok(1)) => plain::sniff(first[0]),
            Ok(Ok(_)) => return,
            Ok(Err(e)) => return tracing::debug!(error = %e, "reading the first byte failed"),
            Err(_) => return tracing::debug!("no first byte before the handshake timeout"),
        };
        if kind == plain::Kind::Plain {
            let served = self.state.config.dev_plain_http_on_loopback
                && self.conn.peer.ip().to_canonical().is_loopback();
            let serve = if served {
                Serve::Api
            } else {
                self.state.metrics.rejected("plain_http");
                Serve::UseHttps
            };
            let (tcp, parts) = (self.tcp, (self.state, self.cors, self.conn));
            return serve_http(tcp, false, serve, parts, shutdown).await;
        }
        let handshake = tokio::time::timeout(handshake_timeout, self.acceptor.accept(self.tcp));
        let tls = match handshake.await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
            Err(_) => return tracing::debug!("TLS handshake timed out"),
        };
        let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
        // The window's charge is held until the connection ends.
        let (serve, _window) = if http2 {
            match charge_h2_window(&self.state, self.conn.peer) {
                Ok(charge) => {
                    self.conn.window_charge = charge.bytes();
                    (Serve::Api, Some(charge))
                }
                Err(full) => {
                    tracing::debug!(?full, "HTTP/2 window not charged: refusing the connection");
                    (Serve::OverBudget(full), None)
                }
            }
        } else {
            (Serve::Api, None)
        };
        let parts = (self.state, self.cors, self.conn);
        serve_http(tls, http2, serve, parts, shutdown).await;
    }
}

/// HTTP on an established stream (TLS, or plain), with the phase clock, the connection's
/// lifetime and graceful shutdown.
async fn serve_http<S>(
    stream: S,
    http2: bool,
    serve: Serve,
    (state, cors, conn): (Arc<AppState>, Arc<cors::AllowedOrigins>, ConnInfo),
    mut shutdown: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = &state.config.http;
    let lifetime = Duration::from_secs(http.max_connection_s);
    let max_header_bytes = http.max_header_bytes;
    let timeouts = phase_timeouts(http);
    let phases = Phases::new(timeouts, http2);
    let service = {
        let phases = Arc::clone(&phases);
        let state = Arc::clone(&state);
        service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let (state, conn, cors) = (Arc::clone(&state), conn.clone(), Arc::clone(&cors));
            let in_flight = phases.request();
            async move {
                let origin = req.headers().get(hyper::header::ORIGIN).cloned();
                let mut response = match serve {
                    Serve::UseHttps => plain::use_https(&req),
                    Serve::OverBudget(_) if frees_or_reads_held(&req) => {
                        routes::handle(state, conn, req).await
                    }
                    Serve::OverBudget(full) => {
                        refusals::answer_refusal(&state, full).into_response()
                    }
                    Serve::Api if cors::is_preflight(&req) => cors::preflight(&cors, &req),
                    Serve::Api => routes::handle(state, conn, req).await,
                };
                cors::decorate(&cors, origin.as_ref(), response.headers_mut());
                Ok::<_, std::convert::Infallible>(
                    response.map(|body| InFlightBody::new(body, in_flight)),
                )
            }
        })
    };
    // The auto builder detects HTTP/2 by its preface whatever was negotiated (`http1_only` does
    // nothing with upgrades): `Watched` refuses a protocol other than the negotiated one, so
    // plain HTTP and TLS without ALPN `h2` are HTTP/1.1 only (no h2c, no prior knowledge), and
    // the phase clock always matches the protocol.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The phase clock times heads from their first byte; hyper's own timer starts
        // when the connection turns idle, so it is only a backstop for both phases.
        .header_read_timeout(timeouts.keep_alive.max(timeouts.first_request) + timeouts.header)
        .max_buf_size(max_header_bytes.max(8192))
        .keep_alive(true);
    // The windows bound the request-body bytes an HTTP/2 client makes the gateway hold unread;
    // a connection whose window was not charged gets the protocol's smallest.
    let (stream_window, connection_window) = match serve {
        Serve::OverBudget(_) => (H2_MIN_WINDOW, H2_MIN_WINDOW),
        _ => (
            http.http2_stream_window_bytes,
            http.http2_connection_window_bytes,
        ),
    };
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(stream_window)
        .initial_connection_window_size(connection_window)
        .max_concurrent_streams(32)
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let io = TokioIo::new(Watched::new(stream, Arc::clone(&phases)));
    let served = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(served);
    let deadline = tokio::time::sleep(lifetime);
    tokio::pin!(deadline);
    tokio::select! {
        result = served.as_mut() => {
            if phases.mismatched() {
                state.metrics.rejected("protocol_mismatch");
                tracing::debug!(http2, "the client spoke another protocol than negotiated");
            } else if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        () = &mut deadline => tracing::debug!("connection reached its maximum lifetime"),
        phase = phases.expired() => {
            tracing::debug!(phase = phase.as_str(), "idle connection timed out");
            // HTTP/2 gets GOAWAY first, and a moment to send it; HTTP/1.1 has nothing to
            // say between requests and is simply closed.
            if http2 {
                served.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(IDLE_CLOSE_GRACE, served).await;
            }
        }
        () = stopped(&mut shutdown) => {
            served.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, served).await;
        }
    }
}
