//! The gateway: the front door of bluetick.
//!
//! It owns one long-lived bidirectional stream per connected device ([`chat`]), the
//! accounts, devices and public-key directory ([`accounts`]), and the table of devices
//! connected to this instance ([`sessions`]). It authenticates every call (the sender of
//! everything on a stream is the token's device, never a field a client fills in) and
//! forwards: sends to messaging, receipts to ack, heartbeats to presence. Other services
//! reach it through [`internal`] to deliver frames to its devices and to check tokens.
//!
//! It listens twice: the public API for clients, and the internal API for the other
//! services, which must never be exposed to clients.

pub mod accounts;
mod chat;
mod internal;
mod presence_api;
mod sessions;

use std::sync::Arc;
use std::time::Duration;

use bluetick_common::channel::lazy_channel;
use bluetick_common::server::{ServerSpec, serve as serve_grpc};
use bluetick_common::trace::{TracedChannel, traced};
use bluetick_proto::ack::v1::ack_client::AckClient;
use bluetick_proto::gateway::v1::accounts_server::AccountsServer;
use bluetick_proto::gateway::v1::chat_server::ChatServer;
use bluetick_proto::gateway::v1::gateway_internal_server::GatewayInternalServer;
use bluetick_proto::gateway::v1::keys_server::KeysServer;
use bluetick_proto::gateway::v1::presence_server::PresenceServer;
use bluetick_proto::messaging::v1::messaging_client::MessagingClient;
use bluetick_proto::presence::v1::presence_client::PresenceClient;
use bluetick_store::AccountStoreRef;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How the gateway runs.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Where accounts and keys are stored.
    pub store_url: String,
    /// The messaging service.
    pub messaging_url: String,
    /// The ack service.
    pub ack_url: String,
    /// The presence service.
    pub presence_url: String,
    /// This instance's internal endpoint as other services reach it (e.g.
    /// `http://10.0.0.7:7710`). Empty: derived from the internal listener's address.
    pub advertise_internal_url: String,
    /// How often devices must heartbeat.
    pub heartbeat_interval: Duration,
    /// A device silent for this many intervals is disconnected.
    pub missed_beats: u32,
    /// Largest payload per device, in bytes.
    pub max_payload_bytes: usize,
    /// Frames queued per device before it counts as too slow and is disconnected.
    pub device_queue_capacity: usize,
}

impl GatewayConfig {
    /// Returns the defaults with the given store and peers.
    pub fn new(
        store_url: impl Into<String>,
        messaging_url: impl Into<String>,
        ack_url: impl Into<String>,
        presence_url: impl Into<String>,
    ) -> Self {
        Self {
            store_url: store_url.into(),
            messaging_url: messaging_url.into(),
            ack_url: ack_url.into(),
            presence_url: presence_url.into(),
            advertise_internal_url: String::new(),
            heartbeat_interval: Duration::from_secs(5),
            missed_beats: 3,
            max_payload_bytes: 64 * 1024,
            device_queue_capacity: 1_024,
        }
    }
}

/// What every part of the gateway shares.
#[derive(Debug)]
pub(crate) struct Gateway {
    config: GatewayConfig,
    /// This instance's internal endpoint, given to presence as the route to its devices.
    internal_url: String,
    accounts: AccountStoreRef,
    messaging: MessagingClient<TracedChannel>,
    ack: AckClient<TracedChannel>,
    presence: PresenceClient<TracedChannel>,
    sessions: sessions::Sessions,
    shutdown: CancellationToken,
}

/// Serves the public API on `public_listener` and the internal API on `internal_listener`
/// until `shutdown`; then closes every device stream (clients reconnect elsewhere).
///
/// # Errors
/// When the store cannot be opened, a peer URL is invalid or a server fails.
pub async fn serve(
    config: GatewayConfig,
    public_listener: TcpListener,
    internal_listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let accounts = bluetick_store::open_account_store(&config.store_url).await?;
    let internal_url = if config.advertise_internal_url.is_empty() {
        format!("http://{}", internal_listener.local_addr()?)
    } else {
        config.advertise_internal_url.clone()
    };
    let max_frame = config.max_payload_bytes * 64 + 64 * 1024;
    let gateway = Arc::new(Gateway {
        internal_url,
        accounts,
        messaging: MessagingClient::new(traced(lazy_channel(&config.messaging_url)?))
            .max_decoding_message_size(max_frame)
            .max_encoding_message_size(max_frame),
        ack: AckClient::new(traced(lazy_channel(&config.ack_url)?)),
        presence: PresenceClient::new(traced(lazy_channel(&config.presence_url)?)),
        sessions: sessions::Sessions::default(),
        shutdown: shutdown.clone(),
        config,
    });
    let reporter = tokio::spawn(chat::report_heartbeats(gateway.clone()));

    let public_routes = tonic::service::Routes::new(AccountsServer::new(
        accounts::AccountsService::new(gateway.clone()),
    ))
    .add_service(KeysServer::new(accounts::KeysService::new(gateway.clone())))
    .add_service(PresenceServer::new(presence_api::PresenceApi::new(
        gateway.clone(),
    )))
    .add_service(
        ChatServer::new(chat::ChatService::new(gateway.clone()))
            .max_decoding_message_size(max_frame),
    );
    let public_spec = ServerSpec {
        service_names: vec![
            "bluetick.gateway.v1.Accounts",
            "bluetick.gateway.v1.Keys",
            "bluetick.gateway.v1.Presence",
            "bluetick.gateway.v1.Chat",
        ],
        accept_http1: false,
    };
    let internal_routes = tonic::service::Routes::new(
        GatewayInternalServer::new(internal::InternalService::new(gateway.clone()))
            .max_decoding_message_size(max_frame * 16),
    );
    let internal_spec = ServerSpec {
        service_names: vec!["bluetick.gateway.v1.GatewayInternal"],
        accept_http1: false,
    };
    let result = tokio::try_join!(
        serve_grpc(
            public_spec,
            public_listener,
            public_routes,
            shutdown.clone()
        ),
        serve_grpc(
            internal_spec,
            internal_listener,
            internal_routes,
            shutdown.clone()
        ),
    );
    shutdown.cancel();
    let _ = reporter.await;
    result.map(|_| ())
}
