//! [`MediaUpload`]: one upload streamed into the blob store, hashed on the way and held to
//! the size limit. Shared by the gRPC and HTTP front ends.

use bluetick_blob::{BlobStoreRef, BlobUpload, ContentHash, ContentHasher};
use bytes::Bytes;

use crate::error::{MediaError, MediaResult};

/// Chunks at least this big are hashed on a blocking thread, in parallel with the store
/// write; smaller ones inline (hashing 64 KiB takes well under the 500 µs budget).
const INLINE_HASH_MAX_BYTES: usize = 64 * 1024;

/// What a finished upload stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StoredMedia {
    pub(crate) hash: ContentHash,
    pub(crate) size: u64,
    pub(crate) deduplicated: bool,
}

/// An upload in progress. Dropping it discards what was written.
#[derive(Debug)]
pub(crate) struct MediaUpload {
    upload: Box<dyn BlobUpload>,
    /// `None` only while a blocking hash step owns it.
    hasher_opt: Option<ContentHasher>,
    size: u64,
    limit: u64,
}

impl MediaUpload {
    /// Returns an error when a client announces more than `limit` bytes, before any work.
    pub(crate) fn check_announced_size(announced_size: u64, limit: u64) -> MediaResult<()> {
        if announced_size > limit {
            return Err(MediaError::TooLarge { limit });
        }
        Ok(())
    }

    /// Starts an upload of at most `limit` bytes.
    pub(crate) async fn begin(store: &BlobStoreRef, limit: u64) -> MediaResult<Self> {
        Ok(Self {
            upload: store.begin_upload().await?,
            hasher_opt: Some(ContentHasher::new()),
            size: 0,
            limit,
        })
    }

    /// Returns the bytes written so far.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Appends `chunk`.
    ///
    /// # Errors
    /// [`MediaError::TooLarge`] once the total passes the limit (the chunk is not written);
    /// storage errors. The caller then calls [`MediaUpload::abort`].
    pub(crate) async fn write(&mut self, chunk: Bytes) -> MediaResult<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let new_size = self.size.saturating_add(chunk.len() as u64);
        if new_size > self.limit {
            return Err(MediaError::TooLarge { limit: self.limit });
        }
        self.size = new_size;
        let mut hasher = self
            .hasher_opt
            .take()
            .ok_or_else(|| MediaError::Internal("upload hasher lost".to_string()))?;
        if chunk.len() < INLINE_HASH_MAX_BYTES {
            hasher.update(&chunk);
            self.hasher_opt = Some(hasher);
            return Ok(self.upload.write(chunk).await?);
        }
        let chunk_to_hash = chunk.clone();
        let hashing = tokio::task::spawn_blocking(move || {
            hasher.update(&chunk_to_hash);
            hasher
        });
        let write_result = self.upload.write(chunk).await;
        let hasher = hashing
            .await
            .map_err(|join_error| MediaError::Internal(format!("hashing failed: {join_error}")))?;
        self.hasher_opt = Some(hasher);
        Ok(write_result?)
    }

    /// Finishes the upload under the hash of everything written.
    pub(crate) async fn finish(mut self) -> MediaResult<StoredMedia> {
        let hasher = self
            .hasher_opt
            .take()
            .ok_or_else(|| MediaError::Internal("upload hasher lost".to_string()))?;
        let hash = hasher.finalize();
        let finished = self.upload.finish(hash).await?;
        Ok(StoredMedia {
            hash,
            size: finished.size,
            deduplicated: finished.deduplicated,
        })
    }

    /// Discards the upload; failures are logged (the local store removes its temp file on
    /// drop regardless).
    pub(crate) async fn abort(self) {
        if let Err(error) = self.upload.abort().await {
            tracing::warn!(%error, "failed to abort upload");
        }
    }
}
