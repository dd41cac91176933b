//! `bluetick-messaging`: runs the messaging service alone.

use std::time::Duration;

use bluetick_messaging::{MessagingConfig, serve};
use clap::Parser;

/// jemalloc, like every bluetick server binary: faster than the system allocator on the
/// message path at the same idle memory (BENCHMARKS.md, "Current figures").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The bluetick messaging service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(
        long,
        env = "BLUETICK_MESSAGING_LISTEN",
        default_value = "127.0.0.1:7701"
    )]
    listen: String,
    /// Store URL: a directory for the embedded store.
    #[arg(long, env = "BLUETICK_STORE", default_value = "./data/messaging")]
    store: String,
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
    /// Days an unread message is kept.
    #[arg(long, env = "BLUETICK_MESSAGE_TTL_DAYS", default_value_t = 30)]
    message_ttl_days: u64,
    /// Largest payload per device in bytes.
    #[arg(long, env = "BLUETICK_MAX_PAYLOAD_BYTES", default_value_t = 65_536)]
    max_payload_bytes: usize,
    /// This instance's id (0-1023), unique among messaging instances.
    #[arg(long, env = "BLUETICK_NODE_ID", default_value_t = 0)]
    node_id: u16,
    #[command(flatten)]
    log: bluetick_common::telemetry::LogArgs,
    /// Serve Prometheus metrics on `http://<address>/metrics` (off when unset).
    #[arg(long, env = "BLUETICK_METRICS_ADDR")]
    metrics_addr: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = bluetick_common::telemetry::init_tracing("bluetick-messaging", args.log);
    let mut config = MessagingConfig::new(args.store, args.ack_url, args.presence_url);
    config.message_ttl = Duration::from_secs(args.message_ttl_days * 24 * 3600);
    config.max_payload_bytes = args.max_payload_bytes;
    config.node_id = args.node_id;
    let listener = bluetick_common::server::listen(&args.listen).await?;
    tracing::info!(address = %listener.local_addr()?, "messaging listening");
    let shutdown = bluetick_common::telemetry::shutdown_on_signals();
    if let Some(address) = &args.metrics_addr {
        bluetick_common::metrics::spawn_metrics_server(address, shutdown.clone()).await?;
    }
    serve(config, listener, shutdown).await
}
