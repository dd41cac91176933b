//! Media transfers against a fake media service that records how each upload ended.

#![allow(clippy::unwrap_used)]

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bluetick_client::proto::media::v1::media_server::{Media, MediaServer};
use bluetick_client::proto::media::v1::{
    DownloadRequest, DownloadResponse, StatRequest, StatResponse, UploadRequest, UploadResponse,
};
use bluetick_client::{BluetickClient, ClientError, Credentials, media::sha256_hex, no_progress};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// How an upload stream ended on the server.
#[derive(Debug, PartialEq, Eq)]
enum UploadEnd {
    Completed { bytes: u64, frames: usize },
    Broken,
}

struct FakeMedia {
    ends: mpsc::Sender<UploadEnd>,
    /// Served by Download whatever hash is asked for (to test verification).
    download_bytes: Vec<u8>,
}

#[tonic::async_trait]
impl Media for FakeMedia {
    async fn upload(
        &self,
        request: Request<Streaming<UploadRequest>>,
    ) -> Result<Response<UploadResponse>, Status> {
        let mut stream = request.into_inner();
        let mut hasher = Sha256::new();
        let (mut bytes, mut frames) = (0u64, 0usize);
        loop {
            match stream.message().await {
                Ok(Some(frame)) => {
                    hasher.update(&frame.chunk);
                    bytes += frame.chunk.len() as u64;
                    frames += 1;
                }
                Ok(None) => break,
                Err(_) => {
                    let _ = self.ends.send(UploadEnd::Broken).await;
                    return Err(Status::cancelled("upload broken"));
                }
            }
        }
        let _ = self.ends.send(UploadEnd::Completed { bytes, frames }).await;
        Ok(Response::new(UploadResponse {
            sha256: hex::encode(hasher.finalize()),
            size: bytes,
            deduplicated: false,
        }))
    }

    type DownloadStream = ReceiverStream<Result<DownloadResponse, Status>>;

    async fn download(
        &self,
        _request: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let bytes = self.download_bytes.clone();
        tokio::spawn(async move {
            let total_size = bytes.len() as u64;
            for (index, chunk) in bytes.chunks(1000).enumerate() {
                let frame = DownloadResponse {
                    chunk: bytes::Bytes::copy_from_slice(chunk),
                    total_size: if index == 0 { total_size } else { 0 },
                };
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn stat(&self, _request: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        Ok(Response::new(StatResponse {
            size: self.download_bytes.len() as u64,
        }))
    }
}

async fn start(download_bytes: Vec<u8>) -> (BluetickClient, mpsc::Receiver<UploadEnd>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (ends_tx, ends_rx) = mpsc::channel(4);
    let media = FakeMedia {
        ends: ends_tx,
        download_bytes,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MediaServer::new(media))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let credentials = Credentials {
        gateway_url: url.clone(),
        media_url: url,
        user_id: "alice".into(),
        device_id: 1,
        token: "t".into(),
    };
    (BluetickClient::new(credentials).unwrap(), ends_rx)
}

/// Yields `good` bytes, then fails.
struct FailingReader {
    good: usize,
}

impl AsyncRead for FailingReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.good == 0 {
            return Poll::Ready(Err(std::io::Error::other("disk on fire")));
        }
        let n = self.good.min(buf.remaining());
        buf.put_slice(&vec![1u8; n]);
        self.good -= n;
        Poll::Ready(Ok(()))
    }
}

/// A file uploads in 1 MiB frames, its hash checked against the server's, with progress.
#[tokio::test]
async fn files_upload_in_mebibyte_frames_with_progress() {
    let (client, mut ends) = start(Vec::new()).await;
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("photo.bin");
    let data: Vec<u8> = (0..(2 * 1024 * 1024 + 5))
        .map(|i| (i % 251) as u8)
        .collect();
    std::fs::write(&path, &data).unwrap();
    let (progress_tx, mut progress_rx) = mpsc::unbounded_channel();
    let uploaded = client
        .upload_path(&path, move |done: u64, total_opt: Option<u64>| {
            let _ = progress_tx.send((done, total_opt));
        })
        .await
        .unwrap();
    assert_eq!(uploaded.sha256, sha256_hex(&data));
    assert_eq!(uploaded.size, data.len() as u64);
    assert_eq!(
        ends.recv().await.unwrap(),
        UploadEnd::Completed {
            bytes: data.len() as u64,
            frames: 3
        }
    );
    let mut last = (0, None);
    while let Ok(update) = progress_rx.try_recv() {
        last = update;
    }
    assert_eq!(last, (data.len() as u64, Some(data.len() as u64)));
}

/// A read error cancels the upload and fails it locally; no hash of partial bytes is
/// returned. (A tonic server reads a cancelled client stream as a clean end, so the server
/// side can only tell by comparing the bytes received with the announced size hint.)
#[tokio::test]
async fn a_failing_source_cancels_the_upload() {
    let (client, mut ends) = start(Vec::new()).await;
    let error = client
        .upload_reader(FailingReader { good: 1_500_000 }, None, no_progress())
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Io(_)), "{error:?}");
    let end = tokio::time::timeout(Duration::from_secs(5), ends.recv())
        .await
        .unwrap()
        .unwrap();
    match end {
        UploadEnd::Broken => {}
        UploadEnd::Completed { bytes, .. } => assert!(bytes < 1_500_000, "{bytes}"),
    }
}

/// Downloads are verified: good bytes land at the path, bad bytes leave nothing behind.
#[tokio::test]
async fn downloads_are_verified_before_they_are_kept() {
    let data = b"hello media".repeat(500);
    let (client, _ends) = start(data.clone()).await;
    let folder = tempfile::tempdir().unwrap();
    let good = folder.path().join("good.bin");
    let size = client
        .download_path(&sha256_hex(&data), &good, no_progress())
        .await
        .unwrap();
    assert_eq!(size, data.len() as u64);
    assert_eq!(std::fs::read(&good).unwrap(), data);

    let bad = folder.path().join("bad.bin");
    let error = client
        .download_path(&sha256_hex(b"something else"), &bad, no_progress())
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Integrity { .. }), "{error:?}");
    let names: Vec<_> = std::fs::read_dir(folder.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("good.bin")]);
    assert!(matches!(
        client.download_path("../etc", &bad, no_progress()).await,
        Err(ClientError::InvalidArgument(_))
    ));
}
