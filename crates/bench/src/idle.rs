//! The `idle` scenario: many authenticated devices hold their chat stream open and send
//! nothing but a heartbeat every interval; the figures are the server's resident memory per
//! connected device and its CPU share at steady state.
//!
//! Devices are lean on purpose (one HTTP/2 connection, the chat stream and a heartbeat
//! timer each, no SDK session), so one generator process can hold as many devices as its
//! open-files limit allows. Connections are spread over `--source-ips` (127.0.0.x) so the
//! 28k ephemeral ports of one source address do not cap the count. For more devices than
//! one process can hold, several generators run side by side and meet at a file barrier
//! (`--barrier-dir`): each registers, writes `registered.<name>`, waits for `go`, connects,
//! writes `connected.<name>` and holds until `stop` appears (at most `--hold-secs`), while
//! the script measures the servers with `procstat`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bluetick_client::proto::gateway::v1::accounts_client::AccountsClient;
use bluetick_client::proto::gateway::v1::chat_client::ChatClient;
use bluetick_client::proto::gateway::v1::client_frame::Frame as ClientFrameBody;
use bluetick_client::proto::gateway::v1::server_frame::Frame as ServerFrameBody;
use bluetick_client::proto::gateway::v1::{ClientFrame, Heartbeat, RegisterRequest, ServerFrame};
use bluetick_client::{AuthInterceptor, UNARY_DEADLINE, endpoint};
use futures::StreamExt;
use serde::Serialize;
use tonic::Streaming;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

use crate::procfs;

/// How the idle scenario runs.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct IdleArgs {
    /// Devices to connect (one user each).
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Seconds between a device's heartbeats.
    #[arg(long, default_value_t = 5)]
    heartbeat_secs: u64,
    /// Seconds to wait after the last connect before measuring.
    #[arg(long, default_value_t = 10)]
    settle_secs: u64,
    /// Seconds over which server CPU is measured.
    #[arg(long, default_value_t = 15)]
    measure_secs: u64,
    /// Local addresses the device connections bind, round-robin (e.g. 127.0.0.2,127.0.0.3).
    #[arg(long = "source-ips", value_delimiter = ',')]
    source_ips: Vec<IpAddr>,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 64)]
    register_concurrency: usize,
    /// Connects in flight at once.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Several generators: meet at this directory's files instead of measuring here.
    #[arg(long)]
    barrier_dir: Option<PathBuf>,
    /// This generator's name in the barrier directory.
    #[arg(long, default_value = "0")]
    barrier_name: String,
    /// With --barrier-dir: most seconds to hold the devices after connecting (the file
    /// `stop` in the barrier directory ends the hold sooner).
    #[arg(long, default_value_t = 600)]
    hold_secs: u64,
}

/// What the idle scenario measured.
#[derive(Debug, Default, Serialize)]
pub(crate) struct IdleReport {
    pub(crate) scenario: &'static str,
    pub(crate) devices: usize,
    pub(crate) connected: usize,
    pub(crate) failed: usize,
    /// Devices whose stream had ended and not reconnected when the measurement ended.
    pub(crate) dropped: usize,
    /// Streams that ended and were opened again during the run.
    pub(crate) reconnects: usize,
    pub(crate) first_error: Option<String>,
    pub(crate) register_seconds: f64,
    pub(crate) connect_seconds: f64,
    pub(crate) open_files_limit: u64,
    pub(crate) source_ips: usize,
    pub(crate) server_pids: Vec<u32>,
    pub(crate) server_rss_before_kib: u64,
    pub(crate) server_rss_after_kib: u64,
    pub(crate) server_rss_per_device_kib: f64,
    pub(crate) server_cpu_percent: f64,
    pub(crate) measure_seconds: f64,
    pub(crate) generator_cpu_percent: f64,
}

struct Device {
    token: String,
}

async fn register_devices(
    gateway: &str,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Device>> {
    let channel = endpoint(gateway)?
        .connect()
        .await
        .with_context(|| format!("connecting to {gateway}"))?;
    let accounts = AccountsClient::with_interceptor(
        channel,
        AuthInterceptor::new(None, Some(UNARY_DEADLINE))?,
    );
    let run = rand::random::<u32>();
    let results: Vec<anyhow::Result<Device>> = futures::stream::iter(0..count)
        .map(|index| {
            let mut accounts = accounts.clone();
            async move {
                let user_id = format!("idle{run}x{index}");
                let response = accounts
                    .register(RegisterRequest {
                        user_id: user_id.clone(),
                        display_name: "idle".into(),
                        ..RegisterRequest::default()
                    })
                    .await
                    .with_context(|| format!("registering {user_id}"))?
                    .into_inner();
                Ok(Device {
                    token: response.token,
                })
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

fn heartbeat() -> ClientFrame {
    ClientFrame {
        frame: Some(ClientFrameBody::Heartbeat(Heartbeat {})),
    }
}

/// One device's open chat stream (the client keeps the connection alive).
struct OpenStream {
    _chat: ChatClient<InterceptedService<Channel, AuthInterceptor>>,
    inbound: Streaming<ServerFrame>,
}

/// Opens one device's chat stream and waits until the device is live: the gateway has
/// attached it with presence and sent its (empty) backlog and stored receipts, ending with
/// `BacklogDone`. Counting a device as connected only then keeps the steady-state window
/// clear of the connect storm's internal calls.
async fn open_stream(
    gateway: &str,
    source_opt: Option<IpAddr>,
    token: &str,
    every: Duration,
) -> anyhow::Result<OpenStream> {
    let channel = endpoint(gateway)?
        .local_address(source_opt)
        .connect()
        .await
        .context("connecting")?;
    let mut chat = ChatClient::with_interceptor(channel, AuthInterceptor::new(Some(token), None)?);
    // Spread the heartbeats over the interval, as real devices' would be.
    let first = every.mul_f64(rand::random::<f64>());
    let beats = futures::stream::unfold(first, move |delay| async move {
        tokio::time::sleep(delay).await;
        Some((heartbeat(), every))
    });
    let mut inbound = chat.open(beats).await.context("opening chat")?.into_inner();
    let live = async {
        loop {
            match inbound.message().await.context("reading the backlog")? {
                Some(ServerFrame {
                    frame: Some(ServerFrameBody::BacklogDone(_)),
                }) => return anyhow::Ok(()),
                Some(_) => {}
                None => bail!("stream ended before the backlog was done"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), live)
        .await
        .context("not live within 60 s")??;
    Ok(OpenStream {
        _chat: chat,
        inbound,
    })
}

/// Counts of the devices' streams after their first connect.
#[derive(Debug, Default)]
struct StreamCounts {
    /// Devices whose stream ended and that have not reconnected (yet).
    down: AtomicUsize,
    /// Streams opened again after one ended.
    reconnects: AtomicUsize,
}

/// Opens one device's chat stream, then keeps reading in a task; when the stream ends the
/// task reconnects as the SDK would (backing off from 1 s to 16 s, with jitter), so a run
/// measures whether the devices are held rather than how the first storm went.
async fn connect_device(
    gateway: String,
    source_opt: Option<IpAddr>,
    token: String,
    every: Duration,
    counts: Arc<StreamCounts>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut stream = open_stream(&gateway, source_opt, &token, every).await?;
    Ok(tokio::spawn(async move {
        loop {
            while let Ok(Some(_frame)) = stream.inbound.message().await {}
            counts.down.fetch_add(1, Ordering::Relaxed);
            let mut backoff = Duration::from_secs(1);
            stream = loop {
                tokio::time::sleep(backoff.mul_f64(0.5 + rand::random::<f64>())).await;
                if let Ok(stream) = open_stream(&gateway, source_opt, &token, every).await {
                    break stream;
                }
                backoff = (backoff * 2).min(Duration::from_secs(16));
            };
            counts.down.fetch_sub(1, Ordering::Relaxed);
            counts.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }))
}

async fn wait_for_file(path: &Path, deadline: Instant) -> anyhow::Result<()> {
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn total_rss_kib(samples: &[procfs::ProcSample]) -> u64 {
    samples.iter().map(|sample| sample.rss_kib).sum()
}

fn total_cpu_seconds(samples: &[procfs::ProcSample]) -> f64 {
    samples.iter().map(|sample| sample.cpu_seconds).sum()
}

/// Runs the idle scenario against `gateway`.
///
/// # Errors
/// When registration fails, a barrier times out or a server process cannot be read.
pub(crate) async fn run_idle(
    gateway: &str,
    args: &IdleArgs,
    server_pids: &[u32],
    deadline: Instant,
) -> anyhow::Result<IdleReport> {
    let open_files_limit = procfs::raise_open_files_limit();
    let register_start = Instant::now();
    let devices = register_devices(gateway, args.devices, args.register_concurrency).await?;
    let register_seconds = register_start.elapsed().as_secs_f64();
    if let Some(dir) = &args.barrier_dir {
        std::fs::write(dir.join(format!("registered.{}", args.barrier_name)), "")?;
        wait_for_file(&dir.join("go"), deadline).await?;
    }
    let before = procfs::sample_all(server_pids)?;

    let counts = Arc::new(StreamCounts::default());
    let every = Duration::from_secs(args.heartbeat_secs.max(1));
    let sources = args.source_ips.clone();
    let connect_start = Instant::now();
    let outcomes: Vec<anyhow::Result<tokio::task::JoinHandle<()>>> =
        futures::stream::iter(devices.into_iter().enumerate())
            .map(|(index, device)| {
                let source_opt = if sources.is_empty() {
                    None
                } else {
                    Some(sources[index % sources.len()])
                };
                connect_device(
                    gateway.to_string(),
                    source_opt,
                    device.token,
                    every,
                    counts.clone(),
                )
            })
            .buffer_unordered(args.connect_concurrency.max(1))
            .collect()
            .await;
    let connect_seconds = connect_start.elapsed().as_secs_f64();
    let mut sessions = Vec::with_capacity(outcomes.len());
    let mut failed = 0;
    let mut first_error = None;
    for outcome in outcomes {
        match outcome {
            Ok(session) => sessions.push(session),
            Err(error) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{error:#}"));
            }
        }
    }

    let (measure_seconds, cpu_percent, after, generator_cpu_percent) = if let Some(dir) =
        &args.barrier_dir
    {
        std::fs::write(dir.join(format!("connected.{}", args.barrier_name)), "")?;
        let cpu_start = procfs::self_cpu_seconds();
        let hold_start = Instant::now();
        let hold = Duration::from_secs(args.hold_secs);
        let stop = dir.join("stop");
        while hold_start.elapsed() < hold && !stop.exists() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let held = hold_start.elapsed().as_secs_f64();
        let generator = 100.0 * (procfs::self_cpu_seconds() - cpu_start) / held.max(1e-9);
        (held, 0.0, Vec::new(), generator)
    } else {
        tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
        let start_samples = procfs::sample_all(server_pids)?;
        let cpu_start = procfs::self_cpu_seconds();
        let window_start = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.measure_secs.max(1))).await;
        let end_samples = procfs::sample_all(server_pids)?;
        let window = window_start.elapsed().as_secs_f64();
        let server =
            100.0 * (total_cpu_seconds(&end_samples) - total_cpu_seconds(&start_samples)) / window;
        let generator = 100.0 * (procfs::self_cpu_seconds() - cpu_start) / window;
        (window, server, end_samples, generator)
    };
    let connected = sessions.len();
    let rss_before = total_rss_kib(&before);
    let rss_after = total_rss_kib(&after);
    let report = IdleReport {
        scenario: "idle",
        devices: args.devices,
        connected,
        failed,
        dropped: counts.down.load(Ordering::Relaxed),
        reconnects: counts.reconnects.load(Ordering::Relaxed),
        first_error,
        register_seconds,
        connect_seconds,
        open_files_limit,
        source_ips: sources.len(),
        server_pids: server_pids.to_vec(),
        server_rss_before_kib: rss_before,
        server_rss_after_kib: rss_after,
        server_rss_per_device_kib: if connected > 0 && !after.is_empty() {
            rss_after.saturating_sub(rss_before) as f64 / connected as f64
        } else {
            0.0
        },
        server_cpu_percent: cpu_percent,
        measure_seconds,
        generator_cpu_percent,
    };
    for session in sessions {
        session.abort();
    }
    Ok(report)
}

/// What `procstat` measured.
#[derive(Debug, Default, Serialize)]
pub(crate) struct ProcReport {
    pub(crate) scenario: &'static str,
    pub(crate) processes: Vec<procfs::ProcSample>,
    pub(crate) total_rss_kib: u64,
    pub(crate) total_peak_rss_kib: u64,
    pub(crate) cpu_percent: f64,
    pub(crate) seconds: f64,
}

/// Reads `pids` now and again after `seconds`: resident memory at the end, CPU share over
/// the window (of one core; 200% is both cores of a 2-core machine).
///
/// # Errors
/// When a process cannot be read.
pub(crate) async fn run_procstat(pids: &[u32], seconds: f64) -> anyhow::Result<ProcReport> {
    let start = procfs::sample_all(pids)?;
    let window_start = Instant::now();
    if seconds > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    }
    let end = procfs::sample_all(pids)?;
    let window = window_start.elapsed().as_secs_f64();
    let cpu_percent = if seconds > 0.0 {
        100.0 * (total_cpu_seconds(&end) - total_cpu_seconds(&start)) / window
    } else {
        0.0
    };
    Ok(ProcReport {
        scenario: "procstat",
        total_rss_kib: total_rss_kib(&end),
        total_peak_rss_kib: end.iter().map(|sample| sample.peak_rss_kib).sum(),
        processes: end,
        cpu_percent,
        seconds: window,
    })
}
