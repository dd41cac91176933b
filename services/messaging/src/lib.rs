//! The messaging service: persist, then route.
//!
//! [`MessagingService::accept`](bluetick_proto::messaging::v1::messaging_server::Messaging::accept)
//! assigns a time-ordered id, writes the message durably into every recipient device's inbox
//! (group-committed by the store), records it as SENT with ack, and only then answers (the
//! single tick) and pushes it to the gateways that hold the recipient's connected devices.
//! Pushes go through one ordered queue per gateway ([`GatewayPusher`]), so a recipient sees
//! a sender's messages in the order they were accepted. A device that was offline reads its
//! backlog, oldest first, when it connects. Receipts settle the inbox: DELIVERED stops
//! redelivery, READ deletes. Unread messages expire after the TTL.
//!
//! [`GatewayPusher`]: bluetick_common::push::GatewayPusher

mod service;

use std::time::Duration;

use bluetick_common::server::{ServerSpec, serve as serve_grpc};
use bluetick_proto::messaging::v1::messaging_server::MessagingServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use service::MessagingService;

/// How the messaging service runs.
#[derive(Clone, Debug)]
pub struct MessagingConfig {
    /// Where inboxes are stored.
    pub store_url: String,
    /// The ack service.
    pub ack_url: String,
    /// The presence service.
    pub presence_url: String,
    /// Unread messages are deleted after this long.
    pub message_ttl: Duration,
    /// Largest payload per device, in bytes.
    pub max_payload_bytes: usize,
    /// Distinguishes this instance's message ids from other instances' (0–1023).
    pub node_id: u16,
}

impl MessagingConfig {
    /// Returns the defaults with the given store and peers.
    pub fn new(
        store_url: impl Into<String>,
        ack_url: impl Into<String>,
        presence_url: impl Into<String>,
    ) -> Self {
        Self {
            store_url: store_url.into(),
            ack_url: ack_url.into(),
            presence_url: presence_url.into(),
            message_ttl: Duration::from_secs(30 * 24 * 3600),
            max_payload_bytes: 64 * 1024,
            node_id: 0,
        }
    }
}

/// Serves messaging on `listener` until `shutdown`.
///
/// # Errors
/// When the store cannot be opened, a peer URL is invalid or the server fails.
pub async fn serve(
    config: MessagingConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let inbox = bluetick_store::open_inbox_store(&config.store_url).await?;
    let service = MessagingService::new(&config, inbox.clone())?;
    let purge = tokio::spawn(purge_expired(inbox, shutdown.clone()));
    let routes = tonic::service::Routes::new(
        MessagingServer::new(service)
            .max_decoding_message_size(config.max_payload_bytes * 64 + 64 * 1024),
    );
    let spec = ServerSpec {
        service_names: vec!["bluetick.messaging.v1.Messaging"],
        accept_http1: false,
        warm_up: std::time::Duration::ZERO,
        internal: true,
    };
    let result = serve_grpc(spec, listener, routes, shutdown.clone()).await;
    shutdown.cancel();
    let _ = purge.await;
    result
}

/// Deletes expired messages once a minute.
async fn purge_expired(inbox: bluetick_store::InboxStoreRef, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                match inbox.purge_expired(bluetick_common::now_ms()).await {
                    Ok(0) => {}
                    Ok(purged) => tracing::info!(purged, "expired unread messages deleted"),
                    Err(error) => tracing::warn!(%error, "purging expired messages failed"),
                }
            }
        }
    }
}
