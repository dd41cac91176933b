//! All five bluetick services in one process: `make run` for a laptop, and the in-process
//! cluster the end-to-end tests start.
//!
//! Each service gets its own gRPC server on its own loopback port, running exactly the
//! `serve` its standalone binary runs. They call each other through the same gRPC stacks
//! in-process (`bluetick_common::local`: encoded, routed, traced and decoded as over the
//! network, without HTTP/2 framing and sockets), unless `in_process_calls` is off; clients
//! and grpcurl reach every server over TCP as usual. Data lives
//! in one directory: `<data>/gateway`, `<data>/messaging`, `<data>/ack`, `<data>/presence`
//! (embedded stores) and `<data>/media` (blobs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bluetick_ack::AckConfig;
use bluetick_gateway::GatewayConfig;
use bluetick_media::MediaConfig;
use bluetick_messaging::MessagingConfig;
use bluetick_presence::PresenceConfig;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Where and how the cluster runs.
#[derive(Clone, Debug)]
pub struct DevConfig {
    /// Data directory (created if missing).
    pub data_dir: PathBuf,
    /// Address every server binds.
    pub host: String,
    /// Ports; 0 picks a free one.
    pub ports: Ports,
    /// Heartbeat interval devices must keep.
    pub heartbeat_interval: Duration,
    /// Largest message payload per device.
    pub max_payload_bytes: usize,
    /// Largest media upload.
    pub max_upload_bytes: u64,
    /// Unread messages expire after this long.
    pub message_ttl: Duration,
    /// Store URL used instead of the data directory's embedded stores (later: engines).
    pub store_url: Option<String>,
    /// Blob URL used instead of `<data>/media`.
    pub media_url: Option<String>,
    /// Serve Prometheus metrics of every service on this port (`/metrics`); 0 picks a free
    /// one; `None` (the default) serves none.
    pub metrics_port: Option<u16>,
    /// Services call each other in-process rather than over loopback TCP (default true).
    pub in_process_calls: bool,
}

/// The port of each server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Ports {
    pub gateway: u16,
    pub gateway_internal: u16,
    pub messaging: u16,
    pub ack: u16,
    pub presence: u16,
    pub media: u16,
}

impl Ports {
    /// The fixed ports of `make run`.
    pub const DEFAULT: Ports = Ports {
        gateway: 7700,
        messaging: 7701,
        ack: 7702,
        presence: 7703,
        media: 7704,
        gateway_internal: 7710,
    };

    /// Every port picked by the OS.
    pub const EPHEMERAL: Ports = Ports {
        gateway: 0,
        messaging: 0,
        ack: 0,
        presence: 0,
        media: 0,
        gateway_internal: 0,
    };
}

impl DevConfig {
    /// Returns the `make run` defaults with data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            host: "127.0.0.1".into(),
            ports: Ports::DEFAULT,
            heartbeat_interval: Duration::from_secs(5),
            max_payload_bytes: 64 * 1024,
            max_upload_bytes: 100 * 1024 * 1024,
            message_ttl: Duration::from_secs(30 * 24 * 3600),
            store_url: None,
            media_url: None,
            metrics_port: None,
            in_process_calls: true,
        }
    }
}

/// URLs of a running cluster.
#[derive(Clone, Debug, Serialize)]
pub struct Endpoints {
    /// Clients: accounts, keys, chat, presence.
    pub gateway: String,
    /// Clients: media over gRPC and HTTP.
    pub media: String,
    /// Internal.
    pub gateway_internal: String,
    pub messaging: String,
    pub ack: String,
    pub presence: String,
    /// Prometheus metrics of every service (`http://host:port/metrics`), when enabled.
    pub metrics: Option<String>,
}

/// A running cluster. Stop it with [`DevCluster::shutdown`].
#[derive(Debug)]
pub struct DevCluster {
    pub endpoints: Endpoints,
    pub ports: Ports,
    shutdown: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

async fn bind(host: &str, port: u16) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = bluetick_common::server::listen((host, port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    let address = listener.local_addr()?;
    Ok((listener, address))
}

impl DevCluster {
    /// Binds every port, then starts every service.
    ///
    /// # Errors
    /// When a port cannot be bound or the data directory cannot be created.
    pub async fn start(config: DevConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
        if config.in_process_calls {
            bluetick_common::local::enable();
        }
        let host = config.host.as_str();
        let (gateway_listener, gateway_addr) = bind(host, config.ports.gateway).await?;
        let (internal_listener, internal_addr) = bind(host, config.ports.gateway_internal).await?;
        let (messaging_listener, messaging_addr) = bind(host, config.ports.messaging).await?;
        let (ack_listener, ack_addr) = bind(host, config.ports.ack).await?;
        let (presence_listener, presence_addr) = bind(host, config.ports.presence).await?;
        let (media_listener, media_addr) = bind(host, config.ports.media).await?;
        let metrics_listener_opt = match config.metrics_port {
            Some(port) => Some(bind(host, port).await?),
            None => None,
        };
        let url = |address: SocketAddr| format!("http://{address}");
        let endpoints = Endpoints {
            gateway: url(gateway_addr),
            media: url(media_addr),
            gateway_internal: url(internal_addr),
            messaging: url(messaging_addr),
            ack: url(ack_addr),
            presence: url(presence_addr),
            metrics: metrics_listener_opt
                .as_ref()
                .map(|(_, address)| format!("http://{address}/metrics")),
        };
        let ports = Ports {
            gateway: gateway_addr.port(),
            gateway_internal: internal_addr.port(),
            messaging: messaging_addr.port(),
            ack: ack_addr.port(),
            presence: presence_addr.port(),
            media: media_addr.port(),
        };
        let store = |name: &str| {
            config
                .store_url
                .clone()
                .unwrap_or_else(|| config.data_dir.join(name).to_string_lossy().into_owned())
        };

        let shutdown = CancellationToken::new();
        let mut tasks: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)> = Vec::new();

        if let Some((metrics_listener, _)) = metrics_listener_opt {
            tasks.push((
                "metrics",
                tokio::spawn(bluetick_common::metrics::serve_metrics(
                    metrics_listener,
                    shutdown.child_token(),
                )),
            ));
        }

        let mut presence = PresenceConfig::new(store("presence"));
        presence.heartbeat_interval = config.heartbeat_interval;
        tasks.push((
            "presence",
            tokio::spawn(bluetick_presence::serve(
                presence,
                presence_listener,
                shutdown.child_token(),
            )),
        ));

        let mut ack = AckConfig::new(store("ack"), endpoints.presence.clone());
        ack.node_id = 1;
        tasks.push((
            "ack",
            tokio::spawn(bluetick_ack::serve(
                ack,
                ack_listener,
                shutdown.child_token(),
            )),
        ));

        let mut messaging = MessagingConfig::new(
            store("messaging"),
            endpoints.ack.clone(),
            endpoints.presence.clone(),
        );
        messaging.max_payload_bytes = config.max_payload_bytes;
        messaging.message_ttl = config.message_ttl;
        messaging.node_id = 1;
        tasks.push((
            "messaging",
            tokio::spawn(bluetick_messaging::serve(
                messaging,
                messaging_listener,
                shutdown.child_token(),
            )),
        ));

        let mut gateway = GatewayConfig::new(
            store("gateway"),
            endpoints.messaging.clone(),
            endpoints.ack.clone(),
            endpoints.presence.clone(),
        );
        gateway.heartbeat_interval = config.heartbeat_interval;
        gateway.max_payload_bytes = config.max_payload_bytes;
        tasks.push((
            "gateway",
            tokio::spawn(bluetick_gateway::serve(
                gateway,
                gateway_listener,
                internal_listener,
                shutdown.child_token(),
            )),
        ));

        let media = MediaConfig {
            blob_url: config
                .media_url
                .clone()
                .unwrap_or_else(|| config.data_dir.join("media").to_string_lossy().into_owned()),
            gateway_url: endpoints.gateway_internal.clone(),
            max_upload_bytes: config.max_upload_bytes,
            ..MediaConfig::default()
        };
        tasks.push((
            "media",
            tokio::spawn(bluetick_media::serve(
                media,
                media_listener,
                shutdown.child_token(),
            )),
        ));

        Ok(Self {
            endpoints,
            ports,
            shutdown,
            tasks,
        })
    }

    /// Waits until every server answers its health check as SERVING (stores opened, schema
    /// applied), or fails as soon as a service stops or `timeout` passes.
    ///
    /// # Errors
    /// The first service's error, or a timeout naming the services not ready.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let urls = [
            ("gateway", self.endpoints.gateway.clone()),
            ("gateway-internal", self.endpoints.gateway_internal.clone()),
            ("messaging", self.endpoints.messaging.clone()),
            ("ack", self.endpoints.ack.clone()),
            ("presence", self.endpoints.presence.clone()),
            ("media", self.endpoints.media.clone()),
        ];
        let deadline = tokio::time::Instant::now() + timeout;
        let mut waiting: Vec<(&str, String)> = urls.to_vec();
        while !waiting.is_empty() {
            if let Some(index) = self.tasks.iter().position(|(_, task)| task.is_finished()) {
                let (name, task) = self.tasks.swap_remove(index);
                self.shutdown.cancel();
                let error = match task.await {
                    Ok(Err(error)) => error,
                    Ok(Ok(())) => anyhow::anyhow!("stopped during start-up"),
                    Err(join_error) => anyhow::anyhow!("panicked: {join_error}"),
                };
                return Err(error.context(format!("{name} failed to start")));
            }
            let mut still = Vec::new();
            for (name, url) in waiting {
                if !is_serving(&url).await {
                    still.push((name, url));
                }
            }
            waiting = still;
            if waiting.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let names: Vec<&str> = waiting.iter().map(|(name, _)| *name).collect();
                anyhow::bail!("not ready after {timeout:?}: {}", names.join(", "));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Returns a token that stops every service when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until any service stops (an error, or shutdown); then stops the rest.
    ///
    /// # Errors
    /// The first service error.
    pub async fn wait(self) -> anyhow::Result<()> {
        let shutdown = self.shutdown.clone();
        let mut result = Ok(());
        let mut pending: Vec<_> = self
            .tasks
            .into_iter()
            .map(|(name, task)| Box::pin(async move { (name, task.await) }))
            .collect();
        while !pending.is_empty() {
            let ((name, outcome), _, rest) = futures_select_all(pending).await;
            pending = rest;
            let service_result = match outcome {
                Ok(inner) => inner,
                Err(join_error) => Err(anyhow::anyhow!("task panicked: {join_error}")),
            };
            if let Err(error) = service_result {
                tracing::error!(
                    service = name,
                    error = format!("{error:#}"),
                    "service failed"
                );
                if result.is_ok() {
                    result = Err(error.context(format!("{name} failed")));
                }
            }
            shutdown.cancel();
        }
        result
    }

    /// Stops every service and waits for them to drain.
    ///
    /// # Errors
    /// The first service error.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Returns true if the server at `url` reports SERVING for the whole server.
async fn is_serving(url: &str) -> bool {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .ok()?
            .connect()
            .await
            .ok()?;
        let mut client = HealthClient::new(channel);
        let response = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        Some(response.get_ref().status == ServingStatus::Serving as i32)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), check).await,
        Ok(Some(true))
    )
}

/// `futures::future::select_all` without the extra dependency in this crate's API.
async fn futures_select_all<F: std::future::Future + Unpin>(
    futures: Vec<F>,
) -> (F::Output, usize, Vec<F>) {
    let mut futures = futures;
    std::future::poll_fn(move |cx| {
        for index in 0..futures.len() {
            if let std::task::Poll::Ready(output) = std::pin::Pin::new(&mut futures[index]).poll(cx)
            {
                let _finished = futures.swap_remove(index);
                return std::task::Poll::Ready((output, index, std::mem::take(&mut futures)));
            }
        }
        std::task::Poll::Pending
    })
    .await
}
