//! What of output collection stays in the helper: the cap on a job's returned files. The walk
//! itself runs in the collector executable `sandrun-outputs` (`collector/`), started by
//! `sandbox::collector`; the helper only re-checks its frame stream (`job::Collection`).

#![forbid(unsafe_code)]

/// Most output files returned per job (a template build job's cap is the helper's
/// `max_build_output_files` instead).
pub const MAX_OUTPUT_FILES: usize = 1000;
