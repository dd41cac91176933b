//! The media service on a real S3 server: the `bluetick-media` binary runs as a child
//! process with an `s3://` blob URL (`BLUETICK_TEST_S3_URL`, credentials in the URL or in
//! `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`; `scripts/test-s3.sh` sets them), so its
//! memory can be read from `/proc/<pid>/status` apart from the test's own. Run with
//! `--ignored`; a missing variable then fails the test rather than skipping it.

// Test helpers, like the `#[test]` bodies clippy.toml exempts.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bluetick_blob::{ContentHash, ContentHasher};
use bluetick_proto::common::v1::DeviceAddress;
use bluetick_proto::gateway::v1::gateway_internal_server::{
    GatewayInternal, GatewayInternalServer,
};
use bluetick_proto::gateway::v1::{
    AuthenticateRequest, AuthenticateResponse, DeliverRequest, DeliverResponse,
};
use bluetick_proto::media::v1::media_client::MediaClient;
use bluetick_proto::media::v1::{DownloadRequest, StatRequest, UploadRequest};
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Request;
use tonic::transport::Channel;

const MIB: u64 = 1024 * 1024;
const TOKEN: &str = "s3-test-token";
const NEEDS_S3: &str = "BLUETICK_TEST_S3_URL must name an S3 server (run scripts/test-s3.sh)";

/// Peak resident memory the media process may reach while moving 1 GiB.
const MAX_PEAK_RSS_MIB: u64 = 128;

/// A gateway that accepts one token.
#[derive(Debug)]
struct OneTokenGateway;

#[tonic::async_trait]
impl GatewayInternal for OneTokenGateway {
    async fn deliver(
        &self,
        _request: Request<DeliverRequest>,
    ) -> Result<tonic::Response<DeliverResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not part of this test"))
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<tonic::Response<AuthenticateResponse>, tonic::Status> {
        if request.get_ref().token == TOKEN {
            Ok(tonic::Response::new(AuthenticateResponse {
                device: Some(DeviceAddress::new("alice", 1)),
            }))
        } else {
            Err(tonic::Status::unauthenticated("unknown token"))
        }
    }
}

/// The media binary as a child process, killed when dropped.
struct MediaProcess {
    child: Child,
    addr: SocketAddr,
}

impl MediaProcess {
    fn spawn(blob_url: &str, gateway_url: &str, max_upload_bytes: u64) -> Self {
        // The port is chosen here and released for the child: a small race, retried by
        // the caller's readiness poll failing loudly if someone else grabs it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_bluetick-media"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--blobs")
            .arg(blob_url)
            .arg("--gateway-url")
            .arg(gateway_url)
            .arg("--max-upload-bytes")
            .arg(max_upload_bytes.to_string())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,bluetick_blob=info".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot start bluetick-media");
        Self { child, addr }
    }

    /// Polls Stat until the service answers (NOT_FOUND is an answer).
    async fn connect(&mut self) -> MediaClient<Channel> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("bluetick-media exited early: {status}");
            }
            if let Ok(channel) =
                tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
                    .unwrap()
                    .initial_stream_window_size(Some(4 * MIB as u32))
                    .initial_connection_window_size(Some(8 * MIB as u32))
                    .connect()
                    .await
            {
                let mut client = MediaClient::new(channel)
                    .max_decoding_message_size(8 * MIB as usize)
                    .max_encoding_message_size(8 * MIB as usize);
                let answer = client
                    .stat(StatRequest {
                        sha256: ContentHash::of(b"probe").to_hex(),
                    })
                    .await;
                if matches!(&answer, Err(status) if status.code() == tonic::Code::NotFound) {
                    return client;
                }
            }
            assert!(
                Instant::now() < deadline,
                "bluetick-media did not serve in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Returns a `VmHWM`-style field of `/proc/<pid>/status` in MiB.
    fn status_mib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status
            .lines()
            .find(|line| line.starts_with(field))
            .unwrap_or_else(|| panic!("no {field} in /proc status"));
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|value| value.parse().ok())
            .unwrap();
        kib / 1024.0
    }
}

impl Drop for MediaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fills `buffer` with a fast deterministic pattern continuing from `state`.
fn fill_pattern(buffer: &mut [u8], state: &mut u64) {
    for word in buffer.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
    }
}

/// 1 GiB goes up and comes back down through the media service on S3, byte for byte,
/// while the service process stays under 128 MiB of peak RSS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an S3 server: scripts/test-s3.sh"]
async fn one_gib_round_trip_through_media_on_s3_in_bounded_memory() {
    let base_url = std::env::var("BLUETICK_TEST_S3_URL").expect(NEEDS_S3);
    let query = base_url.split_once('?').map_or("", |(_, query)| query);
    let blob_url = format!("s3://bt-media-{:016x}?{query}", rand::random::<u64>());

    let gateway_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_url = format!("http://{}", gateway_listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GatewayInternalServer::new(OneTokenGateway))
            .serve_with_incoming(TcpListenerStream::new(gateway_listener)),
    );

    let size: u64 = 1024 * MIB;
    let frame_size = 2 * MIB as usize;
    let mut media = MediaProcess::spawn(&blob_url, &gateway_url, 2 * size);
    let mut client = media.connect().await;
    let idle_rss_mib = media.status_mib("VmRSS:");

    // Frames are generated as the upload pulls them: the test holds no 1 GiB either.
    let (frame_sender, frame_receiver) = tokio::sync::mpsc::channel::<UploadRequest>(2);
    let producer = tokio::spawn(async move {
        let mut hasher = ContentHasher::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut sent = 0u64;
        while sent < size {
            let mut frame = vec![0u8; frame_size.min((size - sent) as usize)];
            fill_pattern(&mut frame, &mut state);
            hasher.update(&frame);
            let request = UploadRequest {
                size_hint: if sent == 0 { size } else { 0 },
                chunk: Bytes::from(frame),
            };
            sent += request.chunk.len() as u64;
            if frame_sender.send(request).await.is_err() {
                break;
            }
        }
        hasher.finalize()
    });
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(frame_receiver));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let started = Instant::now();
    let uploaded = client.upload(request).await.unwrap().into_inner();
    let upload_secs = started.elapsed().as_secs_f64();
    let sent_hash = producer.await.unwrap();
    assert_eq!(uploaded.size, size);
    assert_eq!(uploaded.sha256, sent_hash.to_hex());
    let upload_peak_mib = media.status_mib("VmHWM:");

    let started = Instant::now();
    let mut stream = client
        .download(DownloadRequest {
            sha256: uploaded.sha256.clone(),
            offset: 0,
            length: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut hasher = ContentHasher::new();
    let mut received = 0u64;
    while let Some(frame) = stream.message().await.unwrap() {
        hasher.update(&frame.chunk);
        received += frame.chunk.len() as u64;
    }
    let download_secs = started.elapsed().as_secs_f64();
    assert_eq!(received, size);
    assert_eq!(hasher.finalize(), sent_hash);

    let peak_mib = media.status_mib("VmHWM:");
    let mib = size as f64 / MIB as f64;
    eprintln!(
        "1 GiB through media on S3: upload {:.0} MiB/s ({upload_secs:.1} s), download {:.0} \
         MiB/s ({download_secs:.1} s); media RSS idle {idle_rss_mib:.0} MiB, peak after \
         upload {upload_peak_mib:.0} MiB, peak overall {peak_mib:.0} MiB",
        mib / upload_secs,
        mib / download_secs,
    );
    assert!(
        peak_mib < MAX_PEAK_RSS_MIB as f64,
        "media peak RSS {peak_mib:.0} MiB ≥ {MAX_PEAK_RSS_MIB} MiB"
    );
}
