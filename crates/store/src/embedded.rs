//! The embedded store: one database per concern in a local directory, so each service
//! process opens only its own.
//!
//! | type | engine, path | trait |
//! |---|---|---|
//! | [`EmbeddedAccountStore`] | redb, `accounts.redb` | [`AccountStore`](crate::AccountStore) |
//! | [`EmbeddedInboxStore`] | fjall, `inbox/` | [`InboxStore`](crate::InboxStore) |
//! | [`EmbeddedTickStore`] | fjall, `ticks/` | [`TickStore`](crate::TickStore) |
//! | [`EmbeddedPresenceStore`] | redb, `presence.redb` | [`PresenceStore`](crate::PresenceStore) |
//!
//! Two engines, each where it is cheaper. The message path (inbox and ticks: a few small
//! writes per message, each durable before its tick) uses [fjall](https://docs.rs/fjall), a
//! log-structured merge tree whose commit is one journal append and one `fdatasync`.
//! Accounts and presence (read on every call, written rarely) use
//! [redb](https://docs.rs/redb), a copy-on-write B-tree with cheaper point reads, whose
//! commit copies every page it changes. BENCHMARKS.md measures both.
//!
//! Every write goes through one group committer (`committer`) per database: a dedicated
//! writer thread takes every queued write job (up to [`MAX_BATCH_JOBS`]), applies them all in
//! one write transaction, commits it once, durably (an fsync), and then releases each
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

use fjall::{KeyspaceCreateOptions, SingleWriterTxDatabase, SingleWriterTxKeyspace};
use redb::{Database, ReadTransaction, ReadableDatabase};

pub use self::accounts::EmbeddedAccountStore;
pub use self::committer::MAX_BATCH_JOBS;
pub use self::inbox::EmbeddedInboxStore;
pub use self::presence::EmbeddedPresenceStore;
pub use self::ticks::EmbeddedTickStore;
use crate::{StoreError, StoreResult};

/// Creates the store directory `dir` (and its parents) if needed.
fn create_store_dir(dir: &Path) -> StoreResult<()> {
    std::fs::create_dir_all(dir).map_err(|error| {
        StoreError::Unavailable(format!(
            "failed to create store directory {}: {error}",
            dir.display()
        ))
    })
}

/// Creates `dir` if needed and opens (or creates) the redb file `file_name` in it.
fn open_database(dir: &Path, file_name: &str) -> StoreResult<Arc<Database>> {
    create_store_dir(dir)?;
    let path = dir.join(file_name);
    let database = Database::create(&path).map_err(|error| {
        StoreError::Unavailable(format!(
            "failed to open store file {}: {error}",
            path.display()
        ))
    })?;
    Ok(Arc::new(database))
}

/// How much one fjall keyspace holds in memory before it is flushed to disk (fjall's
/// default is 64 MiB).
const FJALL_MEMTABLE_BYTES: u64 = 8 << 20;

/// How much of one fjall database's disk blocks are cached.
const FJALL_CACHE_BYTES: u64 = 8 << 20;

/// How large one fjall database's journals may grow before its oldest memtables are
/// flushed to free them (fjall's default is 512 MiB; 64 MiB is its least).
const FJALL_JOURNAL_BYTES: u64 = 64 << 20;

/// How many table files one fjall database keeps open: a gateway in the same process
/// holds up to ~19,000 connections under the 20,000 open-file cap.
const FJALL_OPEN_FILES: usize = 64;

/// Creates `dir` if needed and opens (or creates) the fjall database `name` in it, with
/// the given keyspaces (tables).
///
/// Refuses a directory still holding `<name>.redb`, the same store's file as bluetick
/// wrote it before it moved to fjall: opened beside it, its stored messages would be
/// silently ignored.
fn open_journal_database<const N: usize>(
    dir: &Path,
    name: &str,
    keyspace_names: [&str; N],
) -> StoreResult<(Arc<SingleWriterTxDatabase>, [SingleWriterTxKeyspace; N])> {
    let old_file = dir.join(format!("{name}.redb"));
    if old_file.exists() {
        return Err(StoreError::Unavailable(format!(
            "{} was written by an earlier bluetick (redb); this version stores {name} in {}/. \
             Move the directory aside (its undelivered messages are not migrated) or delete it",
            old_file.display(),
            dir.join(name).display()
        )));
    }
    let path = dir.join(name);
    create_store_dir(&path)?;
    let database = SingleWriterTxDatabase::builder(&path)
        .cache_size(FJALL_CACHE_BYTES)
        .max_journaling_size(FJALL_JOURNAL_BYTES)
        .max_cached_files(Some(FJALL_OPEN_FILES))
        .open()
        .map_err(|error| match error {
            fjall::Error::Locked => StoreError::Unavailable(format!(
                "store {} is open in another process",
                path.display()
            )),
            other => {
                StoreError::Unavailable(format!("failed to open store {}: {other}", path.display()))
            }
        })?;
    let mut keyspaces = Vec::with_capacity(N);
    for keyspace_name in keyspace_names {
        keyspaces.push(database.keyspace(keyspace_name, || {
            KeyspaceCreateOptions::default().max_memtable_size(FJALL_MEMTABLE_BYTES)
        })?);
    }
    let keyspaces = keyspaces
        .try_into()
        .map_err(|_| StoreError::Internal("keyspace count changed".to_string()))?;
    Ok((Arc::new(database), keyspaces))
}

/// Runs `read` against a fresh snapshot of a fjall `database` on the blocking pool.
async fn read_journal_snapshot<T, F>(
    database: &Arc<SingleWriterTxDatabase>,
    read: F,
) -> StoreResult<T>
where
    T: Send + 'static,
    F: FnOnce(&fjall::Snapshot) -> StoreResult<T> + Send + 'static,
{
    let database = Arc::clone(database);
    tokio::task::spawn_blocking(move || read(&database.read_tx()))
        .await
        .map_err(|error| StoreError::Internal(format!("read task failed: {error}")))?
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

impl From<fjall::Error> for StoreError {
    fn from(error: fjall::Error) -> Self {
        match error {
            fjall::Error::Io(_) | fjall::Error::Poisoned | fjall::Error::Locked => {
                StoreError::Unavailable(error.to_string())
            }
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
