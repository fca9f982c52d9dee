//! The bound on uploads in progress at once (`max_concurrent_uploads`): past it an upload waits
//! for a slot up to `upload_wait_ms`, then gets 503 with `Retry-After`.

mod support;

use bytes::Bytes;
use hyper::StatusCode;
use support::{Multipart, TestGateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The test's own address, made a trusted proxy so that [`HalfSent`] can be another client
/// (`X-Forwarded-For`): each client's share of one slot is the whole pool, and the global bound
/// is what these tests are about.
const PROXY: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// An upload whose body has only partly arrived: its connection and the rest of its body.
struct HalfSent {
    tls: TlsStream<TcpStream>,
    rest: Bytes,
}

impl HalfSent {
    /// Sends the head and the first half of `form`'s body, then waits until the gateway counts
    /// the upload as in progress.
    async fn start(gw: &TestGateway, form: &Multipart) -> HalfSent {
        let body = form.body();
        let mut tls = gw.tls().await;
        let head = format!(
            "POST /submit HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 192.0.2.1\r\n\
             Content-Type: multipart/form-data; boundary={}\r\nContent-Length: {}\r\n\r\n",
            form.boundary,
            body.len()
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        let half = body.len() / 2;
        tls.write_all(&body[..half]).await.unwrap();
        tls.flush().await.unwrap();
        while gw.state.uploads.in_progress() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        HalfSent {
            tls,
            rest: body.slice(half..),
        }
    }

    /// Sends the rest of the body; returns the response's status line.
    async fn finish(mut self) -> String {
        self.tls.write_all(&self.rest).await.unwrap();
        self.tls.flush().await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = self.tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "the gateway closed before answering");
            answer.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&answer);
        text.lines().next().unwrap_or_default().to_owned()
    }
}

#[tokio::test]
async fn given_all_upload_slots_taken_when_none_frees_up_then_503_json_with_retry_after() {
    let gw = TestGateway::start_with(|c| {
        c.max_concurrent_uploads = 1;
        c.upload_wait_ms = 50;
        c.client_limits.concurrent_jobs = 10;
        c.trusted_proxies = vec![PROXY];
    })
    .await;
    let slow = HalfSent::start(&gw, &Multipart::script("out slow")).await;
    let refused = gw.submit(&Multipart::script("out refused")).await;
    let message = refused.assert_error(StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains("too many uploads"), "{message}");
    assert!(refused.header("retry-after").is_some());
    assert!(gw.state.metrics.rejections("uploads_busy") >= 1);
    assert!(gw
        .get("/metrics")
        .await
        .text()
        .contains("sandrun_gateway_uploads_in_progress 1"));
    // The slow upload still completes, and its slot is then free for the next one.
    assert!(slow.finish().await.contains("200"));
    assert_eq!(gw.state.uploads.in_progress(), 0);
    gw.submit_script("out after").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn given_an_upload_waiting_for_a_slot_when_one_frees_up_then_it_is_accepted() {
    let gw = std::sync::Arc::new(
        TestGateway::start_with(|c| {
            c.max_concurrent_uploads = 1;
            c.upload_wait_ms = 3_600_000;
            c.client_limits.concurrent_jobs = 10;
            c.trusted_proxies = vec![PROXY];
        })
        .await,
    );
    let slow = HalfSent::start(&gw, &Multipart::script("out slow")).await;
    let waiter = {
        let gw = std::sync::Arc::clone(&gw);
        tokio::spawn(async move { gw.submit(&Multipart::script("out waited")).await })
    };
    while gw.state.uploads.waiting() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(slow.finish().await.contains("200"));
    let reply = waiter.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(gw.state.metrics.rejections("uploads_busy"), 0);
}
