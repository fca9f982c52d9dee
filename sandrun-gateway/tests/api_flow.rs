//! Full flows through the real HTTPS server and the fake helper: submit in every format, status
//! transitions, logs, outputs, downloads, signatures, auto-deletion, cancel, helper failures.

mod support;

use std::time::Duration;

use base64::Engine as _;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use hyper::StatusCode;
use sandrun_gateway::signing::{canonical_message, ResultClaim};
use sandrun_ipc::{BundleEntry, ErrorCode};
use support::{Multipart, Refusal, TestGateway};

fn bundle_paths(spec: &sandrun_ipc::JobSpec) -> Vec<String> {
    spec.bundle
        .iter()
        .filter_map(|e| match e {
            BundleEntry::File { path, .. } => Some(path.to_string()),
            BundleEntry::Dir { .. } => None,
        })
        .collect()
}

#[tokio::test]
async fn given_a_job_when_it_completes_then_status_logs_outputs_and_signature_are_served() {
    let gw = TestGateway::start().await;
    let id = gw
        .submit_script("out hello\nerr warning\nfile results/a.txt alpha\nfile b.csv x,y\ncpu 1234")
        .await;
    assert_eq!(id.len(), 32);
    let status = gw.wait_finished(&id).await;
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["reason"], serde_json::Value::Null);
    assert_eq!(status["execution_metadata"]["exit_code"], 0);
    assert_eq!(status["execution_metadata"]["cpu_seconds"], 1.234);
    assert_eq!(status["execution_metadata"]["memory_peak_bytes"], 3 << 20);
    assert_eq!(status["execution_metadata"]["memory_peak_mb"], 3.0);
    assert_eq!(status["execution_metadata"]["interpreter"], "python3");
    assert_eq!(status["output_files"]["results/a.txt"]["size_bytes"], 5);
    assert_eq!(status["output_files"]["b.csv"]["type"], "text");
    assert_eq!(status["job_hash"].as_str().unwrap().len(), 64);

    let logs = gw.get(&format!("/logs/{id}")).await.json();
    assert_eq!(logs["stdout"], "hello\n");
    assert_eq!(logs["stderr"], "warning\n");
    assert_eq!(logs["stdout_base64"], "aGVsbG8K");
    assert_eq!(logs["stderr_base64"], "d2FybmluZwo=");
    assert_eq!(logs["stdout_truncated"], false);

    let listing = gw.get(&format!("/outputs/{id}")).await.json();
    assert_eq!(listing["total_files"], 2);
    let file = listing["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "results/a.txt");
    let file = file.unwrap();
    assert_eq!(file["size"], 5);
    assert_eq!(file["size_formatted"], "5 B");
    assert_eq!(file["mime_type"], "text/plain");
    let url = file["download_url"].as_str().unwrap();
    assert_eq!(url, format!("/download/{id}/results/a.txt"));
    let download = gw.get(url).await;
    assert_eq!(download.status, StatusCode::OK);
    assert_eq!(download.body.as_ref(), b"alpha");
    assert!(download
        .header("content-disposition")
        .unwrap()
        .starts_with("attachment"));

    verify_signature(&status, &id);
    gw.shutdown().await;
}

fn verify_signature(status: &serde_json::Value, id: &str) {
    let worker = status["worker_metadata"]["worker_id_hex"].as_str().unwrap();
    let key_bytes: [u8; 32] = hex::decode(worker).unwrap().try_into().unwrap();
    let key = VerifyingKey::from_bytes(&key_bytes).unwrap();
    let job_hash: [u8; 32] = hex::decode(status["job_hash"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let mut outputs = Vec::new();
    for (path, info) in status["output_files"].as_object().unwrap() {
        let sha: [u8; 32] = hex::decode(info["sha256"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        outputs.push((path.clone(), sha));
    }
    let claim = ResultClaim {
        job_id: id,
        job_hash: &job_hash,
        exit_code: status["execution_metadata"]["exit_code"]
            .as_i64()
            .map(|c| i32::try_from(c).unwrap()),
        cpu_ms: status["cpu_ms"].as_u64().unwrap(),
        memory_peak_bytes: status["execution_metadata"]["memory_peak_bytes"]
            .as_u64()
            .unwrap(),
        outputs: &outputs,
        completed_at: status["completed_at"].as_u64().unwrap(),
        environment: None,
        requirements: None,
    };
    let signature = status["worker_metadata"]["signature"].as_str().unwrap();
    let signature = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .unwrap();
    let signature = Signature::from_slice(&signature).unwrap();
    let message = canonical_message(&claim);
    key.verify(&message, &signature)
        .expect("the signature verifies from /status fields alone");
    let mut tampered = message.clone();
    tampered[message.len() - 2] ^= 1;
    assert!(key.verify(&tampered, &signature).is_err());
}

#[tokio::test]
async fn given_finished_job_when_tarball_downloaded_then_it_holds_outputs_only_and_job_is_gone() {
    let gw = TestGateway::start().await;
    let id = gw
        .submit_script("file out/r.txt result\nfile s.txt second")
        .await;
    gw.wait_finished(&id).await;
    let reply = gw.get(&format!("/download/{id}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), Some("application/gzip"));
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(reply.body.as_ref()));
    let mut mtimes = Vec::new();
    let mut names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            mtimes.push(e.header().mtime().unwrap());
            e.path().unwrap().to_string_lossy().into_owned()
        })
        .collect();
    // Entries are dated at the job's end, not 1970.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        mtimes.iter().all(|t| now.abs_diff(*t) < 3600),
        "{mtimes:?} vs {now}"
    );
    names.sort();
    assert_eq!(
        names,
        vec!["out/r.txt", "s.txt"],
        "outputs only, never main.py"
    );
    for path in ["status", "logs", "outputs", "download"] {
        gw.get(&format!("/{path}/{id}"))
            .await
            .assert_error(StatusCode::NOT_FOUND);
    }
    assert_eq!(gw.state.jobs.budget().used(), 0, "all job memory released");
    gw.shutdown().await;
}

#[tokio::test]
async fn given_short_ttl_when_it_passes_then_the_job_is_deleted() {
    let gw = TestGateway::start_with(|c| c.retention.ttl_s = 1).await;
    let id = gw.submit_script("out x").await;
    gw.wait_finished(&id).await;
    let mut gone = false;
    for _ in 0..100 {
        if gw.get(&format!("/status/{id}")).await.status == StatusCode::NOT_FOUND {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "job expired after its TTL");
    gw.shutdown().await;
}

#[tokio::test]
async fn given_tar_gz_zip_and_directory_uploads_then_each_bundle_reaches_the_helper() {
    let gw = TestGateway::start().await;
    let script = b"out from archive";
    let tgz = support::tar_gz(&[("main.py", script), ("lib/util.py", b"x = 1")]);
    let zip = support::zip(&[("main.py", script), ("data/in.csv", b"a,b")]);
    let manifest = r#"{"entrypoint": "main.py"}"#;
    let forms = [
        Multipart::new().file("job.tar.gz", &tgz).manifest(manifest),
        Multipart::new().file("job.zip", &zip).manifest(manifest),
        Multipart::new()
            .file("main.py", script)
            .file("src/helper.py", b"y = 2")
            .manifest(manifest),
    ];
    for form in &forms {
        let reply = gw.submit(form).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let id = reply.json()["job_id"].as_str().unwrap().to_owned();
        assert_eq!(gw.wait_finished(&id).await["status"], "completed");
        assert_eq!(
            gw.get(&format!("/logs/{id}")).await.json()["stdout"],
            "from archive\n"
        );
    }
    let specs = gw.helper.specs();
    assert_eq!(bundle_paths(&specs[0]), vec!["lib/util.py", "main.py"]);
    assert_eq!(bundle_paths(&specs[1]), vec!["data/in.csv", "main.py"]);
    assert_eq!(bundle_paths(&specs[2]), vec!["main.py", "src/helper.py"]);
    gw.shutdown().await;
}

#[tokio::test]
async fn given_manifest_limits_then_the_helper_gets_them_with_the_job_id_as_label() {
    let gw = TestGateway::start().await;
    let form = Multipart::new()
        .file("main.py", b"out hi")
        .manifest(r#"{"entrypoint": "main.py", "timeout": 30, "memory_mb": 256, "cpu_seconds": 7, "args": ["--fast"]}"#);
    let reply = gw.submit(&form).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let id = reply.json()["job_id"].as_str().unwrap().to_owned();
    gw.wait_finished(&id).await;
    let spec = gw.helper.specs().pop().unwrap();
    assert_eq!(spec.label, id);
    assert_eq!(spec.argv, vec!["python3", "main.py", "--fast"]);
    assert_eq!(spec.limits.wall_ms, Some(30_000));
    assert_eq!(spec.limits.memory_bytes, Some(256 << 20));
    assert_eq!(spec.limits.cpu_ms, Some(7_000));
    gw.shutdown().await;
}

#[tokio::test]
async fn given_nonzero_exit_or_limit_then_job_fails_with_the_right_reason() {
    let gw = TestGateway::start().await;
    let id = gw.submit_script("out partial\nexit 3").await;
    let status = gw.wait_finished(&id).await;
    assert_eq!(
        (status["status"].as_str(), status["reason"].as_str()),
        (Some("failed"), None)
    );
    assert_eq!(status["execution_metadata"]["exit_code"], 3);
    let id = gw.submit_script("reason timeout").await;
    let status = gw.wait_finished(&id).await;
    assert_eq!(status["status"], "failed");
    assert_eq!(status["reason"], "timeout");
    gw.shutdown().await;
}

#[tokio::test]
async fn given_helper_drops_mid_job_then_job_fails_internal_and_next_job_runs() {
    let gw = TestGateway::start().await;
    let id = gw.submit_script("out started\ndrop").await;
    let status = gw.wait_finished(&id).await;
    assert_eq!(status["status"], "failed");
    assert_eq!(status["reason"], "internal");
    let message = status["message"].as_str().unwrap();
    assert!(
        message.contains("sandrund closed the connection"),
        "{message}"
    );
    assert_eq!(
        gw.get(&format!("/logs/{id}")).await.json()["stdout"],
        "started\n"
    );
    let next = gw.submit_script("out fine").await;
    assert_eq!(gw.wait_finished(&next).await["status"], "completed");
    gw.shutdown().await;
}

#[tokio::test]
async fn given_no_helper_listening_then_job_is_retried_and_fails_unavailable_naming_the_socket() {
    let gw = TestGateway::start_with(|c| {
        c.helper_socket = "/nonexistent/sandrund.sock".into();
        c.busy_retry_ms = 10;
        c.busy_retry_max_ms = 20;
        c.helper_attempts = 3;
    })
    .await;
    let id = gw.submit_script("out x").await;
    let status = gw.wait_finished(&id).await;
    assert_eq!(status["reason"], "unavailable", "{status}");
    let message = status["message"].as_str().unwrap();
    assert!(message.contains("/nonexistent/sandrund.sock"), "{message}");
    assert!(message.contains("3 attempts"), "{message}");
    gw.shutdown().await;
}

#[tokio::test]
async fn given_a_helper_that_is_busy_draining_or_closes_before_accepting_then_the_job_waits_and_completes(
) {
    let gw = TestGateway::start_with(|c| {
        c.busy_retry_ms = 10;
        c.busy_retry_max_ms = 40;
    })
    .await;
    gw.helper.refuse_next([
        Refusal::Error(ErrorCode::Busy),
        Refusal::Close,
        Refusal::Error(ErrorCode::Draining),
    ]);
    let id = gw.submit_script("out after refusals").await;
    let status = gw.wait_finished(&id).await;
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(gw.helper.specs().len(), 4, "three refusals, then the run");
    let logs = gw.get(&format!("/logs/{id}")).await.json();
    assert_eq!(logs["stdout"], "after refusals\n", "{logs}");
    gw.shutdown().await;
}

#[tokio::test]
async fn given_a_helper_that_never_takes_the_job_then_it_fails_unavailable_after_the_attempts() {
    let gw = TestGateway::start_with(|c| {
        c.busy_retry_ms = 10;
        c.busy_retry_max_ms = 20;
        c.helper_attempts = 3;
    })
    .await;
    gw.helper.refuse_next([
        Refusal::Close,
        Refusal::Error(ErrorCode::Busy),
        Refusal::Close,
    ]);
    let id = gw.submit_script("out never").await;
    let status = gw.wait_finished(&id).await;
    assert_eq!(
        (status["status"].as_str(), status["reason"].as_str()),
        (Some("failed"), Some("unavailable")),
        "{status}"
    );
    assert_eq!(
        gw.helper.specs().len(),
        3,
        "exactly helper_attempts attempts"
    );
    // The helper takes jobs again: the next one runs.
    let next = gw.submit_script("out next").await;
    assert_eq!(gw.wait_finished(&next).await["status"], "completed");
    gw.shutdown().await;
}

#[tokio::test]
async fn given_running_job_when_deleted_then_helper_connection_closes_and_job_is_cancelled() {
    let gw = TestGateway::start().await;
    let id = gw.submit_script("out begin\nsleep 30000\nout never").await;
    wait_for_stdout(&gw, &id, "begin\n").await;
    let reply = gw.delete(&format!("/jobs/{id}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["action"], "cancelling");
    let status = gw.wait_finished(&id).await;
    assert_eq!(
        (status["status"].as_str(), status["reason"].as_str()),
        (Some("failed"), Some("cancelled"))
    );
    for _ in 0..100 {
        if gw.helper.closed_early().contains(&id) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        gw.helper.closed_early().contains(&id),
        "the helper saw the connection close"
    );
    let reply = gw.delete(&format!("/jobs/{id}")).await;
    assert_eq!(reply.json()["action"], "deleted");
    gw.get(&format!("/status/{id}"))
        .await
        .assert_error(StatusCode::NOT_FOUND);
    gw.shutdown().await;
}

#[tokio::test]
async fn given_queued_job_when_deleted_then_it_never_reaches_the_helper() {
    let gw = TestGateway::start_with(|c| c.max_running = 1).await;
    let first = gw.submit_script("sleep 30000").await;
    let second = gw.submit_script("out second").await;
    let status = gw.get(&format!("/status/{second}")).await.json();
    assert_eq!(status["status"], "queued");
    assert_eq!(status["queue_position"], 1);
    let reply = gw.delete(&format!("/jobs/{second}")).await;
    assert_eq!(reply.json()["action"], "cancelled");
    let status = gw.get(&format!("/status/{second}")).await.json();
    assert_eq!(
        (status["status"].as_str(), status["reason"].as_str()),
        (Some("failed"), Some("cancelled"))
    );
    gw.delete(&format!("/jobs/{first}")).await;
    gw.wait_finished(&first).await;
    assert!(gw.helper.specs().iter().all(|s| s.label != second));
    gw.shutdown().await;
}

pub async fn wait_for_stdout(gw: &TestGateway, id: &str, expected: &str) {
    for _ in 0..250 {
        if gw.get(&format!("/logs/{id}")).await.json()["stdout"] == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("stdout of {id} never became {expected:?}");
}

#[tokio::test]
async fn given_info_endpoints_then_each_answers_json_with_its_fields() {
    let gw = TestGateway::start().await;
    let root = gw.get("/").await.json();
    assert_eq!(root["service"], "sandrun");
    assert_eq!(root["gateway"], "sandrun-gateway");
    assert!(root["interpreters"]
        .as_array()
        .unwrap()
        .contains(&"python3".into()));
    assert_eq!(root["limits"]["concurrent_jobs"], 2);
    let health = gw.get("/health").await.json();
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["worker_id"].as_str().unwrap().len(), 44);
    assert_eq!(health["worker_id_hex"].as_str().unwrap().len(), 64);
    assert!(health["version"].is_string());
    let envs = gw.get("/environments").await.json();
    assert_eq!(
        envs["environments"],
        serde_json::json!(["fake-env"]),
        "{envs}"
    );
    assert_eq!(envs["templates"], envs["environments"]);
    let detail = &envs["details"][0];
    use sha2::Digest;
    assert_eq!(
        detail["lock_sha256"],
        hex::encode(sha2::Sha256::digest(support::FAKE_LOCK)),
        "{envs}"
    );
    assert_eq!(detail["interpreter"]["version"], "3.11.2", "{envs}");
    assert_eq!(detail["packages"][0]["name"], "six", "{envs}");
    let id = gw.submit_script("out x").await;
    gw.wait_finished(&id).await;
    let stats = gw.get("/stats").await.json();
    assert_eq!(stats["client"], "127.0.0.1");
    assert_eq!(stats["quota"]["jobs_last_hour"], 1);
    assert_eq!(stats["system"]["queue_capacity"], 64);
    let metrics = gw.get("/metrics").await;
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let text = metrics.text();
    assert!(
        text.contains(
            "sandrun_gateway_jobs_finished_total{status=\"completed\",reason=\"none\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("sandrun_gateway_spawn_seconds_count 1"));
    assert!(text.contains("sandrun_gateway_job_seconds_count 1"));
    assert!(text.contains("sandrun_gateway_queue_length 0"));
    gw.shutdown().await;
}

#[tokio::test]
async fn given_output_that_is_not_utf8_then_logs_text_is_lossy_and_base64_is_exact() {
    use base64::Engine;
    let gw = TestGateway::start().await;
    let id = gw
        .submit_script("outhex 61f09f\nouthex 988062ffc080\nerrhex e282\nouthex 0a")
        .await;
    gw.wait_finished(&id).await;
    let logs = gw.get(&format!("/logs/{id}")).await.json();
    assert_eq!(logs["stdout"], "a\u{1F600}b\u{FFFD}\u{FFFD}\u{FFFD}\n");
    assert_eq!(logs["stderr"], "\u{FFFD}");
    let decode = |field: &str| {
        let text = logs[field].as_str().unwrap();
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap()
    };
    assert_eq!(decode("stdout_base64"), b"a\xf0\x9f\x98\x80b\xff\xc0\x80\n");
    assert_eq!(decode("stderr_base64"), b"\xe2\x82");
    gw.shutdown().await;
}
