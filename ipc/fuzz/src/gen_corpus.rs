//! Writes the seed corpus of `decode_frame` from real encoded messages.
//!
//! `cargo run --bin gen_corpus` (from `ipc/fuzz`) rewrites `corpus/decode_frame/seed-*`. File
//! names start with `req-`, `resp-` or `edge-`, which `ipc/tests/fuzz_corpus.rs` relies on.

use std::path::PathBuf;
use std::process::ExitCode;

use sandrun_ipc::{
    encode, AdminRequest, AdminResponse, BundleEntry, BundlePath, ErrorCode, ExitReason,
    ExitReport, GrantedLimits, Hello, IpcError, JobId, JobSpec, LatencySummary, Limits,
    NetworkPolicy, OutputFileHeader, OutputPattern, PrintablePath, Request, Response, Role,
    SandboxInfo, SkipKind, Stats, TemplateInfo, TemplateLock, PROTOCOL_VERSION,
};

fn main() -> ExitCode {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/decode_frame");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("gen_corpus: creating {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let seeds = match seeds() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gen_corpus: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (name, bytes) in &seeds {
        let path = dir.join(format!("seed-{name}"));
        if let Err(e) = std::fs::write(&path, bytes) {
            eprintln!("gen_corpus: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    println!("wrote {} seeds to {}", seeds.len(), dir.display());
    ExitCode::SUCCESS
}

type Seeds = Vec<(String, Vec<u8>)>;

fn seeds() -> Result<Seeds, Box<dyn std::error::Error>> {
    let mut out = Seeds::new();
    let requests = requests()?;
    let responses = responses()?;
    for (i, r) in requests.iter().enumerate() {
        out.push((format!("req-{i:02}"), encode(r)?));
    }
    for (i, r) in responses.iter().enumerate() {
        out.push((format!("resp-{i:02}"), encode(r)?));
    }
    out.push(("req-conversation".into(), concat(&requests[..6])?));
    out.push(("resp-conversation".into(), concat(&responses[..11])?));
    out.push(("edge-4gib-header".into(), u32::MAX.to_le_bytes().to_vec()));
    let mut truncated = encode(&requests[1])?;
    truncated.truncate(truncated.len() / 2);
    out.push(("edge-truncated-submit".into(), truncated));
    let mut trailing = encode(&Request::Cancel)?;
    trailing[0] += 1;
    trailing.push(0);
    out.push(("edge-trailing-byte".into(), trailing));
    Ok(out)
}

fn concat<T: serde::Serialize>(msgs: &[T]) -> Result<Vec<u8>, sandrun_ipc::CodecError> {
    let mut out = Vec::new();
    for m in msgs {
        out.extend(encode(m)?);
    }
    Ok(out)
}

fn requests() -> Result<Vec<Request>, Box<dyn std::error::Error>> {
    let spec = JobSpec {
        argv: vec!["python3".into(), "main.py".into()],
        env: vec![("LANG".into(), "C.UTF-8".into())],
        workdir: String::new(),
        bundle: vec![
            BundleEntry::Dir {
                path: BundlePath::new("src")?,
                mode: 0o755,
            },
            BundleEntry::File {
                path: BundlePath::new("main.py")?,
                mode: 0o644,
                size: 5,
            },
            BundleEntry::File {
                path: BundlePath::new("src/util.py")?,
                mode: 0o600,
                size: 3,
            },
        ],
        limits: Limits {
            wall_ms: Some(5_000),
            memory_bytes: Some(256 << 20),
            ..Limits::default()
        },
        outputs: vec![
            OutputPattern::new("*.png")?,
            OutputPattern::new("results/")?,
        ],
        template: Some("python".into()),
        network: NetworkPolicy::None,
        label: "job-1".into(),
        stdin_bytes: 4,
        requirements: vec!["six==1.17.0".to_owned()],
        build: false,
    };
    Ok(vec![
        Request::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            role: Role::Submitter,
        }),
        Request::Submit(Box::new(spec)),
        Request::BundleChunk(b"print".to_vec()),
        Request::BundleChunk(b"1\n2".to_vec()),
        // The job's 4 bytes of stdin follow the files' contents.
        Request::BundleChunk(b"in\n!".to_vec()),
        Request::BundleEnd,
        Request::Cancel,
        Request::Admin(AdminRequest::List),
        Request::Admin(AdminRequest::Kill(JobId(42))),
        Request::Admin(AdminRequest::Stats),
        Request::Admin(AdminRequest::Drain),
        Request::ListTemplates,
    ])
}

fn responses() -> Result<Vec<Response>, Box<dyn std::error::Error>> {
    let limits = GrantedLimits {
        wall_ms: 5_000,
        memory_bytes: 256 << 20,
        cpu_ms: 10_000,
        pids: 64,
        output_bytes: 1 << 20,
        tmpfs_bytes: 64 << 20,
        file_count: 4096,
    };
    let report = ExitReport {
        exit_code: Some(0),
        signal: None,
        reason: ExitReason::None,
        cpu_ms: 12,
        wall_ms: 40,
        memory_peak_bytes: 9 << 20,
        stdout_truncated: false,
        stderr_truncated: true,
        template_lock: None,
        requirements: None,
    };
    let stats = Stats {
        running: 1,
        max_concurrent: 8,
        jobs_by_reason: ExitReason::ALL.iter().map(|r| (*r, 1)).collect(),
        spawn_latency: LatencySummary {
            count: 3,
            p50_us: 900,
            p99_us: 2000,
            max_us: 2100,
        },
        clone3_fallbacks: 2,
        ..Stats::default()
    };
    let info = SandboxInfo {
        job_id: JobId(1),
        label: "job-1".into(),
        uid_slot: 3,
        pid: 1234,
        age_ms: 50,
        cpu_ms: 10,
        memory_bytes: 1 << 20,
    };
    Ok(vec![
        Response::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            role: Role::Submitter,
        }),
        Response::Accepted {
            job_id: JobId(1),
            limits,
        },
        Response::Started { spawn_us: 1500 },
        Response::Stdout(b"hello\n".to_vec()),
        Response::Stderr(b"warning\n".to_vec()),
        Response::Exited(report),
        Response::OutputFile(OutputFileHeader {
            path: BundlePath::new("results/a.csv")?,
            size: 4,
            sha256: [0xab; 32],
        }),
        Response::OutputChunk(b"1,2\n".to_vec()),
        Response::OutputSkipped {
            path: PrintablePath::render(b"plot.png"),
            kind: SkipKind::Symlink,
        },
        Response::OutputSkipped {
            path: PrintablePath::render(b"bad\nname\xff"),
            kind: SkipKind::InvalidName,
        },
        Response::Error(IpcError::new(ErrorCode::Busy, "all slots in use")),
        Response::Done,
        Response::Admin(AdminResponse::List(vec![info])),
        Response::Admin(AdminResponse::Killed(JobId(1))),
        Response::Admin(AdminResponse::Stats(stats)),
        Response::Template(TemplateInfo {
            name: "data-science".into(),
            lock: Some(TemplateLock {
                sha256: [0x5a; 32],
                bytes: b"{\"format\":\"sandrun-lock/1\"}\n".to_vec(),
            }),
        }),
        Response::Template(TemplateInfo {
            name: "bare".into(),
            lock: None,
        }),
        Response::TemplatesEnd { omitted: 1 },
        Response::Admin(AdminResponse::Draining { running: 2 }),
    ])
}
