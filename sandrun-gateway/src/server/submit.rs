//! `POST /submit` (and the first half of `POST /run`) and its helpers: the early refusals
//! (quota, queue room, declared length, upload slots), the upload itself, the template check,
//! the queueing, and the discarding of a refused request's body behind its answer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use crate::budget::SharedReservation;
use crate::bundle::BundleError;
use crate::helper_client::job_spec;
use crate::jobs::{Job, JobId, JobInfo, PendingJob};
use crate::queue::QueueFull;
use crate::ratelimit::ClientKey;
use crate::server::body::{timed_body, BodyPace, BodyVerdict};
use crate::server::params::client_key;
use crate::server::refusals::{budget_refusal, LOAD_RETRY};
use crate::server::response::{json, quota_headers, ApiError, Body};
use crate::server::templates::{usable_templates, Age};
use crate::state::AppState;
use crate::upload::slots::SlotRefused;
use crate::upload::{parse_submission, UploadError};

/// Retry hint when the client already has its share of uploads in progress.
const UPLOAD_RETRY: Duration = Duration::from_secs(5);

/// `POST /submit` (and the first half of `POST /run`): quotas first (cheap), then the upload,
/// then the queue. Returns the queued job's id and the answer to `/submit`.
pub(super) async fn submit(
    state: &Arc<AppState>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<(JobId, Response<Body>), ApiError> {
    let client = client_key(state, peer, &req);
    let http = &state.config.http;
    let idle = BodyPace::idle_only(Duration::from_millis(http.body_idle_timeout_ms));
    let pace = BodyPace {
        grace: Duration::from_millis(http.body_rate_grace_ms),
        min_bytes_per_s: http.min_body_bytes_per_s,
        ..idle
    };
    let early = check_quota(state, client)
        .and_then(|()| check_queue_room(state, client))
        .and_then(|()| check_declared_length(state, &req));
    if let Err(refusal) = early {
        discard_behind(req, idle.idle);
        return Err(refusal);
    }
    // Before any of the body is read: an upload holds a blocking thread while it arrives.
    let slot = match state.uploads.acquire(client).await {
        Ok(slot) => slot,
        Err(refused) => {
            discard_behind(req, idle.idle);
            return Err(upload_refusal(state, refused));
        }
    };
    let content_type = header_text(&req, CONTENT_TYPE).map(str::to_owned);
    // Fused: after a refusal the parser may already have read the body to its end.
    let verdict = BodyVerdict::default();
    let mut body = futures_util::StreamExt::fuse(timed_body(req.into_body(), pace, &verdict));
    // The upload's bytes are charged to the client as they arrive and expand, and released
    // when this request ends unless they become the job's.
    let charge = SharedReservation::new(state.jobs.budget().empty(client));
    let parsed = parse_submission(
        content_type.as_deref(),
        &mut body,
        &state.upload_limits,
        &state.policy,
        &charge,
    )
    .await;
    drop(slot);
    let mut reservation = charge.take();
    drop(charge);
    let submission = match parsed {
        Ok(s) => s,
        Err(e) => {
            // Nothing of a refused upload is held any more.
            drop(reservation);
            if let UploadError::Bundle(BundleError::Memory(full)) = e {
                // A load refusal: answer at once, the client should retry later, not keep
                // sending what cannot be held.
                discard_stream_behind(body);
                return Err(budget_refusal(state, full));
            }
            // Archives are expanded while they arrive, so a refusal (a bomb, a bad entry) can
            // come long before the end of the body: read and discard the rest, within the body
            // cap and a time bound, so the client sees the answer instead of a reset stream.
            let cap = usize::try_from(state.upload_limits.max_body_bytes).unwrap_or(usize::MAX);
            drain_body(&mut body, cap, REFUSED_BODY_DRAIN).await;
            // A body too slow to arrive is the client's timeout, whatever the parser made of it.
            if let Some(slow) = verdict.error().filter(|e| e.is_timeout()) {
                state.metrics.rejected("body_too_slow");
                return Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, slow.to_string()));
            }
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            state.metrics.rejected(upload_cause(status));
            return Err(ApiError::new(status, e.message()));
        }
    };
    // Exactly the bundle's and the stdin's bytes stay charged (the parser charged each byte of
    // the files and of a stdin part once; a manifest's stdin text is charged here).
    let total = submission.bundle.total_bytes() + submission.stdin.len() as u64;
    let held = reservation.bytes();
    reservation.shrink(held.saturating_sub(total));
    reservation
        .try_grow(total.saturating_sub(held))
        .map_err(|full| budget_refusal(state, full))?;
    if let Some(name) = &submission.manifest.environment {
        check_environment_built(state, name).await?;
    }
    let id = JobId::random();
    let stdin_bytes = submission.stdin.len() as u64;
    let (spec, files) = job_spec(
        &submission.manifest,
        &submission.bundle,
        stdin_bytes,
        id.to_string(),
    );
    let info = JobInfo {
        interpreter: submission.manifest.interpreter.clone(),
        environment: submission.manifest.environment.clone(),
        job_hash: submission.job_hash,
    };
    let held = state.jobs.budget().empty(client);
    let job = Job::new(
        id,
        client,
        info,
        PendingJob {
            spec,
            files,
            stdin: submission.stdin,
            reservation,
        },
        held,
    );
    enqueue(state, client, job)
}

/// The answer to an upload that got no slot: 429 past the client's share, 503 when the gateway
/// is busy.
fn upload_refusal(state: &AppState, refused: SlotRefused) -> ApiError {
    match refused {
        SlotRefused::ClientShare { share } => {
            state.metrics.rejected("uploads_per_client");
            let message = format!(
                "too many uploads in progress from this client: at most {share} at once \
                 (client_shares.uploads_percent of max_concurrent_uploads)"
            );
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, message).with_retry_after(UPLOAD_RETRY)
        }
        SlotRefused::Busy => {
            state.metrics.rejected("uploads_busy");
            ApiError::unavailable("too many uploads in progress", LOAD_RETRY)
        }
    }
}

/// The most of a refused body that is read (and discarded) behind the answer.
const SMALL_BODY: u64 = 64 * 1024;

/// Lets the answer to a request refused before its body was read go out at once, and discards
/// what is left of a small body behind it (at most 64 KiB, for at most one second, in a task of
/// its own): the handler never waits for the body. Without that drain, answering while the
/// client is still sending makes HTTP/2 reset the stream after the response, which some clients
/// (curl 7.88) report as an error instead of showing it. A body that is declared larger, or that
/// waits for `100 Continue`, is not read at all: dropping it closes the HTTP/1.1 connection after
/// the answer (no `100 Continue` is sent) and resets the HTTP/2 stream.
pub(super) fn discard_behind(req: Request<Incoming>, idle: Duration) {
    let declared = header_text(&req, CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
    let expects_continue = header_text(&req, hyper::header::EXPECT)
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects_continue || declared.is_some_and(|len| len > SMALL_BODY) {
        return;
    }
    let verdict = BodyVerdict::default();
    let body = timed_body(req.into_body(), BodyPace::idle_only(idle), &verdict);
    discard_stream_behind(body);
}

/// [`discard_behind`] for a body that is already being read.
pub(super) fn discard_stream_behind<S>(body: S)
where
    S: futures_util::Stream<Item = Result<Bytes, crate::server::body::BodyError>>
        + Unpin
        + Send
        + 'static,
{
    tokio::spawn(async move {
        let mut body = body;
        let max = usize::try_from(SMALL_BODY).unwrap_or(usize::MAX);
        drain_body(&mut body, max, Duration::from_secs(1)).await;
    });
}

/// How long the rest of a body refused during parsing may take to arrive (and be discarded).
const REFUSED_BODY_DRAIN: Duration = Duration::from_secs(10);

/// Reads and discards at most `max` bytes of what is left of `body`, for at most `time`.
async fn drain_body<S>(body: &mut S, max: usize, time: Duration)
where
    S: futures_util::Stream<Item = Result<Bytes, crate::server::body::BodyError>> + Unpin,
{
    use futures_util::StreamExt;
    let drain = async {
        let mut seen = 0usize;
        while let Some(Ok(chunk)) = body.next().await {
            seen = seen.saturating_add(chunk.len());
            if seen > max {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(time, drain).await;
}

fn enqueue(
    state: &Arc<AppState>,
    client: ClientKey,
    job: Job,
) -> Result<(JobId, Response<Body>), ApiError> {
    let id = job.id;
    let quota = state
        .limiter()
        .admit(client, Instant::now())
        .map_err(|refusal| {
            state.metrics.rejected(refusal.kind.as_str());
            quota_error(refusal)
        })?;
    let position = match state.jobs.enqueue(job) {
        Ok(position) => position,
        Err(full) => {
            state.limiter().unadmit(client);
            return Err(queue_refusal(state, full));
        }
    };
    state.metrics.job_submitted();
    state.wake_scheduler();
    tracing::info!(job = %id, "job queued");
    let body = json!({ "job_id": id.to_string(), "status": "queued", "queue_position": position });
    let mut response = json(StatusCode::OK, &body);
    response.headers_mut().extend(quota_headers(quota));
    Ok((id, response))
}

/// A manifest's `environment` must name a built template: a 400 at submit. If the helper
/// cannot be asked now (restarting), the job is accepted and the helper checks when it starts
/// it: a missing template then fails the job with reason `environment`. The cached list is
/// enough to accept (a template removed since fails the job the same way); a name it lacks is
/// looked up in a fresh list before the job is refused, so a template built a moment ago is
/// not refused.
async fn check_environment_built(state: &AppState, name: &str) -> Result<(), ApiError> {
    let named =
        |list: &[crate::helper_client::TemplateSummary]| list.iter().any(|t| t.name == name);
    let listed = match usable_templates(state, Age::Cached).await {
        Ok(list) if named(&list) => return Ok(()),
        Ok(_) => usable_templates(state, Age::Fresh).await,
        Err(e) => Err(e),
    };
    match listed {
        Ok(list) if named(&list) => Ok(()),
        Ok(list) => {
            state.metrics.rejected("upload_invalid");
            let names: Vec<&str> = list.iter().map(|t| t.name.as_str()).collect();
            Err(ApiError::bad_request(format!(
                "manifest.environment: no template {name:?} is built (GET /environments lists \
                 them: {names:?})"
            )))
        }
        Err(e) => {
            tracing::info!(error = %e, "template list unavailable; the helper checks the environment");
            Ok(())
        }
    }
}

fn check_quota(state: &AppState, client: ClientKey) -> Result<(), ApiError> {
    let refusal = state.limiter().check(client, Instant::now()).err();
    match refusal {
        None => Ok(()),
        Some(refusal) => {
            state.metrics.rejected(refusal.kind.as_str());
            Err(quota_error(refusal))
        }
    }
}

fn quota_error(refusal: crate::ratelimit::Refusal) -> ApiError {
    let message = format!("quota exceeded: {}", refusal.kind.as_str());
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, message)
        .with_retry_after(refusal.retry_after)
        .with_quota(refusal.header)
}

fn check_queue_room(state: &AppState, client: ClientKey) -> Result<(), ApiError> {
    state
        .jobs
        .queue_room(client)
        .map_err(|full| queue_refusal(state, full))
}

/// The answer to a job the queue cannot take: 503 when it is full for everyone, 429 when this
/// client already holds its share of it.
fn queue_refusal(state: &AppState, full: QueueFull) -> ApiError {
    match full {
        QueueFull::Total => {
            state.metrics.rejected("queue_full");
            ApiError::unavailable("the queue is full", LOAD_RETRY)
        }
        QueueFull::ClientShare(share) => {
            state.metrics.rejected("queue_share");
            let capacity = state.config.queue_capacity;
            let message = format!(
                "queue share exceeded: this client already has {share} of the queue's {capacity} \
                 positions (client_shares.queue_percent); wait for one of its jobs to start"
            );
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, message).with_retry_after(LOAD_RETRY)
        }
    }
}

fn check_declared_length(state: &AppState, req: &Request<Incoming>) -> Result<(), ApiError> {
    let declared = header_text(req, CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > state.config.max_body_bytes) {
        state.metrics.rejected("upload_too_large");
        let limit = state.config.max_body_bytes;
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes"),
        ));
    }
    Ok(())
}

fn upload_cause(status: StatusCode) -> &'static str {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => "upload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "upload_media_type",
        _ => "upload_invalid",
    }
}

fn header_text<B>(req: &Request<B>, name: hyper::header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}
