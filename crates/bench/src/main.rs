//! `bluetick-bench`: drives a running bluetick (e.g. `make run`) through the client SDK and
//! prints one summary line per figure (`--json` for a machine-readable record).
//!
//! Scenarios:
//! - `online`: N connected users each send M messages to random others as fast as they
//!   can; delivered messages/s from the first send to the last delivery, one-way latency
//!   percentiles, and lost/duplicated counts (both must be 0).
//! - `paced`: the same traffic at a fixed total rate; one-way latency and the round trip
//!   from send to the double tick back at the sender.
//! - `offline`: senders send K messages each to N offline recipients, then all recipients
//!   connect at once; time to store and time to drain.
//! - `idle`: C authenticated devices hold their stream open and heartbeat; server resident
//!   memory per device and server CPU at steady state ([`idle`]).
//! - `media`: a file uploaded and downloaded through the media service; MiB/s each way and
//!   the media server's peak resident memory ([`media`]).
//! - `procstat`: reads resident memory and CPU share of server processes (used by the
//!   multi-process idle run in `scripts/bench.sh`).
//!
//! With `--server-pid`, server CPU (and for idle and media, memory) is read from
//! `/proc/<pid>/stat` and `/proc/<pid>/status`.
//!
//! Every run is bounded: a deadline ends it (and the run fails) if traffic stalls. The
//! generator's own CPU share is printed, so it can be told apart from the server's.

#![allow(clippy::print_stdout)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bluetick_client::{
    BluetickClient, ChatConfig, ChatEvent, ChatEvents, ChatHandle, Credentials, TickStatus,
    register,
};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Mutex;

mod idle;
mod media;
mod procfs;

use procfs::self_cpu_seconds as cpu_seconds;

/// jemalloc, as in the servers: the generator shares the two cores with the server it
/// measures, and with the system allocator its malloc and free took a tenth of its CPU
/// (BENCHMARKS.md, "online: the CPU budget of two shared cores").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Gateway endpoint.
    #[arg(long, default_value = "http://127.0.0.1:7700")]
    gateway: String,
    /// Media endpoint.
    #[arg(long, default_value = "http://127.0.0.1:7704")]
    media: String,
    /// Print a JSON record per scenario instead of text lines.
    #[arg(long)]
    json: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    deadline_secs: u64,
    /// online and paced: write each delivery as `sent_us,one_way_us,sender,recipient,
    /// sent_unix_us` (microseconds since the run's start, user indexes, the send's wall-clock
    /// time for lining it up with the server's log) to this CSV file, to see when and
    /// between whom the slow ones happened.
    #[arg(long, global = true)]
    latency_log: Option<std::path::PathBuf>,
    /// Server processes whose CPU (and memory) to read from /proc (repeat or comma-separate).
    #[arg(long = "server-pid", value_delimiter = ',', global = true)]
    server_pids: Vec<u32>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Clone, Subcommand)]
enum Scenario {
    /// N users each send M messages as fast as possible.
    Online {
        #[arg(long, default_value_t = 200)]
        users: usize,
        #[arg(long, default_value_t = 50)]
        messages: usize,
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
    },
    /// The same traffic at a fixed total rate.
    Paced {
        #[arg(long, default_value_t = 200)]
        users: usize,
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
    },
    /// Senders fill offline inboxes, then every recipient connects at once.
    Offline {
        #[arg(long, default_value_t = 200)]
        users: usize,
        #[arg(long, default_value_t = 20)]
        messages: usize,
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
    },
    /// Devices connected and heartbeating: server memory per device and CPU.
    Idle(idle::IdleArgs),
    /// Upload and download of one file through the media service.
    Media {
        /// File size in MiB.
        #[arg(long, default_value_t = 100)]
        size_mib: u64,
    },
    /// Resident memory and CPU share of --server-pid processes over a window.
    Procstat {
        /// Window in seconds (0: memory only).
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
}

#[derive(Debug, Default, Serialize)]
struct Report {
    scenario: &'static str,
    messages: u64,
    lost: u64,
    duplicated: u64,
    seconds: f64,
    messages_per_second: f64,
    one_way_p50_ms: f64,
    one_way_p99_ms: f64,
    one_way_max_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    double_tick_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    double_tick_p99_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    store_seconds: Option<f64>,
    generator_cpu_percent: f64,
    /// The generator's CPU time per delivered message: what a device costs its client.
    generator_cpu_us_per_message: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_cpu_percent: Option<f64>,
    /// Server CPU time per delivered message (with `--server-pid`): less sensitive to other
    /// work on the machine than msgs/s, and what bounds throughput once the CPUs are full.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_cpu_us_per_message: Option<f64>,
}

/// Payload: 8 bytes of send time (µs since the run's epoch), sender index, then padding.
fn payload(epoch: Instant, sender: u32, length: usize) -> Bytes {
    let mut bytes = BytesMut::with_capacity(length.max(12));
    bytes.put_u64(epoch.elapsed().as_micros() as u64);
    bytes.put_u32(sender);
    bytes.resize(length.max(12), b'.');
    bytes.freeze()
}

fn sent_micros(payload: &[u8]) -> Option<u64> {
    payload
        .get(..8)
        .and_then(|head| head.try_into().ok())
        .map(u64::from_be_bytes)
}

/// The sending user's index that [`payload`] wrote after the timestamp.
fn sender_index(payload: &[u8]) -> Option<u32> {
    payload
        .get(8..12)
        .and_then(|bytes| bytes.try_into().ok())
        .map(u32::from_be_bytes)
}

/// Returns the CPU seconds of `pids` so far, summed (0 for processes that cannot be read).
fn server_cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| procfs::sample(*pid).ok())
        .map(|sample| sample.cpu_seconds)
        .sum()
}

/// Returns the CPU `pids` used since `(cpu_before, wall_before)`: as a share of one core,
/// and in microseconds per message of `messages`; `None` without pids.
fn server_cpu_used(
    pids: &[u32],
    cpu_before: f64,
    wall_before: Instant,
    messages: u64,
) -> Option<(f64, f64)> {
    if pids.is_empty() {
        return None;
    }
    let wall = wall_before.elapsed().as_secs_f64().max(1e-9);
    let used = server_cpu_seconds(pids) - cpu_before;
    Some((100.0 * used / wall, micros_per_message(used, messages)))
}

/// Returns `cpu_seconds` spread over `messages`, in microseconds each.
fn micros_per_message(cpu_seconds: f64, messages: u64) -> f64 {
    1e6 * cpu_seconds / messages.max(1) as f64
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

struct User {
    credentials: Credentials,
}

async fn register_users(args: &Args, count: usize, tag: &str) -> anyhow::Result<Vec<User>> {
    let run = rand::random::<u32>();
    // Each registration is a durable write; many in flight share the store's group commits.
    let results: Vec<anyhow::Result<User>> = futures::stream::iter(0..count)
        .map(|index| async move {
            let user_id = format!("bench{tag}{run}x{index}");
            let credentials = register(&args.gateway, &args.media, &user_id, "bench")
                .await
                .with_context(|| format!("registering {user_id}"))?;
            Ok(User { credentials })
        })
        .buffered(32)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn connect(user: &User) -> anyhow::Result<(ChatHandle, ChatEvents)> {
    let client = BluetickClient::new(user.credentials.clone())?;
    let config = ChatConfig {
        max_in_flight_sends: 4_096,
        event_buffer: 8_192,
        ..ChatConfig::default()
    };
    let (handle, mut events) = client.open_chat(config).await?;
    events
        .next_event_matching(
            |event| matches!(event, ChatEvent::BacklogDone { .. }),
            Duration::from_secs(30),
        )
        .await?;
    Ok((handle, events))
}

#[derive(Default)]
struct Tally {
    received: u64,
    seen: HashSet<u64>,
    duplicated: u64,
    one_way: Option<Histogram<u64>>,
    double_tick: Option<Histogram<u64>>,
    last_delivery: Option<Instant>,
    /// `(sent, one-way latency, sender, recipient)`, times in microseconds, with
    /// `--latency-log`.
    log_opt: Option<Vec<(u64, u64, u32, u32)>>,
}

/// Drains one user's events into the tally until `expected_total` messages arrived overall.
async fn collect(
    user: u32,
    mut events: ChatEvents,
    epoch: Instant,
    tally: Arc<Mutex<Tally>>,
    sent_at: Arc<Mutex<std::collections::HashMap<String, Instant>>>,
    sent_ids: Arc<Mutex<std::collections::HashMap<u64, Instant>>>,
) {
    while let Some(event) = events.recv().await {
        match event {
            ChatEvent::Message(message) => {
                let now_micros = epoch.elapsed().as_micros() as u64;
                let mut tally = tally.lock().await;
                if !tally.seen.insert(message.message_id) {
                    tally.duplicated += 1;
                    continue;
                }
                tally.received += 1;
                tally.last_delivery = Some(Instant::now());
                if let Some(sent) = sent_micros(&message.payload) {
                    let latency = now_micros.saturating_sub(sent).max(1);
                    if let Some(histogram) = tally.one_way.as_mut() {
                        let _ = histogram.record(latency);
                    }
                    if let Some(log) = tally.log_opt.as_mut() {
                        let sender = sender_index(&message.payload).unwrap_or(u32::MAX);
                        log.push((sent, latency, sender, user));
                    }
                }
            }
            ChatEvent::Sent {
                client_msg_id,
                message_id,
                ..
            } => {
                if let Some(at) = sent_at.lock().await.remove(&client_msg_id) {
                    sent_ids.lock().await.insert(message_id, at);
                }
            }
            ChatEvent::Receipt {
                message_id,
                status: TickStatus::Delivered,
                ..
            } => {
                if let Some(at) = sent_ids.lock().await.remove(&message_id) {
                    let mut tally = tally.lock().await;
                    if let Some(histogram) = tally.double_tick.as_mut() {
                        let _ = histogram.record(at.elapsed().as_micros() as u64);
                    }
                }
            }
            ChatEvent::Closed { .. } => return,
            _ => {}
        }
    }
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1_000.0
}

async fn run_traffic(
    args: &Args,
    users: usize,
    messages_per_user: usize,
    payload_bytes: usize,
    rate_opt: Option<u64>,
    scenario: &'static str,
) -> anyhow::Result<Report> {
    if users < 2 {
        bail!("at least two users");
    }
    let people = register_users(args, users, "o").await?;
    let epoch = Instant::now();
    let epoch_unix_micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as u64);
    let tally = Arc::new(Mutex::new(Tally {
        one_way: Some(histogram()),
        double_tick: Some(histogram()),
        log_opt: args.latency_log.as_ref().map(|_| Vec::new()),
        ..Tally::default()
    }));
    let sent_at = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let sent_ids = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let mut handles = Vec::with_capacity(users);
    for (index, user) in people.iter().enumerate() {
        let (handle, events) = connect(user).await?;
        tokio::spawn(collect(
            index as u32,
            events,
            epoch,
            tally.clone(),
            sent_at.clone(),
            sent_ids.clone(),
        ));
        handles.push(handle);
    }
    let total = (users * messages_per_user) as u64;
    let cpu_before = cpu_seconds();
    let server_cpu_before = server_cpu_seconds(&args.server_pids);
    let start = Instant::now();
    // Paced: send k of the run (user k % users, their message k / users) is due at
    // start + k / rate, one schedule for everyone, so the sends are evenly spaced.
    let slot_opt = rate_opt.map(|rate| Duration::from_secs_f64(1.0 / rate as f64));
    let schedule_start = tokio::time::Instant::from_std(start);
    let mut senders = Vec::new();
    for (index, handle) in handles.iter().enumerate() {
        let handle = handle.clone();
        let recipients: Vec<String> = people
            .iter()
            .enumerate()
            .filter(|(other, _)| *other != index)
            .map(|(_, user)| user.credentials.user_id.clone())
            .collect();
        let sent_at = sent_at.clone();
        senders.push(tokio::spawn(async move {
            for round in 0..messages_per_user {
                if let Some(slot) = slot_opt {
                    let send = (round * users + index) as u32;
                    tokio::time::sleep_until(schedule_start + slot * send).await;
                }
                let recipient = &recipients[rand::random_range(0..recipients.len())];
                let body = payload(epoch, index as u32, payload_bytes);
                let at = Instant::now();
                let id = handle.send(recipient, body).await?;
                sent_at.lock().await.insert(id, at);
            }
            anyhow::Ok(())
        }));
    }
    for sender in senders {
        sender.await??;
    }
    let deadline = start + Duration::from_secs(args.deadline_secs);
    let received_by_then = loop {
        let received = tally.lock().await.received;
        if received >= total || Instant::now() > deadline {
            break received;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let server_cpu_opt = server_cpu_used(
        &args.server_pids,
        server_cpu_before,
        start,
        received_by_then,
    );
    // A short grace period to catch duplicates and late double ticks.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu = cpu_seconds() - cpu_before;
    let tally = tally.lock().await;
    let end = tally.last_delivery.unwrap_or_else(Instant::now);
    let seconds = end.duration_since(start).as_secs_f64();
    let one_way = tally.one_way.as_ref();
    let double_tick = tally.double_tick.as_ref();
    if let (Some(path), Some(log)) = (args.latency_log.as_ref(), tally.log_opt.as_ref()) {
        let mut lines = String::from("sent_us,one_way_us,sender,recipient,sent_unix_us\n");
        for (sent, latency, sender, recipient) in log {
            let sent_unix = epoch_unix_micros + sent;
            lines.push_str(&format!(
                "{sent},{latency},{sender},{recipient},{sent_unix}\n"
            ));
        }
        std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?;
    }
    // Closing waits up to a second per session for the server; close them all at once.
    futures::future::join_all(handles.iter().map(|handle| handle.close())).await;
    Ok(Report {
        scenario,
        messages: tally.received,
        lost: total.saturating_sub(tally.received),
        duplicated: tally.duplicated,
        seconds,
        messages_per_second: tally.received as f64 / seconds.max(1e-9),
        one_way_p50_ms: one_way.map_or(0.0, |h| ms(h.value_at_quantile(0.5))),
        one_way_p99_ms: one_way.map_or(0.0, |h| ms(h.value_at_quantile(0.99))),
        one_way_max_ms: one_way.map_or(0.0, |h| ms(h.max())),
        double_tick_p50_ms: double_tick.map(|h| ms(h.value_at_quantile(0.5))),
        double_tick_p99_ms: double_tick.map(|h| ms(h.value_at_quantile(0.99))),
        store_seconds: None,
        generator_cpu_percent: 100.0 * cpu / seconds.max(1e-9),
        generator_cpu_us_per_message: micros_per_message(cpu, tally.received),
        server_cpu_percent: server_cpu_opt.map(|(percent, _)| percent),
        server_cpu_us_per_message: server_cpu_opt.map(|(_, micros)| micros),
    })
}

async fn run_offline(
    args: &Args,
    users: usize,
    messages_per_user: usize,
    payload_bytes: usize,
) -> anyhow::Result<Report> {
    let senders = register_users(args, users, "s").await?;
    let recipients = register_users(args, users, "r").await?;
    let epoch = Instant::now();
    let cpu_before = cpu_seconds();
    let server_cpu_before = server_cpu_seconds(&args.server_pids);
    let store_start = Instant::now();
    let mut tasks = Vec::new();
    for (index, sender) in senders.iter().enumerate() {
        let (handle, mut events) = connect(sender).await?;
        let recipient = recipients[index].credentials.user_id.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..messages_per_user {
                ids.push(
                    handle
                        .send(&recipient, payload(epoch, index as u32, payload_bytes))
                        .await?,
                );
            }
            for id in ids {
                events.wait_sent(&id, Duration::from_secs(60)).await?;
            }
            handle.close().await?;
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let store_seconds = store_start.elapsed().as_secs_f64();
    let total = (users * messages_per_user) as u64;
    let tally = Arc::new(Mutex::new(Tally {
        one_way: Some(histogram()),
        ..Tally::default()
    }));
    let drain_start = Instant::now();
    let mut connects = Vec::new();
    for recipient in &recipients {
        let credentials = recipient.credentials.clone();
        connects.push(tokio::spawn(async move {
            let client = BluetickClient::new(credentials)?;
            let config = ChatConfig {
                event_buffer: 8_192,
                ..ChatConfig::default()
            };
            anyhow::Ok(client.open_chat(config).await?)
        }));
    }
    let mut handles = Vec::new();
    for (index, connect) in connects.into_iter().enumerate() {
        let (handle, events) = connect.await??;
        let none = Arc::new(Mutex::new(std::collections::HashMap::new()));
        tokio::spawn(collect(
            index as u32,
            events,
            epoch,
            tally.clone(),
            none.clone(),
            Arc::new(Mutex::new(std::collections::HashMap::new())),
        ));
        handles.push(handle);
    }
    let deadline = drain_start + Duration::from_secs(args.deadline_secs);
    loop {
        let received = tally.lock().await.received;
        if received >= total || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let cpu = cpu_seconds() - cpu_before;
    let tally = tally.lock().await;
    let server_cpu_opt = server_cpu_used(
        &args.server_pids,
        server_cpu_before,
        store_start,
        tally.received,
    );
    let seconds = tally
        .last_delivery
        .unwrap_or_else(Instant::now)
        .duration_since(drain_start)
        .as_secs_f64();
    // Closing waits up to a second per session for the server; close them all at once.
    futures::future::join_all(handles.iter().map(|handle| handle.close())).await;
    Ok(Report {
        scenario: "offline",
        messages: tally.received,
        lost: total.saturating_sub(tally.received),
        duplicated: tally.duplicated,
        seconds,
        messages_per_second: tally.received as f64 / seconds.max(1e-9),
        store_seconds: Some(store_seconds),
        generator_cpu_percent: 100.0 * cpu / (store_seconds + seconds).max(1e-9),
        generator_cpu_us_per_message: micros_per_message(cpu, tally.received),
        server_cpu_percent: server_cpu_opt.map(|(percent, _)| percent),
        server_cpu_us_per_message: server_cpu_opt.map(|(_, micros)| micros),
        ..Report::default()
    })
}

fn print_json(report: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(report)?);
    Ok(())
}

fn print(report: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(report);
    }
    let name = report.scenario;
    println!(
        "{name}: delivered {} messages, lost {}, duplicated {}",
        report.messages, report.lost, report.duplicated
    );
    println!(
        "{name}: {:.0} msgs/s over {:.2} s",
        report.messages_per_second, report.seconds
    );
    if let Some(store) = report.store_seconds {
        println!(
            "{name}: stored in {store:.2} s, drained in {:.2} s",
            report.seconds
        );
    } else {
        println!(
            "{name}: one-way latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            report.one_way_p50_ms, report.one_way_p99_ms, report.one_way_max_ms
        );
    }
    if let (Some(p50), Some(p99)) = (report.double_tick_p50_ms, report.double_tick_p99_ms) {
        println!("{name}: send -> double tick p50 {p50:.2} ms, p99 {p99:.2} ms");
    }
    if let (Some(server), Some(micros)) =
        (report.server_cpu_percent, report.server_cpu_us_per_message)
    {
        println!("{name}: server CPU {server:.0}% of one core, {micros:.0} us per message");
    }
    println!(
        "{name}: generator CPU {:.0}% of one core, {:.0} us per message",
        report.generator_cpu_percent, report.generator_cpu_us_per_message
    );
    Ok(())
}

fn print_idle(report: &idle::IdleReport, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(report);
    }
    println!(
        "idle: {} of {} devices connected and live ({} failed, {} down at the end, {} reconnects) in {:.1} s, open files limit {}",
        report.connected,
        report.devices,
        report.failed,
        report.dropped,
        report.reconnects,
        report.connect_seconds,
        report.open_files_limit
    );
    if let Some(error) = &report.first_error {
        println!("idle: first error: {error}");
    }
    if !report.server_pids.is_empty() {
        println!(
            "idle: server RSS {:.1} MiB -> {:.1} MiB, {:.1} KiB per device",
            report.server_rss_before_kib as f64 / 1024.0,
            report.server_rss_after_kib as f64 / 1024.0,
            report.server_rss_per_device_kib
        );
        println!(
            "idle: server CPU {:.1}% of one core at steady state ({:.0} s)",
            report.server_cpu_percent, report.measure_seconds
        );
    }
    println!(
        "idle: generator CPU {:.1}% of one core",
        report.generator_cpu_percent
    );
    Ok(())
}

fn print_media(report: &media::MediaReport, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(report);
    }
    println!(
        "media: upload {:.0} MiB in {:.2} s, {:.0} MiB/s (server CPU {:.0}%)",
        report.size_mib,
        report.upload_seconds,
        report.upload_mib_per_second,
        report.server_cpu_upload_percent
    );
    println!(
        "media: download {:.0} MiB in {:.2} s, {:.0} MiB/s (server CPU {:.0}%)",
        report.size_mib,
        report.download_seconds,
        report.download_mib_per_second,
        report.server_cpu_download_percent
    );
    if report.server_pid.is_some() {
        println!(
            "media: server RSS {:.1} MiB before, peak {:.1} MiB",
            report.server_rss_before_mib, report.server_peak_rss_mib
        );
    }
    println!(
        "media: generator CPU {:.0}% of one core",
        report.generator_cpu_percent
    );
    Ok(())
}

fn print_procstat(report: &idle::ProcReport, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(report);
    }
    for process in &report.processes {
        println!(
            "procstat: pid {} RSS {:.1} MiB (peak {:.1} MiB)",
            process.pid,
            process.rss_kib as f64 / 1024.0,
            process.peak_rss_kib as f64 / 1024.0
        );
    }
    println!(
        "procstat: total RSS {:.1} MiB, CPU {:.1}% of one core over {:.1} s",
        report.total_rss_kib as f64 / 1024.0,
        report.cpu_percent,
        report.seconds
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let deadline = Instant::now() + Duration::from_secs(args.deadline_secs);
    let report = match args.scenario.clone() {
        Scenario::Online {
            users,
            messages,
            payload_bytes,
        } => run_traffic(&args, users, messages, payload_bytes, None, "online").await?,
        Scenario::Paced {
            users,
            rate,
            seconds,
            payload_bytes,
        } => {
            let per_user = ((rate * seconds) as usize / users).max(1);
            run_traffic(&args, users, per_user, payload_bytes, Some(rate), "paced").await?
        }
        Scenario::Offline {
            users,
            messages,
            payload_bytes,
        } => run_offline(&args, users, messages, payload_bytes).await?,
        Scenario::Idle(idle_args) => {
            let run = idle::run_idle(&args.gateway, &idle_args, &args.server_pids, deadline);
            let report = tokio::time::timeout_at(deadline.into(), run)
                .await
                .context("idle run passed its deadline")??;
            print_idle(&report, args.json)?;
            if report.failed > 0 || report.dropped > 0 {
                bail!("{} failed, {} dropped", report.failed, report.dropped);
            }
            return Ok(());
        }
        Scenario::Media { size_mib } => {
            let run = media::run_media(
                &args.gateway,
                &args.media,
                size_mib,
                args.server_pids.first().copied(),
            );
            let report = tokio::time::timeout_at(deadline.into(), run)
                .await
                .context("media run passed its deadline")??;
            return print_media(&report, args.json);
        }
        Scenario::Procstat { seconds } => {
            let report = idle::run_procstat(&args.server_pids, seconds).await?;
            return print_procstat(&report, args.json);
        }
    };
    print(&report, args.json)?;
    if report.lost > 0 || report.duplicated > 0 {
        bail!("{} lost, {} duplicated", report.lost, report.duplicated);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CPU time is spread evenly over the delivered messages, and a run that delivered
    /// nothing reports the whole time rather than dividing by zero.
    #[test]
    fn cpu_per_message_is_microseconds_each() {
        assert_eq!(micros_per_message(0.85, 10_000), 85.0);
        assert_eq!(micros_per_message(0.5, 0), 500_000.0);
    }
}
