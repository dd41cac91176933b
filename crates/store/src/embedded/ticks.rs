//! [`EmbeddedTickStore`]: tick state and receipt outboxes in the fjall database `ticks/`.
//!
//! Keyspaces (keys per [`codec`](super::codec)):
//! - `ticks`: `message_id` (big-endian) → `sender, recipient user, sent_at_ms,
//!   expires_at_ms, [(device, status)]`.
//! - `tick_expiry`: `(expires_at_ms, message_id)` → empty, for `purge_expired`.
//! - `outbox`: `(sender device, receipt_id)` → `message_id, recipient device, status, at_ms`.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bluetick_proto::common::v1::{DeviceAddress, TickStatus};
use fjall::{Readable, SingleWriterTxDatabase, SingleWriterTxKeyspace};

use super::codec::{self, Decoder, Encoder};
use super::committer::{GroupCommitter, JournalTransaction};
use super::{open_journal_database, read_journal_snapshot};
use crate::{AckOutcome, SentRecord, StoreError, StoreResult, StoredReceipt, TickStore};

/// The tick store's keyspaces.
struct Tables {
    ticks: SingleWriterTxKeyspace,
    tick_expiry: SingleWriterTxKeyspace,
    outbox: SingleWriterTxKeyspace,
}

/// The embedded [`TickStore`], in the fjall database `ticks/`.
pub struct EmbeddedTickStore {
    database: Arc<SingleWriterTxDatabase>,
    tables: Arc<Tables>,
    committer: GroupCommitter<SingleWriterTxDatabase>,
}

impl std::fmt::Debug for EmbeddedTickStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EmbeddedTickStore")
            .field("committer", &self.committer)
            .finish_non_exhaustive()
    }
}

impl EmbeddedTickStore {
    /// Opens (or creates) the database `ticks/` in `dir`, creating directories if needed.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if it cannot be opened, for instance because another
    /// process has it open, or if `dir` still holds a `ticks.redb` of an earlier bluetick.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        let (database, [ticks, tick_expiry, outbox]) =
            open_journal_database(dir, "ticks", ["ticks", "tick_expiry", "outbox"])?;
        let tables = Arc::new(Tables {
            ticks,
            tick_expiry,
            outbox,
        });
        let committer = GroupCommitter::start("ticks", Arc::clone(&database))?;
        Ok(Self {
            database,
            tables,
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

fn record_sent_in(
    transaction: &mut JournalTransaction<'_>,
    tables: &Tables,
    record: &SentRecord,
) -> StoreResult<()> {
    let existing_opt = transaction
        .get(&tables.ticks, record.message_id.to_be_bytes())?
        .map(|value| TickRecord::decode(&value))
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
            transaction.insert(
                &tables.tick_expiry,
                tick_expiry_key(record.expires_at_ms, record.message_id),
                [],
            );
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
    transaction.insert(
        &tables.ticks,
        record.message_id.to_be_bytes(),
        tick_record.encode(),
    );
    Ok(())
}

fn acknowledge_in(
    transaction: &mut JournalTransaction<'_>,
    tables: &Tables,
    recipient: &DeviceAddress,
    status: TickStatus,
    acks: &[(u64, u64)],
    at_ms: u64,
) -> StoreResult<Vec<AckOutcome>> {
    let mut outcomes = Vec::with_capacity(acks.len());
    for (message_id, receipt_id) in acks {
        let record_opt = transaction
            .get(&tables.ticks, message_id.to_be_bytes())?
            .map(|value| TickRecord::decode(&value))
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
        transaction.insert(&tables.ticks, message_id.to_be_bytes(), record.encode());
        let receipt = StoredReceipt {
            receipt_id: *receipt_id,
            sender: record.sender.clone(),
            message_id: *message_id,
            recipient: recipient.clone(),
            status,
            at_ms,
        };
        let outbox_key = codec::device_row_key(&record.sender, *receipt_id);
        transaction.insert(&tables.outbox, outbox_key, encode_receipt(&receipt));
        outcomes.push(AckOutcome::Advanced(receipt));
    }
    Ok(outcomes)
}

fn purge_in(
    transaction: &mut JournalTransaction<'_>,
    tables: &Tables,
    now_ms: u64,
) -> StoreResult<u64> {
    let bound = codec::expiry_bound(now_ms);
    let expired_keys = transaction.keys_in(&tables.tick_expiry, ..bound)?;
    let mut purged = 0u64;
    for expiry_key in expired_keys {
        let (_, message_id_bytes) = codec::split_expiry_key(&expiry_key)?;
        if transaction.take(&tables.ticks, message_id_bytes)?.is_some() {
            purged += 1;
        }
        transaction.remove(&tables.tick_expiry, expiry_key);
    }
    Ok(purged)
}

#[async_trait]
impl TickStore for EmbeddedTickStore {
    async fn record_sent(&self, record: SentRecord) -> StoreResult<()> {
        let tables = Arc::clone(&self.tables);
        self.committer
            .submit(move |transaction| record_sent_in(transaction, &tables, &record))
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
        let tables = Arc::clone(&self.tables);
        // Lazy: the caller awaits `flush` before the inbox is settled.
        self.committer
            .submit_lazy(move |transaction| {
                acknowledge_in(transaction, &tables, &recipient, status, &acks, at_ms)
            })
            .await
    }

    async fn flush(&self) -> StoreResult<()> {
        self.committer.flush().await
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
        let tables = Arc::clone(&self.tables);
        read_journal_snapshot(&self.database, move |snapshot| {
            let (low, high) = codec::device_row_range(&sender, first_id, u64::MAX);
            let mut receipts = Vec::new();
            for entry in snapshot.range(&tables.outbox, low.as_slice()..=high.as_slice()) {
                let (key, value) = entry.into_inner()?;
                receipts.push(decode_receipt(&sender, codec::row_id(&key)?, &value)?);
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
        let tables = Arc::clone(&self.tables);
        // Lazy: lost in a crash, the receipts are sent again and change nothing.
        self.committer
            .submit_lazy(move |transaction| {
                for key in keys {
                    transaction.remove(&tables.outbox, key);
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
        let tables = Arc::clone(&self.tables);
        read_journal_snapshot(&self.database, move |snapshot| {
            let mut states = Vec::new();
            for message_id in message_ids {
                let Some(value) = snapshot.get(&tables.ticks, message_id.to_be_bytes())? else {
                    continue;
                };
                let record = TickRecord::decode(&value)?;
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
        let tables = Arc::clone(&self.tables);
        self.committer
            .submit(move |transaction| purge_in(transaction, &tables, now_ms))
            .await
    }
}
