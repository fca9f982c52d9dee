//! The request body as a stream of data chunks, with a stall timeout between chunks (a client
//! that trickles its upload is cut off instead of holding a connection forever).

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// Why reading the body stopped.
#[derive(Debug)]
pub enum BodyError {
    Stalled(Duration),
    Read(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Stalled(d) => write!(f, "request body stalled for {} s", d.as_secs()),
            BodyError::Read(e) => write!(f, "reading the request body: {e}"),
        }
    }
}

impl std::error::Error for BodyError {}

pub type TimedBody = Pin<Box<dyn Stream<Item = Result<Bytes, BodyError>> + Send>>;

/// Data frames of `body`; an error once no frame arrived for `idle`. Trailers are ignored.
pub fn timed_body(body: Incoming, idle: Duration) -> TimedBody {
    Box::pin(futures_util::stream::unfold(
        Some(body),
        move |state| async move {
            let mut body = state?;
            loop {
                match tokio::time::timeout(idle, body.frame()).await {
                    Err(_) => return Some((Err(BodyError::Stalled(idle)), None)),
                    Ok(None) => return None,
                    Ok(Some(Err(e))) => return Some((Err(BodyError::Read(e.to_string())), None)),
                    Ok(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            return Some((Ok(data), Some(body)));
                        }
                    }
                }
            }
        },
    ))
}
