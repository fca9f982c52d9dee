//! The job's network: a fresh network namespace whose only interface, `lo`, is brought up.

#![forbid(unsafe_code)]

use super::{fail, SetupError, SetupStep};
use crate::sys;

/// Brings the loopback interface of the current network namespace up.
pub(super) fn loopback_up() -> Result<(), SetupError> {
    sys::loopback_up().map_err(|(e, what)| fail(SetupStep::LoopbackUp, e, what))
}
