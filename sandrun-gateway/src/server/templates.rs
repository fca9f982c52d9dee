//! The helper's built templates that jobs may name, as `GET /`, `GET /environments` and the
//! check at submit see them.
//!
//! Anonymous `GET /` and `GET /environments` would otherwise each open a helper connection, and
//! the helper reads every template's lock file in its single loop: the gateway keeps the
//! helper's answer for [`TEMPLATE_LIST_TTL`], and concurrent callers share one request in
//! flight (single-flight: the first caller asks, the others wait for its answer). A failed
//! request is kept only for [`TEMPLATE_LIST_ERROR_TTL`], so that waiting callers do not each
//! wait out the helper again, and the next ones ask again soon.

use std::time::{Duration, Instant};

use crate::helper_client::TemplateSummary;
use crate::state::AppState;

/// How long the gateway waits for the helper's template list.
const TEMPLATE_LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the helper's template list is used before it is asked again.
pub const TEMPLATE_LIST_TTL: Duration = Duration::from_secs(2);

/// How long a failed request for the list is answered from the cache.
const TEMPLATE_LIST_ERROR_TTL: Duration = Duration::from_millis(250);

/// The helper's last template list (or why it could not be had), and when it was asked.
#[derive(Debug, Default)]
pub struct TemplateCache {
    /// Held across the helper request: that is what makes callers share it.
    slot: tokio::sync::Mutex<Option<Cached>>,
}

#[derive(Debug)]
struct Cached {
    /// When the helper was asked.
    at: Instant,
    listed: Result<Vec<TemplateSummary>, String>,
}

impl Cached {
    fn fresh(&self, now: Instant) -> bool {
        let ttl = match self.listed {
            Ok(_) => TEMPLATE_LIST_TTL,
            Err(_) => TEMPLATE_LIST_ERROR_TTL,
        };
        now.saturating_duration_since(self.at) < ttl
    }
}

/// Whether [`usable_templates`] may answer from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Age {
    /// A list at most [`TEMPLATE_LIST_TTL`] old.
    Cached,
    /// A list asked after this call began (a caller that shares a request started before it
    /// would see an older one).
    Fresh,
}

/// The helper's templates that jobs may use: built (with a lock file) and, when the
/// configuration lists `environments`, among them.
pub(super) async fn usable_templates(
    state: &AppState,
    age: Age,
) -> Result<Vec<TemplateSummary>, String> {
    let asked = Instant::now();
    let mut slot = state.templates.slot.lock().await;
    let usable = match slot.as_ref() {
        Some(cached) if age == Age::Cached && cached.fresh(Instant::now()) => cached,
        Some(cached) if age == Age::Fresh && cached.at >= asked => cached,
        _ => {
            // Timed from the request's start: the list may predate anything after it.
            let at = Instant::now();
            let listed = fetch(state).await;
            slot.insert(Cached { at, listed })
        }
    };
    let listed = usable.listed.clone()?;
    let allowed = &state.config.policy.environments;
    Ok(listed
        .into_iter()
        .filter(|t| t.lock.is_some() && (allowed.is_empty() || allowed.contains(&t.name)))
        .collect())
}

async fn fetch(state: &AppState) -> Result<Vec<TemplateSummary>, String> {
    state.metrics.template_list_fetched();
    tokio::time::timeout(
        TEMPLATE_LIST_TIMEOUT,
        crate::helper_client::list_templates(&state.config.helper_socket),
    )
    .await
    .map_err(|_| "sandrund did not answer in time".to_owned())?
    .map_err(|e| e.to_string())
}
