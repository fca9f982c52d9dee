//! Per-client quotas (429 with Retry-After and RateLimit-*) and the global queue (503).

mod support;

use hyper::StatusCode;
use support::TestGateway;

#[tokio::test]
async fn given_two_running_jobs_when_third_submitted_then_429_with_headers() {
    let gw = TestGateway::start().await;
    let a = gw.submit_script("sleep 30000").await;
    let b = gw.submit_script("sleep 30000").await;
    let reply = gw.submit(&support::Multipart::script("out x")).await;
    let message = reply.assert_error(StatusCode::TOO_MANY_REQUESTS);
    assert!(message.contains("concurrent_jobs"), "{message}");
    assert!(reply.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(reply.header("ratelimit-limit"), Some("2"));
    assert_eq!(reply.header("ratelimit-remaining"), Some("0"));
    assert!(reply.header("ratelimit-reset").is_some());
    gw.delete(&format!("/jobs/{a}")).await;
    gw.wait_finished(&a).await;
    let c = gw.submit_script("out now allowed").await;
    assert_eq!(gw.wait_finished(&c).await["status"], "completed");
    gw.delete(&format!("/jobs/{b}")).await;
    assert!(gw.state.metrics.rejections("concurrent_jobs") >= 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn given_hourly_quota_used_then_429_says_when_to_retry() {
    let gw = TestGateway::start_with(|c| c.client_limits.jobs_per_hour = 2).await;
    for _ in 0..2 {
        let id = gw.submit_script("out x").await;
        gw.wait_finished(&id).await;
    }
    let reply = gw.submit(&support::Multipart::script("out x")).await;
    let message = reply.assert_error(StatusCode::TOO_MANY_REQUESTS);
    assert!(message.contains("jobs_per_hour"), "{message}");
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!(retry > 3500 && retry <= 3600, "{retry}");
    assert_eq!(reply.header("ratelimit-limit"), Some("2"));
    gw.shutdown().await;
}

#[tokio::test]
async fn given_cpu_minute_used_then_429_until_it_ages_out() {
    let gw = TestGateway::start().await;
    let id = gw.submit_script("cpu 10000").await;
    gw.wait_finished(&id).await;
    let reply = gw.submit(&support::Multipart::script("out x")).await;
    let message = reply.assert_error(StatusCode::TOO_MANY_REQUESTS);
    assert!(message.contains("cpu_seconds_per_minute"), "{message}");
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!(retry > 0 && retry <= 60);
    gw.shutdown().await;
}

#[tokio::test]
async fn given_trusted_proxy_then_each_forwarded_client_has_its_own_quota() {
    let gw = TestGateway::start_with(|c| {
        c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
        c.client_limits.concurrent_jobs = 1;
    })
    .await;
    let form = support::Multipart::script("sleep 30000");
    let ct = format!("multipart/form-data; boundary={}", form.boundary);
    for (client, expected) in [
        ("198.51.100.1", 200),
        ("198.51.100.2", 200),
        ("198.51.100.1", 429),
    ] {
        let headers = [("content-type", ct.as_str()), ("x-forwarded-for", client)];
        let req = support::build(hyper::Method::POST, "/submit", &headers, form.body());
        assert_eq!(gw.request(req).await.status.as_u16(), expected, "{client}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn given_full_queue_then_503_with_retry_after_and_gateway_keeps_serving() {
    let gw = TestGateway::start_with(|c| {
        c.max_running = 1;
        c.queue_capacity = 1;
        c.client_limits.concurrent_jobs = 10;
    })
    .await;
    let running = gw.submit_script("sleep 30000").await;
    // Wait until it left the queue for the helper.
    gw.wait_running(&running).await;
    let queued = gw.submit_script("out queued").await;
    let reply = gw.submit(&support::Multipart::script("out refused")).await;
    let message = reply.assert_error(StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains("queue is full"), "{message}");
    assert!(reply.header("retry-after").is_some());
    assert!(gw.state.metrics.rejections("queue_full") >= 1);
    gw.delete(&format!("/jobs/{running}")).await;
    assert_eq!(gw.wait_finished(&queued).await["status"], "completed");
    gw.shutdown().await;
}

#[tokio::test]
async fn given_a_client_holding_its_queue_share_then_it_gets_429_while_another_client_is_queued() {
    // 8 positions, 25 % each: a client may hold 2 queued jobs.
    let gw = TestGateway::start_with(|c| {
        c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
        c.max_running = 1;
        c.queue_capacity = 8;
        c.client_shares.queue_percent = 25;
        c.client_limits.concurrent_jobs = 100;
    })
    .await;
    let submit_as = |client: &'static str, script: &'static str| {
        let form = support::Multipart::script(script);
        let ct = format!("multipart/form-data; boundary={}", form.boundary);
        let headers = [("content-type", ct.as_str()), ("x-forwarded-for", client)];
        support::build(hyper::Method::POST, "/submit", &headers, form.body())
    };
    let running = gw.request(submit_as("198.51.100.1", "sleep 30000")).await;
    assert_eq!(running.status, StatusCode::OK, "{}", running.text());
    let running = running.json()["job_id"].as_str().unwrap().to_owned();
    gw.wait_running(&running).await;
    for _ in 0..2 {
        let queued = gw.request(submit_as("198.51.100.1", "out queued")).await;
        assert_eq!(queued.status, StatusCode::OK, "{}", queued.text());
    }
    let refused = gw.request(submit_as("198.51.100.1", "out refused")).await;
    let message = refused.assert_error(StatusCode::TOO_MANY_REQUESTS);
    assert!(message.contains("queue share"), "{message}");
    assert!(message.contains("queue_percent"), "{message}");
    assert!(refused.header("retry-after").is_some());
    assert!(gw.state.metrics.rejections("queue_share") >= 1);
    let other = gw.request(submit_as("198.51.100.2", "out bystander")).await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.text());
    assert_eq!(other.json()["queue_position"], 2, "{}", other.text());
    gw.delete(&format!("/jobs/{running}")).await;
    let bystander = other.json()["job_id"].as_str().unwrap().to_owned();
    assert_eq!(gw.wait_finished(&bystander).await["status"], "completed");
    gw.shutdown().await;
}

/// Issue 9: every answer's body is charged to its caller before it is handed to the connection
/// (held until it is written or dropped), small JSON included: a caller whose share cannot hold
/// the answer gets 429 JSON instead, and the same request is answered once the share has room.
#[tokio::test]
async fn given_a_caller_holding_its_share_then_a_get_answer_is_refused_with_429_json_until_it_has_room(
) {
    let gw = TestGateway::start_with(|c| c.retention.memory_budget_bytes = 1 << 20).await;
    let budget = gw.state.jobs.budget();
    let metrics = gw.get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK, "{}", metrics.text());
    let size = metrics.body.len() as u64;
    assert!(size > 1024, "a /metrics answer of {size} bytes");
    // The caller (127.0.0.1) holds all of its share but 1 KiB: smaller than the answer.
    let me = sandrun_gateway::ratelimit::ClientKey::V4([127, 0, 0, 1]);
    let held = budget.reserve(me, budget.share() - 1024).unwrap();
    let refused = gw.get("/metrics").await;
    let error = refused.assert_error(StatusCode::TOO_MANY_REQUESTS);
    assert!(error.contains("share"), "{error}");
    assert!(refused.header("retry-after").is_some());
    // A small answer still fits (and its charge is released once it is written).
    let health = gw.get("/health").await;
    assert_eq!(health.status, StatusCode::OK, "{}", health.text());
    assert!(settles(|| budget.used_by(&me) == budget.share() - 1024).await);
    drop(held);
    let again = gw.get("/metrics").await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    assert!(
        settles(|| budget.used() == 0).await,
        "every answer's charge is released once it is written: {} bytes held",
        budget.used()
    );
}

/// Whether `check` holds within 5 s (an answer's charge is released when hyper drops its body,
/// which may be just after the client has read it).
async fn settles(check: impl Fn() -> bool) -> bool {
    for _ in 0..500 {
        if check() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}
