//! The gateway: the front door of bluetick.
//!
//! It owns one long-lived bidirectional stream per connected device (`chat`), the
//! accounts, devices and public-key directory ([`accounts`]), and the table of devices
//! connected to this instance (`sessions`). It authenticates every call (the sender of
//! everything on a stream is the token's device, never a field a client fills in) and
//! forwards: sends to messaging, receipts to ack, heartbeats to presence. Other services
//! reach it through `internal` to deliver frames to its devices and to check tokens.
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

use bluetick_common::channel::{InternalChannel, internal_channel};
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
use tonic::Status;

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
    /// Reads (last seen, watch) go to any presence replica.
    presence: PresenceClient<TracedChannel>,
    /// Route changes (attach, detach, heartbeats) go to every presence replica, so each
    /// holds the whole routing table; see [`Gateway::tell_every_presence`].
    presence_peers: PresencePeers,
    sessions: sessions::Sessions,
    /// Sessions syncing (attach, backlog, stored receipts) at once; see [`MAX_SYNCS`].
    syncs: tokio::sync::Semaphore,
    shutdown: CancellationToken,
}

/// Sessions of one gateway that attach and read their backlog at the same time. Each sync
/// makes several internal calls; in a connect storm (a gateway's devices all reconnecting
/// after a restart) the others wait here, already connected and welcomed, instead of
/// pushing every call past its deadline so that all of them fail and reconnect again.
const MAX_SYNCS: usize = 64;

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
    let presence_channel = internal_channel(&config.presence_url)?;
    let gateway = Arc::new(Gateway {
        internal_url,
        accounts,
        messaging: MessagingClient::new(traced(internal_channel(&config.messaging_url)?))
            .max_decoding_message_size(max_frame)
            .max_encoding_message_size(max_frame),
        ack: AckClient::new(traced(internal_channel(&config.ack_url)?)),
        presence: PresenceClient::new(traced(presence_channel.clone())),
        presence_peers: PresencePeers::new(presence_channel),
        sessions: sessions::Sessions::default(),
        syncs: tokio::sync::Semaphore::new(MAX_SYNCS),
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
        warm_up: std::time::Duration::ZERO,
        internal: false,
    };
    let internal_routes = tonic::service::Routes::new(
        GatewayInternalServer::new(internal::InternalService::new(gateway.clone()))
            .max_decoding_message_size(max_frame * 16),
    );
    let internal_spec = ServerSpec {
        service_names: vec!["bluetick.gateway.v1.GatewayInternal"],
        accept_http1: false,
        warm_up: std::time::Duration::ZERO,
        internal: true,
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

/// One client per presence replica, for calls every replica must see.
#[derive(Debug)]
struct PresencePeers {
    /// Tells which replicas are reachable now.
    balanced: InternalChannel,
    clients: std::sync::Mutex<std::collections::HashMap<String, PresenceClient<InternalChannel>>>,
}

impl PresencePeers {
    fn new(balanced: InternalChannel) -> Self {
        Self {
            balanced,
            clients: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Returns a client for each reachable presence replica.
    fn clients(&self) -> Vec<(String, PresenceClient<InternalChannel>)> {
        let endpoints = self.balanced.reachable_endpoints();
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        clients.retain(|endpoint, _| endpoints.contains(endpoint));
        endpoints
            .into_iter()
            .filter_map(|endpoint| {
                if let Some(client) = clients.get(&endpoint) {
                    return Some((endpoint, client.clone()));
                }
                match internal_channel(&endpoint) {
                    Ok(channel) => {
                        let client = PresenceClient::new(channel);
                        clients.insert(endpoint.clone(), client.clone());
                        Some((endpoint, client))
                    }
                    Err(error) => {
                        tracing::warn!(%endpoint, %error, "invalid presence endpoint");
                        None
                    }
                }
            })
            .collect()
    }
}

impl Gateway {
    /// Makes the same route change on every reachable presence replica, concurrently.
    ///
    /// Presence replicas do not talk to each other: each keeps the full routing table
    /// (small, in memory) because every gateway tells every replica, and any replica can
    /// answer a `Locate`. A replica that misses a change (down, restarting) relearns the
    /// routes from the next heartbeat reports and stays out of the balancer meanwhile (it
    /// reports NOT_SERVING while it warms up).
    ///
    /// # Errors
    /// The last replica's status when no replica took the change.
    pub(crate) async fn tell_every_presence<F, Fut, T>(&self, call: F) -> Result<Vec<T>, Status>
    where
        F: Fn(PresenceClient<InternalChannel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let peers = self.presence_peers.clients();
        let results = futures::future::join_all(peers.into_iter().map(|(endpoint, client)| {
            let attempt = call(client);
            async move { (endpoint, attempt.await) }
        }))
        .await;
        let mut last_error = Status::unavailable("no presence replica reachable");
        let mut answers = Vec::new();
        for (endpoint, result) in results {
            match result {
                Ok(answer) => answers.push(answer),
                Err(status) => {
                    tracing::debug!(%endpoint, %status, "presence replica missed a route change");
                    last_error = status;
                }
            }
        }
        if answers.is_empty() {
            Err(last_error)
        } else {
            Ok(answers)
        }
    }
}
