//! [`BluetickClient`]: channels to the gateway and media endpoints with the device's token,
//! and the unary calls (accounts, presence, keys). Also [`register`].

use std::time::Duration;

use bluetick_proto::common::v1::{LastSeenVisibility, PresenceState};
use bluetick_proto::gateway::v1::accounts_client::AccountsClient;
use bluetick_proto::gateway::v1::chat_client::ChatClient;
use bluetick_proto::gateway::v1::keys_client::KeysClient;
use bluetick_proto::gateway::v1::presence_client::PresenceClient;
use bluetick_proto::gateway::v1::{
    AddDeviceRequest, CountPreKeysRequest, GetIdentityKeysRequest, GetIdentityKeysResponse,
    GetLastSeenRequest, GetPreKeyBundlesRequest, GetPreKeyBundlesResponse, ListDevicesRequest,
    PublishKeysRequest, PublishKeysResponse, RegisterRequest, SetContactsRequest,
    SetPrivacyRequest, WatchPresenceRequest,
};
use bluetick_proto::media::v1::media_client::MediaClient;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status, Streaming};

use crate::credentials::Credentials;
use crate::error::{ClientError, ClientResult};

/// Deadline of every unary call the SDK makes.
pub const UNARY_DEADLINE: Duration = Duration::from_secs(10);
/// Largest gRPC message the SDK accepts (media chunks may reach 4 MiB plus framing).
pub(crate) const MAX_DECODING_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// A gRPC client stub carrying the device's token.
pub type Authed = InterceptedService<Channel, AuthInterceptor>;

/// Adds `authorization: Bearer <token>` to every request, and a deadline to unary ones.
#[derive(Clone)]
pub struct AuthInterceptor {
    header_opt: Option<AsciiMetadataValue>,
    deadline_opt: Option<Duration>,
}

impl std::fmt::Debug for AuthInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthInterceptor")
            .field("has_token", &self.header_opt.is_some())
            .field("deadline_opt", &self.deadline_opt)
            .finish()
    }
}

impl AuthInterceptor {
    /// Returns an interceptor sending `token` (none when `token_opt` is `None`) and setting
    /// `deadline_opt` as the gRPC timeout.
    ///
    /// # Errors
    /// [`ClientError::InvalidArgument`] when the token is not valid header text.
    pub fn new(token_opt: Option<&str>, deadline_opt: Option<Duration>) -> ClientResult<Self> {
        let header_opt = match token_opt {
            Some(token) => Some(MetadataValue::try_from(format!("Bearer {token}")).map_err(
                |_| ClientError::InvalidArgument("token is not valid header text".into()),
            )?),
            None => None,
        };
        Ok(Self {
            header_opt,
            deadline_opt,
        })
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header_opt {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        if let Some(deadline) = self.deadline_opt {
            request.set_timeout(deadline);
        }
        Ok(request)
    }
}

/// Returns the endpoint for `url` with the SDK's transport settings: connect timeout, no
/// Nagle, and HTTP/2 keepalives so a dead connection is noticed even when idle.
///
/// # Errors
/// [`ClientError::InvalidArgument`] for a malformed URL.
pub fn endpoint(url: &str) -> ClientResult<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|error| ClientError::InvalidArgument(format!("bad url {url:?}: {error}")))?;
    Ok(endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// Returns a channel for `urls`: one URL, or a comma-separated list of gateway (or media)
/// instances that calls and chat streams are spread over; a stream that breaks reconnects
/// through the list, so an instance that dies is replaced by another. Connects lazily.
///
/// # Errors
/// [`ClientError::InvalidArgument`] for a malformed URL or an empty list.
pub fn lazy_channel(urls: &str) -> ClientResult<Channel> {
    let list: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect();
    match list.as_slice() {
        [] => Err(ClientError::InvalidArgument(format!("bad url {urls:?}"))),
        [single] => Ok(endpoint(single)?.connect_lazy()),
        several => {
            let endpoints = several
                .iter()
                .map(|url| endpoint(url))
                .collect::<ClientResult<Vec<_>>>()?;
            Ok(Channel::balance_list(endpoints.into_iter()))
        }
    }
}

/// Creates a user with its first device and returns that device's credentials.
///
/// The device's token is chosen here, so a call whose answer was lost is repeated safely:
/// an unreachable gateway or a timeout is retried (three more times, backing off) with the
/// same token, and a repeat of a registration that went through answers like the first.
///
/// # Errors
/// [`ClientError::AlreadyExists`] when the handle is taken, [`ClientError::InvalidArgument`]
/// when it is malformed, [`ClientError::Unavailable`] or [`ClientError::Timeout`] when the
/// gateway did not answer any attempt.
pub async fn register(
    gateway_url: &str,
    media_url: &str,
    user_id: &str,
    display_name: &str,
) -> ClientResult<Credentials> {
    const ATTEMPTS: u32 = 4;
    let token = new_device_token();
    let mut attempt = 1;
    loop {
        match register_with_token(gateway_url, media_url, user_id, display_name, &token).await {
            Err(error) if error.is_retryable() && attempt < ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Returns a fresh device token: 256 random bits as 64 hex digits.
pub fn new_device_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Creates a user whose first device uses `token` (32 to 128 of `A-Z a-z 0-9 - _`, e.g.
/// from [`new_device_token`]). One attempt; repeating it with the same arguments after a
/// lost answer returns the same credentials instead of [`ClientError::AlreadyExists`].
///
/// # Errors
/// As [`register`], without its retries.
pub async fn register_with_token(
    gateway_url: &str,
    media_url: &str,
    user_id: &str,
    display_name: &str,
    token: &str,
) -> ClientResult<Credentials> {
    let channel = if gateway_url.contains(',') {
        lazy_channel(gateway_url)?
    } else {
        endpoint(gateway_url)?.connect().await?
    };
    let interceptor = AuthInterceptor::new(None, Some(UNARY_DEADLINE))?;
    let mut accounts = AccountsClient::with_interceptor(channel, interceptor);
    let response = accounts
        .register(RegisterRequest {
            user_id: user_id.to_string(),
            display_name: display_name.to_string(),
            token: token.to_string(),
        })
        .await?
        .into_inner();
    Ok(Credentials {
        gateway_url: gateway_url.to_string(),
        media_url: media_url.to_string(),
        user_id: user_id.to_string(),
        device_id: response.device_id,
        token: response.token,
    })
}

/// A user's devices as listed by the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceList {
    /// Device numbers, ascending.
    pub device_ids: Vec<u32>,
    /// The user's display name.
    pub display_name: String,
}

/// The SDK's entry point for one device: lazily connected channels to the gateway and the
/// media service, with the device's token on every call.
///
/// Cheap to clone. Open a chat session with [`BluetickClient::open_chat`]; media calls are
/// in [`crate::media`].
#[derive(Debug, Clone)]
pub struct BluetickClient {
    credentials: Credentials,
    gateway: Channel,
    media: Channel,
    unary_auth: AuthInterceptor,
    stream_auth: AuthInterceptor,
}

impl BluetickClient {
    /// Returns a client for `credentials`. Channels connect on first use (so this does no
    /// network I/O) and reconnect after failures. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`ClientError::InvalidArgument`] for a malformed URL or token.
    pub fn new(credentials: Credentials) -> ClientResult<Self> {
        let gateway = lazy_channel(&credentials.gateway_url)?;
        let media = lazy_channel(&credentials.media_url)?;
        let unary_auth = AuthInterceptor::new(Some(&credentials.token), Some(UNARY_DEADLINE))?;
        let stream_auth = AuthInterceptor::new(Some(&credentials.token), None)?;
        Ok(Self {
            credentials,
            gateway,
            media,
            unary_auth,
            stream_auth,
        })
    }

    /// Returns the device's credentials.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Returns the raw `Accounts` stub (token and deadline attached).
    pub fn accounts(&self) -> AccountsClient<Authed> {
        AccountsClient::with_interceptor(self.gateway.clone(), self.unary_auth.clone())
    }

    /// Returns the raw `Presence` stub (token and deadline attached).
    pub fn presence(&self) -> PresenceClient<Authed> {
        PresenceClient::with_interceptor(self.gateway.clone(), self.unary_auth.clone())
    }

    /// Returns the raw `Keys` stub (token and deadline attached).
    pub fn keys(&self) -> KeysClient<Authed> {
        KeysClient::with_interceptor(self.gateway.clone(), self.unary_auth.clone())
    }

    /// Returns the raw `Chat` stub (token attached, no deadline), for tests that want to
    /// drive the stream by hand; [`BluetickClient::open_chat`] is the managed session.
    pub fn chat(&self) -> ChatClient<Authed> {
        ChatClient::with_interceptor(self.gateway.clone(), self.stream_auth.clone())
            .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES)
    }

    /// Returns the raw `Media` stub (token attached, no deadline).
    pub fn media(&self) -> MediaClient<Authed> {
        MediaClient::with_interceptor(self.media.clone(), self.stream_auth.clone())
            .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES)
    }

    /// Adds a device to this user and returns the new device's credentials (same endpoints).
    ///
    /// # Errors
    /// The gateway's status, mapped.
    pub async fn add_device(&self) -> ClientResult<Credentials> {
        let response = self
            .accounts()
            .add_device(AddDeviceRequest {})
            .await?
            .into_inner();
        Ok(Credentials {
            device_id: response.device_id,
            token: response.token,
            ..self.credentials.clone()
        })
    }

    /// Returns a user's devices and display name.
    ///
    /// # Errors
    /// [`ClientError::NotFound`] for an unknown user.
    pub async fn list_devices(&self, user_id: &str) -> ClientResult<DeviceList> {
        let response = self
            .accounts()
            .list_devices(ListDevicesRequest {
                user_id: user_id.to_string(),
            })
            .await?
            .into_inner();
        Ok(DeviceList {
            device_ids: response.device_ids,
            display_name: response.display_name,
        })
    }

    /// Returns a user's presence as this user may see it.
    ///
    /// # Errors
    /// [`ClientError::NotFound`] for an unknown user.
    pub async fn last_seen(&self, user_id: &str) -> ClientResult<PresenceState> {
        let response = self
            .presence()
            .get_last_seen(GetLastSeenRequest {
                user_id: user_id.to_string(),
            })
            .await?
            .into_inner();
        response
            .presence
            .ok_or_else(|| ClientError::Protocol("GetLastSeen answered without presence".into()))
    }

    /// Returns a stream of the current presence of `user_ids`, then every change (the
    /// unary-service alternative to watching on the chat stream).
    ///
    /// # Errors
    /// The gateway's status, mapped.
    pub async fn watch_presence(
        &self,
        user_ids: Vec<String>,
    ) -> ClientResult<Streaming<PresenceState>> {
        let mut presence =
            PresenceClient::with_interceptor(self.gateway.clone(), self.stream_auth.clone());
        Ok(presence
            .watch_presence(WatchPresenceRequest { user_ids })
            .await?
            .into_inner())
    }

    /// Sets who may see this user's last seen and online state.
    ///
    /// # Errors
    /// The gateway's status, mapped.
    pub async fn set_privacy(&self, visibility: LastSeenVisibility) -> ClientResult<()> {
        self.presence()
            .set_privacy(SetPrivacyRequest {
                last_seen: visibility as i32,
            })
            .await?;
        Ok(())
    }

    /// Replaces this user's contact list (used by CONTACTS visibility).
    ///
    /// # Errors
    /// The gateway's status, mapped.
    pub async fn set_contacts(&self, user_ids: Vec<String>) -> ClientResult<()> {
        self.presence()
            .set_contacts(SetContactsRequest { user_ids })
            .await?;
        Ok(())
    }

    /// Publishes this device's public keys.
    ///
    /// # Errors
    /// The gateway's status, mapped.
    pub async fn publish_keys(
        &self,
        request: PublishKeysRequest,
    ) -> ClientResult<PublishKeysResponse> {
        Ok(self.keys().publish_keys(request).await?.into_inner())
    }

    /// Returns a prekey bundle per device of `user_id` (claiming one-time prekeys).
    ///
    /// # Errors
    /// The gateway's status, mapped.
    pub async fn prekey_bundles(&self, user_id: &str) -> ClientResult<GetPreKeyBundlesResponse> {
        Ok(self
            .keys()
            .get_pre_key_bundles(GetPreKeyBundlesRequest {
                user_id: user_id.to_string(),
            })
            .await?
            .into_inner())
    }

    /// Returns the identity keys of `user_id`'s devices.
    ///
    /// # Errors
    /// The gateway's status, mapped.
    pub async fn identity_keys(&self, user_id: &str) -> ClientResult<GetIdentityKeysResponse> {
        Ok(self
            .keys()
            .get_identity_keys(GetIdentityKeysRequest {
                user_id: user_id.to_string(),
            })
            .await?
            .into_inner())
    }

    /// Returns how many one-time prekeys this device has left.
    ///
    /// # Errors
    /// The gateway's status, mapped.
    pub async fn count_prekeys(&self) -> ClientResult<u32> {
        Ok(self
            .keys()
            .count_pre_keys(CountPreKeysRequest {})
            .await?
            .into_inner()
            .one_time_prekeys_left)
    }
}

#[cfg(test)]
mod tests {
    use tonic::service::Interceptor;

    use super::*;

    #[test]
    fn interceptor_adds_bearer_token_and_deadline() {
        let mut interceptor =
            AuthInterceptor::new(Some("tok"), Some(Duration::from_secs(3))).unwrap();
        let request = interceptor.call(Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer tok"
        );
        assert_eq!(request.metadata().get("grpc-timeout").unwrap(), "3000000u");
        assert!(!format!("{interceptor:?}").contains("tok\""));
    }

    #[test]
    fn tokens_that_are_not_header_text_are_refused() {
        assert!(matches!(
            AuthInterceptor::new(Some("bad\ntoken"), None),
            Err(ClientError::InvalidArgument(_))
        ));
    }

    #[test]
    fn malformed_urls_are_invalid_arguments() {
        assert!(matches!(
            endpoint("not a url"),
            Err(ClientError::InvalidArgument(_))
        ));
    }
}
