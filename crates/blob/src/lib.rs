//! bluetick's content-addressed blob storage, used by the media service.
//!
//! A blob is stored under the SHA-256 of its bytes ([`ContentHash`]), so the same bytes are
//! stored once and a stored blob never changes. The [`BlobStore`] trait is shaped so that an
//! object store with multipart uploads drops in beside the local folder:
//!
//! - upload is streamed: [`BlobStore::begin_upload`] → [`BlobUpload::write`] per chunk →
//!   [`BlobUpload::finish`] with the content hash, which makes the blob visible under that
//!   hash in one step. [`BlobUpload::abort`], or dropping an unfinished upload, leaves
//!   nothing behind;
//! - [`BlobStore::stat`] returns a blob's size;
//! - [`BlobStore::read`] streams a byte range.
//!
//! Implementations: [`local`] (files named by hash in one directory, the default) and
//! [`s3`] (objects of an S3 bucket keyed by hash, multipart uploads; feature `s3`, on by
//! default). [`open_blob_store`] picks one from a URL. The `conformance` suite (feature
//! `testsuite`) is run against each.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

#[cfg(feature = "testsuite")]
pub mod conformance;
mod hash;
pub mod local;
#[cfg(feature = "s3")]
pub mod s3;

pub use hash::{ContentHash, ContentHasher, InvalidContentHash};
pub use local::LocalBlobStore;
#[cfg(feature = "s3")]
pub use s3::{S3BlobStore, S3Config};

/// Why a blob store call failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No blob is stored under this hash.
    #[error("blob {0} not found")]
    NotFound(ContentHash),
    /// The requested byte range does not lie within the blob.
    #[error("range offset {offset} length {length:?} is outside the blob of {size} bytes")]
    InvalidRange {
        offset: u64,
        length: Option<u64>,
        size: u64,
    },
    /// The store URL names no supported backend or is malformed.
    #[error("invalid blob store url: {0}")]
    InvalidUrl(String),
    /// The backend cannot be reached; the call may be retried.
    #[error("blob storage unavailable: {0}")]
    Unavailable(String),
    /// The backend answered with an error that retrying will not fix (credentials
    /// refused, missing bucket, a protocol surprise): a misconfiguration or a bug.
    #[error("blob storage backend error: {0}")]
    Backend(String),
    /// A local I/O failure or another bug.
    #[error("blob storage i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Result of a blob store call.
pub type BlobResult<T> = Result<T, BlobError>;

impl From<BlobError> for tonic::Status {
    fn from(error: BlobError) -> Self {
        match error {
            BlobError::NotFound(hash) => tonic::Status::not_found(format!("blob {hash} not found")),
            BlobError::InvalidRange { .. } => tonic::Status::invalid_argument(error.to_string()),
            BlobError::InvalidUrl(detail) => {
                tracing::error!(%detail, "invalid blob store url");
                tonic::Status::internal("blob storage misconfigured")
            }
            BlobError::Unavailable(detail) => {
                tracing::warn!(%detail, "blob storage unavailable");
                tonic::Status::unavailable("blob storage unavailable, try again")
            }
            BlobError::Backend(detail) => {
                tracing::error!(%detail, "blob storage backend error");
                tonic::Status::internal("internal blob storage error")
            }
            BlobError::Io(error) => {
                tracing::error!(%error, "blob storage i/o error");
                tonic::Status::internal("internal blob storage error")
            }
        }
    }
}

/// Returns how many bytes a read of `length` (the rest when `None`) from `offset` covers
/// in a blob of `size` bytes.
///
/// # Errors
/// [`BlobError::InvalidRange`] when the range ends past the blob (or overflows).
pub(crate) fn checked_read_length(offset: u64, length: Option<u64>, size: u64) -> BlobResult<u64> {
    let end_opt = match length {
        Some(length) => offset.checked_add(length),
        None => Some(size),
    };
    match end_opt {
        Some(end) if offset <= size && end <= size => Ok(end - offset),
        _ => Err(BlobError::InvalidRange {
            offset,
            length,
            size,
        }),
    }
}

/// A stream of a blob's bytes, in order. Chunks are non-empty and at most
/// [`READ_CHUNK_SIZE`] bytes for the local store; callers must not rely on chunk sizes.
pub type BlobStream = BoxStream<'static, BlobResult<Bytes>>;

/// Size of the chunks the local store reads and streams.
pub const READ_CHUNK_SIZE: usize = 256 * 1024;

/// What a finished upload did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FinishedUpload {
    /// Bytes written by this upload (the blob's size).
    pub size: u64,
    /// True when a blob was already stored under the hash and this upload was discarded.
    pub deduplicated: bool,
}

/// Content-addressed blob storage. Object-safe; share it as a [`BlobStoreRef`].
#[async_trait]
pub trait BlobStore: fmt::Debug + Send + Sync + 'static {
    /// Starts a streamed upload. Nothing is visible until [`BlobUpload::finish`].
    ///
    /// # Errors
    /// Fails when the backend cannot start an upload (I/O, unavailable).
    async fn begin_upload(&self) -> BlobResult<Box<dyn BlobUpload>>;

    /// Returns the size of the blob stored under `hash`, or `None` when there is none.
    ///
    /// # Errors
    /// Fails on I/O errors or when the backend is unavailable, never for a missing blob.
    async fn stat(&self, hash: &ContentHash) -> BlobResult<Option<u64>>;

    /// Returns a stream of `length` bytes (all the rest when `None`) of the blob under
    /// `hash`, starting at `offset`. `offset == size` with no length is an empty stream.
    ///
    /// # Errors
    /// [`BlobError::NotFound`] for an unknown hash, [`BlobError::InvalidRange`] when the range
    /// ends past the blob, I/O errors (also as items of the stream).
    async fn read(
        &self,
        hash: &ContentHash,
        offset: u64,
        length: Option<u64>,
    ) -> BlobResult<BlobStream>;
}

/// Shared handle to a [`BlobStore`].
pub type BlobStoreRef = Arc<dyn BlobStore>;

/// An upload in progress. Dropping it without [`BlobUpload::finish`] discards everything
/// written (best effort for remote stores, which may also expire parts themselves).
#[async_trait]
pub trait BlobUpload: fmt::Debug + Send {
    /// Appends `chunk`. Implementations may buffer; memory stays bounded per upload.
    ///
    /// # Errors
    /// Fails on I/O errors; the upload should then be aborted.
    async fn write(&mut self, chunk: Bytes) -> BlobResult<()>;

    /// Makes the written bytes durable and visible under `hash` in one step. When a blob is
    /// stored under `hash` already, the written bytes are discarded (deduplicated).
    ///
    /// The caller guarantees that `hash` is the SHA-256 of the written bytes: the store
    /// trusts it (the caller hashes while streaming, so the bytes are hashed once).
    ///
    /// # Errors
    /// Fails on I/O errors; nothing is left behind then.
    async fn finish(self: Box<Self>, hash: ContentHash) -> BlobResult<FinishedUpload>;

    /// Discards everything written.
    ///
    /// # Errors
    /// Fails when the backend could not be told; a local store cleans up regardless.
    async fn abort(self: Box<Self>) -> BlobResult<()>;
}

/// Returns the blob store named by `url`: a directory path (or `file://` + path) for the
/// local store, `s3://bucket[/prefix]?endpoint=…` for the S3 store (see [`S3Config`] for
/// the parameters; feature `s3`).
///
/// # Errors
/// [`BlobError::InvalidUrl`] for an empty, malformed or unsupported URL, I/O errors
/// creating the folder; for S3, [`BlobError::Unavailable`] when the endpoint cannot be
/// reached and [`BlobError::Backend`] when the bucket cannot be used.
pub async fn open_blob_store(url: &str) -> BlobResult<BlobStoreRef> {
    let url = url.trim();
    if url.is_empty() {
        return Err(BlobError::InvalidUrl("empty blob store url".to_string()));
    }
    if url.starts_with("s3://") {
        return open_s3_blob_store(url).await;
    }
    let path = match url.split_once("://") {
        Some(("file", path)) => PathBuf::from(path),
        Some((scheme, _)) => {
            return Err(BlobError::InvalidUrl(format!(
                "{url}: unknown scheme {scheme}"
            )));
        }
        None => PathBuf::from(url),
    };
    Ok(Arc::new(LocalBlobStore::open(path).await?))
}

#[cfg(feature = "s3")]
async fn open_s3_blob_store(url: &str) -> BlobResult<BlobStoreRef> {
    let config = S3Config::from_url(url)?;
    Ok(Arc::new(S3BlobStore::open(config).await?))
}

#[cfg(not(feature = "s3"))]
async fn open_s3_blob_store(url: &str) -> BlobResult<BlobStoreRef> {
    Err(BlobError::InvalidUrl(format!(
        "{}: this build has no s3 support (feature s3 of bluetick-blob)",
        redact_blob_url(url)
    )))
}

/// Returns `url` safe to log: the value of an S3 `secret_key` parameter is replaced by
/// `***`; other URLs are returned unchanged.
pub fn redact_blob_url(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some(("secret_key", _)) => "secret_key=***".to_string(),
            _ => pair.to_string(),
        })
        .collect();
    format!("{base}?{}", pairs.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_blob_store_refuses_unsupported_urls() {
        for url in [
            "",
            "s3://Not_A_Bucket",
            "s3://bucket?colour=blue",
            "ftp://host/dir",
        ] {
            assert!(matches!(
                open_blob_store(url).await,
                Err(BlobError::InvalidUrl(_))
            ));
        }
    }

    #[test]
    fn errors_map_to_precise_status_codes() {
        let hash = ContentHash::of(b"x");
        assert_eq!(
            tonic::Status::from(BlobError::NotFound(hash)).code(),
            tonic::Code::NotFound
        );
        let range = BlobError::InvalidRange {
            offset: 5,
            length: None,
            size: 1,
        };
        assert_eq!(
            tonic::Status::from(range).code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            tonic::Status::from(BlobError::Unavailable("down".into())).code(),
            tonic::Code::Unavailable
        );
    }
}
