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
//! Implementations: [`local`] (files named by hash in one directory, the default) and, later,
//! S3. [`open_blob_store`] picks one from a URL. The `conformance` suite (feature
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

pub use hash::{ContentHash, ContentHasher, InvalidContentHash};
pub use local::LocalBlobStore;

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
            BlobError::Io(error) => {
                tracing::error!(%error, "blob storage i/o error");
                tonic::Status::internal("internal blob storage error")
            }
        }
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
/// local store. `s3://bucket?endpoint=…` is reserved for the S3 store (not built yet).
///
/// # Errors
/// [`BlobError::InvalidUrl`] for an empty or unsupported URL, I/O errors creating the folder.
pub async fn open_blob_store(url: &str) -> BlobResult<BlobStoreRef> {
    let url = url.trim();
    if url.is_empty() {
        return Err(BlobError::InvalidUrl("empty blob store url".to_string()));
    }
    if url.starts_with("s3://") {
        return Err(BlobError::InvalidUrl(format!(
            "{url}: s3 blob stores are not supported yet"
        )));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_blob_store_refuses_unsupported_urls() {
        for url in ["", "s3://bucket", "ftp://host/dir"] {
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
