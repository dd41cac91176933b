//! Accounts, devices, tokens and the public-key directory.

use std::sync::Arc;

use bluetick_common::auth::bearer_token;
use bluetick_common::now_ms;
use bluetick_proto::common::v1::DeviceAddress;
use bluetick_proto::gateway::v1::accounts_server::Accounts;
use bluetick_proto::gateway::v1::keys_server::Keys;
use bluetick_proto::gateway::v1::*;
use bluetick_store::{IdentityKeys, PreKeyRecord, SignedPreKeyRecord};
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::Gateway;

/// One-time prekeys accepted per PublishKeys call.
const MAX_PREKEYS_PER_CALL: usize = 200;

/// Returns the SHA-256 of a token: the only form in which tokens are stored.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Returns a fresh random bearer token (256 bits, hex).
fn new_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Checks a token chosen by the client at registration: 32 to 128 of `A-Z a-z 0-9 - _`.
fn validate_chosen_token(token: &str) -> Result<(), Status> {
    let valid = (32..=128).contains(&token.len())
        && token
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
    if valid {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "token must be 32 to 128 characters of A-Z a-z 0-9 - _",
        ))
    }
}

/// Checks a user handle: 3 to 32 of `a-z 0-9 _ . -`, starting with a letter or digit.
pub fn validate_user_id(user_id: &str) -> Result<(), Status> {
    let valid_length = (3..=32).contains(&user_id.len());
    let valid_chars = user_id
        .bytes()
        .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"_.-".contains(&byte));
    let valid_start = user_id
        .bytes()
        .next()
        .is_some_and(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit());
    if valid_length && valid_chars && valid_start {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "user_id must be 3 to 32 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit",
        ))
    }
}

impl Gateway {
    /// Returns the device the request's bearer token belongs to.
    ///
    /// # Errors
    /// UNAUTHENTICATED for a missing or unknown token; UNAVAILABLE if the store is down.
    pub(crate) async fn authenticate(
        &self,
        metadata: &MetadataMap,
    ) -> Result<DeviceAddress, Status> {
        let token = bearer_token(metadata)?;
        self.authenticate_token(token).await
    }

    pub(crate) async fn authenticate_token(&self, token: &str) -> Result<DeviceAddress, Status> {
        self.accounts
            .authenticate(token_hash(token))
            .await?
            .ok_or_else(|| Status::unauthenticated("invalid token"))
    }
}

/// Implements `bluetick.gateway.v1.Accounts`.
#[derive(Clone, Debug)]
pub(crate) struct AccountsService {
    gateway: Arc<Gateway>,
}

impl AccountsService {
    pub(crate) fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

#[tonic::async_trait]
impl Accounts for AccountsService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let request = request.into_inner();
        validate_user_id(&request.user_id)?;
        if request.display_name.chars().count() > 64 {
            return Err(Status::invalid_argument(
                "display_name is at most 64 characters",
            ));
        }
        let chosen = !request.token.is_empty();
        let token = if chosen {
            validate_chosen_token(&request.token)?;
            request.token
        } else {
            new_token()
        };
        // Run to the end even if the caller goes away (its deadline passed): on a CQL engine
        // registering is two writes, and a half-done one is only finished by a repeat with
        // the same token, which a caller that let the server choose cannot make. A repeat
        // with the chosen token (the answer was lost) is answered again by the store.
        let accounts = self.gateway.accounts.clone();
        let user_id = request.user_id.clone();
        let hash = token_hash(&token);
        tokio::spawn(async move {
            accounts
                .create_user(&user_id, &request.display_name, now_ms(), hash)
                .await
        })
        .await
        .map_err(|_| Status::internal("registration task failed"))??;
        tracing::info!(user_id = %request.user_id, chosen_token = chosen, "user registered");
        Ok(Response::new(RegisterResponse {
            device_id: 1,
            token,
        }))
    }

    async fn add_device(
        &self,
        request: Request<AddDeviceRequest>,
    ) -> Result<Response<AddDeviceResponse>, Status> {
        let caller = self.gateway.authenticate(request.metadata()).await?;
        let token = new_token();
        let device_id = self
            .gateway
            .accounts
            .add_device(&caller.user_id, token_hash(&token))
            .await?;
        Ok(Response::new(AddDeviceResponse { device_id, token }))
    }

    async fn list_devices(
        &self,
        request: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        let request = request.into_inner();
        let user = self
            .gateway
            .accounts
            .get_user(&request.user_id)
            .await?
            .ok_or_else(|| Status::not_found("unknown user"))?;
        Ok(Response::new(ListDevicesResponse {
            device_ids: user.device_ids,
            display_name: user.display_name,
        }))
    }
}

/// Implements `bluetick.gateway.v1.Keys`.
#[derive(Clone, Debug)]
pub(crate) struct KeysService {
    gateway: Arc<Gateway>,
}

impl KeysService {
    pub(crate) fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

fn check_key(bytes: &[u8], length: usize, what: &str) -> Result<(), Status> {
    if bytes.len() != length {
        return Err(Status::invalid_argument(format!(
            "{what} must be {length} bytes"
        )));
    }
    Ok(())
}

fn signed_to_proto(record: SignedPreKeyRecord) -> SignedPreKey {
    SignedPreKey {
        key_id: record.key_id,
        public_key: record.public_key,
        signature: record.signature,
    }
}

#[tonic::async_trait]
impl Keys for KeysService {
    async fn publish_keys(
        &self,
        request: Request<PublishKeysRequest>,
    ) -> Result<Response<PublishKeysResponse>, Status> {
        let caller = self.gateway.authenticate(request.metadata()).await?;
        let request = request.into_inner();
        let identity = if request.identity_key.is_empty() && request.signing_key.is_empty() {
            None
        } else {
            check_key(&request.identity_key, 32, "identity_key")?;
            check_key(&request.signing_key, 32, "signing_key")?;
            Some(IdentityKeys {
                identity_key: request.identity_key,
                signing_key: request.signing_key,
            })
        };
        if identity.is_none() && self.gateway.accounts.device_keys(&caller).await?.is_none() {
            return Err(Status::failed_precondition(
                "publish identity_key and signing_key first",
            ));
        }
        let signed_prekey = match request.signed_prekey {
            Some(signed) => {
                check_key(&signed.public_key, 32, "signed_prekey.public_key")?;
                check_key(&signed.signature, 64, "signed_prekey.signature")?;
                Some(SignedPreKeyRecord {
                    key_id: signed.key_id,
                    public_key: signed.public_key,
                    signature: signed.signature,
                })
            }
            None => None,
        };
        if request.one_time_prekeys.len() > MAX_PREKEYS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_PREKEYS_PER_CALL} one-time prekeys per call"
            )));
        }
        let mut one_time = Vec::with_capacity(request.one_time_prekeys.len());
        for prekey in request.one_time_prekeys {
            check_key(&prekey.public_key, 32, "one_time_prekeys.public_key")?;
            one_time.push(PreKeyRecord {
                key_id: prekey.key_id,
                public_key: prekey.public_key,
            });
        }
        let left = self
            .gateway
            .accounts
            .publish_keys(&caller, identity, signed_prekey, one_time)
            .await?;
        Ok(Response::new(PublishKeysResponse {
            one_time_prekeys_left: left,
        }))
    }

    async fn get_pre_key_bundles(
        &self,
        request: Request<GetPreKeyBundlesRequest>,
    ) -> Result<Response<GetPreKeyBundlesResponse>, Status> {
        self.gateway.authenticate(request.metadata()).await?;
        let request = request.into_inner();
        let accounts = &self.gateway.accounts;
        let user = accounts
            .get_user(&request.user_id)
            .await?
            .ok_or_else(|| Status::not_found("unknown user"))?;
        let mut bundles = Vec::new();
        for device_id in user.device_ids {
            let device = DeviceAddress::new(user.user_id.clone(), device_id);
            let Some(keys) = accounts.device_keys(&device).await? else {
                continue;
            };
            let one_time = accounts.claim_one_time_prekey(&device).await?;
            bundles.push(PreKeyBundle {
                device_id,
                identity_key: keys.identity.identity_key,
                signing_key: keys.identity.signing_key,
                signed_prekey: keys.signed_prekey.map(signed_to_proto),
                one_time_prekey: one_time.map(|prekey| PreKey {
                    key_id: prekey.key_id,
                    public_key: prekey.public_key,
                }),
            });
        }
        Ok(Response::new(GetPreKeyBundlesResponse { bundles }))
    }

    async fn get_identity_keys(
        &self,
        request: Request<GetIdentityKeysRequest>,
    ) -> Result<Response<GetIdentityKeysResponse>, Status> {
        self.gateway.authenticate(request.metadata()).await?;
        let request = request.into_inner();
        let accounts = &self.gateway.accounts;
        let user = accounts
            .get_user(&request.user_id)
            .await?
            .ok_or_else(|| Status::not_found("unknown user"))?;
        let mut devices = Vec::new();
        for device_id in user.device_ids {
            let device = DeviceAddress::new(user.user_id.clone(), device_id);
            if let Some(keys) = accounts.device_keys(&device).await? {
                devices.push(DeviceIdentity {
                    device_id,
                    identity_key: keys.identity.identity_key,
                    signing_key: keys.identity.signing_key,
                });
            }
        }
        Ok(Response::new(GetIdentityKeysResponse { devices }))
    }

    async fn count_pre_keys(
        &self,
        request: Request<CountPreKeysRequest>,
    ) -> Result<Response<CountPreKeysResponse>, Status> {
        let caller = self.gateway.authenticate(request.metadata()).await?;
        let left = self
            .gateway
            .accounts
            .count_one_time_prekeys(&caller)
            .await?;
        Ok(Response::new(CountPreKeysResponse {
            one_time_prekeys_left: left,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_checked() {
        for good in ["alice", "bob_1", "a.b-c", "123"] {
            assert!(validate_user_id(good).is_ok(), "{good}");
        }
        for bad in ["", "al", "Alice", "_alice", "a b", &"x".repeat(33), "ålice"] {
            assert!(validate_user_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let first = new_token();
        assert_eq!(first.len(), 64);
        assert_ne!(first, new_token());
        assert_eq!(token_hash(&first), token_hash(&first));
        assert_ne!(token_hash(&first), token_hash("other"));
    }
}
