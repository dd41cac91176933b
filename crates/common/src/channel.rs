//! Client channels to other bluetick services.
//!
//! An internal endpoint setting (`--presence-url` and the like) takes three forms:
//!
//! - one URL, `http://127.0.0.1:7703`: one lazy channel, as a single-node setup needs;
//! - a comma-separated list, `http://10.0.0.1:7703,http://10.0.0.2:7703`;
//! - `dns://presence-headless.bluetick.svc:7703`: the name is resolved every
//!   [`RESOLVE_INTERVAL`] and every address it returns is a peer (a Kubernetes headless
//!   Service lists one address per ready pod).
//!
//! Lists and names give an [`InternalChannel`] that balances calls over the peers with
//! tonic's `Channel::balance_channel` (tower's power-of-two-choices balancer). A background
//! task probes every peer's `grpc.health.v1` every [`PROBE_INTERVAL`] and tells the balancer
//! which peers to use (`Change::Insert` / `Change::Remove`): a killed peer drops out within
//! about a second, one that reports NOT_SERVING (draining, warming up) too, and a peer that
//! comes back is used again. Between a peer's death and its probe, a call that fails to
//! reach it is retried once (internal calls are idempotent, see [`InternalChannel`]).

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::sync::{mpsc, watch};
use tonic::Request;
use tonic::body::Body;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::{Service, ServiceExt};

/// Deadline of an internal unary call.
pub const INTERNAL_DEADLINE: Duration = Duration::from_secs(5);
/// How often a `dns://` name is resolved again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(5);
/// How often every peer's health is checked.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Deadline of one health probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// An invalid internal endpoint setting.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A URL in the setting is not a valid URI.
    #[error("invalid endpoint {url:?}: {source}")]
    InvalidUrl {
        /// The offending URL.
        url: String,
        /// Why it is invalid.
        source: tonic::transport::Error,
    },
    /// The setting is empty or a `dns://` target lacks a port.
    #[error(
        "invalid endpoint setting {0:?}: expected a URL, a comma-separated list or dns://host:port"
    )]
    InvalidSetting(String),
}

fn endpoint(url: &str) -> Result<Endpoint, ChannelError> {
    Ok(Endpoint::from_shared(url.to_string())
        .map_err(|source| ChannelError::InvalidUrl {
            url: url.to_string(),
            source,
        })?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// Returns a channel to the single instance at `url` that connects on first use and
/// reconnects after failures (gateway pushes address one gateway instance this way).
///
/// # Errors
/// Fails when `url` is not a valid URI.
pub fn lazy_channel(url: &str) -> Result<Channel, ChannelError> {
    Ok(endpoint(url)?.connect_lazy())
}

/// Wraps `message` in a request with the internal deadline.
pub fn with_deadline<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(INTERNAL_DEADLINE);
    request
}

/// What an endpoint setting names.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// One URL: no balancing, no probing.
    Single(String),
    /// A fixed list of URLs.
    Static(Vec<String>),
    /// A DNS name and port, resolved periodically.
    Dns { host: String, port: u16 },
}

fn parse_target(setting: &str) -> Result<Target, ChannelError> {
    let setting = setting.trim();
    if let Some(rest) = setting.strip_prefix("dns://") {
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| ChannelError::InvalidSetting(setting.to_string()))?;
        let port: u16 = port
            .parse()
            .map_err(|_| ChannelError::InvalidSetting(setting.to_string()))?;
        if host.is_empty() {
            return Err(ChannelError::InvalidSetting(setting.to_string()));
        }
        return Ok(Target::Dns {
            host: host.to_string(),
            port,
        });
    }
    let urls: Vec<String> = setting
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_string)
        .collect();
    match urls.len() {
        0 => Err(ChannelError::InvalidSetting(setting.to_string())),
        1 => Ok(Target::Single(urls[0].clone())),
        _ => Ok(Target::Static(urls)),
    }
}

/// A balanced, retrying channel to the instances of one internal service. Cheap to clone.
///
/// Every call is retried once when it could not reach a peer or the peer answered
/// UNAVAILABLE: every internal RPC is idempotent (accepts are deduplicated by
/// `client_msg_id`, tick changes only move forward, presence calls restate facts), so a
/// second attempt is safe, and the balancer picks again, usually another peer. Request
/// bodies are single messages and are buffered for the retry.
#[derive(Clone, Debug)]
pub struct InternalChannel {
    channel: Channel,
    /// The peer's URL when the setting names exactly one: calls to it go in-process when a
    /// server of this process registered it (see [`crate::local`]).
    single_url_opt: Option<Arc<str>>,
    /// URLs of the peers that answered their last probe (serving or not); for calls that
    /// must reach every instance.
    reachable: watch::Receiver<Vec<String>>,
}

impl InternalChannel {
    /// Returns the URLs of the instances that answered their last health probe (every
    /// configured URL when none did, or for a single URL).
    pub fn reachable_endpoints(&self) -> Vec<String> {
        self.reachable.borrow().clone()
    }
}

/// Returns a channel for an internal endpoint setting (see the module docs).
///
/// Must be called inside a Tokio runtime when the setting names more than one peer (a
/// resolver task is spawned; it ends when the last clone of the channel is dropped).
///
/// # Errors
/// Fails when the setting or one of its URLs is invalid.
pub fn internal_channel(setting: &str) -> Result<InternalChannel, ChannelError> {
    match parse_target(setting)? {
        Target::Single(url) => {
            let channel = lazy_channel(&url)?;
            let (_keep, reachable) = watch::channel(vec![url.clone()]);
            Ok(InternalChannel {
                channel,
                single_url_opt: Some(url.into()),
                reachable,
            })
        }
        target => {
            if let Target::Static(urls) = &target {
                for url in urls {
                    endpoint(url)?;
                }
            }
            let (channel, changes) = Channel::balance_channel::<String>(64);
            let (reachable_sender, reachable) = watch::channel(Vec::new());
            tokio::spawn(run_resolver(target, changes, reachable_sender));
            Ok(InternalChannel {
                channel,
                single_url_opt: None,
                reachable,
            })
        }
    }
}

/// A peer's answer to the last probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    Serving,
    NotServing,
    Down,
}

async fn resolve(target: &Target, previous: &BTreeSet<String>) -> BTreeSet<String> {
    match target {
        Target::Single(url) => BTreeSet::from([url.clone()]),
        Target::Static(urls) => urls.iter().cloned().collect(),
        Target::Dns { host, port } => match tokio::net::lookup_host((host.as_str(), *port)).await {
            Ok(addresses) => addresses
                .map(|address| format!("http://{address}"))
                .collect(),
            Err(error) => {
                tracing::warn!(%host, %error, "cannot resolve peers, keeping the previous ones");
                previous.clone()
            }
        },
    }
}

async fn probe(client: Option<HealthClient<Channel>>) -> Probe {
    let Some(mut client) = client else {
        return Probe::Down;
    };
    let mut request = Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(PROBE_TIMEOUT);
    match tokio::time::timeout(PROBE_TIMEOUT, client.check(request)).await {
        Ok(Ok(response)) if response.get_ref().status == ServingStatus::Serving as i32 => {
            Probe::Serving
        }
        Ok(Ok(_)) => Probe::NotServing,
        // Any gRPC answer means the process is there (e.g. health not mounted).
        Ok(Err(status)) if status.code() != tonic::Code::Unavailable => Probe::NotServing,
        _ => Probe::Down,
    }
}

/// Returns which peers the balancer should use: the serving ones; if none serves, the
/// reachable ones; if none is reachable, all (calls then fail fast with UNAVAILABLE rather
/// than wait for a peer that may never come).
fn choose(probes: &BTreeMap<String, Probe>) -> (BTreeSet<String>, Vec<String>) {
    let with = |wanted: &[Probe]| -> BTreeSet<String> {
        probes
            .iter()
            .filter(|(_, probe)| wanted.contains(probe))
            .map(|(url, _)| url.clone())
            .collect()
    };
    let serving = with(&[Probe::Serving]);
    let reachable = with(&[Probe::Serving, Probe::NotServing]);
    let all: BTreeSet<String> = probes.keys().cloned().collect();
    let balanced = if !serving.is_empty() {
        serving
    } else if !reachable.is_empty() {
        reachable.clone()
    } else {
        all.clone()
    };
    let broadcast = if reachable.is_empty() { all } else { reachable };
    (balanced, broadcast.into_iter().collect())
}

async fn run_resolver(
    target: Target,
    changes: mpsc::Sender<Change<String, Endpoint>>,
    reachable: watch::Sender<Vec<String>>,
) {
    let mut targets = BTreeSet::new();
    let mut health_clients: BTreeMap<String, Option<HealthClient<Channel>>> = BTreeMap::new();
    let mut in_balancer: BTreeSet<String> = BTreeSet::new();
    let mut last_resolve: Option<tokio::time::Instant> = None;
    loop {
        if changes.is_closed() {
            return;
        }
        if last_resolve.is_none_or(|at| at.elapsed() >= RESOLVE_INTERVAL) {
            targets = resolve(&target, &targets).await;
            last_resolve = Some(tokio::time::Instant::now());
            health_clients.retain(|url, _| targets.contains(url));
            for url in &targets {
                health_clients
                    .entry(url.clone())
                    .or_insert_with(|| lazy_channel(url).ok().map(HealthClient::new));
            }
        }
        let probes: BTreeMap<String, Probe> = futures::future::join_all(
            health_clients
                .iter()
                .map(|(url, client)| {
                    let url = url.clone();
                    let client = client.clone();
                    async move { (url, probe(client).await) }
                })
                .collect::<Vec<_>>(),
        )
        .await
        .into_iter()
        .collect();
        let (balanced, broadcast) = choose(&probes);
        for url in in_balancer.difference(&balanced) {
            tracing::info!(peer = %url, "peer leaves the balancer");
            if changes.send(Change::Remove(url.clone())).await.is_err() {
                return;
            }
        }
        for url in balanced.difference(&in_balancer) {
            let Ok(peer) = endpoint(url) else { continue };
            tracing::debug!(peer = %url, "peer joins the balancer");
            if changes
                .send(Change::Insert(url.clone(), peer))
                .await
                .is_err()
            {
                return;
            }
        }
        in_balancer = balanced;
        reachable.send_if_modified(|current| {
            let changed = *current != broadcast;
            if changed {
                current.clone_from(&broadcast);
            }
            changed
        });
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// Returns whether a response is a trailers-only UNAVAILABLE.
fn is_unavailable(response: &http::Response<Body>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_some_and(|status| status.as_bytes() == b"14")
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<http::Request<Body>> for InternalChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call drives a clone of the channel to readiness itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if let Some(local) = self
            .single_url_opt
            .as_deref()
            .and_then(crate::local::lookup)
        {
            return Box::pin(async move { Ok(crate::local::call(local, request).await) });
        }
        let channel = self.channel.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes: Bytes = body.collect().await?.to_bytes();
            let attempt = |channel: Channel| {
                let request =
                    http::Request::from_parts(parts.clone(), Body::new(Full::new(bytes.clone())));
                channel.oneshot(request)
            };
            match attempt(channel.clone()).await {
                Ok(response) if !is_unavailable(&response) => Ok(response),
                first => {
                    match &first {
                        Ok(_) => tracing::debug!("peer answered unavailable, retrying once"),
                        Err(error) => tracing::debug!(%error, "peer unreachable, retrying once"),
                    }
                    Ok(attempt(channel).await?)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_into_targets() {
        assert_eq!(
            parse_target("http://127.0.0.1:7703").ok(),
            Some(Target::Single("http://127.0.0.1:7703".into()))
        );
        assert_eq!(
            parse_target("http://a:1, http://b:2").ok(),
            Some(Target::Static(vec![
                "http://a:1".into(),
                "http://b:2".into()
            ]))
        );
        assert_eq!(
            parse_target("dns://presence.bluetick.svc:7703").ok(),
            Some(Target::Dns {
                host: "presence.bluetick.svc".into(),
                port: 7703
            })
        );
        assert!(parse_target("dns://presence").is_err());
        assert!(parse_target(" , ").is_err());
    }

    #[test]
    fn balancer_prefers_serving_then_reachable_then_all() {
        let probes = BTreeMap::from([
            ("a".to_string(), Probe::Serving),
            ("b".to_string(), Probe::NotServing),
            ("c".to_string(), Probe::Down),
        ]);
        let (balanced, broadcast) = choose(&probes);
        assert_eq!(balanced, BTreeSet::from(["a".to_string()]));
        assert_eq!(broadcast, vec!["a".to_string(), "b".to_string()]);
        let probes = BTreeMap::from([
            ("b".to_string(), Probe::NotServing),
            ("c".to_string(), Probe::Down),
        ]);
        assert_eq!(choose(&probes).0, BTreeSet::from(["b".to_string()]));
        let probes = BTreeMap::from([
            ("c".to_string(), Probe::Down),
            ("d".to_string(), Probe::Down),
        ]);
        let (balanced, broadcast) = choose(&probes);
        assert_eq!(balanced.len(), 2);
        assert_eq!(broadcast.len(), 2);
    }
}
