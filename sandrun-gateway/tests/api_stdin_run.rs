//! A job's standard input and `POST /run`, through the real HTTPS server and the fake helper:
//! where stdin comes from, its cap and its memory charge, what travels to the helper, and
//! `/run`'s answers, quotas and wait cap.

mod support;

use hyper::StatusCode;
use support::{Multipart, TestGateway};

fn cat_job() -> Multipart {
    Multipart::new().file("main.py", b"cat\n")
}

#[tokio::test]
async fn given_a_stdin_part_then_the_helper_gets_exactly_its_bytes_after_the_files() {
    let gw = TestGateway::start().await;
    let input: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let reply = gw.submit(&cat_job().stdin(&input)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let id = reply.json()["job_id"].as_str().unwrap().to_owned();
    assert_eq!(gw.wait_finished(&id).await["status"], "completed");
    let specs = gw.helper.specs();
    assert_eq!(specs.last().unwrap().stdin_bytes, input.len() as u64);
    // The fake's `cat` echoes what it received after the files: the stdin, intact.
    let logs = gw.get(&format!("/logs/{id}")).await.json();
    use base64::Engine as _;
    let out = base64::engine::general_purpose::STANDARD
        .decode(logs["stdout_base64"].as_str().unwrap())
        .unwrap();
    assert!(
        out == input,
        "stdin came back different ({} bytes)",
        out.len()
    );
}

#[tokio::test]
async fn given_stdin_then_the_job_hash_covers_its_bytes_and_without_it_the_spec_asks_for_none() {
    let gw = TestGateway::start().await;
    let plain = gw.submit(&cat_job()).await.json();
    let with = gw.submit(&cat_job().stdin(b"x")).await.json();
    let other = gw.submit(&cat_job().stdin(b"y")).await.json();
    let mut hashes = Vec::new();
    for v in [&plain, &with, &other] {
        let id = v["job_id"].as_str().unwrap().to_owned();
        hashes.push(gw.wait_finished(&id).await["job_hash"].clone());
    }
    let [plain, with, other] = <[serde_json::Value; 3]>::try_from(hashes).unwrap();
    assert_eq!(gw.helper.specs()[0].stdin_bytes, 0);
    assert_ne!(plain, with, "the job hash covers the stdin");
    assert_ne!(with, other, "the job hash covers the stdin's bytes");
}

#[tokio::test]
async fn given_stdin_over_the_cap_then_413_before_any_job_and_nothing_stays_charged() {
    let gw = TestGateway::start_with(|c| c.max_stdin_bytes = 1000).await;
    let reply = gw.submit(&cat_job().stdin(&[7u8; 1001])).await;
    let error = reply.assert_error(StatusCode::PAYLOAD_TOO_LARGE);
    assert!(error.contains("stdin is larger than 1000 bytes"), "{error}");
    let manifest = format!(
        r#"{{"entrypoint": "main.py", "stdin": "{}"}}"#,
        "a".repeat(1001)
    );
    let reply = gw.submit(&cat_job().manifest(&manifest)).await;
    let error = reply.assert_error(StatusCode::PAYLOAD_TOO_LARGE);
    assert!(error.contains("stdin"), "{error}");
    assert!(
        gw.helper.specs().is_empty(),
        "a refused upload reached the helper"
    );
    let stats = gw.get("/stats").await.json();
    assert_eq!(stats["memory"]["used_bytes"], 0, "{stats}");
    // At the cap, from the manifest: accepted and delivered.
    let manifest = format!(
        r#"{{"entrypoint": "main.py", "stdin": "{}"}}"#,
        "é".repeat(500)
    );
    let id = gw.submit(&cat_job().manifest(&manifest)).await.json()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    gw.wait_finished(&id).await;
    let logs = gw.get(&format!("/logs/{id}")).await.json();
    assert_eq!(logs["stdout"], "é".repeat(500));
}

#[tokio::test]
async fn given_a_queued_job_with_stdin_then_its_bytes_are_charged_to_the_client() {
    let gw = TestGateway::start_with(|c| c.max_running = 1).await;
    let blocker = gw.submit_script("sleep 2000").await;
    gw.wait_running(&blocker).await;
    let before = gw.get("/stats").await.json()["memory"]["used_bytes"]
        .as_u64()
        .unwrap();
    let reply = gw.submit(&cat_job().stdin(&[1u8; 100_000])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let after = gw.get("/stats").await.json()["memory"]["used_bytes"]
        .as_u64()
        .unwrap();
    // main.py (4 bytes) and the stdin, while the job waits in the queue.
    assert_eq!(after - before, 100_004);
}

#[tokio::test]
async fn given_stdin_twice_then_400_naming_it() {
    let gw = TestGateway::start().await;
    let both = cat_job()
        .manifest(r#"{"entrypoint": "main.py", "stdin": "a"}"#)
        .stdin(b"b");
    let error = gw.submit(&both).await.assert_error(StatusCode::BAD_REQUEST);
    assert!(error.contains("stdin is given twice"), "{error}");
    let two_parts = cat_job().stdin(b"a").stdin(b"b");
    let error = gw
        .submit(&two_parts)
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    assert!(error.contains("more than one stdin part"), "{error}");
}

#[tokio::test]
async fn given_run_then_a_fast_job_is_answered_with_its_result_and_a_slow_one_with_202() {
    let gw = TestGateway::start().await;
    let fast = Multipart::script("out hello\ncat\nfile r.txt 42\nexit 3").stdin(b"in");
    let reply = gw.post_form("/run?wait=10", &fast).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let v = reply.json();
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["exit_code"], 3, "{v}");
    assert_eq!(v["stdout"], "hello\nin", "{v}");
    assert_eq!(v["stdout_base64"], "aGVsbG8KaW4=", "{v}");
    assert_eq!(v["outputs"][0]["name"], "r.txt", "{v}");
    assert_eq!(v["output_files"]["r.txt"]["size_bytes"], 2, "{v}");
    assert!(v["worker_metadata"]["signature"].is_string(), "{v}");
    assert!(reply.header("ratelimit-limit").is_some());

    let slow = Multipart::script("sleep 1500\nout late");
    let reply = gw.post_form("/run?wait=0", &slow).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let v = reply.json();
    let id = v["job_id"].as_str().unwrap().to_owned();
    assert_eq!(v["logs_url"], format!("/logs/{id}"));
    assert_eq!(
        reply.header("location"),
        Some(format!("/status/{id}").as_str())
    );
    let status = gw.wait_finished(&id).await;
    assert_eq!(status["status"], "completed", "{status}");
}

#[tokio::test]
async fn given_a_wait_over_the_configured_cap_then_it_is_cut_to_the_cap() {
    let gw = TestGateway::start_with(|c| c.run_max_wait_s = 1).await;
    let started = std::time::Instant::now();
    let reply = gw
        .post_form("/run?wait=3600", &Multipart::script("sleep 4000"))
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    assert_eq!(reply.json()["waited_s"], 1);
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
}

#[tokio::test]
async fn given_run_then_the_quotas_and_limits_of_submit_apply() {
    let gw = TestGateway::start_with(|c| {
        c.client_limits.jobs_per_hour = 1;
        c.max_stdin_bytes = 10;
    })
    .await;
    let error = gw
        .post_form("/run", &cat_job().stdin(&[0u8; 11]))
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE);
    assert!(error.contains("stdin"), "{error}");
    let reply = gw.post_form("/run?wait=5", &cat_job()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let error = gw
        .post_form("/run?wait=5", &cat_job())
        .await
        .assert_error(StatusCode::TOO_MANY_REQUESTS);
    assert!(error.contains("quota"), "{error}");
    let reply = gw.get("/run").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.header("allow"), Some("POST"));
}

#[tokio::test]
async fn given_a_wait_longer_than_every_idle_timeout_then_the_connection_stays_for_the_answer() {
    let gw = TestGateway::start_with(|c| {
        c.http.body_idle_timeout_ms = 200;
        c.http.keep_alive_timeout_ms = 200;
        c.http.header_timeout_ms = 200;
    })
    .await;
    let reply = gw
        .post_form("/run?wait=10", &Multipart::script("sleep 1200\nout waited"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["stdout"], "waited\n");
}
