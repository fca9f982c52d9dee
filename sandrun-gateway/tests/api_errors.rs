//! Bad input of every kind gets the right status and a JSON `{"error"}` body, and the gateway
//! stays up afterwards.

mod support;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use support::{build, Multipart, TestGateway};

async fn still_healthy(gw: &TestGateway) {
    assert_eq!(gw.get("/health").await.json()["status"], "healthy");
}

#[tokio::test]
async fn given_unknown_ids_and_paths_then_404_json() {
    let gw = TestGateway::start().await;
    for path in [
        "/status/0123456789abcdef0123456789abcdef",
        "/status/not-an-id",
        "/status/..%2F..%2Fetc%2Fpasswd",
        "/logs/0123456789ABCDEF0123456789ABCDEF",
        "/outputs/x",
        "/download/x",
        "/download/0123456789abcdef0123456789abcdef/a.txt",
        "/nope",
        "/status",
    ] {
        gw.get(path).await.assert_error(StatusCode::NOT_FOUND);
    }
    gw.delete("/jobs/0123456789abcdef0123456789abcdef")
        .await
        .assert_error(StatusCode::NOT_FOUND);
    let id = gw.submit_script("file a.txt x").await;
    gw.wait_finished(&id).await;
    gw.get(&format!("/download/{id}/missing.txt"))
        .await
        .assert_error(StatusCode::NOT_FOUND);
    still_healthy(&gw).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn given_wrong_methods_then_405_with_allow_header() {
    let gw = TestGateway::start().await;
    let cases = [
        (Method::GET, "/submit", "POST"),
        (Method::POST, "/health", "GET"),
        (
            Method::PUT,
            "/status/0123456789abcdef0123456789abcdef",
            "GET",
        ),
        (
            Method::GET,
            "/jobs/0123456789abcdef0123456789abcdef",
            "DELETE",
        ),
        (Method::DELETE, "/", "GET"),
    ];
    for (method, path, allow) in cases {
        let reply = gw.request(build(method, path, &[], Bytes::new())).await;
        reply.assert_error(StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(reply.header("allow"), Some(allow), "{path}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn given_bad_uploads_then_400_413_415_naming_the_problem() {
    let gw = TestGateway::start_with(|c| c.max_body_bytes = 64 * 1024).await;
    let post = |ct: &'static str, body: Vec<u8>| {
        build(
            Method::POST,
            "/submit",
            &[("content-type", ct)],
            Bytes::from(body),
        )
    };
    let reply = gw.request(post("application/json", b"{}".to_vec())).await;
    reply.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let bad_manifest = Multipart::new()
        .file("main.py", b"out x")
        .manifest(r#"{"entrypoint": "main.py", "memory_mb": 999999}"#);
    let message = gw
        .submit(&bad_manifest)
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    assert!(message.contains("memory_mb"), "{message}");

    let unknown = Multipart::new()
        .file("main.py", b"x")
        .manifest(r#"{"entrypoint": "main.py", "colour": 1}"#);
    let message = gw
        .submit(&unknown)
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    assert!(message.contains("colour"), "{message}");

    let slip = support::zip(&[("../evil.py", b"x")]);
    let message = gw
        .submit(&Multipart::new().file("a.zip", &slip))
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    assert!(message.contains("evil.py"), "{message}");

    let reply = gw
        .request(post(
            "multipart/form-data; boundary=abc",
            b"--abc\r\ngarbage".to_vec(),
        ))
        .await;
    reply.assert_error(StatusCode::BAD_REQUEST);

    let huge = Multipart::new().file("main.py", &vec![b'x'; 100 * 1024]);
    gw.submit(&huge)
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE);

    assert!(gw.state.metrics.rejections("upload_too_large") >= 1);
    assert_eq!(gw.state.jobs.counts().queued, 0, "nothing was queued");
    still_healthy(&gw).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn given_unfinished_job_when_tarball_requested_then_409_and_job_kept() {
    let gw = TestGateway::start().await;
    let id = gw.submit_script("sleep 30000").await;
    gw.get(&format!("/download/{id}"))
        .await
        .assert_error(StatusCode::CONFLICT);
    assert_eq!(
        gw.get(&format!("/status/{id}")).await.status,
        StatusCode::OK
    );
    gw.delete(&format!("/jobs/{id}")).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn given_slow_header_sender_then_connection_is_closed_after_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TestGateway::start_with(|c| c.http.header_timeout_ms = 300).await;
    let mut tls = gw.tls().await;
    tls.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    // Never finish the head: the server must hang up (read returns EOF or an error).
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tls.read_to_end(&mut buf),
    )
    .await;
    assert!(read.is_ok(), "server kept a half-sent request open");
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    still_healthy(&gw).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn given_every_env_name_the_helper_refuses_then_submit_answers_400_naming_it() {
    let gw = TestGateway::start().await;
    let names = sandrun_ipc::rules::RESERVED_ENV
        .iter()
        .map(|n| (*n).to_owned())
        .chain(["LD_AUDIT".to_owned(), "A".repeat(200)]);
    for name in names {
        let manifest = serde_json::json!({"entrypoint": "main.py", "env": {&name: "x"}});
        let form = Multipart::new()
            .file("main.py", b"out x")
            .manifest(&manifest.to_string());
        let message = gw.submit(&form).await.assert_error(StatusCode::BAD_REQUEST);
        assert!(message.contains(&format!("env.{name}")), "{message}");
    }
    assert!(gw.helper.specs().is_empty(), "nothing reached the helper");
    gw.shutdown().await;
}
