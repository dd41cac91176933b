//! [`EmbeddedTickStore`]: tick state and receipt outboxes in `ticks.redb`.
//!
//! Tables (keys per [`codec`](super::codec)):
//! - `ticks`: `message_id` → `sender, recipient user, sent_at_ms, expires_at_ms,
//!   [(device, status)]`.
//! - `tick_expiry`: `(expires_at_ms, message_id)` → `()`, for `purge_expired`.
//! - `outbox`: `(sender device, receipt_id)` → `message_id, recipient device, status, at_ms`.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bluetick_proto::common::v1::{DeviceAddress, TickStatus};
use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

use super::codec::{self, Decoder, Encoder};
use super::committer::GroupCommitter;
use super::{open_database, read_snapshot};
use crate::{AckOutcome, SentRecord, StoreError, StoreResult, StoredReceipt, TickStore};

const TICKS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("ticks");
const TICK_EXPIRY: TableDefinition<'_, &[u8], ()> = TableDefinition::new("tick_expiry");
const OUTBOX: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("outbox");

/// The embedded [`TickStore`], in `ticks.redb`.
#[derive(Debug)]
pub struct EmbeddedTickStore {
    database: Arc<Database>,
    committer: GroupCommitter,
}

impl EmbeddedTickStore {
    /// Opens (or creates) `ticks.redb` in `dir`, creating the directory if needed.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the file cannot be opened, for instance because
    /// another process has it open.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        let database = open_database(dir, "ticks.redb")?;
        let transaction = database.begin_write()?;
        {
            transaction.open_table(TICKS)?;
            transaction.open_table(TICK_EXPIRY)?;
            transaction.open_table(OUTBOX)?;
        }
        transaction.commit()?;
        let committer = GroupCommitter::start("ticks", Arc::clone(&database))?;
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

/// A message's tick state as stored.
#[derive(Debug)]
struct TickRecord {
    sender: DeviceAddress,
    recipient_user_id: String,
    sent_at_ms: u64,
    expires_at_ms: u64,
    /// `(device, status as i32)`, in device order.
    device_states: Vec<(u32, i32)>,
}

impl TickRecord {
    fn encode(&self) -> Vec<u8> {
        let count = u32::try_from(self.device_states.len()).unwrap_or(u32::MAX);
        let mut encoder = Encoder::new()
            .device(&self.sender)
            .str(&self.recipient_user_id)
            .u64(self.sent_at_ms)
            .u64(self.expires_at_ms)
            .u32(count);
        for (device_id, status) in &self.device_states {
            encoder = encoder.u32(*device_id).u8(status_byte(*status));
        }
        encoder.finish()
    }

    fn decode(value: &[u8]) -> StoreResult<Self> {
        let mut decoder = Decoder::new(value);
        let sender = decoder.device()?;
        let recipient_user_id = decoder.string()?;
        let sent_at_ms = decoder.u64()?;
        let expires_at_ms = decoder.u64()?;
        let count = decoder.u32()?;
        let mut device_states = Vec::with_capacity(count.min(1024) as usize);
        for _ in 0..count {
            let device_id = decoder.u32()?;
            let status = i32::from(decoder.u8()?);
            device_states.push((device_id, status));
        }
        Ok(Self {
            sender,
            recipient_user_id,
            sent_at_ms,
            expires_at_ms,
            device_states,
        })
    }
}

fn status_byte(status: i32) -> u8 {
    u8::try_from(status).unwrap_or(0)
}

fn decode_status(value: i32) -> StoreResult<TickStatus> {
    TickStatus::try_from(value)
        .map_err(|_| StoreError::Internal(format!("stored tick status {value} is unknown")))
}

fn encode_receipt(receipt: &StoredReceipt) -> Vec<u8> {
    Encoder::new()
        .u64(receipt.message_id)
        .device(&receipt.recipient)
        .u8(status_byte(receipt.status as i32))
        .u64(receipt.at_ms)
        .finish()
}

fn decode_receipt(
    sender: &DeviceAddress,
    receipt_id: u64,
    value: &[u8],
) -> StoreResult<StoredReceipt> {
    let mut decoder = Decoder::new(value);
    let message_id = decoder.u64()?;
    let recipient = decoder.device()?;
    let status = decode_status(i32::from(decoder.u8()?))?;
    let at_ms = decoder.u64()?;
    Ok(StoredReceipt {
        receipt_id,
        sender: sender.clone(),
        message_id,
        recipient,
        status,
        at_ms,
    })
}

fn tick_expiry_key(expires_at_ms: u64, message_id: u64) -> Vec<u8> {
    codec::expiry_key(expires_at_ms, &message_id.to_be_bytes())
}

fn record_sent_in(transaction: &WriteTransaction, record: &SentRecord) -> StoreResult<()> {
    let mut ticks = transaction.open_table(TICKS)?;
    let existing_opt = ticks
        .get(record.message_id)?
        .map(|value| TickRecord::decode(value.value()))
        .transpose()?;
    let tick_record = match existing_opt {
        Some(mut existing) => {
            let mut changed = false;
            for device_id in &record.recipient_device_ids {
                if !existing
                    .device_states
                    .iter()
                    .any(|(known, _)| known == device_id)
                {
                    existing
                        .device_states
                        .push((*device_id, TickStatus::Sent as i32));
                    changed = true;
                }
            }
            if !changed {
                return Ok(());
            }
            existing
                .device_states
                .sort_unstable_by_key(|(device_id, _)| *device_id);
            existing
        }
        None => {
            let mut device_ids = record.recipient_device_ids.clone();
            device_ids.sort_unstable();
            device_ids.dedup();
            let mut expiry = transaction.open_table(TICK_EXPIRY)?;
            expiry.insert(
                tick_expiry_key(record.expires_at_ms, record.message_id).as_slice(),
                (),
            )?;
            TickRecord {
                sender: record.sender.clone(),
                recipient_user_id: record.recipient_user_id.clone(),
                sent_at_ms: record.sent_at_ms,
                expires_at_ms: record.expires_at_ms,
                device_states: device_ids
                    .into_iter()
                    .map(|device_id| (device_id, TickStatus::Sent as i32))
                    .collect(),
            }
        }
    };
    ticks.insert(record.message_id, tick_record.encode().as_slice())?;
    Ok(())
}

fn acknowledge_in(
    transaction: &WriteTransaction,
    recipient: &DeviceAddress,
    status: TickStatus,
    acks: &[(u64, u64)],
    at_ms: u64,
) -> StoreResult<Vec<AckOutcome>> {
    let mut ticks = transaction.open_table(TICKS)?;
    let mut outbox = transaction.open_table(OUTBOX)?;
    let mut outcomes = Vec::with_capacity(acks.len());
    for (message_id, receipt_id) in acks {
        let record_opt = ticks
            .get(*message_id)?
            .map(|value| TickRecord::decode(value.value()))
            .transpose()?;
        let Some(mut record) = record_opt else {
            outcomes.push(AckOutcome::NotFound);
            continue;
        };
        if record.expires_at_ms <= at_ms {
            outcomes.push(AckOutcome::NotFound);
            continue;
        }
        if record.recipient_user_id != recipient.user_id {
            outcomes.push(AckOutcome::NotRecipient);
            continue;
        }
        let Some(state) = record
            .device_states
            .iter_mut()
            .find(|(device_id, _)| *device_id == recipient.device_id)
        else {
            outcomes.push(AckOutcome::NotRecipient);
            continue;
        };
        if !status.is_receipt() || state.1 >= status as i32 {
            outcomes.push(AckOutcome::Unchanged);
            continue;
        }
        state.1 = status as i32;
        ticks.insert(*message_id, record.encode().as_slice())?;
        let receipt = StoredReceipt {
            receipt_id: *receipt_id,
            sender: record.sender.clone(),
            message_id: *message_id,
            recipient: recipient.clone(),
            status,
            at_ms,
        };
        let outbox_key = codec::device_row_key(&record.sender, *receipt_id);
        outbox.insert(outbox_key.as_slice(), encode_receipt(&receipt).as_slice())?;
        outcomes.push(AckOutcome::Advanced(receipt));
    }
    Ok(outcomes)
}

fn purge_in(transaction: &WriteTransaction, now_ms: u64) -> StoreResult<u64> {
    let bound = codec::expiry_bound(now_ms);
    let mut index = transaction.open_table(TICK_EXPIRY)?;
    let mut ticks = transaction.open_table(TICKS)?;
    let mut expired_keys = Vec::new();
    for entry in index.range::<&[u8]>(..bound.as_slice())? {
        let (key, _) = entry?;
        expired_keys.push(key.value().to_vec());
    }
    let mut purged = 0u64;
    for expiry_key in expired_keys {
        let (_, message_id_bytes) = codec::split_expiry_key(&expiry_key)?;
        let message_id = Decoder::new(message_id_bytes).u64()?;
        if ticks.remove(message_id)?.is_some() {
            purged += 1;
        }
        index.remove(expiry_key.as_slice())?;
    }
    Ok(purged)
}

#[async_trait]
impl TickStore for EmbeddedTickStore {
    async fn record_sent(&self, record: SentRecord) -> StoreResult<()> {
        self.committer
            .submit(move |transaction| record_sent_in(transaction, &record))
            .await
    }

    async fn acknowledge(
        &self,
        recipient: &DeviceAddress,
        status: TickStatus,
        acks: Vec<(u64, u64)>,
        at_ms: u64,
    ) -> StoreResult<Vec<AckOutcome>> {
        let recipient = recipient.clone();
        self.committer
            .submit(move |transaction| {
                acknowledge_in(transaction, &recipient, status, &acks, at_ms)
            })
            .await
    }

    async fn pending_receipts(
        &self,
        sender: &DeviceAddress,
        after_receipt_id: u64,
        limit: usize,
    ) -> StoreResult<Vec<StoredReceipt>> {
        let Some(first_id) = after_receipt_id.checked_add(1) else {
            return Ok(Vec::new());
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let sender = sender.clone();
        read_snapshot(&self.database, move |transaction| {
            let outbox = transaction.open_table(OUTBOX)?;
            let (low, high) = codec::device_row_range(&sender, first_id, u64::MAX);
            let mut receipts = Vec::new();
            for entry in outbox.range::<&[u8]>(low.as_slice()..=high.as_slice())? {
                let (key, value) = entry?;
                receipts.push(decode_receipt(
                    &sender,
                    codec::row_id(key.value())?,
                    value.value(),
                )?);
                if receipts.len() >= limit {
                    break;
                }
            }
            Ok(receipts)
        })
        .await
    }

    async fn confirm_receipts(
        &self,
        sender: &DeviceAddress,
        receipt_ids: &[u64],
    ) -> StoreResult<()> {
        let keys: Vec<Vec<u8>> = receipt_ids
            .iter()
            .map(|receipt_id| codec::device_row_key(sender, *receipt_id))
            .collect();
        // Lazy: lost in a crash, the receipts are sent again and change nothing.
        self.committer
            .submit_lazy(move |transaction| {
                let mut outbox = transaction.open_table(OUTBOX)?;
                for key in &keys {
                    outbox.remove(key.as_slice())?;
                }
                Ok(())
            })
            .await
    }

    async fn status(
        &self,
        sender: &DeviceAddress,
        message_ids: &[u64],
    ) -> StoreResult<Vec<(u64, u32, TickStatus)>> {
        let sender = sender.clone();
        let message_ids = message_ids.to_vec();
        read_snapshot(&self.database, move |transaction| {
            let ticks = transaction.open_table(TICKS)?;
            let mut states = Vec::new();
            for message_id in message_ids {
                let Some(value) = ticks.get(message_id)? else {
                    continue;
                };
                let record = TickRecord::decode(value.value())?;
                if record.sender != sender {
                    continue;
                }
                for (device_id, status) in record.device_states {
                    states.push((message_id, device_id, decode_status(status)?));
                }
            }
            Ok(states)
        })
        .await
    }

    async fn purge_expired(&self, now_ms: u64) -> StoreResult<u64> {
        self.committer
            .submit(move |transaction| purge_in(transaction, now_ms))
            .await
    }
}
