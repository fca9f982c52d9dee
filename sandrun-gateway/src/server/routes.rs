//! The router and the JSON endpoints. Paths and field names follow the original Sandrun API so
//! its clients keep working; `docs/api.md` documents each one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::json;

use crate::budget::{BudgetFull, Reservation, SharedReservation};
use crate::jobs::{DeleteOutcome, Job, JobStatus, StreamKind};
use crate::ratelimit::ClientKey;
use crate::server::params::{client_key, job_id};
use crate::server::refusals::{answer_refusal, budget_refusal, LOAD_RETRY};
use crate::server::response::{bytes_response, json, ApiError, ApiResult, Body};
use crate::server::submit::submit;
use crate::server::templates::{usable_templates, Age};
use crate::server::text::base64;
use crate::server::{outputs, run, ui, ws, ConnInfo};
use crate::state::AppState;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Answers one request. Never fails: errors become JSON responses.
pub async fn handle(
    state: Arc<AppState>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> Response<Body> {
    let client = client_key(&state, conn.peer, &req);
    let changes_state = !matches!(*req.method(), Method::GET | Method::HEAD);
    let response = match route(Arc::clone(&state), conn, req).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    charge_answer(&state, client, changes_state, response)
}

/// Charges an answer's body to its caller before it is handed to the connection, where it may
/// wait as long as the caller does not read, and keeps it charged until its last chunk is
/// handed over or the connection is dropped. This is the one place every answer passes: a body
/// that already holds a charge (a job's outputs, `/logs`, `/run`) or is compiled in (the web
/// UI) is left as it is.
///
/// A caller past its share (or a full budget) gets the refusal, 429 (or 503) JSON, instead of
/// the answer to a GET. The answer to a request that changed something (a submission, a
/// cancellation) is charged as held, even past the limits: refusing it would hide what was
/// done, and the bytes exist either way, so the budget counts them and refuses others.
/// The refusal itself is a fixed-size text, not charged.
fn charge_answer(
    state: &AppState,
    client: ClientKey,
    changes_state: bool,
    mut response: Response<Body>,
) -> Response<Body> {
    let Some(bytes) = response.body().uncharged_bytes() else {
        return response;
    };
    let budget = state.jobs.budget();
    let charge = if changes_state {
        let held = SharedReservation::new(budget.empty(client));
        held.charge_held(bytes);
        held
    } else {
        match budget.reserve(client, bytes) {
            Ok(charge) => SharedReservation::new(charge),
            Err(full) => return answer_refusal(state, full).into_response(),
        }
    };
    response.body_mut().hold(charge);
    response
}

async fn route(state: Arc<AppState>, conn: ConnInfo, req: Request<Incoming>) -> ApiResult {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').splitn(3, '/').collect();
    let method = req.method().clone();
    match (segments.as_slice(), method) {
        ([""], Method::GET) if ui::prefers_html(&req) => Ok(ui::index(&req)),
        ([""], Method::GET) => Ok(service_info(&state).await),
        (["ui"], Method::GET) => ui::serve(&req, None),
        (["ui", name], Method::GET) => ui::serve(&req, Some(name)),
        (["submit"], Method::POST) => submit(&state, conn.peer, req).await.map(|(_, r)| r),
        (["run"], Method::POST) => run::run(&state, conn.peer, req).await,
        (["status", id], Method::GET) => status(&state, id),
        (["logs", id], Method::GET) => logs(&state, client_key(&state, conn.peer, &req), id),
        (["outputs", id], Method::GET) => outputs::list(&state, id),
        // The original trusted-pool coordinator fetches a file here.
        (["outputs", id, file], Method::GET) => outputs::file(&state, id, file),
        (["download", id], Method::GET) => outputs::tarball(&state, id).await,
        (["download", id, file], Method::GET) => outputs::file(&state, id, file),
        (["jobs", id], Method::DELETE) => delete(&state, id),
        (["stats"], Method::GET) => Ok(stats(&state, &conn, &client_key(&state, conn.peer, &req))),
        (["environments"], Method::GET) => environments(&state).await,
        (["health"], Method::GET) => Ok(health(&state)),
        (["metrics"], Method::GET) => Ok(metrics(&state)),
        (["ws" | "stream", id], Method::GET) => ws::upgrade(&state, conn, id, req),
        (known, _) => Err(wrong_method_or_unknown(known)),
    }
}

fn wrong_method_or_unknown(segments: &[&str]) -> ApiError {
    let allow = match segments {
        [""] | ["stats" | "environments" | "health" | "metrics" | "ui"] | ["ui", _] => "GET",
        ["submit" | "run"] => "POST",
        ["status" | "logs" | "outputs" | "ws" | "stream", _] => "GET",
        ["download", _] | ["download" | "outputs", _, _] => "GET",
        ["jobs", _] => "DELETE",
        _ => return ApiError::not_found("endpoint"),
    };
    ApiError::method_not_allowed(allow)
}

async fn service_info(state: &AppState) -> Response<Body> {
    let c = &state.config;
    // The templates a job may name now (built, with a lock, and allowed): `null` with the reason
    // when the helper cannot be asked, never a made-up list.
    let (built, built_error) = match usable_templates(state, Age::Cached).await {
        Ok(list) => {
            let names: Vec<String> = list.into_iter().map(|t| t.name).collect();
            (json!(names), serde_json::Value::Null)
        }
        Err(e) => (serde_json::Value::Null, json!(e)),
    };
    let body = json!({
        // The original clients' connection test checks for "sandrun".
        "service": "sandrun",
        "gateway": "sandrun-gateway",
        "status": "running",
        "version": VERSION,
        "worker_id": state.worker_key.worker_id(),
        "worker_id_hex": state.worker_key.worker_id_hex(),
        "limits": {
            "max_upload_bytes": c.max_body_bytes,
            "max_timeout_s": c.policy.max_timeout_s,
            "max_memory_mb": c.policy.max_memory_mb,
            "max_cpu_seconds": c.policy.max_cpu_seconds,
            "cpu_seconds_per_minute": c.client_limits.cpu_seconds_per_minute,
            "concurrent_jobs": c.client_limits.concurrent_jobs,
            "jobs_per_hour": c.client_limits.jobs_per_hour,
            "queue_capacity": c.queue_capacity,
            "result_ttl_s": c.retention.ttl_s,
            "failed_result_ttl_s": c.retention.failed_ttl_s,
        },
        "interpreters": c.policy.interpreters,
        // The names a manifest's `environment` may take now; `GET /environments` has the details.
        "environments": built,
        "environments_error": built_error,
        // The gateway's allow-list (`[policy] environments`); empty: every built template.
        "environments_allowed": c.policy.environments,
        "endpoints": [
            "GET /", "POST /submit", "POST /run", "GET /status/{id}", "GET /logs/{id}", "GET /outputs/{id}",
            "GET /outputs/{id}/{path}", "GET /download/{id}", "GET /download/{id}/{path}",
            "DELETE /jobs/{id}", "GET /stats",
            "GET /environments", "GET /health", "GET /metrics", "GET /ws/{id}", "GET /stream/{id}",
        ],
    });
    let mut response = json(StatusCode::OK, &body);
    // Browsers get the web UI at this path instead (`ui::prefers_html`).
    response
        .headers_mut()
        .insert(hyper::header::VARY, HeaderValue::from_static("Accept"));
    response
}

/// `GET /environments`: the built templates, asked of the helper, each with its lock hash,
/// interpreter and packages (from its `sandrun-lock.json`).
async fn environments(state: &AppState) -> ApiResult {
    let list = usable_templates(state, Age::Cached).await.map_err(|e| {
        ApiError::unavailable(format!("the template list is unavailable: {e}"), LOAD_RETRY)
    })?;
    let names: Vec<&str> = list.iter().map(|t| t.name.as_str()).collect();
    let details: Vec<serde_json::Value> = list
        .iter()
        .filter_map(|t| t.lock.as_ref().map(|l| (t, l)))
        .map(|(t, lock)| {
            let packages: Vec<serde_json::Value> = lock.json["packages"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .map(|p| json!({"name": p["name"], "version": p["version"], "sha256": p["sha256"]}))
                        .collect()
                })
                .unwrap_or_default();
            let npm: Vec<serde_json::Value> = lock.json["npm"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .map(|p| json!({"name": p["name"], "version": p["version"], "integrity": p["integrity"]}))
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "name": t.name,
                "lock_sha256": hex::encode(lock.sha256),
                "interpreter": lock.json["interpreter"],
                "packages": packages,
                "node": lock.json["node"],
                "npm": npm,
                "built_at": lock.json["built_at"],
            })
        })
        .collect();
    // `templates` and `stats` are the original's names for the same list.
    let body = json!({
        "environments": names,
        "details": details,
        "interpreters": state.config.policy.interpreters,
        "templates": names,
        "stats": { "total_templates": names.len() },
    });
    Ok(json(StatusCode::OK, &body))
}

fn health(state: &AppState) -> Response<Body> {
    let body = json!({
        // The original's value; a pool coordinator compares `worker_id` with its configuration.
        "status": "healthy",
        "worker_id": state.worker_key.worker_id(),
        "worker_id_hex": state.worker_key.worker_id_hex(),
        "version": VERSION,
    });
    json(StatusCode::OK, &body)
}

fn metrics(state: &AppState) -> Response<Body> {
    let text = state.metrics.render(state.gauges());
    bytes_response(
        StatusCode::OK,
        "text/plain; version=0.0.4",
        Bytes::from(text),
    )
}

fn stats(state: &AppState, conn: &ConnInfo, client: &ClientKey) -> Response<Body> {
    let now = Instant::now();
    let quota = state.limiter().quota(*client, now);
    let refusal = state.limiter().check(*client, now).err();
    let counts = state.jobs.counts();
    #[allow(clippy::cast_precision_loss)] // a display value
    let cpu_limit = quota.cpu_seconds_per_minute_limit as f64;
    let body = json!({
        "client": client.to_string(),
        "quota": quota,
        // The original's shape of the same numbers (CPU seconds in the sliding minute).
        "your_quota": {
            "used": quota.cpu_seconds_last_minute,
            "limit": cpu_limit,
            "available": (cpu_limit - quota.cpu_seconds_last_minute).max(0.0),
            "active_jobs": quota.active_jobs,
            "can_submit": refusal.is_none(),
            "reason": refusal.map_or("", |r| r.kind.as_str()),
        },
        "system": {
            "queue_length": counts.queued,
            "queue_capacity": counts.queue_capacity,
            "running": counts.running,
            "active_jobs": counts.running,
            "max_running": state.config.max_running,
            "finished_held": counts.finished,
            "memory_used_bytes": state.jobs.budget().used(),
            "memory_budget_bytes": state.jobs.budget().limit(),
        },
        "memory": {
            "used_bytes": state.jobs.budget().used_by(client),
            "share_bytes": state.jobs.budget().share(),
            // Of `system.memory_used_bytes` (and of `used_bytes` when the caller is the
            // connection's own address): this connection's HTTP/2 window.
            "this_connection_bytes": conn.window_charge,
        },
    });
    json(StatusCode::OK, &body)
}

#[derive(Serialize)]
struct ExecutionMetadata<'a> {
    cpu_seconds: Option<f64>,
    memory_peak_bytes: Option<u64>,
    memory_peak_mb: Option<f64>,
    wall_time_ms: Option<u64>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    environment: Option<&'a str>,
    interpreter: &'a str,
}

#[derive(Serialize)]
struct OutputFileInfo {
    size_bytes: u64,
    sha256: String,
    #[serde(rename = "type")]
    kind: &'static str,
}

fn status(state: &AppState, id: &str) -> ApiResult {
    let id = job_id(id)?;
    let worker_id = [
        state.worker_key.worker_id(),
        state.worker_key.worker_id_hex(),
    ];
    state
        .jobs
        .with_job(id, |job, position| {
            json(StatusCode::OK, &status_body(job, position, &worker_id))
        })
        .ok_or_else(|| ApiError::not_found("job"))
}

/// `worker_id`: the public key in base64 (the original's form) and in hex.
pub(super) fn status_body(
    job: &Job,
    position: Option<usize>,
    worker_id: &[String; 2],
) -> serde_json::Value {
    let exit = job.exit.as_ref();
    #[allow(clippy::cast_precision_loss)] // display values; exact integers are alongside
    let metadata = ExecutionMetadata {
        cpu_seconds: exit.map(|e| e.cpu_ms as f64 / 1000.0),
        memory_peak_bytes: exit.map(|e| e.memory_peak_bytes),
        memory_peak_mb: exit.map(|e| e.memory_peak_bytes as f64 / f64::from(1 << 20)),
        wall_time_ms: exit.map(|e| e.wall_ms),
        exit_code: exit.and_then(|e| e.exit_code),
        signal: exit.and_then(|e| e.signal),
        environment: job.info.environment.as_deref(),
        interpreter: &job.info.interpreter,
    };
    let output_files: serde_json::Map<String, serde_json::Value> = job
        .outputs
        .iter()
        .map(|o| {
            let info = OutputFileInfo {
                size_bytes: o.data.len() as u64,
                sha256: hex::encode(o.sha256),
                kind: outputs::file_kind(&o.path),
            };
            (
                o.path.clone(),
                serde_json::to_value(info).unwrap_or_default(),
            )
        })
        .collect();
    json!({
        "job_id": job.id.to_string(),
        "status": job.status,
        "reason": job.reason.map(sandrun_ipc::ExitReason::as_str),
        "message": job.message,
        "queue_position": position,
        // The original frontends and MCP server read these summaries.
        "metrics": {
            "cpu_seconds": metadata.cpu_seconds,
            "memory_mb": metadata.memory_peak_mb,
            "wall_time_ms": metadata.wall_time_ms,
        },
        "cpu_seconds": metadata.cpu_seconds,
        "memory_bytes": metadata.memory_peak_bytes,
        "wall_time": metadata.wall_time_ms,
        "execution_metadata": metadata,
        "cpu_ms": exit.map(|e| e.cpu_ms),
        "job_hash": hex::encode(job.info.job_hash),
        "output_files": output_files,
        "skipped_outputs": job.skipped,
        "completed_at": job.completed_at_unix,
        // The template's lock hash, as the helper read it from the job's own `/env`; signed
        // (format `sandrun-result-v2`) with the result.
        "environment": job.info.environment,
        "environment_lock": exit.and_then(|e| e.template_lock).map(hex::encode),
        // What the job's requirements installed from the wheelhouse (signed, format
        // `sandrun-result-v3`), or why they failed; null for a job without requirements.
        "requirements": job.requirements.as_ref().map(|r| json!({
            "installed": r.installed.iter().map(|p| json!({
                "name": p.name,
                "version": p.version,
                "wheel": p.wheel,
                "sha256": hex::encode(p.sha256),
            })).collect::<Vec<_>>(),
            "error": r.error,
        })),
        "worker_metadata": {
            "worker_id": worker_id[0],
            "worker_id_hex": worker_id[1],
            "signature": job.signature,
            "signature_format": job.signature.as_ref().map(|_| {
                if job.requirements.is_some() {
                    crate::signing::RESULT_DOMAIN_V3
                } else if job.info.environment.is_some() {
                    crate::signing::RESULT_DOMAIN_V2
                } else {
                    crate::signing::RESULT_DOMAIN
                }
            }),
        },
    })
}

fn logs(state: &AppState, client: ClientKey, id: &str) -> ApiResult {
    let id = job_id(id)?;
    // Every copy this answer makes is charged to the caller before it is made, and the JSON
    // stays charged until its last byte is handed to the connection: a caller that never
    // reads its answers cannot hold copies of a job's logs outside the budget.
    let mut charge = state.jobs.budget().empty(client);
    let copied = state
        .jobs
        .with_job(id, |job, _| {
            let [stdout, stderr] = charged_logs(job, &mut charge)?;
            let truncated = [job.stdout_truncated, job.stderr_truncated];
            Ok((job.status, [stdout, stderr], truncated))
        })
        .ok_or_else(|| ApiError::not_found("job"))?;
    let (status, [stdout, stderr], truncated) =
        copied.map_err(|full| budget_refusal(state, full))?;
    let [(stdout, stdout_base64), (stderr, stderr_base64)] =
        log_texts([stdout, stderr], &mut charge).map_err(|full| budget_refusal(state, full))?;
    let body = LogsBody {
        job_id: id.to_string(),
        status,
        stdout,
        stderr,
        stdout_base64,
        stderr_base64,
        stdout_truncated: truncated[0],
        stderr_truncated: truncated[1],
    };
    charged_json(body, charge).map_err(|full| budget_refusal(state, full))
}

/// Copies a job's two log streams, charging their size to `charge` first.
pub(super) fn charged_logs(
    job: &Job,
    charge: &mut Reservation,
) -> Result<[Vec<u8>; 2], BudgetFull> {
    charge.try_grow(job.stdout_bytes.saturating_add(job.stderr_bytes))?;
    Ok([StreamKind::Stdout, StreamKind::Stderr].map(|k| job.log_bytes(k)))
}

/// Both logs as text and base64, `[(stdout, stdout_base64), (stderr, stderr_base64)]`, the
/// bytes of those renderings charged to `charge` before they are made.
pub(super) fn log_texts(
    logs: [Vec<u8>; 2],
    charge: &mut Reservation,
) -> Result<[(String, String); 2], BudgetFull> {
    let texts = logs.map(LogText::from);
    charge.try_grow(texts.iter().map(LogText::extra_bytes).sum())?;
    Ok(texts.map(LogText::into_parts))
}

/// One log stream on its way to becoming JSON text: its exact bytes, and how many bytes its
/// text and base64 forms take beyond them, known before either is made.
struct LogText {
    bytes: Vec<u8>,
    /// Bytes of the lossy text when it cannot reuse `bytes` (invalid UTF-8), else 0.
    lossy_len: usize,
    base64_len: usize,
}

impl From<Vec<u8>> for LogText {
    fn from(bytes: Vec<u8>) -> LogText {
        let lossy_len = if std::str::from_utf8(&bytes).is_ok() {
            0
        } else {
            // Each invalid sequence becomes U+FFFD, three bytes.
            bytes
                .utf8_chunks()
                .map(|c| c.valid().len() + if c.invalid().is_empty() { 0 } else { 3 })
                .sum()
        };
        let base64_len = bytes.len().div_ceil(3) * 4;
        LogText {
            bytes,
            lossy_len,
            base64_len,
        }
    }
}

impl LogText {
    /// The bytes [`LogText::into_parts`] makes beyond the stream's own.
    pub(super) fn extra_bytes(&self) -> u64 {
        (self.lossy_len + self.base64_len) as u64
    }

    /// The stream as lossy text (reusing the bytes when they are UTF-8) and as base64.
    pub(super) fn into_parts(self) -> (String, String) {
        let encoded = base64(&self.bytes);
        let text = match String::from_utf8(self.bytes) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        (text, encoded)
    }
}

/// Counts bytes written, for sizing a JSON answer before it is made.
#[derive(Default)]
struct Counter(u64);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A 200 JSON answer of `body`, whose serialized size is charged to `charge` before it is made:
/// `charge` already holds what `body` owns, which is released once the JSON is made; the JSON
/// itself stays charged until the answer's last byte is handed to the connection.
pub(super) fn charged_json<T: Serialize>(
    body: T,
    mut charge: Reservation,
) -> Result<Response<Body>, BudgetFull> {
    let mut counter = Counter::default();
    // Serializing these bodies cannot fail (string keys, no maps with other keys).
    let _ = serde_json::to_writer(&mut counter, &body);
    charge.try_grow(counter.0)?;
    let mut out = Vec::with_capacity(usize::try_from(counter.0).unwrap_or(0));
    let _ = serde_json::to_writer(&mut out, &body);
    drop(body);
    charge.shrink(charge.bytes().saturating_sub(out.len() as u64));
    let mut response = bytes_response(StatusCode::OK, "application/json", Bytes::from(out));
    response.body_mut().hold(SharedReservation::new(charge));
    Ok(response)
}

/// The `/logs` answer: each stream as lossy text and as exact bytes in base64.
#[derive(Serialize)]
struct LogsBody {
    job_id: String,
    status: JobStatus,
    stdout: String,
    stderr: String,
    stdout_base64: String,
    stderr_base64: String,
    stdout_truncated: bool,
    stderr_truncated: bool,
}

fn delete(state: &AppState, id: &str) -> ApiResult {
    let id = job_id(id)?;
    let failed_ttl = state.config.ttl(true);
    let (status, action) = match state.jobs.cancel_or_delete(id, failed_ttl) {
        DeleteOutcome::NotFound => return Err(ApiError::not_found("job")),
        DeleteOutcome::CancelledQueued(client) => {
            state.limiter().finish(client, 0, Instant::now());
            state
                .metrics
                .job_finished("failed", "cancelled", Duration::ZERO);
            (Some(JobStatus::Failed), "cancelled")
        }
        DeleteOutcome::CancellingRunning => (Some(JobStatus::Running), "cancelling"),
        DeleteOutcome::Deleted => (None, "deleted"),
    };
    let body = json!({ "job_id": id.to_string(), "action": action, "status": status });
    let mut response = json(StatusCode::OK, &body);
    response
        .headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    Ok(response)
}
