//! The conformance suite against the embedded store, plus what only the embedded store
//! promises: data survives a reopen, concurrent writes share commits.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use bluetick_proto::common::v1::{DeviceAddress, LastSeenVisibility, TickStatus};
use bluetick_store::conformance::{self, now_ms, unique_id, unique_message_id};
use bluetick_store::embedded::{
    EmbeddedAccountStore, EmbeddedInboxStore, EmbeddedPresenceStore, EmbeddedTickStore,
};
use bluetick_store::{
    AcceptOutcome, AcceptRecord, AccountStore, InboxStore, InboxStoreRef, PresenceStore,
    SentRecord, StoreError, TickStore,
};
use bytes::Bytes;

/// The account store keeps every promise of the conformance suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_account_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = bluetick_store::open_account_store(dir.path().to_str().unwrap())
        .await
        .unwrap();
    conformance::account_suite(store).await;
}

/// The inbox store keeps every promise of the conformance suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_inbox_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("embedded://{}", dir.path().display());
    let store = bluetick_store::open_inbox_store(&url).await.unwrap();
    conformance::inbox_suite(store).await;
}

/// The tick store keeps every promise of the conformance suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_tick_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = bluetick_store::open_tick_store(dir.path().to_str().unwrap())
        .await
        .unwrap();
    conformance::tick_suite(store).await;
}

/// The presence store keeps every promise of the conformance suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_presence_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = bluetick_store::open_presence_store(dir.path().to_str().unwrap())
        .await
        .unwrap();
    conformance::presence_suite(store).await;
}

/// All four stores share one directory, each in its own file or directory, and the suites
/// still pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_stores_share_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("nested/data");
    let url = root.to_str().unwrap();
    let accounts = bluetick_store::open_account_store(url).await.unwrap();
    let inbox = bluetick_store::open_inbox_store(url).await.unwrap();
    let ticks = bluetick_store::open_tick_store(url).await.unwrap();
    let presence = bluetick_store::open_presence_store(url).await.unwrap();
    for file in ["accounts.redb", "presence.redb"] {
        assert!(root.join(file).is_file(), "{file} is created");
    }
    for database in ["inbox", "ticks"] {
        assert!(root.join(database).is_dir(), "{database}/ is created");
    }
    tokio::join!(
        conformance::account_suite(accounts),
        conformance::inbox_suite(inbox),
        conformance::tick_suite(ticks),
        conformance::presence_suite(presence),
    );
}

/// A second open of a store that is in use fails cleanly instead of corrupting it, for
/// both engines.
#[tokio::test]
async fn second_open_of_a_busy_file_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let _first = EmbeddedInboxStore::open(dir.path()).unwrap();
    let second = EmbeddedInboxStore::open(dir.path());
    assert!(
        matches!(second, Err(StoreError::Unavailable(_))),
        "{second:?}"
    );
    let _first = EmbeddedAccountStore::open(dir.path()).unwrap();
    let second = EmbeddedAccountStore::open(dir.path());
    assert!(
        matches!(second, Err(StoreError::Unavailable(_))),
        "{second:?}"
    );
}

/// A data directory written by a bluetick that kept the inbox and ticks in redb files is
/// refused with a message naming the file, not opened beside it with its messages unseen.
#[tokio::test]
async fn a_directory_with_the_old_redb_inbox_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inbox.redb"), b"old").unwrap();
    std::fs::write(dir.path().join("ticks.redb"), b"old").unwrap();
    let inbox = EmbeddedInboxStore::open(dir.path());
    assert!(
        matches!(&inbox, Err(StoreError::Unavailable(detail)) if detail.contains("inbox.redb")),
        "{inbox:?}"
    );
    let ticks = EmbeddedTickStore::open(dir.path());
    assert!(
        matches!(&ticks, Err(StoreError::Unavailable(detail)) if detail.contains("ticks.redb")),
        "{ticks:?}"
    );
    assert!(
        !dir.path().join("inbox").exists(),
        "nothing is created beside it"
    );
}

/// Everything written before a drop is there after reopening the files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_drop_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_ms();
    let user_id = unique_id("durable");
    let device = DeviceAddress::new(user_id.clone(), 1);
    let token = [7u8; 32];
    let message_id = unique_message_id();
    let sender = DeviceAddress::new(unique_id("sender"), 1);
    let record = AcceptRecord {
        message_id,
        sender: sender.clone(),
        client_msg_id: "c-1".to_string(),
        recipient_user_id: user_id.clone(),
        sent_at_ms: now,
        expires_at_ms: now + 3_600_000,
        envelopes: vec![(1, Bytes::from_static(b"\x00\x01kept"))],
    };
    {
        let accounts = EmbeddedAccountStore::open(dir.path()).unwrap();
        accounts
            .create_user(&user_id, "Durable", now, token)
            .await
            .unwrap();
        let inbox = EmbeddedInboxStore::open(dir.path()).unwrap();
        assert_eq!(
            inbox.accept(record.clone()).await.unwrap(),
            AcceptOutcome::Stored
        );
        let ticks = EmbeddedTickStore::open(dir.path()).unwrap();
        ticks
            .record_sent(SentRecord {
                message_id,
                sender: sender.clone(),
                recipient_user_id: user_id.clone(),
                recipient_device_ids: vec![1],
                sent_at_ms: now,
                expires_at_ms: now + 3_600_000,
            })
            .await
            .unwrap();
        ticks
            .acknowledge(&device, TickStatus::Delivered, vec![(message_id, 1)], now)
            .await
            .unwrap();
        let presence = EmbeddedPresenceStore::open(dir.path()).unwrap();
        presence
            .record_last_seen(vec![(user_id.clone(), now)])
            .await
            .unwrap();
        presence
            .set_visibility(&user_id, LastSeenVisibility::Nobody)
            .await
            .unwrap();
    }

    let accounts = EmbeddedAccountStore::open(dir.path()).unwrap();
    assert_eq!(
        accounts.authenticate(token).await.unwrap(),
        Some(device.clone())
    );
    let inbox = EmbeddedInboxStore::open(dir.path()).unwrap();
    let pending = inbox.pending(&device, 0, 10, now).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].payload, Bytes::from_static(b"\x00\x01kept"));
    assert!(matches!(
        inbox.accept(record).await.unwrap(),
        AcceptOutcome::Duplicate { message_id: id, .. } if id == message_id
    ));
    let ticks = EmbeddedTickStore::open(dir.path()).unwrap();
    assert_eq!(
        ticks.status(&sender, &[message_id]).await.unwrap(),
        vec![(message_id, 1, TickStatus::Delivered)]
    );
    assert_eq!(
        ticks.pending_receipts(&sender, 0, 10).await.unwrap().len(),
        1
    );
    let presence = EmbeddedPresenceStore::open(dir.path()).unwrap();
    assert_eq!(presence.last_seen(&user_id).await.unwrap(), Some(now));
    assert_eq!(
        presence.privacy(&user_id).await.unwrap().visibility,
        LastSeenVisibility::Nobody
    );
}

/// Concurrent accepts share group commits: far fewer fsyncs than messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_accepts_are_group_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedInboxStore::open(dir.path()).unwrap());
    let commits_before = store.commit_count();
    let accepts = 2_000;
    let store_ref: InboxStoreRef = store.clone();
    conformance::inbox_concurrent_accepts(store_ref, accepts).await;
    let commits = store.commit_count() - commits_before;
    assert!(commits > 0);
    assert!(
        commits < accepts as u64 / 2,
        "{commits} commits for {accepts} concurrent accepts"
    );
}

/// A refused write in a batch does not fail or undo the other writes of that batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_job_does_not_fail_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedAccountStore::open(dir.path()).unwrap());
    let taken = unique_id("taken");
    store
        .create_user(&taken, "Taken", 1, [1; 32])
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for index in 0..200u8 {
        let store = store.clone();
        let user_id = if index % 2 == 0 {
            taken.clone()
        } else {
            unique_id("fresh")
        };
        tasks.push(tokio::spawn(async move {
            let mut token = [0u8; 32];
            token[0] = index;
            token[1] = 0xaa;
            (
                user_id.clone(),
                store.create_user(&user_id, "x", 2, token).await,
            )
        }));
    }
    for task in tasks {
        let (user_id, result) = task.await.unwrap();
        if user_id == taken {
            assert!(matches!(result, Err(StoreError::AlreadyExists(_))));
        } else {
            result.unwrap();
            assert!(store.get_user(&user_id).await.unwrap().is_some());
        }
    }
    assert_eq!(
        store.get_user(&taken).await.unwrap().unwrap().display_name,
        "Taken"
    );
}

/// Purging reports how many expired messages went.
#[tokio::test]
async fn purge_counts_expired_messages() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedInboxStore::open(dir.path()).unwrap();
    let sender = DeviceAddress::new(unique_id("sender"), 1);
    let recipient_user_id = unique_id("bob");
    for (index, expires_at_ms) in [100u64, 200, 300].into_iter().enumerate() {
        store
            .accept(AcceptRecord {
                message_id: index as u64 + 1,
                sender: sender.clone(),
                client_msg_id: format!("c-{index}"),
                recipient_user_id: recipient_user_id.clone(),
                sent_at_ms: 1,
                expires_at_ms,
                envelopes: vec![(1, Bytes::new()), (2, Bytes::new())],
            })
            .await
            .unwrap();
    }
    let delivered = DeviceAddress::new(recipient_user_id.clone(), 1);
    store.mark_delivered(&delivered, &[1]).await.unwrap();
    assert_eq!(store.purge_expired(99).await.unwrap(), 0);
    assert_eq!(store.purge_expired(200).await.unwrap(), 4);
    assert_eq!(store.purge_expired(200).await.unwrap(), 0);
    assert_eq!(store.purge_expired(u64::MAX).await.unwrap(), 2);
    // The idempotency records went too: the same client id is a new message now.
    let outcome = store
        .accept(AcceptRecord {
            message_id: 10,
            sender: sender.clone(),
            client_msg_id: "c-0".to_string(),
            recipient_user_id,
            sent_at_ms: 1,
            expires_at_ms: u64::MAX,
            envelopes: vec![(1, Bytes::new())],
        })
        .await
        .unwrap();
    assert_eq!(outcome, AcceptOutcome::Stored);
}

/// Prints accept throughput with 64 concurrent writers (`cargo test -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn accept_throughput_with_64_writers() {
    const WRITERS: usize = 64;
    const PER_WRITER: usize = 500;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedInboxStore::open(dir.path()).unwrap());
    let now = now_ms();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let sender = DeviceAddress::new(format!("writer-{writer}"), 1);
            for index in 0..PER_WRITER {
                let record = AcceptRecord {
                    message_id: (writer * PER_WRITER + index) as u64 + 1,
                    sender: sender.clone(),
                    client_msg_id: format!("c-{index}"),
                    recipient_user_id: format!("reader-{}", writer % 8),
                    sent_at_ms: now,
                    expires_at_ms: now + 3_600_000,
                    envelopes: vec![(1, Bytes::from(vec![0u8; 256]))],
                };
                store.accept(record).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let total = WRITERS * PER_WRITER;
    eprintln!(
        "{total} accepts by {WRITERS} writers in {elapsed:?}: {:.0} accepts/s, {} commits",
        total as f64 / elapsed.as_secs_f64(),
        store.commit_count()
    );
}

/// Where the child of `flushed_ticks_survive_an_abort` keeps its store.
const ABORT_CHILD_DIR: &str = "BLUETICK_TEST_ABORT_CHILD_DIR";

/// The child of `flushed_ticks_survive_an_abort`: records and acknowledges messages (lazy
/// writes), flushes, and aborts the process without closing the store.
#[tokio::test]
#[ignore = "run by flushed_ticks_survive_an_abort in a child process"]
async fn acknowledge_flush_and_abort() {
    let Ok(dir) = std::env::var(ABORT_CHILD_DIR) else {
        return;
    };
    let ticks = EmbeddedTickStore::open(std::path::Path::new(&dir)).unwrap();
    let now = now_ms();
    let sender = DeviceAddress::new("abort-sender".to_string(), 1);
    let recipient = DeviceAddress::new("abort-recipient".to_string(), 1);
    for message_id in 1..=20u64 {
        ticks
            .record_sent(SentRecord {
                message_id,
                sender: sender.clone(),
                recipient_user_id: recipient.user_id.clone(),
                recipient_device_ids: vec![1],
                sent_at_ms: now,
                expires_at_ms: now + 3_600_000,
            })
            .await
            .unwrap();
    }
    for message_id in 1..=20u64 {
        ticks
            .acknowledge(
                &recipient,
                TickStatus::Delivered,
                vec![(message_id, 100 + message_id)],
                now,
            )
            .await
            .unwrap();
    }
    ticks.flush().await.unwrap();
    std::process::abort();
}

/// Acknowledgements may be answered before they are durable; once `flush` returned they
/// survive the process dying without closing the store.
#[tokio::test]
async fn flushed_ticks_survive_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "acknowledge_flush_and_abort",
            "--ignored",
            "--nocapture",
        ])
        .env(ABORT_CHILD_DIR, dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child should have aborted");
    let ticks = EmbeddedTickStore::open(dir.path()).unwrap();
    let sender = DeviceAddress::new("abort-sender".to_string(), 1);
    let ids: Vec<u64> = (1..=20).collect();
    let states = ticks.status(&sender, &ids).await.unwrap();
    assert_eq!(
        states,
        ids.iter()
            .map(|id| (*id, 1, TickStatus::Delivered))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        ticks.pending_receipts(&sender, 0, 100).await.unwrap().len(),
        20
    );
}
