//! Cross-origin access for browser clients (the original Sandrun's web frontends call the API
//! from another origin): `Access-Control-Allow-Origin` on every response, and `OPTIONS`
//! preflights answered for the methods and headers the API uses.
//!
//! `cors_allowed_origins` in the configuration lists the origins allowed; the default, `["*"]`,
//! is what the original sent on every response. The API has no cookies or other credentials, so
//! `*` never lets one site act with another's authority; `Access-Control-Allow-Credentials` is
//! never sent.

use hyper::header::{HeaderMap, HeaderValue, ORIGIN, VARY};
use hyper::{Method, Request, Response, StatusCode};

use crate::server::response::{ApiError, Body};

/// Methods the API answers.
const ALLOW_METHODS: &str = "GET, POST, DELETE, OPTIONS";
/// Request headers a browser client may send beyond the CORS-safelisted ones.
const ALLOW_HEADERS: &str = "Content-Type, Accept, Accept-Language, Content-Language, \
                             Cache-Control, X-Requested-With";
/// Response headers a browser client may read beyond the CORS-safelisted ones.
const EXPOSE_HEADERS: &str = "Content-Disposition, Content-Length, Retry-After, RateLimit-Limit, \
                              RateLimit-Remaining, RateLimit-Reset, Allow";
/// Seconds a browser may cache a preflight answer.
const MAX_AGE_S: &str = "600";

/// The configured origins, checked once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// `*`: every origin.
    Any,
    /// Exactly these `scheme://host[:port]` origins.
    List(Vec<String>),
}

impl AllowedOrigins {
    /// Parses `cors_allowed_origins`: `["*"]`, or origins such as `https://app.example.org`.
    pub fn parse(entries: &[String]) -> Result<AllowedOrigins, String> {
        if entries.iter().any(|e| e == "*") {
            return if entries.len() == 1 {
                Ok(AllowedOrigins::Any)
            } else {
                Err("cors_allowed_origins: \"*\" must be the only entry".to_owned())
            };
        }
        for e in entries {
            if !is_origin(e) {
                return Err(format!(
                    "cors_allowed_origins: {e:?} is not an origin (expected \
                     \"https://host[:port]\" or \"http://host[:port]\", no path, or \"*\")"
                ));
            }
        }
        Ok(AllowedOrigins::List(entries.to_vec()))
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`, if it is allowed.
    fn allow(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        match self {
            AllowedOrigins::Any => Some(HeaderValue::from_static("*")),
            AllowedOrigins::List(list) => {
                let origin = origin?;
                let text = origin.to_str().ok()?;
                list.iter().any(|o| o == text).then(|| origin.clone())
            }
        }
    }
}

/// `scheme://host[:port]` with an http(s) scheme and nothing after the authority.
fn is_origin(text: &str) -> bool {
    let Some(authority) = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
    else {
        return false;
    };
    !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

/// Whether `req` is a CORS preflight (or any `OPTIONS` request): answered here, never routed.
pub fn is_preflight<B>(req: &Request<B>) -> bool {
    req.method() == Method::OPTIONS
}

/// The answer to an `OPTIONS` request: 204 with the allowed methods and headers, or 403 naming
/// the configuration key when the origin is not allowed.
pub fn preflight<B>(allowed: &AllowedOrigins, req: &Request<B>) -> Response<Body> {
    let origin = req.headers().get(ORIGIN);
    let allow_origin = allowed.allow(origin);
    if origin.is_some() && allow_origin.is_none() {
        let mut refused = ApiError::new(
            StatusCode::FORBIDDEN,
            "this origin is not allowed to call the API: add it to cors_allowed_origins in the \
             gateway's configuration",
        )
        .into_response();
        refused
            .headers_mut()
            .insert(VARY, HeaderValue::from_static("Origin"));
        return refused;
    }
    let mut response = Response::new(Body::default());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    let put = |h: &mut HeaderMap, name: &'static str, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    put(headers, "allow", ALLOW_METHODS);
    put(headers, "access-control-allow-methods", ALLOW_METHODS);
    put(headers, "access-control-allow-headers", ALLOW_HEADERS);
    put(headers, "access-control-max-age", MAX_AGE_S);
    decorate(allowed, origin, headers);
    response
}

/// Adds the CORS headers to an answer to a request that carried `origin` (if any).
pub fn decorate(allowed: &AllowedOrigins, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
    if let Some(value) = allowed.allow(origin) {
        headers.insert("access-control-allow-origin", value);
        headers.insert(
            "access-control-expose-headers",
            HeaderValue::from_static(EXPOSE_HEADERS),
        );
    }
    if matches!(allowed, AllowedOrigins::List(_)) {
        headers.append(VARY, HeaderValue::from_static("Origin"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, origin: Option<&str>) -> Request<()> {
        let mut b = Request::builder().method(method).uri("/submit");
        if let Some(o) = origin {
            b = b.header(ORIGIN, o);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn given_the_default_then_every_origin_gets_a_star() {
        let any = AllowedOrigins::parse(&["*".to_owned()]).unwrap();
        let mut h = HeaderMap::new();
        decorate(&any, None, &mut h);
        assert_eq!(h["access-control-allow-origin"], "*");
        let r = preflight(&any, &request(Method::OPTIONS, Some("http://x.test")));
        assert_eq!(r.status(), 204);
        assert_eq!(r.headers()["access-control-allow-origin"], "*");
        assert!(r.headers()["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST"));
    }

    #[test]
    fn given_a_list_then_only_listed_origins_are_echoed_and_others_refused_by_name() {
        let list = AllowedOrigins::parse(&["https://app.example.org".to_owned()]).unwrap();
        let ok = HeaderValue::from_static("https://app.example.org");
        let mut h = HeaderMap::new();
        decorate(&list, Some(&ok), &mut h);
        assert_eq!(h["access-control-allow-origin"], "https://app.example.org");
        assert_eq!(h[VARY], "Origin");
        let mut h = HeaderMap::new();
        decorate(
            &list,
            Some(&HeaderValue::from_static("https://evil.test")),
            &mut h,
        );
        assert!(!h.contains_key("access-control-allow-origin"));
        let r = preflight(&list, &request(Method::OPTIONS, Some("https://evil.test")));
        assert_eq!(r.status(), 403);
    }

    #[test]
    fn given_bad_entries_then_parsing_refuses_them() {
        for bad in [
            vec!["app.example.org".to_owned()],
            vec!["https://a.test/path".to_owned()],
            vec!["*".to_owned(), "https://a.test".to_owned()],
        ] {
            assert!(AllowedOrigins::parse(&bad).is_err(), "{bad:?}");
        }
    }
}
