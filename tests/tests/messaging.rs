//! One message A → B through the whole suite: ticks, store-and-forward, order, idempotent
//! resends and deletion once read.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bluetick_client::{ChatConfig, ChatEvent, Content, DeviceAddress, TickStatus};
use bluetick_tests::{TestCluster, WAIT};

fn manual_acks() -> ChatConfig {
    ChatConfig {
        auto_ack_delivered: false,
        ..ChatConfig::default()
    }
}

/// A sees the single tick on store, the double tick only after B acknowledges delivery and
/// the blue tick only after B reads, in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_delivery_shows_single_double_and_blue_ticks_in_order() {
    let cluster = TestCluster::start().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let (_a, alice_chat, mut alice_events) = cluster.connect(&alice).await;
    let (_b, bob_chat, mut bob_events) = cluster.connect_with(&bob, manual_acks()).await;

    let client_msg_id = alice_chat
        .send_content(&bob.user_id, &Content::text("hello bob"))
        .await
        .unwrap();
    let message_id = alice_events.wait_sent(&client_msg_id, WAIT).await.unwrap();

    let message = bob_events.next_message(WAIT).await.unwrap();
    assert_eq!(message.message_id, message_id);
    assert_eq!(
        message.sender,
        Some(DeviceAddress::new(alice.user_id.clone(), 1))
    );
    assert_eq!(
        Content::decode(&message.payload).unwrap(),
        Content::text("hello bob")
    );

    // No double tick before bob's device acknowledges.
    let early = alice_events
        .next_event_matching(
            |event| matches!(event, ChatEvent::Receipt { .. }),
            Duration::from_millis(500),
        )
        .await;
    assert!(early.is_err(), "receipt before delivery ack: {early:?}");

    bob_chat.ack_delivered(vec![message_id]).await.unwrap();
    let delivered = alice_events
        .next_event_matching(|event| matches!(event, ChatEvent::Receipt { .. }), WAIT)
        .await
        .unwrap();
    match delivered {
        ChatEvent::Receipt {
            message_id: id,
            status,
            recipient,
            ..
        } => {
            assert_eq!(id, message_id);
            assert_eq!(status, TickStatus::Delivered);
            assert_eq!(recipient, DeviceAddress::new(bob.user_id.clone(), 1));
        }
        other => panic!("unexpected {other:?}"),
    }
    // No blue tick before bob reads.
    let early = alice_events
        .next_event_matching(
            |event| matches!(event, ChatEvent::Receipt { .. }),
            Duration::from_millis(500),
        )
        .await;
    assert!(early.is_err(), "read receipt before read: {early:?}");

    bob_chat.mark_read(vec![message_id]).await.unwrap();
    let read = alice_events
        .wait_receipt(message_id, TickStatus::Read, WAIT)
        .await
        .unwrap();
    assert_eq!(read, DeviceAddress::new(bob.user_id.clone(), 1));
}

/// B offline: A still gets single ticks; B connects later and receives all 1,000 messages
/// exactly once, in the order A sent them; A then gets the double ticks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_gets_the_backlog_in_order() {
    let cluster = TestCluster::start().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let (_a, alice_chat, mut alice_events) = cluster.connect(&alice).await;

    let mut client_ids = Vec::new();
    for index in 0..1_000 {
        let id = alice_chat
            .send_content(&bob.user_id, &Content::text(format!("message {index}")))
            .await
            .unwrap();
        client_ids.push(id);
    }
    let mut message_ids = Vec::new();
    for client_msg_id in &client_ids {
        message_ids.push(alice_events.wait_sent(client_msg_id, WAIT).await.unwrap());
    }
    let mut sorted = message_ids.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, message_ids, "ids follow the order of acceptance");

    let (_b, _bob_chat, mut bob_events) = cluster.connect(&bob).await;
    let received = bob_events.next_messages(1_000, WAIT).await.unwrap();
    let received_ids: Vec<u64> = received.iter().map(|message| message.message_id).collect();
    assert_eq!(received_ids, message_ids);
    for (index, message) in received.iter().enumerate() {
        assert_eq!(
            Content::decode(&message.payload).unwrap(),
            Content::text(format!("message {index}"))
        );
    }
    // The SDK acknowledged delivery: every message gets its double tick.
    let mut waiting: std::collections::HashSet<u64> = message_ids.iter().copied().collect();
    while !waiting.is_empty() {
        let event = alice_events
            .next_event_matching(
                |event| {
                    matches!(
                        event,
                        ChatEvent::Receipt {
                            status: TickStatus::Delivered,
                            ..
                        }
                    )
                },
                WAIT,
            )
            .await
            .unwrap_or_else(|error| panic!("{} double ticks missing: {error}", waiting.len()));
        if let ChatEvent::Receipt { message_id, .. } = event {
            waiting.remove(&message_id);
        }
    }
}

/// Reading deletes the message from the server's storage; unread ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_messages_are_deleted_from_the_store() {
    let mut cluster = TestCluster::start().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let (_a, alice_chat, mut alice_events) = cluster.connect(&alice).await;
    let (_b, bob_chat, mut bob_events) = cluster.connect(&bob).await;

    let first = alice_chat.send(&bob.user_id, "read me").await.unwrap();
    let second = alice_chat.send(&bob.user_id, "keep me").await.unwrap();
    let first_id = alice_events.wait_sent(&first, WAIT).await.unwrap();
    let second_id = alice_events.wait_sent(&second, WAIT).await.unwrap();
    bob_events.next_messages(2, WAIT).await.unwrap();
    // Waiting skips other events, so wait in the order receipts arrive.
    alice_events
        .wait_receipt(second_id, TickStatus::Delivered, WAIT)
        .await
        .unwrap();
    bob_chat.mark_read(vec![first_id]).await.unwrap();
    alice_events
        .wait_receipt(first_id, TickStatus::Read, WAIT)
        .await
        .unwrap();
    bob_chat.close().await.unwrap();
    alice_chat.close().await.unwrap();
    cluster.stop().await;

    let inbox = bluetick_store::open_inbox_store(&cluster.store_url("messaging"))
        .await
        .unwrap();
    let bob_device = DeviceAddress::new(bob.user_id.clone(), 1);
    assert!(
        !inbox.contains(&bob_device, first_id).await.unwrap(),
        "read message still stored"
    );
    assert!(
        inbox.contains(&bob_device, second_id).await.unwrap(),
        "unread message lost"
    );
}

/// Resending with the same client_msg_id returns the same message_id and stores nothing new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resend_with_the_same_client_msg_id_is_stored_once() {
    let mut cluster = TestCluster::start().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let (_a, alice_chat, mut alice_events) = cluster.connect(&alice).await;

    let client_msg_id = bluetick_client::new_client_msg_id();
    alice_chat
        .send_with_id(client_msg_id.clone(), &bob.user_id, once_payload())
        .await
        .unwrap();
    let first = alice_events
        .next_event_matching(|event| matches!(event, ChatEvent::Sent { .. }), WAIT)
        .await
        .unwrap();
    alice_chat
        .send_with_id(client_msg_id.clone(), &bob.user_id, once_payload())
        .await
        .unwrap();
    let second = alice_events
        .next_event_matching(|event| matches!(event, ChatEvent::Sent { .. }), WAIT)
        .await
        .unwrap();
    let (
        ChatEvent::Sent {
            message_id: first_id,
            duplicate: first_dup,
            ..
        },
        ChatEvent::Sent {
            message_id: second_id,
            duplicate: second_dup,
            ..
        },
    ) = (first, second)
    else {
        panic!("expected two Sent events");
    };
    assert_eq!(first_id, second_id);
    assert!(!first_dup);
    assert!(second_dup);
    alice_chat.close().await.unwrap();
    cluster.stop().await;

    let inbox = bluetick_store::open_inbox_store(&cluster.store_url("messaging"))
        .await
        .unwrap();
    let pending = inbox
        .pending(
            &DeviceAddress::new(bob.user_id.clone(), 1),
            0,
            100,
            bluetick_tests::now_ms(),
        )
        .await
        .unwrap();
    assert_eq!(pending.len(), 1, "the resend stored a second copy");
    assert_eq!(pending[0].message_id, first_id);
}

fn once_payload() -> Vec<bluetick_proto::gateway::v1::DevicePayload> {
    vec![bluetick_proto::gateway::v1::DevicePayload {
        device_id: 0,
        payload: bytes::Bytes::from_static(b"once"),
    }]
}

/// Every device of the recipient gets its own copy, and each can tick it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_of_the_recipient_gets_the_message() {
    let cluster = TestCluster::start().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let bob_laptop = bluetick_client::BluetickClient::new(bob.clone())
        .unwrap()
        .add_device()
        .await
        .unwrap();
    assert_eq!(bob_laptop.device_id, 2);
    let (_a, alice_chat, mut alice_events) = cluster.connect(&alice).await;
    let (_b1, _phone, mut phone_events) = cluster.connect(&bob).await;
    let (_b2, _laptop, mut laptop_events) = cluster.connect(&bob_laptop).await;

    let sent = alice_chat.send(&bob.user_id, "to all").await.unwrap();
    let message_id = alice_events.wait_sent(&sent, WAIT).await.unwrap();
    let on_phone = phone_events.next_message(WAIT).await.unwrap();
    let on_laptop = laptop_events.next_message(WAIT).await.unwrap();
    assert_eq!(on_phone.message_id, message_id);
    assert_eq!(on_laptop.message_id, message_id);
    assert_eq!(on_phone.recipient_device_id, 1);
    assert_eq!(on_laptop.recipient_device_id, 2);
    let mut devices = Vec::new();
    for _ in 0..2 {
        match alice_events
            .next_event_matching(|event| matches!(event, ChatEvent::Receipt { .. }), WAIT)
            .await
            .unwrap()
        {
            ChatEvent::Receipt { recipient, .. } => devices.push(recipient.device_id),
            other => panic!("unexpected {other:?}"),
        }
    }
    devices.sort_unstable();
    assert_eq!(devices, vec![1, 2]);
}

/// Stopping every service and starting them again on the same storage loses nothing: an
/// offline user then receives everything, in order, and the sender's receipts follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_restart_keeps_stored_messages_and_receipts() {
    let mut cluster = TestCluster::start().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let (_a, alice_chat, mut alice_events) = cluster.connect(&alice).await;
    let mut message_ids = Vec::new();
    for index in 0..20 {
        let id = alice_chat
            .send_content(
                &bob.user_id,
                &Content::text(format!("before restart {index}")),
            )
            .await
            .unwrap();
        message_ids.push(alice_events.wait_sent(&id, WAIT).await.unwrap());
    }
    alice_chat.close().await.unwrap();
    cluster.restart().await;

    let (_b, bob_chat, mut bob_events) = cluster.connect(&cluster.reaim(&bob)).await;
    let received = bob_events.next_messages(20, WAIT).await.unwrap();
    let received_ids: Vec<u64> = received.iter().map(|message| message.message_id).collect();
    assert_eq!(received_ids, message_ids);
    bob_chat.mark_read(vec![message_ids[0]]).await.unwrap();

    // Alice was offline for all of it: her receipts were stored and arrive on connect.
    let (_a2, _alice_chat, mut alice_events) = cluster.connect(&cluster.reaim(&alice)).await;
    alice_events
        .wait_receipt(message_ids[0], TickStatus::Read, WAIT)
        .await
        .unwrap();
}
