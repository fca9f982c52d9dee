//! Multipart and legacy bodies: parts, directory uploads, manifests, and hostile bodies refused
//! early with bounded reading.

mod upload_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sandrun_gateway::upload::{parse_submission, UploadLimits};
use upload_support::*;

#[tokio::test]
async fn given_a_directory_upload_with_relative_filenames_then_paths_are_kept() {
    let s = submit(&[
        ("files", Some("main.py"), b"import util"),
        ("files", Some("src/util.py"), b"x = 1"),
        ("files", Some("src/data/in.txt"), b"hello"),
        (
            "manifest",
            None,
            br#"{"entrypoint":"main.py","args":["--n","3"],"outputs":["*.png"]}"#,
        ),
    ])
    .await
    .unwrap();
    assert_eq!(
        file_names(&s),
        ["main.py", "src/data/in.txt", "src/util.py"]
    );
    assert_eq!(s.manifest.argv(), ["python3", "main.py", "--n", "3"]);
    assert_eq!(s.bundle.file("src/util.py").unwrap().mode, 0o644);
}

#[tokio::test]
async fn given_no_manifest_part_then_job_json_in_the_upload_is_used() {
    let s = submit(&[
        (
            "files",
            Some("job.json"),
            br#"{"entrypoint":"app/start.sh","timeout":60}"#,
        ),
        ("files", Some("app/start.sh"), b"echo hi"),
        ("files", Some("main.py"), b""),
    ])
    .await
    .unwrap();
    assert_eq!(s.manifest.argv(), ["bash", "app/start.sh"]);
    assert_eq!(s.manifest.timeout_s, 60);
}

#[tokio::test]
async fn given_no_manifest_at_all_then_the_entrypoint_is_auto_detected() {
    let s = submit(&[
        ("files", Some("run.sh"), b"echo"),
        ("files", Some("index.js"), b""),
    ])
    .await
    .unwrap();
    assert_eq!(s.manifest.argv(), ["node", "index.js"]);
    let err = submit(&[("files", Some("notes.txt"), b"")])
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400);
    assert!(
        err.message().starts_with("manifest.entrypoint:"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn given_manifest_errors_then_the_400_names_the_field() {
    for (json, field) in [
        (
            r#"{"entrypoint":"main.py","memory_mb":99999}"#,
            "manifest.memory_mb",
        ),
        (
            r#"{"entrypoint":"main.py","timeout":"long"}"#,
            "manifest.timeout",
        ),
        (
            r#"{"entrypoint":"main.py","env":{"LD_PRELOAD":"/x.so"}}"#,
            "manifest.env.LD_PRELOAD",
        ),
        (
            r#"{"entrypoint":"main.py","requirements":["numpy","-e ."]}"#,
            "manifest.requirements[1]",
        ),
        (r#"{"entrypoint":"main.py","colour":"blue"}"#, "colour"),
        (r#"{"entrypoint":"other.py"}"#, "manifest.entrypoint"),
    ] {
        let err = submit(&[
            ("files", Some("main.py"), b""),
            ("manifest", None, json.as_bytes()),
        ])
        .await
        .unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(err.message().contains(field), "{json}: {}", err.message());
    }
}

#[tokio::test]
async fn given_an_unknown_part_or_two_manifests_then_it_is_refused() {
    let err = submit(&[("files", Some("main.py"), b""), ("script", None, b"x")])
        .await
        .unwrap_err();
    assert!(err.message().contains("\"script\""), "{}", err.message());
    let err = submit(&[("manifest", None, b"{}"), ("manifest", None, b"{}")])
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400);
}

#[tokio::test]
async fn given_the_same_path_in_two_parts_then_it_is_refused_as_duplicate() {
    let err = submit(&[
        ("files", Some("main.py"), b"1"),
        ("files", Some("./main.py"), b"2"),
    ])
    .await
    .unwrap_err();
    assert!(err.message().contains("duplicate"), "{}", err.message());
}

#[tokio::test]
async fn given_a_traversal_filename_then_it_is_refused_naming_it() {
    for bad in ["../../etc/cron.d/x", "/abs.py", "C:\\\\evil.py"] {
        let err = submit(&[("files", Some(bad), b"x")]).await.unwrap_err();
        assert_eq!(err.status(), 400, "{bad}");
    }
}

#[tokio::test]
async fn given_a_non_multipart_content_type_then_it_is_415() {
    let err = submit_with(
        &UploadLimits::default(),
        Some("application/json"),
        b"{}".to_vec(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.status(), 415);
    let err = submit_with(&UploadLimits::default(), None, b"print(1)".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.status(), 415, "a non-legacy body without a type");
}

#[tokio::test]
async fn given_a_missing_boundary_or_unterminated_body_then_it_is_400() {
    let limits = UploadLimits::default();
    let err = submit_with(&limits, Some("multipart/form-data"), b"x".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400);
    let mut body = multipart_body(&[("files", Some("main.py"), b"print(1)")]);
    body.truncate(body.len() - 20);
    let err = submit_with(&limits, Some(&multipart_ct()), body)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400, "{}", err.message());
}

#[tokio::test]
async fn given_a_body_over_the_limit_then_it_is_413_without_reading_much_past_it() {
    let limits = UploadLimits {
        max_body_bytes: 1 << 20,
        ..UploadLimits::default()
    };
    let pulled = Arc::new(AtomicU64::new(0));
    let head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big\"\r\n\r\n"
    );
    let body = lazy(pulled.clone(), move |i| match i {
        0 => Some(head.clone().into_bytes()),
        _ => Some(vec![b'x'; 64 * 1024]), // Never ends.
    });
    let ct = multipart_ct();
    let err = parse_stream(&limits, Some(&ct), body).await.unwrap_err();
    assert_eq!(err.status(), 413);
    assert!(pulled.load(Ordering::SeqCst) <= (1 << 20) + 64 * 1024);
}

#[tokio::test]
async fn given_an_endless_part_header_then_it_is_refused_at_the_header_cap() {
    let limits = UploadLimits::default();
    let pulled = Arc::new(AtomicU64::new(0));
    let head = format!("--{BOUNDARY}\r\nX-Junk: ");
    let body = lazy(pulled.clone(), move |i| match i {
        0 => Some(head.clone().into_bytes()),
        _ => Some(vec![b'a'; 1024]), // A header line that never ends.
    });
    let ct = multipart_ct();
    let err = parse_stream(&limits, Some(&ct), body).await.unwrap_err();
    assert_eq!(err.status(), 400);
    assert!(err.message().contains("headers"), "{}", err.message());
    let pulled = pulled.load(Ordering::SeqCst);
    assert!(
        pulled <= (limits.max_part_header_bytes + 2048) as u64,
        "pulled {pulled}"
    );
}

#[tokio::test]
async fn given_an_endless_preamble_then_it_is_refused_at_the_header_cap() {
    let pulled = Arc::new(AtomicU64::new(0));
    let body = lazy(pulled.clone(), |_| Some(vec![b'-'; 1000]));
    let ct = multipart_ct();
    let err = parse_stream(&UploadLimits::default(), Some(&ct), body)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400);
    assert!(pulled.load(Ordering::SeqCst) < 16 * 1024);
}

#[tokio::test]
async fn given_a_hundred_thousand_parts_then_it_is_refused_by_the_part_cap() {
    // Distinct names: parts are expanded as they arrive, so a repeated name would be refused as
    // a duplicate before the part cap is reached.
    let part = |i: u64| {
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"f{i}\"\r\n\r\n\r\n")
    };
    let pulled = Arc::new(AtomicU64::new(0));
    let body = lazy(pulled.clone(), move |i| {
        (i < 100_000).then(|| part(i).into_bytes())
    });
    let ct = multipart_ct();
    let err = parse_stream(&UploadLimits::default(), Some(&ct), body)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400);
    assert!(
        err.message().contains("more than 10000 parts"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn given_a_legacy_body_without_multipart_then_it_is_parsed() {
    let body = b"----Tar\nPath: main.py\nSize: 9\n\nprint(1)\n".to_vec();
    for ct in [None, Some("application/octet-stream")] {
        let s = submit_with(&UploadLimits::default(), ct, body.clone())
            .await
            .unwrap();
        assert_eq!(file_names(&s), ["main.py"]);
        assert_eq!(
            s.bundle.file("main.py").unwrap().data.as_ref(),
            b"print(1)\n"
        );
        assert_eq!(s.manifest.argv(), ["python3", "main.py"]);
    }
}

#[tokio::test]
async fn given_a_legacy_record_in_a_files_part_then_it_is_parsed_too() {
    let legacy = b"----Tar\nPath: lib/a.py\nSize: 1\n\nA\n----Tar\nPath: main.py\nSize: 0\n\n";
    let s = submit(&[("files", Some("upload.tar"), legacy)])
        .await
        .unwrap();
    assert_eq!(file_names(&s), ["lib/a.py", "main.py"]);
    let evil = b"----Tar\nPath: ../../x\nSize: 1\n\nA";
    let err = submit(&[("files", Some("upload.tar"), evil)])
        .await
        .unwrap_err();
    assert!(err.message().contains("\"../../x\""), "{}", err.message());
}

#[tokio::test]
async fn given_an_empty_unnamed_part_from_a_browser_then_it_is_ignored() {
    let s = submit(&[("files", Some(""), b""), ("files", Some("main.py"), b"")])
        .await
        .unwrap();
    assert_eq!(file_names(&s), ["main.py"]);
}

#[test]
fn given_the_parser_future_then_it_can_be_spawned_on_a_multi_threaded_runtime() {
    fn assert_send<T: Send>(_: &T) {}
    let limits = UploadLimits::default();
    let policy = policy();
    let charge = sandrun_gateway::budget::SharedReservation::unlimited();
    let fut = parse_submission(None, chunked(Vec::new()), &limits, &policy, &charge);
    assert_send(&fut);
}

fn charged_parse(
    budget_bytes: u64,
    parts: &[Part<'_>],
) -> (
    Result<sandrun_gateway::upload::Submission, sandrun_gateway::upload::UploadError>,
    u64,
    u64,
) {
    use sandrun_gateway::budget::{MemoryBudget, SharedReservation};
    let budget = MemoryBudget::new(budget_bytes * 4, budget_bytes);
    let charge = SharedReservation::new(
        budget.empty(sandrun_gateway::ratelimit::ClientKey::V4([10, 0, 0, 1])),
    );
    let body = multipart_body(parts);
    let limits = UploadLimits::default();
    let policy = policy();
    let result = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(parse_submission(
            Some(&multipart_ct()),
            chunked(body),
            &limits,
            &policy,
            &charge,
        ));
    // Read while the charge is alive: dropping it (the request ends) releases everything.
    let (charged, used) = (charge.bytes(), budget.used());
    drop(charge);
    assert_eq!(budget.used(), 0, "the charge is released with the request");
    (result, charged, used)
}

#[test]
fn given_an_upload_then_exactly_its_bundle_bytes_stay_charged() {
    let archive = gzip(&tar_raw(&[TarEntry::file("a.py", &[b'a'; 5000])]));
    let plain = [b'p'; 3000];
    let parts = [
        ("files", Some("x.tar.gz"), &archive[..]),
        ("files", Some("main.py"), &plain[..]),
    ];
    let (result, charged, used) = charged_parse(1 << 20, &parts);
    let submission = result.unwrap();
    assert_eq!(submission.bundle.total_bytes(), 8000);
    assert_eq!((charged, used), (8000, 8000));
}

#[test]
fn given_an_archive_expanding_past_the_client_share_then_it_is_refused_413_before_it_is_held() {
    // Incompressible, so the archive stays inside the expansion ratio.
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let big: Vec<u8> = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    let archive = gzip(&tar_raw(&[
        TarEntry::file("a", &big),
        TarEntry::file("b", &big),
        TarEntry::file("c", &big),
        TarEntry::file("d", &big),
    ]));
    let parts = [("files", Some("x.tar.gz"), &archive[..])];
    let (result, charged, _) = charged_parse(1 << 20, &parts);
    let error = result.unwrap_err();
    assert_eq!(error.status(), 413, "{error}");
    assert!(error.message().contains("share"), "{error}");
    // At most the share was charged, and the charge was never above it.
    assert!(charged <= 1 << 20, "{charged}");
}
