//! Admin commands: `ps`, `kill`, `stats`, `drain`.

use std::path::Path;

use sandrun_ipc::{
    AdminRequest, AdminResponse, JobId, Request, Response, Role, SandboxInfo, Stats,
};

use crate::conn;
use crate::error::CtlError;

pub(crate) fn ps(socket: &Path, json: bool) -> Result<i32, CtlError> {
    let resp = request(socket, AdminRequest::List)?;
    match &resp {
        AdminResponse::List(jobs) => print_or_json(&resp, json, || print_jobs(jobs)),
        _ => Err(wrong_answer("listing jobs")),
    }
}

pub(crate) fn kill(socket: &Path, id: u64, json: bool) -> Result<i32, CtlError> {
    let resp = request(socket, AdminRequest::Kill(JobId(id)))?;
    match &resp {
        AdminResponse::Killed(id) => print_or_json(&resp, json, || println!("killed job {id}")),
        _ => Err(wrong_answer("killing a job")),
    }
}

pub(crate) fn stats(socket: &Path, json: bool) -> Result<i32, CtlError> {
    let resp = request(socket, AdminRequest::Stats)?;
    match &resp {
        AdminResponse::Stats(s) => print_or_json(&resp, json, || print_stats(s)),
        _ => Err(wrong_answer("reading stats")),
    }
}

pub(crate) fn drain(socket: &Path, json: bool) -> Result<i32, CtlError> {
    let resp = request(socket, AdminRequest::Drain)?;
    match &resp {
        AdminResponse::Draining { running } => print_or_json(&resp, json, || {
            println!("draining: new jobs are refused; {running} still running")
        }),
        _ => Err(wrong_answer("draining")),
    }
}

/// Sends one admin request on a fresh connection and returns the answer.
pub(crate) fn request(socket: &Path, req: AdminRequest) -> Result<AdminResponse, CtlError> {
    let mut chan = conn::connect(socket, Role::Admin)?;
    conn::send(&mut chan, &Request::Admin(req), "sending admin request")?;
    match conn::recv(&mut chan, "waiting for admin answer")? {
        Response::Admin(a) => Ok(a),
        other => Err(conn::unexpected("waiting for admin answer", &other)),
    }
}

fn wrong_answer(step: &'static str) -> CtlError {
    CtlError::Protocol {
        step,
        detail: "the admin answer does not match the request".into(),
    }
}

fn print_or_json(resp: &AdminResponse, json: bool, human: impl FnOnce()) -> Result<i32, CtlError> {
    if json {
        let text = serde_json::to_string(resp).map_err(|e| CtlError::Protocol {
            step: "printing JSON",
            detail: e.to_string(),
        })?;
        println!("{text}");
    } else {
        human();
    }
    Ok(0)
}

fn print_jobs(jobs: &[SandboxInfo]) {
    println!(
        "{:>8} {:>6} {:>8} {:>10} {:>10} {:>10}  LABEL",
        "JOB", "SLOT", "PID", "AGE_S", "CPU_MS", "MEM_KIB"
    );
    for j in jobs {
        println!(
            "{:>8} {:>6} {:>8} {:>10.1} {:>10} {:>10}  {}",
            j.job_id.0,
            j.uid_slot,
            j.pid,
            ms_as_secs(j.age_ms),
            j.cpu_ms,
            j.memory_bytes / 1024,
            j.label.escape_debug()
        );
    }
}

fn ms_as_secs(ms: u64) -> f64 {
    // Display only: precision loss above 2^53 ms is irrelevant.
    #[allow(clippy::cast_precision_loss)]
    let s = ms as f64 / 1000.0;
    s
}

fn print_stats(s: &Stats) {
    println!("running          {} / {}", s.running, s.max_concurrent);
    println!("draining         {}", s.draining);
    println!("jobs started     {}", s.jobs_started);
    for (reason, n) in &s.jobs_by_reason {
        println!("  ended {:<14} {n}", reason.as_str());
    }
    println!("refused busy     {}", s.refused_busy);
    println!("refused peer     {}", s.refused_peer);
    println!("protocol errors  {}", s.protocol_errors);
    println!("setup failures   {}", s.setup_failures);
    println!("clone3 fallbacks {}", s.clone3_fallbacks);
    let l = &s.spawn_latency;
    println!(
        "spawn latency    n={} p50={}us p99={}us max={}us",
        l.count, l.p50_us, l.p99_us, l.max_us
    );
}
