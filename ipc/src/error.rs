//! The serialisable error type. Codes are stable: they are part of the protocol and may be
//! matched on by clients. New codes get new numbers; numbers are never reused.

use serde::{Deserialize, Serialize};

/// A stable error code. The numeric value ([`ErrorCode::code`]) is what travels on the wire, not
/// the declaration order, so adding a variant never changes an existing code. An unknown number
/// fails to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The peer speaks another protocol version. (peer's fault)
    VersionMismatch,
    /// The peer's uid/gid may not use this role. (peer's fault)
    NotAuthorized,
    /// A message arrived that is not valid at this point of the conversation. (peer's fault)
    UnexpectedMessage,
    /// A frame could not be decoded or was larger than the maximum. (peer's fault)
    MalformedFrame,
    /// The request failed validation (paths, argv, env, sizes). (peer's fault)
    InvalidRequest,
    /// Every sandbox slot is in use; try again later. (load)
    Busy,
    /// The helper is draining and accepts no new jobs. (operator)
    Draining,
    /// The requested template or interpreter does not exist. (peer or configuration)
    NotFound,
    /// An isolation layer could not be applied; the job did not run. (host or configuration)
    SandboxSetup,
    /// The job's program could not be executed. (peer's request)
    ExecFailed,
    /// The requested environment template does not exist or has no lock file. (peer, or a
    /// template removed since the gateway checked)
    TemplateMissing,
    /// A bug or an unexpected host failure. (ours)
    Internal,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::VersionMismatch,
        ErrorCode::NotAuthorized,
        ErrorCode::UnexpectedMessage,
        ErrorCode::MalformedFrame,
        ErrorCode::InvalidRequest,
        ErrorCode::Busy,
        ErrorCode::Draining,
        ErrorCode::NotFound,
        ErrorCode::SandboxSetup,
        ErrorCode::ExecFailed,
        ErrorCode::TemplateMissing,
        ErrorCode::Internal,
    ];

    /// The code with this stable number, if there is one.
    pub fn from_code(code: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The stable numeric code.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::VersionMismatch => 1,
            ErrorCode::NotAuthorized => 2,
            ErrorCode::UnexpectedMessage => 3,
            ErrorCode::MalformedFrame => 4,
            ErrorCode::InvalidRequest => 5,
            ErrorCode::Busy => 6,
            ErrorCode::Draining => 7,
            ErrorCode::NotFound => 8,
            ErrorCode::SandboxSetup => 9,
            ErrorCode::ExecFailed => 10,
            ErrorCode::TemplateMissing => 11,
            ErrorCode::Internal => 99,
        }
    }

    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::NotAuthorized => "not_authorized",
            ErrorCode::UnexpectedMessage => "unexpected_message",
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Busy => "busy",
            ErrorCode::Draining => "draining",
            ErrorCode::NotFound => "not_found",
            ErrorCode::SandboxSetup => "sandbox_setup",
            ErrorCode::ExecFailed => "exec_failed",
            ErrorCode::TemplateMissing => "template_missing",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A number on the wire that is not an [`ErrorCode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownErrorCode(pub u16);

impl std::fmt::Display for UnknownErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown error code {}", self.0)
    }
}

impl std::error::Error for UnknownErrorCode {}

impl TryFrom<u16> for ErrorCode {
    type Error = UnknownErrorCode;
    fn try_from(code: u16) -> Result<Self, UnknownErrorCode> {
        ErrorCode::from_code(code).ok_or(UnknownErrorCode(code))
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        code.code()
    }
}

/// An error sent over the wire: a stable code and a human-readable message. Messages never carry
/// job contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcError {
    pub code: ErrorCode,
    pub message: String,
}

impl IpcError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        IpcError {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for IpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.code.as_str(),
            self.code.code(),
            self.message
        )
    }
}

impl std::error::Error for IpcError {}
