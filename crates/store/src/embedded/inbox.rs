//! [`EmbeddedInboxStore`]: per-device inboxes in the fjall database `inbox/`.
//!
//! Keyspaces (keys per [`codec`](super::codec)):
//! - `undelivered`: `(recipient device, message_id)` → message. `pending` scans only this.
//! - `delivered`: same key and value; `mark_delivered` moves rows here until they are read.
//! - `message_expiry`: `(expires_at_ms, inbox key)` → empty, so purging reads only what expired.
//! - `idempotency`: `(sender device, client_msg_id)` → `(message_id, sent_at_ms, expires_at_ms)`.
//! - `idempotency_expiry`: `(expires_at_ms, idempotency key)` → empty.
//!
//! A message value is `sender, sent_at_ms, expires_at_ms, payload` (payload unprefixed, last).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bluetick_proto::common::v1::DeviceAddress;
use bytes::Bytes;
use fjall::{Readable, SingleWriterTxDatabase, SingleWriterTxKeyspace};

use super::codec::{self, Decoder, Encoder};
use super::committer::{GroupCommitter, JournalTransaction};
use super::{open_journal_database, read_journal_snapshot};
use crate::{AcceptOutcome, AcceptRecord, InboxStore, StoreResult, StoredMessage};

/// The inbox's keyspaces.
struct Tables {
    undelivered: SingleWriterTxKeyspace,
    delivered: SingleWriterTxKeyspace,
    message_expiry: SingleWriterTxKeyspace,
    idempotency: SingleWriterTxKeyspace,
    idempotency_expiry: SingleWriterTxKeyspace,
}

/// The embedded [`InboxStore`], in the fjall database `inbox/`.
pub struct EmbeddedInboxStore {
    database: Arc<SingleWriterTxDatabase>,
    tables: Arc<Tables>,
    committer: GroupCommitter<SingleWriterTxDatabase>,
}

impl std::fmt::Debug for EmbeddedInboxStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EmbeddedInboxStore")
            .field("committer", &self.committer)
            .finish_non_exhaustive()
    }
}

impl EmbeddedInboxStore {
    /// Opens (or creates) the database `inbox/` in `dir`, creating directories if needed.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`](crate::StoreError::Unavailable) if it cannot be opened,
    /// for instance because another process has it open, or if `dir` still holds an
    /// `inbox.redb` of an earlier bluetick.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        let (database, keyspaces) = open_journal_database(
            dir,
            "inbox",
            [
                "undelivered",
                "delivered",
                "message_expiry",
                "idempotency",
                "idempotency_expiry",
            ],
        )?;
        let [
            undelivered,
            delivered,
            message_expiry,
            idempotency,
            idempotency_expiry,
        ] = keyspaces;
        let tables = Arc::new(Tables {
            undelivered,
            delivered,
            message_expiry,
            idempotency,
            idempotency_expiry,
        });
        let committer = GroupCommitter::start("inbox", Arc::clone(&database))?;
        Ok(Self {
            database,
            tables,
            committer,
        })
    }

    /// Returns how many write transactions (fsyncs) this store has committed; fewer than
    /// the writes when concurrent writes were grouped.
    pub fn commit_count(&self) -> u64 {
        self.committer.commit_count()
    }
}

fn encode_message(
    sender: &DeviceAddress,
    sent_at_ms: u64,
    expires_at_ms: u64,
    payload: &[u8],
) -> Vec<u8> {
    Encoder::new()
        .device(sender)
        .u64(sent_at_ms)
        .u64(expires_at_ms)
        .raw(payload)
        .finish()
}

fn decode_message(
    recipient: &DeviceAddress,
    message_id: u64,
    value: &[u8],
) -> StoreResult<StoredMessage> {
    let mut decoder = Decoder::new(value);
    let sender = decoder.device()?;
    let sent_at_ms = decoder.u64()?;
    let expires_at_ms = decoder.u64()?;
    let payload = Bytes::copy_from_slice(decoder.rest());
    Ok(StoredMessage {
        message_id,
        sender,
        recipient: recipient.clone(),
        sent_at_ms,
        expires_at_ms,
        payload,
    })
}

/// Returns `expires_at_ms` of an encoded message.
fn message_expiry(value: &[u8]) -> StoreResult<u64> {
    let mut decoder = Decoder::new(value);
    decoder.device()?;
    decoder.u64()?;
    decoder.u64()
}

fn idempotency_key(sender: &DeviceAddress, client_msg_id: &str) -> Vec<u8> {
    Encoder::new().device(sender).str(client_msg_id).finish()
}

fn accept_in(
    transaction: &mut JournalTransaction<'_>,
    tables: &Tables,
    record: &AcceptRecord,
) -> StoreResult<AcceptOutcome> {
    let idempotency_key = idempotency_key(&record.sender, &record.client_msg_id);
    if let Some(existing) = transaction.get(&tables.idempotency, idempotency_key.as_slice())? {
        let mut decoder = Decoder::new(&existing);
        let message_id = decoder.u64()?;
        let sent_at_ms = decoder.u64()?;
        return Ok(AcceptOutcome::Duplicate {
            message_id,
            sent_at_ms,
        });
    }
    let value_prefix = encode_message(&record.sender, record.sent_at_ms, record.expires_at_ms, &[]);
    for (device_id, payload) in &record.envelopes {
        let recipient = DeviceAddress::new(record.recipient_user_id.clone(), *device_id);
        let inbox_key = codec::device_row_key(&recipient, record.message_id);
        let mut value = Vec::with_capacity(value_prefix.len() + payload.len());
        value.extend_from_slice(&value_prefix);
        value.extend_from_slice(payload);
        let expiry_key = codec::expiry_key(record.expires_at_ms, &inbox_key);
        transaction.insert(&tables.undelivered, inbox_key, value);
        transaction.insert(&tables.message_expiry, expiry_key, []);
    }
    let idempotency_value = Encoder::new()
        .u64(record.message_id)
        .u64(record.sent_at_ms)
        .u64(record.expires_at_ms)
        .finish();
    let expiry_key = codec::expiry_key(record.expires_at_ms, &idempotency_key);
    transaction.insert(&tables.idempotency, idempotency_key, idempotency_value);
    transaction.insert(&tables.idempotency_expiry, expiry_key, []);
    Ok(AcceptOutcome::Stored)
}

fn purge_in(
    transaction: &mut JournalTransaction<'_>,
    tables: &Tables,
    now_ms: u64,
) -> StoreResult<u64> {
    let bound = codec::expiry_bound(now_ms);
    let mut purged_messages = 0u64;
    for expiry_key in transaction.keys_in(&tables.message_expiry, ..bound.clone())? {
        let (_, inbox_key) = codec::split_expiry_key(&expiry_key)?;
        let removed_undelivered = transaction.take(&tables.undelivered, inbox_key)?.is_some();
        let removed_delivered = transaction.take(&tables.delivered, inbox_key)?.is_some();
        if removed_undelivered || removed_delivered {
            purged_messages += 1;
        }
        transaction.remove(&tables.message_expiry, expiry_key);
    }
    for expiry_key in transaction.keys_in(&tables.idempotency_expiry, ..bound)? {
        let (expires_at_ms, idempotency_key) = codec::split_expiry_key(&expiry_key)?;
        // Only remove the record this index entry was written for.
        let current_expiry_opt = match transaction.get(&tables.idempotency, idempotency_key)? {
            Some(value) => {
                let mut decoder = Decoder::new(&value);
                decoder.u64()?;
                decoder.u64()?;
                Some(decoder.u64()?)
            }
            None => None,
        };
        if current_expiry_opt == Some(expires_at_ms) {
            transaction.remove(&tables.idempotency, idempotency_key);
        }
        transaction.remove(&tables.idempotency_expiry, expiry_key);
    }
    Ok(purged_messages)
}

#[async_trait]
impl InboxStore for EmbeddedInboxStore {
    async fn accept_batch(&self, records: Vec<AcceptRecord>) -> Vec<StoreResult<AcceptOutcome>> {
        let count = records.len();
        let tables = Arc::clone(&self.tables);
        // One job, one transaction: the whole batch becomes visible at once.
        let outcomes = self
            .committer
            .submit(move |transaction| {
                records
                    .iter()
                    .map(|record| accept_in(transaction, &tables, record))
                    .collect::<StoreResult<Vec<AcceptOutcome>>>()
            })
            .await;
        match outcomes {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            Err(error) => vec![Err(error); count],
        }
    }

    async fn pending(
        &self,
        device: &DeviceAddress,
        after_message_id: u64,
        limit: usize,
        now_ms: u64,
    ) -> StoreResult<Vec<StoredMessage>> {
        let Some(first_id) = after_message_id.checked_add(1) else {
            return Ok(Vec::new());
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let device = device.clone();
        let tables = Arc::clone(&self.tables);
        read_journal_snapshot(&self.database, move |snapshot| {
            let (low, high) = codec::device_row_range(&device, first_id, u64::MAX);
            let mut messages = Vec::new();
            for entry in snapshot.range(&tables.undelivered, low.as_slice()..=high.as_slice()) {
                let (key, value) = entry.into_inner()?;
                let message = decode_message(&device, codec::row_id(&key)?, &value)?;
                if message.expires_at_ms <= now_ms {
                    continue;
                }
                messages.push(message);
                if messages.len() >= limit {
                    break;
                }
            }
            Ok(messages)
        })
        .await
    }

    async fn mark_delivered(&self, device: &DeviceAddress, message_ids: &[u64]) -> StoreResult<()> {
        let keys: Vec<Vec<u8>> = message_ids
            .iter()
            .map(|message_id| codec::device_row_key(device, *message_id))
            .collect();
        let tables = Arc::clone(&self.tables);
        // Lazy: lost in a crash, the messages are pending again and devices drop the copies.
        self.committer
            .submit_lazy(move |transaction| {
                for key in keys {
                    if let Some(value) = transaction.take(&tables.undelivered, key.as_slice())? {
                        transaction.insert(&tables.delivered, key, value);
                    }
                }
                Ok(())
            })
            .await
    }

    async fn remove(&self, device: &DeviceAddress, message_ids: &[u64]) -> StoreResult<()> {
        let keys: Vec<Vec<u8>> = message_ids
            .iter()
            .map(|message_id| codec::device_row_key(device, *message_id))
            .collect();
        let tables = Arc::clone(&self.tables);
        self.committer
            .submit(move |transaction| {
                for key in &keys {
                    let removed_undelivered = transaction
                        .take(&tables.undelivered, key.as_slice())?
                        .map(|value| message_expiry(&value))
                        .transpose()?;
                    let removed_delivered = transaction
                        .take(&tables.delivered, key.as_slice())?
                        .map(|value| message_expiry(&value))
                        .transpose()?;
                    for expires_at_ms in [removed_undelivered, removed_delivered]
                        .into_iter()
                        .flatten()
                    {
                        transaction.remove(
                            &tables.message_expiry,
                            codec::expiry_key(expires_at_ms, key),
                        );
                    }
                }
                Ok(())
            })
            .await
    }

    async fn contains(&self, device: &DeviceAddress, message_id: u64) -> StoreResult<bool> {
        let key = codec::device_row_key(device, message_id);
        // One snapshot for both keyspaces: a concurrent move between them is seen whole.
        let snapshot = self.database.read_tx();
        Ok(
            snapshot.contains_key(&self.tables.undelivered, key.as_slice())?
                || snapshot.contains_key(&self.tables.delivered, key.as_slice())?,
        )
    }

    async fn purge_expired(&self, now_ms: u64) -> StoreResult<u64> {
        let tables = Arc::clone(&self.tables);
        self.committer
            .submit(move |transaction| purge_in(transaction, &tables, now_ms))
            .await
    }
}
