//! End-to-end encryption through the whole suite: what the servers store, prekeys claimed
//! concurrently, device-set changes, encrypted media, and client memory for a large file.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use bluetick_client::e2e::media::{ciphertext_size, download_decrypted_path, upload_encrypted};
use bluetick_client::e2e::{
    E2eDevice, EnvelopeKind, KeyStoreRef, MemoryKeyStore, SecureChat, SecureEvent, SecureEvents,
    setup_device,
};
use bluetick_client::proto::gateway::v1::PublishKeysRequest;
use bluetick_client::{
    BluetickClient, ChatConfig, Content, Credentials, DeviceAddress, no_progress, register,
};
use bluetick_tests::{TestCluster, WAIT, eventually};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

const MARKER: &[u8] = b"PLAINTEXT-MARKER-7f3a";
const MEDIA_MARKER: &[u8] = b"MEDIA-MARKER-c91e";

async fn secure(cluster: &TestCluster, credentials: &Credentials) -> (SecureChat, SecureEvents) {
    let _ = cluster;
    let client = BluetickClient::new(credentials.clone()).unwrap();
    SecureChat::open(&client, MemoryKeyStore::shared(), ChatConfig::default())
        .await
        .unwrap()
}

async fn send_text(chat: &SecureChat, events: &mut SecureEvents, to: &str, text: &str) -> u64 {
    let id = chat.send_content(to, &Content::text(text)).await.unwrap();
    events.wait_sent(&id, WAIT).await.unwrap()
}

/// Returns every file under `dir`.
fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// The servers never hold plaintext: after messages both ways (some left unread, so they stay
/// stored) and an encrypted media file, no byte of any store file or blob contains the
/// markers — while an unencrypted control message sent the same way is found by the scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_never_hold_plaintext() {
    let mut cluster = TestCluster::start().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let (alice_chat, mut alice_events) = secure(&cluster, &alice).await;
    let (bob_chat, mut bob_events) = secure(&cluster, &bob).await;
    let marker = String::from_utf8(MARKER.to_vec()).unwrap();

    for i in 0..10 {
        send_text(
            &alice_chat,
            &mut alice_events,
            &bob.user_id,
            &format!("{marker} a{i}"),
        )
        .await;
    }
    for i in 0..10 {
        let message = bob_events.next_message(WAIT).await.unwrap();
        assert_eq!(message.content, Content::text(format!("{marker} a{i}")));
        assert_eq!(message.sender, DeviceAddress::new(alice.user_id.clone(), 1));
    }
    for i in 0..5 {
        send_text(
            &bob_chat,
            &mut bob_events,
            &alice.user_id,
            &format!("{marker} b{i}"),
        )
        .await;
        let message = alice_events.next_message(WAIT).await.unwrap();
        assert_eq!(message.content, Content::text(format!("{marker} b{i}")));
    }

    // A media file full of markers, encrypted on the way up.
    let file: Vec<u8> = MEDIA_MARKER.iter().copied().cycle().take(300_000).collect();
    let attachment = upload_encrypted(
        alice_chat.client(),
        std::io::Cursor::new(file.clone()),
        file.len() as u64,
        "image/png",
        Some("marker.png".into()),
        Some(format!("{marker} caption")),
        no_progress(),
    )
    .await
    .unwrap();
    let id = alice_chat
        .send_attachment(&bob.user_id, &attachment)
        .await
        .unwrap();
    alice_events.wait_sent(&id, WAIT).await.unwrap();
    let message = bob_events.next_message(WAIT).await.unwrap();
    let received = message.attachment_opt.unwrap();
    assert_eq!(received.sha256, attachment.sha256);
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("marker.png");
    download_decrypted_path(bob_chat.client(), &received, &target, no_progress())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), file);

    // Control: the same path without encryption is visible to the scan.
    let raw = BluetickClient::new(alice.clone()).unwrap();
    let (raw_chat, mut raw_events) = raw.open_chat(ChatConfig::default()).await.unwrap();
    let control = raw_chat
        .send(&bob.user_id, &b"CONTROL-MARKER-0d5b"[..])
        .await
        .unwrap();
    raw_events.wait_sent(&control, WAIT).await.unwrap();
    raw_chat.close().await.unwrap();
    alice_chat.close().await.unwrap();
    bob_chat.close().await.unwrap();
    cluster.stop().await;

    let mut files = Vec::new();
    files_under(cluster.data_dir(), &mut files);
    let mut scanned = 0usize;
    let mut control_found = false;
    let mut blob_found = false;
    for path in &files {
        let bytes = std::fs::read(path).unwrap();
        scanned += bytes.len();
        assert!(!contains(&bytes, MARKER), "plaintext in {}", path.display());
        assert!(
            !contains(&bytes, MEDIA_MARKER),
            "media plaintext in {}",
            path.display()
        );
        control_found |= contains(&bytes, b"CONTROL-MARKER-0d5b");
        blob_found |= bytes.len() as u64 == ciphertext_size(file.len() as u64);
    }
    assert!(
        control_found,
        "the scan must see what is stored unencrypted"
    );
    assert!(blob_found, "the encrypted blob is stored");
    println!("scanned {} files, {scanned} bytes", files.len());
}

/// Concurrent session starts never get the same one-time prekey; when the pool is empty,
/// sessions still start (signed prekey only) and the recipient refills its pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_prekeys_are_handed_out_once_and_running_out_still_works() {
    let cluster = TestCluster::start().await;
    let bob = cluster.user("bob").await;
    let bob_client = BluetickClient::new(bob.clone()).unwrap();
    let bob_store: KeyStoreRef = MemoryKeyStore::shared();
    setup_device(&bob_client, Arc::clone(&bob_store))
        .await
        .unwrap();
    let pool = bob_client.count_prekeys().await.unwrap();
    assert_eq!(pool, bluetick_client::e2e::ONE_TIME_PREKEY_BATCH);

    let mut claims = Vec::new();
    for _ in 0..8 {
        let credentials = cluster.user("claimer").await;
        let bob_user = bob.user_id.clone();
        claims.push(tokio::spawn(async move {
            let client = BluetickClient::new(credentials).unwrap();
            let mut ids = Vec::new();
            for _ in 0..15 {
                let bundles = client.prekey_bundles(&bob_user).await.unwrap().bundles;
                if let Some(one_time) = &bundles[0].one_time_prekey {
                    ids.push(one_time.key_id);
                }
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for claim in claims {
        all.extend(claim.await.unwrap());
    }
    let distinct: HashSet<u32> = all.iter().copied().collect();
    assert_eq!(
        all.len(),
        pool as usize,
        "every prekey handed out, then none"
    );
    assert_eq!(
        distinct.len(),
        all.len(),
        "a one-time prekey was handed out twice"
    );
    assert_eq!(bob_client.count_prekeys().await.unwrap(), 0);

    // The pool is empty: a new sender still reaches Bob.
    let carol = cluster.user("carol").await;
    let (carol_chat, mut carol_events) = secure(&cluster, &carol).await;
    let (_bob_chat, mut bob_events) =
        SecureChat::open(&bob_client, bob_store, ChatConfig::default())
            .await
            .unwrap();
    // Opening the chat refilled the pool; drain it again to test the empty case.
    while let Some(bundle) = carol_chat
        .client()
        .prekey_bundles(&bob.user_id)
        .await
        .unwrap()
        .bundles
        .first()
        .cloned()
    {
        if bundle.one_time_prekey.is_none() {
            break;
        }
    }
    send_text(
        &carol_chat,
        &mut carol_events,
        &bob.user_id,
        "no one-time prekey left",
    )
    .await;
    let message = bob_events.next_message(WAIT).await.unwrap();
    assert_eq!(message.content, Content::text("no one-time prekey left"));
    assert_eq!(message.kind, EnvelopeKind::PreKey);
    // Opening a prekey message makes Bob top the directory up.
    assert!(
        eventually(WAIT, || async {
            bob_client.count_prekeys().await.unwrap() >= bluetick_client::e2e::ONE_TIME_PREKEY_LOW
        })
        .await
    );
}

/// A device that published only its identity (no prekeys at all) still gets messages: the
/// sender falls back to baseline sealing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_without_prekeys_get_baseline_sealed_messages() {
    let cluster = TestCluster::start().await;
    let dave = cluster.user("dave").await;
    let dave_client = BluetickClient::new(dave.clone()).unwrap();
    let device = Arc::new(
        E2eDevice::load_or_create(
            DeviceAddress::new(dave.user_id.clone(), dave.device_id),
            MemoryKeyStore::shared(),
        )
        .unwrap(),
    );
    dave_client
        .publish_keys(PublishKeysRequest {
            identity_key: device.identity_public().to_vec().into(),
            signing_key: device.signing_public().to_vec().into(),
            signed_prekey: None,
            one_time_prekeys: Vec::new(),
        })
        .await
        .unwrap();
    let (_dave_chat, mut dave_events) =
        SecureChat::open_with_device(&dave_client, device, ChatConfig::default())
            .await
            .unwrap();
    let erin = cluster.user("erin").await;
    let (erin_chat, mut erin_events) = secure(&cluster, &erin).await;
    send_text(
        &erin_chat,
        &mut erin_events,
        &dave.user_id,
        "sealed to the identity key",
    )
    .await;
    let message = dave_events.next_message(WAIT).await.unwrap();
    assert_eq!(message.kind, EnvelopeKind::Baseline);
    assert_eq!(message.content, Content::text("sealed to the identity key"));
}

/// When the recipient adds a device, the gateway refuses the stale device set with
/// FAILED_PRECONDITION; the SDK refreshes, reseals for every device and the send goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_recipient_device_is_picked_up_by_resealing() {
    let cluster = TestCluster::start().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let (alice_chat, mut alice_events) = secure(&cluster, &alice).await;
    let (_bob_chat, mut bob_events) = secure(&cluster, &bob).await;
    send_text(&alice_chat, &mut alice_events, &bob.user_id, "one device").await;
    assert_eq!(
        bob_events.next_message(WAIT).await.unwrap().content,
        Content::text("one device")
    );

    let bob_client = BluetickClient::new(bob.clone()).unwrap();
    let second = bob_client.add_device().await.unwrap();
    let (_second_chat, mut second_events) = secure(&cluster, &second).await;
    send_text(&alice_chat, &mut alice_events, &bob.user_id, "two devices").await;
    assert_eq!(
        bob_events.next_message(WAIT).await.unwrap().content,
        Content::text("two devices")
    );
    let on_second = second_events.next_message(WAIT).await.unwrap();
    assert_eq!(on_second.content, Content::text("two devices"));
    assert_eq!(on_second.kind, EnvelopeKind::PreKey);
}

/// A contact's new identity key (a reinstalled device) shows up as a warning, and the safety
/// number both sides compute matches before and changes after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_changes_warn_and_safety_numbers_match() {
    let cluster = TestCluster::start().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let (alice_chat, mut alice_events) = secure(&cluster, &alice).await;
    let (bob_chat, _bob_events) = secure(&cluster, &bob).await;
    let from_alice = alice_chat.safety_number(&bob.user_id).await.unwrap();
    let from_bob = bob_chat.safety_number(&alice.user_id).await.unwrap();
    assert_eq!(from_alice.number, from_bob.number);
    send_text(&alice_chat, &mut alice_events, &bob.user_id, "before").await;

    // Bob reinstalls: same device, new keys.
    let bob_client = BluetickClient::new(bob.clone()).unwrap();
    let (reinstalled, mut reinstalled_events) =
        SecureChat::open(&bob_client, MemoryKeyStore::shared(), ChatConfig::default())
            .await
            .unwrap();
    let after = alice_chat.safety_number(&bob.user_id).await.unwrap();
    assert_ne!(after.number, from_alice.number);
    assert_eq!(after.warnings.len(), 1);
    match alice_events.next_event(WAIT).await.unwrap() {
        SecureEvent::IdentityChanged(warning) => {
            assert_eq!(warning.device, DeviceAddress::new(bob.user_id.clone(), 1));
        }
        other => panic!("expected a warning, got {other:?}"),
    }
    assert_eq!(
        reinstalled
            .safety_number(&alice.user_id)
            .await
            .unwrap()
            .number,
        after.number
    );
    // The old session is dropped; new messages reach the reinstalled device.
    send_text(&alice_chat, &mut alice_events, &bob.user_id, "after").await;
    loop {
        match reinstalled_events.next_event(WAIT).await.unwrap() {
            SecureEvent::Message(message) if message.content == Content::text("after") => break,
            _ => {}
        }
    }
}

/// Encrypted media through the media service: a ciphertext altered before upload (its hash
/// is then right for what is stored) is refused at decryption, a wrong hash is refused at the
/// hash check, and nothing is left at the target path either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_media_refuses_altered_ciphertexts() {
    let cluster = TestCluster::start().await;
    let alice = cluster.user("alice").await;
    let client = BluetickClient::new(alice.clone()).unwrap();
    let file: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let attachment = upload_encrypted(
        &client,
        std::io::Cursor::new(file.clone()),
        file.len() as u64,
        "application/octet-stream",
        None,
        None,
        no_progress(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    download_decrypted_path(&client, &attachment, &good, no_progress())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&good).unwrap(), file);

    // The stored ciphertext, altered, truncated and with two chunks swapped, each re-uploaded.
    let mut stored = Vec::new();
    client
        .download_to_writer(&attachment.sha256, &mut stored, no_progress())
        .await
        .unwrap();
    let segment = 64 * 1024 + 16;
    let mut altered = stored.clone();
    altered[1000] ^= 1;
    let truncated = stored[..15 + segment].to_vec();
    let mut swapped = stored[..15].to_vec();
    swapped.extend_from_slice(&stored[15 + segment..15 + 2 * segment]);
    swapped.extend_from_slice(&stored[15..15 + segment]);
    swapped.extend_from_slice(&stored[15 + 2 * segment..]);
    for (what, bytes) in [
        ("altered", altered),
        ("truncated", truncated),
        ("reordered", swapped),
    ] {
        let uploaded = client
            .upload_bytes(bytes.into(), no_progress())
            .await
            .unwrap();
        let mut forged = attachment.clone();
        forged.sha256 = uploaded.sha256;
        let target = dir.path().join(what);
        let result = download_decrypted_path(&client, &forged, &target, no_progress()).await;
        assert!(result.is_err(), "{what} ciphertext decrypted");
        assert!(!target.exists());
    }
    let mut wrong_hash = attachment.clone();
    wrong_hash.sha256 = bluetick_client::media::sha256_hex(b"something else");
    assert!(
        download_decrypted_path(&client, &wrong_hash, &dir.path().join("x"), no_progress())
            .await
            .is_err()
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "only the good file remains");
}

/// Pseudo-random bytes generated on the fly (so the test itself holds no file in memory).
struct Generated {
    left: u64,
    state: u64,
}

impl Generated {
    fn new(size: u64) -> Self {
        Self {
            left: size,
            state: 0x9e37_79b9_7f4a_7c15,
        }
    }
}

impl AsyncRead for Generated {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let take = (buf.remaining() as u64).min(self.left) as usize;
        let mut chunk = vec![0u8; take];
        for byte in &mut chunk {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            *byte = self.state as u8;
        }
        self.left -= take as u64;
        buf.put_slice(&chunk);
        std::task::Poll::Ready(Ok(()))
    }
}

const LARGE_FILE: u64 = 200 * 1024 * 1024;

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

/// The client half of the large-file test, run in its own process by
/// `a_200_mib_file_round_trips_in_bounded_client_memory` so its peak RSS is the client's alone.
#[tokio::test]
#[ignore = "run by a_200_mib_file_round_trips_in_bounded_client_memory in a child process"]
async fn large_file_client_child() {
    let (Ok(gateway), Ok(media), Ok(dir)) = (
        std::env::var("BLUETICK_E2E_GATEWAY"),
        std::env::var("BLUETICK_E2E_MEDIA"),
        std::env::var("BLUETICK_E2E_DIR"),
    ) else {
        return;
    };
    let user = format!("big{}", rand::random::<u32>());
    let credentials = register(&gateway, &media, &user, "big").await.unwrap();
    let client = BluetickClient::new(credentials).unwrap();
    let started = std::time::Instant::now();
    let attachment = upload_encrypted(
        &client,
        Generated::new(LARGE_FILE),
        LARGE_FILE,
        "video/mp4",
        None,
        None,
        no_progress(),
    )
    .await
    .unwrap();
    let uploaded_in = started.elapsed();
    let target = Path::new(&dir).join("large.bin");
    download_decrypted_path(&client, &attachment, &target, no_progress())
        .await
        .unwrap();
    let round_trip = started.elapsed();
    // Compare with the generator, streaming.
    let mut file = tokio::fs::File::open(&target).await.unwrap();
    let mut expected = Generated::new(LARGE_FILE);
    let mut got = vec![0u8; 1 << 20];
    let mut want = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let read = file.read(&mut got).await.unwrap();
        if read == 0 {
            break;
        }
        expected.read_exact(&mut want[..read]).await.unwrap();
        assert_eq!(got[..read], want[..read]);
        total += read as u64;
    }
    assert_eq!(total, LARGE_FILE);
    println!(
        "CHILD-RESULT peak_rss_kib={} upload_s={:.2} round_trip_s={:.2}",
        peak_rss_kib(),
        uploaded_in.as_secs_f64(),
        round_trip.as_secs_f64()
    );
}

/// A 200 MiB file is encrypted, uploaded, downloaded, hash-checked and decrypted with the
/// client's peak resident memory under 64 MiB (the client runs in a child process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mib_file_round_trips_in_bounded_client_memory() {
    let cluster = TestCluster::start_with(|config| {
        config.max_upload_bytes = 300 * 1024 * 1024;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "large_file_client_child",
            "--ignored",
            "--nocapture",
        ])
        .env("BLUETICK_E2E_GATEWAY", &cluster.endpoints.gateway)
        .env("BLUETICK_E2E_MEDIA", &cluster.endpoints.media)
        .env("BLUETICK_E2E_DIR", dir.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .find(|line| line.starts_with("CHILD-RESULT"))
        .unwrap_or_else(|| panic!("no result in {stdout}"));
    println!("{line}");
    let peak_kib: u64 = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("peak_rss_kib="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(peak_kib < 64 * 1024, "client peak RSS {peak_kib} KiB");
}
