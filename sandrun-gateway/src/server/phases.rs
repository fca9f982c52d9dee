//! Timeouts for the phases of a connection after its TLS handshake, so that no connection holds
//! a slot with no request in progress:
//! - first request: from the handshake to the first byte of the first request (HTTP/1.1), or to
//!   the first stream (HTTP/2);
//! - request head (HTTP/1.1): from the first byte of a head to its end;
//! - keep-alive (HTTP/1.1): from the end of a response to the first byte of the next request;
//! - HTTP/2 idle: no open stream; PINGs, SETTINGS and WINDOW_UPDATEs are not activity.
//!
//! While a request is in flight (from the moment its head is complete until its response body
//! has been written, or dropped) none of these runs: bodies have their own clocks
//! (`server::body`), and a connection has a maximum lifetime.
//!
//! [`Phases`] is the shared state: the service marks requests in flight with [`Phases::request`]
//! (the mark travels with the response body, [`InFlightBody`]), and [`Watched`] wraps the
//! connection's byte stream to see the first byte of a head. [`Phases::expired`] resolves when
//! the phase the connection is in has lasted too long.
//!
//! The clock is chosen from what the connection negotiated (ALPN `h2` over TLS, HTTP/1.1
//! otherwise), so the protocol spoken must be that one: [`Watched`] compares the first bytes with
//! the HTTP/2 connection preface and ends the connection with an error when they disagree (an
//! HTTP/2 preface without ALPN `h2`, prior knowledge or h2c, or HTTP/1.1 after ALPN `h2`).
//! Otherwise hyper's version detection would serve HTTP/2 timed by the HTTP/1.1 clock (or the
//! reverse).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

/// How long each idle phase may last.
#[derive(Debug, Clone, Copy)]
pub struct PhaseTimeouts {
    pub first_request: Duration,
    pub header: Duration,
    pub keep_alive: Duration,
    pub http2_idle: Duration,
}

/// The phase whose timeout ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    FirstRequest,
    Header,
    KeepAlive,
    Http2Idle,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::FirstRequest => "first_request",
            Phase::Header => "header",
            Phase::KeepAlive => "keep_alive",
            Phase::Http2Idle => "http2_idle",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct State {
    in_flight: usize,
    requests: u64,
    /// When the last request in flight ended (or the connection started).
    idle_since: Instant,
    /// When the first byte after `idle_since` arrived (HTTP/1.1 only).
    head_started: Option<Instant>,
    /// The client spoke another protocol than the one negotiated.
    mismatched: bool,
}

/// One connection's phase clock.
#[derive(Debug)]
pub struct Phases {
    timeouts: PhaseTimeouts,
    http2: bool,
    state: watch::Sender<State>,
}

impl Phases {
    /// A connection whose TLS handshake just completed; `http2` if it negotiated `h2`.
    pub fn new(timeouts: PhaseTimeouts, http2: bool) -> Arc<Phases> {
        let state = State {
            in_flight: 0,
            requests: 0,
            idle_since: Instant::now(),
            head_started: None,
            mismatched: false,
        };
        Arc::new(Phases {
            timeouts,
            http2,
            state: watch::Sender::new(state),
        })
    }

    /// Marks a request in flight until the returned mark is dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.state.send_modify(|s| {
            s.in_flight += 1;
            s.requests += 1;
            s.head_started = None;
        });
        InFlight(Arc::clone(self))
    }

    /// Whether the client was cut off for speaking another protocol than the negotiated one.
    pub fn mismatched(&self) -> bool {
        self.state.borrow().mismatched
    }

    /// Bytes arrived from the client: on an idle HTTP/1.1 connection, a request head began.
    fn bytes_arrived(&self) {
        if self.http2 {
            return;
        }
        self.state.send_if_modified(|s| {
            let starts = s.in_flight == 0 && s.head_started.is_none();
            if starts {
                s.head_started = Some(Instant::now());
            }
            starts
        });
    }

    /// When the current phase runs out, and which phase it is; `None` while a request is in
    /// flight.
    fn deadline(&self, s: &State) -> Option<(Instant, Phase)> {
        if s.in_flight > 0 {
            return None;
        }
        let t = &self.timeouts;
        let (from, limit, phase) = match (s.head_started, s.requests, self.http2) {
            (Some(at), _, _) => (at, t.header, Phase::Header),
            (None, 0, _) => (s.idle_since, t.first_request, Phase::FirstRequest),
            (None, _, true) => (s.idle_since, t.http2_idle, Phase::Http2Idle),
            (None, _, false) => (s.idle_since, t.keep_alive, Phase::KeepAlive),
        };
        Some((from.checked_add(limit)?, phase))
    }

    /// Resolves once the connection has stayed in one idle phase for longer than its timeout.
    pub async fn expired(&self) -> Phase {
        let mut changes = self.state.subscribe();
        loop {
            let next = self.deadline(&changes.borrow_and_update());
            match next {
                Some((at, phase)) => tokio::select! {
                    () = tokio::time::sleep_until(at) => {
                        // Checked again: a request may have started in the same instant.
                        let now = self.deadline(&self.state.borrow());
                        if now.is_some_and(|(at, _)| at <= Instant::now()) {
                            return phase;
                        }
                    }
                    _ = changes.changed() => {}
                },
                // The sender lives in `self`, so `changed` only fails if it is gone: never.
                None => {
                    if changes.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
}

/// A request in flight; dropping it ends the request for the phase clock.
#[derive(Debug)]
pub struct InFlight(Arc<Phases>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.state.send_modify(|s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 {
                s.idle_since = Instant::now();
                s.head_started = None;
            }
        });
    }
}

/// A response body that keeps its request in flight until hyper has written it (or dropped it).
#[derive(Debug)]
pub struct InFlightBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> InFlightBody<B> {
    pub fn new(inner: B, in_flight: InFlight) -> InFlightBody<B> {
        InFlightBody {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The HTTP/2 connection preface (RFC 9113, 3.4), the first bytes of every HTTP/2 connection.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection say about its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sniff {
    /// This many bytes matched the HTTP/2 preface so far.
    Matching(usize),
    /// Decided: the connection speaks HTTP/2 (`true`) or not.
    Decided(bool),
}

impl Sniff {
    /// Looks at the next bytes the client sent.
    fn feed(self, bytes: &[u8]) -> Sniff {
        let Sniff::Matching(mut matched) = self else {
            return self;
        };
        for &b in bytes {
            if b != H2_PREFACE[matched] {
                return Sniff::Decided(false);
            }
            matched += 1;
            if matched == H2_PREFACE.len() {
                return Sniff::Decided(true);
            }
        }
        Sniff::Matching(matched)
    }
}

/// The connection's byte stream, reporting to [`Phases`] when bytes arrive, and refusing a
/// protocol other than the negotiated one (see the module documentation).
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    phases: Arc<Phases>,
    sniff: Sniff,
}

impl<S> Watched<S> {
    pub fn new(inner: S, phases: Arc<Phases>) -> Watched<S> {
        Watched {
            inner,
            phases,
            sniff: Sniff::Matching(0),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            if let Sniff::Matching(_) = this.sniff {
                this.sniff = this.sniff.feed(&buf.filled()[before..]);
                if let Sniff::Decided(http2) = this.sniff {
                    if http2 != this.phases.http2 {
                        this.phases.state.send_modify(|s| s.mismatched = true);
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            if http2 {
                                "an HTTP/2 preface without ALPN h2"
                            } else {
                                "not HTTP/2 after ALPN h2"
                            },
                        )));
                    }
                }
            }
            this.phases.bytes_arrived();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> PhaseTimeouts {
        PhaseTimeouts {
            first_request: Duration::from_secs(1),
            header: Duration::from_secs(2),
            keep_alive: Duration::from_secs(3),
            http2_idle: Duration::from_secs(4),
        }
    }

    async fn expires_after(phases: &Phases) -> (Phase, Duration) {
        let started = Instant::now();
        let phase = phases.expired().await;
        (phase, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn given_http1_phases_then_each_runs_out_after_its_own_timeout() {
        let phases = Phases::new(timeouts(), false);
        assert_eq!(
            expires_after(&phases).await,
            (Phase::FirstRequest, Duration::from_secs(1))
        );
        drop(phases.request());
        assert_eq!(
            expires_after(&phases).await,
            (Phase::KeepAlive, Duration::from_secs(3))
        );
        phases.bytes_arrived();
        assert_eq!(
            expires_after(&phases).await,
            (Phase::Header, Duration::from_secs(2))
        );
    }

    #[test]
    fn given_first_bytes_then_the_sniffer_tells_the_http2_preface_from_anything_else() {
        let start = Sniff::Matching(0);
        assert_eq!(start.feed(H2_PREFACE), Sniff::Decided(true));
        let split = start.feed(&H2_PREFACE[..10]);
        assert_eq!(split, Sniff::Matching(10));
        assert_eq!(split.feed(&H2_PREFACE[10..]), Sniff::Decided(true));
        assert_eq!(start.feed(b"PRI * HTTP/1.1\r\n"), Sniff::Decided(false));
        assert_eq!(start.feed(b"GET / HTTP/1.1\r\n"), Sniff::Decided(false));
        assert_eq!(
            Sniff::Decided(false).feed(H2_PREFACE),
            Sniff::Decided(false)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn given_a_request_in_flight_then_nothing_expires_until_it_ends() {
        let phases = Phases::new(timeouts(), true);
        let request = phases.request();
        let waited = tokio::time::timeout(Duration::from_secs(3600), phases.expired()).await;
        assert!(waited.is_err(), "expired while a request was in flight");
        drop(request);
        // Bytes (PINGs) do not count on HTTP/2.
        phases.bytes_arrived();
        assert_eq!(
            expires_after(&phases).await,
            (Phase::Http2Idle, Duration::from_secs(4))
        );
    }
}
