//! In-process calls between services that share one process (`bluetick-dev`, `make run`).
//!
//! When [`enable`] was called, every server started by [`crate::server::serve`] also
//! registers its full service stack (the same routes, health, reflection and trace layer
//! its TCP listener serves) under its URL, `http://<bound address>`. An
//! [`crate::channel::InternalChannel`] whose single peer URL is registered then hands each
//! request to that stack directly: the request is still encoded, routed, traced and
//! decoded exactly as over the network, but no HTTP/2 framing, socket or extra task is
//! involved. Deadlines set with `grpc-timeout` are enforced here, as tonic's server would.
//!
//! A URL is unregistered when its server begins to shut down (or its server future is
//! dropped), so later calls go over TCP (and find
//! the server gone) like any other caller's. Balanced settings (comma lists, `dns://`) and
//! processes that never call [`enable`] (every standalone service binary) always use TCP.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, RwLock};
use std::time::Duration;

use tonic::body::Body;
use tower::util::BoxCloneSyncService;

/// A server's whole service stack, callable in-process.
pub type LocalService = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

static ENABLED: AtomicBool = AtomicBool::new(false);
static SERVICES: LazyLock<RwLock<HashMap<String, LocalService>>> = LazyLock::new(Default::default);

/// Lets servers of this process register for in-process calls (see the module docs).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Returns whether in-process calls are enabled in this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A server's registration; dropping it unregisters the URL.
#[derive(Debug)]
pub(crate) struct Registration {
    url: String,
}

impl Registration {
    /// Registers `service` under `url`, replacing an earlier registration.
    pub(crate) fn new(url: String, service: LocalService) -> Self {
        SERVICES
            .write()
            .unwrap_or_else(|poison| poison.into_inner())
            .insert(url.clone(), service);
        Self { url }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        SERVICES
            .write()
            .unwrap_or_else(|poison| poison.into_inner())
            .remove(&self.url);
    }
}

/// Returns the service registered under `url`, if in-process calls are enabled.
pub(crate) fn lookup(url: &str) -> Option<LocalService> {
    if !enabled() {
        return None;
    }
    SERVICES
        .read()
        .unwrap_or_else(|poison| poison.into_inner())
        .get(url)
        .cloned()
}

/// Calls `service` with `request`, answering DEADLINE_EXCEEDED when the request's
/// `grpc-timeout` passes first.
pub(crate) async fn call(
    service: LocalService,
    request: http::Request<Body>,
) -> http::Response<Body> {
    use tower::ServiceExt;
    let timeout = request
        .headers()
        .get("grpc-timeout")
        .and_then(|value| value.to_str().ok())
        .and_then(parse_grpc_timeout);
    let response = async {
        match service.oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    };
    match timeout {
        Some(timeout) => tokio::time::timeout(timeout, response)
            .await
            .unwrap_or_else(|_| tonic::Status::deadline_exceeded("deadline exceeded").into_http()),
        None => response.await,
    }
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_like_the_spec_says() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
    }
}
