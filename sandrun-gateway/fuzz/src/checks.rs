//! The properties each gateway fuzz target checks, one function per target.
//!
//! Each function takes the fuzzer's bytes and returns `Ok(())` when the input was accepted or
//! `Err(message)` when it was refused with a client error. It panics when a property is broken:
//! that is what libFuzzer reports as a crash. The same file is compiled into
//! `sandrun-gateway/tests/fuzz_corpus.rs`, which replays the checked-in seeds, so the harness and
//! its corpus cannot drift from the parsers.
//!
//! Limits are small so each iteration stays fast; the properties do not depend on their values.

use std::convert::Infallible;
use std::io::Write;
use std::sync::OnceLock;

use bytes::Bytes;
use sandrun_gateway::bundle::{Bundle, BundleBuilder, BundleCaps};
use sandrun_gateway::manifest::{Manifest, ManifestPolicy, RawManifest, RESERVED_ENV};
use sandrun_gateway::signing::job_hash;
use sandrun_gateway::upload::archive::{self, ArchiveKind};
use sandrun_gateway::upload::{legacy, parse_submission, Submission, UploadError, UploadLimits};
use sandrun_ipc::BundlePath;

/// The boundary of the fixed Content-Type used by [`multipart`] and by the seeds.
pub const BOUNDARY: &str = "XB";

/// Small caps: a few KiB per iteration, a few dozen entries.
pub fn limits() -> UploadLimits {
    UploadLimits {
        max_body_bytes: 64 * 1024,
        max_parts: 16,
        max_part_header_bytes: 512,
        max_files: 32,
        max_uncompressed_bytes: 256 * 1024,
        max_ratio: 100,
        max_path_bytes: 256,
        max_stdin_bytes: 4096,
    }
}

/// The deployment policy the manifest is checked against.
pub fn policy() -> ManifestPolicy {
    ManifestPolicy {
        environments: vec!["python-data".into()],
        max_timeout_s: 600,
        max_memory_mb: 1024,
        max_cpu_seconds: 30,
        ..ManifestPolicy::default()
    }
}

/// `multipart`: the bytes are a body sent with `multipart/form-data; boundary=XB`.
pub fn multipart(data: &[u8]) -> Result<(), String> {
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    submit_checked(Some(&content_type), data)
}

/// `multipart_any_type`: the first line is the Content-Type header (an empty first line means
/// no header), the rest is the body.
pub fn multipart_any_type(data: &[u8]) -> Result<(), String> {
    let (header, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let header = String::from_utf8_lossy(header);
    let content_type = (!header.is_empty()).then_some(header.as_ref());
    submit_checked(content_type, body)
}

/// `archive_targz`: the first byte chooses how the rest is used. Even: as a gzip stream, so
/// the decompressor is fuzzed. Odd: as tar bytes that the harness gzips, so the fuzzer mutates
/// tar headers directly instead of fighting the compression.
pub fn archive_targz(data: &[u8]) -> Result<(), String> {
    let Some((&mode, rest)) = data.split_first() else {
        return Ok(());
    };
    let compressed = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        gzip(rest)
    };
    extract_checked(ArchiveKind::TarGz, "upload.tar.gz", &compressed)
}

/// `archive_zip`: the bytes are a zip archive.
pub fn archive_zip(data: &[u8]) -> Result<(), String> {
    extract_checked(ArchiveKind::Zip, "upload.zip", data)
}

/// `legacy`: the bytes are a legacy `----Tar` body. Records must survive a round trip through
/// the format, and the whole body is then submitted the way a legacy client sends it.
pub fn legacy(data: &[u8]) -> Result<(), String> {
    let limits = limits();
    let body = Bytes::copy_from_slice(data);
    if let Ok(records) = legacy::parse("body", &body, &limits) {
        let total: usize = records.iter().map(|(_, bytes)| bytes.len()).sum();
        assert!(total <= data.len(), "records hold more bytes than the body");
        let again = legacy::parse("again", &Bytes::from(legacy_body(&records)), &limits);
        assert_eq!(
            again.ok(),
            Some(records),
            "legacy records do not round-trip"
        );
    }
    submit_checked(None, data)
}

/// `manifest`: the bytes are a manifest JSON document, validated against [`policy`] and a fixed
/// upload. An accepted manifest's canonical form must be accepted again, unchanged.
pub fn manifest(data: &[u8]) -> Result<(), String> {
    let files = manifest_files();
    let raw = RawManifest::parse(data).map_err(|e| e.to_string())?;
    let m = Manifest::from_raw(raw, &policy(), &files).map_err(|e| e.to_string())?;
    check_manifest(&m, &policy(), &|p| files.has_file(p));
    let canonical = m.canonical_json();
    let again = RawManifest::parse(&canonical)
        .and_then(|raw| Manifest::from_raw(raw, &policy(), &files))
        .unwrap_or_else(|e| panic!("canonical manifest refused: {e}"));
    assert_eq!(again, m, "canonical manifest does not round-trip");
    assert_eq!(again.canonical_json(), canonical, "canonical form unstable");
    Ok(())
}

/// The upload the `manifest` target validates against.
pub fn manifest_files() -> BundleBuilder {
    let mut files = BundleBuilder::new(caps(&limits()));
    for name in [
        "main.py",
        "index.js",
        "run.sh",
        "src/tool.rb",
        "data/in.csv",
    ] {
        // Invariant: fixed, valid, distinct paths far below the caps.
        let path = BundlePath::new(name).expect("fixed path is valid");
        files
            .add_file(path, 0o644, Bytes::from_static(b"x"))
            .expect("fixed manifest upload builds");
    }
    files
}

/// Parses a submission twice, as one chunk and as small chunks: the outcome must not depend on
/// how the body arrived, and an accepted submission must satisfy every cap.
fn submit_checked(content_type: Option<&str>, body: &[u8]) -> Result<(), String> {
    let limits = limits();
    let whole = submit(content_type, vec![Bytes::copy_from_slice(body)], &limits);
    let step = 1 + body.len() % 13;
    let pieces = body.chunks(step).map(Bytes::copy_from_slice).collect();
    let split = submit(content_type, pieces, &limits);
    match (&whole, &split) {
        (Ok(a), Ok(b)) => assert_eq!(a.job_hash, b.job_hash, "chunking changed the job"),
        (Err(a), Err(b)) => assert_eq!(a.status(), b.status(), "chunking changed: {a} / {b}"),
        _ => panic!(
            "chunking changed the outcome: {:?} / {:?}",
            whole.as_ref().err(),
            split.as_ref().err()
        ),
    }
    match whole {
        Ok(s) => {
            check_submission(&s, &limits);
            Ok(())
        }
        Err(e) => {
            assert!(
                matches!(e.status(), 400 | 413 | 415),
                "not a client error: {} {e}",
                e.status()
            );
            Err(e.to_string())
        }
    }
}

fn submit(
    content_type: Option<&str>,
    chunks: Vec<Bytes>,
    limits: &UploadLimits,
) -> Result<Submission, UploadError> {
    let body = futures_util::stream::iter(chunks.into_iter().map(Ok::<Bytes, Infallible>));
    runtime().block_on(parse_submission(
        content_type,
        body,
        limits,
        &policy(),
        &sandrun_gateway::budget::SharedReservation::unlimited(),
    ))
}

/// One current-thread runtime for every iteration; its blocking pool keeps its thread.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        // Invariant: building a current-thread runtime only fails if the OS refuses a thread,
        // which is not something a fuzz input can cause.
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime")
    })
}

fn extract_checked(kind: ArchiveKind, name: &str, data: &[u8]) -> Result<(), String> {
    let limits = limits();
    let mut builder = BundleBuilder::new(caps(&limits));
    let bytes = Bytes::copy_from_slice(data);
    match archive::extract(kind, name, &bytes, &mut builder, &limits) {
        Ok(()) => {
            let bundle = builder.build();
            check_bundle(&bundle, &limits);
            let cap = archive::expansion_cap(data.len() as u64, &limits);
            assert!(bundle.total_bytes() <= cap, "archive expanded past {cap}");
            Ok(())
        }
        Err(e) => {
            // 413 when the expansion cap refuses it (issue 9), 400 for any other refusal.
            assert!(
                matches!(e.status(), 400 | 413),
                "archive refusal is not a 400 or 413: {e}"
            );
            Err(e.to_string())
        }
    }
}

fn caps(limits: &UploadLimits) -> BundleCaps {
    BundleCaps {
        max_entries: limits.max_files,
        max_bytes: limits.max_uncompressed_bytes,
    }
}

fn check_submission(s: &Submission, limits: &UploadLimits) {
    check_bundle(&s.bundle, limits);
    check_manifest(&s.manifest, &policy(), &|p| s.bundle.file(p).is_some());
    assert_eq!(
        s.job_hash,
        job_hash(&s.manifest, &s.bundle, &s.stdin),
        "job hash not reproducible"
    );
}

/// Caps hold, modes carry permission bits only, and every listed parent directory exists.
fn check_bundle(bundle: &Bundle, limits: &UploadLimits) {
    let entries = bundle.entries();
    assert!(entries.len() <= limits.max_files, "entry cap broken");
    assert!(
        bundle.total_bytes() <= limits.max_uncompressed_bytes,
        "byte cap broken"
    );
    for f in bundle.files() {
        assert_eq!(f.mode & !0o777, 0, "{}: special mode bits", f.path);
        assert_eq!(f.mode & 0o600, 0o600, "{}: owner cannot read/write", f.path);
        assert!(f.path.as_str().len() <= limits.max_path_bytes, "long path");
    }
}

fn check_manifest(m: &Manifest, policy: &ManifestPolicy, has_file: &dyn Fn(&str) -> bool) {
    assert!(has_file(m.entrypoint.as_str()), "entrypoint not uploaded");
    assert!(policy.interpreters.contains(&m.interpreter));
    assert!((1..=policy.max_timeout_s).contains(&m.timeout_s));
    assert!((1..=policy.max_memory_mb).contains(&m.memory_mb));
    assert!((1..=policy.max_cpu_seconds).contains(&m.cpu_seconds));
    for (name, value) in &m.env {
        assert!(!name.starts_with("LD_"), "{name} allowed");
        assert!(!RESERVED_ENV.contains(&name.as_str()), "{name} allowed");
        assert!(!value.contains('\0'), "NUL in env value");
    }
    assert!(m.args.iter().all(|a| !a.contains('\0')), "NUL in args");
}

/// Writes records back in the legacy format.
fn legacy_body(records: &[(String, Bytes)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in records {
        out.extend_from_slice(legacy::MAGIC);
        // Writing into a Vec cannot fail.
        let _ = write!(out, "Path: {name}\nSize: {}\n\n", data.len());
        out.extend_from_slice(data);
    }
    out
}

/// Gzip at the fastest level (the harness only needs valid framing).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}
