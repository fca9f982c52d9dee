//! What a request names that several endpoints read the same way: the job id in the path and
//! the client (its address, or the one a trusted proxy forwarded) the request is charged to.

use std::net::SocketAddr;

use hyper::Request;

use crate::jobs::JobId;
use crate::ratelimit::{client_ip, ClientKey};
use crate::server::response::ApiError;
use crate::state::AppState;

/// Parses a job id from the path; an id that cannot exist is simply not found.
pub(super) fn job_id(text: &str) -> Result<JobId, ApiError> {
    JobId::parse(text).ok_or_else(|| ApiError::not_found("job"))
}

pub(super) fn client_key<B>(state: &AppState, peer: SocketAddr, req: &Request<B>) -> ClientKey {
    let forwarded = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    ClientKey::from_ip(client_ip(
        peer.ip(),
        forwarded,
        &state.config.trusted_proxies,
    ))
}
