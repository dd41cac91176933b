//! [`MediaConfig`]: what the media service needs to run.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{MediaError, MediaResult};

/// Default limit on one upload: 100 MiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 100 * 1024 * 1024;

/// Configuration of the media service.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Where blobs live: a folder path (or `file://` + path), or `s3://bucket?endpoint=…`
    /// (see `bluetick_blob::S3Config`).
    pub blob_url: String,
    /// The gateway's internal gRPC endpoint, asked to resolve upload bearer tokens.
    pub gateway_url: String,
    /// Largest accepted upload in bytes; larger ones fail with RESOURCE_EXHAUSTED / 413
    /// and leave nothing behind.
    pub max_upload_bytes: u64,
    /// How long a token the gateway accepted is trusted without asking again. Short, so a
    /// revoked token stops working soon.
    pub auth_cache_ttl_secs: u64,
    /// Most tokens remembered at once (bounds memory under many distinct uploaders).
    pub auth_cache_capacity: usize,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            blob_url: "./data/media".to_string(),
            gateway_url: "http://127.0.0.1:7700".to_string(),
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            auth_cache_ttl_secs: 30,
            auth_cache_capacity: 10_000,
        }
    }
}

impl std::fmt::Debug for MediaConfig {
    /// Hides an S3 `secret_key` in `blob_url`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaConfig")
            .field("blob_url", &bluetick_blob::redact_blob_url(&self.blob_url))
            .field("gateway_url", &self.gateway_url)
            .field("max_upload_bytes", &self.max_upload_bytes)
            .field("auth_cache_ttl_secs", &self.auth_cache_ttl_secs)
            .field("auth_cache_capacity", &self.auth_cache_capacity)
            .finish()
    }
}

impl MediaConfig {
    /// Returns how long an accepted token is cached.
    pub fn auth_cache_ttl(&self) -> Duration {
        Duration::from_secs(self.auth_cache_ttl_secs)
    }

    /// Checks the configuration once, at startup.
    ///
    /// # Errors
    /// INVALID_ARGUMENT-class [`MediaError::InvalidArgument`] naming the bad field.
    pub fn validate(&self) -> MediaResult<()> {
        if self.blob_url.trim().is_empty() {
            return Err(MediaError::InvalidArgument(
                "blob_url must not be empty".to_string(),
            ));
        }
        if self.max_upload_bytes == 0 {
            return Err(MediaError::InvalidArgument(
                "max_upload_bytes must be positive".to_string(),
            ));
        }
        // One URL, a comma-separated list, or dns://name:port (see bluetick_common::channel).
        if self
            .gateway_url
            .split(',')
            .any(|url| url.trim().parse::<http::Uri>().is_err())
        {
            return Err(MediaError::InvalidArgument(format!(
                "gateway_url {:?} is not a valid url",
                self.gateway_url
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_bad_fields_are_refused() {
        let config = MediaConfig::default();
        assert_eq!(config.max_upload_bytes, 100 * 1024 * 1024);
        config.validate().unwrap();
        let zero_limit = MediaConfig {
            max_upload_bytes: 0,
            ..MediaConfig::default()
        };
        assert!(zero_limit.validate().is_err());
        let bad_url = MediaConfig {
            gateway_url: "not a url".to_string(),
            ..MediaConfig::default()
        };
        assert!(bad_url.validate().is_err());
    }
}
