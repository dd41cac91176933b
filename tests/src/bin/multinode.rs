//! `bluetick-multinode`: drives chat traffic through several gateway replicas while
//! `scripts/multinode.sh` runs every service as separate processes, kills replicas (and a
//! CQL node) by PID on a schedule, then checks what users rely on and prints the figures:
//! acknowledged messages lost, duplicates displayed, per-sender order (accept order), and
//! the throughput of single ticks.
//!
//! Each user keeps at most `--window` sends awaiting their single tick. After the send
//! window the driver waits until every send was answered and every acknowledged message
//! was shown, so a message still on its way is never counted as lost; `--help` lists the
//! flags. Exits 1 when a message was lost, shown twice or out of order, or when sends are
//! still unanswered after `--drain-seconds`.

#![allow(clippy::print_stdout)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use bluetick_client::proto::gateway::v1::DevicePayload;
use bluetick_client::{
    BluetickClient, ChatConfig, ChatEvent, Content, new_client_msg_id, new_device_token,
    register_with_token,
};
use clap::Parser;
use tokio::sync::Semaphore;

/// Drives chat traffic through the gateways of a scaled-out cluster and checks the counts.
#[derive(Debug, Parser)]
#[command(name = "bluetick-multinode")]
struct Settings {
    /// Gateway URLs, comma-separated (the SDK spreads users over them and fails over).
    #[arg(long)]
    gateways: String,
    /// Media URLs, comma-separated (default: the gateways).
    #[arg(long, default_value = "")]
    media: String,
    /// Users; user i sends to user i+1.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(2..))]
    users: u64,
    /// Messages per second per user in kill mode.
    #[arg(long = "rate", default_value_t = 10)]
    rate_per_user: u64,
    /// Length of the send window.
    #[arg(long, default_value_t = 40)]
    seconds: u64,
    /// `throughput`: send as fast as the window allows; `kill`: paced, with kills.
    #[arg(long, value_enum, default_value_t = Mode::Kill)]
    mode: Mode,
    /// Seconds between kills.
    #[arg(long, default_value_t = 6)]
    kill_every: u64,
    /// A process to SIGKILL, as NAME=PID; repeat, killed in the order given.
    #[arg(long = "kill", value_parser = parse_kill)]
    kills: Vec<(String, String)>,
    /// Sends per user awaiting their single tick at most.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Longest wait after the send window for every send to be answered and every
    /// acknowledged message to arrive.
    #[arg(long, default_value_t = 180)]
    drain_seconds: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Kill,
    Throughput,
}

fn parse_kill(value: &str) -> Result<(String, String), String> {
    let (name, pid) = value.split_once('=').ok_or("expected NAME=PID")?;
    Ok((name.to_string(), pid.to_string()))
}

/// Violations described one by one, at most.
const MAX_EXAMPLES: usize = 8;

/// What one user's device saw.
#[derive(Debug, Default)]
struct UserLog {
    /// client_msg_ids of this user's sends not answered yet (no single tick, no failure).
    outstanding: HashSet<String>,
    /// message_id → position in this sender's accept order (first single tick).
    accept_index: HashMap<u64, usize>,
    /// Sends that failed for good (not acknowledged, so not owed).
    send_failed: u64,
    /// Messages shown, in order: (sender index, seq, message_id).
    shown: Vec<(usize, u64, u64)>,
    reconnects: u64,
}

fn parse_text(payload: &[u8]) -> Option<(usize, u64)> {
    match Content::decode(payload).ok()? {
        Content::Text(text) => {
            let (sender, seq) = text.split_once(':')?;
            Some((sender.parse().ok()?, seq.parse().ok()?))
        }
        _ => None,
    }
}

/// Waits a second before the next registration attempt.
async fn tracing_free_pause(error: &bluetick_client::ClientError) {
    println!("multinode: cluster not serving yet ({error}), retrying");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut settings = Settings::parse();
    if settings.media.is_empty() {
        settings.media = settings.gateways.clone();
    }
    let users = settings.users as usize;
    let run = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let names: Vec<String> = (0..users).map(|i| format!("mn{run}u{i}")).collect();
    let mut chats = Vec::new();
    let logs: Vec<Arc<Mutex<UserLog>>> = (0..users)
        .map(|_| Arc::new(Mutex::new(UserLog::default())))
        .collect();
    // Per user, the sends that may await their single tick: bounded so that a fast sender
    // measures the cluster's rate instead of queueing thousands of sends in its SDK.
    let windows: Vec<Arc<Semaphore>> = (0..users)
        .map(|_| Arc::new(Semaphore::new(settings.window)))
        .collect();
    for (index, name) in names.iter().enumerate() {
        // The SDK spreads users over the gateways in the list and fails over across it.
        // Services listen before their store is open: retry until the cluster serves.
        // One token per user for every attempt: an attempt whose answer timed out may have
        // registered the user, and its repeat then answers with the same credentials.
        let token = new_device_token();
        let mut attempts = 0;
        let credentials = loop {
            match register_with_token(&settings.gateways, &settings.media, name, name, &token).await
            {
                Ok(credentials) => break credentials,
                Err(error) if attempts < 60 => {
                    attempts += 1;
                    tracing_free_pause(&error).await;
                }
                Err(error) => bail!("register {name}: {error}"),
            }
        };
        let client = BluetickClient::new(credentials)?;
        let config = ChatConfig {
            unavailable_send_retries: 20,
            max_in_flight_sends: settings.window,
            ..ChatConfig::default()
        };
        let (chat, mut events) = client.open_chat(config).await?;
        let log = logs[index].clone();
        let window = windows[index].clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let mut log = log.lock().unwrap_or_else(|poison| poison.into_inner());
                match event {
                    ChatEvent::Message(message) => {
                        if let Some((sender, seq)) = parse_text(&message.payload) {
                            log.shown.push((sender, seq, message.message_id));
                        }
                    }
                    ChatEvent::Sent {
                        message_id,
                        client_msg_id,
                        ..
                    } => {
                        let next = log.accept_index.len();
                        log.accept_index.entry(message_id).or_insert(next);
                        if log.outstanding.remove(&client_msg_id) {
                            window.add_permits(1);
                        }
                    }
                    ChatEvent::SendFailed { client_msg_id, .. } => {
                        log.send_failed += 1;
                        if log.outstanding.remove(&client_msg_id) {
                            window.add_permits(1);
                        }
                    }
                    ChatEvent::Connected { reconnects, .. } => log.reconnects = reconnects.into(),
                    ChatEvent::Closed { .. } => return,
                    _ => {}
                }
            }
        });
        chats.push(chat);
    }
    println!(
        "multinode: {users} users registered and connected over {}",
        settings.gateways
    );

    let started = Instant::now();
    let deadline = started + Duration::from_secs(settings.seconds);
    let mut senders = Vec::new();
    for (index, chat) in chats.iter().enumerate() {
        let chat = chat.clone();
        let recipient = names[(index + 1) % names.len()].clone();
        let log = logs[index].clone();
        let window = windows[index].clone();
        let paced = settings.mode == Mode::Kill;
        let period = Duration::from_millis(1000 / settings.rate_per_user.max(1));
        senders.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            let mut seq = 0u64;
            while Instant::now() < deadline {
                if paced {
                    tick.tick().await;
                }
                // Given back by the event task when the send is answered.
                let Ok(Ok(permit)) =
                    tokio::time::timeout_at(deadline.into(), window.acquire()).await
                else {
                    break;
                };
                permit.forget();
                let client_msg_id = new_client_msg_id();
                log.lock()
                    .unwrap_or_else(|poison| poison.into_inner())
                    .outstanding
                    .insert(client_msg_id.clone());
                let payload = DevicePayload {
                    device_id: 0,
                    payload: Content::text(format!("{index}:{seq}")).encode(),
                };
                if let Err(error) = chat
                    .send_with_id(client_msg_id.clone(), &recipient, vec![payload])
                    .await
                {
                    println!("multinode: send failed: {error}");
                    log.lock()
                        .unwrap_or_else(|poison| poison.into_inner())
                        .outstanding
                        .remove(&client_msg_id);
                    window.add_permits(1);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                seq += 1;
            }
        }));
    }

    // Kill one process every `kill_every` seconds, in the order given.
    let kills = settings.kills.clone();
    let kill_every = settings.kill_every;
    let killer = tokio::spawn(async move {
        for (name, pid) in kills {
            tokio::time::sleep(Duration::from_secs(kill_every)).await;
            let status = std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .status();
            println!(
                "multinode: t={:>5.1}s SIGKILL {name} (pid {pid}): {}",
                started.elapsed().as_secs_f64(),
                if status.is_ok_and(|status| status.success()) {
                    "killed"
                } else {
                    "kill failed"
                }
            );
        }
    });
    for sender in senders {
        sender.await?;
    }
    let send_window = started.elapsed();
    let acknowledged_in_window: usize = logs
        .iter()
        .map(|log| log.lock().map(|log| log.accept_index.len()).unwrap_or(0))
        .sum();
    if settings.mode == Mode::Throughput {
        println!(
            "multinode: throughput {:.0} single ticks/s ({acknowledged_in_window} in {:.1}s, {users} senders, window {})",
            acknowledged_in_window as f64 / send_window.as_secs_f64(),
            send_window.as_secs_f64(),
            settings.window
        );
    }
    killer.abort();

    // Wait until every send was answered and every acknowledged message reached its
    // recipient. Only then is "acknowledged but not shown" a loss rather than a message on
    // its way.
    let tally = |logs: &[Arc<Mutex<UserLog>>]| -> Tally {
        let mut tally = Tally::default();
        for (index, log) in logs.iter().enumerate() {
            let (sender_ids, unanswered) = log
                .lock()
                .map(|log| {
                    (
                        log.accept_index.keys().copied().collect::<Vec<u64>>(),
                        log.outstanding.len(),
                    )
                })
                .unwrap_or_default();
            let recipient = &logs[(index + 1) % logs.len()];
            let shown: HashSet<u64> = recipient
                .lock()
                .map(|log| log.shown.iter().map(|(_, _, id)| *id).collect())
                .unwrap_or_default();
            tally.acknowledged += sender_ids.len();
            tally.unanswered += unanswered;
            tally.missing += sender_ids.iter().filter(|id| !shown.contains(id)).count();
        }
        tally
    };
    let drain_started = Instant::now();
    let drain_deadline = drain_started + Duration::from_secs(settings.drain_seconds);
    while !tally(&logs).settled() && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained_in = drain_started.elapsed();
    // Anything still arriving late would be a duplicate: give it a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let Tally {
        acknowledged,
        missing: lost,
        unanswered,
    } = tally(&logs);

    let mut duplicates = 0;
    let mut order_violations = 0;
    let mut send_order_inversions = 0;
    let mut shown_total = 0;
    let mut reconnects = 0;
    let mut send_failed = 0;
    let mut examples = Vec::new();
    let mut inversion_examples = Vec::new();
    for (index, log) in logs.iter().enumerate() {
        let log = log.lock().unwrap_or_else(|poison| poison.into_inner());
        reconnects += log.reconnects;
        send_failed += log.send_failed;
        let sender_index = (index + logs.len() - 1) % logs.len();
        let accept_index = logs[sender_index]
            .lock()
            .map(|sender| sender.accept_index.clone())
            .unwrap_or_default();
        let mut seen_ids = HashSet::new();
        let mut seen_seqs = HashSet::new();
        let mut last_accept: Option<usize> = None;
        let mut last_seq: Option<u64> = None;
        let mut last_shown: Option<(u64, u64)> = None;
        for (shown_at, (sender, seq, message_id)) in log.shown.iter().enumerate() {
            shown_total += 1;
            if !seen_ids.insert(*message_id) || !seen_seqs.insert((*sender, *seq)) {
                duplicates += 1;
                if examples.len() < MAX_EXAMPLES {
                    examples.push(format!(
                        "user {index} showed again: message {message_id} (sender {sender} seq {seq}) at position {shown_at}"
                    ));
                }
                continue;
            }
            if let Some(position) = accept_index.get(message_id) {
                if last_accept.is_some_and(|last| *position < last) {
                    order_violations += 1;
                    if examples.len() < MAX_EXAMPLES {
                        let (previous_id, previous_seq) = last_shown.unwrap_or_default();
                        examples.push(format!(
                            "user {index} showed message {message_id} (seq {seq}, accepted {position}) after \
                             {previous_id} (seq {previous_seq}, accepted {})",
                            last_accept.unwrap_or_default()
                        ));
                    }
                }
                last_accept = Some(*position);
                last_shown = Some((*message_id, *seq));
            }
            if let Some(last) = last_seq.filter(|last| *seq < *last) {
                send_order_inversions += 1;
                if inversion_examples.len() < MAX_EXAMPLES {
                    inversion_examples.push(format!(
                        "user {index} showed seq {seq} (message {message_id}, accepted {}) after seq {last}",
                        accept_index
                            .get(message_id)
                            .map_or("?".to_string(), |position| position.to_string())
                    ));
                }
            }
            last_seq = Some(*seq);
        }
    }
    println!(
        "multinode: acknowledged={acknowledged} shown={shown_total} lost={lost} duplicates={duplicates} \
         order_violations={order_violations} (accept order; send-order inversions after resends: \
         {send_order_inversions}) unanswered={unanswered} failed_sends={send_failed} \
         reconnects={reconnects} send_window={:.1}s drained_in={:.1}s",
        send_window.as_secs_f64(),
        drained_in.as_secs_f64()
    );
    for example in &examples {
        println!("multinode:   {example}");
    }
    for example in &inversion_examples {
        println!("multinode:   send order: {example}");
    }
    for chat in &chats {
        let _ = tokio::time::timeout(Duration::from_secs(2), chat.close()).await;
    }
    if unanswered > 0 {
        bail!(
            "multinode: {unanswered} sends still had no answer {}s after the send window",
            settings.drain_seconds
        );
    }
    if lost > 0 || duplicates > 0 || order_violations > 0 {
        bail!("multinode: lost, duplicated or reordered messages");
    }
    // Every outage of the run passes within the gateway's 30 s send retry window (the
    // longest, a killed Cassandra node, about 13 s), so each sender's messages must also
    // be shown in the order they were typed, resends included.
    if send_order_inversions > 0 {
        bail!(
            "multinode: {send_order_inversions} messages shown before one their sender typed earlier"
        );
    }
    Ok(())
}

/// Counts at one instant of the drain.
#[derive(Debug, Default)]
struct Tally {
    /// Single ticks received.
    acknowledged: usize,
    /// Acknowledged messages their recipient has not shown.
    missing: usize,
    /// Sends with neither a single tick nor a failure yet.
    unanswered: usize,
}

impl Tally {
    fn settled(&self) -> bool {
        self.missing == 0 && self.unanswered == 0
    }
}
