//! Client errors. Each names the step that failed and, where one applies, the path.

use std::io;
use std::path::PathBuf;

use sandrun_ipc::{ChannelError, IpcError};

/// Exit status when the helper refuses a request or the client itself fails.
pub(crate) const EXIT_CLIENT_ERROR: i32 = 125;
/// Exit status when the output directory is refused or cannot be made (`EX_CANTCREAT`): it
/// exists and is not an empty directory, is a symlink, or something appeared in it during the
/// job. Nothing was written.
pub(crate) const EXIT_OUT_DIR_REFUSED: i32 = 73;

#[derive(Debug)]
#[non_exhaustive]
pub(crate) enum CtlError {
    /// The socket could not be connected. (local setup)
    Connect { path: PathBuf, source: io::Error },
    /// Sending or receiving a frame failed. (connection)
    Channel {
        step: &'static str,
        source: ChannelError,
    },
    /// The helper answered with an error. (whatever the code says)
    Helper(IpcError),
    /// The helper sent something that does not fit the conversation. (helper's bug)
    Protocol { step: &'static str, detail: String },
    /// The input directory cannot be sent as a bundle. (caller)
    Input { path: PathBuf, reason: String },
    /// Reading the input directory failed. (local filesystem)
    InputIo { path: PathBuf, source: io::Error },
    /// An output file could not be written safely. (local filesystem or helper)
    Output { path: String, reason: String },
    /// The output directory is refused or cannot be made. (caller or local filesystem)
    OutDir { path: PathBuf, reason: String },
    /// An environment template could not be built, read or removed. (`what` names the part)
    Template { what: String, reason: String },
}

impl CtlError {
    /// A stable snake_case code for `--json`.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            CtlError::Connect { .. } => "connect_failed",
            CtlError::Channel { .. } => "connection_failed",
            CtlError::Helper(e) => e.code.as_str(),
            CtlError::Protocol { .. } => "protocol_error",
            CtlError::Input { .. } | CtlError::InputIo { .. } => "invalid_input",
            CtlError::Output { .. } => "output_failed",
            CtlError::OutDir { .. } => "out_dir_refused",
            CtlError::Template { .. } => "template_failed",
        }
    }

    /// Prints the error (as JSON with `json`) and returns the exit code.
    pub(crate) fn report(&self, json: bool) -> i32 {
        if json {
            let obj = serde_json::json!({ "error": self.to_string(), "code": self.code() });
            println!("{obj}");
        } else {
            eprintln!("sandrunctl: {self}");
        }
        match self {
            CtlError::OutDir { .. } => EXIT_OUT_DIR_REFUSED,
            _ => EXIT_CLIENT_ERROR,
        }
    }
}

impl std::fmt::Display for CtlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CtlError::Connect { path, source } => {
                write!(f, "cannot connect to {}: {source}", path.display())
            }
            CtlError::Channel { step, source } => write!(f, "{step}: {source}"),
            CtlError::Helper(e) => write!(f, "sandrund refused: {e}"),
            CtlError::Protocol { step, detail } => {
                write!(f, "protocol error while {step}: {detail}")
            }
            CtlError::Input { path, reason } => write!(f, "input {}: {reason}", path.display()),
            CtlError::InputIo { path, source } => {
                write!(f, "reading input {}: {source}", path.display())
            }
            CtlError::Output { path, reason } => write!(f, "output {path}: {reason}"),
            CtlError::OutDir { path, reason } => {
                write!(f, "output directory {}: {reason}", path.display())
            }
            CtlError::Template { what, reason } => write!(f, "template {what}: {reason}"),
        }
    }
}

impl std::error::Error for CtlError {}
