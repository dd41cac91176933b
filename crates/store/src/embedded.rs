//! The embedded store: one [redb](https://docs.rs/redb) file per concern in a local
//! directory, so each service process opens only its own file.
//!
//! | type | file | trait |
//! |---|---|---|
//! | [`EmbeddedAccountStore`] | `accounts.redb` | [`AccountStore`](crate::AccountStore) |
//! | [`EmbeddedInboxStore`] | `inbox.redb` | [`InboxStore`](crate::InboxStore) |
//! | [`EmbeddedTickStore`] | `ticks.redb` | [`TickStore`](crate::TickStore) |
//! | [`EmbeddedPresenceStore`] | `presence.redb` | [`PresenceStore`](crate::PresenceStore) |
//!
//! Every write goes through one group committer (`committer`) per file: a dedicated writer
//! thread takes every queued write job (up to [`MAX_BATCH_JOBS`]), applies them all in one
//! write transaction, commits once with [`redb::Durability::Immediate`] and then releases each
//! waiter with its own result. One fsync is thus shared by every writer waiting at that
//! moment, so durability does not cap throughput. Reads run against a snapshot: point reads
//! (a key or two, served from redb's page cache in microseconds) on the calling task, since
//! a hand-off to the blocking pool and back costs more than the read; scans and reads of
//! many keys on the blocking pool (`spawn_blocking`). Making the read of the recipient's
//! devices on every send a point read doubled `online` throughput (BENCHMARKS.md).
//!
//! Keys are hand-encoded byte strings whose byte order is the logical order (big-endian
//! integers, length-prefixed strings); values use the compact binary layout of `codec`.

mod accounts;
pub(crate) mod codec;
pub(crate) mod committer;
mod inbox;
mod presence;
mod ticks;

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadTransaction, ReadableDatabase};

pub use self::accounts::EmbeddedAccountStore;
pub use self::committer::MAX_BATCH_JOBS;
pub use self::inbox::EmbeddedInboxStore;
pub use self::presence::EmbeddedPresenceStore;
pub use self::ticks::EmbeddedTickStore;
use crate::{StoreError, StoreResult};

/// Creates `dir` if needed and opens (or creates) the redb file `file_name` in it.
fn open_database(dir: &Path, file_name: &str) -> StoreResult<Arc<Database>> {
    std::fs::create_dir_all(dir).map_err(|error| {
        StoreError::Unavailable(format!(
            "failed to create store directory {}: {error}",
            dir.display()
        ))
    })?;
    let path = dir.join(file_name);
    let database = Database::create(&path).map_err(|error| {
        StoreError::Unavailable(format!(
            "failed to open store file {}: {error}",
            path.display()
        ))
    })?;
    Ok(Arc::new(database))
}

/// Runs a point read (a few key lookups, never a scan) against a fresh snapshot of
/// `database` on the calling task. redb serves such reads from its page cache in a few
/// microseconds, less than a hand-off to the blocking pool and back costs; the hot ones
/// (the recipient's devices on every send, the token on every call) are point reads.
fn read_point<T>(
    database: &Database,
    read: impl FnOnce(&ReadTransaction) -> StoreResult<T>,
) -> StoreResult<T> {
    let transaction = database.begin_read()?;
    read(&transaction)
}

/// Runs `read` against a fresh snapshot of `database` on the blocking pool.
async fn read_snapshot<T, F>(database: &Arc<Database>, read: F) -> StoreResult<T>
where
    T: Send + 'static,
    F: FnOnce(&ReadTransaction) -> StoreResult<T> + Send + 'static,
{
    let database = Arc::clone(database);
    tokio::task::spawn_blocking(move || {
        let transaction = database.begin_read()?;
        read(&transaction)
    })
    .await
    .map_err(|error| StoreError::Internal(format!("read task failed: {error}")))?
}

impl From<redb::Error> for StoreError {
    fn from(error: redb::Error) -> Self {
        match error {
            redb::Error::Io(_)
            | redb::Error::PreviousIo
            | redb::Error::DatabaseClosed
            | redb::Error::DatabaseAlreadyOpen
            | redb::Error::TransactionInProgress
            | redb::Error::Backend(_) => StoreError::Unavailable(error.to_string()),
            other => StoreError::Internal(other.to_string()),
        }
    }
}

macro_rules! store_error_from_redb {
    ($($redb_error:ty),* $(,)?) => {
        $(
            impl From<$redb_error> for StoreError {
                fn from(error: $redb_error) -> Self {
                    StoreError::from(redb::Error::from(error))
                }
            }
        )*
    };
}

store_error_from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError,
    redb::SetDurabilityError,
);
