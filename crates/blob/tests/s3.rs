//! The conformance suite and bucket-level checks for [`S3BlobStore`] against a real S3
//! server (SeaweedFS in CI: `scripts/test-s3.sh`). The server is named by
//! `BLUETICK_TEST_S3_URL` (`s3://bucket?endpoint=…`, credentials in the URL or in
//! `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`); each test uses a fresh bucket of its own.
//! Run with `--ignored`; a missing variable then fails the tests rather than skipping them.

// Test helpers, like the `#[test]` bodies clippy.toml exempts.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bluetick_blob::conformance::{self, read_to_vec, test_bytes, upload_in_chunks};
use bluetick_blob::{BlobError, BlobStore, ContentHash, S3BlobStore, S3Config, open_blob_store};
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

const MIB: usize = 1024 * 1024;
const NEEDS_S3: &str = "BLUETICK_TEST_S3_URL must name an S3 server (run scripts/test-s3.sh)";

/// Returns the server URL with a fresh bucket name in place of the URL's bucket.
fn fresh_bucket_url() -> String {
    let url = std::env::var("BLUETICK_TEST_S3_URL").expect(NEEDS_S3);
    let query = url.split_once('?').map_or("", |(_, query)| query);
    let bucket = format!("bt-test-{:016x}", rand::random::<u64>());
    format!("s3://{bucket}?{query}")
}

/// Returns a config for a fresh bucket on the test server.
fn fresh_config() -> S3Config {
    S3Config::from_url(&fresh_bucket_url()).unwrap()
}

/// Returns every key in the store's bucket.
async fn keys_in_bucket(store: &S3BlobStore) -> BTreeSet<String> {
    let listing = store
        .client()
        .list_objects_v2()
        .bucket(&store.config().bucket)
        .send()
        .await
        .unwrap();
    listing
        .contents()
        .iter()
        .filter_map(|object| object.key().map(str::to_string))
        .collect()
}

/// Returns the keys of the multipart uploads still pending in the store's bucket.
async fn pending_multipart_uploads(store: &S3BlobStore) -> Vec<String> {
    let listing = store
        .client()
        .list_multipart_uploads()
        .bucket(&store.config().bucket)
        .send()
        .await
        .unwrap();
    listing
        .uploads()
        .iter()
        .filter_map(|upload| upload.key().map(str::to_string))
        .collect()
}

/// The S3 store passes the whole conformance suite, opened through its URL.
#[tokio::test]
#[ignore = "needs an S3 server: scripts/test-s3.sh"]
async fn s3_store_passes_conformance_suite() {
    let store = open_blob_store(&fresh_bucket_url()).await.unwrap();
    conformance::run_all(store).await;
}

/// Small (PutObject) and multipart blobs are objects named `blobs/<aa>/<hex>`, stored once;
/// no temp object or multipart upload is left behind.
#[tokio::test]
#[ignore = "needs an S3 server: scripts/test-s3.sh"]
async fn objects_are_stored_under_their_hash_once() {
    let store = S3BlobStore::open(fresh_config()).await.unwrap();
    let small = test_bytes(MIB + 3, 1);
    let large = test_bytes(20 * MIB + 11, 2);
    let (small_hash, small_first) = upload_in_chunks(&store, &small, 300_000).await;
    let (large_hash, large_first) = upload_in_chunks(&store, &large, MIB).await;
    let (_, small_again) = upload_in_chunks(&store, &small, 65_536).await;
    let (_, large_again) = upload_in_chunks(&store, &large, 4 * MIB).await;
    assert!(!small_first.deduplicated && !large_first.deduplicated);
    assert!(small_again.deduplicated && large_again.deduplicated);
    assert_eq!(large_again.size, large.len() as u64);

    let expected: BTreeSet<String> = [small_hash, large_hash]
        .iter()
        .map(|hash| {
            let hex = hash.to_hex();
            format!("blobs/{}/{hex}", &hex[..2])
        })
        .collect();
    assert_eq!(keys_in_bucket(&store).await, expected);
    assert!(pending_multipart_uploads(&store).await.is_empty());
    assert_eq!(
        store.stat(&large_hash).await.unwrap(),
        Some(large.len() as u64)
    );
    let read_back = read_to_vec(&store, &large_hash, 0, None).await.unwrap();
    assert!(read_back == large, "multipart blob reads back");
}

/// An aborted multipart upload leaves no object and no pending multipart upload.
#[tokio::test]
#[ignore = "needs an S3 server: scripts/test-s3.sh"]
async fn aborted_multipart_upload_leaves_nothing() {
    let store = S3BlobStore::open(fresh_config()).await.unwrap();
    let data = test_bytes(20 * MIB, 3);
    let mut upload = store.begin_upload().await.unwrap();
    for chunk in data.chunks(MIB) {
        upload.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    assert_eq!(
        pending_multipart_uploads(&store).await.len(),
        1,
        "20 MiB is a multipart upload"
    );
    upload.abort().await.unwrap();
    assert!(pending_multipart_uploads(&store).await.is_empty());
    assert!(keys_in_bucket(&store).await.is_empty());
    assert_eq!(store.stat(&ContentHash::of(&data)).await.unwrap(), None);
}

/// An upload dropped mid-way (a client gone) has its multipart upload aborted soon after.
#[tokio::test]
#[ignore = "needs an S3 server: scripts/test-s3.sh"]
async fn dropped_multipart_upload_is_aborted() {
    let store = S3BlobStore::open(fresh_config()).await.unwrap();
    let mut upload = store.begin_upload().await.unwrap();
    upload
        .write(Bytes::from(test_bytes(17 * MIB, 4)))
        .await
        .unwrap();
    assert_eq!(pending_multipart_uploads(&store).await.len(), 1);
    drop(upload);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pending_multipart_uploads(&store).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "dropped upload still pending after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(keys_in_bucket(&store).await.is_empty());
}

/// Blobs bigger than one CopyObject are copied in parts, byte for byte; ranged reads
/// across part boundaries return exactly the range.
#[tokio::test]
#[ignore = "needs an S3 server: scripts/test-s3.sh"]
async fn big_blobs_are_copied_in_parts_and_read_in_ranges() {
    let mut config = fresh_config();
    config.part_size = 5 * MIB;
    config.max_single_copy_bytes = 6 * MIB as u64;
    config.copy_part_bytes = 5 * MIB as u64;
    let store = S3BlobStore::open(config).await.unwrap();
    let data = test_bytes(13 * MIB + 7, 5);
    let (hash, finished) = upload_in_chunks(&store, &data, 777_777).await;
    assert!(!finished.deduplicated);
    assert_eq!(store.stat(&hash).await.unwrap(), Some(data.len() as u64));
    assert!(read_to_vec(&store, &hash, 0, None).await.unwrap() == data);
    for (offset, length) in [(5 * MIB - 3, 10), (MIB, 9 * MIB), (13 * MIB, 7)] {
        let read_back = read_to_vec(&store, &hash, offset as u64, Some(length as u64))
            .await
            .unwrap();
        assert!(
            read_back == data[offset..offset + length],
            "range {offset}+{length}"
        );
    }
    assert!(pending_multipart_uploads(&store).await.is_empty());
    assert_eq!(keys_in_bucket(&store).await.len(), 1);
}

/// A TCP relay that can be cut and restored on the same port, standing in for an S3
/// server that goes away and comes back.
struct Relay {
    addr: SocketAddr,
    upstream: SocketAddr,
    tasks: JoinSet<()>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut relay = Self {
            addr: listener.local_addr().unwrap(),
            upstream,
            tasks: JoinSet::new(),
        };
        relay.serve(listener);
        relay
    }

    fn serve(&mut self, listener: TcpListener) {
        let upstream = self.upstream;
        self.tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
    }

    /// Closes the port and every relayed connection.
    async fn cut(&mut self) {
        self.tasks.shutdown().await;
    }

    /// Listens on the same port again.
    async fn restore(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

/// With the server gone calls fail UNAVAILABLE, and they work again once it is back,
/// without reopening the store.
#[tokio::test]
#[ignore = "needs an S3 server: scripts/test-s3.sh"]
async fn calls_recover_when_the_server_comes_back() {
    let mut config = fresh_config();
    let endpoint = config
        .endpoint_opt
        .clone()
        .expect("test url has an endpoint");
    let upstream: SocketAddr = endpoint
        .trim_start_matches("http://")
        .parse()
        .expect("endpoint is http://ip:port");
    let mut relay = Relay::start(upstream).await;
    config.endpoint_opt = Some(format!("http://{}", relay.addr));
    let store = S3BlobStore::open(config).await.unwrap();
    let (hash, _) = upload_in_chunks(&store, b"still here", 4).await;

    relay.cut().await;
    let started = Instant::now();
    let error = store.stat(&hash).await.unwrap_err();
    assert!(
        matches!(error, BlobError::Unavailable(_)),
        "unexpected {error}"
    );
    assert_eq!(tonic::Status::from(error).code(), tonic::Code::Unavailable);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "failing took {:?}",
        started.elapsed()
    );
    let upload_error = store
        .begin_upload()
        .await
        .unwrap()
        .finish(ContentHash::of(b""))
        .await;
    assert!(matches!(upload_error, Err(BlobError::Unavailable(_))));

    relay.restore().await;
    assert_eq!(store.stat(&hash).await.unwrap(), Some(10));
    assert_eq!(
        read_to_vec(&store, &hash, 6, None).await.unwrap(),
        b"here".to_vec()
    );
}

/// An S3 server that is down at start-up is a clear UNAVAILABLE error naming the endpoint.
#[tokio::test]
async fn unreachable_endpoint_at_open_is_a_clear_unavailable_error() {
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let endpoint = format!("http://127.0.0.1:{closed_port}");
    let url = format!("s3://bucket?endpoint={endpoint}&region=us-east-1&access_key=k&secret_key=s");
    let started = Instant::now();
    let error = open_blob_store(&url).await.unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, BlobError::Unavailable(_)), "{message}");
    assert!(message.contains(&endpoint), "{message}");
    assert!(!message.contains("secret_key=s"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}
