//! The chat session against a scripted fake gateway: auth metadata, heartbeats, dedup with
//! re-acknowledgement, resend after reconnect, receipt confirmation and graceful close.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bluetick_client::proto::common::v1::{DeviceAddress, InboundMessage, Receipt, TickStatus};
use bluetick_client::proto::gateway::v1::chat_server::{Chat, ChatServer};
use bluetick_client::proto::gateway::v1::client_frame::Frame as ClientBody;
use bluetick_client::proto::gateway::v1::server_frame::Frame as ServerBody;
use bluetick_client::proto::gateway::v1::{
    BacklogDone, ClientFrame, FrameError, SendAccepted, ServerFrame, Welcome,
};
use bluetick_client::{BluetickClient, ChatConfig, ChatEvent, ClientError, Credentials};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

type Outbound = mpsc::Sender<Result<ServerFrame, Status>>;

/// One stream the fake gateway accepted, handed to the test to drive.
struct FakeConnection {
    authorization: String,
    inbound: Streaming<ClientFrame>,
    outbound: Outbound,
}

struct FakeGateway {
    connections: mpsc::Sender<FakeConnection>,
}

#[tonic::async_trait]
impl Chat for FakeGateway {
    type OpenStream = ReceiverStream<Result<ServerFrame, Status>>;

    async fn open(
        &self,
        request: Request<Streaming<ClientFrame>>,
    ) -> Result<Response<Self::OpenStream>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if authorization != "Bearer good-token" {
            return Err(Status::unauthenticated("unknown token"));
        }
        let (outbound, outbound_rx) = mpsc::channel(64);
        let connection = FakeConnection {
            authorization,
            inbound: request.into_inner(),
            outbound,
        };
        self.connections
            .send(connection)
            .await
            .map_err(|_| Status::internal("test gone"))?;
        Ok(Response::new(ReceiverStream::new(outbound_rx)))
    }
}

async fn start_fake_gateway() -> (String, mpsc::Receiver<FakeConnection>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (connections_tx, connections_rx) = mpsc::channel(8);
    let gateway = FakeGateway {
        connections: connections_tx,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ChatServer::new(gateway))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (format!("http://{address}"), connections_rx)
}

fn credentials(gateway_url: &str, token: &str) -> Credentials {
    Credentials {
        gateway_url: gateway_url.to_string(),
        media_url: gateway_url.to_string(),
        user_id: "alice".into(),
        device_id: 1,
        token: token.into(),
    }
}

fn test_config() -> ChatConfig {
    ChatConfig {
        heartbeat_interval_override_opt: Some(Duration::from_millis(50)),
        ack_flush_interval: Duration::from_millis(5),
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        close_timeout: Duration::from_millis(500),
        ..ChatConfig::default()
    }
}

fn server_frame(body: ServerBody) -> Result<ServerFrame, Status> {
    Ok(ServerFrame { frame: Some(body) })
}

fn welcome() -> Result<ServerFrame, Status> {
    server_frame(ServerBody::Welcome(Welcome {
        device: Some(DeviceAddress::new("alice", 1)),
        heartbeat_interval_ms: 5000,
        max_payload_bytes: 65536,
    }))
}

fn inbound_message(message_id: u64) -> Result<ServerFrame, Status> {
    server_frame(ServerBody::Message(InboundMessage {
        message_id,
        sender: Some(DeviceAddress::new("bob", 1)),
        sent_at_ms: 1,
        payload: bytes::Bytes::from_static(b"{\"text\":\"hi\"}"),
        recipient_device_id: 1,
    }))
}

/// Reads client frames until one (other than a heartbeat) matches, within a second.
async fn next_client_frame(
    inbound: &mut Streaming<ClientFrame>,
    mut wanted: impl FnMut(&ClientBody) -> bool,
) -> ClientBody {
    tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let frame = inbound.message().await.unwrap().expect("stream ended");
            let body = frame.frame.expect("empty frame");
            if wanted(&body) {
                return body;
            }
        }
    })
    .await
    .expect("expected client frame did not come")
}

/// The whole life of a session: auth, heartbeats, dedup, resend after a reconnect, receipt
/// confirmation, read acknowledgement and graceful close.
#[tokio::test]
async fn session_survives_a_reconnect_without_losing_or_duplicating_anything() {
    let (url, mut connections) = start_fake_gateway().await;
    let client = BluetickClient::new(credentials(&url, "good-token")).unwrap();
    let opening = tokio::spawn(async move { client.open_chat(test_config()).await });
    let mut first = connections.recv().await.unwrap();
    assert_eq!(first.authorization, "Bearer good-token");
    first.outbound.send(welcome()).await.unwrap();
    let (chat, mut events) = opening.await.unwrap().unwrap();
    assert_eq!(chat.device(), &DeviceAddress::new("alice", 1));
    let timeout = Duration::from_secs(2);
    assert!(matches!(
        events.next_event(timeout).await.unwrap(),
        ChatEvent::Connected { reconnects: 0, .. }
    ));

    // Heartbeats flow at the configured interval.
    next_client_frame(&mut first.inbound, |body| {
        matches!(body, ClientBody::Heartbeat(_))
    })
    .await;

    // A duplicate is shown once, acknowledged, and re-acknowledged on redelivery.
    first.outbound.send(inbound_message(1)).await.unwrap();
    first.outbound.send(inbound_message(1)).await.unwrap();
    first
        .outbound
        .send(server_frame(ServerBody::BacklogDone(BacklogDone {
            messages: 2,
            receipts: 0,
        })))
        .await
        .unwrap();
    assert_eq!(events.next_message(timeout).await.unwrap().message_id, 1);
    assert!(matches!(
        events.next_event(timeout).await.unwrap(),
        ChatEvent::BacklogDone { messages: 2, .. }
    ));
    let mut delivered_acks = 0;
    while delivered_acks < 2 {
        if let ClientBody::Ack(ack) = next_client_frame(&mut first.inbound, |body| {
            matches!(body, ClientBody::Ack(_))
        })
        .await
        {
            assert_eq!(ack.status, TickStatus::Delivered as i32);
            delivered_acks += ack.message_ids.iter().filter(|id| **id == 1).count();
        }
    }

    // A send the server does not answer before the stream breaks is re-sent afterwards.
    let client_msg_id = chat.send("bob", &b"payload"[..]).await.unwrap();
    let ClientBody::Send(sent) = next_client_frame(&mut first.inbound, |body| {
        matches!(body, ClientBody::Send(_))
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(sent.client_msg_id, client_msg_id);
    assert_eq!(sent.payloads[0].device_id, 0);
    first
        .outbound
        .send(Err(Status::unavailable("gateway restarting")))
        .await
        .unwrap();
    drop(first);
    assert!(matches!(
        events.next_event(timeout).await.unwrap(),
        ChatEvent::Disconnected {
            error: ClientError::Unavailable(_),
            ..
        }
    ));
    assert!(!chat.is_connected());

    let mut second = connections.recv().await.unwrap();
    second.outbound.send(welcome()).await.unwrap();
    let ClientBody::Send(resent) = next_client_frame(&mut second.inbound, |body| {
        matches!(body, ClientBody::Send(_))
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(
        resent.client_msg_id, client_msg_id,
        "same id, so the server dedups"
    );
    second
        .outbound
        .send(server_frame(ServerBody::SendAccepted(SendAccepted {
            client_msg_id: client_msg_id.clone(),
            message_id: 42,
            sent_at_ms: 2,
            duplicate: true,
        })))
        .await
        .unwrap();
    assert_eq!(events.wait_sent(&client_msg_id, timeout).await.unwrap(), 42);
    chat.wait_connected(timeout).await.unwrap();

    // Redelivery after the reconnect is not shown again.
    second.outbound.send(inbound_message(1)).await.unwrap();
    second.outbound.send(inbound_message(2)).await.unwrap();
    assert_eq!(events.next_message(timeout).await.unwrap().message_id, 2);

    // Receipts are reported and confirmed.
    second
        .outbound
        .send(server_frame(ServerBody::Receipt(Receipt {
            receipt_id: 9,
            message_id: 42,
            recipient: Some(DeviceAddress::new("bob", 1)),
            status: TickStatus::Read as i32,
            at_ms: 3,
        })))
        .await
        .unwrap();
    let recipient = events
        .wait_receipt(42, TickStatus::Delivered, timeout)
        .await
        .unwrap();
    assert_eq!(recipient, DeviceAddress::new("bob", 1));
    let ClientBody::ConfirmReceipts(confirm) = next_client_frame(&mut second.inbound, |body| {
        matches!(body, ClientBody::ConfirmReceipts(_))
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(confirm.receipt_ids, vec![9]);

    // mark_read sends a READ acknowledgement.
    chat.mark_read(vec![1, 2]).await.unwrap();
    let ClientBody::Ack(read) = next_client_frame(
        &mut second.inbound,
        |body| matches!(body, ClientBody::Ack(ack) if ack.status == TickStatus::Read as i32),
    )
    .await
    else {
        unreachable!()
    };
    assert_eq!(read.message_ids, vec![1, 2]);

    // close() half-closes the stream and reports the end.
    let closing = tokio::spawn({
        let chat = chat.clone();
        async move { chat.close().await }
    });
    tokio::time::timeout(timeout, async {
        while let Ok(Some(_)) = second.inbound.message().await {}
    })
    .await
    .expect("client did not half-close");
    drop(second);
    closing.await.unwrap().unwrap();
    assert!(matches!(
        events.next_event(timeout).await.unwrap(),
        ChatEvent::Closed { error_opt: None }
    ));
    assert!(matches!(
        chat.send("bob", &b"late"[..]).await,
        Err(ClientError::Closed)
    ));
}

/// Acknowledgements the gateway refuses with UNAVAILABLE (receipts not recorded) are written
/// again, with the newest state the application gave, and are not reported as errors.
#[tokio::test]
async fn refused_acknowledgements_are_written_again() {
    let (url, mut connections) = start_fake_gateway().await;
    let client = BluetickClient::new(credentials(&url, "good-token")).unwrap();
    let opening = tokio::spawn(async move { client.open_chat(test_config()).await });
    let mut connection = connections.recv().await.unwrap();
    connection.outbound.send(welcome()).await.unwrap();
    let (chat, mut events) = opening.await.unwrap().unwrap();
    let timeout = Duration::from_secs(2);
    for message_id in [1, 2] {
        connection
            .outbound
            .send(inbound_message(message_id))
            .await
            .unwrap();
        assert_eq!(
            events.next_message(timeout).await.unwrap().message_id,
            message_id
        );
    }
    let is_ack = |status: TickStatus| move |body: &ClientBody| matches!(body, ClientBody::Ack(ack) if ack.status == status as i32);
    let mut delivered = Vec::new();
    while delivered.len() < 2 {
        if let ClientBody::Ack(ack) =
            next_client_frame(&mut connection.inbound, is_ack(TickStatus::Delivered)).await
        {
            delivered.extend(ack.message_ids);
        }
    }
    // Message 2 is read before the refusal comes back: its retry is a READ.
    chat.mark_read(vec![2]).await.unwrap();
    next_client_frame(&mut connection.inbound, is_ack(TickStatus::Read)).await;
    connection
        .outbound
        .send(server_frame(ServerBody::Error(FrameError {
            code: tonic::Code::Unavailable as i32,
            message: "receipts not recorded, send them again".into(),
            message_ids: vec![1, 2],
        })))
        .await
        .unwrap();
    let mut again_delivered = Vec::new();
    let mut again_read = Vec::new();
    tokio::time::timeout(timeout, async {
        while again_delivered.is_empty() || again_read.is_empty() {
            let frame = connection.inbound.message().await.unwrap().unwrap();
            if let Some(ClientBody::Ack(ack)) = frame.frame {
                if ack.status == TickStatus::Read as i32 {
                    again_read.extend(ack.message_ids);
                } else {
                    again_delivered.extend(ack.message_ids);
                }
            }
        }
    })
    .await
    .expect("refused acknowledgements were not written again");
    assert_eq!(again_delivered, vec![1]);
    assert_eq!(again_read, vec![2]);
    // The refusal was handled, not surfaced.
    assert!(events.next_event(Duration::from_millis(100)).await.is_err());
}

/// A refused token fails open_chat with a typed, non-retryable error.
#[tokio::test]
async fn a_bad_token_is_unauthenticated() {
    let (url, _connections) = start_fake_gateway().await;
    let client = BluetickClient::new(credentials(&url, "bad-token")).unwrap();
    let error = client.open_chat(test_config()).await.unwrap_err();
    assert!(
        matches!(error, ClientError::Unauthenticated(_)),
        "{error:?}"
    );
    assert!(!error.is_retryable());
}

/// An unreachable gateway fails open_chat as retryable.
#[tokio::test]
async fn an_unreachable_gateway_is_unavailable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let client = BluetickClient::new(credentials(&url, "good-token")).unwrap();
    let error = client.open_chat(test_config()).await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
}
