//! [`EmbeddedPresenceStore`]: last seen and privacy settings in `presence.redb`.
//!
//! Tables: `last_seen`: `user_id` → `u64` ms (only ever raised); `visibility`: `user_id` →
//! [`LastSeenVisibility`] as `u8`; `contacts`: `user_id` → `[user_id]`.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bluetick_proto::common::v1::LastSeenVisibility;
use redb::{Database, ReadableTable, TableDefinition};

use super::codec::{Decoder, Encoder};
use super::committer::GroupCommitter;
use super::{open_database, read_point};
use crate::{PresenceStore, Privacy, StoreResult};

const LAST_SEEN: TableDefinition<'_, &str, u64> = TableDefinition::new("last_seen");
const VISIBILITY: TableDefinition<'_, &str, u8> = TableDefinition::new("visibility");
const CONTACTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("contacts");

/// The embedded [`PresenceStore`], in `presence.redb`.
#[derive(Debug)]
pub struct EmbeddedPresenceStore {
    database: Arc<Database>,
    committer: GroupCommitter<Database>,
}

impl EmbeddedPresenceStore {
    /// Opens (or creates) `presence.redb` in `dir`, creating the directory if needed.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`](crate::StoreError::Unavailable) if the file cannot be
    /// opened, for instance because another process has it open.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        let database = open_database(dir, "presence.redb")?;
        let transaction = database.begin_write()?;
        {
            transaction.open_table(LAST_SEEN)?;
            transaction.open_table(VISIBILITY)?;
            transaction.open_table(CONTACTS)?;
        }
        transaction.commit()?;
        let committer = GroupCommitter::start("presence", Arc::clone(&database))?;
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

/// Returns the stored visibility, EVERYONE for unset or unknown values.
fn decode_visibility(value: u8) -> LastSeenVisibility {
    match LastSeenVisibility::try_from(i32::from(value)) {
        Ok(LastSeenVisibility::Unspecified) | Err(_) => LastSeenVisibility::Everyone,
        Ok(visibility) => visibility,
    }
}

#[async_trait]
impl PresenceStore for EmbeddedPresenceStore {
    async fn record_last_seen(&self, entries: Vec<(String, u64)>) -> StoreResult<()> {
        self.committer
            .submit(move |transaction| {
                let mut last_seen = transaction.open_table(LAST_SEEN)?;
                for (user_id, seen_at_ms) in &entries {
                    let stored_opt = last_seen.get(user_id.as_str())?.map(|value| value.value());
                    if stored_opt.is_none_or(|stored| stored < *seen_at_ms) {
                        last_seen.insert(user_id.as_str(), *seen_at_ms)?;
                    }
                }
                Ok(())
            })
            .await
    }

    async fn last_seen(&self, user_id: &str) -> StoreResult<Option<u64>> {
        read_point(&self.database, |transaction| {
            let last_seen = transaction.open_table(LAST_SEEN)?;
            Ok(last_seen.get(user_id)?.map(|value| value.value()))
        })
    }

    async fn set_visibility(
        &self,
        user_id: &str,
        visibility: LastSeenVisibility,
    ) -> StoreResult<()> {
        let user_id = user_id.to_string();
        let stored = u8::try_from(visibility as i32).unwrap_or(0);
        self.committer
            .submit(move |transaction| {
                let mut table = transaction.open_table(VISIBILITY)?;
                table.insert(user_id.as_str(), stored)?;
                Ok(())
            })
            .await
    }

    async fn set_contacts(&self, user_id: &str, contacts: Vec<String>) -> StoreResult<()> {
        let user_id = user_id.to_string();
        let count = u32::try_from(contacts.len()).unwrap_or(u32::MAX);
        let mut encoder = Encoder::new().u32(count);
        for contact in &contacts {
            encoder = encoder.str(contact);
        }
        let value = encoder.finish();
        self.committer
            .submit(move |transaction| {
                let mut table = transaction.open_table(CONTACTS)?;
                table.insert(user_id.as_str(), value.as_slice())?;
                Ok(())
            })
            .await
    }

    async fn privacy(&self, user_id: &str) -> StoreResult<Privacy> {
        read_point(&self.database, |transaction| {
            let visibility_table = transaction.open_table(VISIBILITY)?;
            let visibility = visibility_table
                .get(user_id)?
                .map_or(LastSeenVisibility::Everyone, |value| {
                    decode_visibility(value.value())
                });
            let contacts_table = transaction.open_table(CONTACTS)?;
            let mut contacts = Vec::new();
            if let Some(value) = contacts_table.get(user_id)? {
                let mut decoder = Decoder::new(value.value());
                let count = decoder.u32()?;
                for _ in 0..count {
                    contacts.push(decoder.string()?);
                }
            }
            Ok(Privacy {
                visibility,
                contacts,
            })
        })
    }
}
