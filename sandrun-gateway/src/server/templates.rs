//! The helper's built templates that jobs may name, as `GET /`, `GET /environments` and the
//! check at submit see them.

use std::time::Duration;

use crate::state::AppState;

/// How long the gateway waits for the helper's template list.
const TEMPLATE_LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// The helper's templates that jobs may use: built (with a lock file) and, when the
/// configuration lists `environments`, among them.
pub(super) async fn usable_templates(
    state: &AppState,
) -> Result<Vec<crate::helper_client::TemplateSummary>, String> {
    let listed = tokio::time::timeout(
        TEMPLATE_LIST_TIMEOUT,
        crate::helper_client::list_templates(&state.config.helper_socket),
    )
    .await
    .map_err(|_| "sandrund did not answer in time".to_owned())?
    .map_err(|e| e.to_string())?;
    let allowed = &state.config.policy.environments;
    Ok(listed
        .into_iter()
        .filter(|t| t.lock.is_some() && (allowed.is_empty() || allowed.contains(&t.name)))
        .collect())
}
