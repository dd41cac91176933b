//! Media through the whole suite: uploads authenticated by the real gateway, content
//! addressing, dedup, the size limit, plain HTTP with ranges, and a photo sent in a chat.

#![allow(clippy::unwrap_used)]

use bluetick_client::{BluetickClient, Content, no_progress};
use bluetick_tests::{TestCluster, WAIT};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const LIMIT: u64 = 8 * 1024 * 1024;

fn pseudo_random_bytes(length: usize, seed: u64) -> Bytes {
    let mut state = seed | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// Sends a raw HTTP/1.1 request to `base` (http://host:port) and returns status and body.
async fn http(base: &str, request_head: &str) -> (u16, Vec<u8>, String) {
    let address = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(request_head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap();
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, response[split + 4..].to_vec(), head)
}

/// A multi-MiB photo goes up with the sender's token, its hash travels in a message, and
/// the recipient downloads it over gRPC and over plain HTTP (whole and by range).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn photo_round_trip_by_hash_over_grpc_and_http() {
    let cluster = TestCluster::start_with(|config| config.max_upload_bytes = LIMIT).await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let (alice_client, alice_chat, mut alice_events) = cluster.connect(&alice).await;
    let (bob_client, _bob_chat, mut bob_events) = cluster.connect(&bob).await;

    let photo = pseudo_random_bytes(5 * 1024 * 1024 + 123, 7);
    let uploaded = alice_client
        .upload_bytes(photo.clone(), no_progress())
        .await
        .unwrap();
    assert_eq!(uploaded.size, photo.len() as u64);
    let expected_hash = bluetick_client::media::sha256_hex(&photo);
    assert_eq!(uploaded.sha256, expected_hash);

    let content = Content::Media {
        sha256: uploaded.sha256.clone(),
        size: uploaded.size,
        mime: "image/jpeg".into(),
        name: Some("beach.jpg".into()),
        caption: None,
    };
    let id = alice_chat
        .send_content(&bob.user_id, &content)
        .await
        .unwrap();
    alice_events.wait_sent(&id, WAIT).await.unwrap();
    let message = bob_events.next_message(WAIT).await.unwrap();
    let Content::Media { sha256, size, .. } = Content::decode(&message.payload).unwrap() else {
        panic!("not a media message");
    };

    let folder = tempfile::tempdir().unwrap();
    let target = folder.path().join("beach.jpg");
    let downloaded = bob_client
        .download_path(&sha256, &target, no_progress())
        .await
        .unwrap();
    assert_eq!(downloaded, size);
    assert_eq!(std::fs::read(&target).unwrap(), photo.to_vec());

    let (status, body, _) = http(
        &cluster.endpoints.media,
        &format!("GET /v1/media/{sha256} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, photo.to_vec());
    let (status, body, head) = http(
        &cluster.endpoints.media,
        &format!(
            "GET /v1/media/{sha256} HTTP/1.1\r\nHost: x\r\nRange: bytes=100-199\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 206, "{head}");
    assert_eq!(body, photo[100..200].to_vec());
}

/// The same bytes are stored once; unknown hashes are NOT_FOUND; an oversize upload is
/// RESOURCE_EXHAUSTED and leaves nothing behind; uploads need a valid token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_limits_and_errors() {
    let cluster = TestCluster::start_with(|config| config.max_upload_bytes = LIMIT).await;
    let alice = cluster.user("alice").await;
    let client = BluetickClient::new(alice.clone()).unwrap();

    let blob = pseudo_random_bytes(3 * 1024 * 1024, 11);
    let first = client
        .upload_bytes(blob.clone(), no_progress())
        .await
        .unwrap();
    let second = client
        .upload_bytes(blob.clone(), no_progress())
        .await
        .unwrap();
    assert_eq!(first.sha256, second.sha256);
    assert!(second.deduplicated);
    let media_dir = cluster.data_dir().join("media");
    let count_files = |dir: &std::path::Path| -> usize {
        fn walk(dir: &std::path::Path) -> usize {
            std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|entry| {
                            let path = entry.path();
                            if path.is_dir() { walk(&path) } else { 1 }
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        walk(dir)
    };
    // On S3 the blob suite lists the bucket for the same checks; here the folder is local.
    let local_blobs = cluster.config.media_url.is_none();
    if local_blobs {
        assert_eq!(count_files(&media_dir), 1, "dedup stored two copies");
    }

    let unknown = "0".repeat(64);
    assert_eq!(
        client.stat_media(&unknown).await.unwrap_err().code(),
        Code::NotFound
    );
    let folder = tempfile::tempdir().unwrap();
    let missing = client
        .download_path(&unknown, folder.path().join("x"), no_progress())
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let oversize = pseudo_random_bytes(LIMIT as usize + 1, 3);
    let error = client
        .upload_bytes(oversize, no_progress())
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted);
    if local_blobs {
        assert_eq!(
            count_files(&media_dir),
            1,
            "oversize upload left something behind"
        );
    }

    let mut forged = alice.clone();
    forged.token = "f".repeat(64);
    let error = BluetickClient::new(forged)
        .unwrap()
        .upload_bytes(Bytes::from_static(b"x"), no_progress())
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unauthenticated);
}
