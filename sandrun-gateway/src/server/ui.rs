//! The web UI: four hand-written files (`sandrun-gateway/ui/`) compiled into the binary and
//! served same-origin at `/ui/`, and at `/` to a browser (a request whose `Accept` prefers
//! `text/html` to `application/json`; API clients keep getting the JSON service description).
//!
//! Every asset carries a strong `ETag` (a SHA-256 prefix of its bytes, so a new binary with
//! changed files is a new tag), `Cache-Control: no-cache` (revalidate each time; a match is a
//! bodyless 304), `X-Content-Type-Options: nosniff` and a Content-Security-Policy that allows
//! scripts and styles from this origin only (no inline code, no `eval`), images from this origin
//! and from `blob:` (output previews), and connections to this origin (fetch and the WebSocket).
//! `docs/web-ui.md` describes the UI and its browser tests.

use std::sync::OnceLock;

use bytes::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, ETAG, IF_NONE_MATCH, LOCATION, VARY};
use hyper::{Request, Response, StatusCode};
use sha2::{Digest, Sha256};

use crate::server::response::{body_response, bytes_response, ApiError, ApiResult, Body};

/// The policy sent with every UI asset. `connect-src 'self'` covers the same-origin `wss:`
/// WebSocket in current browsers; `blob:` images are the output previews.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   img-src 'self' blob:; connect-src 'self'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// One compiled-in file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const ASSETS: [Asset; 4] = [
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        bytes: include_bytes!("../../ui/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../ui/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../../ui/app.css"),
    },
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        bytes: include_bytes!("../../ui/icon.svg"),
    },
];

/// The ETag of each asset, in [`ASSETS`] order, computed once.
fn etags() -> &'static [HeaderValue; 4] {
    static TAGS: OnceLock<[HeaderValue; 4]> = OnceLock::new();
    TAGS.get_or_init(|| {
        ASSETS.each_ref().map(|a| {
            let digest = Sha256::digest(a.bytes);
            let tag = format!("\"{}\"", hex::encode(&digest[..12]));
            // Hex digits and quotes only: always a valid header value.
            HeaderValue::from_str(&tag).unwrap_or(HeaderValue::from_static("\"\""))
        })
    })
}

/// True when the request's `Accept` ranks `text/html` above `application/json` (a browser
/// navigating to `/`). No `Accept`, `*/*` alone or a tie keeps the JSON answer.
pub fn prefers_html<B>(req: &Request<B>) -> bool {
    let Some(accept) = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let html = quality(accept, "text/html");
    let json = quality(accept, "application/json");
    html > json
}

/// The q-value (in thousandths) `accept` gives `media`: its exact entry, else `type/*`, else
/// `*/*`, else 0.
fn quality(accept: &str, media: &str) -> u32 {
    let kind = media.split('/').next().unwrap_or("");
    let mut best: Option<(u8, u32)> = None;
    for entry in accept.split(',') {
        let mut params = entry.split(';');
        let range = params.next().unwrap_or("").trim().to_ascii_lowercase();
        let specificity = if range == media {
            3
        } else if range.strip_suffix("/*") == Some(kind) {
            2
        } else if range == "*/*" {
            1
        } else {
            continue;
        };
        let q = params
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(parse_q)
            .unwrap_or(1000);
        if best.is_none_or(|(s, _)| specificity > s) {
            best = Some((specificity, q));
        }
    }
    best.map_or(0, |(_, q)| q)
}

/// `1`, `1.0`, `0.8`, `0.125` as thousandths; anything else is not a q-value.
fn parse_q(text: &str) -> Option<u32> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u32 = match int {
        "0" => 0,
        "1" => 1000,
        _ => return None,
    };
    let padded = format!("{frac:0<3}");
    let part: u32 = padded.parse().ok()?;
    let q = whole + part;
    (q <= 1000).then_some(q)
}

/// `GET /` for a browser: the UI's page, varying by `Accept`.
pub fn index<B>(req: &Request<B>) -> Response<Body> {
    let mut response = asset_response(0, req);
    response
        .headers_mut()
        .insert(VARY, HeaderValue::from_static("Accept"));
    response
}

/// `GET /ui/{name}`; `/ui` redirects to `/ui/`, and `/ui/` is the page.
pub fn serve<B>(req: &Request<B>, name: Option<&str>) -> ApiResult {
    let Some(name) = name else {
        let mut response = Response::new(Body::new(Bytes::new()));
        *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
        response
            .headers_mut()
            .insert(LOCATION, HeaderValue::from_static("/ui/"));
        return Ok(response);
    };
    let name = if name.is_empty() { "index.html" } else { name };
    let index = ASSETS
        .iter()
        .position(|a| a.name == name)
        .ok_or_else(|| ApiError::not_found("file"))?;
    Ok(asset_response(index, req))
}

fn asset_response<B>(index: usize, req: &Request<B>) -> Response<Body> {
    let asset = &ASSETS[index];
    let etag = &etags()[index];
    let matched = req
        .headers()
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut response = if matched {
        let mut r = bytes_response(StatusCode::NOT_MODIFIED, asset.content_type, Bytes::new());
        r.headers_mut().remove(hyper::header::CONTENT_TYPE);
        r
    } else {
        body_response(
            StatusCode::OK,
            asset.content_type,
            Body::compiled_in(asset.bytes),
        )
    };
    let headers = response.headers_mut();
    headers.insert(ETAG, etag.clone());
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        hyper::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        hyper::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        hyper::header::X_FRAME_OPTIONS,
        HeaderValue::from_static("DENY"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, accept: Option<&str>) -> Request<()> {
        let mut b = Request::get(path);
        if let Some(a) = accept {
            b = b.header("accept", a);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn given_a_browser_accept_header_then_html_is_preferred() {
        let chrome = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,\
                      image/webp,*/*;q=0.8";
        assert!(prefers_html(&get("/", Some(chrome))));
        assert!(prefers_html(&get("/", Some("text/*"))));
    }

    #[test]
    fn given_an_api_client_then_json_is_kept() {
        for accept in [
            None,
            Some("*/*"),
            Some("application/json"),
            Some("text/html;q=0.5, application/json"),
            Some("text/html, application/json"),
            Some("text/html;q=0"),
        ] {
            assert!(!prefers_html(&get("/", accept)), "{accept:?}");
        }
    }

    #[test]
    fn given_an_asset_then_it_has_its_type_etag_and_policy_and_a_matching_tag_is_304() {
        let r = serve(&get("/ui/app.js", None), Some("app.js")).unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        assert_eq!(h["content-type"], "text/javascript; charset=utf-8");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert!(!h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("unsafe"));
        let tag = h["etag"].clone();
        let mut again = get("/ui/app.js", None);
        again.headers_mut().insert(IF_NONE_MATCH, tag);
        let r = serve(&again, Some("app.js")).unwrap();
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        assert!(serve(&get("/ui/x", None), Some("nope.js")).is_err());
        let page = serve(&get("/ui/", None), Some("")).unwrap();
        assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    }

    #[test]
    fn given_the_page_then_it_has_no_inline_script_or_style() {
        let html = std::str::from_utf8(ASSETS[0].bytes).unwrap();
        assert!(!html.contains("<script>") && !html.contains("style="));
        for handler in ["onclick=", "onload=", "oninput=", "onchange=", "onsubmit="] {
            assert!(!html.contains(handler), "{handler}");
        }
    }
}
