//! The gRPC server bootstrap every service uses: health, reflection, keep-alives and a
//! graceful shutdown that first reports NOT_SERVING. Every request runs in a `grpc.server`
//! span continuing the caller's trace ([`crate::trace::ServerTraceLayer`]).

use std::time::Duration;

use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::ServingStatus;

/// How one service's gRPC server is mounted.
#[derive(Debug)]
pub struct ServerSpec {
    /// Fully qualified names of the gRPC services in `routes`, reported by health and
    /// reflection (e.g. `bluetick.messaging.v1.Messaging`).
    pub service_names: Vec<&'static str>,
    /// Also accept HTTP/1.1 (media serves plain HTTP on the same port).
    pub accept_http1: bool,
    /// Report NOT_SERVING this long after start (a presence replica relearning routes), so
    /// balancing callers and readiness probes wait; zero reports SERVING at once.
    pub warm_up: Duration,
    /// Only other bluetick services call this server. HTTP/2's guard against floods of
    /// streams reset before they were accepted (20 by default, the "rapid reset" defence
    /// a public port needs) is then raised: during a connect storm callers legitimately
    /// give up on many queued calls at once, and tripping the guard would close the whole
    /// connection and fail every call on it.
    pub internal: bool,
}

/// Connections the kernel queues for a listener before `accept` takes them (capped by
/// `net.core.somaxconn`, 4096 on current kernels).
pub const LISTEN_BACKLOG: u32 = 4_096;

/// Binds `address` (`host:port`, a name is resolved) and listens with [`LISTEN_BACKLOG`].
///
/// `TcpListener::bind` listens with a backlog of 128. When more devices than that connect at
/// once (a gateway's devices coming back after a restart, 200 recipients in `bluetick-bench
/// offline`), the kernel drops the surplus SYNs and those clients retry only after TCP's
/// 1 s retransmission timeout (then 3 s, 7 s): measured as 1 s stalls of the whole drain,
/// with `ListenOverflows` counting the drops.
///
/// # Errors
/// When the address does not resolve or cannot be bound.
pub async fn listen(address: impl tokio::net::ToSocketAddrs) -> std::io::Result<TcpListener> {
    let mut last_error = None;
    for resolved in tokio::net::lookup_host(address).await? {
        let socket = if resolved.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As std's bind does on Unix: a restarted server can bind while old connections
        // linger in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        match socket.bind(resolved) {
            Ok(()) => return socket.listen(LISTEN_BACKLOG),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolved to nothing",
        )
    }))
}

/// Streams reset before being accepted that an internal server tolerates per connection.
const INTERNAL_MAX_PENDING_ACCEPT_RESETS: usize = 4_096;

/// Serves `routes` plus `grpc.health.v1` and server reflection on `listener` until
/// `shutdown` is cancelled, then reports NOT_SERVING and drains in-flight calls.
///
/// # Errors
/// Fails if reflection cannot be built or the server stops with a transport error.
pub async fn serve(
    spec: ServerSpec,
    listener: TcpListener,
    routes: Routes,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let initial = if spec.warm_up.is_zero() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for name in spec.service_names.iter().copied().chain([""]) {
        health_reporter.set_service_status(name, initial).await;
    }
    if !spec.warm_up.is_zero() {
        let reporter = health_reporter.clone();
        let names = spec.service_names.clone();
        let warm_up = spec.warm_up;
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(warm_up) => {
                    for name in names.iter().copied().chain([""]) {
                        reporter.set_service_status(name, ServingStatus::Serving).await;
                    }
                    tracing::info!("warmed up, serving");
                }
            }
        });
    }

    let mut reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(bluetick_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health");
    let mut reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(bluetick_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health");
    for name in &spec.service_names {
        reflection_v1 = reflection_v1.with_service_name(*name);
        reflection_v1alpha = reflection_v1alpha.with_service_name(*name);
    }
    let routes = routes
        .add_service(health_service)
        .add_service(reflection_v1.build_v1()?)
        .add_service(reflection_v1alpha.build_v1alpha()?);

    // In-process callers (see `crate::local`) get the same stack the listener serves. The
    // registration lives in the shutdown future below: it ends when shutdown begins, or when
    // the server future is dropped without a shutdown (a test's runtime ending), so the
    // registry never keeps a server's stores alive.
    let registration_opt = if crate::local::enabled() {
        let url = format!("http://{}", listener.local_addr()?);
        let stack = tower::ServiceBuilder::new()
            .layer(crate::trace::ServerTraceLayer)
            .service(routes.clone());
        Some(crate::local::Registration::new(
            url,
            tower::util::BoxCloneSyncService::new(stack),
        ))
    } else {
        None
    };

    let incoming = TcpListenerStream::new(listener).map(|stream_result| {
        stream_result.inspect(|stream| {
            let _ = stream.set_nodelay(true);
        })
    });
    let names = spec.service_names.clone();
    let on_shutdown = async move {
        shutdown.cancelled().await;
        drop(registration_opt);
        for name in &names {
            health_reporter
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
        health_reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
    };
    Server::builder()
        .accept_http1(spec.accept_http1)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .http2_max_pending_accept_reset_streams(
            spec.internal.then_some(INTERNAL_MAX_PENDING_ACCEPT_RESETS),
        )
        .layer(crate::trace::ServerTraceLayer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, on_shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1,000 devices connecting at once all complete their TCP handshake while the server
    /// has not accepted any yet. With the default backlog of 128 the 130th connect waits for
    /// TCP's 1 s SYN retransmission instead.
    #[tokio::test]
    async fn a_connect_storm_fits_in_the_listen_queue() {
        let listener = listen("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut streams = Vec::new();
        for index in 0..1_000 {
            let stream = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(address),
            )
            .await
            .unwrap_or_else(|_| panic!("connect {index} waited: the listen queue is full"))
            .unwrap();
            streams.push(stream);
        }
    }
}
