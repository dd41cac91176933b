//! [`MediaError`]: why a media call failed, mapped once to a gRPC status and an HTTP status.

use bluetick_blob::{BlobError, ContentHash, InvalidContentHash};
use http::StatusCode;

/// Why a media call failed.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// No or an unknown bearer token.
    #[error("{0}")]
    Unauthenticated(String),
    /// The gateway that checks tokens cannot be reached; the call may be retried.
    #[error("authentication unavailable: {0}")]
    AuthUnavailable(String),
    /// The upload is (or announces it will be) larger than the limit; nothing was kept.
    #[error("upload exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// A malformed hash, a range outside the blob, a broken request.
    #[error("{0}")]
    InvalidArgument(String),
    /// No blob is stored under this hash.
    #[error("blob {0} not found")]
    NotFound(ContentHash),
    /// Blob storage cannot be reached; the call may be retried.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A bug or an I/O failure; details are logged, the caller gets a plain message.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result of a media call.
pub type MediaResult<T> = Result<T, MediaError>;

impl From<BlobError> for MediaError {
    fn from(error: BlobError) -> Self {
        match error {
            BlobError::NotFound(hash) => MediaError::NotFound(hash),
            BlobError::InvalidRange { .. } => MediaError::InvalidArgument(error.to_string()),
            BlobError::Unavailable(detail) => MediaError::Unavailable(detail),
            BlobError::InvalidUrl(_) | BlobError::Backend(_) | BlobError::Io(_) => {
                MediaError::Internal(error.to_string())
            }
        }
    }
}

impl From<InvalidContentHash> for MediaError {
    fn from(error: InvalidContentHash) -> Self {
        MediaError::InvalidArgument(error.to_string())
    }
}

impl MediaError {
    /// Returns the message safe to show a client, logging what it hides.
    fn public_message(&self) -> String {
        match self {
            MediaError::Unavailable(detail) => {
                tracing::warn!(%detail, "blob storage unavailable");
                "storage unavailable, try again".to_string()
            }
            MediaError::AuthUnavailable(detail) => {
                tracing::warn!(%detail, "gateway authentication unavailable");
                "authentication unavailable, try again".to_string()
            }
            MediaError::Internal(detail) => {
                tracing::error!(%detail, "media internal error");
                "internal error".to_string()
            }
            other => other.to_string(),
        }
    }

    /// Returns the HTTP status of this error.
    pub fn http_status(&self) -> StatusCode {
        match self {
            MediaError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            MediaError::AuthUnavailable(_) | MediaError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            MediaError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            MediaError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            MediaError::NotFound(_) => StatusCode::NOT_FOUND,
            MediaError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Returns an HTTP response with this error's status and a JSON `{"error": …}` body.
    pub(crate) fn into_http_response(self) -> axum::response::Response {
        let status = self.http_status();
        let body = serde_json::json!({ "error": self.public_message() }).to_string();
        let mut response = http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json");
        if status == StatusCode::UNAUTHORIZED {
            response = response.header(http::header::WWW_AUTHENTICATE, "Bearer");
        }
        response
            .body(axum::body::Body::from(body))
            .unwrap_or_else(|_| {
                let mut fallback = axum::response::Response::new(axum::body::Body::empty());
                *fallback.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                fallback
            })
    }
}

impl From<MediaError> for tonic::Status {
    fn from(error: MediaError) -> Self {
        let message = error.public_message();
        match error {
            MediaError::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            MediaError::AuthUnavailable(_) | MediaError::Unavailable(_) => {
                tonic::Status::unavailable(message)
            }
            MediaError::TooLarge { .. } => tonic::Status::resource_exhausted(message),
            MediaError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            MediaError::NotFound(_) => tonic::Status::not_found(message),
            MediaError::Internal(_) => tonic::Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_matching_grpc_and_http_statuses() {
        let cases = [
            (
                MediaError::Unauthenticated("no token".into()),
                tonic::Code::Unauthenticated,
                401,
            ),
            (
                MediaError::AuthUnavailable("down".into()),
                tonic::Code::Unavailable,
                503,
            ),
            (
                MediaError::TooLarge { limit: 1 },
                tonic::Code::ResourceExhausted,
                413,
            ),
            (
                MediaError::InvalidArgument("bad".into()),
                tonic::Code::InvalidArgument,
                400,
            ),
            (
                MediaError::NotFound(ContentHash::of(b"")),
                tonic::Code::NotFound,
                404,
            ),
            (
                MediaError::Internal("disk".into()),
                tonic::Code::Internal,
                500,
            ),
        ];
        for (error, code, http) in cases {
            assert_eq!(error.http_status().as_u16(), http);
            assert_eq!(tonic::Status::from(error).code(), code);
        }
    }
}
