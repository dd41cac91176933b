//! [`CqlInboxStore`]: per-device inboxes in Cassandra/ScyllaDB, and why they don't become a
//! tombstone queue.
//!
//! **Layout.** One partition per recipient device, `inbox ((user_id, device_id), message_id)`,
//! clustered by `message_id` ascending (ids are time-ordered, so this is arrival order).
//! A message is inserted once per device `USING TTL` computed from `expires_at_ms`, so unread
//! messages disappear on their own (`purge_expired` has nothing to do); it is then flagged
//! `delivered` (a single-cell update with the row's remaining TTL) and deleted when read.
//! The partition only ever holds what a device has not read yet, bounded by the 30-day TTL,
//! so no time bucket is needed in the key.
//!
//! **Tombstones.** Deleting read messages and expiring unread ones leaves tombstones, and a
//! read that starts at the head of the partition would walk all of them (the "queue
//! anti-pattern": warnings at 1,000 tombstones per read, failure at 100,000). Read receipts
//! don't arrive in id order (chats are read in any order), so a single "read up to" watermark
//! with one range delete cannot describe what is gone. Instead each device has a **floor**
//! (`inbox_floor`): every message with `message_id <= floor` is delivered, read or expired.
//! `pending` reads `message_id > max(after_message_id, floor)` with a bounded page size, so
//! the tombstones and delivered rows below the floor are never touched again; when a read
//! starts at the floor it moves the floor over the delivered/expired rows it had to skip (and
//! so over every tombstone between them), one small write. The floor only passes rows written
//! more than `inbox_floor_grace_ms` ago (default 2 min, far above any write timeout), so a
//! slow accept of an older id can't land below it unseen. Floors written concurrently can
//! only differ in how far they got (each is a valid floor), so last-write-wins is harmless.
//! Tombstones themselves go with compaction after `gc_grace_seconds` (2 days here, keep it
//! above the repair interval; ScyllaDB can use `tombstone_gc = {'mode': 'repair'}`).
//! Delivered-but-unread rows above the floor are skipped in memory; they are few, since the
//! floor passes them as soon as the oldest pending message is delivered.
//!
//! **Idempotency.** `(sender device, client_msg_id)` is claimed with one lightweight
//! transaction (`INSERT … IF NOT EXISTS` into `accept_claims`, a Paxos round: about four round
//! trips on Cassandra, fewer on ScyllaDB, on a partition of its own, so senders never contend).
//! The winner then writes the envelopes together with an `accept_commits` marker in one logged
//! batch (all or nothing). Claims are only ever written with LWT and inbox rows only without,
//! as Cassandra does not order the two. If an accept dies between claim and batch, the resend
//! finds the claim without a commit marker and writes the original's batch again from the
//! claim (which keeps the envelopes), with the claim's write timestamp, so it can never
//! resurrect a message deleted since. Racing resends see one winner; the others answer
//! `Duplicate` with the winner's id.
//!
//! **Order.** An accept batch (consecutive messages of one sender) claims all its messages
//! at once, then writes them in order: runs of small messages share one logged batch (each
//! inbox partition's rows in it are applied as one mutation, so a reader sees all or none of
//! them), a large one goes alone, and each write starts when the previous one returned. A
//! reader thus never sees a later message of the batch without the earlier ones, and after
//! a failed write nothing later is written (those accepts fail and are resent).
//!
//! **Consistency.** Every statement runs at the URL's consistency (LOCAL_QUORUM by default,
//! LOCAL_SERIAL for the Paxos phase), so an accept that returned `Stored` (the single tick) is
//! on a quorum of replicas.

use std::sync::Arc;

use async_trait::async_trait;
use bluetick_proto::common::v1::DeviceAddress;
use bytes::Bytes;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

use super::session::{BatchValue, CqlSession};
use super::{
    CqlLocation, device_from_cql, device_to_cql, id_from_cql, id_to_cql, ms_from_cql, ms_to_cql,
    ttl_seconds, wall_clock_ms,
};
use crate::{AcceptOutcome, AcceptRecord, InboxStore, StoreError, StoreResult, StoredMessage};

/// The most bytes (estimated by [`Claim::batch_bytes`]) an accept writes in one logged
/// batch, which engines refuse past ~50 KiB; a larger message is written envelope by
/// envelope, then its commit marker.
const MAX_BATCH_BYTES: usize = 32 * 1024;

/// What one row adds to a batch besides its payload, estimated high: keys, ids, times.
const ROW_OVERHEAD_BYTES: usize = 256;

/// How often an accept retries when the claim it lost to has expired meanwhile.
const CLAIM_ATTEMPTS: usize = 3;

/// Rows fetched per round trip by `pending`, at most.
const MAX_PAGE_SIZE: usize = 1_000;

/// The CQL [`InboxStore`].
#[derive(Debug)]
pub struct CqlInboxStore {
    session: Arc<CqlSession>,
    statements: Statements,
    floor_grace_ms: u64,
}

#[derive(Debug)]
struct Statements {
    claim: PreparedStatement,
    read_claim: PreparedStatement,
    read_commit: PreparedStatement,
    insert_message: PreparedStatement,
    insert_commit: PreparedStatement,
    read_floor: PreparedStatement,
    write_floor: PreparedStatement,
    pending: PreparedStatement,
    existing: PreparedStatement,
    mark_delivered: PreparedStatement,
    remove: PreparedStatement,
    contains: PreparedStatement,
}

/// `(message_id, sender_user_id, sender_device_id, sent_at_ms, expires_at_ms, payload,
/// delivered, writetime(payload))` as `pending` reads it; columns are null in a row that
/// only holds a late `delivered` flag.
type PendingRow = (
    i64,
    Option<String>,
    Option<i32>,
    Option<i64>,
    Option<i64>,
    Option<Vec<u8>>,
    Option<bool>,
    Option<i64>,
);

/// `(message_id, recipient_user_id, sent_at_ms, expires_at_ms, envelopes, writetime)`.
type ClaimRow = (
    i64,
    String,
    i64,
    i64,
    Option<std::collections::HashMap<i32, Vec<u8>>>,
    i64,
);

impl CqlInboxStore {
    /// Connects (or reuses the session of `location`) and prepares every statement.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the engine cannot be reached.
    pub async fn open(location: &CqlLocation) -> StoreResult<Self> {
        let session = CqlSession::shared(location).await?;
        let statements = Statements {
            claim: session
                .prepare(
                    "INSERT INTO accept_claims (sender_user_id, sender_device_id, client_msg_id, \
                     message_id, recipient_user_id, sent_at_ms, expires_at_ms, envelopes) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS USING TTL ?",
                    false,
                )
                .await?,
            read_claim: {
                let mut statement = session
                    .prepare(
                        "SELECT message_id, recipient_user_id, sent_at_ms, expires_at_ms, \
                         envelopes, WRITETIME(message_id) FROM accept_claims \
                         WHERE sender_user_id = ? AND sender_device_id = ? AND client_msg_id = ?",
                        true,
                    )
                    .await?;
                // A SERIAL read sees the outcome of any Paxos round in progress.
                statement.set_consistency(match location.serial_consistency {
                    scylla::frame::types::SerialConsistency::Serial => {
                        scylla::frame::types::Consistency::Serial
                    }
                    scylla::frame::types::SerialConsistency::LocalSerial => {
                        scylla::frame::types::Consistency::LocalSerial
                    }
                });
                statement
            },
            read_commit: session
                .prepare(
                    "SELECT message_id FROM accept_commits \
                     WHERE sender_user_id = ? AND sender_device_id = ? AND client_msg_id = ?",
                    true,
                )
                .await?,
            insert_message: session
                .prepare(
                    "INSERT INTO inbox (user_id, device_id, message_id, sender_user_id, \
                     sender_device_id, sent_at_ms, expires_at_ms, payload, delivered) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, false) USING TTL ?",
                    true,
                )
                .await?,
            insert_commit: session
                .prepare(
                    "INSERT INTO accept_commits (sender_user_id, sender_device_id, \
                     client_msg_id, message_id) VALUES (?, ?, ?, ?) USING TTL ?",
                    true,
                )
                .await?,
            read_floor: session
                .prepare(
                    "SELECT floor FROM inbox_floor WHERE user_id = ? AND device_id = ?",
                    true,
                )
                .await?,
            write_floor: session
                .prepare(
                    "UPDATE inbox_floor SET floor = ? WHERE user_id = ? AND device_id = ?",
                    true,
                )
                .await?,
            pending: session
                .prepare(
                    "SELECT message_id, sender_user_id, sender_device_id, sent_at_ms, \
                     expires_at_ms, payload, delivered, WRITETIME(payload) FROM inbox \
                     WHERE user_id = ? AND device_id = ? AND message_id > ?",
                    true,
                )
                .await?,
            existing: session
                .prepare(
                    "SELECT message_id, expires_at_ms FROM inbox \
                     WHERE user_id = ? AND device_id = ? AND message_id IN ?",
                    true,
                )
                .await?,
            mark_delivered: session
                .prepare(
                    "UPDATE inbox USING TTL ? SET delivered = true \
                     WHERE user_id = ? AND device_id = ? AND message_id = ?",
                    true,
                )
                .await?,
            remove: session
                .prepare(
                    "DELETE FROM inbox WHERE user_id = ? AND device_id = ? AND message_id IN ?",
                    true,
                )
                .await?,
            contains: session
                .prepare(
                    "SELECT sender_user_id FROM inbox \
                     WHERE user_id = ? AND device_id = ? AND message_id = ?",
                    true,
                )
                .await?,
        };
        Ok(Self {
            session,
            statements,
            floor_grace_ms: u64::try_from(location.inbox_floor_grace.as_millis())
                .unwrap_or(u64::MAX),
        })
    }

    /// Returns the session, e.g. to inspect rows directly in tests.
    pub fn session(&self) -> &Arc<CqlSession> {
        &self.session
    }

    /// Appends the envelopes of a claimed message and its commit marker to `batch`.
    fn append_claim(
        &self,
        claim: &Claim,
        now_ms: u64,
        batch: &mut Batch,
        values: &mut Vec<BatchValue>,
    ) {
        // An expired message is not written at all: it would be invisible anyway.
        if let Some(ttl) = ttl_seconds(claim.expires_at_ms, now_ms) {
            for (device_id, payload) in &claim.envelopes {
                batch.append_statement(self.statements.insert_message.clone());
                values.push(envelope_values(claim, *device_id, payload, ttl));
            }
        }
        batch.append_statement(self.statements.insert_commit.clone());
        values.push(commit_values(claim, now_ms));
    }

    /// Writes the envelopes of claimed messages with their commit markers in one logged
    /// batch: all or nothing, and each inbox partition's rows become visible at once. The
    /// caller keeps the batch under [`MAX_BATCH_BYTES`]. `timestamp_opt` pins the write
    /// time (a repair writes with the claim's, so a later delete still wins).
    async fn write_claims(
        &self,
        claims: &[&Claim],
        timestamp_opt: Option<i64>,
        now_ms: u64,
    ) -> StoreResult<()> {
        let mut batch = Batch::new(BatchType::Logged);
        batch.set_is_idempotent(true);
        batch.set_timestamp(timestamp_opt);
        let mut values = Vec::new();
        for claim in claims {
            self.append_claim(claim, now_ms, &mut batch, &mut values);
        }
        self.session.batch(&batch, values).await?;
        Ok(())
    }

    /// Writes one claimed message too large for a batch: each envelope, then the marker, so
    /// a missing marker still means "repair".
    async fn write_large_claim(
        &self,
        claim: &Claim,
        timestamp_opt: Option<i64>,
        now_ms: u64,
    ) -> StoreResult<()> {
        if let Some(ttl) = ttl_seconds(claim.expires_at_ms, now_ms) {
            let mut insert_message = self.statements.insert_message.clone();
            insert_message.set_timestamp(timestamp_opt);
            let writes = claim.envelopes.iter().map(|(device_id, payload)| {
                self.session.execute(
                    &insert_message,
                    envelope_values(claim, *device_id, payload, ttl),
                )
            });
            futures::future::try_join_all(writes).await?;
        }
        let mut insert_commit = self.statements.insert_commit.clone();
        insert_commit.set_timestamp(timestamp_opt);
        self.session
            .execute(&insert_commit, commit_values(claim, now_ms))
            .await?;
        Ok(())
    }

    /// Writes claimed messages in order: consecutive small ones with the same write time
    /// share a logged batch, a large one goes alone. Each write starts after the previous
    /// one returned, so the messages become visible in order. On failure, returns how many
    /// were written first.
    async fn write_in_order(
        &self,
        writes: &[Write],
        now_ms: u64,
    ) -> Result<(), (usize, StoreError)> {
        let mut start = 0;
        while start < writes.len() {
            let timestamp_opt = writes[start].timestamp_opt;
            let mut end = start + 1;
            let mut bytes = writes[start].claim.batch_bytes();
            while end < writes.len()
                && writes[end].timestamp_opt == timestamp_opt
                && bytes + writes[end].claim.batch_bytes() <= MAX_BATCH_BYTES
            {
                bytes += writes[end].claim.batch_bytes();
                end += 1;
            }
            let written = if bytes > MAX_BATCH_BYTES {
                self.write_large_claim(&writes[start].claim, timestamp_opt, now_ms)
                    .await
            } else {
                let claims: Vec<&Claim> = writes[start..end]
                    .iter()
                    .map(|write| &write.claim)
                    .collect();
                self.write_claims(&claims, timestamp_opt, now_ms).await
            };
            written.map_err(|error| (start, error))?;
            start = end;
        }
        Ok(())
    }

    /// Claims `(sender, client_msg_id)` for `record` with a lightweight transaction, or
    /// finds the claim it lost to.
    async fn claim(&self, record: AcceptRecord, now_ms: u64) -> StoreResult<Claimed> {
        let claim = Claim {
            message_id: record.message_id,
            sender: record.sender,
            client_msg_id: record.client_msg_id,
            recipient_user_id: record.recipient_user_id,
            sent_at_ms: record.sent_at_ms,
            expires_at_ms: record.expires_at_ms,
            envelopes: record.envelopes,
        };
        let envelope_map: std::collections::HashMap<i32, Vec<u8>> = claim
            .envelopes
            .iter()
            .map(|(device_id, payload)| (device_to_cql(*device_id), payload.to_vec()))
            .collect();
        for _ in 0..CLAIM_ATTEMPTS {
            let claim_ttl = ttl_seconds(claim.expires_at_ms, now_ms).unwrap_or(1);
            let claimed = self
                .session
                .execute_conditional(
                    &self.statements.claim,
                    (
                        claim.sender.user_id.as_str(),
                        device_to_cql(claim.sender.device_id),
                        claim.client_msg_id.as_str(),
                        id_to_cql(claim.message_id),
                        claim.recipient_user_id.as_str(),
                        ms_to_cql(claim.sent_at_ms),
                        ms_to_cql(claim.expires_at_ms),
                        &envelope_map,
                        claim_ttl,
                    ),
                )
                .await;
            let claimed = match claimed {
                Ok(claimed) => claimed,
                // A timed-out Paxos round may or may not have been applied: look.
                Err(StoreError::Unavailable(detail)) => {
                    match self.read_claim(&claim.sender, &claim.client_msg_id).await? {
                        Some((stored, _)) if stored.message_id == claim.message_id => true,
                        Some(_) => false,
                        None => return Err(StoreError::Unavailable(detail)),
                    }
                }
                Err(other) => return Err(other),
            };
            if claimed {
                return Ok(Claimed::Ours(claim));
            }
            if let Some((original, written_at)) =
                self.read_claim(&claim.sender, &claim.client_msg_id).await?
            {
                if original.message_id == claim.message_id {
                    // Our own claim (applied by an earlier attempt of this call).
                    return Ok(Claimed::Ours(claim));
                }
                return self.duplicate_of(original, written_at).await;
            }
            // The claim we lost to expired in between: claim again.
        }
        Err(StoreError::Unavailable(format!(
            "could not claim client message id {:?} of {}",
            claim.client_msg_id, claim.sender
        )))
    }

    /// Reads the claim of `(sender, client_msg_id)` at SERIAL consistency.
    async fn read_claim(
        &self,
        sender: &DeviceAddress,
        client_msg_id: &str,
    ) -> StoreResult<Option<(Claim, i64)>> {
        let row: Option<ClaimRow> = self
            .session
            .first_row(
                &self.statements.read_claim,
                (
                    sender.user_id.as_str(),
                    device_to_cql(sender.device_id),
                    client_msg_id,
                ),
            )
            .await?;
        let Some((message_id, recipient_user_id, sent_at_ms, expires_at_ms, envelopes, written_at)) =
            row
        else {
            return Ok(None);
        };
        let mut envelopes: Vec<(u32, Bytes)> = envelopes
            .unwrap_or_default()
            .into_iter()
            .map(|(device_id, payload)| Ok((device_from_cql(device_id)?, Bytes::from(payload))))
            .collect::<StoreResult<_>>()?;
        envelopes.sort_unstable_by_key(|(device_id, _)| *device_id);
        Ok(Some((
            Claim {
                message_id: id_from_cql(message_id),
                sender: sender.clone(),
                client_msg_id: client_msg_id.to_string(),
                recipient_user_id,
                sent_at_ms: ms_from_cql(sent_at_ms),
                expires_at_ms: ms_from_cql(expires_at_ms),
                envelopes,
            },
            written_at,
        )))
    }

    /// The resend path: `claim` is the original. It needs a repair if its inbox write never
    /// happened (no commit marker).
    async fn duplicate_of(&self, claim: Claim, claim_written_at: i64) -> StoreResult<Claimed> {
        let committed: Option<(i64,)> = self
            .session
            .first_row(
                &self.statements.read_commit,
                (
                    claim.sender.user_id.as_str(),
                    device_to_cql(claim.sender.device_id),
                    claim.client_msg_id.as_str(),
                ),
            )
            .await?;
        if committed.is_some() {
            return Ok(Claimed::Duplicate(claim));
        }
        Ok(Claimed::Repair(claim, claim_written_at))
    }

    async fn read_floor(&self, device: &DeviceAddress) -> StoreResult<u64> {
        let row: Option<(Option<i64>,)> = self
            .session
            .first_row(
                &self.statements.read_floor,
                (device.user_id.as_str(), device_to_cql(device.device_id)),
            )
            .await?;
        Ok(row.and_then(|(floor,)| floor).map_or(0, id_from_cql))
    }
}

/// What an accept claims: the message as first accepted.
#[derive(Debug)]
struct Claim {
    message_id: u64,
    sender: DeviceAddress,
    client_msg_id: String,
    recipient_user_id: String,
    sent_at_ms: u64,
    expires_at_ms: u64,
    envelopes: Vec<(u32, Bytes)>,
}

impl Claim {
    /// The answer to a resend of this claim's message.
    fn duplicate(&self) -> AcceptOutcome {
        AcceptOutcome::Duplicate {
            message_id: self.message_id,
            sent_at_ms: self.sent_at_ms,
        }
    }

    /// Roughly what the claim's rows add to a logged batch: payloads plus keys and columns.
    fn batch_bytes(&self) -> usize {
        let rows: usize = self
            .envelopes
            .iter()
            .map(|(_, payload)| payload.len() + ROW_OVERHEAD_BYTES)
            .sum();
        rows + ROW_OVERHEAD_BYTES
    }
}

/// The values of `claim`'s inbox row for `device_id`, written with `ttl` seconds to live.
fn envelope_values(claim: &Claim, device_id: u32, payload: &Bytes, ttl: i32) -> BatchValue {
    Box::new((
        claim.recipient_user_id.clone(),
        device_to_cql(device_id),
        id_to_cql(claim.message_id),
        claim.sender.user_id.clone(),
        device_to_cql(claim.sender.device_id),
        ms_to_cql(claim.sent_at_ms),
        ms_to_cql(claim.expires_at_ms),
        payload.to_vec(),
        ttl,
    ))
}

/// The commit marker's values for `claim`.
fn commit_values(claim: &Claim, now_ms: u64) -> BatchValue {
    Box::new((
        claim.sender.user_id.clone(),
        device_to_cql(claim.sender.device_id),
        claim.client_msg_id.clone(),
        id_to_cql(claim.message_id),
        ttl_seconds(claim.expires_at_ms, now_ms).unwrap_or(1),
    ))
}

/// What the claim phase of an accept found for one record.
#[derive(Debug)]
enum Claimed {
    /// Claimed by this call: its envelopes are to be written.
    Ours(Claim),
    /// A duplicate of this original, fully stored.
    Duplicate(Claim),
    /// A duplicate of this original whose inbox write never happened: it is written again
    /// from the claim, with the claim's write time.
    Repair(Claim, i64),
}

/// A claimed message to write, at its position among the batch's outcomes; a repair pins
/// the write time to its claim's.
#[derive(Debug)]
struct Write {
    index: usize,
    claim: Claim,
    timestamp_opt: Option<i64>,
}

#[async_trait]
impl InboxStore for CqlInboxStore {
    async fn accept_batch(&self, records: Vec<AcceptRecord>) -> Vec<StoreResult<AcceptOutcome>> {
        let now_ms = wall_clock_ms();
        // The claims (a Paxos round each) run at once; the inbox writes then go in order.
        let claims =
            futures::future::join_all(records.into_iter().map(|record| self.claim(record, now_ms)))
                .await;
        let mut outcomes: Vec<StoreResult<AcceptOutcome>> = Vec::with_capacity(claims.len());
        let mut writes: Vec<Write> = Vec::new();
        // Once a record failed, no later one may be written: it would be visible first.
        let mut failed_opt: Option<StoreError> = None;
        for claimed in claims {
            let index = outcomes.len();
            let (outcome, write_opt) = match claimed {
                Ok(Claimed::Ours(claim)) => (
                    Ok(AcceptOutcome::Stored),
                    Some(Write {
                        index,
                        claim,
                        timestamp_opt: None,
                    }),
                ),
                Ok(Claimed::Duplicate(original)) => (Ok(original.duplicate()), None),
                // Written again from the claim, with the claim's write time.
                Ok(Claimed::Repair(original, written_at)) => {
                    tracing::info!(
                        sender = %original.sender,
                        message_id = original.message_id,
                        "finishing an accept whose inbox write is missing"
                    );
                    (
                        Ok(original.duplicate()),
                        Some(Write {
                            index,
                            claim: original,
                            timestamp_opt: Some(written_at),
                        }),
                    )
                }
                Err(error) => {
                    failed_opt.get_or_insert_with(|| error.clone());
                    (Err(error), None)
                }
            };
            match (write_opt, &failed_opt) {
                (Some(_), Some(failure)) => outcomes.push(Err(failure.clone())),
                (Some(write), None) => {
                    outcomes.push(outcome);
                    writes.push(write);
                }
                (None, _) => outcomes.push(outcome),
            }
        }
        if let Err((written, error)) = self.write_in_order(&writes, now_ms).await {
            for write in &writes[written..] {
                outcomes[write.index] = Err(error.clone());
            }
        }
        outcomes
    }

    async fn pending(
        &self,
        device: &DeviceAddress,
        after_message_id: u64,
        limit: usize,
        now_ms: u64,
    ) -> StoreResult<Vec<StoredMessage>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let floor = self.read_floor(device).await?;
        let start = after_message_id.max(floor);
        // Only a read that starts at the floor sees every row above it, so only it may
        // move the floor.
        let mut advancing = after_message_id <= floor;
        let mut new_floor = floor;
        let wall_now_ms = wall_clock_ms();
        let grace_micros =
            i64::try_from(self.floor_grace_ms.saturating_mul(1000)).unwrap_or(i64::MAX);
        let settled_before_micros = ms_to_cql(wall_now_ms)
            .saturating_mul(1000)
            .saturating_sub(grace_micros);
        let mut messages = Vec::with_capacity(limit.min(MAX_PAGE_SIZE));
        let page_size = i32::try_from(limit.clamp(16, MAX_PAGE_SIZE)).unwrap_or(1000);
        self.session
            .for_each_row(
                &self.statements.pending,
                (
                    device.user_id.as_str(),
                    device_to_cql(device.device_id),
                    id_to_cql(start),
                ),
                page_size,
                |row: PendingRow| {
                    let (
                        message_id,
                        sender_user,
                        sender_device,
                        sent_at,
                        expires_at,
                        payload,
                        delivered,
                        written_at,
                    ) = row;
                    let message_id = id_from_cql(message_id);
                    let full_row = match (sender_user, sender_device, sent_at, expires_at, payload)
                    {
                        (
                            Some(user),
                            Some(device_id),
                            Some(sent_at),
                            Some(expires_at),
                            Some(payload),
                        ) => Some((user, device_id, sent_at, expires_at, payload)),
                        // Only a late `delivered` flag of a deleted message: gone.
                        _ => None,
                    };
                    let Some((sender_user, sender_device, sent_at, expires_at, payload)) = full_row
                    else {
                        if advancing {
                            new_floor = message_id;
                        }
                        return Ok(true);
                    };
                    let expires_at_ms = ms_from_cql(expires_at);
                    let is_delivered = delivered.unwrap_or(false);
                    if advancing {
                        let settled =
                            written_at.is_some_and(|micros| micros < settled_before_micros);
                        let gone_for_good = is_delivered || expires_at_ms <= wall_now_ms;
                        if settled && gone_for_good {
                            new_floor = message_id;
                        } else {
                            if settled {
                                // Everything below this settled row is delivered or gone,
                                // including the tombstones just before it.
                                new_floor = new_floor.max(message_id.saturating_sub(1));
                            }
                            advancing = false;
                        }
                    }
                    if is_delivered || expires_at_ms <= now_ms {
                        return Ok(true);
                    }
                    messages.push(StoredMessage {
                        message_id,
                        sender: DeviceAddress::new(sender_user, device_from_cql(sender_device)?),
                        recipient: device.clone(),
                        sent_at_ms: ms_from_cql(sent_at),
                        expires_at_ms,
                        payload: Bytes::from(payload),
                    });
                    Ok(messages.len() < limit)
                },
            )
            .await?;
        if new_floor > floor {
            self.session
                .execute(
                    &self.statements.write_floor,
                    (
                        id_to_cql(new_floor),
                        device.user_id.as_str(),
                        device_to_cql(device.device_id),
                    ),
                )
                .await?;
        }
        Ok(messages)
    }

    async fn mark_delivered(&self, device: &DeviceAddress, message_ids: &[u64]) -> StoreResult<()> {
        if message_ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = message_ids.iter().copied().map(id_to_cql).collect();
        // Only flag rows that exist, with their remaining TTL, so that unknown ids leave
        // nothing behind.
        let existing: Vec<(i64, Option<i64>)> = self
            .session
            .rows(
                &self.statements.existing,
                (
                    device.user_id.as_str(),
                    device_to_cql(device.device_id),
                    &ids,
                ),
            )
            .await?;
        let now_ms = wall_clock_ms();
        let mut batch = Batch::new(BatchType::Unlogged);
        batch.set_is_idempotent(true);
        let mut values: Vec<BatchValue> = Vec::new();
        for (message_id, expires_at) in existing {
            let Some(ttl) =
                expires_at.and_then(|expires_at| ttl_seconds(ms_from_cql(expires_at), now_ms))
            else {
                continue;
            };
            batch.append_statement(self.statements.mark_delivered.clone());
            values.push(Box::new((
                ttl,
                device.user_id.clone(),
                device_to_cql(device.device_id),
                message_id,
            )));
        }
        if values.is_empty() {
            return Ok(());
        }
        // One partition: the batch is a single atomic mutation.
        self.session.batch(&batch, values).await?;
        Ok(())
    }

    async fn remove(&self, device: &DeviceAddress, message_ids: &[u64]) -> StoreResult<()> {
        if message_ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = message_ids.iter().copied().map(id_to_cql).collect();
        self.session
            .execute(
                &self.statements.remove,
                (
                    device.user_id.as_str(),
                    device_to_cql(device.device_id),
                    &ids,
                ),
            )
            .await?;
        Ok(())
    }

    async fn contains(&self, device: &DeviceAddress, message_id: u64) -> StoreResult<bool> {
        let row: Option<(Option<String>,)> = self
            .session
            .first_row(
                &self.statements.contains,
                (
                    device.user_id.as_str(),
                    device_to_cql(device.device_id),
                    id_to_cql(message_id),
                ),
            )
            .await?;
        Ok(matches!(row, Some((Some(_),))))
    }

    async fn purge_expired(&self, _now_ms: u64) -> StoreResult<u64> {
        // Rows carry TTLs: the engine drops expired messages and claims itself.
        Ok(0)
    }
}
