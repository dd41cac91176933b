//! [`EmbeddedInboxStore`]: per-device inboxes in `inbox.redb`.
//!
//! Tables (keys per [`codec`](super::codec)):
//! - `undelivered`: `(recipient device, message_id)` → message. `pending` scans only this.
//! - `delivered`: same key and value; `mark_delivered` moves rows here until they are read.
//! - `message_expiry`: `(expires_at_ms, inbox key)` → `()`, so purging reads only what expired.
//! - `idempotency`: `(sender device, client_msg_id)` → `(message_id, sent_at_ms, expires_at_ms)`.
//! - `idempotency_expiry`: `(expires_at_ms, idempotency key)` → `()`.
//!
//! A message value is `sender, sent_at_ms, expires_at_ms, payload` (payload unprefixed, last).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bluetick_proto::common::v1::DeviceAddress;
use bytes::Bytes;
use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

use super::codec::{self, Decoder, Encoder};
use super::committer::GroupCommitter;
use super::{open_database, read_point, read_snapshot};
use crate::{AcceptOutcome, AcceptRecord, InboxStore, StoreResult, StoredMessage};

const UNDELIVERED: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("undelivered");
const DELIVERED: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("delivered");
const MESSAGE_EXPIRY: TableDefinition<'_, &[u8], ()> = TableDefinition::new("message_expiry");
const IDEMPOTENCY: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("idempotency");
const IDEMPOTENCY_EXPIRY: TableDefinition<'_, &[u8], ()> =
    TableDefinition::new("idempotency_expiry");

/// The embedded [`InboxStore`], in `inbox.redb`.
#[derive(Debug)]
pub struct EmbeddedInboxStore {
    database: Arc<Database>,
    committer: GroupCommitter,
}

impl EmbeddedInboxStore {
    /// Opens (or creates) `inbox.redb` in `dir`, creating the directory if needed.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`](crate::StoreError::Unavailable) if the file cannot be
    /// opened, for instance because another process has it open.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        let database = open_database(dir, "inbox.redb")?;
        let transaction = database.begin_write()?;
        {
            transaction.open_table(UNDELIVERED)?;
            transaction.open_table(DELIVERED)?;
            transaction.open_table(MESSAGE_EXPIRY)?;
            transaction.open_table(IDEMPOTENCY)?;
            transaction.open_table(IDEMPOTENCY_EXPIRY)?;
        }
        transaction.commit()?;
        let committer = GroupCommitter::start("inbox", Arc::clone(&database))?;
        Ok(Self {
            database,
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

fn accept_in(transaction: &WriteTransaction, record: &AcceptRecord) -> StoreResult<AcceptOutcome> {
    let idempotency_key = idempotency_key(&record.sender, &record.client_msg_id);
    let mut idempotency = transaction.open_table(IDEMPOTENCY)?;
    if let Some(existing) = idempotency.get(idempotency_key.as_slice())? {
        let mut decoder = Decoder::new(existing.value());
        let message_id = decoder.u64()?;
        let sent_at_ms = decoder.u64()?;
        return Ok(AcceptOutcome::Duplicate {
            message_id,
            sent_at_ms,
        });
    }
    let mut undelivered = transaction.open_table(UNDELIVERED)?;
    let mut message_expiry_index = transaction.open_table(MESSAGE_EXPIRY)?;
    let value_prefix = encode_message(&record.sender, record.sent_at_ms, record.expires_at_ms, &[]);
    for (device_id, payload) in &record.envelopes {
        let recipient = DeviceAddress::new(record.recipient_user_id.clone(), *device_id);
        let inbox_key = codec::device_row_key(&recipient, record.message_id);
        let mut value = Vec::with_capacity(value_prefix.len() + payload.len());
        value.extend_from_slice(&value_prefix);
        value.extend_from_slice(payload);
        undelivered.insert(inbox_key.as_slice(), value.as_slice())?;
        let expiry_key = codec::expiry_key(record.expires_at_ms, &inbox_key);
        message_expiry_index.insert(expiry_key.as_slice(), ())?;
    }
    let idempotency_value = Encoder::new()
        .u64(record.message_id)
        .u64(record.sent_at_ms)
        .u64(record.expires_at_ms)
        .finish();
    idempotency.insert(idempotency_key.as_slice(), idempotency_value.as_slice())?;
    let mut idempotency_expiry = transaction.open_table(IDEMPOTENCY_EXPIRY)?;
    let expiry_key = codec::expiry_key(record.expires_at_ms, &idempotency_key);
    idempotency_expiry.insert(expiry_key.as_slice(), ())?;
    Ok(AcceptOutcome::Stored)
}

fn purge_in(transaction: &WriteTransaction, now_ms: u64) -> StoreResult<u64> {
    let bound = codec::expiry_bound(now_ms);
    let mut purged_messages = 0u64;
    {
        let mut index = transaction.open_table(MESSAGE_EXPIRY)?;
        let mut undelivered = transaction.open_table(UNDELIVERED)?;
        let mut delivered = transaction.open_table(DELIVERED)?;
        let expired = collect_keys_below(&index, &bound)?;
        for expiry_key in expired {
            let (_, inbox_key) = codec::split_expiry_key(&expiry_key)?;
            let removed_undelivered = undelivered.remove(inbox_key)?.is_some();
            let removed_delivered = delivered.remove(inbox_key)?.is_some();
            if removed_undelivered || removed_delivered {
                purged_messages += 1;
            }
            index.remove(expiry_key.as_slice())?;
        }
    }
    {
        let mut index = transaction.open_table(IDEMPOTENCY_EXPIRY)?;
        let mut idempotency = transaction.open_table(IDEMPOTENCY)?;
        let expired = collect_keys_below(&index, &bound)?;
        for expiry_key in expired {
            let (expires_at_ms, idempotency_key) = codec::split_expiry_key(&expiry_key)?;
            // Only remove the record this index entry was written for.
            let current_expiry_opt = match idempotency.get(idempotency_key)? {
                Some(value) => {
                    let mut decoder = Decoder::new(value.value());
                    decoder.u64()?;
                    decoder.u64()?;
                    Some(decoder.u64()?)
                }
                None => None,
            };
            if current_expiry_opt == Some(expires_at_ms) {
                idempotency.remove(idempotency_key)?;
            }
            index.remove(expiry_key.as_slice())?;
        }
    }
    Ok(purged_messages)
}

/// Returns every key of an expiry index below `bound`.
fn collect_keys_below(
    index: &impl ReadableTable<&'static [u8], ()>,
    bound: &[u8],
) -> StoreResult<Vec<Vec<u8>>> {
    let mut keys = Vec::new();
    for entry in index.range::<&[u8]>(..bound)? {
        let (key, _) = entry?;
        keys.push(key.value().to_vec());
    }
    Ok(keys)
}

#[async_trait]
impl InboxStore for EmbeddedInboxStore {
    async fn accept_batch(&self, records: Vec<AcceptRecord>) -> Vec<StoreResult<AcceptOutcome>> {
        let count = records.len();
        // One job, one transaction: the whole batch becomes visible at once.
        let outcomes = self
            .committer
            .submit(move |transaction| {
                records
                    .iter()
                    .map(|record| accept_in(transaction, record))
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
        read_snapshot(&self.database, move |transaction| {
            let undelivered = transaction.open_table(UNDELIVERED)?;
            let (low, high) = codec::device_row_range(&device, first_id, u64::MAX);
            let mut messages = Vec::new();
            for entry in undelivered.range::<&[u8]>(low.as_slice()..=high.as_slice())? {
                let (key, value) = entry?;
                let message = decode_message(&device, codec::row_id(key.value())?, value.value())?;
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
        // Lazy: lost in a crash, the messages are pending again and devices drop the copies.
        self.committer
            .submit_lazy(move |transaction| {
                let mut undelivered = transaction.open_table(UNDELIVERED)?;
                let mut delivered = transaction.open_table(DELIVERED)?;
                for key in &keys {
                    let moved_opt = undelivered
                        .remove(key.as_slice())?
                        .map(|value| value.value().to_vec());
                    if let Some(value) = moved_opt {
                        delivered.insert(key.as_slice(), value.as_slice())?;
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
        self.committer
            .submit(move |transaction| {
                let mut undelivered = transaction.open_table(UNDELIVERED)?;
                let mut delivered = transaction.open_table(DELIVERED)?;
                let mut index = transaction.open_table(MESSAGE_EXPIRY)?;
                for key in &keys {
                    let removed_undelivered = undelivered
                        .remove(key.as_slice())?
                        .map(|value| message_expiry(value.value()))
                        .transpose()?;
                    let removed_delivered = delivered
                        .remove(key.as_slice())?
                        .map(|value| message_expiry(value.value()))
                        .transpose()?;
                    for expires_at_ms in [removed_undelivered, removed_delivered]
                        .into_iter()
                        .flatten()
                    {
                        index.remove(codec::expiry_key(expires_at_ms, key).as_slice())?;
                    }
                }
                Ok(())
            })
            .await
    }

    async fn contains(&self, device: &DeviceAddress, message_id: u64) -> StoreResult<bool> {
        let key = codec::device_row_key(device, message_id);
        read_point(&self.database, |transaction| {
            let undelivered = transaction.open_table(UNDELIVERED)?;
            if undelivered.get(key.as_slice())?.is_some() {
                return Ok(true);
            }
            let delivered = transaction.open_table(DELIVERED)?;
            Ok(delivered.get(key.as_slice())?.is_some())
        })
    }

    async fn purge_expired(&self, now_ms: u64) -> StoreResult<u64> {
        self.committer
            .submit(move |transaction| purge_in(transaction, now_ms))
            .await
    }
}
