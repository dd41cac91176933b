//! Client channels to other bluetick services.

use std::time::Duration;

use tonic::Request;
use tonic::transport::{Channel, Endpoint};

/// Deadline of an internal unary call.
pub const INTERNAL_DEADLINE: Duration = Duration::from_secs(5);

/// Returns a channel to `url` that connects on first use and reconnects after failures.
///
/// # Errors
/// Fails when `url` is not a valid URI.
pub fn lazy_channel(url: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// Wraps `message` in a request with the internal deadline.
pub fn with_deadline<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(INTERNAL_DEADLINE);
    request
}
