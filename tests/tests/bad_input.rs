//! Bad input gets a precise status and harms no one else; raw streams start and end cleanly.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bluetick_client::{
    BluetickClient, ChatEvent, Content, DeviceAddress, TickStatus, new_device_token, register,
    register_with_token,
};
use bluetick_proto::gateway::v1::chat_client::ChatClient;
use bluetick_proto::gateway::v1::client_frame::Frame as ClientBody;
use bluetick_proto::gateway::v1::gateway_internal_client::GatewayInternalClient;
use bluetick_proto::gateway::v1::server_frame::Frame;
use bluetick_proto::gateway::v1::{
    ClientFrame, DeliverRequest, DevicePayload, SendMessage, ServerFrame,
};
use bluetick_tests::{TestCluster, WAIT};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request};

/// Opens a raw chat stream with an optional `authorization` value and `extra` metadata.
async fn raw_open(
    gateway: &str,
    authorization: Option<&str>,
    extra: &[(&'static str, &str)],
) -> Result<(mpsc::Sender<ClientFrame>, tonic::Streaming<ServerFrame>), tonic::Status> {
    let mut client = ChatClient::connect(gateway.to_string())
        .await
        .expect("gateway reachable");
    let (sender, receiver) = mpsc::channel(16);
    let mut request = Request::new(ReceiverStream::new(receiver));
    let pairs = authorization
        .map(|value| ("authorization", value))
        .into_iter()
        .chain(extra.iter().copied());
    for (key, value) in pairs {
        request
            .metadata_mut()
            .insert(key, value.parse().expect("ascii header"));
    }
    let response = client.open(request).await?;
    Ok((sender, response.into_inner()))
}

/// Opens a raw chat stream with `token` (and `extra` metadata) and reads it up to the device
/// being live: the welcome, then the end of its (empty) backlog.
async fn raw_open_live(
    gateway: &str,
    token: &str,
    extra: &[(&'static str, &str)],
) -> (mpsc::Sender<ClientFrame>, tonic::Streaming<ServerFrame>) {
    let (sender, mut stream) = raw_open(gateway, Some(&format!("Bearer {token}")), extra)
        .await
        .unwrap();
    assert!(matches!(next_frame(&mut stream).await, Frame::Welcome(_)));
    assert!(matches!(
        next_frame(&mut stream).await,
        Frame::BacklogDone(_)
    ));
    (sender, stream)
}

/// A send of `text` to every device of `recipient_user_id`.
fn text_send(client_msg_id: &str, recipient_user_id: &str, text: &str) -> ClientFrame {
    ClientFrame {
        frame: Some(ClientBody::Send(SendMessage {
            client_msg_id: client_msg_id.into(),
            recipient_user_id: recipient_user_id.into(),
            payloads: vec![DevicePayload {
                device_id: 0,
                payload: Content::text(text).encode(),
            }],
        })),
    }
}

async fn next_frame(stream: &mut tonic::Streaming<ServerFrame>) -> Frame {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("no frame in time")
        .expect("stream failed")
        .expect("stream ended")
        .frame
        .expect("empty server frame")
}

/// Missing, malformed and unknown tokens are refused with UNAUTHENTICATED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_valid_token_are_unauthenticated() {
    let cluster = TestCluster::start().await;
    let gateway = &cluster.endpoints.gateway;
    for authorization in [None, Some("Basic abc"), Some("Bearer not-a-real-token")] {
        let status = raw_open(gateway, authorization, &[]).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "{authorization:?}: {status}"
        );
    }
    let mut forged = cluster.user("mallory").await;
    forged.token = "0".repeat(64);
    let client = BluetickClient::new(forged).unwrap();
    assert_eq!(
        client.last_seen("anyone").await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        client.add_device().await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

/// Headers far larger than the HTTP/2 codec's initial buffers (1 KiB for frames, 256 bytes
/// for HPACK strings: `third_party/h2`) are read whole: a 12 KiB token is refused as a
/// token, not as a broken stream, and a valid call carrying 12 KiB of other metadata works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_larger_than_the_codec_buffers_are_read_whole() {
    let cluster = TestCluster::start().await;
    let gateway = &cluster.endpoints.gateway;
    let huge_token = format!("Bearer {}", "x".repeat(12 * 1024));
    let status = raw_open(gateway, Some(&huge_token), &[]).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");

    let alice = cluster.user("alice").await;
    let padding = "p".repeat(12 * 1024);
    raw_open_live(gateway, &alice.token, &[("x-padding", &padding)]).await;
}

/// Registration checks the handle and refuses a taken one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_validates_handles() {
    let cluster = TestCluster::start().await;
    let (gateway, media) = (&cluster.endpoints.gateway, &cluster.endpoints.media);
    let bad = register(gateway, media, "Not Valid!", "x")
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let dana = format!("dana{}", rand::random::<u32>());
    register(gateway, media, &dana, "Dana").await.unwrap();
    let taken = register(gateway, media, &dana, "Other").await.unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists);

    // A registration repeated with its token (its answer was lost) answers like the first;
    // anyone else's token still finds the handle taken.
    let erin = format!("erin{}", rand::random::<u32>());
    let token = new_device_token();
    let first = register_with_token(gateway, media, &erin, "Erin", &token)
        .await
        .unwrap();
    let again = register_with_token(gateway, media, &erin, "Erin", &token)
        .await
        .unwrap();
    assert_eq!((again.device_id, &again.token), (1, &first.token));
    // The token works: the device adds a second one.
    let second = BluetickClient::new(again)
        .unwrap()
        .add_device()
        .await
        .unwrap();
    assert_eq!(second.device_id, 2);
    let other = register_with_token(gateway, media, &erin, "Erin", &new_device_token())
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists);
    let weak = register_with_token(gateway, media, "frank_weak", "F", "short")
        .await
        .unwrap_err();
    assert_eq!(weak.code(), Code::InvalidArgument);
}

/// Unknown recipients, oversize payloads, empty frames, foreign acks and internal calls on
/// the public port each get their own status, and A → B traffic carries on throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_precise_errors_and_harm_no_one_else() {
    let cluster = TestCluster::start().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let carol = cluster.user("carol").await;
    let (_a, alice_chat, mut alice_events) = cluster.connect(&alice).await;
    let (_b, _bob_chat, mut bob_events) = cluster.connect(&bob).await;

    // Unknown recipient.
    let id = alice_chat.send("no-such-user", "hi").await.unwrap();
    let error = alice_events.wait_sent(&id, WAIT).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound);

    // Oversize payload (limit 64 KiB): refused; exactly the limit is fine.
    let limit = cluster.config.max_payload_bytes;
    let id = alice_chat
        .send(&bob.user_id, vec![7u8; limit + 1])
        .await
        .unwrap();
    let error = alice_events.wait_sent(&id, WAIT).await.unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted);
    let id = alice_chat
        .send(&bob.user_id, vec![7u8; limit])
        .await
        .unwrap();
    let big_id = alice_events.wait_sent(&id, WAIT).await.unwrap();
    assert_eq!(
        bob_events.next_message(WAIT).await.unwrap().message_id,
        big_id
    );

    // A raw stream of carol's: an empty frame, then a foreign ack, then a valid send.
    let (carol_tx, mut carol_rx) =
        raw_open_live(&cluster.endpoints.gateway, &carol.token, &[]).await;
    carol_tx.send(ClientFrame { frame: None }).await.unwrap();
    match next_frame(&mut carol_rx).await {
        Frame::Error(error) => assert_eq!(error.code, Code::InvalidArgument as i32),
        other => panic!("unexpected {other:?}"),
    }
    // Carol acknowledges alice's message to bob, and an id that does not exist.
    carol_tx
        .send(ClientFrame {
            frame: Some(ClientBody::Ack(bluetick_proto::gateway::v1::Acknowledge {
                status: TickStatus::Read as i32,
                message_ids: vec![big_id, 42],
            })),
        })
        .await
        .unwrap();
    let mut codes = Vec::new();
    for _ in 0..2 {
        match next_frame(&mut carol_rx).await {
            Frame::Error(error) => codes.push((error.code, error.message_ids)),
            other => panic!("unexpected {other:?}"),
        }
    }
    codes.sort();
    assert_eq!(
        codes,
        vec![
            (Code::NotFound as i32, vec![42]),
            (Code::PermissionDenied as i32, vec![big_id]),
        ]
    );
    // The stream is still open: carol can send, and bob sees carol as the sender.
    carol_tx
        .send(text_send("carol-1", &bob.user_id, "from carol"))
        .await
        .unwrap();
    match next_frame(&mut carol_rx).await {
        Frame::SendAccepted(accepted) => assert_eq!(accepted.client_msg_id, "carol-1"),
        other => panic!("unexpected {other:?}"),
    }
    let from_carol = bob_events.next_message(WAIT).await.unwrap();
    assert_eq!(
        from_carol.sender,
        Some(DeviceAddress::new(carol.user_id.clone(), 1))
    );

    // Carol's foreign READ did not tick alice's message: alice sees only bob's DELIVERED.
    alice_events
        .wait_receipt(big_id, TickStatus::Delivered, WAIT)
        .await
        .unwrap();
    let read = alice_events
        .next_event_matching(
            |event| {
                matches!(
                    event,
                    ChatEvent::Receipt {
                        status: TickStatus::Read,
                        ..
                    }
                )
            },
            Duration::from_millis(500),
        )
        .await;
    assert!(read.is_err(), "foreign ack produced a blue tick: {read:?}");

    // The internal API is not served on the public port.
    let mut internal = GatewayInternalClient::connect(cluster.endpoints.gateway.clone())
        .await
        .unwrap();
    let status = internal
        .deliver(DeliverRequest { deliveries: vec![] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);

    // After all that, alice and bob still chat.
    let id = alice_chat.send(&bob.user_id, "still here").await.unwrap();
    let last_id = alice_events.wait_sent(&id, WAIT).await.unwrap();
    assert_eq!(
        bob_events.next_message(WAIT).await.unwrap().message_id,
        last_id
    );
}

/// Per-device payloads must match the recipient's devices; a mismatch returns the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_device_sends_must_match_the_recipients_devices() {
    let cluster = TestCluster::start().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let (_a, alice_chat, mut alice_events) = cluster.connect(&alice).await;
    let id = alice_chat
        .send_to_devices(&bob.user_id, vec![(1, "one".into()), (2, "two".into())])
        .await
        .unwrap();
    match alice_events
        .next_event_matching(
            |event| matches!(event, ChatEvent::SendFailed { .. } | ChatEvent::Sent { .. }),
            WAIT,
        )
        .await
        .unwrap()
    {
        ChatEvent::SendFailed {
            client_msg_id,
            code,
            recipient_device_ids,
            ..
        } => {
            assert_eq!(client_msg_id, id);
            assert_eq!(code, Code::FailedPrecondition);
            assert_eq!(recipient_device_ids, vec![1]);
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// A device that half-closes its stream (what the SDK's graceful close does) gets the
/// replies to what it sent before closing, then the end of the response stream with OK,
/// and goes offline; the stream is not left open until the client gives up on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_stream_gets_its_replies_then_ends_with_ok() {
    let cluster = TestCluster::start().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let (alice_client, _alice_chat, _alice_events) = cluster.connect(&alice).await;
    let (bob_tx, mut bob_rx) = raw_open_live(&cluster.endpoints.gateway, &bob.token, &[]).await;

    bob_tx
        .send(text_send("last-words", &alice.user_id, "bye"))
        .await
        .unwrap();
    drop(bob_tx);

    match next_frame(&mut bob_rx).await {
        Frame::SendAccepted(accepted) => assert_eq!(accepted.client_msg_id, "last-words"),
        other => panic!("unexpected {other:?}"),
    }
    let end = tokio::time::timeout(WAIT, bob_rx.message())
        .await
        .expect("the response stream stayed open after the half-close");
    assert!(matches!(end, Ok(None)), "stream ended with {end:?}");
    assert!(
        bluetick_tests::eventually(WAIT, || async {
            !alice_client.last_seen(&bob.user_id).await.unwrap().online
        })
        .await,
        "bob still online after closing"
    );
}

/// Messaging records a whole accepted batch with ack in one `RecordSent`: every message of it
/// is recorded, a repeat is harmless, and a bad entry refuses the call naming its index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_sent_records_a_whole_batch_and_names_a_bad_entry() {
    use bluetick_proto::ack::v1::ack_client::AckClient;
    use bluetick_proto::ack::v1::{GetStatusRequest, RecordSentRequest, SentMessage};
    use bluetick_proto::common::v1::DeviceAddress as WireDevice;

    let mut cluster = TestCluster::start().await;
    let mut ack = AckClient::connect(cluster.endpoints.ack.clone())
        .await
        .unwrap();
    let sender = WireDevice {
        user_id: "batch-sender".into(),
        device_id: 1,
    };
    let message = |message_id: u64| SentMessage {
        message_id,
        sender: Some(sender.clone()),
        recipient_user_id: "batch-recipient".into(),
        recipient_device_ids: vec![1, 2],
        sent_at_ms: bluetick_tests::now_ms(),
    };
    let batch: Vec<SentMessage> = (101..=103).map(message).collect();
    for _ in 0..2 {
        ack.record_sent(RecordSentRequest {
            messages: batch.clone(),
        })
        .await
        .unwrap();
    }
    let ticks = ack
        .get_status(GetStatusRequest {
            sender: Some(sender.clone()),
            message_ids: vec![101, 102, 103],
        })
        .await
        .unwrap()
        .into_inner()
        .ticks;
    let mut recorded: Vec<(u64, u32, i32)> = ticks
        .iter()
        .map(|tick| (tick.message_id, tick.recipient_device_id, tick.status))
        .collect();
    recorded.sort_unstable();
    let sent = TickStatus::Sent as i32;
    let expected: Vec<(u64, u32, i32)> = (101..=103)
        .flat_map(|id| [(id, 1, sent), (id, 2, sent)])
        .collect();
    assert_eq!(recorded, expected, "every message of the batch, once");

    let mut bad = message(105);
    bad.recipient_device_ids.clear();
    let status = ack
        .record_sent(RecordSentRequest {
            messages: vec![message(104), bad],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("messages[1]"), "{status:?}");
    let status = ack
        .record_sent(RecordSentRequest { messages: vec![] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    cluster.stop().await;
}
