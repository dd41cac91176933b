//! [`ClientError`]: every failure the SDK reports, with gRPC statuses mapped to typed variants.

use tonic::{Code, Status};

/// Result of an SDK call.
pub type ClientResult<T> = Result<T, ClientError>;

/// What went wrong in an SDK call.
///
/// gRPC statuses map to the variant of their code; [`ClientError::is_retryable`] says
/// whether trying again (with the same `client_msg_id` for sends) can succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The token is missing, unknown or revoked (UNAUTHENTICATED).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller may not do this (PERMISSION_DENIED).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Unknown user, device or blob (NOT_FOUND).
    #[error("not found: {0}")]
    NotFound(String),
    /// The user or object exists already (ALREADY_EXISTS).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The request is malformed (INVALID_ARGUMENT, OUT_OF_RANGE) or a local argument is bad.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The request does not fit the current state (FAILED_PRECONDITION, ABORTED).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A size or rate limit was hit (RESOURCE_EXHAUSTED).
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The server is unreachable or overloaded (UNAVAILABLE, or a transport failure). Retryable.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A deadline passed or the call was cancelled (DEADLINE_EXCEEDED, CANCELLED). Retryable.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Any other server failure (INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS…).
    #[error("server error ({code:?}): {message}")]
    Internal {
        /// The gRPC code the server sent.
        code: Code,
        /// The server's message.
        message: String,
    },
    /// The server broke the chat protocol (e.g. no Welcome first).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Downloaded or uploaded bytes do not hash to what was expected.
    #[error("integrity check failed: expected sha256 {expected}, got {actual}")]
    Integrity {
        /// The hash asked for.
        expected: String,
        /// The hash of the bytes that arrived.
        actual: String,
    },
    /// A message payload is not a valid [`crate::Content`].
    #[error("undecodable content: {0}")]
    Content(#[from] serde_json::Error),
    /// A local file or stream failed.
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
    /// The chat session has ended; the handle can no longer send.
    #[error("chat session closed")]
    Closed,
}

impl ClientError {
    /// Returns true when the same call may succeed later (UNAVAILABLE, timeouts).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClientError::Unavailable(_) | ClientError::Timeout(_))
    }

    /// Returns the gRPC code this error corresponds to.
    pub fn code(&self) -> Code {
        match self {
            ClientError::Unauthenticated(_) => Code::Unauthenticated,
            ClientError::PermissionDenied(_) => Code::PermissionDenied,
            ClientError::NotFound(_) => Code::NotFound,
            ClientError::AlreadyExists(_) => Code::AlreadyExists,
            ClientError::InvalidArgument(_) => Code::InvalidArgument,
            ClientError::FailedPrecondition(_) => Code::FailedPrecondition,
            ClientError::ResourceExhausted(_) => Code::ResourceExhausted,
            ClientError::Unavailable(_) => Code::Unavailable,
            ClientError::Timeout(_) => Code::DeadlineExceeded,
            ClientError::Internal { code, .. } => *code,
            ClientError::Protocol(_) | ClientError::Integrity { .. } => Code::DataLoss,
            ClientError::Content(_) => Code::InvalidArgument,
            ClientError::Io(_) => Code::Internal,
            ClientError::Closed => Code::Cancelled,
        }
    }

    /// Returns the error for a gRPC code and message, as found in `SendRejected` and
    /// `FrameError` frames.
    pub fn from_code(code: Code, message: impl Into<String>) -> Self {
        let message = message.into();
        match code {
            Code::Unauthenticated => ClientError::Unauthenticated(message),
            Code::PermissionDenied => ClientError::PermissionDenied(message),
            Code::NotFound => ClientError::NotFound(message),
            Code::AlreadyExists => ClientError::AlreadyExists(message),
            Code::InvalidArgument | Code::OutOfRange => ClientError::InvalidArgument(message),
            Code::FailedPrecondition | Code::Aborted => ClientError::FailedPrecondition(message),
            Code::ResourceExhausted => ClientError::ResourceExhausted(message),
            Code::Unavailable => ClientError::Unavailable(message),
            Code::DeadlineExceeded | Code::Cancelled => ClientError::Timeout(message),
            code => ClientError::Internal { code, message },
        }
    }
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        ClientError::from_code(status.code(), status.message())
    }
}

impl From<tonic::transport::Error> for ClientError {
    fn from(error: tonic::transport::Error) -> Self {
        ClientError::Unavailable(error_chain(&error))
    }
}

/// Returns an error and its sources as one line ("a: b: c").
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source_opt = error.source();
    while let Some(source) = source_opt {
        text.push_str(": ");
        text.push_str(&source.to_string());
        source_opt = source.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_typed_errors_and_retry_hints() {
        let error = ClientError::from(Status::unauthenticated("bad token"));
        assert!(matches!(error, ClientError::Unauthenticated(ref m) if m == "bad token"));
        assert!(!error.is_retryable());
        assert!(ClientError::from(Status::unavailable("down")).is_retryable());
        assert!(ClientError::from(Status::deadline_exceeded("slow")).is_retryable());
        assert!(ClientError::from(Status::cancelled("gone")).is_retryable());
        assert!(matches!(
            ClientError::from(Status::resource_exhausted("big")),
            ClientError::ResourceExhausted(_)
        ));
        assert!(matches!(
            ClientError::from(Status::not_found("who")),
            ClientError::NotFound(_)
        ));
        let internal = ClientError::from(Status::unimplemented("nope"));
        assert_eq!(internal.code(), Code::Unimplemented);
        assert!(!internal.is_retryable());
    }

    #[test]
    fn codes_round_trip_through_from_code() {
        for code in [
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::NotFound,
            Code::AlreadyExists,
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::ResourceExhausted,
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Internal,
        ] {
            assert_eq!(ClientError::from_code(code, "x").code(), code);
        }
    }
}
