//! [`EmbeddedAccountStore`]: users, devices, tokens and public keys in `accounts.redb`.
//!
//! Tables (keys per [`codec`](super::codec)):
//! - `users`: `user_id` → `display_name, created_at_ms, [device_id]`.
//! - `tokens`: SHA-256 of a token → device address.
//! - `identity_keys`: device → `identity_key, signing_key`.
//! - `signed_prekeys`: device → `key_id, public_key, signature`.
//! - `one_time_prekeys`: `(device, key_id)` → `public_key`; claims take the first row of a
//!   device's range, in the single writer, so no key is handed out twice.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bluetick_proto::common::v1::DeviceAddress;
use bytes::Bytes;
use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

use super::codec::{self, Decoder, Encoder};
use super::committer::GroupCommitter;
use super::{open_database, read_point, read_snapshot};
use crate::{
    AccountStore, DeviceKeys, IdentityKeys, PreKeyRecord, SignedPreKeyRecord, StoreError,
    StoreResult, UserRecord,
};

const USERS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("users");
const TOKENS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("tokens");
const IDENTITY_KEYS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("identity_keys");
const SIGNED_PREKEYS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("signed_prekeys");
const ONE_TIME_PREKEYS: TableDefinition<'_, &[u8], &[u8]> =
    TableDefinition::new("one_time_prekeys");

/// The embedded [`AccountStore`], in `accounts.redb`.
#[derive(Debug)]
pub struct EmbeddedAccountStore {
    database: Arc<Database>,
    committer: GroupCommitter<Database>,
}

impl EmbeddedAccountStore {
    /// Opens (or creates) `accounts.redb` in `dir`, creating the directory if needed.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the file cannot be opened, for instance because
    /// another process has it open.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        let database = open_database(dir, "accounts.redb")?;
        let transaction = database.begin_write()?;
        {
            transaction.open_table(USERS)?;
            transaction.open_table(TOKENS)?;
            transaction.open_table(IDENTITY_KEYS)?;
            transaction.open_table(SIGNED_PREKEYS)?;
            transaction.open_table(ONE_TIME_PREKEYS)?;
        }
        transaction.commit()?;
        let committer = GroupCommitter::start("accounts", Arc::clone(&database))?;
        Ok(Self {
            database,
            committer,
        })
    }

    /// Returns how many write transactions (fsyncs) this store has committed.
    pub fn commit_count(&self) -> u64 {
        self.committer.commit_count()
    }
}

fn encode_user(user: &UserRecord) -> Vec<u8> {
    let count = u32::try_from(user.device_ids.len()).unwrap_or(u32::MAX);
    let mut encoder = Encoder::new()
        .str(&user.display_name)
        .u64(user.created_at_ms)
        .u32(count);
    for device_id in &user.device_ids {
        encoder = encoder.u32(*device_id);
    }
    encoder.finish()
}

fn decode_user(user_id: &str, value: &[u8]) -> StoreResult<UserRecord> {
    let mut decoder = Decoder::new(value);
    let display_name = decoder.string()?;
    let created_at_ms = decoder.u64()?;
    let count = decoder.u32()?;
    let mut device_ids = Vec::with_capacity(count.min(1024) as usize);
    for _ in 0..count {
        device_ids.push(decoder.u32()?);
    }
    Ok(UserRecord {
        user_id: user_id.to_string(),
        display_name,
        created_at_ms,
        device_ids,
    })
}

/// Returns the inclusive key bounds of every one-time prekey of `device`.
fn prekey_range(device: &DeviceAddress) -> (Vec<u8>, Vec<u8>) {
    let prefix = codec::device_key(device);
    let low = Encoder::new().raw(&prefix).u32(0).finish();
    let high = Encoder::new().raw(&prefix).u32(u32::MAX).finish();
    (low, high)
}

fn prekey_key(device: &DeviceAddress, key_id: u32) -> Vec<u8> {
    Encoder::new().device(device).u32(key_id).finish()
}

fn count_prekeys(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    device: &DeviceAddress,
) -> StoreResult<u32> {
    let (low, high) = prekey_range(device);
    let mut count = 0u32;
    for entry in table.range::<&[u8]>(low.as_slice()..=high.as_slice())? {
        entry?;
        count = count.saturating_add(1);
    }
    Ok(count)
}

fn create_user_in(
    transaction: &WriteTransaction,
    user_id: &str,
    display_name: &str,
    created_at_ms: u64,
    token_hash: [u8; 32],
) -> StoreResult<()> {
    let mut users = transaction.open_table(USERS)?;
    let mut tokens = transaction.open_table(TOKENS)?;
    let device = codec::device_key(&DeviceAddress::new(user_id, 1));
    if users.get(user_id)?.is_some() {
        // One transaction creates user and device together: a repeat finds both.
        let repeat = tokens
            .get(token_hash.as_slice())?
            .is_some_and(|owner| owner.value() == device.as_slice());
        if repeat {
            return Ok(());
        }
        return Err(StoreError::AlreadyExists(format!("user {user_id}")));
    }
    if tokens.get(token_hash.as_slice())?.is_some() {
        return Err(StoreError::AlreadyExists("device token".to_string()));
    }
    let user = UserRecord {
        user_id: user_id.to_string(),
        display_name: display_name.to_string(),
        created_at_ms,
        device_ids: vec![1],
    };
    users.insert(user_id, encode_user(&user).as_slice())?;
    tokens.insert(token_hash.as_slice(), device.as_slice())?;
    Ok(())
}

fn add_device_in(
    transaction: &WriteTransaction,
    user_id: &str,
    token_hash: [u8; 32],
) -> StoreResult<u32> {
    let mut users = transaction.open_table(USERS)?;
    let mut tokens = transaction.open_table(TOKENS)?;
    let user_opt = users
        .get(user_id)?
        .map(|value| decode_user(user_id, value.value()))
        .transpose()?;
    let Some(mut user) = user_opt else {
        return Err(StoreError::NotFound(format!("user {user_id}")));
    };
    if tokens.get(token_hash.as_slice())?.is_some() {
        return Err(StoreError::AlreadyExists("device token".to_string()));
    }
    let highest = user.device_ids.iter().copied().max().unwrap_or(0);
    let device_id = highest
        .checked_add(1)
        .ok_or_else(|| StoreError::Internal(format!("user {user_id} has too many devices")))?;
    user.device_ids.push(device_id);
    users.insert(user_id, encode_user(&user).as_slice())?;
    let device = codec::device_key(&DeviceAddress::new(user_id, device_id));
    tokens.insert(token_hash.as_slice(), device.as_slice())?;
    Ok(device_id)
}

fn publish_keys_in(
    transaction: &WriteTransaction,
    device: &DeviceAddress,
    identity_opt: Option<&IdentityKeys>,
    signed_prekey_opt: Option<&SignedPreKeyRecord>,
    one_time_prekeys: &[PreKeyRecord],
) -> StoreResult<u32> {
    let users = transaction.open_table(USERS)?;
    let device_exists = match users.get(device.user_id.as_str())? {
        Some(value) => decode_user(&device.user_id, value.value())?
            .device_ids
            .contains(&device.device_id),
        None => false,
    };
    if !device_exists {
        return Err(StoreError::NotFound(format!("device {device}")));
    }
    let device_key = codec::device_key(device);
    if let Some(identity) = identity_opt {
        let mut identity_keys = transaction.open_table(IDENTITY_KEYS)?;
        let value = Encoder::new()
            .bytes(&identity.identity_key)
            .bytes(&identity.signing_key)
            .finish();
        identity_keys.insert(device_key.as_slice(), value.as_slice())?;
    }
    if let Some(signed_prekey) = signed_prekey_opt {
        let mut signed_prekeys = transaction.open_table(SIGNED_PREKEYS)?;
        let value = Encoder::new()
            .u32(signed_prekey.key_id)
            .bytes(&signed_prekey.public_key)
            .bytes(&signed_prekey.signature)
            .finish();
        signed_prekeys.insert(device_key.as_slice(), value.as_slice())?;
    }
    let mut pool = transaction.open_table(ONE_TIME_PREKEYS)?;
    for prekey in one_time_prekeys {
        pool.insert(
            prekey_key(device, prekey.key_id).as_slice(),
            prekey.public_key.as_ref(),
        )?;
    }
    count_prekeys(&pool, device)
}

fn claim_prekey_in(
    transaction: &WriteTransaction,
    device: &DeviceAddress,
) -> StoreResult<Option<PreKeyRecord>> {
    let mut pool = transaction.open_table(ONE_TIME_PREKEYS)?;
    let (low, high) = prekey_range(device);
    let first_opt = match pool
        .range::<&[u8]>(low.as_slice()..=high.as_slice())?
        .next()
    {
        Some(entry) => {
            let (key, value) = entry?;
            Some((key.value().to_vec(), value.value().to_vec()))
        }
        None => None,
    };
    let Some((key, public_key)) = first_opt else {
        return Ok(None);
    };
    let key_id_start = key
        .len()
        .checked_sub(4)
        .ok_or_else(|| StoreError::Internal("stored prekey key is too short".to_string()))?;
    let key_id = Decoder::new(&key[key_id_start..]).u32()?;
    pool.remove(key.as_slice())?;
    Ok(Some(PreKeyRecord {
        key_id,
        public_key: Bytes::from(public_key),
    }))
}

#[async_trait]
impl AccountStore for EmbeddedAccountStore {
    async fn create_user(
        &self,
        user_id: &str,
        display_name: &str,
        created_at_ms: u64,
        token_hash: [u8; 32],
    ) -> StoreResult<()> {
        let user_id = user_id.to_string();
        let display_name = display_name.to_string();
        self.committer
            .submit(move |transaction| {
                create_user_in(
                    transaction,
                    &user_id,
                    &display_name,
                    created_at_ms,
                    token_hash,
                )
            })
            .await
    }

    async fn add_device(&self, user_id: &str, token_hash: [u8; 32]) -> StoreResult<u32> {
        let user_id = user_id.to_string();
        self.committer
            .submit(move |transaction| add_device_in(transaction, &user_id, token_hash))
            .await
    }

    async fn get_user(&self, user_id: &str) -> StoreResult<Option<UserRecord>> {
        read_point(&self.database, |transaction| {
            let users = transaction.open_table(USERS)?;
            users
                .get(user_id)?
                .map(|value| decode_user(user_id, value.value()))
                .transpose()
        })
    }

    async fn authenticate(&self, token_hash: [u8; 32]) -> StoreResult<Option<DeviceAddress>> {
        read_point(&self.database, |transaction| {
            let tokens = transaction.open_table(TOKENS)?;
            tokens
                .get(token_hash.as_slice())?
                .map(|value| Decoder::new(value.value()).device())
                .transpose()
        })
    }

    async fn publish_keys(
        &self,
        device: &DeviceAddress,
        identity: Option<IdentityKeys>,
        signed_prekey: Option<SignedPreKeyRecord>,
        one_time_prekeys: Vec<PreKeyRecord>,
    ) -> StoreResult<u32> {
        let device = device.clone();
        self.committer
            .submit(move |transaction| {
                publish_keys_in(
                    transaction,
                    &device,
                    identity.as_ref(),
                    signed_prekey.as_ref(),
                    &one_time_prekeys,
                )
            })
            .await
    }

    async fn device_keys(&self, device: &DeviceAddress) -> StoreResult<Option<DeviceKeys>> {
        let device_key = codec::device_key(device);
        read_point(&self.database, |transaction| {
            let identity_keys = transaction.open_table(IDENTITY_KEYS)?;
            let Some(identity_value) = identity_keys.get(device_key.as_slice())? else {
                return Ok(None);
            };
            let mut decoder = Decoder::new(identity_value.value());
            let identity = IdentityKeys {
                identity_key: Bytes::copy_from_slice(decoder.bytes()?),
                signing_key: Bytes::copy_from_slice(decoder.bytes()?),
            };
            let signed_prekeys = transaction.open_table(SIGNED_PREKEYS)?;
            let signed_prekey = match signed_prekeys.get(device_key.as_slice())? {
                Some(value) => {
                    let mut decoder = Decoder::new(value.value());
                    Some(SignedPreKeyRecord {
                        key_id: decoder.u32()?,
                        public_key: Bytes::copy_from_slice(decoder.bytes()?),
                        signature: Bytes::copy_from_slice(decoder.bytes()?),
                    })
                }
                None => None,
            };
            Ok(Some(DeviceKeys {
                identity,
                signed_prekey,
            }))
        })
    }

    async fn claim_one_time_prekey(
        &self,
        device: &DeviceAddress,
    ) -> StoreResult<Option<PreKeyRecord>> {
        let device = device.clone();
        self.committer
            .submit(move |transaction| claim_prekey_in(transaction, &device))
            .await
    }

    async fn count_one_time_prekeys(&self, device: &DeviceAddress) -> StoreResult<u32> {
        let device = device.clone();
        read_snapshot(&self.database, move |transaction| {
            let pool = transaction.open_table(ONE_TIME_PREKEYS)?;
            count_prekeys(&pool, &device)
        })
        .await
    }
}
