//! [`MediaService`]: the `bluetick.media.v1.Media` gRPC handlers, plus the state the HTTP
//! routes share with them.

use std::pin::Pin;
use std::sync::Arc;

use bluetick_blob::{BlobStoreRef, BlobStream, ContentHash};
use bluetick_common::auth::bearer_token;
use bluetick_proto::common::v1::DeviceAddress;
use bluetick_proto::media::v1::media_server::Media;
use bluetick_proto::media::v1::{
    DownloadRequest, DownloadResponse, StatRequest, StatResponse, UploadRequest, UploadResponse,
};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use crate::auth::Authenticator;
use crate::error::{MediaError, MediaResult};
use crate::upload::{MediaUpload, StoredMedia};

/// Size of the chunks Download streams (the last one may be shorter).
pub const DOWNLOAD_CHUNK_BYTES: usize = 256 * 1024;

/// Frames buffered ahead of a slow downloader (bounds memory per download to ~1 MiB).
const DOWNLOAD_QUEUE_FRAMES: usize = 4;

/// The media service's handlers: blob storage, token checks, the upload limit. Cheap to
/// clone; the gRPC and HTTP front ends share one.
#[derive(Clone, Debug)]
pub struct MediaService {
    inner: Arc<MediaServiceInner>,
}

#[derive(Debug)]
struct MediaServiceInner {
    store: BlobStoreRef,
    authenticator: Authenticator,
    max_upload_bytes: u64,
}

impl MediaService {
    pub(crate) fn new(
        store: BlobStoreRef,
        authenticator: Authenticator,
        max_upload_bytes: u64,
    ) -> Self {
        Self {
            inner: Arc::new(MediaServiceInner {
                store,
                authenticator,
                max_upload_bytes,
            }),
        }
    }

    pub(crate) fn store(&self) -> &BlobStoreRef {
        &self.inner.store
    }

    pub(crate) fn max_upload_bytes(&self) -> u64 {
        self.inner.max_upload_bytes
    }

    /// Returns the device whose bearer token is in `metadata`.
    pub(crate) async fn authenticate(&self, metadata: &MetadataMap) -> MediaResult<DeviceAddress> {
        let token = bearer_token(metadata)
            .map_err(|status| MediaError::Unauthenticated(status.message().to_string()))?;
        self.inner.authenticator.authenticate(token).await
    }

    /// Streams `chunks` into a new blob, hashing and enforcing the limit on the way.
    /// With `announced_size_opt`, the upload must be exactly that long: a stream that ends
    /// early (a client cancelled mid-upload looks like a normal end to the server) or runs
    /// past it is refused. Anything but success leaves nothing stored.
    pub(crate) async fn store_stream<S, E>(
        &self,
        chunks: S,
        announced_size_opt: Option<u64>,
    ) -> MediaResult<StoredMedia>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<MediaError>,
    {
        let mut chunks = std::pin::pin!(chunks);
        let mut upload = MediaUpload::begin(self.store(), self.max_upload_bytes()).await?;
        while let Some(chunk_result) = chunks.next().await {
            let write_result = match chunk_result {
                Ok(chunk) => match announced_size_opt {
                    Some(announced_size)
                        if upload.size().saturating_add(chunk.len() as u64) > announced_size =>
                    {
                        Err(MediaError::InvalidArgument(format!(
                            "upload runs past its announced size of {announced_size} bytes"
                        )))
                    }
                    _ => upload.write(chunk).await,
                },
                Err(error) => Err(error.into()),
            };
            if let Err(error) = write_result {
                upload.abort().await;
                return Err(error);
            }
        }
        if let Some(announced_size) = announced_size_opt
            && upload.size() != announced_size
        {
            let received_size = upload.size();
            upload.abort().await;
            return Err(MediaError::InvalidArgument(format!(
                "upload ended after {received_size} of its announced {announced_size} bytes; \
                 nothing was stored"
            )));
        }
        upload.finish().await
    }

    /// Returns the size of the blob under `hash`.
    pub(crate) async fn blob_size(&self, hash: &ContentHash) -> MediaResult<u64> {
        self.store()
            .stat(hash)
            .await?
            .ok_or(MediaError::NotFound(*hash))
    }
}

type DownloadStream = Pin<Box<dyn Stream<Item = Result<DownloadResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Media for MediaService {
    #[instrument(skip_all)]
    async fn upload(
        &self,
        request: Request<Streaming<UploadRequest>>,
    ) -> Result<Response<UploadResponse>, Status> {
        let device = self.authenticate(request.metadata()).await?;
        let mut frames = request.into_inner();
        let limit = self.max_upload_bytes();
        let first_frame_opt = frames.message().await?;
        if let Some(first_frame) = &first_frame_opt {
            MediaUpload::check_announced_size(first_frame.size_hint, limit)?;
        }
        // A non-zero hint is a promise: tonic reports a cancelled client stream as a normal
        // end, so the hint is what tells a cut-off upload from a complete one.
        let announced_size_opt = first_frame_opt
            .as_ref()
            .map(|first_frame| first_frame.size_hint)
            .filter(|size_hint| *size_hint > 0);
        let chunks = futures::stream::iter(first_frame_opt.map(Ok))
            .chain(frames)
            .map(|frame_result| frame_result.map(|frame| frame.chunk));
        let stored = self.store_stream(chunks, announced_size_opt).await?;
        tracing::info!(
            device = %device,
            sha256 = %stored.hash,
            size = stored.size,
            deduplicated = stored.deduplicated,
            "media uploaded over grpc"
        );
        Ok(Response::new(UploadResponse {
            sha256: stored.hash.to_hex(),
            size: stored.size,
            deduplicated: stored.deduplicated,
        }))
    }

    type DownloadStream = DownloadStream;

    #[instrument(skip_all, fields(sha256 = %request.get_ref().sha256))]
    async fn download(
        &self,
        request: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let request = request.into_inner();
        let hash: ContentHash = request.sha256.parse().map_err(MediaError::from)?;
        let total_size = self.blob_size(&hash).await?;
        let length_opt = (request.length > 0).then_some(request.length);
        let chunks = self
            .store()
            .read(&hash, request.offset, length_opt)
            .await
            .map_err(MediaError::from)?;
        let (sender, receiver) = mpsc::channel(DOWNLOAD_QUEUE_FRAMES);
        tokio::spawn(feed_download(chunks, total_size, sender));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    #[instrument(skip_all, fields(sha256 = %request.get_ref().sha256))]
    async fn stat(&self, request: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        let hash: ContentHash = request.get_ref().sha256.parse().map_err(MediaError::from)?;
        let size = self.blob_size(&hash).await?;
        Ok(Response::new(StatResponse { size }))
    }
}

impl From<Status> for MediaError {
    /// A broken client stream (reset, bad frame) while uploading.
    fn from(status: Status) -> Self {
        match status.code() {
            tonic::Code::ResourceExhausted => {
                MediaError::InvalidArgument(format!("upload frame too large: {}", status.message()))
            }
            _ => MediaError::InvalidArgument(format!("upload stream failed: {}", status.message())),
        }
    }
}

/// Re-chunks `chunks` into [`DOWNLOAD_CHUNK_BYTES`] frames, the first carrying
/// `total_size`, and sends them until the blob ends or the client goes away. Always sends
/// at least one frame, so even an empty range tells the client the blob's size.
async fn feed_download(
    mut chunks: BlobStream,
    total_size: u64,
    sender: mpsc::Sender<Result<DownloadResponse, Status>>,
) {
    let mut total_size_opt = Some(total_size);
    let mut buffer = BytesMut::new();
    let frame = |chunk: Bytes, total_size_opt: &mut Option<u64>| DownloadResponse {
        chunk,
        total_size: total_size_opt.take().unwrap_or(0),
    };
    while let Some(chunk_result) = chunks.next().await {
        let mut chunk = match chunk_result {
            Ok(chunk) => chunk,
            Err(error) => {
                let _ = sender.send(Err(MediaError::from(error).into())).await;
                return;
            }
        };
        while !chunk.is_empty() {
            let outgoing_opt = if buffer.is_empty() && chunk.len() >= DOWNLOAD_CHUNK_BYTES {
                Some(chunk.split_to(DOWNLOAD_CHUNK_BYTES))
            } else {
                let take = (DOWNLOAD_CHUNK_BYTES - buffer.len()).min(chunk.len());
                buffer.extend_from_slice(&chunk.split_to(take));
                (buffer.len() == DOWNLOAD_CHUNK_BYTES).then(|| buffer.split().freeze())
            };
            if let Some(outgoing) = outgoing_opt
                && sender
                    .send(Ok(frame(outgoing, &mut total_size_opt)))
                    .await
                    .is_err()
            {
                return;
            }
        }
    }
    if !buffer.is_empty() || total_size_opt.is_some() {
        let _ = sender
            .send(Ok(frame(buffer.freeze(), &mut total_size_opt)))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames_of(chunk_sizes: &[usize]) -> Vec<DownloadResponse> {
        let chunks: Vec<_> = chunk_sizes
            .iter()
            .map(|size| Ok(Bytes::from(vec![1u8; *size])))
            .collect();
        let total: usize = chunk_sizes.iter().sum();
        let (sender, receiver) = mpsc::channel(1000);
        feed_download(futures::stream::iter(chunks).boxed(), total as u64, sender).await;
        ReceiverStream::new(receiver)
            .map(|frame| frame.unwrap())
            .collect()
            .await
    }

    #[tokio::test]
    async fn download_frames_are_rechunked_and_first_carries_size() {
        let frames = frames_of(&[100, 600 * 1024, 10]).await;
        let sizes: Vec<usize> = frames.iter().map(|frame| frame.chunk.len()).collect();
        assert_eq!(sizes, vec![256 * 1024, 256 * 1024, 100 + 88 * 1024 + 10]);
        assert_eq!(frames[0].total_size, 100 + 600 * 1024 + 10);
        assert!(frames[1..].iter().all(|frame| frame.total_size == 0));
    }

    #[tokio::test]
    async fn empty_download_still_sends_the_size() {
        let frames = frames_of(&[]).await;
        assert_eq!(frames.len(), 1);
        assert!(frames[0].chunk.is_empty());
        assert_eq!(frames[0].total_size, 0);
    }
}
