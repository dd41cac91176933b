//! bluetick's storage: one small trait per concern, each owned by one service.
//!
//! | trait | owner | holds |
//! |---|---|---|
//! | [`AccountStore`] | gateway | users, devices, token hashes, public keys and prekeys |
//! | [`InboxStore`] | messaging | each device's undelivered and unread messages, idempotency records |
//! | [`TickStore`] | ack | tick state per message and recipient device, receipts waiting for senders |
//! | [`PresenceStore`] | presence | last seen per user, last-seen privacy and contacts |
//!
//! Every method that returns `Ok` after a write has made it durable (fsync / group commit
//! in the embedded store, a QUORUM-class write in CQL), with three exceptions whose loss in
//! a crash only repeats work, so the embedded store answers them once visible and makes them
//! durable with its next durable commit, at the latest 100 ms later:
//! [`InboxStore::mark_delivered`] (the messages are pending again and devices drop the
//! copies by id), [`TickStore::confirm_receipts`] (the receipts are sent again and change
//! nothing) and [`TickStore::acknowledge`], whose caller awaits [`TickStore::flush`] before
//! the inbox is settled (a lost tick leaves its message pending: it is delivered again,
//! acknowledged again, and the receipt stored again).
//!
//! Implementations: [`embedded`] (fjall and redb databases in one directory, the default)
//! and [`cql`] (Cassandra / ScyllaDB). The `conformance` suite (feature `testsuite`) is run
//! against each.

use std::sync::Arc;

use async_trait::async_trait;
use bluetick_proto::common::v1::{DeviceAddress, LastSeenVisibility, TickStatus};
use bytes::Bytes;

#[cfg(feature = "testsuite")]
pub mod conformance;
pub mod cql;
pub mod embedded;

/// Why a store call failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The record to change does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The record to create exists already.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The engine cannot be reached or refused the write; the call may be retried.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be decoded, or another bug.
    #[error("storage internal error: {0}")]
    Internal(String),
}

/// Result of a store call.
pub type StoreResult<T> = Result<T, StoreError>;

impl From<StoreError> for tonic::Status {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(what) => tonic::Status::not_found(what),
            StoreError::AlreadyExists(what) => tonic::Status::already_exists(what),
            StoreError::Unavailable(detail) => {
                tracing::warn!(%detail, "storage unavailable");
                tonic::Status::unavailable("storage unavailable, try again")
            }
            StoreError::Internal(detail) => {
                tracing::error!(%detail, "storage internal error");
                tonic::Status::internal("internal storage error")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Accounts and keys (gateway)
// ---------------------------------------------------------------------------------------

/// A user as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRecord {
    pub user_id: String,
    pub display_name: String,
    pub created_at_ms: u64,
    /// Device numbers, ascending. Device 1 is created with the user.
    pub device_ids: Vec<u32>,
}

/// A device's long-term public keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityKeys {
    /// X25519 identity public key.
    pub identity_key: Bytes,
    /// Ed25519 key that signs prekeys.
    pub signing_key: Bytes,
}

/// A public prekey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreKeyRecord {
    pub key_id: u32,
    pub public_key: Bytes,
}

/// A signed public prekey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedPreKeyRecord {
    pub key_id: u32,
    pub public_key: Bytes,
    pub signature: Bytes,
}

/// What the key directory holds for one device, apart from its one-time prekeys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceKeys {
    pub identity: IdentityKeys,
    pub signed_prekey: Option<SignedPreKeyRecord>,
}

/// Users, devices, tokens and the public key directory. Owned by the gateway.
#[async_trait]
pub trait AccountStore: Send + Sync + std::fmt::Debug + 'static {
    /// Creates `user_id` with device 1, reachable with the token whose SHA-256 is
    /// `token_hash`. [`StoreError::AlreadyExists`] if the user exists, unless it was created
    /// with this same `token_hash`: then this is a repeat of that registration (its answer
    /// was lost, or it was interrupted half-way), which is completed if need be and `Ok`.
    async fn create_user(
        &self,
        user_id: &str,
        display_name: &str,
        created_at_ms: u64,
        token_hash: [u8; 32],
    ) -> StoreResult<()>;

    /// Adds a device to `user_id` and returns its number (one more than the highest so
    /// far). [`StoreError::NotFound`] if the user does not exist.
    async fn add_device(&self, user_id: &str, token_hash: [u8; 32]) -> StoreResult<u32>;

    /// Returns the user, or `None`.
    async fn get_user(&self, user_id: &str) -> StoreResult<Option<UserRecord>>;

    /// Returns the device whose token hashes to `token_hash`, or `None`.
    async fn authenticate(&self, token_hash: [u8; 32]) -> StoreResult<Option<DeviceAddress>>;

    /// Stores keys for a device that exists: identity keys and signed prekey replace the
    /// stored ones when given; one-time prekeys are added to the pool (an id already in the
    /// pool is replaced). Returns the pool size afterwards.
    async fn publish_keys(
        &self,
        device: &DeviceAddress,
        identity: Option<IdentityKeys>,
        signed_prekey: Option<SignedPreKeyRecord>,
        one_time_prekeys: Vec<PreKeyRecord>,
    ) -> StoreResult<u32>;

    /// Returns a device's identity keys and signed prekey, or `None` if it published none.
    async fn device_keys(&self, device: &DeviceAddress) -> StoreResult<Option<DeviceKeys>>;

    /// Removes and returns one one-time prekey of the device (the lowest id). Each prekey is
    /// returned at most once, even to concurrent callers. `None` when the pool is empty.
    async fn claim_one_time_prekey(
        &self,
        device: &DeviceAddress,
    ) -> StoreResult<Option<PreKeyRecord>>;

    /// Returns how many one-time prekeys the device has left.
    async fn count_one_time_prekeys(&self, device: &DeviceAddress) -> StoreResult<u32>;
}

// ---------------------------------------------------------------------------------------
// Inbox (messaging)
// ---------------------------------------------------------------------------------------

/// A message accepted for one recipient user, with one payload per recipient device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptRecord {
    /// Assigned by messaging; used only if the message is new.
    pub message_id: u64,
    pub sender: DeviceAddress,
    /// Unique per sender device; a second accept with the same pair is a duplicate.
    pub client_msg_id: String,
    pub recipient_user_id: String,
    pub sent_at_ms: u64,
    /// After this the message is gone whether read or not.
    pub expires_at_ms: u64,
    /// `(recipient device, payload)`, one per device.
    pub envelopes: Vec<(u32, Bytes)>,
}

/// What [`InboxStore::accept_batch`] did with one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptOutcome {
    /// The message was stored with the record's id.
    Stored,
    /// `(sender, client_msg_id)` had been accepted before, as this message; nothing new was
    /// stored.
    Duplicate { message_id: u64, sent_at_ms: u64 },
}

/// One device's copy of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub message_id: u64,
    pub sender: DeviceAddress,
    pub recipient: DeviceAddress,
    pub sent_at_ms: u64,
    pub expires_at_ms: u64,
    pub payload: Bytes,
}

/// Per-device inboxes: messages stored until read (or expired). Owned by messaging.
#[async_trait]
pub trait InboxStore: Send + Sync + std::fmt::Debug + 'static {
    /// Accepts consecutive messages of one sender, in order: for each record, atomically
    /// and durably stores every envelope in its device's inbox together with the
    /// idempotency record of `(sender, client_msg_id)`, or reports the earlier duplicate.
    /// Returns one outcome per record, in order.
    ///
    /// **Order.** The messages become visible to [`pending`](Self::pending) in record order:
    /// a read that returns one of them also returns (if still pending) every earlier
    /// message of the batch to the same device. When storing a record fails, no later new
    /// record of the batch is stored either (each fails; resending repairs them in order).
    /// A device that reconnects while its sender's batch is being stored thus reads a
    /// prefix of the batch as its backlog and gets the rest pushed live, never a later
    /// message before an earlier one.
    async fn accept_batch(&self, records: Vec<AcceptRecord>) -> Vec<StoreResult<AcceptOutcome>>;

    /// Accepts one message: [`accept_batch`](Self::accept_batch) of one record.
    async fn accept(&self, record: AcceptRecord) -> StoreResult<AcceptOutcome> {
        self.accept_batch(vec![record])
            .await
            .pop()
            .unwrap_or_else(|| Err(StoreError::Internal("accept returned no outcome".into())))
    }

    /// Returns up to `limit` messages of `device` not yet delivered, not expired at
    /// `now_ms`, with ids greater than `after_message_id`, in ascending id order.
    async fn pending(
        &self,
        device: &DeviceAddress,
        after_message_id: u64,
        limit: usize,
        now_ms: u64,
    ) -> StoreResult<Vec<StoredMessage>>;

    /// Marks messages as delivered to `device`: no longer pending, still stored until read.
    /// Unknown ids are ignored. May be lost in a crash (see the crate documentation).
    async fn mark_delivered(&self, device: &DeviceAddress, message_ids: &[u64]) -> StoreResult<()>;

    /// Deletes messages from `device`'s inbox (they were read). Unknown ids are ignored.
    async fn remove(&self, device: &DeviceAddress, message_ids: &[u64]) -> StoreResult<()>;

    /// Returns whether `device`'s inbox still holds the message, delivered or not.
    async fn contains(&self, device: &DeviceAddress, message_id: u64) -> StoreResult<bool>;

    /// Deletes messages and idempotency records expired at `now_ms`; returns how many
    /// messages went. Engines with native TTLs may do nothing.
    async fn purge_expired(&self, now_ms: u64) -> StoreResult<u64>;
}

// ---------------------------------------------------------------------------------------
// Ticks and receipts (ack)
// ---------------------------------------------------------------------------------------

/// A message as ack knows it: who sent it to which devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentRecord {
    pub message_id: u64,
    pub sender: DeviceAddress,
    pub recipient_user_id: String,
    pub recipient_device_ids: Vec<u32>,
    pub sent_at_ms: u64,
    pub expires_at_ms: u64,
}

/// A receipt waiting for (or delivered to) a sender device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredReceipt {
    /// Unique per sender device; receipts are returned in this order.
    pub receipt_id: u64,
    /// The device that sent the message and receives this receipt.
    pub sender: DeviceAddress,
    pub message_id: u64,
    /// The recipient device whose state changed.
    pub recipient: DeviceAddress,
    /// DELIVERED or READ.
    pub status: TickStatus,
    pub at_ms: u64,
}

/// What one acknowledgement did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// The state moved forward; the receipt was stored for the sender.
    Advanced(StoredReceipt),
    /// The state was already at or past the requested one.
    Unchanged,
    /// No such message (or it expired).
    NotFound,
    /// The message exists but was not sent to this device.
    NotRecipient,
}

/// Tick state per message and recipient device, and receipts waiting for senders. Owned by
/// ack.
#[async_trait]
pub trait TickStore: Send + Sync + std::fmt::Debug + 'static {
    /// Records the message as SENT for each recipient device. Idempotent: recording it
    /// again leaves states that moved on untouched.
    async fn record_sent(&self, record: SentRecord) -> StoreResult<()>;

    /// Moves each message to `status` for `recipient` (never backwards; READ implies
    /// DELIVERED) and, for each advance, atomically stores a receipt for the sender device
    /// with the paired receipt id. Returns one outcome per `(message_id, receipt_id)`, in
    /// order.
    ///
    /// May answer once the change is visible, before it is durable (the receipts can then
    /// be pushed to the senders one disk flush sooner): [`flush`](Self::flush) makes it
    /// durable, and must have returned before anything that depends on the tick being
    /// stored, such as settling the recipient's inbox.
    async fn acknowledge(
        &self,
        recipient: &DeviceAddress,
        status: TickStatus,
        acks: Vec<(u64, u64)>,
        at_ms: u64,
    ) -> StoreResult<Vec<AckOutcome>>;

    /// Makes every write this store has answered so far durable. Stores whose writes are
    /// durable when answered (CQL) return at once.
    async fn flush(&self) -> StoreResult<()>;

    /// Returns up to `limit` receipts waiting for `sender`, with ids greater than
    /// `after_receipt_id`, ascending.
    async fn pending_receipts(
        &self,
        sender: &DeviceAddress,
        after_receipt_id: u64,
        limit: usize,
    ) -> StoreResult<Vec<StoredReceipt>>;

    /// Forgets receipts `sender` has processed. Unknown ids are ignored. May be lost in a
    /// crash (see the crate documentation).
    async fn confirm_receipts(
        &self,
        sender: &DeviceAddress,
        receipt_ids: &[u64],
    ) -> StoreResult<()>;

    /// Returns `(message_id, recipient device, status)` for each recipient device of the
    /// given messages that `sender` sent; messages sent by others are left out.
    async fn status(
        &self,
        sender: &DeviceAddress,
        message_ids: &[u64],
    ) -> StoreResult<Vec<(u64, u32, TickStatus)>>;

    /// Deletes records expired at `now_ms`; returns how many went.
    async fn purge_expired(&self, now_ms: u64) -> StoreResult<u64>;
}

// ---------------------------------------------------------------------------------------
// Presence (presence)
// ---------------------------------------------------------------------------------------

/// Who may see a user's last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Privacy {
    /// EVERYONE when never set.
    pub visibility: LastSeenVisibility,
    /// The user's contacts, for CONTACTS visibility.
    pub contacts: Vec<String>,
}

impl Default for Privacy {
    fn default() -> Self {
        Self {
            visibility: LastSeenVisibility::Everyone,
            contacts: Vec::new(),
        }
    }
}

/// Last seen and privacy settings. Owned by presence. Online state and routes stay in
/// memory; only last seen is written, coalesced.
#[async_trait]
pub trait PresenceStore: Send + Sync + std::fmt::Debug + 'static {
    /// Records last-seen times; a stored time is never moved backwards.
    async fn record_last_seen(&self, entries: Vec<(String, u64)>) -> StoreResult<()>;

    /// Returns a user's last seen, or `None` if never seen.
    async fn last_seen(&self, user_id: &str) -> StoreResult<Option<u64>>;

    /// Sets a user's last-seen visibility.
    async fn set_visibility(
        &self,
        user_id: &str,
        visibility: LastSeenVisibility,
    ) -> StoreResult<()>;

    /// Replaces a user's contact list.
    async fn set_contacts(&self, user_id: &str, contacts: Vec<String>) -> StoreResult<()>;

    /// Returns a user's privacy settings (defaults if never set).
    async fn privacy(&self, user_id: &str) -> StoreResult<Privacy>;
}

/// Shared handle to an [`AccountStore`].
pub type AccountStoreRef = Arc<dyn AccountStore>;
/// Shared handle to an [`InboxStore`].
pub type InboxStoreRef = Arc<dyn InboxStore>;
/// Shared handle to a [`TickStore`].
pub type TickStoreRef = Arc<dyn TickStore>;
/// Shared handle to a [`PresenceStore`].
pub type PresenceStoreRef = Arc<dyn PresenceStore>;

/// Where a service keeps its data, parsed from a store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    /// The embedded store in a local directory (`/path`, `embedded:///path` or `file:///path`).
    Embedded(std::path::PathBuf),
    /// Cassandra or ScyllaDB: `scylla://host:9042[,host:port]/keyspace?options` (or `cql://`).
    Cql(cql::CqlLocation),
}

impl StoreLocation {
    /// Parses a store URL.
    ///
    /// # Errors
    /// [`StoreError::Internal`] for an unknown scheme.
    pub fn parse(url: &str) -> StoreResult<Self> {
        if url.starts_with("scylla://") || url.starts_with("cql://") {
            return Ok(Self::Cql(cql::CqlLocation::parse(url)?));
        }
        if let Some(path) = url
            .strip_prefix("embedded://")
            .or_else(|| url.strip_prefix("file://"))
        {
            return Ok(Self::Embedded(path.into()));
        }
        if url.contains("://") {
            return Err(StoreError::Internal(format!(
                "unsupported store url {url:?} (expected a directory path, embedded://path or scylla://host:port/keyspace)"
            )));
        }
        Ok(Self::Embedded(url.into()))
    }
}

/// Opens the account store at `url`.
///
/// # Errors
/// When the URL is invalid or the store cannot be opened.
pub async fn open_account_store(url: &str) -> StoreResult<AccountStoreRef> {
    match StoreLocation::parse(url)? {
        StoreLocation::Embedded(dir) => Ok(Arc::new(embedded::EmbeddedAccountStore::open(&dir)?)),
        StoreLocation::Cql(location) => Ok(Arc::new(cql::CqlAccountStore::open(&location).await?)),
    }
}

/// Opens the inbox store at `url`.
///
/// # Errors
/// When the URL is invalid or the store cannot be opened.
pub async fn open_inbox_store(url: &str) -> StoreResult<InboxStoreRef> {
    match StoreLocation::parse(url)? {
        StoreLocation::Embedded(dir) => Ok(Arc::new(embedded::EmbeddedInboxStore::open(&dir)?)),
        StoreLocation::Cql(location) => Ok(Arc::new(cql::CqlInboxStore::open(&location).await?)),
    }
}

/// Opens the tick store at `url`.
///
/// # Errors
/// When the URL is invalid or the store cannot be opened.
pub async fn open_tick_store(url: &str) -> StoreResult<TickStoreRef> {
    match StoreLocation::parse(url)? {
        StoreLocation::Embedded(dir) => Ok(Arc::new(embedded::EmbeddedTickStore::open(&dir)?)),
        StoreLocation::Cql(location) => Ok(Arc::new(cql::CqlTickStore::open(&location).await?)),
    }
}

/// Opens the presence store at `url`.
///
/// # Errors
/// When the URL is invalid or the store cannot be opened.
pub async fn open_presence_store(url: &str) -> StoreResult<PresenceStoreRef> {
    match StoreLocation::parse(url)? {
        StoreLocation::Embedded(dir) => Ok(Arc::new(embedded::EmbeddedPresenceStore::open(&dir)?)),
        StoreLocation::Cql(location) => Ok(Arc::new(cql::CqlPresenceStore::open(&location).await?)),
    }
}
