//! The order the root helper gives its output collector (`sandrun-collect`) on the collector's
//! socket, as the first and only frame in that direction. The collector decodes it with
//! [`MAX_ORDER_BYTES`] as its limit, so the helper cannot make it allocate more than that.

use serde::{Deserialize, Serialize};

use crate::validate::OutputPattern;

/// Largest payload of a [`CollectOrder`] frame: [`crate::rules::MAX_OUTPUT_PATTERNS`] patterns
/// of at most [`crate::MAX_PATH_BYTES`] bytes each, their lengths and the limits fit below it.
pub const MAX_ORDER_BYTES: usize = 128 * 1024;

/// What to collect beneath the job's `/work`, and the bounds of the walk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectOrder {
    /// The job's output patterns (validated again while decoding).
    pub patterns: Vec<OutputPattern>,
    /// Directory entries visited at most (this also bounds the entries reported as skipped).
    pub max_visited: u64,
    /// Total bytes of matched regular files, returned or not.
    pub max_total_bytes: u64,
    /// Regular files returned at most; the rest are reported as `TooMany`.
    pub max_files: u64,
    /// The walk's own CPU time in milliseconds (hashing included, sending not).
    pub budget_ms: u64,
}
