//! Plain HTTP on the TLS port. The first byte of a connection tells them apart: a TLS record
//! starts with `0x16` (handshake); anything else is taken as plain HTTP.
//!
//! A plain request is never answered with TLS bytes (which clients report as "HTTP/0.9" or a bad
//! status line). It gets a short HTTP/1.1 answer that says to use `https://`: `308 Permanent
//! Redirect` to the same path on `https://` for `GET` and `HEAD`, `400` with a JSON error for
//! other methods (a redirected upload would be sent twice). With `--dev`, a connection from a
//! loopback address is served instead, so the original clients' default `http://localhost:8443`
//! works on a developer's machine.

use hyper::header::{HeaderValue, CONNECTION, HOST, LOCATION};
use hyper::{Method, Request, Response, StatusCode};

use crate::server::response::{ApiError, Body};

/// The first byte of a TLS handshake record.
pub const TLS_HANDSHAKE: u8 = 0x16;

/// What a connection is, from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tls,
    Plain,
}

/// Classifies a connection by its first byte.
pub fn sniff(first: u8) -> Kind {
    if first == TLS_HANDSHAKE {
        Kind::Tls
    } else {
        Kind::Plain
    }
}

/// The answer to a plain HTTP request on the TLS port (when it is not served).
pub fn use_https<B>(req: &Request<B>) -> Response<Body> {
    let target = https_url(req);
    let mut response = match (req.method(), &target) {
        (&Method::GET | &Method::HEAD, Some(url)) => {
            let mut r = ApiError::new(
                StatusCode::PERMANENT_REDIRECT,
                format!("this port speaks HTTPS: use {url}"),
            )
            .into_response();
            if let Ok(location) = HeaderValue::from_str(url) {
                r.headers_mut().insert(LOCATION, location);
            }
            r
        }
        (_, Some(url)) => ApiError::bad_request(format!(
            "this port speaks HTTPS, not plain HTTP: send the request to {url}"
        ))
        .into_response(),
        (_, None) => {
            ApiError::bad_request("this port speaks HTTPS, not plain HTTP: use an https:// URL")
                .into_response()
        }
    };
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// `https://HOST/PATH?QUERY` for the request, if its `Host` is a plain host name or address
/// (nothing that could turn the `Location` into another URL).
fn https_url<B>(req: &Request<B>) -> Option<String> {
    let host = req.headers().get(HOST)?.to_str().ok()?;
    let host_ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    if !host_ok {
        return None;
    }
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    if !path.starts_with('/') || path.starts_with("//") {
        return None;
    }
    Some(format!("https://{host}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, host: &str, path: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, host)
            .body(())
            .unwrap()
    }

    #[test]
    fn given_tls_or_http_first_bytes_then_they_are_told_apart() {
        assert_eq!(sniff(0x16), Kind::Tls);
        assert_eq!(sniff(b'G'), Kind::Plain);
        assert_eq!(sniff(b'P'), Kind::Plain);
    }

    #[test]
    fn given_a_plain_get_then_it_is_redirected_to_https_with_the_same_path() {
        let r = use_https(&request(Method::GET, "localhost:8443", "/status/abc?x=1"));
        assert_eq!(r.status(), 308);
        assert_eq!(
            r.headers()[LOCATION],
            "https://localhost:8443/status/abc?x=1"
        );
        assert_eq!(r.headers()[CONNECTION], "close");
    }

    #[test]
    fn given_a_plain_post_or_a_strange_host_then_the_answer_is_400() {
        let r = use_https(&request(Method::POST, "localhost:8443", "/submit"));
        assert_eq!(r.status(), 400);
        let r = use_https(&request(Method::GET, "evil.test/x?", "/"));
        assert_eq!(r.status(), 400);
        assert!(!r.headers().contains_key(LOCATION));
    }
}
