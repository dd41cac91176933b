//! The media service over real sockets: a tonic client and a hyper HTTP/1.1 client against
//! `serve` on an ephemeral port, with a small real `GatewayInternal` server checking tokens.

// The harness helpers below are test code like the `#[test]` bodies clippy.toml exempts.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bluetick_blob::ContentHash;
use bluetick_media::{MediaConfig, serve};
use bluetick_proto::common::v1::DeviceAddress;
use bluetick_proto::gateway::v1::gateway_internal_server::{
    GatewayInternal, GatewayInternalServer,
};
use bluetick_proto::gateway::v1::{
    AuthenticateRequest, AuthenticateResponse, DeliverRequest, DeliverResponse,
};
use bluetick_proto::media::v1::media_client::MediaClient;
use bluetick_proto::media::v1::{DownloadRequest, StatRequest, UploadRequest, UploadResponse};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request};

const GOOD_TOKEN: &str = "good-token";
const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// A gateway that knows one token and counts how often it is asked.
#[derive(Debug, Default)]
struct FakeGateway {
    authenticate_calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl GatewayInternal for FakeGateway {
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
        self.authenticate_calls.fetch_add(1, Ordering::SeqCst);
        if request.get_ref().token == GOOD_TOKEN {
            Ok(tonic::Response::new(AuthenticateResponse {
                device: Some(DeviceAddress::new("alice", 1)),
            }))
        } else {
            Err(tonic::Status::unauthenticated("unknown token"))
        }
    }
}

/// A running media service with its gateway and blob folder.
struct TestMedia {
    addr: SocketAddr,
    blob_dir: tempfile::TempDir,
    gateway_calls: Arc<AtomicUsize>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestMedia {
    async fn start(max_upload_bytes: u64) -> Self {
        let gateway_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway_addr = gateway_listener.local_addr().unwrap();
        let gateway = FakeGateway::default();
        let gateway_calls = gateway.authenticate_calls.clone();
        let shutdown = CancellationToken::new();
        let gateway_shutdown = shutdown.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(GatewayInternalServer::new(gateway))
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(gateway_listener),
                    gateway_shutdown.cancelled_owned(),
                ),
        );
        Self::start_with_gateway(
            max_upload_bytes,
            format!("http://{gateway_addr}"),
            gateway_calls,
            shutdown,
        )
        .await
    }

    async fn start_with_gateway(
        max_upload_bytes: u64,
        gateway_url: String,
        gateway_calls: Arc<AtomicUsize>,
        shutdown: CancellationToken,
    ) -> Self {
        let blob_dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = MediaConfig {
            blob_url: blob_dir.path().display().to_string(),
            gateway_url,
            max_upload_bytes,
            ..MediaConfig::default()
        };
        let server = tokio::spawn(serve(config, listener, shutdown.clone()));
        let media = Self {
            addr,
            blob_dir,
            gateway_calls,
            shutdown,
            server,
        };
        media.wait_until_serving().await;
        media
    }

    /// Polls Stat until the server answers (any answer but a connection failure).
    async fn wait_until_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut client) = MediaClient::connect(format!("http://{}", self.addr)).await {
                let answer = client
                    .stat(StatRequest {
                        sha256: ContentHash::of(b"probe").to_hex(),
                    })
                    .await;
                if answer.is_ok() || answer.is_err_and(|status| status.code() == Code::NotFound) {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "media service did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn grpc(&self) -> MediaClient<Channel> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .initial_stream_window_size(Some(4 * MIB as u32))
            .initial_connection_window_size(Some(8 * MIB as u32))
            .connect()
            .await
            .unwrap();
        MediaClient::new(channel)
            .max_decoding_message_size(8 * MIB)
            .max_encoding_message_size(8 * MIB)
    }

    /// Returns every file under the blob folder (blobs and temp files).
    fn stored_files(&self) -> Vec<PathBuf> {
        files_under(self.blob_dir.path())
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("server did not drain")
            .unwrap()
            .unwrap();
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir failed") {
        let path = entry.expect("dir entry failed").path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

fn test_bytes(size: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..size)
            .map(|index| ((index as u64).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
            .collect::<Vec<u8>>(),
    )
}

/// Builds an Upload request streaming `data` in `frame_size` frames.
fn upload_request(
    data: &Bytes,
    frame_size: usize,
    size_hint: u64,
    token_opt: Option<&str>,
) -> Request<futures::stream::BoxStream<'static, UploadRequest>> {
    let frames: Vec<UploadRequest> = (0..data.len())
        .step_by(frame_size)
        .enumerate()
        .map(|(index, start)| UploadRequest {
            chunk: data.slice(start..(start + frame_size).min(data.len())),
            size_hint: if index == 0 { size_hint } else { 0 },
        })
        .collect();
    let mut request = Request::new(futures::stream::iter(frames).boxed());
    if let Some(token) = token_opt {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

async fn grpc_upload(
    client: &mut MediaClient<Channel>,
    data: &Bytes,
    token_opt: Option<&str>,
) -> Result<UploadResponse, tonic::Status> {
    client
        .upload(upload_request(data, MIB, 0, token_opt))
        .await
        .map(tonic::Response::into_inner)
}

/// Downloads a range over gRPC; returns (total_size of the first frame, bytes, frames).
async fn grpc_download(
    client: &mut MediaClient<Channel>,
    sha256: &str,
    offset: u64,
    length: u64,
) -> Result<(u64, Vec<u8>, usize), tonic::Status> {
    let mut stream = client
        .download(DownloadRequest {
            sha256: sha256.to_string(),
            offset,
            length,
        })
        .await?
        .into_inner();
    let mut total_size_opt = None;
    let mut bytes = Vec::new();
    let mut frames = 0;
    while let Some(frame) = stream.message().await? {
        assert!(
            frame.chunk.len() <= 256 * 1024,
            "frames are at most 256 KiB"
        );
        total_size_opt.get_or_insert(frame.total_size);
        bytes.extend_from_slice(&frame.chunk);
        frames += 1;
    }
    Ok((total_size_opt.unwrap(), bytes, frames))
}

type HttpBody = BoxBody<Bytes, Infallible>;

fn full_body(data: Bytes) -> HttpBody {
    Full::new(data).boxed()
}

/// A chunked body (no Content-Length) of `data` in `chunk_size` pieces.
fn chunked_body(data: Bytes, chunk_size: usize) -> HttpBody {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = (0..data.len())
        .step_by(chunk_size)
        .map(|start| {
            Ok(Frame::data(
                data.slice(start..(start + chunk_size).min(data.len())),
            ))
        })
        .collect();
    BodyExt::boxed(StreamBody::new(futures::stream::iter(frames)))
}

/// Sends one HTTP/1.1 request on a fresh connection; returns the head and the whole body.
async fn http_request(
    addr: SocketAddr,
    request: http::Request<HttpBody>,
) -> (http::response::Parts, Bytes) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts, body)
}

fn http_put(addr: SocketAddr, body: HttpBody, token_opt: Option<&str>) -> http::Request<HttpBody> {
    let mut builder = http::Request::put(format!("http://{addr}/v1/media"))
        .header(http::header::HOST, addr.to_string());
    if let Some(token) = token_opt {
        builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    builder.body(body).unwrap()
}

fn http_get(
    addr: SocketAddr,
    method: http::Method,
    sha256: &str,
    range_opt: Option<&str>,
) -> http::Request<HttpBody> {
    let mut builder = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}/v1/media/{sha256}"))
        .header(http::header::HOST, addr.to_string());
    if let Some(range) = range_opt {
        builder = builder.header(http::header::RANGE, range);
    }
    builder.body(full_body(Bytes::new())).unwrap()
}

fn header(parts: &http::response::Parts, name: http::header::HeaderName) -> &str {
    parts
        .headers
        .get(&name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

fn json(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// A 9 MiB blob uploads over gRPC in 1 MiB frames and downloads in 256 KiB frames with the
/// same SHA-256; Stat reports its size; the HTTP side serves the same bytes.
#[tokio::test]
async fn grpc_upload_and_download_round_trip_multi_mib() {
    let media = TestMedia::start(100 * MIB as u64).await;
    let mut client = media.grpc().await;
    let data = test_bytes(9 * MIB + 123, 1);
    let expected_hash = ContentHash::of(&data).to_hex();

    let uploaded = client
        .upload(upload_request(
            &data,
            MIB,
            data.len() as u64,
            Some(GOOD_TOKEN),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(uploaded.sha256, expected_hash);
    assert_eq!(uploaded.size, data.len() as u64);
    assert!(!uploaded.deduplicated);

    let (total_size, downloaded, frames) = grpc_download(&mut client, &expected_hash, 0, 0)
        .await
        .unwrap();
    assert_eq!(total_size, data.len() as u64);
    assert_eq!(ContentHash::of(&downloaded).to_hex(), expected_hash);
    assert!(downloaded == data);
    assert_eq!(frames, data.len().div_ceil(256 * 1024));

    let stat = client
        .stat(StatRequest {
            sha256: expected_hash.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stat.size, data.len() as u64);

    let (parts, body) = http_get(media.addr, http::Method::GET, &expected_hash, None)
        .pipe(|request| http_request(media.addr, request))
        .await;
    assert_eq!(parts.status, 200);
    assert!(body == data);
    media.stop().await;
}

/// A 6 MiB blob PUT over HTTP (chunked) comes back with GET, Content-Length and ETag = hash;
/// HEAD gives the headers without the body; gRPC downloads the same bytes.
#[tokio::test]
async fn http_put_and_get_round_trip_multi_mib() {
    let media = TestMedia::start(100 * MIB as u64).await;
    let data = test_bytes(6 * MIB + 7, 2);
    let expected_hash = ContentHash::of(&data).to_hex();

    let (parts, body) = http_request(
        media.addr,
        http_put(
            media.addr,
            chunked_body(data.clone(), 64 * 1024),
            Some(GOOD_TOKEN),
        ),
    )
    .await;
    assert_eq!(parts.status, 201, "{body:?}");
    assert_eq!(
        header(&parts, http::header::CONTENT_TYPE),
        "application/json"
    );
    let answer = json(&body);
    assert_eq!(answer["sha256"], expected_hash.as_str());
    assert_eq!(answer["size"], data.len() as u64);
    assert_eq!(answer["deduplicated"], false);

    let (parts, body) = http_request(
        media.addr,
        http_get(media.addr, http::Method::GET, &expected_hash, None),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(
        header(&parts, http::header::CONTENT_LENGTH),
        data.len().to_string()
    );
    assert_eq!(
        header(&parts, http::header::ETAG),
        format!("\"{expected_hash}\"")
    );
    assert_eq!(header(&parts, http::header::ACCEPT_RANGES), "bytes");
    assert_eq!(ContentHash::of(&body).to_hex(), expected_hash);

    let (parts, body) = http_request(
        media.addr,
        http_get(media.addr, http::Method::HEAD, &expected_hash, None),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(
        header(&parts, http::header::CONTENT_LENGTH),
        data.len().to_string()
    );
    assert!(body.is_empty());

    let mut client = media.grpc().await;
    let (_, downloaded, _) = grpc_download(&mut client, &expected_hash, 0, 0)
        .await
        .unwrap();
    assert!(downloaded == data);
    media.stop().await;
}

/// The same bytes uploaded again (over gRPC, then HTTP with Content-Length) report
/// deduplicated, and the folder holds exactly one file.
#[tokio::test]
async fn second_upload_is_deduplicated_and_stored_once() {
    let media = TestMedia::start(100 * MIB as u64).await;
    let mut client = media.grpc().await;
    let data = test_bytes(3 * MIB, 3);

    let first = grpc_upload(&mut client, &data, Some(GOOD_TOKEN))
        .await
        .unwrap();
    let second = grpc_upload(&mut client, &data, Some(GOOD_TOKEN))
        .await
        .unwrap();
    assert!(!first.deduplicated);
    assert!(second.deduplicated);
    assert_eq!(first.sha256, second.sha256);

    let (parts, body) = http_request(
        media.addr,
        http_put(media.addr, full_body(data.clone()), Some(GOOD_TOKEN)),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(json(&body)["deduplicated"], true);

    let hash = &first.sha256;
    assert_eq!(
        media.stored_files(),
        vec![media.blob_dir.path().join(&hash[..2]).join(hash)]
    );
    // The gateway was asked once: the accepted token is cached.
    assert_eq!(media.gateway_calls.load(Ordering::SeqCst), 1);
    media.stop().await;
}

/// Uploads over the limit fail with RESOURCE_EXHAUSTED (gRPC) or 413 (HTTP), whether
/// announced up front or found while streaming, and leave no blob and no temp file.
#[tokio::test]
async fn oversize_uploads_are_refused_and_leave_nothing() {
    let limit = MIB as u64;
    let media = TestMedia::start(limit).await;
    let mut client = media.grpc().await;
    let data = test_bytes(3 * MIB, 4);

    // Found while streaming (no size hint).
    let status = client
        .upload(upload_request(&data, 256 * 1024, 0, Some(GOOD_TOKEN)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Announced up front.
    let status = client
        .upload(upload_request(
            &data,
            256 * 1024,
            data.len() as u64,
            Some(GOOD_TOKEN),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Exactly at the limit is fine.
    let at_limit = data.slice(..MIB);
    let stored = grpc_upload(&mut client, &at_limit, Some(GOOD_TOKEN))
        .await
        .unwrap();
    assert_eq!(stored.size, limit);

    // HTTP, announced by Content-Length.
    let (parts, body) = http_request(
        media.addr,
        http_put(media.addr, full_body(data.clone()), Some(GOOD_TOKEN)),
    )
    .await;
    assert_eq!(parts.status, 413, "{body:?}");
    // HTTP, chunked: found while streaming.
    let (parts, body) = http_request(
        media.addr,
        http_put(
            media.addr,
            chunked_body(data.slice(..2 * MIB), 128 * 1024),
            Some(GOOD_TOKEN),
        ),
    )
    .await;
    assert_eq!(parts.status, 413, "{body:?}");
    assert!(json(&body)["error"].as_str().unwrap().contains("limit"));

    let hash = &stored.sha256;
    assert_eq!(
        media.stored_files(),
        vec![media.blob_dir.path().join(&hash[..2]).join(hash)],
        "only the upload within the limit is stored, no temp files"
    );
    media.stop().await;
}

/// An upload whose stream ends short of (or runs past) its non-zero size hint is refused
/// with INVALID_ARGUMENT and stores nothing: a client cancelled mid-upload ends its stream
/// like a finished one, so the hint is what tells them apart.
#[tokio::test]
async fn uploads_that_break_their_size_hint_are_refused_and_leave_nothing() {
    let media = TestMedia::start(100 * MIB as u64).await;
    let mut client = media.grpc().await;
    let data = test_bytes(3 * MIB, 11);

    let short = data.slice(..MIB);
    let status = client
        .upload(upload_request(
            &short,
            256 * 1024,
            data.len() as u64,
            Some(GOOD_TOKEN),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("announced"), "{status:?}");

    let status = client
        .upload(upload_request(
            &data,
            256 * 1024,
            MIB as u64,
            Some(GOOD_TOKEN),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // A real cancel: the client drops the call after sending part of the blob.
    let (frame_sender, frame_receiver) = tokio::sync::mpsc::channel::<UploadRequest>(4);
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(frame_receiver));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {GOOD_TOKEN}").parse().unwrap(),
    );
    let mut cancelled_client = media.grpc().await;
    let call = tokio::spawn(async move { cancelled_client.upload(request).await });
    frame_sender
        .send(UploadRequest {
            chunk: data.slice(..MIB),
            size_hint: data.len() as u64,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    call.abort();
    drop(frame_sender);
    let _ = call.await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    for hash in [ContentHash::of(&short), ContentHash::of(&data)] {
        let status = client
            .stat(StatRequest {
                sha256: hash.to_hex(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    assert!(
        media.stored_files().is_empty(),
        "{:?}",
        media.stored_files()
    );

    // Keeping the promise works.
    let stored = client
        .upload(upload_request(
            &data,
            MIB,
            data.len() as u64,
            Some(GOOD_TOKEN),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.size, data.len() as u64);
    media.stop().await;
}

/// Unknown hashes are NOT_FOUND / 404; malformed ones INVALID_ARGUMENT / 400.
#[tokio::test]
async fn unknown_and_malformed_hashes_are_refused() {
    let media = TestMedia::start(MIB as u64).await;
    let mut client = media.grpc().await;
    let unknown = ContentHash::of(b"never uploaded").to_hex();

    let status = grpc_download(&mut client, &unknown, 0, 0)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .stat(StatRequest {
            sha256: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    for malformed in ["abc", "../etc/passwd", &unknown.to_uppercase()] {
        let status = grpc_download(&mut client, malformed, 0, 0)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{malformed}");
    }

    for method in [http::Method::GET, http::Method::HEAD] {
        let (parts, _) = http_request(
            media.addr,
            http_get(media.addr, method.clone(), &unknown, None),
        )
        .await;
        assert_eq!(parts.status, 404, "{method}");
    }
    let (parts, _) = http_request(
        media.addr,
        http_get(media.addr, http::Method::GET, "not-a-hash", None),
    )
    .await;
    assert_eq!(parts.status, 400);
    media.stop().await;
}

/// Byte ranges: gRPC offset/length and HTTP `Range` return exactly the requested bytes;
/// ranges past the end are INVALID_ARGUMENT / 416.
#[tokio::test]
async fn range_requests_return_exact_bytes() {
    let media = TestMedia::start(100 * MIB as u64).await;
    let mut client = media.grpc().await;
    let data = test_bytes(2 * MIB + 999, 5);
    let hash = grpc_upload(&mut client, &data, Some(GOOD_TOKEN))
        .await
        .unwrap()
        .sha256;
    let size = data.len() as u64;

    for (offset, length) in [(0u64, 1u64), (1, 300_000), (MIB as u64, 0), (size - 10, 10)] {
        let (total_size, bytes, _) = grpc_download(&mut client, &hash, offset, length)
            .await
            .unwrap();
        assert_eq!(total_size, size);
        let end = if length == 0 { size } else { offset + length };
        assert!(
            bytes == data[offset as usize..end as usize],
            "{offset}+{length}"
        );
    }
    for (offset, length) in [(size + 1, 0), (size - 1, 2), (0, size + 1)] {
        let status = grpc_download(&mut client, &hash, offset, length)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{offset}+{length}");
    }

    let (parts, body) = http_request(
        media.addr,
        http_get(media.addr, http::Method::GET, &hash, Some("bytes=100-1099")),
    )
    .await;
    assert_eq!(parts.status, 206);
    assert_eq!(
        header(&parts, http::header::CONTENT_RANGE),
        format!("bytes 100-1099/{size}")
    );
    assert_eq!(header(&parts, http::header::CONTENT_LENGTH), "1000");
    assert!(body == data[100..1100]);

    let (parts, body) = http_request(
        media.addr,
        http_get(media.addr, http::Method::GET, &hash, Some("bytes=-500")),
    )
    .await;
    assert_eq!(parts.status, 206);
    assert!(body == data[data.len() - 500..]);

    let (parts, body) = http_request(
        media.addr,
        http_get(
            media.addr,
            http::Method::GET,
            &hash,
            Some(&format!("bytes={}-", size - 3)),
        ),
    )
    .await;
    assert_eq!(parts.status, 206);
    assert!(body == data[data.len() - 3..]);

    let (parts, _) = http_request(
        media.addr,
        http_get(
            media.addr,
            http::Method::GET,
            &hash,
            Some(&format!("bytes={size}-")),
        ),
    )
    .await;
    assert_eq!(parts.status, 416);
    assert_eq!(
        header(&parts, http::header::CONTENT_RANGE),
        format!("bytes */{size}")
    );
    media.stop().await;
}

/// Uploads without a token or with a bad one are UNAUTHENTICATED / 401 and store nothing.
#[tokio::test]
async fn uploads_need_a_valid_bearer_token() {
    let media = TestMedia::start(100 * MIB as u64).await;
    let mut client = media.grpc().await;
    let data = test_bytes(100_000, 6);

    let status = grpc_upload(&mut client, &data, None).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = grpc_upload(&mut client, &data, Some("bad-token"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let (parts, _) = http_request(
        media.addr,
        http_put(media.addr, full_body(data.clone()), None),
    )
    .await;
    assert_eq!(parts.status, 401);
    assert_eq!(header(&parts, http::header::WWW_AUTHENTICATE), "Bearer");
    let (parts, _) = http_request(
        media.addr,
        http_put(media.addr, full_body(data.clone()), Some("bad-token")),
    )
    .await;
    assert_eq!(parts.status, 401);

    assert!(media.stored_files().is_empty());
    media.stop().await;
}

/// When the gateway cannot be reached, uploads are UNAVAILABLE / 503, not UNAUTHENTICATED.
#[tokio::test]
async fn unreachable_gateway_makes_uploads_unavailable() {
    // A port that was just free: nothing listens there.
    let closed_addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let media = TestMedia::start_with_gateway(
        MIB as u64,
        format!("http://{closed_addr}"),
        Arc::default(),
        CancellationToken::new(),
    )
    .await;
    let mut client = media.grpc().await;
    let status = grpc_upload(&mut client, &test_bytes(10, 7), Some(GOOD_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let (parts, _) = http_request(
        media.addr,
        http_put(media.addr, full_body(test_bytes(10, 7)), Some(GOOD_TOKEN)),
    )
    .await;
    assert_eq!(parts.status, 503);
    media.stop().await;
}

/// Throughput of a 100 MiB blob over gRPC and HTTP, both ways (run with
/// `cargo test --release -p bluetick-media --test grpc -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run in release"]
async fn throughput_of_100_mib_transfers() {
    let media = TestMedia::start(200 * MIB as u64).await;
    let mut client = media.grpc().await;
    let size = 100 * MIB;
    let mib = size as f64 / MIB as f64;
    let data = test_bytes(size, 8);

    let started = Instant::now();
    let uploaded = client
        .upload(upload_request(&data, 4 * MIB - 1024, 0, Some(GOOD_TOKEN)))
        .await
        .unwrap()
        .into_inner();
    let grpc_up = mib / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let (_, downloaded, _) = grpc_download(&mut client, &uploaded.sha256, 0, 0)
        .await
        .unwrap();
    let grpc_down = mib / started.elapsed().as_secs_f64();
    assert_eq!(downloaded.len(), size);

    let other = test_bytes(size, 9);
    let started = Instant::now();
    let (parts, _) = http_request(
        media.addr,
        http_put(media.addr, full_body(other.clone()), Some(GOOD_TOKEN)),
    )
    .await;
    let http_up = mib / started.elapsed().as_secs_f64();
    assert_eq!(parts.status, 201);
    let started = Instant::now();
    let (_, body) = http_request(
        media.addr,
        http_get(
            media.addr,
            http::Method::GET,
            &ContentHash::of(&other).to_hex(),
            None,
        ),
    )
    .await;
    let http_down = mib / started.elapsed().as_secs_f64();
    assert_eq!(body.len(), size);
    eprintln!(
        "100 MiB: grpc upload {grpc_up:.0} MiB/s, grpc download {grpc_down:.0} MiB/s, \
         http upload {http_up:.0} MiB/s, http download {http_down:.0} MiB/s"
    );
    media.stop().await;
}

/// `x.pipe(f)` for readable request pipelines.
trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}

impl<T> Pipe for T {}
