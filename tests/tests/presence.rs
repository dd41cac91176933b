//! Heartbeats, online state, last seen and its privacy setting.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bluetick_client::{ChatConfig, ChatEvent, LastSeenVisibility};
use bluetick_tests::{TestCluster, WAIT, eventually, now_ms};

const HEARTBEAT: Duration = Duration::from_millis(200);

async fn fast_heartbeat_cluster() -> TestCluster {
    TestCluster::start_with(|config| config.heartbeat_interval = HEARTBEAT).await
}

/// A heartbeating device stays online; once it stops beating it goes offline after three
/// missed intervals, and its last seen is its last activity, not the moment it was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_while_beating_offline_with_the_right_last_seen_after_missed_beats() {
    let cluster = fast_heartbeat_cluster().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let (alice_client, _alice_chat, _alice_events) = cluster.connect(&alice).await;

    // Bob beats at the server's interval: online across many intervals.
    let (_b, bob_chat, _bob_events) = cluster.connect(&bob).await;
    for _ in 0..8 {
        tokio::time::sleep(HEARTBEAT).await;
        let presence = alice_client.last_seen(&bob.user_id).await.unwrap();
        assert!(
            presence.online,
            "bob dropped while heartbeating: {presence:?}"
        );
        assert!(presence.last_seen_ms > 0);
    }
    bob_chat.close().await.unwrap();
    assert!(
        eventually(WAIT, || async {
            !alice_client.last_seen(&bob.user_id).await.unwrap().online
        })
        .await,
        "bob still online after closing"
    );

    // Bob's second device goes silent: no heartbeats, no reconnect.
    let silent = ChatConfig {
        heartbeat_interval_override_opt: Some(Duration::from_secs(3600)),
        reconnect: false,
        ..ChatConfig::default()
    };
    // Taken before connecting: the server's silence clock starts later, so the drop can
    // never look earlier than three intervals from here.
    let connected_at = now_ms();
    let (_b2, _silent_chat, mut silent_events) = cluster.connect_with(&bob, silent).await;
    assert!(alice_client.last_seen(&bob.user_id).await.unwrap().online);
    // The gateway ends the stream after three missed beats.
    let closed = silent_events
        .next_event_matching(
            |event| {
                matches!(
                    event,
                    ChatEvent::Closed { .. } | ChatEvent::Disconnected { .. }
                )
            },
            WAIT,
        )
        .await
        .unwrap();
    let dropped_at = now_ms();
    assert!(
        dropped_at - connected_at >= 3 * HEARTBEAT.as_millis() as u64,
        "dropped after {} ms: {closed:?}",
        dropped_at - connected_at
    );
    assert!(
        eventually(WAIT, || async {
            !alice_client.last_seen(&bob.user_id).await.unwrap().online
        })
        .await
    );
    let presence = alice_client.last_seen(&bob.user_id).await.unwrap();
    assert!(!presence.hidden);
    // Last seen is when bob was last heard from (around connect), not the drop time.
    assert!(
        presence.last_seen_ms + 2 * HEARTBEAT.as_millis() as u64 <= dropped_at,
        "last seen {} is the drop time {dropped_at}",
        presence.last_seen_ms
    );
    assert!(presence.last_seen_ms + 1_000 >= connected_at);
}

/// NOBODY hides last seen from everyone; CONTACTS shows it only to contacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privacy_setting_hides_last_seen() {
    let cluster = fast_heartbeat_cluster().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let carol = cluster.user("carol").await;
    let (alice_client, _ac, _ae) = cluster.connect(&alice).await;
    let (bob_client, _bc, _be) = cluster.connect(&bob).await;
    let carol_client = bluetick_client::BluetickClient::new(carol.clone()).unwrap();

    let visible = alice_client.last_seen(&bob.user_id).await.unwrap();
    assert!(visible.online && !visible.hidden && visible.last_seen_ms > 0);

    bob_client
        .set_privacy(LastSeenVisibility::Nobody)
        .await
        .unwrap();
    for viewer in [&alice_client, &carol_client] {
        let hidden = viewer.last_seen(&bob.user_id).await.unwrap();
        assert!(
            hidden.hidden && !hidden.online && hidden.last_seen_ms == 0,
            "{hidden:?}"
        );
    }
    // Bob still sees his own.
    assert!(!bob_client.last_seen(&bob.user_id).await.unwrap().hidden);

    bob_client
        .set_contacts(vec![alice.user_id.clone()])
        .await
        .unwrap();
    bob_client
        .set_privacy(LastSeenVisibility::Contacts)
        .await
        .unwrap();
    assert!(!alice_client.last_seen(&bob.user_id).await.unwrap().hidden);
    assert!(carol_client.last_seen(&bob.user_id).await.unwrap().hidden);

    bob_client
        .set_privacy(LastSeenVisibility::Everyone)
        .await
        .unwrap();
    assert!(!carol_client.last_seen(&bob.user_id).await.unwrap().hidden);

    let unknown = alice_client.last_seen("nobody-here").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

/// Watching a user on the chat stream reports them coming online and going offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_presence_changes() {
    let cluster = fast_heartbeat_cluster().await;
    let alice = cluster.user("alice").await;
    let bob = cluster.user("bob").await;
    let (_a, alice_chat, mut alice_events) = cluster.connect(&alice).await;
    alice_chat
        .watch_presence(vec![bob.user_id.clone()])
        .await
        .unwrap();
    let is_bob = |online: bool| {
        let bob_id = bob.user_id.clone();
        move |event: &ChatEvent| matches!(event, ChatEvent::Presence(state) if state.user_id == bob_id && state.online == online)
    };
    alice_events
        .next_event_matching(is_bob(false), WAIT)
        .await
        .unwrap();
    let (_b, bob_chat, _be) = cluster.connect(&bob).await;
    alice_events
        .next_event_matching(is_bob(true), WAIT)
        .await
        .unwrap();
    bob_chat.close().await.unwrap();
    match alice_events
        .next_event_matching(is_bob(false), WAIT)
        .await
        .unwrap()
    {
        ChatEvent::Presence(state) => assert!(state.last_seen_ms > 0),
        other => panic!("unexpected {other:?}"),
    }
}

/// Last seen survives a restart of the whole cluster (it is stored, coalesced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_seen_is_stored() {
    let mut cluster = fast_heartbeat_cluster().await;
    let bob = cluster.user("bob").await;
    let (_b, bob_chat, _be) = cluster.connect(&bob).await;
    tokio::time::sleep(HEARTBEAT * 2).await;
    bob_chat.close().await.unwrap();
    let before_stop = now_ms();
    cluster.stop().await;
    let store = bluetick_store::open_presence_store(&cluster.store_url("presence"))
        .await
        .unwrap();
    let stored = store.last_seen(&bob.user_id).await.unwrap().unwrap();
    assert!(
        stored <= before_stop && stored + 5_000 >= before_stop,
        "{stored} vs {before_stop}"
    );
}
