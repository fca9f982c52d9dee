//! proptest strategies for every message of the protocol and every type nested in one.

#![allow(dead_code)] // Each test crate uses a different subset.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use sandrun_ipc::{
    AdminRequest, AdminResponse, BundleEntry, BundlePath, ErrorCode, ExitReason, ExitReport,
    GrantedLimits, Hello, IpcError, JobId, JobSpec, LatencySummary, Limits, NetworkPolicy,
    OutputFileHeader, OutputPattern, PrintablePath, Request, RequirementsRecord, Response, Role,
    SandboxInfo, SkipKind, Stats, TemplateInfo, TemplateLock,
};

/// Free text (labels, argv, messages): any characters, including control characters.
fn text() -> impl Strategy<Value = String> {
    "(?s).{0,24}"
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..2048)
}

fn path_component() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_ .ßü-]{1,20}".prop_filter("dot components are refused", |c| c != "." && c != "..")
}

pub fn bundle_path() -> impl Strategy<Value = BundlePath> {
    vec(path_component(), 1..6).prop_map(|c| {
        // Invariant: components are non-empty, short, not dots and free of forbidden characters.
        BundlePath::new(c.join("/")).expect("strategy builds only valid paths")
    })
}

fn pattern_component() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("**".to_owned()),
        "[a-z0-9_.*?-]{1,12}".prop_filter("dot components are refused", |c| c != "." && c != ".."),
    ]
}

pub fn output_pattern() -> impl Strategy<Value = OutputPattern> {
    (vec(pattern_component(), 1..5), any::<bool>()).prop_map(|(c, dir)| {
        let s = if dir {
            format!("{}/", c.join("/"))
        } else {
            c.join("/")
        };
        // Invariant: same as bundle_path, plus glob characters and an optional trailing slash.
        OutputPattern::new(s).expect("strategy builds only valid patterns")
    })
}

/// Strings that [`BundlePath::new`] refuses, of 1 to 300 bytes: traversal, absolute paths,
/// forbidden characters, empty components, and arbitrary junk.
pub fn bad_path_string() -> impl Strategy<Value = String> {
    let good = "[a-z]{1,10}";
    prop_oneof![
        good.prop_map(|g| format!("/{g}")),
        (good, good).prop_map(|(a, b)| format!("{a}/../{b}")),
        good.prop_map(|g| format!("../{g}")),
        (good, good).prop_map(|(a, b)| format!("{a}/./{b}")),
        (good, good).prop_map(|(a, b)| format!("{a}//{b}")),
        (good, good).prop_map(|(a, b)| format!("{a}\0{b}")),
        (good, good).prop_map(|(a, b)| format!("{a}\\{b}")),
        (good, good).prop_map(|(a, b)| format!("{a}\n{b}")),
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just("/".to_owned()),
        "(?s).{1,60}",
    ]
    .prop_filter(
        "only refused, non-empty strings of at most 300 bytes",
        |s| !s.is_empty() && s.len() <= 300 && BundlePath::new(s.as_str()).is_err(),
    )
}

pub fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Submitter), Just(Role::Admin)]
}

pub fn hello() -> impl Strategy<Value = Hello> {
    (any::<u32>(), role()).prop_map(|(protocol_version, role)| Hello {
        protocol_version,
        role,
    })
}

pub fn job_id() -> impl Strategy<Value = JobId> {
    any::<u64>().prop_map(JobId)
}

pub fn limits() -> impl Strategy<Value = Limits> {
    (
        option::of(any::<u64>()),
        option::of(any::<u64>()),
        option::of(any::<u64>()),
        option::of(any::<u32>()),
        option::of(any::<u64>()),
        option::of(any::<u64>()),
        option::of(any::<u32>()),
    )
        .prop_map(
            |(wall_ms, memory_bytes, cpu_ms, pids, output_bytes, tmpfs_bytes, file_count)| Limits {
                wall_ms,
                memory_bytes,
                cpu_ms,
                pids,
                output_bytes,
                tmpfs_bytes,
                file_count,
            },
        )
}

pub fn granted_limits() -> impl Strategy<Value = GrantedLimits> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(
            |(wall_ms, memory_bytes, cpu_ms, pids, output_bytes, tmpfs_bytes, file_count)| {
                GrantedLimits {
                    wall_ms,
                    memory_bytes,
                    cpu_ms,
                    pids,
                    output_bytes,
                    tmpfs_bytes,
                    file_count,
                }
            },
        )
}

pub fn bundle_entry() -> impl Strategy<Value = BundleEntry> {
    prop_oneof![
        (bundle_path(), any::<u32>()).prop_map(|(path, mode)| BundleEntry::Dir { path, mode }),
        (bundle_path(), any::<u32>(), any::<u64>())
            .prop_map(|(path, mode, size)| BundleEntry::File { path, mode, size }),
    ]
}

pub fn job_spec() -> impl Strategy<Value = JobSpec> {
    (
        vec(text(), 0..4),
        vec((text(), text()), 0..4),
        text(),
        vec(bundle_entry(), 0..6),
        limits(),
        vec(output_pattern(), 0..4),
        option::of(text()),
        text(),
        any::<u64>(),
        vec(text(), 0..3),
        any::<bool>(),
    )
        .prop_map(
            |(
                argv,
                env,
                workdir,
                bundle,
                limits,
                outputs,
                template,
                label,
                stdin_bytes,
                requirements,
                build,
            )| JobSpec {
                argv,
                env,
                workdir,
                bundle,
                limits,
                outputs,
                template,
                network: NetworkPolicy::None,
                label,
                stdin_bytes,
                requirements,
                build,
            },
        )
}

pub fn admin_request() -> impl Strategy<Value = AdminRequest> {
    prop_oneof![
        Just(AdminRequest::List),
        job_id().prop_map(AdminRequest::Kill),
        Just(AdminRequest::Stats),
        Just(AdminRequest::Drain),
    ]
}

pub fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        hello().prop_map(Request::Hello),
        job_spec().prop_map(|s| Request::Submit(Box::new(s))),
        bytes().prop_map(Request::BundleChunk),
        Just(Request::BundleEnd),
        Just(Request::Cancel),
        admin_request().prop_map(Request::Admin),
        Just(Request::ListTemplates),
    ]
}

pub fn exit_reason() -> impl Strategy<Value = ExitReason> {
    proptest::sample::select(ExitReason::ALL.to_vec())
}

pub fn requirements_record() -> impl Strategy<Value = RequirementsRecord> {
    (vec(any::<u8>(), 0..64), any::<bool>())
        .prop_map(|(bytes, overflowed)| RequirementsRecord { bytes, overflowed })
}

pub fn exit_report() -> impl Strategy<Value = ExitReport> {
    (
        option::of(any::<i32>()),
        option::of(any::<i32>()),
        exit_reason(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
        option::of(any::<[u8; 32]>()),
        option::of(requirements_record()),
    )
        .prop_map(
            |(
                exit_code,
                signal,
                reason,
                cpu_ms,
                wall_ms,
                memory_peak_bytes,
                stdout_truncated,
                stderr_truncated,
                template_lock,
                requirements,
            )| ExitReport {
                exit_code,
                signal,
                reason,
                cpu_ms,
                wall_ms,
                memory_peak_bytes,
                stdout_truncated,
                stderr_truncated,
                template_lock,
                requirements,
            },
        )
}

pub fn skip_kind() -> impl Strategy<Value = SkipKind> {
    proptest::sample::select(vec![
        SkipKind::Symlink,
        SkipKind::Fifo,
        SkipKind::Socket,
        SkipKind::Device,
        SkipKind::TooLarge,
        SkipKind::TooMany,
        SkipKind::Unreadable,
        SkipKind::InvalidName,
        SkipKind::TooDeep,
    ])
}

pub fn output_file_header() -> impl Strategy<Value = OutputFileHeader> {
    (bundle_path(), any::<u64>(), any::<[u8; 32]>())
        .prop_map(|(path, size, sha256)| OutputFileHeader { path, size, sha256 })
}

/// Every error code, so each one is seen on the wire.
pub const ALL_ERROR_CODES: [ErrorCode; 12] = [
    ErrorCode::VersionMismatch,
    ErrorCode::NotAuthorized,
    ErrorCode::UnexpectedMessage,
    ErrorCode::MalformedFrame,
    ErrorCode::InvalidRequest,
    ErrorCode::Busy,
    ErrorCode::Draining,
    ErrorCode::NotFound,
    ErrorCode::SandboxSetup,
    ErrorCode::ExecFailed,
    ErrorCode::TemplateMissing,
    ErrorCode::Internal,
];

pub fn ipc_error() -> impl Strategy<Value = IpcError> {
    (proptest::sample::select(ALL_ERROR_CODES.to_vec()), text())
        .prop_map(|(code, message)| IpcError::new(code, message))
}

pub fn sandbox_info() -> impl Strategy<Value = SandboxInfo> {
    (
        job_id(),
        text(),
        any::<u32>(),
        any::<i32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(job_id, label, uid_slot, pid, age_ms, cpu_ms, memory_bytes)| SandboxInfo {
                job_id,
                label,
                uid_slot,
                pid,
                age_ms,
                cpu_ms,
                memory_bytes,
            },
        )
}

pub fn latency_summary() -> impl Strategy<Value = LatencySummary> {
    (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
        |(count, p50_us, p99_us, max_us)| LatencySummary {
            count,
            p50_us,
            p99_us,
            max_us,
        },
    )
}

pub fn stats() -> impl Strategy<Value = Stats> {
    (
        (any::<u32>(), any::<u32>(), any::<bool>(), any::<u64>()),
        vec((exit_reason(), any::<u64>()), 0..9),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        latency_summary(),
        any::<u64>(),
    )
        .prop_map(
            |(
                (running, max_concurrent, draining, jobs_started),
                jobs_by_reason,
                (refused_busy, refused_peer, protocol_errors, setup_failures),
                spawn_latency,
                clone3_fallbacks,
            )| Stats {
                running,
                max_concurrent,
                draining,
                jobs_started,
                jobs_by_reason,
                refused_busy,
                refused_peer,
                protocol_errors,
                setup_failures,
                spawn_latency,
                clone3_fallbacks,
            },
        )
}

pub fn admin_response() -> impl Strategy<Value = AdminResponse> {
    prop_oneof![
        vec(sandbox_info(), 0..4).prop_map(AdminResponse::List),
        job_id().prop_map(AdminResponse::Killed),
        stats().prop_map(AdminResponse::Stats),
        any::<u32>().prop_map(|running| AdminResponse::Draining { running }),
    ]
}

pub fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        hello().prop_map(Response::Hello),
        (job_id(), granted_limits())
            .prop_map(|(job_id, limits)| Response::Accepted { job_id, limits }),
        any::<u64>().prop_map(|spawn_us| Response::Started { spawn_us }),
        bytes().prop_map(Response::Stdout),
        bytes().prop_map(Response::Stderr),
        exit_report().prop_map(Response::Exited),
        output_file_header().prop_map(Response::OutputFile),
        bytes().prop_map(Response::OutputChunk),
        (proptest::collection::vec(any::<u8>(), 1..64), skip_kind()).prop_map(|(raw, kind)| {
            Response::OutputSkipped {
                path: PrintablePath::render(&raw),
                kind,
            }
        }),
        Just(Response::Done),
        ipc_error().prop_map(Response::Error),
        admin_response().prop_map(Response::Admin),
        template_info().prop_map(Response::Template),
        any::<u32>().prop_map(|omitted| Response::TemplatesEnd { omitted }),
    ]
}

pub fn template_info() -> impl Strategy<Value = TemplateInfo> {
    (
        text(),
        option::of(
            (any::<[u8; 32]>(), bytes()).prop_map(|(sha256, bytes)| TemplateLock { sha256, bytes }),
        ),
    )
        .prop_map(|(name, lock)| TemplateInfo { name, lock })
}
