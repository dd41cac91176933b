//! Media: streaming upload and verified download of content-addressed blobs over gRPC.
//!
//! Files move in [`CHUNK_BYTES`] chunks and are never held whole in memory. Uploads hash
//! what they send and check the server's answer; downloads hash what arrives and refuse
//! bytes that do not match the hash asked for (a download to a path writes a `.part` file
//! and renames it only once verified).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bluetick_proto::media::v1::{DownloadRequest, StatRequest, UploadRequest};
use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::api::BluetickClient;
use crate::error::{ClientError, ClientResult};

/// Bytes per upload frame.
pub const CHUNK_BYTES: usize = 1024 * 1024;

/// Called with (bytes done, total bytes if known) as a transfer progresses.
pub trait Progress: Send + 'static {
    /// Reports progress.
    fn update(&mut self, done: u64, total_opt: Option<u64>);
}

impl<F: FnMut(u64, Option<u64>) + Send + 'static> Progress for F {
    fn update(&mut self, done: u64, total_opt: Option<u64>) {
        self(done, total_opt)
    }
}

/// A [`Progress`] that reports nowhere.
pub fn no_progress() -> impl Progress {
    |_: u64, _: Option<u64>| {}
}

/// What an upload stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// True when the server already had these bytes.
    pub deduplicated: bool,
}

/// Returns the lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Returns true for a well-formed lowercase hex SHA-256.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Reads up to `CHUNK_BYTES` from `reader`; an empty result means end of file.
async fn read_chunk<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<Bytes> {
    let mut buffer = BytesMut::with_capacity(CHUNK_BYTES);
    while buffer.len() < CHUNK_BYTES {
        let read = reader.read_buf(&mut buffer).await?;
        if read == 0 {
            break;
        }
    }
    Ok(buffer.freeze())
}

struct UploadState<R, P> {
    reader: R,
    progress: P,
    hasher: Sha256,
    sent: u64,
    size_hint_opt: Option<u64>,
    first: bool,
    finished: bool,
    /// Where the stream leaves its result: the local hash at the end, or the read error.
    outcome: Arc<Mutex<Option<Result<String, std::io::Error>>>>,
    failed_tx_opt: Option<oneshot::Sender<()>>,
}

impl BluetickClient {
    /// Uploads everything `reader` yields and returns its hash and size. `size_hint_opt`
    /// lets the server refuse an oversize blob before it is sent.
    ///
    /// # Errors
    /// [`ClientError::ResourceExhausted`] past the server's size limit, [`ClientError::Io`]
    /// when reading fails (the upload is then cancelled, not completed with partial bytes),
    /// [`ClientError::Integrity`] if the server's hash differs from the local one.
    pub async fn upload_reader<R, P>(
        &self,
        reader: R,
        size_hint_opt: Option<u64>,
        progress: P,
    ) -> ClientResult<Uploaded>
    where
        R: AsyncRead + Unpin + Send + 'static,
        P: Progress,
    {
        let outcome = Arc::new(Mutex::new(None));
        let (failed_tx, failed_rx) = oneshot::channel();
        let state = UploadState {
            reader,
            progress,
            hasher: Sha256::new(),
            sent: 0,
            size_hint_opt,
            first: true,
            finished: false,
            outcome: Arc::clone(&outcome),
            failed_tx_opt: Some(failed_tx),
        };
        let frames = futures::stream::unfold(state, |mut state| async move {
            if state.finished {
                return None;
            }
            match read_chunk(&mut state.reader).await {
                Ok(chunk) => {
                    let is_first = std::mem::replace(&mut state.first, false);
                    if chunk.is_empty() {
                        state.finished = true;
                        let hash = hex::encode(std::mem::take(&mut state.hasher).finalize());
                        store_outcome(&state.outcome, Ok(hash));
                        if !is_first {
                            return None;
                        }
                        // An empty blob still needs one frame to carry the size hint.
                    }
                    state.hasher.update(&chunk);
                    state.sent += chunk.len() as u64;
                    state.progress.update(state.sent, state.size_hint_opt);
                    let request = UploadRequest {
                        chunk,
                        size_hint: if is_first {
                            state.size_hint_opt.unwrap_or(0)
                        } else {
                            0
                        },
                    };
                    Some((request, state))
                }
                Err(error) => {
                    store_outcome(&state.outcome, Err(error));
                    if let Some(failed_tx) = state.failed_tx_opt.take() {
                        let _ = failed_tx.send(());
                    }
                    // Never end the stream: ending it would commit a partial blob. The
                    // caller sees the failure signal and drops the call, which resets it.
                    futures::future::pending::<()>().await;
                    None
                }
            }
        });
        let mut media = self.media();
        let response = tokio::select! {
            response = media.upload(frames) => response?.into_inner(),
            Ok(()) = failed_rx => {
                let error = take_outcome(&outcome)
                    .and_then(Result::err)
                    .unwrap_or_else(|| std::io::Error::other("upload source failed"));
                return Err(ClientError::Io(error));
            }
        };
        if let Some(Ok(local_hash)) = take_outcome(&outcome)
            && local_hash != response.sha256
        {
            return Err(ClientError::Integrity {
                expected: local_hash,
                actual: response.sha256,
            });
        }
        Ok(Uploaded {
            sha256: response.sha256,
            size: response.size,
            deduplicated: response.deduplicated,
        })
    }

    /// Uploads the file at `path` (streamed, 1 MiB frames) and returns its hash and size.
    ///
    /// # Errors
    /// As [`BluetickClient::upload_reader`], plus [`ClientError::Io`] if the file cannot be opened.
    pub async fn upload_path(
        &self,
        path: impl AsRef<Path>,
        progress: impl Progress,
    ) -> ClientResult<Uploaded> {
        let file = tokio::fs::File::open(path.as_ref()).await?;
        let size = file.metadata().await?.len();
        self.upload_reader(file, Some(size), progress).await
    }

    /// Uploads bytes already in memory (handy in tests).
    ///
    /// # Errors
    /// As [`BluetickClient::upload_reader`].
    pub async fn upload_bytes(
        &self,
        bytes: Bytes,
        progress: impl Progress,
    ) -> ClientResult<Uploaded> {
        let size = bytes.len() as u64;
        self.upload_reader(std::io::Cursor::new(bytes), Some(size), progress)
            .await
    }

    /// Downloads blob `sha256` into `writer`, verifying its hash as it arrives, and returns
    /// its size. The writer may hold bad bytes when this fails; use
    /// [`BluetickClient::download_path`] to only ever keep verified files.
    ///
    /// # Errors
    /// [`ClientError::NotFound`] for an unknown hash, [`ClientError::Integrity`] when the
    /// bytes do not hash to `sha256` or their size is not the announced one.
    pub async fn download_to_writer<W, P>(
        &self,
        sha256: &str,
        writer: &mut W,
        mut progress: P,
    ) -> ClientResult<u64>
    where
        W: AsyncWrite + Unpin,
        P: Progress,
    {
        let expected = sha256.to_ascii_lowercase();
        if !is_sha256_hex(&expected) {
            return Err(ClientError::InvalidArgument(format!(
                "{sha256:?} is not a hex sha-256"
            )));
        }
        let mut stream = self
            .media()
            .download(DownloadRequest {
                sha256: expected.clone(),
                offset: 0,
                length: 0,
            })
            .await?
            .into_inner();
        let mut hasher = Sha256::new();
        let mut received: u64 = 0;
        let mut total_opt: Option<u64> = None;
        while let Some(frame) = stream.message().await? {
            if total_opt.is_none() {
                total_opt = Some(frame.total_size);
            }
            hasher.update(&frame.chunk);
            writer.write_all(&frame.chunk).await?;
            received += frame.chunk.len() as u64;
            progress.update(received, total_opt);
        }
        writer.flush().await?;
        let actual = hex::encode(hasher.finalize());
        if actual != expected || total_opt.is_some_and(|total| total != received) {
            return Err(ClientError::Integrity { expected, actual });
        }
        Ok(received)
    }

    /// Downloads blob `sha256` to `path`: written to `<path>.part`, verified, then renamed.
    /// Returns the size.
    ///
    /// # Errors
    /// As [`BluetickClient::download_to_writer`]; nothing is left at `path` on failure.
    pub async fn download_path(
        &self,
        sha256: &str,
        path: impl AsRef<Path>,
        progress: impl Progress,
    ) -> ClientResult<u64> {
        let path = path.as_ref();
        let mut part_name = path
            .file_name()
            .map(|name| name.to_os_string())
            .unwrap_or_default();
        part_name.push(".part");
        let part_path: PathBuf = path.with_file_name(part_name);
        let mut file = tokio::fs::File::create(&part_path).await?;
        let result = self.download_to_writer(sha256, &mut file, progress).await;
        let result = match result {
            Ok(size) => file
                .sync_all()
                .await
                .map(|()| size)
                .map_err(ClientError::from),
            Err(error) => Err(error),
        };
        drop(file);
        match result {
            Ok(size) => {
                tokio::fs::rename(&part_path, path).await?;
                Ok(size)
            }
            Err(error) => {
                let _ = tokio::fs::remove_file(&part_path).await;
                Err(error)
            }
        }
    }

    /// Returns the size of blob `sha256`.
    ///
    /// # Errors
    /// [`ClientError::NotFound`] for an unknown hash.
    pub async fn stat_media(&self, sha256: &str) -> ClientResult<u64> {
        Ok(self
            .media()
            .stat(StatRequest {
                sha256: sha256.to_ascii_lowercase(),
            })
            .await?
            .into_inner()
            .size)
    }
}

fn store_outcome(
    slot: &Mutex<Option<Result<String, std::io::Error>>>,
    outcome: Result<String, std::io::Error>,
) {
    if let Ok(mut guard) = slot.lock() {
        *guard = Some(outcome);
    }
}

fn take_outcome(
    slot: &Mutex<Option<Result<String, std::io::Error>>>,
) -> Option<Result<String, std::io::Error>> {
    slot.lock().ok().and_then(|mut guard| guard.take())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chunks_are_full_mebibytes_until_the_end() {
        let data = vec![7u8; CHUNK_BYTES * 2 + 10];
        let mut reader = std::io::Cursor::new(data);
        assert_eq!(read_chunk(&mut reader).await.unwrap().len(), CHUNK_BYTES);
        assert_eq!(read_chunk(&mut reader).await.unwrap().len(), CHUNK_BYTES);
        assert_eq!(read_chunk(&mut reader).await.unwrap().len(), 10);
        assert!(read_chunk(&mut reader).await.unwrap().is_empty());
    }

    #[test]
    fn sha256_helpers() {
        let hash = sha256_hex(b"abc");
        assert_eq!(
            hash,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_sha256_hex(&hash));
        assert!(!is_sha256_hex(&hash.to_uppercase()));
        assert!(!is_sha256_hex("../etc/passwd"));
    }
}
