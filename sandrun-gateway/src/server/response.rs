//! Responses: every body is JSON built by serde (never by hand), and every error is
//! `{"error": "..."}` with the status that says whose fault it is.

use std::time::Duration;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde::Serialize;

use crate::budget::SharedReservation;
use crate::ratelimit::QuotaHeader;

/// Bytes of a body handed to the connection at a time. The connection asks for the next chunk
/// only when it has room, so a body's memory charge lasts until at most this much (plus the
/// connection's write buffer) is left unsent.
pub const BODY_CHUNK_BYTES: usize = 64 * 1024;

/// A response body: bytes sent in [`BODY_CHUNK_BYTES`] chunks, optionally holding the memory
/// charge of what it sends until it is finished or dropped (the connection closed).
#[derive(Debug, Default)]
pub struct Body {
    data: Bytes,
    held: Option<SharedReservation>,
    /// The bytes are part of the binary (the web UI's files): nothing is held for the caller.
    compiled_in: bool,
}

impl Body {
    pub fn new(data: Bytes) -> Body {
        Body {
            data,
            held: None,
            compiled_in: false,
        }
    }

    /// A body of bytes compiled into the binary, which no caller can make the gateway hold.
    pub fn compiled_in(data: &'static [u8]) -> Body {
        Body {
            data: Bytes::from_static(data),
            held: None,
            compiled_in: true,
        }
    }

    /// Keeps `held` charged until the last chunk is handed to the connection or the body is
    /// dropped.
    pub fn hold(&mut self, held: SharedReservation) {
        self.held = Some(held);
    }

    /// The bytes this body holds for its caller that no charge covers yet: `None` when it
    /// already holds a charge (a job's data, a charged answer), is compiled in, or is empty.
    pub fn uncharged_bytes(&self) -> Option<u64> {
        let covered = self.held.is_some() || self.compiled_in || self.data.is_empty();
        (!covered).then_some(self.data.len() as u64)
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.data.is_empty() {
            self.held = None;
            return Poll::Ready(None);
        }
        let n = self.data.len().min(BODY_CHUNK_BYTES);
        let chunk = self.data.split_to(n);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.len() as u64)
    }
}

/// An error answer. 4xx: the caller's fault; 503: load; 500: a bug in the gateway.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, format!("{what} not found"))
    }

    pub fn method_not_allowed(allow: &'static str) -> ApiError {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            .with_header(hyper::header::ALLOW, HeaderValue::from_static(allow))
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(message: impl Into<String>, retry_after: Duration) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message).with_retry_after(retry_after)
    }

    /// A bug: the message goes to the log, the client sees a generic text.
    pub fn internal(context: &str) -> ApiError {
        tracing::error!(context, "internal error while answering a request");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> ApiError {
        self.headers.push((name, value));
        self
    }

    pub fn with_retry_after(self, after: Duration) -> ApiError {
        let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        self.with_header(RETRY_AFTER, HeaderValue::from(seconds.max(1)))
    }

    pub fn with_quota(mut self, quota: QuotaHeader) -> ApiError {
        self.headers.extend(quota_headers(quota));
        self
    }

    pub fn into_response(self) -> Response<Body> {
        #[derive(Serialize)]
        struct ErrorBody<'a> {
            error: &'a str,
        }
        let mut response = json(
            self.status,
            &ErrorBody {
                error: &self.message,
            },
        );
        response.headers_mut().extend(self.headers);
        response
    }
}

/// The `RateLimit-*` headers (IETF draft: limit, remaining, seconds to reset).
pub fn quota_headers(quota: QuotaHeader) -> Vec<(HeaderName, HeaderValue)> {
    vec![
        (
            HeaderName::from_static("ratelimit-limit"),
            HeaderValue::from(quota.limit),
        ),
        (
            HeaderName::from_static("ratelimit-remaining"),
            HeaderValue::from(quota.remaining),
        ),
        (
            HeaderName::from_static("ratelimit-reset"),
            HeaderValue::from(quota.reset_s),
        ),
    ]
}

/// A JSON response. Serialization of our own types cannot fail; if it did, that is a 500.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => bytes_response(status, "application/json", Bytes::from(body)),
        Err(e) => {
            tracing::error!(error = %e, "serializing a response");
            let body = Bytes::from_static(br#"{"error":"internal error"}"#);
            bytes_response(StatusCode::INTERNAL_SERVER_ERROR, "application/json", body)
        }
    }
}

pub fn bytes_response(status: StatusCode, content_type: &str, body: Bytes) -> Response<Body> {
    body_response(status, content_type, Body::new(body))
}

pub fn body_response(status: StatusCode, content_type: &str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let value = HeaderValue::from_str(content_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, value);
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    response
}

pub type ApiResult = Result<Response<Body>, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::MemoryBudget;
    use crate::ratelimit::ClientKey;
    use http_body_util::BodyExt;

    fn held_body(len: usize) -> (Body, std::sync::Arc<MemoryBudget>) {
        let budget = MemoryBudget::new(1 << 30, 1 << 30);
        let held =
            SharedReservation::new(budget.reserve(ClientKey::V4([10, 0, 0, 1]), 1000).unwrap());
        let mut body = Body::new(Bytes::from(vec![7u8; len]));
        body.hold(held);
        (body, budget)
    }

    #[test]
    fn given_a_held_body_then_it_is_sent_in_chunks_and_the_charge_lasts_until_the_last_one() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (mut body, budget) = held_body(2 * BODY_CHUNK_BYTES + 1);
        let mut sizes = Vec::new();
        rt.block_on(async {
            while let Some(frame) = body.frame().await {
                assert_eq!(budget.used(), 1000, "charged while chunks are left");
                sizes.push(frame.unwrap().into_data().unwrap().len());
            }
        });
        assert_eq!(sizes, [BODY_CHUNK_BYTES, BODY_CHUNK_BYTES, 1]);
        assert_eq!(budget.used(), 0, "released after the last chunk");
    }

    #[test]
    fn given_a_held_body_dropped_midway_then_the_charge_is_released() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (mut body, budget) = held_body(3 * BODY_CHUNK_BYTES);
        rt.block_on(async { body.frame().await });
        assert_eq!(budget.used(), 1000);
        drop(body);
        assert_eq!(budget.used(), 0, "a dropped connection releases it");
    }
}
