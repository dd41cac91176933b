//! [`LocalBlobStore`]: blobs as files named by hash in one directory.
//!
//! Layout: `<dir>/<aa>/<64 hex digits>` where `aa` is the first byte of the hash (so no
//! directory grows past a few thousand entries per million blobs), and `<dir>/tmp/` for
//! uploads in progress. An upload writes a temp file, fsyncs it, then renames it to its
//! final name and fsyncs the directory: a blob is either complete or absent, even across a
//! crash. While a large upload is still arriving, what it wrote so far is flushed to disk
//! in the background, so the final fsync waits only for the tail. Temp files are removed on
//! abort or drop; ones orphaned by a crash are swept when the store is opened. One process
//! per directory.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tempfile::NamedTempFile;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use crate::{
    BlobError, BlobResult, BlobStore, BlobStream, BlobUpload, ContentHash, FinishedUpload,
    READ_CHUNK_SIZE, checked_read_length,
};

/// Writes are batched up to this many bytes per blocking write (fewer thread hops for
/// small HTTP body frames; bounds memory per upload).
const WRITE_BATCH_BYTES: usize = 1024 * 1024;

/// Once this many bytes were written since the last background flush started, an upload
/// starts the next one (if the previous one has finished).
const SYNC_AHEAD_BYTES: u64 = 8 * 1024 * 1024;

/// Temp files untouched for this long are leftovers of a crash, swept on open.
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

/// Blobs as files named by hash in one directory.
#[derive(Clone, Debug)]
pub struct LocalBlobStore {
    /// Where blobs live, under `<aa>/` fan-out folders.
    root: PathBuf,
    /// Uploads in progress; on the same file system as `root` so finishing is a rename.
    tmp_dir: PathBuf,
}

impl LocalBlobStore {
    /// Returns a store in `root`, creating it (and `root/tmp`) if needed and removing temp
    /// files left by a crash.
    ///
    /// # Errors
    /// Fails when the folders cannot be created or read.
    pub async fn open(root: impl Into<PathBuf>) -> BlobResult<Self> {
        let root = root.into();
        let tmp_dir = root.join("tmp");
        let store = Self { root, tmp_dir };
        let tmp_dir = store.tmp_dir.clone();
        blocking(move || {
            std::fs::create_dir_all(&tmp_dir)?;
            sweep_stale_temp_files(&tmp_dir)
        })
        .await?;
        Ok(store)
    }

    /// Returns the folder the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Returns the final path of the blob under `hash`.
    pub fn blob_path(&self, hash: &ContentHash) -> PathBuf {
        blob_path(&self.root, hash)
    }
}

fn blob_path(root: &Path, hash: &ContentHash) -> PathBuf {
    let hex = hash.to_hex();
    root.join(&hex[..2]).join(hex)
}

fn sweep_stale_temp_files(tmp_dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(tmp_dir)? {
        let entry = entry?;
        let age_opt = entry
            .metadata()
            .and_then(|metadata| metadata.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok());
        if age_opt.is_some_and(|age| age > STALE_TEMP_AGE) {
            let path = entry.path();
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "removed stale upload temp file"),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot remove stale temp file")
                }
            }
        }
    }
    Ok(())
}

/// Runs blocking file work off the runtime.
async fn blocking<T, F>(work: F) -> BlobResult<T>
where
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|join_error| BlobError::Io(std::io::Error::other(join_error)))?
        .map_err(BlobError::Io)
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    async fn begin_upload(&self) -> BlobResult<Box<dyn BlobUpload>> {
        let tmp_dir = self.tmp_dir.clone();
        let temp_file = blocking(move || {
            tempfile::Builder::new()
                .prefix("upload-")
                .suffix(".part")
                .tempfile_in(&tmp_dir)
        })
        .await?;
        Ok(Box::new(LocalUpload {
            root: self.root.clone(),
            temp_file_opt: Some(temp_file),
            pending: Vec::new(),
            pending_bytes: 0,
            written_bytes: 0,
            unsynced_bytes: 0,
            sync_ahead_opt: None,
        }))
    }

    async fn stat(&self, hash: &ContentHash) -> BlobResult<Option<u64>> {
        match tokio::fs::metadata(self.blob_path(hash)).await {
            Ok(metadata) => Ok(Some(metadata.len())),
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(None),
            Err(error) => Err(BlobError::Io(error)),
        }
    }

    async fn read(
        &self,
        hash: &ContentHash,
        offset: u64,
        length: Option<u64>,
    ) -> BlobResult<BlobStream> {
        let mut file = match tokio::fs::File::open(self.blob_path(hash)).await {
            Ok(file) => file,
            Err(error) if error.kind() == ErrorKind::NotFound => {
                return Err(BlobError::NotFound(*hash));
            }
            Err(error) => return Err(BlobError::Io(error)),
        };
        let size = file.metadata().await?.len();
        let read_length = checked_read_length(offset, length, size)?;
        if offset > 0 {
            file.seek(std::io::SeekFrom::Start(offset)).await?;
        }
        let stream = ReaderStream::with_capacity(file.take(read_length), READ_CHUNK_SIZE)
            .map_err(BlobError::Io)
            .boxed();
        Ok(stream)
    }
}

/// An upload into a temp file of a [`LocalBlobStore`]. The [`NamedTempFile`] deletes the
/// file when dropped, so an abandoned upload leaves nothing behind.
#[derive(Debug)]
struct LocalUpload {
    root: PathBuf,
    /// `None` only while a blocking write owns it (or after a failed write).
    temp_file_opt: Option<NamedTempFile>,
    /// Chunks not written yet, at most [`WRITE_BATCH_BYTES`] in total.
    pending: Vec<Bytes>,
    pending_bytes: usize,
    written_bytes: u64,
    /// Bytes written since the last background flush started.
    unsynced_bytes: u64,
    /// The background flush in progress, if any.
    sync_ahead_opt: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl LocalUpload {
    /// Writes the pending chunks in one blocking call.
    async fn flush_pending(&mut self) -> BlobResult<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunks = std::mem::take(&mut self.pending);
        self.unsynced_bytes += self.pending_bytes as u64;
        self.pending_bytes = 0;
        let mut temp_file = self.temp_file_opt.take().ok_or_else(upload_broken)?;
        let start_sync = self.unsynced_bytes >= SYNC_AHEAD_BYTES
            && self
                .sync_ahead_opt
                .as_ref()
                .is_none_or(tokio::task::JoinHandle::is_finished);
        let (temp_file, sync_file_opt) = blocking(move || {
            for chunk in &chunks {
                temp_file.as_file_mut().write_all(chunk)?;
            }
            let sync_file_opt = start_sync
                .then(|| temp_file.as_file().try_clone())
                .transpose()?;
            Ok((temp_file, sync_file_opt))
        })
        .await?;
        self.temp_file_opt = Some(temp_file);
        if let Some(sync_file) = sync_file_opt {
            self.await_sync_ahead().await?;
            self.unsynced_bytes = 0;
            self.sync_ahead_opt = Some(tokio::task::spawn_blocking(move || sync_file.sync_data()));
        }
        Ok(())
    }

    /// Waits for the background flush in progress, if any, and returns its error.
    async fn await_sync_ahead(&mut self) -> BlobResult<()> {
        if let Some(sync_ahead) = self.sync_ahead_opt.take() {
            sync_ahead
                .await
                .map_err(|join_error| BlobError::Io(std::io::Error::other(join_error)))?
                .map_err(BlobError::Io)?;
        }
        Ok(())
    }
}

fn upload_broken() -> BlobError {
    BlobError::Io(std::io::Error::other(
        "upload is unusable after an earlier failure",
    ))
}

#[async_trait]
impl BlobUpload for LocalUpload {
    async fn write(&mut self, chunk: Bytes) -> BlobResult<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.written_bytes += chunk.len() as u64;
        self.pending_bytes += chunk.len();
        self.pending.push(chunk);
        if self.pending_bytes >= WRITE_BATCH_BYTES {
            self.flush_pending().await?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>, hash: ContentHash) -> BlobResult<FinishedUpload> {
        self.flush_pending().await?;
        self.await_sync_ahead().await?;
        let temp_file = self.temp_file_opt.take().ok_or_else(upload_broken)?;
        let final_path = blob_path(&self.root, &hash);
        let size = self.written_bytes;
        let deduplicated = blocking(move || {
            if final_path.try_exists()? {
                // Same hash, same bytes: keep the stored copy; dropping removes the temp.
                drop(temp_file);
                return Ok(true);
            }
            temp_file.as_file().sync_all()?;
            let parent = final_path
                .parent()
                .ok_or_else(|| std::io::Error::other("blob path has no parent"))?;
            std::fs::create_dir_all(parent)?;
            temp_file
                .persist(&final_path)
                .map_err(|persist_error| persist_error.error)?;
            // Make the rename itself durable.
            std::fs::File::open(parent)?.sync_all()?;
            Ok(false)
        })
        .await?;
        Ok(FinishedUpload { size, deduplicated })
    }

    async fn abort(mut self: Box<Self>) -> BlobResult<()> {
        self.pending.clear();
        if let Some(temp_file) = self.temp_file_opt.take() {
            blocking(move || temp_file.close()).await?;
        }
        Ok(())
    }
}
