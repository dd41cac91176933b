//! [`CqlAccountStore`]: users, devices, tokens and the key directory.
//!
//! Account changes are rare, so uniqueness uses lightweight transactions: `users` rows are
//! created `IF NOT EXISTS` and the device counter moves with `IF device_count = n`;
//! `one_time_prekeys` rows are published by one conditional batch per call (a partition per
//! device, so one Paxos round) and claimed with `DELETE … IF public_key = ?`, so each key
//! is handed out at most once however many callers race. Both tables are written with LWT
//! only. `devices`, `device_tokens` and `device_keys` take plain writes, made after the LWT
//! that entitles them (a token is never written for a user someone else created).
//!
//! Paxos serializes rounds per partition, and Cassandra answers a round that lost too often
//! with a CAS write timeout. So claims of one device's prekeys are queued in-process (striped
//! locks) and only processes race each other. A claim whose outcome is unknown (timeout) is
//! never returned: the loop moves on to another key, so a key can be lost but never handed
//! out twice.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bluetick_proto::common::v1::DeviceAddress;
use bytes::Bytes;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

use super::session::{BatchValue, CqlSession};
use super::{CqlLocation, device_from_cql, device_to_cql, ms_from_cql, ms_to_cql};
use crate::{
    AccountStore, DeviceKeys, IdentityKeys, PreKeyRecord, SignedPreKeyRecord, StoreError,
    StoreResult, UserRecord,
};

/// Attempts of a compare-and-set loop before giving up as unavailable (contention).
const CAS_ATTEMPTS: u32 = 64;

/// Striped in-process locks that queue prekey claims per device.
const CLAIM_LOCK_STRIPES: usize = 64;

/// The CQL [`AccountStore`].
#[derive(Debug)]
pub struct CqlAccountStore {
    session: Arc<CqlSession>,
    statements: Statements,
    /// Claims of one device's prekeys take turns here instead of contending in Paxos.
    claim_locks: Vec<tokio::sync::Mutex<()>>,
}

#[derive(Debug)]
struct Statements {
    create_user: PreparedStatement,
    read_user: PreparedStatement,
    read_device_count: PreparedStatement,
    /// The token hash a user was registered with, at SERIAL consistency.
    read_registration: PreparedStatement,
    bump_device_count: PreparedStatement,
    insert_device: PreparedStatement,
    insert_token: PreparedStatement,
    read_devices: PreparedStatement,
    device_exists: PreparedStatement,
    authenticate: PreparedStatement,
    write_identity: PreparedStatement,
    write_signed_prekey: PreparedStatement,
    read_keys: PreparedStatement,
    existing_prekeys: PreparedStatement,
    insert_prekey: PreparedStatement,
    replace_prekey: PreparedStatement,
    lowest_prekeys: PreparedStatement,
    claim_prekey: PreparedStatement,
    count_prekeys: PreparedStatement,
}

/// `(identity_key, signing_key, signed_prekey_id, signed_prekey, signed_prekey_signature)`.
type KeysRow = (
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<i32>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
);

impl CqlAccountStore {
    /// Connects (or reuses the session of `location`) and prepares every statement.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the engine cannot be reached.
    pub async fn open(location: &CqlLocation) -> StoreResult<Self> {
        let session = CqlSession::shared(location).await?;
        let serial = match location.serial_consistency {
            scylla::frame::types::SerialConsistency::Serial => {
                scylla::frame::types::Consistency::Serial
            }
            scylla::frame::types::SerialConsistency::LocalSerial => {
                scylla::frame::types::Consistency::LocalSerial
            }
        };
        let mut read_device_count = session
            .prepare("SELECT device_count FROM users WHERE user_id = ?", true)
            .await?;
        read_device_count.set_consistency(serial);
        let mut read_registration = session
            .prepare(
                "SELECT registration_token_hash FROM users WHERE user_id = ?",
                true,
            )
            .await?;
        read_registration.set_consistency(serial);
        let statements = Statements {
            create_user: session
                .prepare(
                    "INSERT INTO users (user_id, display_name, created_at_ms, device_count, \
                     registration_token_hash) VALUES (?, ?, ?, 1, ?) IF NOT EXISTS",
                    false,
                )
                .await?,
            read_user: session
                .prepare(
                    "SELECT display_name, created_at_ms FROM users WHERE user_id = ?",
                    true,
                )
                .await?,
            read_device_count,
            read_registration,
            bump_device_count: session
                .prepare(
                    "UPDATE users SET device_count = ? WHERE user_id = ? IF device_count = ?",
                    false,
                )
                .await?,
            insert_device: session
                .prepare(
                    "INSERT INTO devices (user_id, device_id, token_hash) VALUES (?, ?, ?)",
                    true,
                )
                .await?,
            insert_token: session
                .prepare(
                    "INSERT INTO device_tokens (token_hash, user_id, device_id) VALUES (?, ?, ?)",
                    true,
                )
                .await?,
            read_devices: session
                .prepare("SELECT device_id FROM devices WHERE user_id = ?", true)
                .await?,
            device_exists: session
                .prepare(
                    "SELECT device_id FROM devices WHERE user_id = ? AND device_id = ?",
                    true,
                )
                .await?,
            authenticate: session
                .prepare(
                    "SELECT user_id, device_id FROM device_tokens WHERE token_hash = ?",
                    true,
                )
                .await?,
            write_identity: session
                .prepare(
                    "UPDATE device_keys SET identity_key = ?, signing_key = ? \
                     WHERE user_id = ? AND device_id = ?",
                    true,
                )
                .await?,
            write_signed_prekey: session
                .prepare(
                    "UPDATE device_keys SET signed_prekey_id = ?, signed_prekey = ?, \
                     signed_prekey_signature = ? WHERE user_id = ? AND device_id = ?",
                    true,
                )
                .await?,
            read_keys: session
                .prepare(
                    "SELECT identity_key, signing_key, signed_prekey_id, signed_prekey, \
                     signed_prekey_signature FROM device_keys WHERE user_id = ? AND device_id = ?",
                    true,
                )
                .await?,
            existing_prekeys: session
                .prepare(
                    "SELECT key_id FROM one_time_prekeys \
                     WHERE user_id = ? AND device_id = ? AND key_id IN ?",
                    true,
                )
                .await?,
            insert_prekey: session
                .prepare(
                    "INSERT INTO one_time_prekeys (user_id, device_id, key_id, public_key) \
                     VALUES (?, ?, ?, ?) IF NOT EXISTS",
                    false,
                )
                .await?,
            replace_prekey: session
                .prepare(
                    "UPDATE one_time_prekeys SET public_key = ? \
                     WHERE user_id = ? AND device_id = ? AND key_id = ? IF EXISTS",
                    false,
                )
                .await?,
            lowest_prekeys: session
                .prepare(
                    "SELECT key_id, public_key FROM one_time_prekeys \
                     WHERE user_id = ? AND device_id = ? LIMIT ?",
                    true,
                )
                .await?,
            claim_prekey: session
                .prepare(
                    "DELETE FROM one_time_prekeys WHERE user_id = ? AND device_id = ? \
                     AND key_id = ? IF public_key = ?",
                    false,
                )
                .await?,
            count_prekeys: session
                .prepare(
                    "SELECT COUNT(*) FROM one_time_prekeys WHERE user_id = ? AND device_id = ?",
                    true,
                )
                .await?,
        };
        Ok(Self {
            session,
            statements,
            claim_locks: (0..CLAIM_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        })
    }

    fn claim_lock(&self, device: &DeviceAddress) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        device.user_id.hash(&mut hasher);
        device.device_id.hash(&mut hasher);
        let stripe = usize::try_from(hasher.finish() % CLAIM_LOCK_STRIPES as u64).unwrap_or(0);
        &self.claim_locks[stripe]
    }

    /// Writes a device row and its token in one logged batch.
    async fn write_device(
        &self,
        user_id: &str,
        device_id: u32,
        token_hash: [u8; 32],
    ) -> StoreResult<()> {
        let mut batch = Batch::new(BatchType::Logged);
        batch.set_is_idempotent(true);
        batch.append_statement(self.statements.insert_device.clone());
        batch.append_statement(self.statements.insert_token.clone());
        let values: Vec<BatchValue> = vec![
            Box::new((
                user_id.to_string(),
                device_to_cql(device_id),
                token_hash.to_vec(),
            )),
            Box::new((
                token_hash.to_vec(),
                user_id.to_string(),
                device_to_cql(device_id),
            )),
        ];
        self.session.batch(&batch, values).await?;
        Ok(())
    }

    async fn device_exists(&self, device: &DeviceAddress) -> StoreResult<bool> {
        let row: Option<(i32,)> = self
            .session
            .first_row(
                &self.statements.device_exists,
                (device.user_id.as_str(), device_to_cql(device.device_id)),
            )
            .await?;
        Ok(row.is_some())
    }
}

/// Returns a pause before retry `attempt` of a contended compare-and-set, with jitter.
fn backoff(attempt: u32) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    let base_ms = u64::from(attempt.min(6)) * 5;
    Duration::from_millis(base_ms + u64::from(nanos % 10))
}

/// Returns the `int` that stores a key id, order-preserving (sign bit flipped), so the
/// lowest id sorts first.
fn key_id_to_cql(key_id: u32) -> i32 {
    (key_id ^ (1 << 31)) as i32
}

/// Inverse of [`key_id_to_cql`].
fn key_id_from_cql(value: i32) -> u32 {
    (value as u32) ^ (1 << 31)
}

#[async_trait]
impl AccountStore for CqlAccountStore {
    async fn create_user(
        &self,
        user_id: &str,
        display_name: &str,
        created_at_ms: u64,
        token_hash: [u8; 32],
    ) -> StoreResult<()> {
        let created = self
            .session
            .execute_conditional(
                &self.statements.create_user,
                (
                    user_id,
                    display_name,
                    ms_to_cql(created_at_ms),
                    token_hash.to_vec(),
                ),
            )
            .await;
        match created {
            Ok(true) => {}
            // Not applied, or a timed-out Paxos round that may have been: whose user is it?
            Ok(false) | Err(StoreError::Unavailable(_)) => {
                let row: Option<(Option<Vec<u8>>,)> = self
                    .session
                    .first_row(&self.statements.read_registration, (user_id,))
                    .await?;
                match row {
                    // This registration, earlier: finish it (the device rows may be
                    // missing) by writing them again.
                    Some((Some(registered),)) if registered == token_hash => {}
                    Some(_) => return Err(StoreError::AlreadyExists(format!("user {user_id}"))),
                    None => match created {
                        Err(error) => return Err(error),
                        Ok(_) => {
                            return Err(StoreError::Unavailable(format!(
                                "user {user_id} neither created nor found"
                            )));
                        }
                    },
                }
            }
            Err(error) => return Err(error),
        }
        self.write_device(user_id, 1, token_hash).await
    }

    async fn add_device(&self, user_id: &str, token_hash: [u8; 32]) -> StoreResult<u32> {
        for attempt in 0..CAS_ATTEMPTS {
            let row: Option<(Option<i32>,)> = self
                .session
                .first_row(&self.statements.read_device_count, (user_id,))
                .await?;
            let Some((count,)) = row else {
                return Err(StoreError::NotFound(format!("user {user_id}")));
            };
            let count = count.unwrap_or(0);
            let next = count.checked_add(1).ok_or_else(|| {
                StoreError::Internal(format!("user {user_id} has too many devices"))
            })?;
            if self
                .session
                .execute_conditional(&self.statements.bump_device_count, (next, user_id, count))
                .await?
            {
                let device_id = device_from_cql(next)?;
                self.write_device(user_id, device_id, token_hash).await?;
                return Ok(device_id);
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
        Err(StoreError::Unavailable(format!(
            "too much contention adding a device to {user_id}"
        )))
    }

    async fn get_user(&self, user_id: &str) -> StoreResult<Option<UserRecord>> {
        let row: Option<(Option<String>, Option<i64>)> = self
            .session
            .first_row(&self.statements.read_user, (user_id,))
            .await?;
        let Some((display_name, created_at_ms)) = row else {
            return Ok(None);
        };
        let devices: Vec<(i32,)> = self
            .session
            .rows(&self.statements.read_devices, (user_id,))
            .await?;
        let mut device_ids = devices
            .into_iter()
            .map(|(device_id,)| device_from_cql(device_id))
            .collect::<StoreResult<Vec<u32>>>()?;
        device_ids.sort_unstable();
        Ok(Some(UserRecord {
            user_id: user_id.to_string(),
            display_name: display_name.unwrap_or_default(),
            created_at_ms: created_at_ms.map_or(0, ms_from_cql),
            device_ids,
        }))
    }

    async fn authenticate(&self, token_hash: [u8; 32]) -> StoreResult<Option<DeviceAddress>> {
        let row: Option<(String, i32)> = self
            .session
            .first_row(&self.statements.authenticate, (token_hash.to_vec(),))
            .await?;
        row.map(|(user_id, device_id)| Ok(DeviceAddress::new(user_id, device_from_cql(device_id)?)))
            .transpose()
    }

    async fn publish_keys(
        &self,
        device: &DeviceAddress,
        identity: Option<IdentityKeys>,
        signed_prekey: Option<SignedPreKeyRecord>,
        one_time_prekeys: Vec<PreKeyRecord>,
    ) -> StoreResult<u32> {
        if !self.device_exists(device).await? {
            return Err(StoreError::NotFound(format!("device {device}")));
        }
        let user_id = device.user_id.as_str();
        let device_id = device_to_cql(device.device_id);
        if let Some(identity) = identity {
            self.session
                .execute(
                    &self.statements.write_identity,
                    (
                        identity.identity_key.to_vec(),
                        identity.signing_key.to_vec(),
                        user_id,
                        device_id,
                    ),
                )
                .await?;
        }
        if let Some(signed) = signed_prekey {
            self.session
                .execute(
                    &self.statements.write_signed_prekey,
                    (
                        key_id_to_cql(signed.key_id),
                        signed.public_key.to_vec(),
                        signed.signature.to_vec(),
                        user_id,
                        device_id,
                    ),
                )
                .await?;
        }
        if !one_time_prekeys.is_empty() {
            // The last record wins for an id given twice.
            let mut by_id = std::collections::BTreeMap::new();
            for prekey in one_time_prekeys {
                by_id.insert(prekey.key_id, prekey.public_key);
            }
            let ids: Vec<i32> = by_id.keys().copied().map(key_id_to_cql).collect();
            let mut published = false;
            for attempt in 0..CAS_ATTEMPTS {
                let existing: Vec<(i32,)> = self
                    .session
                    .rows(
                        &self.statements.existing_prekeys,
                        (user_id, device_id, &ids),
                    )
                    .await?;
                let existing: std::collections::HashSet<u32> = existing
                    .into_iter()
                    .map(|(key_id,)| key_id_from_cql(key_id))
                    .collect();
                // One partition, one Paxos round: insert new ids, replace present ones.
                let mut batch = Batch::new(BatchType::Logged);
                let mut values: Vec<BatchValue> = Vec::with_capacity(by_id.len());
                for (key_id, public_key) in &by_id {
                    if existing.contains(key_id) {
                        batch.append_statement(self.statements.replace_prekey.clone());
                        values.push(Box::new((
                            public_key.to_vec(),
                            device.user_id.clone(),
                            device_id,
                            key_id_to_cql(*key_id),
                        )));
                    } else {
                        batch.append_statement(self.statements.insert_prekey.clone());
                        values.push(Box::new((
                            device.user_id.clone(),
                            device_id,
                            key_id_to_cql(*key_id),
                            public_key.to_vec(),
                        )));
                    }
                }
                if self.session.batch_conditional(&batch, values).await? {
                    published = true;
                    break;
                }
                // A key was claimed (or published) meanwhile: look again.
                tokio::time::sleep(backoff(attempt)).await;
            }
            if !published {
                return Err(StoreError::Unavailable(format!(
                    "too much contention publishing prekeys of {device}"
                )));
            }
        }
        self.count_one_time_prekeys(device).await
    }

    async fn device_keys(&self, device: &DeviceAddress) -> StoreResult<Option<DeviceKeys>> {
        let row: Option<KeysRow> = self
            .session
            .first_row(
                &self.statements.read_keys,
                (device.user_id.as_str(), device_to_cql(device.device_id)),
            )
            .await?;
        let Some((Some(identity_key), Some(signing_key), spk_id, spk, spk_signature)) = row else {
            return Ok(None);
        };
        let signed_prekey = match (spk_id, spk, spk_signature) {
            (Some(key_id), Some(public_key), Some(signature)) => Some(SignedPreKeyRecord {
                key_id: key_id_from_cql(key_id),
                public_key: Bytes::from(public_key),
                signature: Bytes::from(signature),
            }),
            _ => None,
        };
        Ok(Some(DeviceKeys {
            identity: IdentityKeys {
                identity_key: Bytes::from(identity_key),
                signing_key: Bytes::from(signing_key),
            },
            signed_prekey,
        }))
    }

    async fn claim_one_time_prekey(
        &self,
        device: &DeviceAddress,
    ) -> StoreResult<Option<PreKeyRecord>> {
        let user_id = device.user_id.as_str();
        let device_id = device_to_cql(device.device_id);
        let _turn = self.claim_lock(device).lock().await;
        for attempt in 0..CAS_ATTEMPTS {
            // First try the lowest key; under contention spread over the lowest few.
            let window: i32 = if attempt == 0 { 1 } else { 8 };
            let candidates: Vec<(i32, Vec<u8>)> = self
                .session
                .rows(
                    &self.statements.lowest_prekeys,
                    (user_id, device_id, window),
                )
                .await?;
            if candidates.is_empty() {
                return Ok(None);
            }
            let pick = if attempt == 0 {
                0
            } else {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |elapsed| elapsed.subsec_nanos() as usize);
                (nanos / 1000 + attempt as usize) % candidates.len()
            };
            let (key_id, public_key) = &candidates[pick];
            let claimed = match self
                .session
                .execute_conditional(
                    &self.statements.claim_prekey,
                    (user_id, device_id, *key_id, public_key),
                )
                .await
            {
                Ok(claimed) => claimed,
                // Unknown outcome: never return this key, try another.
                Err(StoreError::Unavailable(detail)) => {
                    tracing::warn!(%device, key_id = key_id_from_cql(*key_id), %detail, "prekey claim outcome unknown");
                    false
                }
                Err(other) => return Err(other),
            };
            if claimed {
                return Ok(Some(PreKeyRecord {
                    key_id: key_id_from_cql(*key_id),
                    public_key: Bytes::from(public_key.clone()),
                }));
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
        Err(StoreError::Unavailable(format!(
            "too much contention claiming a prekey of {device}"
        )))
    }

    async fn count_one_time_prekeys(&self, device: &DeviceAddress) -> StoreResult<u32> {
        let row: Option<(i64,)> = self
            .session
            .first_row(
                &self.statements.count_prekeys,
                (device.user_id.as_str(), device_to_cql(device.device_id)),
            )
            .await?;
        Ok(row.map_or(0, |(count,)| u32::try_from(count).unwrap_or(u32::MAX)))
    }
}
