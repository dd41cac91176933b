//! The CQL store: all four traits on Apache Cassandra or ScyllaDB through the
//! [`scylla`] driver, in plain CQL that both engines run.
//!
//! | type | tables | trait |
//! |---|---|---|
//! | [`CqlAccountStore`] | `users`, `devices`, `device_tokens`, `device_keys`, `one_time_prekeys` | [`AccountStore`](crate::AccountStore) |
//! | [`CqlInboxStore`] | `inbox`, `inbox_floor`, `accept_claims`, `accept_commits` | [`InboxStore`](crate::InboxStore) |
//! | [`CqlTickStore`] | `ticks`, `receipts` | [`TickStore`](crate::TickStore) |
//! | [`CqlPresenceStore`] | `last_seen`, `privacy` | [`PresenceStore`](crate::PresenceStore) |
//!
//! The URL names the contact points, the keyspace and the options:
//!
//! ```text
//! scylla://host:9042[,host2:9042]/keyspace?replication_factor=1&consistency=local_quorum
//! ```
//!
//! (`cql://` is the same). Query options, all optional:
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `replication_factor` | 1 | `SimpleStrategy` factor when the keyspace is created |
//! | `replication` | – | `dc1:3,dc2:3`: `NetworkTopologyStrategy` instead |
//! | `consistency` | `local_quorum` | every read and write (`one`, `quorum`, `local_quorum`, `all`, …) |
//! | `serial_consistency` | `local_serial` | lightweight transactions (`serial` or `local_serial`) |
//! | `local_dc` | – | datacenter the driver prefers |
//! | `request_timeout_ms` | 12000 | client-side timeout per request |
//! | `max_in_flight` | 512 | requests this process keeps in flight at once, per URL |
//! | `inbox_floor_grace_ms` | 120000 | see [`inbox`] |
//!
//! Start-up ([`session`]) creates the keyspace (replication from the URL) and applies the
//! versioned schema (`crates/store/schema/v*.cql`, recorded in `schema_version`), both
//! idempotently. Every data statement is prepared once per store. All stores opened with one
//! URL in a process share one driver session; the driver keeps reconnecting to nodes that go
//! away, so calls succeed again once the engine is back, without a restart.
//!
//! Errors: a connection failure, timeout, unavailable or overloaded replica is
//! [`StoreError::Unavailable`] (retryable); a row that does
//! not decode, or a statement the engine refuses, is
//! [`StoreError::Internal`].

mod accounts;
pub mod inbox;
mod presence;
pub mod session;
mod ticks;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use scylla::errors::{ExecutionError, NewSessionError, PagerExecutionError, RequestAttemptError};
use scylla::frame::types::{Consistency, SerialConsistency};

pub use self::accounts::CqlAccountStore;
pub use self::inbox::CqlInboxStore;
pub use self::presence::CqlPresenceStore;
pub use self::session::CqlSession;
pub use self::ticks::CqlTickStore;
use crate::{StoreError, StoreResult};

/// The longest TTL Cassandra accepts (20 years); later expiries are capped to it.
const MAX_TTL_SECONDS: i64 = 630_720_000;

/// Replication of the keyspace, used only when the store creates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CqlReplication {
    /// `SimpleStrategy` with this factor.
    Simple(u32),
    /// `NetworkTopologyStrategy` with a factor per datacenter.
    NetworkTopology(Vec<(String, u32)>),
}

/// A parsed `scylla://` / `cql://` store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CqlLocation {
    /// The URL as given; stores opened with the same URL share a session.
    pub url: String,
    /// Contact points, `host:port`.
    pub hosts: Vec<String>,
    pub keyspace: String,
    pub replication: CqlReplication,
    /// Consistency of every read and write.
    pub consistency: Consistency,
    /// Consistency of the Paxos phase of lightweight transactions.
    pub serial_consistency: SerialConsistency,
    /// Datacenter the driver prefers, if any.
    pub local_datacenter_opt: Option<String>,
    pub request_timeout: Duration,
    /// Requests in flight at once through this process's session.
    pub max_in_flight: usize,
    /// How old an inbox row must be before the device's floor may pass it.
    pub inbox_floor_grace: Duration,
}

impl CqlLocation {
    /// Parses `scylla://host:port[,host:port]/keyspace[?option=value&…]` (or `cql://`).
    ///
    /// # Errors
    /// [`StoreError::Internal`] for a malformed URL or an unknown option.
    pub fn parse(url: &str) -> StoreResult<Self> {
        let invalid =
            |why: &str| StoreError::Internal(format!("invalid cql store url {url:?}: {why}"));
        let rest = url
            .strip_prefix("scylla://")
            .or_else(|| url.strip_prefix("cql://"))
            .ok_or_else(|| invalid("expected scylla:// or cql://"))?;
        let (authority, path_and_query) = rest
            .split_once('/')
            .ok_or_else(|| invalid("missing /keyspace"))?;
        let (keyspace, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        if keyspace.is_empty()
            || keyspace.len() > 48
            || !keyspace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || keyspace.starts_with('_')
        {
            return Err(invalid("the keyspace must be 1-48 letters, digits or _"));
        }
        let hosts: Vec<String> = authority
            .split(',')
            .filter(|host| !host.is_empty())
            .map(|host| {
                if host.contains(':') {
                    host.to_string()
                } else {
                    format!("{host}:9042")
                }
            })
            .collect();
        if hosts.is_empty() {
            return Err(invalid("no host"));
        }
        let mut location = Self {
            url: url.to_string(),
            hosts,
            keyspace: keyspace.to_string(),
            replication: CqlReplication::Simple(1),
            consistency: Consistency::LocalQuorum,
            serial_consistency: SerialConsistency::LocalSerial,
            local_datacenter_opt: None,
            request_timeout: Duration::from_secs(12),
            max_in_flight: 512,
            inbox_floor_grace: Duration::from_secs(120),
        };
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = |what: &str| -> StoreResult<u64> {
                value
                    .parse::<u64>()
                    .map_err(|_| invalid(&format!("{what} must be a number, got {value:?}")))
            };
            match key {
                "replication_factor" => {
                    let factor = u32::try_from(number(key)?)
                        .ok()
                        .filter(|factor| *factor > 0)
                        .ok_or_else(|| invalid("replication_factor must be 1 or more"))?;
                    location.replication = CqlReplication::Simple(factor);
                }
                "replication" => {
                    let mut datacenters = Vec::new();
                    for entry in value.split(',') {
                        let (datacenter, factor) = entry
                            .split_once(':')
                            .ok_or_else(|| invalid("replication must look like dc1:3,dc2:3"))?;
                        let factor = factor
                            .parse::<u32>()
                            .map_err(|_| invalid("replication factors must be numbers"))?;
                        if datacenter.is_empty()
                            || !datacenter
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
                        {
                            return Err(invalid("bad datacenter name in replication"));
                        }
                        datacenters.push((datacenter.to_string(), factor));
                    }
                    location.replication = CqlReplication::NetworkTopology(datacenters);
                }
                "consistency" => {
                    location.consistency = parse_consistency(value)
                        .ok_or_else(|| invalid(&format!("unknown consistency {value:?}")))?;
                }
                "serial_consistency" => {
                    location.serial_consistency = match value.to_ascii_lowercase().as_str() {
                        "serial" => SerialConsistency::Serial,
                        "local_serial" => SerialConsistency::LocalSerial,
                        _ => return Err(invalid("serial_consistency is serial or local_serial")),
                    };
                }
                "local_dc" => location.local_datacenter_opt = Some(value.to_string()),
                "request_timeout_ms" => {
                    location.request_timeout = Duration::from_millis(number(key)?.max(1));
                }
                "max_in_flight" => {
                    location.max_in_flight = usize::try_from(number(key)?.max(1)).unwrap_or(512);
                }
                "inbox_floor_grace_ms" => {
                    location.inbox_floor_grace = Duration::from_millis(number(key)?);
                }
                _ => return Err(invalid(&format!("unknown option {key:?}"))),
            }
        }
        Ok(location)
    }

    /// Returns the `replication` map of `CREATE KEYSPACE`.
    pub(crate) fn replication_cql(&self) -> String {
        match &self.replication {
            CqlReplication::Simple(factor) => {
                format!("{{'class': 'SimpleStrategy', 'replication_factor': {factor}}}")
            }
            CqlReplication::NetworkTopology(datacenters) => {
                let factors: Vec<String> = datacenters
                    .iter()
                    .map(|(datacenter, factor)| format!("'{datacenter}': {factor}"))
                    .collect();
                format!(
                    "{{'class': 'NetworkTopologyStrategy', {}}}",
                    factors.join(", ")
                )
            }
        }
    }
}

fn parse_consistency(value: &str) -> Option<Consistency> {
    Some(match value.to_ascii_lowercase().as_str() {
        "any" => Consistency::Any,
        "one" => Consistency::One,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        "quorum" => Consistency::Quorum,
        "all" => Consistency::All,
        "local_quorum" => Consistency::LocalQuorum,
        "each_quorum" => Consistency::EachQuorum,
        "local_one" => Consistency::LocalOne,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------
// Value encoding
// ---------------------------------------------------------------------------------------

/// Returns the `bigint` that stores an unsigned id, order-preserving (sign bit flipped).
pub(crate) fn id_to_cql(id: u64) -> i64 {
    (id ^ (1 << 63)) as i64
}

/// Inverse of [`id_to_cql`].
pub(crate) fn id_from_cql(value: i64) -> u64 {
    (value as u64) ^ (1 << 63)
}

/// Returns a time in milliseconds as a `bigint` (saturating).
pub(crate) fn ms_to_cql(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// Inverse of [`ms_to_cql`]; a negative value (never written) reads as 0.
pub(crate) fn ms_from_cql(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Returns a device number as an `int`.
pub(crate) fn device_to_cql(device_id: u32) -> i32 {
    i32::try_from(device_id).unwrap_or(i32::MAX)
}

/// Inverse of [`device_to_cql`].
pub(crate) fn device_from_cql(value: i32) -> StoreResult<u32> {
    u32::try_from(value)
        .map_err(|_| StoreError::Internal(format!("stored device id {value} is negative")))
}

/// Returns the current wall-clock time in milliseconds.
pub(crate) fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// Returns the TTL in seconds that keeps a row until `expires_at_ms` (rounded up, capped at
/// Cassandra's maximum), or `None` if it has expired already.
pub(crate) fn ttl_seconds(expires_at_ms: u64, now_ms: u64) -> Option<i32> {
    if expires_at_ms <= now_ms {
        return None;
    }
    let remaining_ms = expires_at_ms - now_ms;
    let seconds = i64::try_from(remaining_ms.div_ceil(1000))
        .unwrap_or(MAX_TTL_SECONDS)
        .clamp(1, MAX_TTL_SECONDS);
    i32::try_from(seconds).ok()
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Returns whether an engine error means "try again later" rather than a bug.
fn db_error_is_transient(error: &scylla::errors::DbError) -> bool {
    use scylla::errors::DbError;
    !matches!(
        error,
        DbError::SyntaxError
            | DbError::Invalid
            | DbError::AlreadyExists { .. }
            | DbError::FunctionFailure { .. }
            | DbError::AuthenticationError
            | DbError::Unauthorized
            | DbError::ConfigError
            | DbError::ProtocolError
    )
}

fn attempt_error_is_transient(error: &RequestAttemptError) -> bool {
    match error {
        RequestAttemptError::DbError(db_error, _) => db_error_is_transient(db_error),
        RequestAttemptError::SerializationError(_)
        | RequestAttemptError::CqlRequestSerialization(_)
        | RequestAttemptError::CqlResultParseError(_)
        | RequestAttemptError::CqlErrorParseError(_)
        | RequestAttemptError::UnexpectedResponse(_)
        | RequestAttemptError::RepreparedIdChanged { .. } => false,
        _ => true,
    }
}

/// Maps a driver execution error: engine or network trouble is
/// [`StoreError::Unavailable`], a refused statement is [`StoreError::Internal`].
pub(crate) fn execution_error(what: &str, error: ExecutionError) -> StoreError {
    let transient = match &error {
        ExecutionError::BadQuery(_) => false,
        ExecutionError::LastAttemptError(attempt) => attempt_error_is_transient(attempt),
        ExecutionError::PrepareError(scylla::errors::PrepareError::AllAttemptsFailed {
            first_attempt,
        }) => attempt_error_is_transient(first_attempt),
        _ => true,
    };
    if transient {
        StoreError::Unavailable(format!("{what}: {error}"))
    } else {
        StoreError::Internal(format!("{what}: {error}"))
    }
}

pub(crate) fn pager_error(what: &str, error: PagerExecutionError) -> StoreError {
    match error {
        PagerExecutionError::SerializationError(_) => {
            StoreError::Internal(format!("{what}: {error}"))
        }
        other => StoreError::Unavailable(format!("{what}: {other}")),
    }
}

pub(crate) fn new_session_error(location: &CqlLocation, error: NewSessionError) -> StoreError {
    StoreError::Unavailable(format!(
        "cannot reach the CQL engine at {} (is it running?): {error}",
        location.hosts.join(",")
    ))
}

/// Maps a row that did not decode to [`StoreError::Internal`].
pub(crate) fn decode_error(what: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("failed to decode {what}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_url() {
        let location = CqlLocation::parse(
            "scylla://127.0.0.1:9042,127.0.0.2/bt?replication_factor=3&consistency=quorum&serial_consistency=serial&request_timeout_ms=500&local_dc=dc1",
        )
        .expect("parse");
        assert_eq!(location.hosts, vec!["127.0.0.1:9042", "127.0.0.2:9042"]);
        assert_eq!(location.keyspace, "bt");
        assert_eq!(location.replication, CqlReplication::Simple(3));
        assert_eq!(location.consistency, Consistency::Quorum);
        assert_eq!(location.serial_consistency, SerialConsistency::Serial);
        assert_eq!(location.request_timeout, Duration::from_millis(500));
        assert_eq!(location.local_datacenter_opt.as_deref(), Some("dc1"));
    }

    #[test]
    fn defaults_to_local_quorum_and_accepts_cql_scheme() {
        let location = CqlLocation::parse("cql://db/bluetick").expect("parse");
        assert_eq!(location.consistency, Consistency::LocalQuorum);
        assert_eq!(location.serial_consistency, SerialConsistency::LocalSerial);
        assert_eq!(location.replication, CqlReplication::Simple(1));
        assert_eq!(
            location.replication_cql(),
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        );
    }

    #[test]
    fn network_topology_replication() {
        let location =
            CqlLocation::parse("scylla://h:9042/ks?replication=dc1:3,dc2:2").expect("parse");
        assert_eq!(
            location.replication_cql(),
            "{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 2}"
        );
    }

    #[test]
    fn rejects_bad_urls() {
        for url in [
            "scylla://h:9042",
            "scylla:///ks",
            "scylla://h/ks;drop",
            "scylla://h/ks?consistency=most",
            "scylla://h/ks?typo=1",
            "scylla://h/ks?replication_factor=0",
        ] {
            assert!(CqlLocation::parse(url).is_err(), "{url}");
        }
    }

    #[test]
    fn id_encoding_preserves_unsigned_order() {
        let ids = [
            0u64,
            1,
            1 << 62,
            (1 << 63) - 1,
            1 << 63,
            u64::MAX - 1,
            u64::MAX,
        ];
        for pair in ids.windows(2) {
            assert!(id_to_cql(pair[0]) < id_to_cql(pair[1]));
        }
        for id in ids {
            assert_eq!(id_from_cql(id_to_cql(id)), id);
        }
    }

    #[test]
    fn ttl_rounds_up_and_caps() {
        assert_eq!(ttl_seconds(1_000, 1_000), None);
        assert_eq!(ttl_seconds(1_001, 1_000), Some(1));
        assert_eq!(ttl_seconds(3_500, 1_000), Some(3));
        assert_eq!(ttl_seconds(u64::MAX, 0), Some(630_720_000));
    }
}
