//! `bluetick-dev`: every bluetick service in one process (what `make run` starts).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bluetick_dev::{DevCluster, DevConfig, Ports};
use clap::Parser;

/// jemalloc, like every bluetick server binary: faster than the system allocator on the
/// message path at the same idle memory (BENCHMARKS.md, "Current figures").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Runs gateway, messaging, ack, presence and media in one process on loopback.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Data directory for the embedded stores and media.
    #[arg(long, env = "BLUETICK_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Address every server binds.
    #[arg(long, env = "BLUETICK_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Store URL for every service instead of the embedded stores under --data-dir, e.g.
    /// `scylla://127.0.0.1:9042/bluetick`.
    #[arg(long, env = "BLUETICK_STORE")]
    store: Option<String>,
    /// Blob store URL instead of `<data-dir>/media`, e.g.
    /// `s3://bluetick-media?endpoint=http://127.0.0.1:8333`.
    #[arg(long, env = "BLUETICK_MEDIA")]
    media: Option<String>,
    /// Let the OS pick every port (see --endpoints-file).
    #[arg(long)]
    ephemeral_ports: bool,
    /// Public gateway port.
    #[arg(long, default_value_t = Ports::DEFAULT.gateway)]
    gateway_port: u16,
    /// Internal gateway port.
    #[arg(long, default_value_t = Ports::DEFAULT.gateway_internal)]
    gateway_internal_port: u16,
    /// Messaging port.
    #[arg(long, default_value_t = Ports::DEFAULT.messaging)]
    messaging_port: u16,
    /// Ack port.
    #[arg(long, default_value_t = Ports::DEFAULT.ack)]
    ack_port: u16,
    /// Presence port.
    #[arg(long, default_value_t = Ports::DEFAULT.presence)]
    presence_port: u16,
    /// Media port (gRPC and HTTP).
    #[arg(long, default_value_t = Ports::DEFAULT.media)]
    media_port: u16,
    /// Write the endpoints as JSON to this file once every server listens.
    #[arg(long)]
    endpoints_file: Option<PathBuf>,
    /// Heartbeat interval in milliseconds.
    #[arg(long, env = "BLUETICK_HEARTBEAT_MS", default_value_t = 5_000)]
    heartbeat_ms: u64,
    /// Days an unread message is kept.
    #[arg(long, env = "BLUETICK_MESSAGE_TTL_DAYS", default_value_t = 30)]
    message_ttl_days: u64,
    /// Largest media upload in bytes.
    #[arg(long, env = "BLUETICK_MAX_UPLOAD_BYTES", default_value_t = 100 * 1024 * 1024)]
    max_upload_bytes: u64,
    #[command(flatten)]
    log: bluetick_common::telemetry::LogArgs,
    /// Serve Prometheus metrics of every service on this port at `/metrics` (off when
    /// unset; 0 picks a free port, see --endpoints-file).
    #[arg(long, env = "BLUETICK_METRICS_PORT")]
    metrics_port: Option<u16>,
    /// Internal calls between the services go over loopback TCP (HTTP/2) like between
    /// separate processes, instead of in-process through the same gRPC stacks.
    #[arg(long, env = "BLUETICK_INTERNAL_OVER_TCP", value_parser = clap::builder::BoolishValueParser::new())]
    internal_over_tcp: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = bluetick_common::telemetry::init_tracing("bluetick-dev", args.log);
    match bluetick_common::limits::raise_open_files_limit() {
        Ok(open_files) => tracing::debug!(open_files, "open files limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open files limit"),
    }
    let mut config = DevConfig::new(&args.data_dir);
    config.host = args.host;
    config.ports = if args.ephemeral_ports {
        Ports::EPHEMERAL
    } else {
        Ports {
            gateway: args.gateway_port,
            gateway_internal: args.gateway_internal_port,
            messaging: args.messaging_port,
            ack: args.ack_port,
            presence: args.presence_port,
            media: args.media_port,
        }
    };
    config.heartbeat_interval = Duration::from_millis(args.heartbeat_ms);
    config.message_ttl = Duration::from_secs(args.message_ttl_days * 24 * 3600);
    config.max_upload_bytes = args.max_upload_bytes;
    config.store_url = args.store.filter(|url| !url.is_empty());
    config.media_url = args.media.filter(|url| !url.is_empty());
    config.metrics_port = args.metrics_port;
    config.in_process_calls = !args.internal_over_tcp;
    let mut cluster = DevCluster::start(config).await?;
    cluster.wait_ready(Duration::from_secs(180)).await?;
    let endpoints = &cluster.endpoints;
    tracing::info!(
        gateway = %endpoints.gateway,
        media = %endpoints.media,
        messaging = %endpoints.messaging,
        ack = %endpoints.ack,
        presence = %endpoints.presence,
        gateway_internal = %endpoints.gateway_internal,
        data = %args.data_dir.display(),
        "bluetick is running"
    );
    if let Some(metrics) = &endpoints.metrics {
        tracing::info!(%metrics, "prometheus metrics");
    }
    eprintln!(
        "\nbluetick is running (data in {}):\n  gateway   {}   <- clients: accounts, chat, presence, keys\n  media     {}   <- clients: media (gRPC and HTTP)\n  internal: messaging {}, ack {}, presence {}, gateway-internal {}\nPress Ctrl-C to stop.\n",
        args.data_dir.display(),
        endpoints.gateway,
        endpoints.media,
        endpoints.messaging,
        endpoints.ack,
        endpoints.presence,
        endpoints.gateway_internal,
    );
    if let Some(path) = &args.endpoints_file {
        let json = serde_json::to_string_pretty(&cluster.endpoints)?;
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, json)
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        std::fs::rename(&temporary, path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let shutdown = bluetick_common::telemetry::shutdown_on_signals();
    let cluster_shutdown = cluster.shutdown_token();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        cluster_shutdown.cancel();
    });
    cluster.wait().await
}
