//! The real `bluetick-dev` binary killed and restarted: nothing acknowledged is lost.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bluetick_client::{
    BluetickClient, ChatConfig, ChatEvent, ChatHandle, Content, Credentials, register,
};

const WAIT: Duration = Duration::from_secs(30);

/// A `bluetick-dev` process; killed when dropped.
struct DevProcess {
    child: Child,
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on `data_dir` with the given ports (`None`: ephemeral) and returns it
/// with its endpoints once every server listens.
fn start(data_dir: &Path, ports: Option<&serde_json::Value>) -> (DevProcess, serde_json::Value) {
    let endpoints_file = data_dir.join("endpoints.json");
    let _ = std::fs::remove_file(&endpoints_file);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.join("dev.log"))
        .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_bluetick-dev"));
    command
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--endpoints-file")
        .arg(&endpoints_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    match ports {
        None => {
            command.arg("--ephemeral-ports");
        }
        Some(endpoints) => {
            for (flag, key) in [
                ("--gateway-port", "gateway"),
                ("--gateway-internal-port", "gateway_internal"),
                ("--messaging-port", "messaging"),
                ("--ack-port", "ack"),
                ("--presence-port", "presence"),
                ("--media-port", "media"),
            ] {
                let url = endpoints[key].as_str().unwrap();
                let port = url.rsplit(':').next().unwrap();
                command.arg(flag).arg(port);
            }
        }
    }
    let process = DevProcess {
        child: command.spawn().unwrap(),
    };
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(&endpoints_file) {
            return (process, serde_json::from_str(&text).unwrap());
        }
        assert!(Instant::now() < deadline, "bluetick-dev did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the binary on `data_dir` on ephemeral ports and registers alice and bob.
async fn start_with_alice_and_bob(
    data_dir: &Path,
) -> (DevProcess, serde_json::Value, Credentials, Credentials) {
    let (process, endpoints) = start(data_dir, None);
    let gateway = endpoints["gateway"].as_str().unwrap().to_string();
    let media = endpoints["media"].as_str().unwrap().to_string();
    let alice = register(&gateway, &media, "alice", "Alice").await.unwrap();
    let bob = register(&gateway, &media, "bob", "Bob").await.unwrap();
    (process, endpoints, alice, bob)
}

/// Sends `total` texts "m0000", "m0001", … to `recipient`.
async fn send_numbered(chat: &ChatHandle, recipient: &str, total: usize) {
    for index in 0..total {
        chat.send_content(recipient, &Content::text(format!("m{index:04}")))
            .await
            .unwrap();
    }
}

fn text_of(payload: &[u8]) -> String {
    match Content::decode(payload).unwrap() {
        Content::Text(text) => text,
        other => panic!("unexpected content {other:?}"),
    }
}

/// SIGKILL while a sender streams 300 messages: every message that got a single tick is
/// delivered after the restart, the sender's SDK resends the rest, and the recipient sees
/// all 300 exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_message() {
    let data = tempfile::tempdir().unwrap();
    let (mut process, endpoints, alice, bob) = start_with_alice_and_bob(data.path()).await;

    let alice_client = BluetickClient::new(alice.clone()).unwrap();
    let (alice_chat, mut alice_events) =
        alice_client.open_chat(ChatConfig::default()).await.unwrap();
    const TOTAL: usize = 300;
    send_numbered(&alice_chat, &bob.user_id, TOTAL).await;
    // Kill the whole process after the 100th single tick.
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 100 {
        if let ChatEvent::Sent { message_id, .. } = alice_events.next_event(WAIT).await.unwrap() {
            acknowledged.push(message_id);
        }
    }
    process.child.kill().unwrap();
    process.child.wait().unwrap();
    // Single ticks that had already arrived count as acknowledged too.
    while let Some(event) = alice_events.try_recv() {
        if let ChatEvent::Sent { message_id, .. } = event {
            acknowledged.push(message_id);
        }
    }
    eprintln!("killed after {} single ticks", acknowledged.len());

    let (_process, _) = start(data.path(), Some(&endpoints));
    // Alice's SDK reconnects on its own and resends what was not answered.
    let bob_client = BluetickClient::new(bob.clone()).unwrap();
    let (_bob_chat, mut bob_events) = bob_client.open_chat(ChatConfig::default()).await.unwrap();
    let mut received_ids = Vec::new();
    let mut texts = Vec::new();
    while texts.len() < TOTAL {
        let message = bob_events.next_message(WAIT).await.unwrap();
        received_ids.push(message.message_id);
        texts.push(text_of(&message.payload));
    }
    let expected: Vec<String> = (0..TOTAL).map(|index| format!("m{index:04}")).collect();
    assert_eq!(texts, expected, "lost, duplicated or reordered messages");
    let received: HashSet<u64> = received_ids.iter().copied().collect();
    for message_id in &acknowledged {
        assert!(
            received.contains(message_id),
            "acknowledged message {message_id} lost"
        );
    }
    assert!(
        bob_events
            .next_event_matching(
                |event| matches!(event, ChatEvent::Message(_)),
                Duration::from_millis(500)
            )
            .await
            .is_err(),
        "a message was shown twice"
    );
}

/// A graceful stop (SIGTERM) drains and exits 0; messages to an offline user survive it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_stored_messages_survive() {
    let data = tempfile::tempdir().unwrap();
    let (mut process, endpoints, alice, bob) = start_with_alice_and_bob(data.path()).await;
    let (alice_chat, mut alice_events) = BluetickClient::new(alice)
        .unwrap()
        .open_chat(ChatConfig::default())
        .await
        .unwrap();
    let id = alice_chat.send(&bob.user_id, "survive").await.unwrap();
    let message_id = alice_events.wait_sent(&id, WAIT).await.unwrap();

    let pid = process.child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let exit = process.child.wait().unwrap();
    assert!(exit.success(), "bluetick-dev exited with {exit}");

    let (_process, _) = start(data.path(), Some(&endpoints));
    let (_bob_chat, mut bob_events) = BluetickClient::new(bob)
        .unwrap()
        .open_chat(ChatConfig::default())
        .await
        .unwrap();
    let message = bob_events.next_message(WAIT).await.unwrap();
    assert_eq!(message.message_id, message_id);
}

/// Marking messages delivered and confirming receipts are lazy writes (no fsync of their
/// own), made durable by the next durable commit or at the latest 100 ms later: a SIGKILL a
/// second after a conversation neither sends the messages again nor the receipts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_writes_are_durable_soon_after_the_conversation() {
    let data = tempfile::tempdir().unwrap();
    let (mut process, endpoints, alice, bob) = start_with_alice_and_bob(data.path()).await;
    let (alice_chat, mut alice_events) = BluetickClient::new(alice.clone())
        .unwrap()
        .open_chat(ChatConfig::default())
        .await
        .unwrap();
    let (_bob_chat, mut bob_events) = BluetickClient::new(bob.clone())
        .unwrap()
        .open_chat(ChatConfig::default())
        .await
        .unwrap();
    for events in [&mut alice_events, &mut bob_events] {
        events
            .next_event_matching(|event| matches!(event, ChatEvent::BacklogDone { .. }), WAIT)
            .await
            .unwrap();
    }
    const TOTAL: usize = 20;
    send_numbered(&alice_chat, &bob.user_id, TOTAL).await;
    for _ in 0..TOTAL {
        bob_events.next_message(WAIT).await.unwrap();
    }
    for _ in 0..TOTAL {
        alice_events
            .next_event_matching(|event| matches!(event, ChatEvent::Receipt { .. }), WAIT)
            .await
            .unwrap();
    }
    // Let the settle and the receipt confirmations arrive and their 100 ms pass.
    tokio::time::sleep(Duration::from_secs(1)).await;
    process.child.kill().unwrap();
    process.child.wait().unwrap();

    let (_process, _) = start(data.path(), Some(&endpoints));
    // Each session reconnects and reads its backlog: it must be empty.
    for (events, who) in [(&mut bob_events, "bob"), (&mut alice_events, "alice")] {
        let backlog = events
            .next_event_matching(|event| matches!(event, ChatEvent::BacklogDone { .. }), WAIT)
            .await
            .unwrap();
        assert!(
            matches!(
                backlog,
                ChatEvent::BacklogDone {
                    messages: 0,
                    receipts: 0
                }
            ),
            "{who} got messages or receipts again: {backlog:?}"
        );
    }
}
