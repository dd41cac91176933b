//! `bluetick-presence`: runs the presence service alone.

use std::time::Duration;

use bluetick_presence::{PresenceConfig, serve};
use clap::Parser;

/// jemalloc, like every bluetick server binary: faster than the system allocator on the
/// message path at the same idle memory (BENCHMARKS.md, "Current figures").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The bluetick presence service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(
        long,
        env = "BLUETICK_PRESENCE_LISTEN",
        default_value = "127.0.0.1:7703"
    )]
    listen: String,
    /// Store URL: a directory for the embedded store.
    #[arg(long, env = "BLUETICK_STORE", default_value = "./data/presence")]
    store: String,
    /// Expected heartbeat interval in milliseconds.
    #[arg(long, env = "BLUETICK_HEARTBEAT_MS", default_value_t = 5_000)]
    heartbeat_ms: u64,
    /// Milliseconds to report NOT_SERVING after start while routes are relearned from
    /// heartbeats: set it (e.g. to two heartbeat intervals) when running several replicas.
    #[arg(long, env = "BLUETICK_PRESENCE_WARM_UP_MS", default_value_t = 0)]
    warm_up_ms: u64,
    #[command(flatten)]
    log: bluetick_common::telemetry::LogArgs,
    /// Serve Prometheus metrics on `http://<address>/metrics` (off when unset).
    #[arg(long, env = "BLUETICK_METRICS_ADDR")]
    metrics_addr: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = bluetick_common::telemetry::init_tracing("bluetick-presence", args.log);
    let mut config = PresenceConfig::new(args.store);
    config.heartbeat_interval = Duration::from_millis(args.heartbeat_ms);
    config.warm_up = Duration::from_millis(args.warm_up_ms);
    let listener = bluetick_common::server::listen(&args.listen).await?;
    tracing::info!(address = %listener.local_addr()?, "presence listening");
    let shutdown = bluetick_common::telemetry::shutdown_on_signals();
    if let Some(address) = &args.metrics_addr {
        bluetick_common::metrics::spawn_metrics_server(address, shutdown.clone()).await?;
    }
    serve(config, listener, shutdown).await
}
