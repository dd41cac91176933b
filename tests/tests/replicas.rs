//! Services wired by hand on loopback (`bluetick-dev` runs one of each), to take presence
//! replicas away and back: what happens to a message located while presence had no route
//! for its recipient.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bluetick_client::{
    BluetickClient, ChatConfig, ChatEvent, ChatEvents, ChatHandle, Credentials, register,
};
use bluetick_common::server::listen;
use bluetick_proto::presence::v1::LocateRequest;
use bluetick_proto::presence::v1::presence_client::PresenceClient;
use bluetick_tests::WAIT;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const HEARTBEAT: Duration = Duration::from_secs(2);

async fn loopback() -> (TcpListener, SocketAddr) {
    let listener = listen("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    (listener, address)
}

fn url(address: SocketAddr) -> String {
    format!("http://{address}")
}

/// Gateway, messaging and ack, each one instance; presence instances are started and
/// stopped by the test, and ack can be stopped and started again.
struct Cluster {
    data: tempfile::TempDir,
    shutdown: CancellationToken,
    gateway_url: String,
    ack_address: SocketAddr,
    ack_presence: SocketAddr,
    ack_run: Option<(CancellationToken, JoinHandle<()>)>,
}

impl Cluster {
    /// Starts the services: ack tells `ack_presence`, messaging looks recipients up on
    /// `messaging_presence`, the gateway reports to every presence in `gateway_presence`.
    async fn start(
        ack_presence: SocketAddr,
        messaging_presence: SocketAddr,
        gateway_presence: &[SocketAddr],
    ) -> Self {
        let data = tempfile::tempdir().unwrap();
        let store = |name: &str| data.path().join(name).to_string_lossy().into_owned();
        let shutdown = CancellationToken::new();
        let (gateway_listener, gateway_address) = loopback().await;
        let (internal_listener, _) = loopback().await;
        let (messaging_listener, messaging_address) = loopback().await;
        let (ack_listener, ack_address) = loopback().await;
        let mut messaging = bluetick_messaging::MessagingConfig::new(
            store("messaging"),
            url(ack_address),
            url(messaging_presence),
        );
        messaging.node_id = 1;
        tokio::spawn(bluetick_messaging::serve(
            messaging,
            messaging_listener,
            shutdown.child_token(),
        ));
        let presence_urls: Vec<String> = gateway_presence.iter().map(|a| url(*a)).collect();
        let mut gateway = bluetick_gateway::GatewayConfig::new(
            store("gateway"),
            url(messaging_address),
            url(ack_address),
            presence_urls.join(","),
        );
        gateway.heartbeat_interval = HEARTBEAT;
        tokio::spawn(bluetick_gateway::serve(
            gateway,
            gateway_listener,
            internal_listener,
            shutdown.child_token(),
        ));
        let mut cluster = Self {
            data,
            shutdown,
            gateway_url: url(gateway_address),
            ack_address,
            ack_presence,
            ack_run: None,
        };
        cluster.start_ack(ack_listener);
        cluster
    }

    /// Serves ack on `listener` (its store survives restarts).
    fn start_ack(&mut self, listener: TcpListener) {
        let mut ack = bluetick_ack::AckConfig::new(
            self.data.path().join("ack").to_string_lossy().into_owned(),
            url(self.ack_presence),
        );
        ack.node_id = 1;
        let stop = self.shutdown.child_token();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                bluetick_ack::serve(ack, listener, stop).await.unwrap();
            }
        });
        self.ack_run = Some((stop, task));
    }

    /// Stops ack and waits until it has closed its store.
    async fn stop_ack(&mut self) {
        if let Some((stop, task)) = self.ack_run.take() {
            stop.cancel();
            task.await.unwrap();
        }
    }

    /// Starts ack again on its address.
    async fn restart_ack(&mut self) {
        let listener = listen(self.ack_address).await.unwrap();
        self.start_ack(listener);
    }

    /// Serves a presence instance (its own store `name`) on `listener` until `stop`.
    fn presence(
        &self,
        name: &str,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        let mut config = bluetick_presence::PresenceConfig::new(
            self.data.path().join(name).to_string_lossy().into_owned(),
        );
        config.heartbeat_interval = HEARTBEAT;
        tokio::spawn(async move {
            bluetick_presence::serve(config, listener, stop)
                .await
                .unwrap();
        })
    }

    /// Registers a user and opens a chat session (each retried while the services start),
    /// once it is live.
    async fn connect(&self, name: &str) -> (Credentials, BluetickClient, ChatHandle, ChatEvents) {
        self.connect_with(name, ChatConfig::default()).await
    }

    /// As [`Cluster::connect`], with the SDK settings `config`.
    async fn connect_with(
        &self,
        name: &str,
        config: ChatConfig,
    ) -> (Credentials, BluetickClient, ChatHandle, ChatEvents) {
        let user_id = format!("{name}{}", rand::random::<u32>());
        let deadline = tokio::time::Instant::now() + WAIT;
        let credentials = loop {
            match register(&self.gateway_url, &self.gateway_url, &user_id, name).await {
                Ok(credentials) => break credentials,
                Err(error) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "register {name}: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let client = BluetickClient::new(credentials.clone()).unwrap();
        // The gateway learns within a probe interval that a replica it started without is up:
        // until then the attach finds none and the session is refused, as a device would be.
        let (chat, mut events) = loop {
            match client.open_chat(config.clone()).await {
                Ok(opened) => break opened,
                Err(error) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "open chat {name}: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        // Live: attached, backlog and stored receipts read.
        events
            .next_event_matching(|event| matches!(event, ChatEvent::BacklogDone { .. }), WAIT)
            .await
            .unwrap();
        (credentials, client, chat, events)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Asks the presence instance at `address` (waiting until it answers) for `user_id`'s routes.
async fn routes_of(address: SocketAddr, user_id: &str) -> usize {
    let mut client = loop {
        if let Ok(client) = PresenceClient::connect(url(address)).await {
            break client;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let request = LocateRequest {
        user_ids: vec![user_id.to_string()],
    };
    client
        .locate(request)
        .await
        .unwrap()
        .into_inner()
        .routes
        .len()
}

/// Sends `payload` to `recipient` and waits for its single tick (stored).
async fn send_stored(chat: &ChatHandle, events: &mut ChatEvents, recipient: &str, payload: &[u8]) {
    let client_msg_id = chat.send(recipient, payload.to_vec()).await.unwrap();
    events.wait_sent(&client_msg_id, WAIT).await.unwrap();
}

/// Waits for the next message and checks it is `payload`; `why` says what failed if none
/// comes.
async fn expect_message(events: &mut ChatEvents, payload: &[u8], why: &str) {
    let message = events.next_message(WAIT).await.expect(why);
    assert_eq!(&message.payload[..], payload);
}

/// Presence replica B is down while bob connects, so only replica A learns bob's route
/// (the attach counts as done when one replica took it). B then comes up and serves
/// messaging's lookups with no route for bob: alice's message is stored but pushed
/// nowhere. B's next heartbeat report from bob's gateway repairs the route and says so,
/// and the gateway sends bob his backlog again: the message arrives without a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_routed_by_a_replica_that_missed_the_attach_still_arrives() {
    let (presence_a, address_a) = loopback().await;
    // B's port, free until B starts: calls to it are refused meanwhile.
    let (presence_b, address_b) = loopback().await;
    drop(presence_b);
    let cluster = Cluster::start(address_a, address_b, &[address_a, address_b]).await;
    let _a = cluster.presence("presence-a", presence_a, cluster.shutdown.child_token());
    let (_, _alice_client, alice_chat, mut alice_events) = cluster.connect("alice").await;
    let (bob, _bob_client, _bob_chat, mut bob_events) = cluster.connect("bob").await;

    // B comes up knowing no route. A heartbeat report may reach it before the check (the
    // gateway reports every 2 s): then B starts afresh, its routes live in memory.
    let mut attempts = 0;
    let _b = loop {
        let presence_b = listen(address_b).await.unwrap();
        let stop = cluster.shutdown.child_token();
        let b = cluster.presence("presence-b", presence_b, stop.clone());
        if routes_of(address_b, &bob.user_id).await == 0 {
            break b;
        }
        attempts += 1;
        assert!(attempts < 5, "B always learned bob's route before the send");
        stop.cancel();
        b.await.unwrap();
    };

    send_stored(
        &alice_chat,
        &mut alice_events,
        &bob.user_id,
        b"routed nowhere",
    )
    .await;
    expect_message(
        &mut bob_events,
        b"routed nowhere",
        "the message arrives once B's route is repaired, without a reconnect",
    )
    .await;
}

/// With a single presence instance, a message sent while it is down is stored (nobody can
/// be located). When presence is back, its first heartbeat report from the gateway
/// rebuilds the routes and names them repaired, and the recipient gets the message
/// without reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_while_the_only_presence_was_down_arrives_after_it_restarts() {
    let (presence, address) = loopback().await;
    let cluster = Cluster::start(address, address, &[address]).await;
    let first_run = CancellationToken::new();
    let first = cluster.presence("presence", presence, first_run.clone());
    let (_, _alice_client, alice_chat, mut alice_events) = cluster.connect("alice").await;
    let (bob, _bob_client, _bob_chat, mut bob_events) = cluster.connect("bob").await;
    assert_eq!(routes_of(address, &bob.user_id).await, 1);

    first_run.cancel();
    first.await.unwrap();
    let payload = b"sent while presence was down";
    send_stored(&alice_chat, &mut alice_events, &bob.user_id, payload).await;

    let presence = listen(address).await.unwrap();
    let _second = cluster.presence("presence", presence, cluster.shutdown.child_token());
    expect_message(
        &mut bob_events,
        payload,
        "the message arrives once presence is back, without a reconnect",
    )
    .await;
}

/// Ack is down when alice sends her first message: messaging stores it but cannot record
/// it with ack, so its accept fails. Ack comes back and alice sends nine more at once. The
/// gateway keeps trying the first until it is accepted and holds the later ones behind it,
/// so bob gets all ten in the order alice typed them and alice's single ticks come back in
/// that order (answering the failure at once would let the nine overtake the device's own
/// resend of the first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_senders_messages_keep_their_order_across_an_ack_outage() {
    let (presence, address) = loopback().await;
    let mut cluster = Cluster::start(address, address, &[address]).await;
    let _presence = cluster.presence("presence", presence, cluster.shutdown.child_token());
    // Alice's SDK would resend a refused send only after 2-4 s: long after the nine.
    let alice_config = ChatConfig {
        backoff_initial: Duration::from_secs(4),
        ..ChatConfig::default()
    };
    let (_, _alice_client, alice_chat, mut alice_events) =
        cluster.connect_with("alice", alice_config).await;
    let (bob, _bob_client, _bob_chat, mut bob_events) = cluster.connect("bob").await;

    cluster.stop_ack().await;
    let count = 10;
    let mut sent = vec![alice_chat.send(&bob.user_id, b"0".to_vec()).await.unwrap()];
    // Long enough for the first attempts to fail.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.restart_ack().await;
    for seq in 1..count {
        let client_msg_id = alice_chat
            .send(&bob.user_id, format!("{seq}").into_bytes())
            .await
            .unwrap();
        sent.push(client_msg_id);
    }

    let mut ticked = Vec::new();
    while ticked.len() < count {
        let event = alice_events
            .next_event_matching(
                |event| matches!(event, ChatEvent::Sent { .. } | ChatEvent::SendFailed { .. }),
                WAIT,
            )
            .await
            .unwrap();
        match event {
            ChatEvent::Sent { client_msg_id, .. } => ticked.push(client_msg_id),
            other => panic!("a send failed: {other:?}"),
        }
    }
    assert_eq!(ticked, sent, "single ticks out of the order sent");
    let shown: Vec<String> = bob_events
        .next_messages(count, WAIT)
        .await
        .unwrap()
        .into_iter()
        .map(|message| String::from_utf8_lossy(&message.payload).into_owned())
        .collect();
    let expected: Vec<String> = (0..count).map(|seq| seq.to_string()).collect();
    assert_eq!(shown, expected, "bob saw alice's messages out of order");
}
