//! `bluetick-gateway`: runs the gateway alone.

use std::time::Duration;

use bluetick_gateway::{GatewayConfig, serve};
use clap::Parser;

/// jemalloc, like every bluetick server binary: faster than the system allocator on the
/// message path at the same idle memory (BENCHMARKS.md, "Current figures").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The bluetick gateway: clients' chat streams, accounts and keys.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of the public API (clients).
    #[arg(
        long,
        env = "BLUETICK_GATEWAY_LISTEN",
        default_value = "127.0.0.1:7700"
    )]
    listen: String,
    /// Address of the internal API (other services only).
    #[arg(
        long,
        env = "BLUETICK_GATEWAY_INTERNAL_LISTEN",
        default_value = "127.0.0.1:7710"
    )]
    internal_listen: String,
    /// Internal URL other services use to reach this instance (default: from the listener).
    #[arg(long, env = "BLUETICK_GATEWAY_ADVERTISE_URL", default_value = "")]
    advertise_url: String,
    /// Store URL: a directory for the embedded store.
    #[arg(long, env = "BLUETICK_STORE", default_value = "./data/gateway")]
    store: String,
    /// The messaging service.
    #[arg(
        long,
        env = "BLUETICK_MESSAGING_URL",
        default_value = "http://127.0.0.1:7701"
    )]
    messaging_url: String,
    /// The ack service.
    #[arg(
        long,
        env = "BLUETICK_ACK_URL",
        default_value = "http://127.0.0.1:7702"
    )]
    ack_url: String,
    /// The presence service.
    #[arg(
        long,
        env = "BLUETICK_PRESENCE_URL",
        default_value = "http://127.0.0.1:7703"
    )]
    presence_url: String,
    /// Heartbeat interval in milliseconds.
    #[arg(long, env = "BLUETICK_HEARTBEAT_MS", default_value_t = 5_000)]
    heartbeat_ms: u64,
    /// Largest payload per device in bytes.
    #[arg(long, env = "BLUETICK_MAX_PAYLOAD_BYTES", default_value_t = 65_536)]
    max_payload_bytes: usize,
    #[command(flatten)]
    log: bluetick_common::telemetry::LogArgs,
    /// Serve Prometheus metrics on `http://<address>/metrics` (off when unset).
    #[arg(long, env = "BLUETICK_METRICS_ADDR")]
    metrics_addr: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = bluetick_common::telemetry::init_tracing("bluetick-gateway", args.log);
    match bluetick_common::limits::raise_open_files_limit() {
        Ok(open_files) => tracing::debug!(open_files, "open files limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open files limit"),
    }
    let mut config = GatewayConfig::new(
        args.store,
        args.messaging_url,
        args.ack_url,
        args.presence_url,
    );
    config.advertise_internal_url = args.advertise_url;
    config.heartbeat_interval = Duration::from_millis(args.heartbeat_ms);
    config.max_payload_bytes = args.max_payload_bytes;
    let public = bluetick_common::server::listen(&args.listen).await?;
    let internal = bluetick_common::server::listen(&args.internal_listen).await?;
    tracing::info!(public = %public.local_addr()?, internal = %internal.local_addr()?, "gateway listening");
    let shutdown = bluetick_common::telemetry::shutdown_on_signals();
    if let Some(address) = &args.metrics_addr {
        bluetick_common::metrics::spawn_metrics_server(address, shutdown.clone()).await?;
    }
    serve(config, public, internal, shutdown).await
}
