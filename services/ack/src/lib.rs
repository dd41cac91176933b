//! The ack service: the tick state of every message per recipient device (sent → delivered
//! → read, never backwards) and the receipts that tell senders about it.
//!
//! messaging records each accepted message as SENT. A recipient device's DELIVERED or READ
//! advances its state and stores a receipt for the sending device in the same atomic
//! write; the receipt is then pushed to the sender's gateway if the sender is connected.
//! Stored receipts are re-sent when the sender connects, until the sender confirms them:
//! receipts follow the same store-and-forward path as messages.

mod service;

use std::time::Duration;

use bluetick_common::server::{ServerSpec, serve as serve_grpc};
use bluetick_proto::ack::v1::ack_server::AckServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use service::AckService;

/// How the ack service runs.
#[derive(Clone, Debug)]
pub struct AckConfig {
    /// Where tick state and receipts are stored.
    pub store_url: String,
    /// The presence service (to find senders' gateways).
    pub presence_url: String,
    /// Distinguishes this instance's receipt ids from other instances' (0–1023).
    pub node_id: u16,
}

impl AckConfig {
    /// Returns the defaults with the given store and presence service.
    pub fn new(store_url: impl Into<String>, presence_url: impl Into<String>) -> Self {
        Self {
            store_url: store_url.into(),
            presence_url: presence_url.into(),
            node_id: 0,
        }
    }
}

/// Serves ack on `listener` until `shutdown`.
///
/// # Errors
/// When the store cannot be opened, a peer URL is invalid or the server fails.
pub async fn serve(
    config: AckConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let ticks = bluetick_store::open_tick_store(&config.store_url).await?;
    let service = AckService::new(&config, ticks.clone())?;
    let purge = tokio::spawn(purge_expired(ticks, shutdown.clone()));
    let routes = tonic::service::Routes::new(AckServer::new(service));
    let spec = ServerSpec {
        service_names: vec!["bluetick.ack.v1.Ack"],
        accept_http1: false,
        warm_up: std::time::Duration::ZERO,
        internal: true,
    };
    let result = serve_grpc(spec, listener, routes, shutdown.clone()).await;
    shutdown.cancel();
    let _ = purge.await;
    result
}

async fn purge_expired(ticks: bluetick_store::TickStoreRef, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                if let Err(error) = ticks.purge_expired(bluetick_common::now_ms()).await {
                    tracing::warn!(%error, "purging expired tick records failed");
                }
            }
        }
    }
}
