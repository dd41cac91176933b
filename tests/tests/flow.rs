//! Flow control and ephemeral signals: slow devices are cut off, typing is relayed.

#![allow(clippy::unwrap_used)]

use bluetick_client::{ChatConfig, ChatEvent, DeviceAddress};
use bluetick_proto::gateway::v1::chat_client::ChatClient;
use bluetick_proto::gateway::v1::client_frame::Frame as ClientBody;
use bluetick_proto::gateway::v1::{ClientFrame, Heartbeat};
use bluetick_tests::{TestCluster, WAIT};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request};

/// A device that stops reading its stream is disconnected with RESOURCE_EXHAUSTED once its
/// bounded queue fills; the sender is unaffected and the messages wait in the inbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_does_not_read_is_disconnected_not_buffered() {
    let cluster = TestCluster::start().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let total = 2_000;
    // Alice reads her events only after sending: her event buffer must hold a tick for
    // each send, or her session waits for her to read (events are bounded too).
    let alice_config = ChatConfig {
        event_buffer: 2 * total,
        ..ChatConfig::default()
    };
    let (_a, alice_chat, mut alice_events) = cluster.connect_with(&alice, alice_config).await;

    // Bob opens a raw stream and never reads it.
    let mut client = ChatClient::connect(cluster.endpoints.gateway.clone())
        .await
        .unwrap();
    let (frames, receiver) = mpsc::channel::<ClientFrame>(1);
    // It keeps heartbeating, so only the full queue can end it.
    let heartbeats = tokio::spawn(async move {
        loop {
            let beat = ClientFrame {
                frame: Some(ClientBody::Heartbeat(Heartbeat {})),
            };
            if frames.send(beat).await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    });
    let mut request = Request::new(ReceiverStream::new(receiver));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", bob.token).parse().unwrap(),
    );
    let mut bob_stream = client.open(request).await.unwrap().into_inner();

    let payload = vec![b'x'; 8 * 1024];
    let mut last = String::new();
    for _ in 0..total {
        last = alice_chat
            .send(&bob.user_id, payload.clone())
            .await
            .unwrap();
    }
    alice_events.wait_sent(&last, WAIT).await.unwrap();

    // Reading now: some frames, then the stream ends with RESOURCE_EXHAUSTED.
    let mut frames = 0;
    let status = loop {
        match tokio::time::timeout(WAIT, bob_stream.message())
            .await
            .unwrap()
        {
            Ok(Some(_)) => frames += 1,
            Ok(None) => panic!("stream ended without an error after {frames} frames"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    heartbeats.abort();
    assert!(frames < total, "every frame was buffered: {frames}");

    // Nothing was lost: bob reconnects and gets all of them.
    let (_b, _bob_chat, mut bob_events) = cluster.connect(&bob).await;
    let messages = bob_events.next_messages(total, 3 * WAIT).await.unwrap();
    assert_eq!(messages.len(), total);
}

/// Typing notices reach the recipient's connected devices and name the typing device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_is_relayed() {
    let cluster = TestCluster::start().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let (_a, alice_chat, _alice_events) = cluster.connect(&alice).await;
    let (_b, _bob_chat, mut bob_events) = cluster.connect(&bob).await;
    alice_chat.typing(&bob.user_id, true).await.unwrap();
    match bob_events
        .next_event_matching(|event| matches!(event, ChatEvent::Typing(_)), WAIT)
        .await
        .unwrap()
    {
        ChatEvent::Typing(typing) => {
            assert!(typing.active);
            assert_eq!(
                typing.sender,
                Some(DeviceAddress::new(alice.user_id.clone(), 1))
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}
