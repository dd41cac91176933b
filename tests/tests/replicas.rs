//! Services with several replicas, wired by hand on loopback (`bluetick-dev` runs one of
//! each): what happens when one replica misses a call the others took.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bluetick_client::register;
use bluetick_common::server::listen;
use bluetick_proto::presence::v1::LocateRequest;
use bluetick_proto::presence::v1::presence_client::PresenceClient;
use bluetick_tests::WAIT;
use tokio::net::TcpListener;
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

/// Presence replica B is down while bob connects, so only replica A learns bob's route
/// (the attach counts as done when one replica took it). B then comes up and serves
/// messaging's lookups with no route for bob: alice's message is stored but pushed
/// nowhere. B's next heartbeat report from bob's gateway repairs the route and says so,
/// and the gateway sends bob his backlog again: the message arrives without a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_routed_by_a_replica_that_missed_the_attach_still_arrives() {
    let data = tempfile::tempdir().unwrap();
    let store = |name: &str| data.path().join(name).to_string_lossy().into_owned();
    let shutdown = CancellationToken::new();
    let (gateway_listener, gateway_address) = loopback().await;
    let (internal_listener, _) = loopback().await;
    let (messaging_listener, messaging_address) = loopback().await;
    let (ack_listener, ack_address) = loopback().await;
    let (presence_a_listener, presence_a_address) = loopback().await;
    // B's port, free until B starts: calls to it are refused meanwhile.
    let (presence_b_listener, presence_b_address) = loopback().await;
    drop(presence_b_listener);

    let mut presence_a = bluetick_presence::PresenceConfig::new(store("presence-a"));
    presence_a.heartbeat_interval = HEARTBEAT;
    tokio::spawn(bluetick_presence::serve(
        presence_a,
        presence_a_listener,
        shutdown.child_token(),
    ));
    let mut ack = bluetick_ack::AckConfig::new(store("ack"), url(presence_a_address));
    ack.node_id = 1;
    tokio::spawn(bluetick_ack::serve(
        ack,
        ack_listener,
        shutdown.child_token(),
    ));
    // Messaging looks recipients up on replica B only.
    let mut messaging = bluetick_messaging::MessagingConfig::new(
        store("messaging"),
        url(ack_address),
        url(presence_b_address),
    );
    messaging.node_id = 1;
    tokio::spawn(bluetick_messaging::serve(
        messaging,
        messaging_listener,
        shutdown.child_token(),
    ));
    let mut gateway = bluetick_gateway::GatewayConfig::new(
        store("gateway"),
        url(messaging_address),
        url(ack_address),
        format!("{},{}", url(presence_a_address), url(presence_b_address)),
    );
    gateway.heartbeat_interval = HEARTBEAT;
    tokio::spawn(bluetick_gateway::serve(
        gateway,
        gateway_listener,
        internal_listener,
        shutdown.child_token(),
    ));

    let gateway_url = url(gateway_address);
    let mut registered = Vec::new();
    for name in ["alice", "bob"] {
        let user_id = format!("{name}{}", rand::random::<u32>());
        let deadline = tokio::time::Instant::now() + WAIT;
        let credentials = loop {
            match register(&gateway_url, &gateway_url, &user_id, name).await {
                Ok(credentials) => break credentials,
                Err(error) if tokio::time::Instant::now() < deadline => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("register {name}: {error}"),
            }
        };
        registered.push(credentials);
    }
    let (alice, bob) = (registered[0].clone(), registered[1].clone());
    let alice_client = bluetick_client::BluetickClient::new(alice).unwrap();
    let (alice_chat, mut alice_events) = alice_client.open_chat(Default::default()).await.unwrap();
    let bob_client = bluetick_client::BluetickClient::new(bob.clone()).unwrap();
    let (_bob_chat, mut bob_events) = bob_client.open_chat(Default::default()).await.unwrap();

    // B comes up knowing no route.
    let presence_b_listener = listen(presence_b_address).await.unwrap();
    let mut presence_b = bluetick_presence::PresenceConfig::new(store("presence-b"));
    presence_b.heartbeat_interval = HEARTBEAT;
    tokio::spawn(bluetick_presence::serve(
        presence_b,
        presence_b_listener,
        shutdown.child_token(),
    ));
    let mut presence_b_client = loop {
        if let Ok(client) = PresenceClient::connect(url(presence_b_address)).await {
            break client;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let routes = presence_b_client
        .locate(LocateRequest {
            user_ids: vec![bob.user_id.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .routes;
    assert!(
        routes.is_empty(),
        "B learned bob's route already: {routes:?}"
    );

    let client_msg_id = alice_chat
        .send(&bob.user_id, b"routed nowhere".to_vec())
        .await
        .unwrap();
    alice_events.wait_sent(&client_msg_id, WAIT).await.unwrap();
    let message = bob_events
        .next_message(WAIT)
        .await
        .expect("the message arrives once B's route is repaired, without a reconnect");
    assert_eq!(&message.payload[..], b"routed nowhere");
    shutdown.cancel();
}
