//! [`CqlPresenceStore`]: last seen and last-seen privacy.
//!
//! `last_seen` rows are written `USING TIMESTAMP` = the last-seen time in microseconds.
//! Cassandra and ScyllaDB keep the cell with the highest write timestamp, so a late or
//! replayed older heartbeat loses to a newer one on every replica: the stored time never
//! moves backwards, with neither a read nor a Paxos round. `privacy` holds the visibility and
//! the contact list (a frozen list: replaced as one cell, no collection tombstones).

use std::sync::Arc;

use async_trait::async_trait;
use bluetick_proto::common::v1::LastSeenVisibility;
use scylla::statement::prepared::PreparedStatement;

use super::session::CqlSession;
use super::{CqlLocation, ms_from_cql, ms_to_cql};
use crate::{PresenceStore, Privacy, StoreError, StoreResult};

/// The CQL [`PresenceStore`].
#[derive(Debug)]
pub struct CqlPresenceStore {
    session: Arc<CqlSession>,
    record_last_seen: PreparedStatement,
    read_last_seen: PreparedStatement,
    set_visibility: PreparedStatement,
    set_contacts: PreparedStatement,
    read_privacy: PreparedStatement,
}

impl CqlPresenceStore {
    /// Connects (or reuses the session of `location`) and prepares every statement.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the engine cannot be reached.
    pub async fn open(location: &CqlLocation) -> StoreResult<Self> {
        let session = CqlSession::shared(location).await?;
        Ok(Self {
            record_last_seen: session
                .prepare(
                    "INSERT INTO last_seen (user_id, last_seen_ms) VALUES (?, ?) USING TIMESTAMP ?",
                    true,
                )
                .await?,
            read_last_seen: session
                .prepare("SELECT last_seen_ms FROM last_seen WHERE user_id = ?", true)
                .await?,
            set_visibility: session
                .prepare("UPDATE privacy SET visibility = ? WHERE user_id = ?", true)
                .await?,
            set_contacts: session
                .prepare("UPDATE privacy SET contacts = ? WHERE user_id = ?", true)
                .await?,
            read_privacy: session
                .prepare(
                    "SELECT visibility, contacts FROM privacy WHERE user_id = ?",
                    true,
                )
                .await?,
            session,
        })
    }
}

#[async_trait]
impl PresenceStore for CqlPresenceStore {
    async fn record_last_seen(&self, entries: Vec<(String, u64)>) -> StoreResult<()> {
        let writes = entries.iter().map(|(user_id, at_ms)| {
            let stored = ms_to_cql(*at_ms);
            self.session.execute(
                &self.record_last_seen,
                (user_id.as_str(), stored, stored.saturating_mul(1000)),
            )
        });
        futures::future::try_join_all(writes).await?;
        Ok(())
    }

    async fn last_seen(&self, user_id: &str) -> StoreResult<Option<u64>> {
        let row: Option<(Option<i64>,)> = self
            .session
            .first_row(&self.read_last_seen, (user_id,))
            .await?;
        Ok(row.and_then(|(at_ms,)| at_ms).map(ms_from_cql))
    }

    async fn set_visibility(
        &self,
        user_id: &str,
        visibility: LastSeenVisibility,
    ) -> StoreResult<()> {
        self.session
            .execute(&self.set_visibility, (visibility as i32, user_id))
            .await?;
        Ok(())
    }

    async fn set_contacts(&self, user_id: &str, contacts: Vec<String>) -> StoreResult<()> {
        self.session
            .execute(&self.set_contacts, (contacts, user_id))
            .await?;
        Ok(())
    }

    async fn privacy(&self, user_id: &str) -> StoreResult<Privacy> {
        let row: Option<(Option<i32>, Option<Vec<String>>)> = self
            .session
            .first_row(&self.read_privacy, (user_id,))
            .await?;
        let Some((visibility, contacts)) = row else {
            return Ok(Privacy::default());
        };
        let visibility = match visibility {
            None | Some(0) => LastSeenVisibility::Everyone,
            Some(value) => LastSeenVisibility::try_from(value).map_err(|_| {
                StoreError::Internal(format!("stored last-seen visibility {value} is unknown"))
            })?,
        };
        Ok(Privacy {
            visibility,
            contacts: contacts.unwrap_or_default(),
        })
    }
}
