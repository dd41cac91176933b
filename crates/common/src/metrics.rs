//! Prometheus metrics of every service, and the HTTP endpoint that exposes them.
//!
//! One process-wide registry ([`metrics`]) holds every metric; each service updates the ones
//! it owns (messaging: accepted; ack: delivered, read, tick latencies; gateway: connected
//! devices; the pushers of messaging, ack and presence: queue depth; every service: store
//! latencies by operation). A process that runs one service exposes only that service's
//! moving series; `bluetick-dev` runs all five and exposes all of them. [`serve_metrics`]
//! serves the text exposition format on `GET /metrics`.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Instant;

use axum::http::header::CONTENT_TYPE;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One label: its name and value.
pub type Label = [(&'static str, &'static str); 1];

/// Every metric bluetick exposes.
#[derive(Debug)]
pub struct Metrics {
    /// messaging: messages stored (one per send, duplicates not counted).
    pub messages_accepted: Counter,
    /// messaging: sends answered from the idempotency record (a resend).
    pub messages_duplicate: Counter,
    /// ack: recipient devices that acknowledged a message as delivered (double tick).
    pub messages_delivered: Counter,
    /// ack: recipient devices that acknowledged a message as read (blue tick).
    pub messages_read: Counter,
    /// ack: seconds from accepting a message to its tick, by tick (`delivered`: accept to
    /// double tick; `read`: accept to blue tick). Both start at the accept time encoded in
    /// the message id, so no extra store read is needed.
    pub tick_latency: Family<Label, Histogram>,
    /// gateway: devices with an open chat stream on this instance.
    pub connected_devices: Gauge,
    /// Frames waiting in the gateway push queues of this process.
    pub push_queue_depth: Gauge,
    /// Frames dropped because a gateway push queue was full.
    pub push_dropped: Counter,
    /// Seconds per store operation, by operation (`inbox.accept_batch`, `ticks.acknowledge`, ...).
    pub store_latency: Family<Label, Histogram>,
    registry: Registry,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn tick_histogram() -> Histogram {
    // 1 ms to ~4.5 h: a tick may wait for a device to come online or a person to read.
    Histogram::new(exponential_buckets(0.001, 2.0, 24))
}

impl Metrics {
    fn new() -> Self {
        let metrics = Self {
            messages_accepted: Counter::default(),
            messages_duplicate: Counter::default(),
            messages_delivered: Counter::default(),
            messages_read: Counter::default(),
            tick_latency: Family::new_with_constructor(tick_histogram as fn() -> Histogram),
            connected_devices: Gauge::default(),
            push_queue_depth: Gauge::default(),
            push_dropped: Counter::default(),
            store_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            registry: Registry::with_prefix("bluetick"),
        };
        let mut metrics = metrics;
        let registry = &mut metrics.registry;
        registry.register(
            "messages_accepted",
            "Messages stored by messaging (resends not counted)",
            metrics.messages_accepted.clone(),
        );
        registry.register(
            "messages_duplicate",
            "Sends recognised as resends by client_msg_id",
            metrics.messages_duplicate.clone(),
        );
        registry.register(
            "messages_delivered",
            "Recipient devices that acknowledged a message as delivered",
            metrics.messages_delivered.clone(),
        );
        registry.register(
            "messages_read",
            "Recipient devices that acknowledged a message as read",
            metrics.messages_read.clone(),
        );
        registry.register(
            "tick_latency_seconds",
            "Seconds from a message's acceptance to its tick (delivered or read)",
            metrics.tick_latency.clone(),
        );
        registry.register(
            "connected_devices",
            "Devices with an open chat stream on this gateway",
            metrics.connected_devices.clone(),
        );
        registry.register(
            "push_queue_depth",
            "Frames waiting in this process's gateway push queues",
            metrics.push_queue_depth.clone(),
        );
        registry.register(
            "push_dropped",
            "Frames dropped because a gateway push queue was full",
            metrics.push_dropped.clone(),
        );
        registry.register(
            "store_latency_seconds",
            "Seconds per store operation",
            metrics.store_latency.clone(),
        );
        metrics
    }

    /// Returns every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Returns the process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Runs the store operation `future`, recording its duration under `op`.
pub async fn time_store<F: Future>(op: &'static str, future: F) -> F::Output {
    let started = Instant::now();
    let output = future.await;
    metrics()
        .store_latency
        .get_or_create(&[("op", op)])
        .observe(started.elapsed().as_secs_f64());
    output
}

/// Serves `GET /metrics` (Prometheus text format) on `listener` until `shutdown`.
///
/// # Errors
/// When the HTTP server fails.
pub async fn serve_metrics(
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                metrics().render(),
            )
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

/// Binds `address` and serves metrics there in a background task until `shutdown`.
///
/// # Errors
/// When `address` cannot be bound.
pub async fn spawn_metrics_server(
    address: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = crate::server::listen(address).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = serve_metrics(listener, shutdown).await {
            tracing::warn!(%error, "metrics endpoint stopped");
        }
    });
    tracing::info!(address = %bound, "metrics on /metrics");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_metrics_name_every_series() {
        metrics().messages_accepted.inc();
        metrics()
            .store_latency
            .get_or_create(&[("op", "inbox.accept_batch")])
            .observe(0.002);
        let text = metrics().render();
        assert!(text.contains("bluetick_messages_accepted_total"));
        assert!(text.contains("bluetick_store_latency_seconds_bucket{le="));
        assert!(text.contains("op=\"inbox.accept_batch\""));
        assert!(text.contains("bluetick_connected_devices"));
        assert!(text.ends_with("# EOF\n"));
    }
}
