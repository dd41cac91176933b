//! [`CqlTickStore`]: tick state and receipt outboxes.
//!
//! - `ticks ((message_id), device_id, status)`: who sent the message to whom in static
//!   columns, and one row per status a recipient device has reached. A device's state is its
//!   highest row, so recording SENT again, or a late DELIVERED after READ, can only add a
//!   lower row: the state never moves backwards, without read-modify-write.
//! - `receipts ((sender_user_id, sender_device_id), receipt_id)`: the outbox of a sender
//!   device, read in receipt id order with `LIMIT`.
//!
//! `acknowledge` reads the message partitions (one round trip each, concurrently), decides
//! every outcome, then, for every advance, writes the receipt first and the status row
//! second; the advances of one acknowledgement run concurrently (up to
//! [`ACK_WRITES_IN_FLIGHT`]). Writing the receipt first means a receipt exists for every
//! advance that was stored: a failure between the two leaves a receipt without its advance,
//! and the acknowledgement the client sends again advances and stores a second receipt for
//! the same state, which senders apply idempotently (a tick only moves forward). Neither a
//! logged batch (a batchlog write per advance, and one 512-statement multi-partition batch
//! per 256 ids, which made 1,000 ticks take tens of seconds on one node) nor a Paxos round
//! is spent on the hottest write path. Rows carry the message's TTL, so nothing needs
//! purging.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bluetick_proto::common::v1::{DeviceAddress, TickStatus};
use futures::{StreamExt, TryStreamExt};
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

use super::session::{BatchValue, CqlSession};
use super::{
    CqlLocation, device_from_cql, device_to_cql, id_from_cql, id_to_cql, ms_from_cql, ms_to_cql,
    ttl_seconds, wall_clock_ms,
};
use crate::{AckOutcome, SentRecord, StoreError, StoreResult, StoredReceipt, TickStore};

/// Advances of one acknowledgement written at the same time.
const ACK_WRITES_IN_FLIGHT: usize = 64;

/// The CQL [`TickStore`].
#[derive(Debug)]
pub struct CqlTickStore {
    session: Arc<CqlSession>,
    statements: Statements,
}

#[derive(Debug)]
struct Statements {
    record_sent: PreparedStatement,
    read_message: PreparedStatement,
    advance: PreparedStatement,
    insert_receipt: PreparedStatement,
    pending_receipts: PreparedStatement,
    confirm_receipts: PreparedStatement,
}

/// `(device_id, status, sender_user_id, sender_device_id, recipient_user_id,
/// recipient_device_ids, expires_at_ms)`; the static columns repeat on every row.
type TickRow = (
    Option<i32>,
    Option<i32>,
    Option<String>,
    Option<i32>,
    Option<String>,
    Option<Vec<i32>>,
    Option<i64>,
);

/// `(receipt_id, message_id, recipient_user_id, recipient_device_id, status, at_ms)`.
type ReceiptRow = (i64, i64, String, i32, i32, i64);

/// One message's tick state as read.
#[derive(Debug)]
struct TickState {
    sender: DeviceAddress,
    recipient_user_id: String,
    recipient_device_ids: Vec<u32>,
    expires_at_ms: u64,
    /// Highest status per recipient device.
    statuses: HashMap<u32, i32>,
}

impl CqlTickStore {
    /// Connects (or reuses the session of `location`) and prepares every statement.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the engine cannot be reached.
    pub async fn open(location: &CqlLocation) -> StoreResult<Self> {
        let session = CqlSession::shared(location).await?;
        let statements = Statements {
            record_sent: session
                .prepare(
                    "INSERT INTO ticks (message_id, device_id, status, sender_user_id, \
                     sender_device_id, recipient_user_id, recipient_device_ids, sent_at_ms, \
                     expires_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?",
                    true,
                )
                .await?,
            read_message: session
                .prepare(
                    "SELECT device_id, status, sender_user_id, sender_device_id, \
                     recipient_user_id, recipient_device_ids, expires_at_ms FROM ticks \
                     WHERE message_id = ?",
                    true,
                )
                .await?,
            advance: session
                .prepare(
                    "INSERT INTO ticks (message_id, device_id, status) VALUES (?, ?, ?) \
                     USING TTL ?",
                    true,
                )
                .await?,
            insert_receipt: session
                .prepare(
                    "INSERT INTO receipts (sender_user_id, sender_device_id, receipt_id, \
                     message_id, recipient_user_id, recipient_device_id, status, at_ms) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?",
                    true,
                )
                .await?,
            pending_receipts: session
                .prepare(
                    "SELECT receipt_id, message_id, recipient_user_id, recipient_device_id, \
                     status, at_ms FROM receipts WHERE sender_user_id = ? AND \
                     sender_device_id = ? AND receipt_id > ? LIMIT ?",
                    true,
                )
                .await?,
            confirm_receipts: session
                .prepare(
                    "DELETE FROM receipts WHERE sender_user_id = ? AND sender_device_id = ? \
                     AND receipt_id IN ?",
                    true,
                )
                .await?,
        };
        Ok(Self {
            session,
            statements,
        })
    }

    /// Reads one message's tick state, or `None` if unknown (or expired).
    async fn read_state(&self, message_id: u64) -> StoreResult<Option<TickState>> {
        let rows: Vec<TickRow> = self
            .session
            .rows(&self.statements.read_message, (id_to_cql(message_id),))
            .await?;
        let mut state_opt: Option<TickState> = None;
        for (device_id, status, sender_user, sender_device, recipient_user, devices, expires_at) in
            rows
        {
            if state_opt.is_none() {
                let (
                    Some(sender_user),
                    Some(sender_device),
                    Some(recipient_user),
                    Some(expires_at),
                ) = (sender_user, sender_device, recipient_user, expires_at)
                else {
                    // Status rows outliving their static columns: treat as unknown.
                    return Ok(None);
                };
                let recipient_device_ids = devices
                    .unwrap_or_default()
                    .into_iter()
                    .map(device_from_cql)
                    .collect::<StoreResult<Vec<u32>>>()?;
                state_opt = Some(TickState {
                    sender: DeviceAddress::new(sender_user, device_from_cql(sender_device)?),
                    recipient_user_id: recipient_user,
                    recipient_device_ids,
                    expires_at_ms: ms_from_cql(expires_at),
                    statuses: HashMap::new(),
                });
            }
            if let (Some(state), Some(device_id), Some(status)) =
                (state_opt.as_mut(), device_id, status)
            {
                let entry = state
                    .statuses
                    .entry(device_from_cql(device_id)?)
                    .or_insert(0);
                *entry = (*entry).max(status);
            }
        }
        Ok(state_opt)
    }
}

impl CqlTickStore {
    /// Stores `receipt` in its sender's outbox, then advances the recipient's status row.
    async fn write_advance(
        &self,
        receipt: StoredReceipt,
        status: i32,
        ttl: i32,
    ) -> StoreResult<()> {
        self.session
            .execute(
                &self.statements.insert_receipt,
                (
                    receipt.sender.user_id.as_str(),
                    device_to_cql(receipt.sender.device_id),
                    id_to_cql(receipt.receipt_id),
                    id_to_cql(receipt.message_id),
                    receipt.recipient.user_id.as_str(),
                    device_to_cql(receipt.recipient.device_id),
                    status,
                    ms_to_cql(receipt.at_ms),
                    ttl,
                ),
            )
            .await?;
        self.session
            .execute(
                &self.statements.advance,
                (
                    id_to_cql(receipt.message_id),
                    device_to_cql(receipt.recipient.device_id),
                    status,
                    ttl,
                ),
            )
            .await?;
        Ok(())
    }
}

fn decode_status(value: i32) -> StoreResult<TickStatus> {
    TickStatus::try_from(value)
        .map_err(|_| StoreError::Internal(format!("stored tick status {value} is unknown")))
}

#[async_trait]
impl TickStore for CqlTickStore {
    async fn record_sent(&self, record: SentRecord) -> StoreResult<()> {
        let Some(ttl) = ttl_seconds(record.expires_at_ms, wall_clock_ms()) else {
            // Expired already: as if recorded and purged.
            return Ok(());
        };
        let mut device_ids: Vec<i32> = record
            .recipient_device_ids
            .iter()
            .copied()
            .map(device_to_cql)
            .collect();
        device_ids.sort_unstable();
        device_ids.dedup();
        // One partition: the batch is a single atomic mutation.
        let mut batch = Batch::new(BatchType::Unlogged);
        batch.set_is_idempotent(true);
        let mut values: Vec<BatchValue> = Vec::with_capacity(device_ids.len());
        for device_id in &device_ids {
            batch.append_statement(self.statements.record_sent.clone());
            values.push(Box::new((
                id_to_cql(record.message_id),
                *device_id,
                TickStatus::Sent as i32,
                record.sender.user_id.clone(),
                device_to_cql(record.sender.device_id),
                record.recipient_user_id.clone(),
                device_ids.clone(),
                ms_to_cql(record.sent_at_ms),
                ms_to_cql(record.expires_at_ms),
                ttl,
            )));
        }
        if values.is_empty() {
            return Ok(());
        }
        self.session.batch(&batch, values).await?;
        Ok(())
    }

    async fn acknowledge(
        &self,
        recipient: &DeviceAddress,
        status: TickStatus,
        acks: Vec<(u64, u64)>,
        at_ms: u64,
    ) -> StoreResult<Vec<AckOutcome>> {
        let mut message_ids: Vec<u64> = acks.iter().map(|(message_id, _)| *message_id).collect();
        message_ids.sort_unstable();
        message_ids.dedup();
        let reads = message_ids
            .iter()
            .map(|message_id| self.read_state(*message_id));
        let read_states = futures::future::try_join_all(reads).await?;
        let mut states: HashMap<u64, Option<TickState>> =
            message_ids.into_iter().zip(read_states).collect();

        let wanted = status as i32;
        let now_ms = wall_clock_ms();
        let mut outcomes = Vec::with_capacity(acks.len());
        let mut writes = Vec::new();
        for (message_id, receipt_id) in acks {
            let Some(Some(state)) = states.get_mut(&message_id) else {
                outcomes.push(AckOutcome::NotFound);
                continue;
            };
            if state.expires_at_ms <= at_ms {
                outcomes.push(AckOutcome::NotFound);
                continue;
            }
            if state.recipient_user_id != recipient.user_id
                || !state.recipient_device_ids.contains(&recipient.device_id)
            {
                outcomes.push(AckOutcome::NotRecipient);
                continue;
            }
            let current = state.statuses.entry(recipient.device_id).or_insert(0);
            if *current >= wanted {
                outcomes.push(AckOutcome::Unchanged);
                continue;
            }
            *current = wanted;
            let ttl = ttl_seconds(state.expires_at_ms, now_ms).unwrap_or(1);
            let receipt = StoredReceipt {
                receipt_id,
                sender: state.sender.clone(),
                message_id,
                recipient: recipient.clone(),
                status,
                at_ms,
            };
            writes.push((receipt.clone(), ttl));
            outcomes.push(AckOutcome::Advanced(receipt));
        }
        futures::stream::iter(writes)
            .map(|(receipt, ttl)| self.write_advance(receipt, wanted, ttl))
            .buffer_unordered(ACK_WRITES_IN_FLIGHT)
            .try_collect::<()>()
            .await?;
        Ok(outcomes)
    }

    async fn pending_receipts(
        &self,
        sender: &DeviceAddress,
        after_receipt_id: u64,
        limit: usize,
    ) -> StoreResult<Vec<StoredReceipt>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let rows: Vec<ReceiptRow> = self
            .session
            .rows(
                &self.statements.pending_receipts,
                (
                    sender.user_id.as_str(),
                    device_to_cql(sender.device_id),
                    id_to_cql(after_receipt_id),
                    limit,
                ),
            )
            .await?;
        rows.into_iter()
            .map(
                |(receipt_id, message_id, recipient_user, recipient_device, status, at_ms)| {
                    Ok(StoredReceipt {
                        receipt_id: id_from_cql(receipt_id),
                        sender: sender.clone(),
                        message_id: id_from_cql(message_id),
                        recipient: DeviceAddress::new(
                            recipient_user,
                            device_from_cql(recipient_device)?,
                        ),
                        status: decode_status(status)?,
                        at_ms: ms_from_cql(at_ms),
                    })
                },
            )
            .collect()
    }

    async fn confirm_receipts(
        &self,
        sender: &DeviceAddress,
        receipt_ids: &[u64],
    ) -> StoreResult<()> {
        if receipt_ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = receipt_ids.iter().copied().map(id_to_cql).collect();
        self.session
            .execute(
                &self.statements.confirm_receipts,
                (
                    sender.user_id.as_str(),
                    device_to_cql(sender.device_id),
                    &ids,
                ),
            )
            .await?;
        Ok(())
    }

    async fn flush(&self) -> StoreResult<()> {
        // Every write was durable (QUORUM-class) when it was answered.
        Ok(())
    }

    async fn status(
        &self,
        sender: &DeviceAddress,
        message_ids: &[u64],
    ) -> StoreResult<Vec<(u64, u32, TickStatus)>> {
        let reads = message_ids
            .iter()
            .map(|message_id| self.read_state(*message_id));
        let read_states = futures::future::try_join_all(reads).await?;
        let mut result = Vec::new();
        for (message_id, state_opt) in message_ids.iter().zip(read_states) {
            let Some(state) = state_opt else {
                continue;
            };
            if &state.sender != sender {
                continue;
            }
            for device_id in &state.recipient_device_ids {
                let status = state.statuses.get(device_id).copied().unwrap_or(1);
                result.push((*message_id, *device_id, decode_status(status)?));
            }
        }
        Ok(result)
    }

    async fn purge_expired(&self, _now_ms: u64) -> StoreResult<u64> {
        // Rows carry TTLs: the engine drops expired tick state and receipts itself.
        Ok(0)
    }
}
