//! `bluetick-media`: the media service binary. Flags fall back to environment variables.

use std::net::SocketAddr;

use anyhow::Context;
use bluetick_common::telemetry::{init_tracing, shutdown_on_signals};
use bluetick_media::{DEFAULT_MAX_UPLOAD_BYTES, MediaConfig, SHUTDOWN_GRACE, serve};
use clap::Parser;

/// jemalloc, like every bluetick server binary: faster than the system allocator on the
/// message path at the same idle memory (BENCHMARKS.md, "Current figures").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// bluetick media: content-addressed blobs over gRPC and plain HTTP on one port.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (gRPC and HTTP).
    #[arg(long, env = "BLUETICK_MEDIA_LISTEN", default_value = "127.0.0.1:7704")]
    listen: SocketAddr,
    /// Blob store: a folder path, or `s3://bucket[/prefix]?endpoint=…&region=…&path_style=true`
    /// (credentials from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` or `access_key`/`secret_key`).
    #[arg(long, env = "BLUETICK_MEDIA_BLOBS", default_value = "./data/media")]
    blobs: String,
    /// The gateway's internal gRPC endpoint, used to check upload tokens.
    #[arg(
        long,
        env = "BLUETICK_GATEWAY_INTERNAL_URL",
        default_value = "http://127.0.0.1:7700"
    )]
    gateway_url: String,
    /// Largest accepted upload, in bytes.
    #[arg(long, env = "BLUETICK_MEDIA_MAX_UPLOAD_BYTES", default_value_t = DEFAULT_MAX_UPLOAD_BYTES)]
    max_upload_bytes: u64,
    /// Seconds an accepted upload token is trusted without asking the gateway again.
    #[arg(long, env = "BLUETICK_MEDIA_AUTH_CACHE_TTL_SECS", default_value_t = 30)]
    auth_cache_ttl_secs: u64,
    #[command(flatten)]
    log: bluetick_common::telemetry::LogArgs,
    /// Serve Prometheus metrics on `http://<address>/metrics` (off when unset).
    #[arg(long, env = "BLUETICK_METRICS_ADDR")]
    metrics_addr: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = init_tracing("bluetick-media", args.log);
    let config = MediaConfig {
        blob_url: args.blobs,
        gateway_url: args.gateway_url,
        max_upload_bytes: args.max_upload_bytes,
        auth_cache_ttl_secs: args.auth_cache_ttl_secs,
        ..MediaConfig::default()
    };
    let listener = bluetick_common::server::listen(args.listen)
        .await
        .with_context(|| format!("failed to bind {}", args.listen))?;
    let shutdown = shutdown_on_signals();
    if let Some(address) = &args.metrics_addr {
        bluetick_common::metrics::spawn_metrics_server(address, shutdown.clone()).await?;
    }
    let server = tokio::spawn(serve(config, listener, shutdown.clone()));
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result.context("media server task failed")?,
        () = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
        Ok(result) => result.context("media server task failed")?,
        Err(_) => {
            tracing::warn!("transfers did not drain in time, exiting");
            Ok(())
        }
    }
}
