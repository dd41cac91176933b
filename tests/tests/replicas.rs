//! Services wired by hand on loopback (`bluetick-dev` runs one of each), to take presence
//! replicas away and back: what happens to a message located while presence had no route
//! for its recipient.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bluetick_client::{BluetickClient, ChatEvents, ChatHandle, Credentials, register};
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
/// stopped by the test.
struct Cluster {
    data: tempfile::TempDir,
    shutdown: CancellationToken,
    gateway_url: String,
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
        let mut ack = bluetick_ack::AckConfig::new(store("ack"), url(ack_presence));
        ack.node_id = 1;
        tokio::spawn(bluetick_ack::serve(
            ack,
            ack_listener,
            shutdown.child_token(),
        ));
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
        Self {
            data,
            shutdown,
            gateway_url: url(gateway_address),
        }
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

    /// Registers a user (retrying while the services start) and opens a chat session.
    async fn connect(&self, name: &str) -> (Credentials, BluetickClient, ChatHandle, ChatEvents) {
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
        let (chat, events) = client.open_chat(Default::default()).await.unwrap();
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

    // B comes up knowing no route.
    let presence_b = listen(address_b).await.unwrap();
    let _b = cluster.presence("presence-b", presence_b, cluster.shutdown.child_token());
    assert_eq!(
        routes_of(address_b, &bob.user_id).await,
        0,
        "B knows bob already"
    );

    let sent = alice_chat
        .send(&bob.user_id, b"routed nowhere".to_vec())
        .await
        .unwrap();
    alice_events.wait_sent(&sent, WAIT).await.unwrap();
    let message = bob_events
        .next_message(WAIT)
        .await
        .expect("the message arrives once B's route is repaired, without a reconnect");
    assert_eq!(&message.payload[..], b"routed nowhere");
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
    let sent = alice_chat
        .send(&bob.user_id, b"sent while presence was down".to_vec())
        .await
        .unwrap();
    alice_events.wait_sent(&sent, WAIT).await.unwrap();

    let presence = listen(address).await.unwrap();
    let _second = cluster.presence("presence", presence, cluster.shutdown.child_token());
    let message = bob_events
        .next_message(WAIT)
        .await
        .expect("the message arrives once presence is back, without a reconnect");
    assert_eq!(&message.payload[..], b"sent while presence was down");
}
