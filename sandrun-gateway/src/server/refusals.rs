//! The answers to a refused memory reservation, shared by every endpoint that charges the
//! gateway's memory budget (submissions, answers, outputs, WebSocket backlogs, HTTP/2 windows).

use std::time::Duration;

use hyper::StatusCode;

use crate::budget::BudgetFull;
use crate::server::response::ApiError;
use crate::state::AppState;

/// Retry hint when the queue or the memory budget is full.
pub(super) const LOAD_RETRY: Duration = Duration::from_secs(10);

/// The answer to a refused memory reservation: 503 when the whole budget is taken, 429 when the
/// client holds its share, 413 when one upload alone needs more than a share.
pub(super) fn budget_refusal(state: &AppState, full: BudgetFull) -> ApiError {
    let share = state.jobs.budget().share();
    let (cause, error) = match full {
        BudgetFull::Global => (
            "memory_budget",
            ApiError::unavailable("the gateway's memory budget is full", LOAD_RETRY),
        ),
        BudgetFull::ClientShare => (
            "memory_share",
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "this client holds its share of the gateway's memory ({share} bytes): \
                     download or delete finished jobs"
                ),
            )
            .with_retry_after(LOAD_RETRY),
        ),
        BudgetFull::LargerThanShare => (
            "upload_too_large",
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the upload needs more than one client's memory share of {share} bytes"),
            ),
        ),
    };
    state.metrics.rejected(cause);
    error
}

/// The refusal of an answer (or an HTTP/2 connection's window) that could not be charged: as
/// [`budget_refusal`], one larger than a whole share being the caller's share too.
pub(super) fn answer_refusal(state: &AppState, full: BudgetFull) -> ApiError {
    let full = match full {
        BudgetFull::LargerThanShare => BudgetFull::ClientShare,
        other => other,
    };
    budget_refusal(state, full)
}
