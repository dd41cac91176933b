//! The harness of bluetick's end-to-end tests: an in-process [`TestCluster`] (the same
//! wiring as `make run`, on ephemeral loopback ports, data in a temporary directory) and
//! helpers to register users and open chat sessions through the client SDK.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bluetick_client::{BluetickClient, ChatConfig, ChatEvents, ChatHandle, Credentials, register};
use bluetick_dev::{DevCluster, DevConfig, Endpoints, Ports};

/// Patience for anything the tests wait for.
pub const WAIT: Duration = Duration::from_secs(20);

/// A running in-process cluster with its data directory.
#[derive(Debug)]
pub struct TestCluster {
    cluster: Option<DevCluster>,
    pub endpoints: Endpoints,
    pub config: DevConfig,
    /// Keeps the data directory alive as long as the cluster (and for checks after it).
    _data: Option<tempfile::TempDir>,
    data_dir: PathBuf,
}

impl TestCluster {
    /// Starts a cluster with default settings.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a cluster after `adjust` changed its configuration.
    pub async fn start_with(adjust: impl FnOnce(&mut DevConfig)) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut config = DevConfig::new(data.path());
        config.ports = Ports::EPHEMERAL;
        // `make test` runs this suite a second time on the real engines.
        config.store_url = std::env::var("BLUETICK_TEST_STORE_URL").ok();
        config.media_url = std::env::var("BLUETICK_TEST_MEDIA_URL").ok();
        adjust(&mut config);
        let data_dir = config.data_dir.clone();
        let mut cluster = DevCluster::start(config.clone()).await.unwrap();
        cluster.wait_ready(Duration::from_secs(120)).await.unwrap();
        Self {
            endpoints: cluster.endpoints.clone(),
            cluster: Some(cluster),
            config,
            _data: Some(data),
            data_dir,
        }
    }

    /// The data directory (embedded stores under `gateway/`, `messaging/`, `ack/`,
    /// `presence/`, blobs under `media/`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The store URL `service` (gateway, messaging, ack, presence) uses: the engine URL when
    /// the cluster runs on one, else its embedded directory.
    pub fn store_url(&self, service: &str) -> String {
        self.config
            .store_url
            .clone()
            .unwrap_or_else(|| self.data_dir.join(service).to_string_lossy().into_owned())
    }

    /// Stops every service and waits until they released their stores.
    pub async fn stop(&mut self) {
        if let Some(cluster) = self.cluster.take() {
            cluster.shutdown().await.unwrap();
        }
    }

    /// Stops every service and starts them again on the same data (and engines), on new
    /// ports: what a full restart of every bluetick process looks like to clients.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut config = self.config.clone();
        config.ports = Ports::EPHEMERAL;
        let mut cluster = DevCluster::start(config).await.unwrap();
        cluster.wait_ready(Duration::from_secs(120)).await.unwrap();
        self.endpoints = cluster.endpoints.clone();
        self.cluster = Some(cluster);
    }

    /// Returns `credentials` pointed at the cluster's current endpoints.
    pub fn reaim(&self, credentials: &Credentials) -> Credentials {
        Credentials {
            gateway_url: self.endpoints.gateway.clone(),
            media_url: self.endpoints.media.clone(),
            ..credentials.clone()
        }
    }

    /// Registers a user with a unique handle starting with `prefix`.
    pub async fn user(&self, prefix: &str) -> Credentials {
        let user_id = format!("{prefix}{}", rand::random::<u32>());
        register(
            &self.endpoints.gateway,
            &self.endpoints.media,
            &user_id,
            prefix,
        )
        .await
        .unwrap()
    }

    /// Opens a chat session with `config` and waits for Connected and BacklogDone.
    pub async fn connect_with(
        &self,
        credentials: &Credentials,
        config: ChatConfig,
    ) -> (BluetickClient, ChatHandle, ChatEvents) {
        let client = BluetickClient::new(credentials.clone()).unwrap();
        let (handle, events) = client.open_chat(config).await.unwrap();
        (client, handle, events)
    }

    /// Opens a chat session with the SDK defaults.
    pub async fn connect(
        &self,
        credentials: &Credentials,
    ) -> (BluetickClient, ChatHandle, ChatEvents) {
        self.connect_with(credentials, ChatConfig::default()).await
    }
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Returns the current time in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
