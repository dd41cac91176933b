//! `bluetick-multinode`: drives chat traffic through several gateway replicas while
//! `scripts/multinode.sh` runs every service as separate processes, kills replicas (and a
//! CQL node) by PID on a schedule, then checks what users rely on and prints the figures:
//! acknowledged messages lost, duplicates displayed, per-sender order (accept order), and
//! the throughput of single ticks.
//!
//! ```text
//! bluetick-multinode --gateways URL[,URL] --media URL[,URL] [--users 8] [--rate 10]
//!     [--seconds 40] [--mode kill|throughput] [--kill-every 6] [--kill NAME=PID]...
//! ```
//! Exits 1 when a message was lost, shown twice or out of order.

#![allow(clippy::print_stdout)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bluetick_client::{BluetickClient, ChatConfig, ChatEvent, Content, register};

/// Command-line settings.
#[derive(Debug)]
struct Settings {
    gateways: String,
    media: String,
    users: usize,
    rate_per_user: u64,
    seconds: u64,
    throughput: bool,
    kill_every: u64,
    kills: Vec<(String, String)>,
}

fn parse_settings() -> anyhow::Result<Settings> {
    let mut settings = Settings {
        gateways: String::new(),
        media: String::new(),
        users: 8,
        rate_per_user: 10,
        seconds: 40,
        throughput: false,
        kill_every: 6,
        kills: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--gateways" => settings.gateways = value,
            "--media" => settings.media = value,
            "--users" => settings.users = value.parse()?,
            "--rate" => settings.rate_per_user = value.parse()?,
            "--seconds" => settings.seconds = value.parse()?,
            "--mode" => settings.throughput = value == "throughput",
            "--kill-every" => settings.kill_every = value.parse()?,
            "--kill" => {
                let (name, pid) = value.split_once('=').context("--kill NAME=PID")?;
                settings.kills.push((name.to_string(), pid.to_string()));
            }
            other => bail!("unknown flag {other}"),
        }
    }
    if settings.gateways.is_empty() || settings.users < 2 {
        bail!("--gateways is required and --users must be at least 2");
    }
    if settings.media.is_empty() {
        settings.media = settings.gateways.clone();
    }
    Ok(settings)
}

/// What one user's device saw.
#[derive(Debug, Default)]
struct UserLog {
    /// client_msg_id → sequence number of the text, for this user's sends.
    sent_seq: HashMap<String, u64>,
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
    let settings = parse_settings()?;
    let run = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let names: Vec<String> = (0..settings.users)
        .map(|i| format!("mn{run}u{i}"))
        .collect();
    let mut chats = Vec::new();
    let logs: Vec<Arc<Mutex<UserLog>>> = (0..settings.users)
        .map(|_| Arc::new(Mutex::new(UserLog::default())))
        .collect();
    for (index, name) in names.iter().enumerate() {
        // The SDK spreads users over the gateways in the list and fails over across it.
        // Services listen before their store is open: retry until the cluster serves.
        let mut attempts = 0;
        let credentials = loop {
            match register(&settings.gateways, &settings.media, name, name).await {
                Ok(credentials) => break credentials,
                Err(error) if attempts < 60 => {
                    attempts += 1;
                    tracing_free_pause(&error).await;
                }
                Err(error) => return Err(error).with_context(|| format!("register {name}")),
            }
        };
        let client = BluetickClient::new(credentials)?;
        let config = ChatConfig {
            unavailable_send_retries: 20,
            ..ChatConfig::default()
        };
        let (chat, mut events) = client.open_chat(config).await?;
        let log = logs[index].clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let mut log = log.lock().unwrap_or_else(|poison| poison.into_inner());
                match event {
                    ChatEvent::Message(message) => {
                        if let Some((sender, seq)) = parse_text(&message.payload) {
                            log.shown.push((sender, seq, message.message_id));
                        }
                    }
                    ChatEvent::Sent { message_id, .. } => {
                        let next = log.accept_index.len();
                        log.accept_index.entry(message_id).or_insert(next);
                    }
                    ChatEvent::SendFailed { .. } => log.send_failed += 1,
                    ChatEvent::Connected { reconnects, .. } => log.reconnects = reconnects.into(),
                    ChatEvent::Closed { .. } => return,
                    _ => {}
                }
            }
        });
        chats.push(chat);
    }
    println!(
        "multinode: {} users registered and connected over {}",
        settings.users, settings.gateways
    );

    let started = Instant::now();
    let deadline = started + Duration::from_secs(settings.seconds);
    let mut senders = Vec::new();
    for (index, chat) in chats.iter().enumerate() {
        let chat = chat.clone();
        let recipient = names[(index + 1) % names.len()].clone();
        let log = logs[index].clone();
        let paced = !settings.throughput;
        let period = Duration::from_millis(1000 / settings.rate_per_user.max(1));
        senders.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            let mut seq = 0u64;
            while Instant::now() < deadline {
                if paced {
                    tick.tick().await;
                }
                let text = Content::text(format!("{index}:{seq}"));
                match chat.send_content(&recipient, &text).await {
                    Ok(client_msg_id) => {
                        log.lock()
                            .unwrap_or_else(|poison| poison.into_inner())
                            .sent_seq
                            .insert(client_msg_id, seq);
                    }
                    Err(error) => {
                        println!("multinode: send failed: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
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
    if settings.throughput {
        println!(
            "multinode: throughput {:.0} single ticks/s ({acknowledged_in_window} in {:.1}s, {} senders)",
            acknowledged_in_window as f64 / send_window.as_secs_f64(),
            send_window.as_secs_f64(),
            settings.users
        );
    }
    killer.abort();

    // Wait until every acknowledged message reached its recipient (or give up).
    let owed = |logs: &[Arc<Mutex<UserLog>>]| -> (usize, usize) {
        let mut acknowledged = 0;
        let mut missing = 0;
        for (index, log) in logs.iter().enumerate() {
            let sender_ids: Vec<u64> = log
                .lock()
                .map(|log| log.accept_index.keys().copied().collect())
                .unwrap_or_default();
            let recipient = &logs[(index + 1) % logs.len()];
            let shown: HashSet<u64> = recipient
                .lock()
                .map(|log| log.shown.iter().map(|(_, _, id)| *id).collect())
                .unwrap_or_default();
            acknowledged += sender_ids.len();
            missing += sender_ids.iter().filter(|id| !shown.contains(id)).count();
        }
        (acknowledged, missing)
    };
    let drain_deadline = Instant::now() + Duration::from_secs(120);
    while owed(&logs).1 > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Anything still arriving late would be a duplicate: give it a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acknowledged, lost) = owed(&logs);

    let mut duplicates = 0;
    let mut order_violations = 0;
    let mut send_order_inversions = 0;
    let mut shown_total = 0;
    let mut reconnects = 0;
    let mut send_failed = 0;
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
        for (sender, seq, message_id) in &log.shown {
            shown_total += 1;
            if !seen_ids.insert(*message_id) || !seen_seqs.insert((*sender, *seq)) {
                duplicates += 1;
                continue;
            }
            if let Some(position) = accept_index.get(message_id) {
                if last_accept.is_some_and(|last| *position < last) {
                    order_violations += 1;
                }
                last_accept = Some(*position);
            }
            if last_seq.is_some_and(|last| *seq < last) {
                send_order_inversions += 1;
            }
            last_seq = Some(*seq);
        }
    }
    println!(
        "multinode: acknowledged={acknowledged} shown={shown_total} lost={lost} duplicates={duplicates} \
         order_violations={order_violations} (accept order; send-order inversions after resends: \
         {send_order_inversions}) failed_sends={send_failed} reconnects={reconnects} \
         send_window={:.1}s",
        send_window.as_secs_f64()
    );
    for chat in &chats {
        let _ = tokio::time::timeout(Duration::from_secs(2), chat.close()).await;
    }
    if lost > 0 || duplicates > 0 || order_violations > 0 {
        bail!("multinode: lost, duplicated or reordered messages");
    }
    Ok(())
}
