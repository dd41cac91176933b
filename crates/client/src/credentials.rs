//! [`Credentials`]: what a device needs to talk to bluetick, saved by the CLI per profile.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Default gateway endpoint of `make run` / `bluetick-dev`.
pub const DEFAULT_GATEWAY_URL: &str = "http://127.0.0.1:7700";
/// Default media endpoint of `make run` / `bluetick-dev`.
pub const DEFAULT_MEDIA_URL: &str = "http://127.0.0.1:7704";

/// One device's identity and where to reach the servers.
///
/// `Debug` hides the token; the serialized form (JSON) holds it, so store it with care
/// (the CLI writes it with mode 0600).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// Gateway endpoint (chat, accounts, presence, keys), e.g. `http://127.0.0.1:7700`.
    pub gateway_url: String,
    /// Media endpoint, e.g. `http://127.0.0.1:7704`.
    pub media_url: String,
    /// The user's handle.
    pub user_id: String,
    /// This device's number within the user (1 for the first).
    pub device_id: u32,
    /// This device's bearer token.
    pub token: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("gateway_url", &self.gateway_url)
            .field("media_url", &self.media_url)
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("token", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_token() {
        let credentials = Credentials {
            gateway_url: DEFAULT_GATEWAY_URL.into(),
            media_url: DEFAULT_MEDIA_URL.into(),
            user_id: "alice".into(),
            device_id: 1,
            token: "s3cr3t-token".into(),
        };
        let debug = format!("{credentials:?}");
        assert!(!debug.contains("s3cr3t"));
        let json = serde_json::to_string(&credentials).unwrap();
        let back: Credentials = serde_json::from_str(&json).unwrap();
        assert_eq!(back, credentials);
    }
}
