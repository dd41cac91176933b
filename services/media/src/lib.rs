//! bluetick's media service: blobs addressed by the SHA-256 of their bytes.
//!
//! Clients upload (bearer token needed, checked with the gateway) and get the hash back;
//! anyone holding a hash can download the blob, since the hash is the capability and the
//! bytes are end-to-end encrypted ciphertext anyway. One port serves both:
//!
//! - gRPC `bluetick.media.v1.Media` ([`service`]): client-streamed Upload, server-streamed
//!   Download of a byte range, Stat;
//! - plain HTTP ([`http`]): `PUT /v1/media`, `GET`/`HEAD /v1/media/{sha256}` with ranges.
//!
//! Uploads stream straight into the [`bluetick_blob`] store, hashed on the way and held to
//! [`MediaConfig::max_upload_bytes`]; a failed or oversize upload leaves nothing behind.

use std::time::Duration;

use anyhow::Context;
use bluetick_blob::{open_blob_store, redact_blob_url};
use bluetick_common::channel::internal_channel;
use bluetick_common::server::ServerSpec;
use bluetick_proto::media::v1::media_server::MediaServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

mod auth;
mod config;
mod error;
pub mod http;
pub mod service;
mod upload;

pub use config::{DEFAULT_MAX_UPLOAD_BYTES, MediaConfig};
pub use error::{MediaError, MediaResult};
pub use service::{DOWNLOAD_CHUNK_BYTES, MediaService};

/// Fully qualified name of the gRPC service, for health and reflection.
pub const MEDIA_SERVICE_NAME: &str = "bluetick.media.v1.Media";

/// Largest accepted gRPC message: a 4 MiB upload frame plus protobuf overhead.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 4 * 1024 * 1024 + 64 * 1024;

/// Serves the media service (gRPC and HTTP) on `listener` until `shutdown` is cancelled,
/// then drains in-flight transfers.
///
/// # Errors
/// Fails on an invalid config, when the blob store cannot be opened or the server stops
/// with a transport error.
pub async fn serve(
    config: MediaConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate().context("invalid media config")?;
    let store = open_blob_store(&config.blob_url).await.with_context(|| {
        format!(
            "failed to open blob store {}",
            redact_blob_url(&config.blob_url)
        )
    })?;
    let gateway_channel = internal_channel(&config.gateway_url)
        .with_context(|| format!("invalid gateway url {}", config.gateway_url))?;
    let authenticator = auth::Authenticator::new(
        gateway_channel,
        config.auth_cache_ttl(),
        config.auth_cache_capacity,
    );
    let media_service = MediaService::new(store, authenticator, config.max_upload_bytes);

    let grpc_service = MediaServer::new(media_service.clone())
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let router = Routes::new(grpc_service)
        .into_axum_router()
        .merge(http::router(media_service));
    let spec = ServerSpec {
        service_names: vec![MEDIA_SERVICE_NAME],
        accept_http1: true,
        warm_up: std::time::Duration::ZERO,
        internal: false,
    };
    tracing::info!(
        address = %listener.local_addr().context("listener has no address")?,
        blob_url = %redact_blob_url(&config.blob_url),
        max_upload_bytes = config.max_upload_bytes,
        "media service listening (grpc and http)"
    );
    bluetick_common::server::serve(spec, listener, Routes::from(router), shutdown).await
}

/// How long `main` waits for transfers to drain after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
