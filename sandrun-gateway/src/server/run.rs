//! `POST /run`: `/submit` and then waiting for the job, in one request.
//!
//! The body, the quotas, the limits and the queue are exactly those of `/submit` (the same
//! code). Then the request waits, at most `wait` seconds (`?wait=SECONDS`, cut to
//! `run_max_wait_s`), for the job to end, and answers 200 with its final status, logs and
//! outputs list; a job still queued or running then gets 202 with its id and where to follow
//! it. The job belongs to the job table, not to this request: a client that goes away while
//! it waits loses nothing (the job keeps running and is retrievable by its id, like any
//! `/submit`ted job). The waiting request holds its connection, and so the client's
//! connection share, for as long as it waits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, LOCATION};
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use tokio::time::Instant;

use crate::jobs::JobId;
use crate::ratelimit::ClientKey;
use crate::server::outputs::listed;
use crate::server::params::client_key;
use crate::server::refusals::budget_refusal;
use crate::server::response::{json, ApiError, ApiResult, Body};
use crate::server::routes::{charged_json, charged_logs, log_texts, status_body};
use crate::server::submit::{discard_behind, submit};
use crate::state::AppState;

/// `POST /run[?wait=SECONDS]`.
pub async fn run(state: &Arc<AppState>, peer: SocketAddr, req: Request<Incoming>) -> ApiResult {
    let wait = match requested_wait(req.uri().query(), state.config.run_max_wait_s) {
        Ok(wait) => wait,
        Err(refusal) => {
            let idle = Duration::from_millis(state.config.http.body_idle_timeout_ms);
            discard_behind(req, idle);
            return Err(refusal);
        }
    };
    let client = client_key(state, peer, &req);
    let (id, submitted) = submit(state, peer, req).await?;
    let deadline = Instant::now() + wait;
    let mut response = match wait_for_end(state, id, deadline).await {
        Some(true) => finished(state, client, id)?,
        Some(false) => still_going(state, id, wait)?,
        None => return Err(ApiError::not_found("job (deleted while waiting)")),
    };
    // The submission's quota headers (header names are lowercase in hyper).
    let quota: Vec<_> = (submitted.headers().iter())
        .filter(|(name, _)| name.as_str().starts_with("ratelimit-"))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    response.headers_mut().extend(quota);
    Ok(response)
}

/// The `wait` query parameter in whole seconds, cut to `max_s`; absent means `max_s`.
fn requested_wait(query: Option<&str>, max_s: u64) -> Result<Duration, ApiError> {
    let mut wait = None;
    for pair in query.unwrap_or_default().split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "wait" {
            continue;
        }
        if wait.is_some() {
            return Err(ApiError::bad_request("wait: given more than once"));
        }
        let seconds = value
            .parse::<u64>()
            .ok()
            .filter(|_| !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()));
        match seconds {
            Some(s) => wait = Some(s),
            None => {
                return Err(ApiError::bad_request(
                    "wait: must be a whole number of seconds",
                ))
            }
        }
    }
    Ok(Duration::from_secs(wait.unwrap_or(max_s).min(max_s)))
}

/// Waits until the job has ended (`Some(true)`), the deadline passed (`Some(false)`) or the
/// job is gone (`None`).
async fn wait_for_end(state: &AppState, id: JobId, deadline: Instant) -> Option<bool> {
    // Subscribed before the first look, so no change between the two is missed.
    let mut changes = state.jobs.subscribe(id)?;
    loop {
        let ended = state.jobs.with_job(id, |job, _| job.status.is_finished())?;
        if ended {
            return Some(true);
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    // The job was removed from the table: the next look says so.
                    return state.jobs.with_job(id, |job, _| job.status.is_finished());
                }
            }
            () = tokio::time::sleep_until(deadline) => return Some(false),
        }
    }
}

/// 200: the final status (as `/status`), the logs (as `/logs`) and the outputs list (as
/// `/outputs`). The copies of the logs are charged to `client` before they are made (as for
/// `/logs`), and the JSON until it is sent.
fn finished(state: &AppState, client: ClientKey, id: JobId) -> ApiResult {
    let worker_id = [
        state.worker_key.worker_id(),
        state.worker_key.worker_id_hex(),
    ];
    let mut charge = state.jobs.budget().empty(client);
    let copied = state
        .jobs
        .with_job(id, |job, position| {
            let logs = charged_logs(job, &mut charge)?;
            let body = status_body(job, position, &worker_id);
            let files: Vec<_> = job.outputs.iter().map(|o| listed(&job.id, o)).collect();
            let exit_code = job.exit.as_ref().and_then(|e| e.exit_code);
            let truncated = [job.stdout_truncated, job.stderr_truncated];
            Ok((body, logs, files, exit_code, truncated))
        })
        .ok_or_else(|| ApiError::not_found("job (deleted while waiting)"))?;
    let (mut body, [stdout, stderr], files, exit_code, truncated) =
        copied.map_err(|full| budget_refusal(state, full))?;
    let [(stdout, stdout_base64), (stderr, stderr_base64)] =
        log_texts([stdout, stderr], &mut charge).map_err(|full| budget_refusal(state, full))?;
    let extra = json!({
        "exit_code": exit_code,
        "stdout": stdout,
        "stderr": stderr,
        "stdout_base64": stdout_base64,
        "stderr_base64": stderr_base64,
        "stdout_truncated": truncated[0],
        "stderr_truncated": truncated[1],
        "outputs": files,
    });
    if let (Some(body), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    charged_json(body, charge).map_err(|full| budget_refusal(state, full))
}

/// 202: the job has not ended within `wait`; where to follow it.
fn still_going(state: &AppState, id: JobId, wait: Duration) -> ApiResult {
    let (status, position) = state
        .jobs
        .with_job(id, |job, position| (job.status, position))
        .ok_or_else(|| ApiError::not_found("job (deleted while waiting)"))?;
    let body = json!({
        "job_id": id.to_string(),
        "status": status,
        "queue_position": position,
        "waited_s": wait.as_secs(),
        "status_url": format!("/status/{id}"),
        "logs_url": format!("/logs/{id}"),
        "outputs_url": format!("/outputs/{id}"),
        "stream_url": format!("/ws/{id}"),
    });
    let mut response: Response<Body> = json(StatusCode::ACCEPTED, &body);
    if let Ok(location) = HeaderValue::from_str(&format!("/status/{id}")) {
        response.headers_mut().insert(LOCATION, location);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_wait_queries_then_they_are_parsed_cut_to_the_cap_or_refused() {
        let secs = |q: Option<&str>| requested_wait(q, 30).map(|d| d.as_secs());
        assert_eq!(secs(None).ok(), Some(30));
        assert_eq!(secs(Some("wait=5")).ok(), Some(5));
        assert_eq!(secs(Some("x=1&wait=0")).ok(), Some(0));
        assert_eq!(secs(Some("wait=3600")).ok(), Some(30), "cut to the cap");
        for bad in [
            "wait=",
            "wait=-1",
            "wait=1.5",
            "wait=+1",
            "wait=a",
            "wait=1&wait=2",
        ] {
            assert_eq!(
                secs(Some(bad)).err().map(|e| e.status),
                Some(StatusCode::BAD_REQUEST),
                "{bad}"
            );
        }
    }
}
