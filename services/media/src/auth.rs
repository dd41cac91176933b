//! [`Authenticator`]: resolves upload bearer tokens through the gateway's
//! `GatewayInternal.Authenticate`, caching accepted tokens briefly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bluetick_blob::ContentHash;
use bluetick_common::channel::InternalChannel;
use bluetick_common::channel::with_deadline;
use bluetick_proto::common::v1::DeviceAddress;
use bluetick_proto::gateway::v1::AuthenticateRequest;
use bluetick_proto::gateway::v1::gateway_internal_client::GatewayInternalClient;

use crate::error::{MediaError, MediaResult};

/// Resolves bearer tokens to devices. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Authenticator {
    client: GatewayInternalClient<bluetick_common::trace::TracedChannel>,
    cache: Arc<Mutex<TokenCache>>,
}

/// Tokens the gateway accepted recently, keyed by the token's SHA-256 so the cache holds
/// no usable secrets. Only successes are cached: a rejected token is asked about again.
#[derive(Debug)]
struct TokenCache {
    entries: HashMap<ContentHash, (DeviceAddress, Instant)>,
    ttl: Duration,
    capacity: usize,
}

impl TokenCache {
    fn get(&mut self, key: &ContentHash, now: Instant) -> Option<DeviceAddress> {
        match self.entries.get(key) {
            Some((device, expires_at)) if *expires_at > now => Some(device.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, key: ContentHash, device: DeviceAddress, now: Instant) {
        if self.capacity == 0 || self.ttl.is_zero() {
            return;
        }
        if self.entries.len() >= self.capacity {
            self.entries.retain(|_, (_, expires_at)| *expires_at > now);
        }
        if self.entries.len() >= self.capacity {
            // Still full of live entries: start over rather than grow (a burst of distinct
            // uploaders costs one gateway call each, never memory).
            self.entries.clear();
        }
        self.entries.insert(key, (device, now + self.ttl));
    }
}

impl Authenticator {
    /// Returns an authenticator asking the gateway behind `channel`.
    pub(crate) fn new(channel: InternalChannel, ttl: Duration, capacity: usize) -> Self {
        Self {
            client: GatewayInternalClient::new(bluetick_common::trace::traced(channel)),
            cache: Arc::new(Mutex::new(TokenCache {
                entries: HashMap::new(),
                ttl,
                capacity,
            })),
        }
    }

    /// Returns the device `token` belongs to.
    ///
    /// # Errors
    /// [`MediaError::Unauthenticated`] when the gateway rejects the token,
    /// [`MediaError::AuthUnavailable`] when it cannot be asked.
    pub(crate) async fn authenticate(&self, token: &str) -> MediaResult<DeviceAddress> {
        let key = ContentHash::of(token.as_bytes());
        if let Some(device) = self.lock_cache().get(&key, Instant::now()) {
            return Ok(device);
        }
        let request = with_deadline(AuthenticateRequest {
            token: token.to_string(),
        });
        let response = self
            .client
            .clone()
            .authenticate(request)
            .await
            .map_err(map_gateway_status)?;
        let device = response.into_inner().device.ok_or_else(|| {
            MediaError::Internal("gateway authenticated a token without a device".to_string())
        })?;
        self.lock_cache()
            .insert(key, device.clone(), Instant::now());
        Ok(device)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, TokenCache> {
        // The lock is never held across an await, and the map stays consistent even if a
        // holder panicked, so a poisoned lock is safe to reuse.
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Maps the gateway's answer to a media error: its verdict on the token passes through as
/// UNAUTHENTICATED, failures to reach it become UNAVAILABLE.
fn map_gateway_status(status: tonic::Status) -> MediaError {
    use tonic::Code;
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied | Code::NotFound | Code::InvalidArgument => {
            MediaError::Unauthenticated("invalid or expired token".to_string())
        }
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Unknown => MediaError::AuthUnavailable(format!(
            "gateway authenticate failed: {:?} {}",
            status.code(),
            status.message()
        )),
        other => MediaError::Internal(format!(
            "gateway authenticate failed: {other:?} {}",
            status.message()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_codes_map_to_unauthenticated_or_unavailable() {
        assert!(matches!(
            map_gateway_status(tonic::Status::unauthenticated("no")),
            MediaError::Unauthenticated(_)
        ));
        assert!(matches!(
            map_gateway_status(tonic::Status::unavailable("down")),
            MediaError::AuthUnavailable(_)
        ));
        assert!(matches!(
            map_gateway_status(tonic::Status::deadline_exceeded("slow")),
            MediaError::AuthUnavailable(_)
        ));
        assert!(matches!(
            map_gateway_status(tonic::Status::internal("bug")),
            MediaError::Internal(_)
        ));
    }

    #[test]
    fn cache_expires_entries_and_stays_bounded() {
        let mut cache = TokenCache {
            entries: HashMap::new(),
            ttl: Duration::from_secs(30),
            capacity: 2,
        };
        let now = Instant::now();
        let device = DeviceAddress::new("alice", 1);
        let key = |n: u8| ContentHash::of(&[n]);
        cache.insert(key(1), device.clone(), now);
        assert_eq!(cache.get(&key(1), now), Some(device.clone()));
        assert_eq!(cache.get(&key(1), now + Duration::from_secs(31)), None);
        for n in 0..10 {
            cache.insert(key(n), device.clone(), now);
            assert!(cache.entries.len() <= 2);
        }
    }
}
