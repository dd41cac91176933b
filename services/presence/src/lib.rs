//! The presence service: heartbeats, online/offline, last seen and its privacy, and the
//! routing table of which gateway instance holds which device.
//!
//! Online state and routes live in memory (`state::PresenceState`), refreshed by the
//! gateways' batched heartbeats, so a restarted presence instance relearns every route within
//! one heartbeat interval. Last seen is written to the [`PresenceStore`] coalesced: a flush
//! task writes the latest time of every user seen since the previous flush, not a write per
//! heartbeat. A device that misses `missed_beats` intervals is dropped by the sweeper.
//!
//! [`PresenceStore`]: bluetick_store::PresenceStore

mod service;
mod state;

use std::sync::Arc;
use std::time::Duration;

use bluetick_common::server::{ServerSpec, serve as serve_grpc};
use bluetick_proto::presence::v1::presence_server::PresenceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use service::PresenceService;

/// How the presence service runs.
#[derive(Clone, Debug)]
pub struct PresenceConfig {
    /// Where last seen and privacy settings are stored.
    pub store_url: String,
    /// How often devices heartbeat.
    pub heartbeat_interval: Duration,
    /// A device missing this many intervals is offline.
    pub missed_beats: u32,
    /// How often coalesced last-seen times are written.
    pub flush_interval: Duration,
    /// How long a fresh instance reports NOT_SERVING while the gateways' heartbeat reports
    /// rebuild its routing table. Zero for a single instance (nothing to fall back on);
    /// two heartbeat intervals when it is one of several replicas.
    pub warm_up: Duration,
}

impl PresenceConfig {
    /// Returns the defaults with `store_url`.
    pub fn new(store_url: impl Into<String>) -> Self {
        Self {
            store_url: store_url.into(),
            heartbeat_interval: Duration::from_secs(5),
            missed_beats: 3,
            flush_interval: Duration::from_secs(1),
            warm_up: Duration::ZERO,
        }
    }
}

/// Serves the presence service on `listener` until `shutdown`, then flushes last seen.
///
/// # Errors
/// When the store cannot be opened or the server fails.
pub async fn serve(
    config: PresenceConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = bluetick_store::open_presence_store(&config.store_url).await?;
    let state = Arc::new(state::PresenceState::new(
        store,
        config.heartbeat_interval * config.missed_beats,
    ));
    let background = tokio::spawn(state::run_background(
        state.clone(),
        config.heartbeat_interval,
        config.flush_interval,
        shutdown.clone(),
    ));
    let routes = tonic::service::Routes::new(PresenceServer::new(PresenceService::new(
        state,
        config.warm_up,
    )));
    let spec = ServerSpec {
        service_names: vec!["bluetick.presence.v1.Presence"],
        accept_http1: false,
        warm_up: config.warm_up,
        internal: true,
    };
    let result = serve_grpc(spec, listener, routes, shutdown.clone()).await;
    shutdown.cancel();
    let _ = background.await;
    result
}
