//! The storage conformance suite (feature `testsuite`): one async function per trait that
//! asserts every behaviour promised by the trait docs, run against each implementation.
//!
//! | suite | trait |
//! |---|---|
//! | [`account_suite`] | [`AccountStore`](crate::AccountStore) |
//! | [`inbox_suite`] | [`InboxStore`](crate::InboxStore) (includes [`inbox_concurrent_accepts`]) |
//! | [`tick_suite`] | [`TickStore`](crate::TickStore) |
//! | [`presence_suite`] | [`PresenceStore`](crate::PresenceStore) |
//!
//! Suites only touch users they create themselves ([`unique_id`]) and message ids from
//! [`unique_message_id`], so they can run concurrently against one shared, persistent
//! engine. They panic (assert) on the first broken promise.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bluetick_proto::common::v1::{DeviceAddress, LastSeenVisibility, TickStatus};
use bytes::Bytes;

use crate::{
    AcceptOutcome, AcceptRecord, AccountStoreRef, AckOutcome, IdentityKeys, InboxStoreRef,
    PreKeyRecord, PresenceStoreRef, Privacy, SentRecord, SignedPreKeyRecord, StoreError,
    StoredReceipt, TickStoreRef,
};

/// One hour, the lifetime of suite messages that must not expire.
const HOUR_MS: u64 = 3_600_000;

static UNIQUE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Returns the current time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// Returns `prefix` followed by a suffix unique to this call (process, time and counter).
pub fn unique_id(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let counter = UNIQUE_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}-{nanos:x}-{counter}", std::process::id())
}

/// Returns a message id unique across calls and, with high probability, across processes:
/// `micros << 10 | pid bits`, strictly increasing within this process.
pub fn unique_message_id() -> u64 {
    static LAST_MESSAGE_ID: AtomicU64 = AtomicU64::new(0);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(0));
    let candidate = (micros << 10) | (u64::from(std::process::id()) & 0x3ff);
    let previous = LAST_MESSAGE_ID
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(candidate.max(last.saturating_add(1 << 10)))
        })
        .unwrap_or(0);
    candidate.max(previous.saturating_add(1 << 10))
}

/// Returns a fresh token hash.
pub fn token_hash(seed: &str) -> [u8; 32] {
    let mut hash = [0u8; 32];
    let unique = unique_id(seed);
    for (index, byte) in unique.bytes().enumerate() {
        hash[index % 32] ^= byte.rotate_left((index / 32) as u32);
    }
    let counter = UNIQUE_COUNTER.fetch_add(1, Ordering::Relaxed);
    hash[24..].copy_from_slice(&counter.to_be_bytes());
    hash
}

// ---------------------------------------------------------------------------------------
// Accounts
// ---------------------------------------------------------------------------------------

/// Asserts every [`AccountStore`](crate::AccountStore) promise.
pub async fn account_suite(store: AccountStoreRef) {
    account_users_and_devices(&store).await;
    account_keys(&store).await;
    account_prekey_claims(&store).await;
    account_concurrent_prekey_claims(&store).await;
}

async fn account_users_and_devices(store: &AccountStoreRef) {
    let user_id = unique_id("alice");
    let token = token_hash("alice-1");
    assert_eq!(store.get_user(&user_id).await.expect("get_user"), None);
    assert_eq!(store.authenticate(token).await.expect("authenticate"), None);

    store
        .create_user(&user_id, "Alice", 1_000, token)
        .await
        .expect("create_user");
    let user = store
        .get_user(&user_id)
        .await
        .expect("get_user")
        .expect("created user is found");
    assert_eq!(user.user_id, user_id);
    assert_eq!(user.display_name, "Alice");
    assert_eq!(user.created_at_ms, 1_000);
    assert_eq!(user.device_ids, vec![1]);
    assert_eq!(
        store.authenticate(token).await.expect("authenticate"),
        Some(DeviceAddress::new(user_id.clone(), 1))
    );

    let again = store
        .create_user(&user_id, "Other", 2_000, token_hash("alice-again"))
        .await;
    assert!(
        matches!(again, Err(StoreError::AlreadyExists(_))),
        "creating an existing user must fail with AlreadyExists, got {again:?}"
    );
    // A repeat of the registration, with its token (the answer was lost), is answered
    // again and changes nothing.
    store
        .create_user(&user_id, "Alice, repeated", 3_000, token)
        .await
        .expect("a repeated registration is answered again");
    let repeated = store
        .get_user(&user_id)
        .await
        .expect("get_user")
        .expect("user");
    assert_eq!(
        (
            repeated.display_name.as_str(),
            repeated.created_at_ms,
            repeated.device_ids
        ),
        ("Alice", 1_000, vec![1]),
        "a repeated registration changes nothing"
    );
    let unchanged = store.get_user(&user_id).await.expect("get_user");
    assert_eq!(
        unchanged.map(|user| user.display_name),
        Some("Alice".to_string())
    );

    let second_token = token_hash("alice-2");
    assert_eq!(
        store
            .add_device(&user_id, second_token)
            .await
            .expect("add_device"),
        2
    );
    assert_eq!(
        store
            .add_device(&user_id, token_hash("alice-3"))
            .await
            .expect("add_device"),
        3
    );
    let user = store
        .get_user(&user_id)
        .await
        .expect("get_user")
        .expect("user is found");
    assert_eq!(user.device_ids, vec![1, 2, 3]);
    assert_eq!(
        store
            .authenticate(second_token)
            .await
            .expect("authenticate"),
        Some(DeviceAddress::new(user_id.clone(), 2))
    );
    assert_eq!(
        store.authenticate(token).await.expect("authenticate"),
        Some(DeviceAddress::new(user_id.clone(), 1)),
        "adding a device keeps the first device's token"
    );

    let missing = store
        .add_device(&unique_id("nobody"), token_hash("nobody"))
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "adding a device to an unknown user must fail with NotFound, got {missing:?}"
    );
}

fn prekey(key_id: u32) -> PreKeyRecord {
    PreKeyRecord {
        key_id,
        public_key: Bytes::from(vec![key_id as u8, 0, 0xff, (key_id >> 8) as u8]),
    }
}

async fn create_user_for_keys(store: &AccountStoreRef, prefix: &str) -> DeviceAddress {
    let user_id = unique_id(prefix);
    store
        .create_user(&user_id, prefix, 1, token_hash(prefix))
        .await
        .expect("create_user");
    DeviceAddress::new(user_id, 1)
}

async fn account_keys(store: &AccountStoreRef) {
    let device = create_user_for_keys(store, "keys").await;
    assert_eq!(store.device_keys(&device).await.expect("device_keys"), None);
    assert_eq!(
        store
            .count_one_time_prekeys(&device)
            .await
            .expect("count_one_time_prekeys"),
        0
    );

    let unknown_device = DeviceAddress::new(device.user_id.clone(), 9);
    let refused = store
        .publish_keys(&unknown_device, None, None, vec![prekey(1)])
        .await;
    assert!(
        matches!(refused, Err(StoreError::NotFound(_))),
        "publishing keys for an unknown device must fail with NotFound, got {refused:?}"
    );
    let refused = store
        .publish_keys(
            &DeviceAddress::new(unique_id("ghost"), 1),
            None,
            None,
            vec![],
        )
        .await;
    assert!(matches!(refused, Err(StoreError::NotFound(_))));

    let identity = IdentityKeys {
        identity_key: Bytes::from_static(&[1; 32]),
        signing_key: Bytes::from_static(&[2; 32]),
    };
    let signed = SignedPreKeyRecord {
        key_id: 7,
        public_key: Bytes::from_static(&[3; 32]),
        signature: Bytes::from_static(&[4; 64]),
    };
    let pool_size = store
        .publish_keys(
            &device,
            Some(identity.clone()),
            Some(signed.clone()),
            vec![prekey(1), prekey(2), prekey(3)],
        )
        .await
        .expect("publish_keys");
    assert_eq!(pool_size, 3);
    let keys = store
        .device_keys(&device)
        .await
        .expect("device_keys")
        .expect("published keys are found");
    assert_eq!(keys.identity, identity);
    assert_eq!(keys.signed_prekey, Some(signed.clone()));

    // Prekeys only: identity and signed prekey stay; id 3 is replaced, 4 is added.
    let replacement = PreKeyRecord {
        key_id: 3,
        public_key: Bytes::from_static(b"replaced"),
    };
    let pool_size = store
        .publish_keys(&device, None, None, vec![replacement.clone(), prekey(4)])
        .await
        .expect("publish_keys");
    assert_eq!(pool_size, 4);
    let keys = store
        .device_keys(&device)
        .await
        .expect("device_keys")
        .expect("keys are found");
    assert_eq!(keys.identity, identity);
    assert_eq!(keys.signed_prekey, Some(signed));

    // A new signed prekey replaces the old one.
    let rotated = SignedPreKeyRecord {
        key_id: 8,
        public_key: Bytes::from_static(&[5; 32]),
        signature: Bytes::from_static(&[6; 64]),
    };
    store
        .publish_keys(&device, None, Some(rotated.clone()), vec![])
        .await
        .expect("publish_keys");
    let keys = store
        .device_keys(&device)
        .await
        .expect("device_keys")
        .expect("keys are found");
    assert_eq!(keys.signed_prekey, Some(rotated));
    assert_eq!(
        store
            .count_one_time_prekeys(&device)
            .await
            .expect("count_one_time_prekeys"),
        4
    );

    // Claims take the lowest id; the replaced key comes back with its new bytes.
    for expected in [prekey(1), prekey(2), replacement, prekey(4)] {
        assert_eq!(
            store
                .claim_one_time_prekey(&device)
                .await
                .expect("claim_one_time_prekey"),
            Some(expected)
        );
    }
}

async fn account_prekey_claims(store: &AccountStoreRef) {
    let device = create_user_for_keys(store, "claims").await;
    let second_token = token_hash("claims-2");
    let second_device_id = store
        .add_device(&device.user_id, second_token)
        .await
        .expect("add_device");
    let second_device = DeviceAddress::new(device.user_id.clone(), second_device_id);

    assert_eq!(
        store
            .claim_one_time_prekey(&device)
            .await
            .expect("claim_one_time_prekey"),
        None,
        "an empty pool yields None"
    );
    store
        .publish_keys(
            &device,
            None,
            None,
            vec![prekey(30), prekey(10), prekey(20)],
        )
        .await
        .expect("publish_keys");
    store
        .publish_keys(&second_device, None, None, vec![prekey(5)])
        .await
        .expect("publish_keys");

    let first = store
        .claim_one_time_prekey(&device)
        .await
        .expect("claim_one_time_prekey");
    assert_eq!(first, Some(prekey(10)), "the lowest id is claimed first");
    assert_eq!(
        store
            .count_one_time_prekeys(&device)
            .await
            .expect("count_one_time_prekeys"),
        2
    );
    assert_eq!(
        store
            .count_one_time_prekeys(&second_device)
            .await
            .expect("count_one_time_prekeys"),
        1,
        "devices have separate pools"
    );
    assert_eq!(
        store
            .claim_one_time_prekey(&device)
            .await
            .expect("claim")
            .map(|key| key.key_id),
        Some(20)
    );
    assert_eq!(
        store
            .claim_one_time_prekey(&device)
            .await
            .expect("claim")
            .map(|key| key.key_id),
        Some(30)
    );
    assert_eq!(
        store.claim_one_time_prekey(&device).await.expect("claim"),
        None
    );
    assert_eq!(
        store
            .claim_one_time_prekey(&second_device)
            .await
            .expect("claim")
            .map(|key| key.key_id),
        Some(5)
    );
}

async fn account_concurrent_prekey_claims(store: &AccountStoreRef) {
    const KEYS: u32 = 50;
    const CLAIMERS: usize = 80;
    let device = create_user_for_keys(store, "race").await;
    store
        .publish_keys(&device, None, None, (1..=KEYS).map(prekey).collect())
        .await
        .expect("publish_keys");
    let mut tasks = Vec::with_capacity(CLAIMERS);
    for _ in 0..CLAIMERS {
        let store = store.clone();
        let device = device.clone();
        tasks.push(tokio::spawn(async move {
            store.claim_one_time_prekey(&device).await
        }));
    }
    let mut claimed = HashSet::new();
    let mut empty = 0usize;
    for task in tasks {
        match task.await.expect("claim task").expect("claim") {
            Some(key) => {
                assert!(
                    claimed.insert(key.key_id),
                    "prekey {} was handed out twice",
                    key.key_id
                );
            }
            None => empty += 1,
        }
    }
    assert_eq!(claimed.len(), KEYS as usize, "every prekey is claimed once");
    assert_eq!(empty, CLAIMERS - KEYS as usize);
    assert_eq!(
        store
            .count_one_time_prekeys(&device)
            .await
            .expect("count_one_time_prekeys"),
        0
    );
}

// ---------------------------------------------------------------------------------------
// Inbox
// ---------------------------------------------------------------------------------------

fn accept_record(
    sender: &DeviceAddress,
    recipient_user_id: &str,
    message_id: u64,
    client_msg_id: &str,
    expires_at_ms: u64,
    envelopes: Vec<(u32, Bytes)>,
) -> AcceptRecord {
    AcceptRecord {
        message_id,
        sender: sender.clone(),
        client_msg_id: client_msg_id.to_string(),
        recipient_user_id: recipient_user_id.to_string(),
        sent_at_ms: message_id % 1_000_000_007,
        expires_at_ms,
        envelopes,
    }
}

/// Asserts every [`InboxStore`](crate::InboxStore) promise, including 2,000 concurrent
/// accepts.
pub async fn inbox_suite(store: InboxStoreRef) {
    inbox_accept_and_pending(&store).await;
    inbox_dedupe(&store).await;
    inbox_order_and_paging(&store).await;
    inbox_expiry(&store).await;
    inbox_delivered_and_removed(&store).await;
    inbox_concurrent_duplicates(&store).await;
    inbox_batches_become_visible_in_order(&store).await;
    inbox_concurrent_accepts(store.clone(), 2_000).await;
}

async fn inbox_accept_and_pending(store: &InboxStoreRef) {
    let now = now_ms();
    let sender = DeviceAddress::new(unique_id("sender"), 1);
    let recipient_user = unique_id("bob");
    let phone = DeviceAddress::new(recipient_user.clone(), 1);
    let laptop = DeviceAddress::new(recipient_user.clone(), 2);
    let message_id = unique_message_id();
    let phone_payload = Bytes::from_static(b"\x00\xff phone ciphertext \x00");
    let laptop_payload = Bytes::new();
    let record = accept_record(
        &sender,
        &recipient_user,
        message_id,
        "c-1",
        now + HOUR_MS,
        vec![(1, phone_payload.clone()), (2, laptop_payload.clone())],
    );
    assert_eq!(
        store.accept(record.clone()).await.expect("accept"),
        AcceptOutcome::Stored
    );

    let phone_pending = store.pending(&phone, 0, 10, now).await.expect("pending");
    assert_eq!(phone_pending.len(), 1);
    let stored = &phone_pending[0];
    assert_eq!(stored.message_id, message_id);
    assert_eq!(stored.sender, sender);
    assert_eq!(stored.recipient, phone);
    assert_eq!(stored.sent_at_ms, record.sent_at_ms);
    assert_eq!(stored.expires_at_ms, record.expires_at_ms);
    assert_eq!(
        stored.payload, phone_payload,
        "payload bytes round-trip exactly"
    );

    let laptop_pending = store.pending(&laptop, 0, 10, now).await.expect("pending");
    assert_eq!(laptop_pending.len(), 1);
    assert_eq!(laptop_pending[0].payload, laptop_payload);
    assert_eq!(laptop_pending[0].recipient, laptop);

    assert!(store.contains(&phone, message_id).await.expect("contains"));
    assert!(store.contains(&laptop, message_id).await.expect("contains"));
    let other_device = DeviceAddress::new(recipient_user.clone(), 3);
    assert!(
        store
            .pending(&other_device, 0, 10, now)
            .await
            .expect("pending")
            .is_empty(),
        "a device without an envelope gets nothing"
    );
    assert!(
        !store
            .contains(&other_device, message_id)
            .await
            .expect("contains")
    );
    assert!(
        store
            .pending(&phone, 0, 0, now)
            .await
            .expect("pending")
            .is_empty(),
        "limit 0 returns nothing"
    );

    // A user whose id is a prefix of another's sees none of the other's messages.
    let prefix_user = DeviceAddress::new(recipient_user[..recipient_user.len() - 1].to_string(), 1);
    assert!(
        store
            .pending(&prefix_user, 0, 10, now)
            .await
            .expect("pending")
            .is_empty()
    );
}

async fn inbox_dedupe(store: &InboxStoreRef) {
    let now = now_ms();
    let sender = DeviceAddress::new(unique_id("sender"), 1);
    let recipient_user = unique_id("bob");
    let recipient = DeviceAddress::new(recipient_user.clone(), 1);
    let original_id = unique_message_id();
    let original = accept_record(
        &sender,
        &recipient_user,
        original_id,
        "same-client-id",
        now + HOUR_MS,
        vec![(1, Bytes::from_static(b"first"))],
    );
    assert_eq!(
        store.accept(original.clone()).await.expect("accept"),
        AcceptOutcome::Stored
    );

    let retry_id = unique_message_id();
    let mut retry = accept_record(
        &sender,
        &recipient_user,
        retry_id,
        "same-client-id",
        now + HOUR_MS,
        vec![(1, Bytes::from_static(b"second"))],
    );
    retry.sent_at_ms = original.sent_at_ms + 5;
    assert_eq!(
        store.accept(retry).await.expect("accept"),
        AcceptOutcome::Duplicate {
            message_id: original_id,
            sent_at_ms: original.sent_at_ms
        },
        "a resend returns the original id and time"
    );
    let pending = store
        .pending(&recipient, 0, 10, now)
        .await
        .expect("pending");
    assert_eq!(pending.len(), 1, "a duplicate stores nothing new");
    assert_eq!(pending[0].message_id, original_id);
    assert_eq!(pending[0].payload, Bytes::from_static(b"first"));
    assert!(
        !store
            .contains(&recipient, retry_id)
            .await
            .expect("contains")
    );

    // The duplicate is still recognised after the original was delivered and read.
    store
        .remove(&recipient, &[original_id])
        .await
        .expect("remove");
    let after_read = accept_record(
        &sender,
        &recipient_user,
        unique_message_id(),
        "same-client-id",
        now + HOUR_MS,
        vec![(1, Bytes::from_static(b"third"))],
    );
    assert!(matches!(
        store.accept(after_read).await.expect("accept"),
        AcceptOutcome::Duplicate { message_id, .. } if message_id == original_id
    ));

    // The same client id from another sender device is a different message.
    let other_sender = DeviceAddress::new(sender.user_id.clone(), 2);
    let other_id = unique_message_id();
    let other = accept_record(
        &other_sender,
        &recipient_user,
        other_id,
        "same-client-id",
        now + HOUR_MS,
        vec![(1, Bytes::from_static(b"other"))],
    );
    assert_eq!(
        store.accept(other).await.expect("accept"),
        AcceptOutcome::Stored
    );
    let pending = store
        .pending(&recipient, 0, 10, now)
        .await
        .expect("pending");
    assert_eq!(
        pending
            .iter()
            .map(|message| message.message_id)
            .collect::<Vec<_>>(),
        vec![other_id]
    );
}

async fn inbox_order_and_paging(store: &InboxStoreRef) {
    let now = now_ms();
    let sender = DeviceAddress::new(unique_id("sender"), 1);
    let recipient_user = unique_id("bob");
    let recipient = DeviceAddress::new(recipient_user.clone(), 1);
    let ids: Vec<u64> = (0..10).map(|_| unique_message_id()).collect();
    // Accept out of order; pending must still be in id order.
    for index in [3usize, 0, 9, 1, 7, 2, 8, 4, 6, 5] {
        let record = accept_record(
            &sender,
            &recipient_user,
            ids[index],
            &format!("c-{index}"),
            now + HOUR_MS,
            vec![(1, Bytes::from(format!("m{index}")))],
        );
        assert_eq!(
            store.accept(record).await.expect("accept"),
            AcceptOutcome::Stored
        );
    }
    let mut seen = Vec::new();
    let mut after = 0u64;
    let mut pages = 0;
    loop {
        let page = store
            .pending(&recipient, after, 4, now)
            .await
            .expect("pending");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 4, "a page holds at most `limit` messages");
        pages += 1;
        after = page.last().map_or(after, |message| message.message_id);
        seen.extend(page.into_iter().map(|message| message.message_id));
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen, ids,
        "pending is ascending by id and pages by after_message_id"
    );
    let tail = store
        .pending(&recipient, ids[7], 100, now)
        .await
        .expect("pending");
    assert_eq!(
        tail.iter()
            .map(|message| message.message_id)
            .collect::<Vec<_>>(),
        ids[8..].to_vec()
    );
    assert!(
        store
            .pending(&recipient, u64::MAX, 10, now)
            .await
            .expect("pending")
            .is_empty()
    );
}

async fn inbox_expiry(store: &InboxStoreRef) {
    let now = now_ms();
    let sender = DeviceAddress::new(unique_id("sender"), 1);
    let recipient_user = unique_id("bob");
    let recipient = DeviceAddress::new(recipient_user.clone(), 1);
    let expired_id = unique_message_id();
    let live_id = unique_message_id();
    let expired = accept_record(
        &sender,
        &recipient_user,
        expired_id,
        "expired",
        now - 1_000,
        vec![(1, Bytes::from_static(b"old"))],
    );
    let live = accept_record(
        &sender,
        &recipient_user,
        live_id,
        "live",
        now + HOUR_MS,
        vec![(1, Bytes::from_static(b"new"))],
    );
    store.accept(expired).await.expect("accept");
    store.accept(live).await.expect("accept");

    let pending = store
        .pending(&recipient, 0, 10, now)
        .await
        .expect("pending");
    assert_eq!(
        pending
            .iter()
            .map(|message| message.message_id)
            .collect::<Vec<_>>(),
        vec![live_id],
        "pending skips expired messages"
    );
    let at_expiry = store
        .pending(&recipient, 0, 10, now + HOUR_MS)
        .await
        .expect("pending");
    assert!(
        at_expiry.is_empty(),
        "a message is expired at its expires_at_ms"
    );

    store.purge_expired(now).await.expect("purge_expired");
    assert!(
        !store
            .contains(&recipient, expired_id)
            .await
            .expect("contains"),
        "purge_expired deletes expired messages"
    );
    assert!(
        store.contains(&recipient, live_id).await.expect("contains"),
        "purge_expired keeps live messages"
    );
    let pending = store
        .pending(&recipient, 0, 10, now)
        .await
        .expect("pending");
    assert_eq!(pending.len(), 1);
}

async fn inbox_delivered_and_removed(store: &InboxStoreRef) {
    let now = now_ms();
    let sender = DeviceAddress::new(unique_id("sender"), 1);
    let recipient_user = unique_id("bob");
    let phone = DeviceAddress::new(recipient_user.clone(), 1);
    let laptop = DeviceAddress::new(recipient_user.clone(), 2);
    let ids: Vec<u64> = (0..4).map(|_| unique_message_id()).collect();
    for (index, message_id) in ids.iter().enumerate() {
        let record = accept_record(
            &sender,
            &recipient_user,
            *message_id,
            &format!("d-{index}"),
            now + HOUR_MS,
            vec![(1, Bytes::from_static(b"p")), (2, Bytes::from_static(b"l"))],
        );
        store.accept(record).await.expect("accept");
    }

    store
        .mark_delivered(&phone, &[ids[0], ids[2], unique_message_id()])
        .await
        .expect("mark_delivered ignores unknown ids");
    let pending = store.pending(&phone, 0, 10, now).await.expect("pending");
    assert_eq!(
        pending
            .iter()
            .map(|message| message.message_id)
            .collect::<Vec<_>>(),
        vec![ids[1], ids[3]],
        "delivered messages are no longer pending"
    );
    assert!(
        store.contains(&phone, ids[0]).await.expect("contains"),
        "delivered messages stay stored until read"
    );
    assert_eq!(
        store
            .pending(&laptop, 0, 10, now)
            .await
            .expect("pending")
            .len(),
        4,
        "marking one device leaves the others pending"
    );
    store
        .mark_delivered(&phone, &[ids[0]])
        .await
        .expect("marking twice is harmless");
    assert!(store.contains(&phone, ids[0]).await.expect("contains"));

    store
        .remove(&phone, &[ids[0], ids[1], unique_message_id()])
        .await
        .expect("remove ignores unknown ids");
    assert!(!store.contains(&phone, ids[0]).await.expect("contains"));
    assert!(!store.contains(&phone, ids[1]).await.expect("contains"));
    assert!(store.contains(&phone, ids[2]).await.expect("contains"));
    assert!(
        store.contains(&laptop, ids[0]).await.expect("contains"),
        "removing from one device leaves the others"
    );
    let pending = store.pending(&phone, 0, 10, now).await.expect("pending");
    assert_eq!(
        pending
            .iter()
            .map(|message| message.message_id)
            .collect::<Vec<_>>(),
        vec![ids[3]]
    );
    store.remove(&phone, &ids).await.expect("remove");
    for message_id in &ids {
        assert!(!store.contains(&phone, *message_id).await.expect("contains"));
    }
}

async fn inbox_concurrent_duplicates(store: &InboxStoreRef) {
    const RACERS: usize = 20;
    let now = now_ms();
    let sender = DeviceAddress::new(unique_id("sender"), 1);
    let recipient_user = unique_id("bob");
    let recipient = DeviceAddress::new(recipient_user.clone(), 1);
    let mut tasks = Vec::with_capacity(RACERS);
    for _ in 0..RACERS {
        let store = store.clone();
        let record = accept_record(
            &sender,
            &recipient_user,
            unique_message_id(),
            "raced",
            now + HOUR_MS,
            vec![(1, Bytes::from_static(b"raced"))],
        );
        let message_id = record.message_id;
        tasks.push(tokio::spawn(async move {
            (message_id, store.accept(record).await)
        }));
    }
    let mut stored_ids = Vec::new();
    let mut duplicate_ids = Vec::new();
    for task in tasks {
        let (message_id, outcome) = task.await.expect("accept task");
        match outcome.expect("accept") {
            AcceptOutcome::Stored => stored_ids.push(message_id),
            AcceptOutcome::Duplicate { message_id, .. } => duplicate_ids.push(message_id),
        }
    }
    assert_eq!(
        stored_ids.len(),
        1,
        "exactly one of the racing resends is stored"
    );
    assert!(duplicate_ids.iter().all(|id| *id == stored_ids[0]));
    let pending = store
        .pending(&recipient, 0, 100, now)
        .await
        .expect("pending");
    assert_eq!(
        pending
            .iter()
            .map(|message| message.message_id)
            .collect::<Vec<_>>(),
        stored_ids
    );
}

/// A batch's messages become visible in order: a device reading its backlog while its
/// sender's batch is being stored sees a prefix of it, never a later message without the
/// earlier ones (it would show them out of order). A reader polls `pending` throughout.
async fn inbox_batches_become_visible_in_order(store: &InboxStoreRef) {
    const ROUNDS: usize = 5;
    const BATCH: usize = 32;
    let now = now_ms();
    let sender = DeviceAddress::new(unique_id("sender"), 1);
    for round in 0..ROUNDS {
        let recipient_user = unique_id("bob");
        let phone = DeviceAddress::new(recipient_user.clone(), 1);
        let earlier = accept_record(
            &sender,
            &recipient_user,
            unique_message_id(),
            &format!("earlier-{round}"),
            now + HOUR_MS,
            vec![(1, Bytes::from_static(b"earlier"))],
        );
        assert_eq!(
            store.accept(earlier.clone()).await.expect("accept"),
            AcceptOutcome::Stored
        );
        let ids: Vec<u64> = (0..BATCH).map(|_| unique_message_id()).collect();
        let mut records: Vec<AcceptRecord> = ids
            .iter()
            .enumerate()
            .map(|(index, message_id)| {
                accept_record(
                    &sender,
                    &recipient_user,
                    *message_id,
                    &format!("batch-{round}-{index}"),
                    now + HOUR_MS,
                    vec![
                        (1, Bytes::from(format!("to phone {index}"))),
                        (2, Bytes::from(format!("to laptop {index}"))),
                    ],
                )
            })
            .collect();
        // A resend of the earlier message in the middle of the batch: a duplicate.
        let mut resend = earlier.clone();
        resend.message_id = unique_message_id();
        records.insert(BATCH / 2, resend);

        let stored = Arc::new(AtomicBool::new(false));
        let reader = {
            let store = store.clone();
            let phone = phone.clone();
            let stored = stored.clone();
            tokio::spawn(async move {
                let mut snapshots = Vec::new();
                loop {
                    let finished = stored.load(Ordering::Acquire);
                    let page = store.pending(&phone, 0, 1_000, now).await.expect("pending");
                    snapshots.push(page.into_iter().map(|message| message.message_id).collect());
                    if finished {
                        return snapshots;
                    }
                    tokio::task::yield_now().await;
                }
            })
        };
        let outcomes = store.accept_batch(records).await;
        stored.store(true, Ordering::Release);
        let snapshots: Vec<Vec<u64>> = reader.await.expect("reader");

        assert_eq!(outcomes.len(), BATCH + 1, "one outcome per record");
        for (index, outcome) in outcomes.into_iter().enumerate() {
            let expected = if index == BATCH / 2 {
                AcceptOutcome::Duplicate {
                    message_id: earlier.message_id,
                    sent_at_ms: earlier.sent_at_ms,
                }
            } else {
                AcceptOutcome::Stored
            };
            assert_eq!(
                outcome.expect("accept in batch"),
                expected,
                "record {index}"
            );
        }
        let mut everything = vec![earlier.message_id];
        everything.extend(&ids);
        assert_eq!(
            snapshots.last(),
            Some(&everything),
            "the whole batch is pending afterwards, in id order"
        );
        for snapshot in &snapshots {
            assert_eq!(
                snapshot.as_slice(),
                &everything[..snapshot.len()],
                "round {round}: a read during the batch saw a later message without the \
                 earlier ones ({} reads)",
                snapshots.len()
            );
        }
    }
}

/// Runs `accepts` concurrent [`accept`](crate::InboxStore::accept) calls into one device
/// inbox, asserts that all succeed and that [`pending`](crate::InboxStore::pending) returns
/// them all in id order, and returns the recipient device.
pub async fn inbox_concurrent_accepts(store: InboxStoreRef, accepts: usize) -> DeviceAddress {
    let now = now_ms();
    let sender = DeviceAddress::new(unique_id("sender"), 1);
    let recipient_user = unique_id("bob");
    let recipient = DeviceAddress::new(recipient_user.clone(), 1);
    let mut ids: Vec<u64> = (0..accepts).map(|_| unique_message_id()).collect();
    let mut tasks = Vec::with_capacity(accepts);
    for (index, message_id) in ids.iter().enumerate() {
        let store = store.clone();
        let record = accept_record(
            &sender,
            &recipient_user,
            *message_id,
            &format!("concurrent-{index}"),
            now + HOUR_MS,
            vec![(1, Bytes::from(format!("payload {index}")))],
        );
        tasks.push(tokio::spawn(async move { store.accept(record).await }));
    }
    for task in tasks {
        assert_eq!(
            task.await.expect("accept task").expect("accept"),
            AcceptOutcome::Stored
        );
    }
    ids.sort_unstable();
    let mut seen = Vec::with_capacity(accepts);
    let mut after = 0u64;
    loop {
        let page = store
            .pending(&recipient, after, 500, now)
            .await
            .expect("pending");
        let Some(last) = page.last() else {
            break;
        };
        after = last.message_id;
        seen.extend(page.into_iter().map(|message| message.message_id));
    }
    assert_eq!(seen.len(), accepts, "every accepted message is readable");
    assert_eq!(seen, ids, "accepted messages are read back in id order");
    recipient
}

// ---------------------------------------------------------------------------------------
// Ticks
// ---------------------------------------------------------------------------------------

struct TickFixture {
    sender: DeviceAddress,
    recipient_user_id: String,
}

impl TickFixture {
    fn new() -> Self {
        Self {
            sender: DeviceAddress::new(unique_id("alice"), 1),
            recipient_user_id: unique_id("bob"),
        }
    }

    fn recipient(&self, device_id: u32) -> DeviceAddress {
        DeviceAddress::new(self.recipient_user_id.clone(), device_id)
    }

    fn sent(&self, message_id: u64, devices: Vec<u32>, expires_at_ms: u64) -> SentRecord {
        SentRecord {
            message_id,
            sender: self.sender.clone(),
            recipient_user_id: self.recipient_user_id.clone(),
            recipient_device_ids: devices,
            sent_at_ms: 10,
            expires_at_ms,
        }
    }
}

fn advanced(outcome: &AckOutcome) -> &StoredReceipt {
    match outcome {
        AckOutcome::Advanced(receipt) => receipt,
        other => panic!("expected Advanced, got {other:?}"),
    }
}

/// Asserts every [`TickStore`](crate::TickStore) promise.
pub async fn tick_suite(store: TickStoreRef) {
    tick_forward_only(&store).await;
    tick_refusals(&store).await;
    tick_receipts_outbox(&store).await;
    tick_expiry(&store).await;
}

async fn tick_forward_only(store: &TickStoreRef) {
    let now = now_ms();
    let fixture = TickFixture::new();
    let message_id = unique_message_id();
    store
        .record_sent(fixture.sent(message_id, vec![1, 2], now + HOUR_MS))
        .await
        .expect("record_sent");
    let mut states = store
        .status(&fixture.sender, &[message_id])
        .await
        .expect("status");
    states.sort_unstable_by_key(|state| state.1);
    assert_eq!(
        states,
        vec![
            (message_id, 1, TickStatus::Sent),
            (message_id, 2, TickStatus::Sent)
        ]
    );
    let stranger = DeviceAddress::new(unique_id("mallory"), 1);
    assert!(
        store
            .status(&stranger, &[message_id])
            .await
            .expect("status")
            .is_empty(),
        "status leaves out messages sent by others"
    );

    let phone = fixture.recipient(1);
    let outcomes = store
        .acknowledge(&phone, TickStatus::Delivered, vec![(message_id, 1)], now)
        .await
        .expect("acknowledge");
    // Durable once flushed (the embedded store answers acknowledge once visible).
    store.flush().await.expect("flush");
    assert_eq!(outcomes.len(), 1);
    let receipt = advanced(&outcomes[0]);
    assert_eq!(
        receipt,
        &StoredReceipt {
            receipt_id: 1,
            sender: fixture.sender.clone(),
            message_id,
            recipient: phone.clone(),
            status: TickStatus::Delivered,
            at_ms: now,
        }
    );
    assert_eq!(
        store
            .acknowledge(&phone, TickStatus::Delivered, vec![(message_id, 2)], now)
            .await
            .expect("acknowledge"),
        vec![AckOutcome::Unchanged],
        "a repeated DELIVERED changes nothing"
    );
    let outcomes = store
        .acknowledge(&phone, TickStatus::Read, vec![(message_id, 3)], now + 1)
        .await
        .expect("acknowledge");
    assert_eq!(advanced(&outcomes[0]).status, TickStatus::Read);
    assert_eq!(
        store
            .acknowledge(
                &phone,
                TickStatus::Delivered,
                vec![(message_id, 4)],
                now + 2
            )
            .await
            .expect("acknowledge"),
        vec![AckOutcome::Unchanged],
        "a state never moves backwards"
    );
    assert_eq!(
        store
            .acknowledge(&phone, TickStatus::Read, vec![(message_id, 5)], now + 2)
            .await
            .expect("acknowledge"),
        vec![AckOutcome::Unchanged]
    );

    // READ straight from SENT: one receipt, status READ.
    let laptop = fixture.recipient(2);
    let outcomes = store
        .acknowledge(&laptop, TickStatus::Read, vec![(message_id, 6)], now + 3)
        .await
        .expect("acknowledge");
    let receipt = advanced(&outcomes[0]);
    assert_eq!(receipt.status, TickStatus::Read);
    assert_eq!(receipt.recipient, laptop);
    assert_eq!(
        store
            .acknowledge(
                &laptop,
                TickStatus::Delivered,
                vec![(message_id, 7)],
                now + 4
            )
            .await
            .expect("acknowledge"),
        vec![AckOutcome::Unchanged],
        "READ implies DELIVERED"
    );

    // Recording the message again leaves states that moved on untouched.
    store
        .record_sent(fixture.sent(message_id, vec![1, 2], now + HOUR_MS))
        .await
        .expect("record_sent is idempotent");
    let mut states = store
        .status(&fixture.sender, &[message_id, unique_message_id()])
        .await
        .expect("status");
    states.sort_unstable_by_key(|state| state.1);
    assert_eq!(
        states,
        vec![
            (message_id, 1, TickStatus::Read),
            (message_id, 2, TickStatus::Read)
        ]
    );

    let receipts = store
        .pending_receipts(&fixture.sender, 0, 100)
        .await
        .expect("pending_receipts");
    assert_eq!(
        receipts
            .iter()
            .map(|receipt| (receipt.receipt_id, receipt.status))
            .collect::<Vec<_>>(),
        vec![
            (1, TickStatus::Delivered),
            (3, TickStatus::Read),
            (6, TickStatus::Read)
        ],
        "one receipt is stored per advance, none for unchanged acks"
    );
}

async fn tick_refusals(store: &TickStoreRef) {
    let now = now_ms();
    let fixture = TickFixture::new();
    let message_id = unique_message_id();
    let second_id = unique_message_id();
    store
        .record_sent(fixture.sent(message_id, vec![1], now + HOUR_MS))
        .await
        .expect("record_sent");
    store
        .record_sent(fixture.sent(second_id, vec![1], now + HOUR_MS))
        .await
        .expect("record_sent");

    let unknown_id = unique_message_id();
    let stranger = DeviceAddress::new(unique_id("mallory"), 1);
    let outcomes = store
        .acknowledge(&stranger, TickStatus::Delivered, vec![(message_id, 1)], now)
        .await
        .expect("acknowledge");
    assert_eq!(outcomes, vec![AckOutcome::NotRecipient]);
    let other_device = fixture.recipient(2);
    let outcomes = store
        .acknowledge(&other_device, TickStatus::Read, vec![(message_id, 2)], now)
        .await
        .expect("acknowledge");
    assert_eq!(
        outcomes,
        vec![AckOutcome::NotRecipient],
        "a device of the recipient user that was not addressed is not a recipient"
    );

    // One batch, outcomes in order, applied together.
    let phone = fixture.recipient(1);
    let outcomes = store
        .acknowledge(
            &phone,
            TickStatus::Delivered,
            vec![
                (unknown_id, 10),
                (message_id, 11),
                (message_id, 12),
                (second_id, 13),
            ],
            now,
        )
        .await
        .expect("acknowledge");
    assert_eq!(outcomes.len(), 4);
    assert_eq!(outcomes[0], AckOutcome::NotFound);
    assert_eq!(advanced(&outcomes[1]).receipt_id, 11);
    assert_eq!(outcomes[2], AckOutcome::Unchanged);
    assert_eq!(advanced(&outcomes[3]).message_id, second_id);
    let receipts = store
        .pending_receipts(&fixture.sender, 0, 100)
        .await
        .expect("pending_receipts");
    assert_eq!(
        receipts
            .iter()
            .map(|receipt| receipt.receipt_id)
            .collect::<Vec<_>>(),
        vec![11, 13],
        "refused acks store no receipt"
    );
    assert!(
        store
            .pending_receipts(&stranger, 0, 100)
            .await
            .expect("pending_receipts")
            .is_empty()
    );
}

async fn tick_receipts_outbox(store: &TickStoreRef) {
    let now = now_ms();
    let fixture = TickFixture::new();
    let phone = fixture.recipient(1);
    let mut message_ids = Vec::new();
    for _ in 0..5 {
        let message_id = unique_message_id();
        store
            .record_sent(fixture.sent(message_id, vec![1], now + HOUR_MS))
            .await
            .expect("record_sent");
        message_ids.push(message_id);
    }
    // Receipt ids are paired by the caller; acknowledge them out of order.
    let acks = vec![
        (message_ids[0], 50),
        (message_ids[1], 20),
        (message_ids[2], 40),
        (message_ids[3], 10),
        (message_ids[4], 30),
    ];
    store
        .acknowledge(&phone, TickStatus::Delivered, acks, now)
        .await
        .expect("acknowledge");

    let first_page = store
        .pending_receipts(&fixture.sender, 0, 2)
        .await
        .expect("pending_receipts");
    assert_eq!(
        first_page
            .iter()
            .map(|receipt| receipt.receipt_id)
            .collect::<Vec<_>>(),
        vec![10, 20],
        "receipts come in receipt id order, at most `limit`"
    );
    assert_eq!(first_page[0].message_id, message_ids[3]);
    assert_eq!(first_page[0].sender, fixture.sender);
    let second_page = store
        .pending_receipts(&fixture.sender, 20, 10)
        .await
        .expect("pending_receipts");
    assert_eq!(
        second_page
            .iter()
            .map(|receipt| receipt.receipt_id)
            .collect::<Vec<_>>(),
        vec![30, 40, 50]
    );

    store
        .confirm_receipts(&fixture.sender, &[10, 30, 999])
        .await
        .expect("confirm_receipts ignores unknown ids");
    let remaining = store
        .pending_receipts(&fixture.sender, 0, 10)
        .await
        .expect("pending_receipts");
    assert_eq!(
        remaining
            .iter()
            .map(|receipt| receipt.receipt_id)
            .collect::<Vec<_>>(),
        vec![20, 40, 50],
        "confirmed receipts are forgotten"
    );
    // Another sender device of the same user has its own outbox.
    let other_sender_device = DeviceAddress::new(fixture.sender.user_id.clone(), 2);
    assert!(
        store
            .pending_receipts(&other_sender_device, 0, 10)
            .await
            .expect("pending_receipts")
            .is_empty()
    );
    store
        .confirm_receipts(&fixture.sender, &[20, 40, 50])
        .await
        .expect("confirm_receipts");
    assert!(
        store
            .pending_receipts(&fixture.sender, 0, 10)
            .await
            .expect("pending_receipts")
            .is_empty()
    );
}

async fn tick_expiry(store: &TickStoreRef) {
    let now = now_ms();
    let fixture = TickFixture::new();
    let expired_id = unique_message_id();
    let live_id = unique_message_id();
    store
        .record_sent(fixture.sent(expired_id, vec![1], now - 1_000))
        .await
        .expect("record_sent");
    store
        .record_sent(fixture.sent(live_id, vec![1], now + HOUR_MS))
        .await
        .expect("record_sent");
    let phone = fixture.recipient(1);
    let outcomes = store
        .acknowledge(&phone, TickStatus::Delivered, vec![(expired_id, 1)], now)
        .await
        .expect("acknowledge");
    assert_eq!(
        outcomes,
        vec![AckOutcome::NotFound],
        "an expired message is not found"
    );

    store.purge_expired(now).await.expect("purge_expired");
    let states = store
        .status(&fixture.sender, &[expired_id, live_id])
        .await
        .expect("status");
    assert_eq!(
        states,
        vec![(live_id, 1, TickStatus::Sent)],
        "purge_expired removes expired records and keeps live ones"
    );
}

// ---------------------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------------------

/// Asserts every [`PresenceStore`](crate::PresenceStore) promise.
pub async fn presence_suite(store: PresenceStoreRef) {
    presence_last_seen(&store).await;
    presence_privacy(&store).await;
}

async fn presence_last_seen(store: &PresenceStoreRef) {
    let alice = unique_id("alice");
    let bob = unique_id("bob");
    assert_eq!(store.last_seen(&alice).await.expect("last_seen"), None);

    store
        .record_last_seen(vec![(alice.clone(), 1_000), (bob.clone(), 500)])
        .await
        .expect("record_last_seen");
    assert_eq!(
        store.last_seen(&alice).await.expect("last_seen"),
        Some(1_000)
    );
    assert_eq!(store.last_seen(&bob).await.expect("last_seen"), Some(500));

    store
        .record_last_seen(vec![(alice.clone(), 900)])
        .await
        .expect("record_last_seen");
    assert_eq!(
        store.last_seen(&alice).await.expect("last_seen"),
        Some(1_000),
        "last seen never moves backwards"
    );
    store
        .record_last_seen(vec![(alice.clone(), 2_000), (alice.clone(), 1_500)])
        .await
        .expect("record_last_seen");
    assert_eq!(
        store.last_seen(&alice).await.expect("last_seen"),
        Some(2_000),
        "the latest time in one batch wins"
    );
    store
        .record_last_seen(vec![])
        .await
        .expect("an empty batch is fine");
}

async fn presence_privacy(store: &PresenceStoreRef) {
    let alice = unique_id("alice");
    assert_eq!(
        store.privacy(&alice).await.expect("privacy"),
        Privacy::default(),
        "privacy defaults to EVERYONE with no contacts"
    );
    assert_eq!(Privacy::default().visibility, LastSeenVisibility::Everyone);

    store
        .set_visibility(&alice, LastSeenVisibility::Contacts)
        .await
        .expect("set_visibility");
    let privacy = store.privacy(&alice).await.expect("privacy");
    assert_eq!(privacy.visibility, LastSeenVisibility::Contacts);
    assert!(privacy.contacts.is_empty());

    let contacts = vec![unique_id("bob"), unique_id("carol")];
    store
        .set_contacts(&alice, contacts.clone())
        .await
        .expect("set_contacts");
    let privacy = store.privacy(&alice).await.expect("privacy");
    assert_eq!(privacy.visibility, LastSeenVisibility::Contacts);
    assert_eq!(privacy.contacts, contacts);

    let replaced = vec![unique_id("dave")];
    store
        .set_contacts(&alice, replaced.clone())
        .await
        .expect("set_contacts");
    assert_eq!(
        store.privacy(&alice).await.expect("privacy").contacts,
        replaced,
        "set_contacts replaces the list"
    );

    store
        .set_visibility(&alice, LastSeenVisibility::Nobody)
        .await
        .expect("set_visibility");
    let privacy = store.privacy(&alice).await.expect("privacy");
    assert_eq!(privacy.visibility, LastSeenVisibility::Nobody);
    assert_eq!(
        privacy.contacts, replaced,
        "visibility and contacts are independent"
    );

    let bob = unique_id("bob");
    assert_eq!(
        store.privacy(&bob).await.expect("privacy"),
        Privacy::default(),
        "settings are per user"
    );
}
