//! What every bluetick service shares.
//!
//! - [`server`]: the gRPC server bootstrap (health, reflection, limits, graceful shutdown).
//! - [`channel`]: client channels to other services with deadlines and keep-alives.
//! - [`push`]: ordered, batched delivery of frames to gateway instances.
//! - [`ids`]: time-ordered unique 64-bit ids.
//! - [`auth`]: bearer-token parsing.
//! - [`telemetry`]: logging and OpenTelemetry set-up, shutdown signals.
//! - [`trace`]: W3C trace context on every internal gRPC hop.
//! - [`metrics`]: Prometheus metrics and their `/metrics` endpoint.
//! - [`limits`]: raising the open-files limit for processes holding many connections.

pub mod auth;
pub mod channel;
pub mod ids;
pub mod limits;
pub mod local;
pub mod metrics;
pub mod push;
pub mod server;
pub mod telemetry;
pub mod trace;

/// Returns the current time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}
