//! The request body as a stream of data chunks, with two clocks so that a client that trickles
//! its upload is cut off instead of holding a connection (and an upload slot) forever:
//! - a stall timeout between two chunks;
//! - a minimum average rate after a grace period: the body must have sent `rate * (t - grace)`
//!   bytes by time `t`, i.e. each byte received pushes the deadline back by `1 / rate` seconds.
//!   A drip of one byte every few seconds, which never stalls, falls behind and is refused.
//!
//! Which clock stopped the body is kept in a [`BodyVerdict`], so the handler can answer 408
//! even when the parser only saw an opaque read error.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

/// Why reading the body stopped.
#[derive(Debug, Clone)]
pub enum BodyError {
    Stalled(Duration),
    TooSlow { min_bytes_per_s: u64 },
    Read(String),
}

impl BodyError {
    /// Whether the client was too slow (answered 408) rather than broken.
    pub fn is_timeout(&self) -> bool {
        matches!(self, BodyError::Stalled(_) | BodyError::TooSlow { .. })
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Stalled(d) => write!(f, "request body stalled for {} s", d.as_secs()),
            BodyError::TooSlow { min_bytes_per_s } => write!(
                f,
                "request body too slow: below the minimum of {min_bytes_per_s} bytes per second"
            ),
            BodyError::Read(e) => write!(f, "reading the request body: {e}"),
        }
    }
}

impl std::error::Error for BodyError {}

pub type TimedBody = Pin<Box<dyn Stream<Item = Result<Bytes, BodyError>> + Send>>;

/// How fast a body must arrive.
#[derive(Debug, Clone, Copy)]
pub struct BodyPace {
    /// Longest gap between two chunks.
    pub idle: Duration,
    /// Time before the minimum rate applies.
    pub grace: Duration,
    /// Minimum average rate after the grace period (at least 1).
    pub min_bytes_per_s: u64,
}

impl BodyPace {
    /// A pace with no minimum rate worth speaking of: only the stall timeout applies (small
    /// drains of refused bodies, bounded by their own time limit).
    pub fn idle_only(idle: Duration) -> BodyPace {
        BodyPace {
            idle,
            grace: Duration::MAX,
            min_bytes_per_s: 1,
        }
    }

    /// When a body that started at `start` and has sent `received` bytes falls behind.
    fn rate_deadline(&self, start: Instant, received: u64) -> Option<Instant> {
        let nanos = u128::from(received) * 1_000_000_000 / u128::from(self.min_bytes_per_s.max(1));
        let earned = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        start.checked_add(self.grace.checked_add(earned)?)
    }
}

/// What stopped a body, set once by the body stream.
#[derive(Debug, Clone, Default)]
pub struct BodyVerdict(Arc<OnceLock<BodyError>>);

impl BodyVerdict {
    /// The error that ended the body, if one did.
    pub fn error(&self) -> Option<&BodyError> {
        self.0.get()
    }
}

/// Data frames of `body` at `pace`; an error once a clock runs out, or when the body ends short
/// of its declared `Content-Length`. Trailers are ignored.
pub fn timed_body(body: Incoming, pace: BodyPace, verdict: &BodyVerdict) -> TimedBody {
    let verdict = verdict.clone();
    let start = Instant::now();
    let declared = hyper::body::Body::size_hint(&body).exact();
    Box::pin(futures_util::stream::unfold(
        Some((body, 0u64)),
        move |state| {
            let verdict = verdict.clone();
            async move {
                let (mut body, mut received) = state?;
                let fail = |e: BodyError| {
                    let _ = verdict.0.set(e.clone());
                    Some((Err(e), None))
                };
                loop {
                    let idle_at = Instant::now() + pace.idle;
                    let rate_at = pace.rate_deadline(start, received);
                    let (at, slow) = match rate_at {
                        Some(r) if r < idle_at => (r, true),
                        _ => (idle_at, false),
                    };
                    match tokio::time::timeout_at(at, body.frame()).await {
                        Err(_) if slow => {
                            return fail(BodyError::TooSlow {
                                min_bytes_per_s: pace.min_bytes_per_s,
                            })
                        }
                        Err(_) => return fail(BodyError::Stalled(pace.idle)),
                        Ok(None) => return ended_short(declared, received).and_then(fail),
                        Ok(Some(Err(e))) => return fail(BodyError::Read(e.to_string())),
                        Ok(Some(Ok(frame))) => {
                            if let Ok(data) = frame.into_data() {
                                let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
                                received = received.saturating_add(len);
                                return Some((Ok(data), Some((body, received))));
                            }
                        }
                    }
                }
            }
        },
    ))
}

/// A body that ends before its declared length was cut off by the peer. hyper reports an HTTP/2
/// stream reset with NO_ERROR (meant for early responses) as a normal end, so without this check
/// a truncated upload would reach the parser as a complete body, and the client would be told its
/// multipart data was malformed instead of incomplete.
fn ended_short(declared: Option<u64>, received: u64) -> Option<BodyError> {
    let declared = declared.filter(|&d| received < d)?;
    Some(BodyError::Read(format!(
        "the client ended the body after {received} of its {declared} declared bytes"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_body_ending_short_of_its_length_then_it_is_a_read_error_naming_both() {
        assert!(
            ended_short(None, 5).is_none(),
            "no declared length: any end is the end"
        );
        assert!(ended_short(Some(5), 5).is_none());
        let short = ended_short(Some(312), 0).expect("short body accepted");
        assert!(!short.is_timeout());
        assert!(short.to_string().contains("after 0 of its 312"), "{short}");
    }

    #[test]
    fn given_bytes_received_then_each_pushes_the_rate_deadline_back() {
        let pace = BodyPace {
            idle: Duration::from_secs(30),
            grace: Duration::from_secs(10),
            min_bytes_per_s: 1000,
        };
        let start = Instant::now();
        assert_eq!(
            pace.rate_deadline(start, 0),
            Some(start + Duration::from_secs(10))
        );
        assert_eq!(
            pace.rate_deadline(start, 2500),
            Some(start + Duration::from_millis(12_500))
        );
        assert_eq!(BodyPace::idle_only(pace.idle).rate_deadline(start, 0), None);
    }
}
