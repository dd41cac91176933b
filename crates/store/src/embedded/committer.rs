//! The group committer shared by every embedded store, over either engine ([`Engine`]).
//!
//! Callers [`submit`](GroupCommitter::submit) a write job (a closure over the engine's write
//! transaction) and await its result. A dedicated writer thread takes the first
//! queued job, drains whatever else is queued (up to [`MAX_BATCH_JOBS`]), runs them one after
//! the other in one write transaction and commits it once, durably. Only then is each caller
//! released, with its own result: a single tick never precedes the fsync.
//!
//! A few writes only save repeating work when they survive a crash: a message marked
//! delivered (lost, it is pending again and the device drops the copy by id), receipts
//! a sender confirmed (lost, they are sent again and change nothing), and ticks whose
//! caller [`flush`](GroupCommitter::flush)es before it settles the inbox. Those are
//! [`submit_lazy`](GroupCommitter::submit_lazy): a batch of nothing but lazy jobs commits
//! without an fsync (its changes are visible at once), and the next
//! durable commit makes it durable too. Under load that is the next durable write, which
//! costs nothing extra; the writer commits durably on its own at the latest
//! [`MAX_LAZY_DELAY`] after the oldest lazy commit (an empty commit if no job came), and
//! always when the store closes. A flush waits for that durability now: it costs nothing
//! when a durable commit already covered the lazy ones.
//!
//! Job contract: a job that refuses its input ([`StoreError::NotFound`] or
//! [`StoreError::AlreadyExists`]) must do so before it writes anything; its refusal goes to
//! its caller alone and the rest of the batch commits. Any other error (I/O, corrupt data,
//! a panic) aborts the transaction and fails every job of the batch, since a half-applied
//! job cannot be told apart from a whole one.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::{StoreError, StoreResult};

/// The most write jobs applied in one transaction (one fsync).
pub const MAX_BATCH_JOBS: usize = 1024;

/// The longest a lazy commit stays without an fsync.
const MAX_LAZY_DELAY: Duration = Duration::from_millis(100);

/// How many write jobs may wait for the writer before submitters wait for room.
const QUEUE_CAPACITY: usize = 8 * MAX_BATCH_JOBS;

/// A storage engine the group committer drives: one write transaction at a time, each
/// committed durably (an fsync) or only made visible.
pub(crate) trait Engine: Send + Sync + 'static {
    /// The engine's write transaction; dropping it uncommitted discards its writes.
    type Transaction<'db>;

    /// Starts the batch's write transaction.
    fn begin(&self, durable: bool) -> StoreResult<Self::Transaction<'_>>;

    /// Commits `transaction`, durably (before returning) if it was begun `durable`.
    fn commit(&self, transaction: Self::Transaction<'_>) -> StoreResult<()>;

    /// Makes every earlier commit durable.
    fn sync(&self) -> StoreResult<()>;
}

/// The store's file could not take a commit: the disk, not the request, is at fault.
fn commit_error(error: StoreError) -> StoreError {
    match error {
        StoreError::Internal(detail) => StoreError::Internal(detail),
        other => StoreError::Unavailable(format!("failed to commit: {other}")),
    }
}

/// redb: a copy-on-write B-tree; a durable commit writes the changed pages and fsyncs.
impl Engine for redb::Database {
    type Transaction<'db> = redb::WriteTransaction;

    fn begin(&self, durable: bool) -> StoreResult<redb::WriteTransaction> {
        let mut transaction = self.begin_write()?;
        transaction.set_durability(if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })?;
        Ok(transaction)
    }

    fn commit(&self, transaction: redb::WriteTransaction) -> StoreResult<()> {
        transaction
            .commit()
            .map_err(|error| commit_error(StoreError::from(error)))
    }

    fn sync(&self) -> StoreResult<()> {
        let transaction = Engine::begin(self, true)?;
        Engine::commit(self, transaction)
    }
}

/// fjall: a log-structured merge tree; a commit appends one record to its journal, and a
/// durable one `fdatasync`s the journal before its writes become visible.
impl Engine for fjall::SingleWriterTxDatabase {
    type Transaction<'db> = JournalTransaction<'db>;

    fn begin(&self, durable: bool) -> StoreResult<JournalTransaction<'_>> {
        Ok(JournalTransaction {
            inner: self
                .write_tx()
                .durability(durable.then_some(fjall::PersistMode::SyncData)),
            durable,
            written: false,
        })
    }

    fn commit(&self, transaction: JournalTransaction<'_>) -> StoreResult<()> {
        let JournalTransaction {
            inner,
            durable,
            written,
        } = transaction;
        if written {
            inner
                .commit()
                .map_err(|error| commit_error(StoreError::from(error)))
        } else if durable {
            // fjall skips an empty commit, fsync included; earlier lazy commits must still
            // become durable now.
            drop(inner);
            self.sync()
        } else {
            Ok(())
        }
    }

    fn sync(&self) -> StoreResult<()> {
        self.persist(fjall::PersistMode::SyncData)
            .map_err(|error| commit_error(StoreError::from(error)))
    }
}

/// A fjall write transaction that knows whether it wrote anything (see
/// [`Engine::commit`] for fjall). Reads see the transaction's own writes.
pub(crate) struct JournalTransaction<'db> {
    inner: fjall::SingleWriterWriteTx<'db>,
    durable: bool,
    written: bool,
}

impl JournalTransaction<'_> {
    /// The value of `key`, if any.
    pub(crate) fn get(
        &self,
        keyspace: &fjall::SingleWriterTxKeyspace,
        key: impl AsRef<[u8]>,
    ) -> StoreResult<Option<fjall::UserValue>> {
        Ok(fjall::Readable::get(&self.inner, keyspace, key)?)
    }

    /// Every key in `range`, in order.
    pub(crate) fn keys_in(
        &self,
        keyspace: &fjall::SingleWriterTxKeyspace,
        range: impl std::ops::RangeBounds<Vec<u8>>,
    ) -> StoreResult<Vec<fjall::UserKey>> {
        fjall::Readable::range(&self.inner, keyspace, range)
            .map(|entry| Ok(entry.key()?))
            .collect()
    }

    /// Sets `key` to `value`.
    pub(crate) fn insert(
        &mut self,
        keyspace: &fjall::SingleWriterTxKeyspace,
        key: impl Into<fjall::UserKey>,
        value: impl Into<fjall::UserValue>,
    ) {
        self.written = true;
        self.inner.insert(keyspace, key, value);
    }

    /// Removes `key`.
    pub(crate) fn remove(
        &mut self,
        keyspace: &fjall::SingleWriterTxKeyspace,
        key: impl Into<fjall::UserKey>,
    ) {
        self.written = true;
        self.inner.remove(keyspace, key);
    }

    /// Removes `key` and returns its value, if it had one.
    pub(crate) fn take(
        &mut self,
        keyspace: &fjall::SingleWriterTxKeyspace,
        key: impl Into<fjall::UserKey>,
    ) -> StoreResult<Option<fjall::UserValue>> {
        let value_opt = self.inner.take(keyspace, key)?;
        self.written |= value_opt.is_some();
        Ok(value_opt)
    }
}

/// A write job with its result type erased, so one writer serves every kind of job.
trait ErasedJob<E: Engine>: Send {
    /// Runs the job inside the batch transaction. `Err` means the batch must abort.
    fn apply(&mut self, transaction: &mut E::Transaction<'_>) -> Result<(), StoreError>;

    /// Releases the caller once the batch is committed (`Ok`) or failed (`Err`).
    fn finish(self: Box<Self>, batch_result: Result<(), StoreError>);

    /// Whether the caller must wait for the fsync.
    fn durable(&self) -> bool;

    /// Whether this is a [`GroupCommitter::flush`], which writes nothing.
    fn is_flush(&self) -> bool {
        false
    }
}

/// A [`GroupCommitter::flush`]: writes nothing, and is answered once every earlier commit
/// is durable.
struct FlushJob {
    reply: oneshot::Sender<StoreResult<()>>,
}

impl<E: Engine> ErasedJob<E> for FlushJob {
    fn apply(&mut self, _transaction: &mut E::Transaction<'_>) -> Result<(), StoreError> {
        Ok(())
    }

    fn finish(self: Box<Self>, batch_result: Result<(), StoreError>) {
        let _ = self.reply.send(batch_result);
    }

    fn durable(&self) -> bool {
        true
    }

    fn is_flush(&self) -> bool {
        true
    }
}

struct TypedJob<T, F> {
    durable: bool,
    work_opt: Option<F>,
    outcome_opt: Option<StoreResult<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<E, T, F> ErasedJob<E> for TypedJob<T, F>
where
    E: Engine,
    T: Send + 'static,
    F: for<'t, 'db> FnOnce(&'t mut E::Transaction<'db>) -> StoreResult<T> + Send + 'static,
{
    fn apply(&mut self, transaction: &mut E::Transaction<'_>) -> Result<(), StoreError> {
        let Some(work) = self.work_opt.take() else {
            return Ok(());
        };
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| work(transaction)))
            .map_err(|_| StoreError::Internal("write job panicked".to_string()))?;
        match outcome {
            Ok(value) => self.outcome_opt = Some(Ok(value)),
            Err(refusal @ (StoreError::NotFound(_) | StoreError::AlreadyExists(_))) => {
                self.outcome_opt = Some(Err(refusal));
            }
            Err(fatal) => return Err(fatal),
        }
        Ok(())
    }

    fn finish(self: Box<Self>, batch_result: Result<(), StoreError>) {
        let result = match batch_result {
            Ok(()) => self.outcome_opt.unwrap_or_else(|| {
                Err(StoreError::Internal(
                    "write job was never applied".to_string(),
                ))
            }),
            Err(error) => Err(error),
        };
        // The caller may have gone away (cancelled); its write stands regardless.
        let _ = self.reply.send(result);
    }

    fn durable(&self) -> bool {
        self.durable
    }
}

/// Returns an equivalent error for another waiter of a failed batch.
fn duplicate_error(error: &StoreError) -> StoreError {
    match error {
        StoreError::NotFound(detail) => StoreError::NotFound(detail.clone()),
        StoreError::AlreadyExists(detail) => StoreError::AlreadyExists(detail.clone()),
        StoreError::Unavailable(detail) => StoreError::Unavailable(detail.clone()),
        StoreError::Internal(detail) => StoreError::Internal(detail.clone()),
    }
}

/// One writer thread per database, applying queued write jobs in groups.
///
/// Dropping it closes the queue, lets the writer finish what is queued and joins it, so
/// the database file is released when the store is dropped.
pub(crate) struct GroupCommitter<E: Engine> {
    /// `None` only while dropping, to close the queue before joining the writer.
    sender_opt: Option<mpsc::Sender<Box<dyn ErasedJob<E>>>>,
    writer_opt: Option<JoinHandle<()>>,
    /// Committed write transactions, for tests and metrics.
    commits: Arc<AtomicU64>,
}

impl<E: Engine> std::fmt::Debug for GroupCommitter<E> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GroupCommitter")
            .field("commits", &self.commit_count())
            .finish_non_exhaustive()
    }
}

impl<E: Engine> GroupCommitter<E> {
    /// Starts the writer thread of `database`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the thread cannot be spawned.
    pub(crate) fn start(name: &str, database: Arc<E>) -> StoreResult<Self> {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let commits = Arc::new(AtomicU64::new(0));
        let writer_commits = Arc::clone(&commits);
        let waiter = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|error| {
                StoreError::Unavailable(format!("failed to start {name} writer timer: {error}"))
            })?;
        let writer = std::thread::Builder::new()
            .name(format!("{name}-writer"))
            .spawn(move || run_writer(database.as_ref(), &waiter, receiver, &writer_commits))
            .map_err(|error| {
                StoreError::Unavailable(format!("failed to start {name} writer thread: {error}"))
            })?;
        Ok(Self {
            sender_opt: Some(sender),
            writer_opt: Some(writer),
            commits,
        })
    }

    /// Queues `work` for the next group commit and returns its result once that commit is
    /// durable.
    ///
    /// # Errors
    /// The job's own refusal, or [`StoreError::Unavailable`] / [`StoreError::Internal`]
    /// when its batch failed or the writer has stopped.
    pub(crate) async fn submit<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'t, 'db> FnOnce(&'t mut E::Transaction<'db>) -> StoreResult<T> + Send + 'static,
    {
        self.submit_with(true, work).await
    }

    /// Queues `work` like [`submit`](Self::submit) but returns once it is committed and
    /// visible, possibly before it is durable: only for writes whose loss in a crash just
    /// repeats work (see the module documentation).
    ///
    /// # Errors
    /// As [`submit`](Self::submit).
    pub(crate) async fn submit_lazy<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'t, 'db> FnOnce(&'t mut E::Transaction<'db>) -> StoreResult<T> + Send + 'static,
    {
        self.submit_with(false, work).await
    }

    /// Returns once every commit answered so far is durable: at once (after the jobs
    /// queued before it) when a durable commit already covered them, else with the next
    /// batch's fsync (an empty one if nothing else is queued).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the fsync failed or the writer has stopped.
    pub(crate) async fn flush(&self) -> StoreResult<()> {
        let (reply, result) = oneshot::channel();
        self.enqueue(Box::new(FlushJob { reply }), result).await
    }

    async fn submit_with<T, F>(&self, durable: bool, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'t, 'db> FnOnce(&'t mut E::Transaction<'db>) -> StoreResult<T> + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        let job = Box::new(TypedJob {
            durable,
            work_opt: Some(work),
            outcome_opt: None,
            reply,
        });
        self.enqueue(job, result).await
    }

    /// Queues `job` and waits for its answer on `result`.
    async fn enqueue<T>(
        &self,
        job: Box<dyn ErasedJob<E>>,
        result: oneshot::Receiver<StoreResult<T>>,
    ) -> StoreResult<T> {
        let sender = self
            .sender_opt
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("store is closing".to_string()))?;
        sender
            .send(job)
            .await
            .map_err(|_| StoreError::Unavailable("store writer has stopped".to_string()))?;
        result
            .await
            .map_err(|_| StoreError::Unavailable("store writer has stopped".to_string()))?
    }

    /// Returns how many write transactions have been committed.
    pub(crate) fn commit_count(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

impl<E: Engine> Drop for GroupCommitter<E> {
    fn drop(&mut self) {
        drop(self.sender_opt.take());
        let joined_opt = self.writer_opt.take().map(JoinHandle::join);
        if matches!(joined_opt, Some(Err(_))) {
            tracing::error!("store writer thread panicked");
        }
    }
}

/// The writer thread: waits for a job, drains the queue into a batch, commits it; makes
/// lazy commits durable when no durable batch came within [`MAX_LAZY_DELAY`], and before
/// it stops.
///
/// `waiter` (a current-thread runtime with a timer) drives the timed wait for the next job
/// while a lazy commit is not durable.
fn run_writer<E: Engine>(
    database: &E,
    waiter: &tokio::runtime::Runtime,
    mut receiver: mpsc::Receiver<Box<dyn ErasedJob<E>>>,
    commits: &AtomicU64,
) {
    let mut batch: Vec<Box<dyn ErasedJob<E>>> = Vec::with_capacity(MAX_BATCH_JOBS);
    // Since when a lazy commit has not been durable, if one is not.
    let mut lazy_since_opt: Option<Instant> = None;
    loop {
        let first_job_opt = match lazy_since_opt {
            None => receiver.blocking_recv(),
            Some(since) => {
                let remaining = MAX_LAZY_DELAY.saturating_sub(since.elapsed());
                // The timer must be made inside the runtime that drives it.
                let next = waiter
                    .block_on(async { tokio::time::timeout(remaining, receiver.recv()).await });
                match next {
                    Ok(job_opt) => job_opt,
                    Err(_elapsed) => {
                        if make_durable(database, commits) {
                            lazy_since_opt = None;
                            continue;
                        }
                        // Not durable: retry after the next job rather than spin on a
                        // failing disk.
                        receiver.blocking_recv()
                    }
                }
            }
        };
        let Some(first_job) = first_job_opt else {
            break;
        };
        batch.push(first_job);
        while batch.len() < MAX_BATCH_JOBS {
            match receiver.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if lazy_since_opt.is_none() && batch.iter().all(|job| job.is_flush()) {
            // Only flushes, and every earlier commit is durable already.
            for job in batch.drain(..) {
                job.finish(Ok(()));
            }
            continue;
        }
        // Lazy commits are made durable in time even when only lazy jobs keep coming.
        let durable = batch.iter().any(|job| job.durable())
            || lazy_since_opt.is_some_and(|since| since.elapsed() >= MAX_LAZY_DELAY);
        let batch_result = apply_batch(database, &mut batch, durable);
        match &batch_result {
            Ok(()) => {
                commits.fetch_add(1, Ordering::Relaxed);
                lazy_since_opt = if durable {
                    None
                } else {
                    lazy_since_opt.or_else(|| Some(Instant::now()))
                };
            }
            Err(error) => {
                tracing::warn!(jobs = batch.len(), %error, "store write batch failed");
            }
        }
        for job in batch.drain(..) {
            job.finish(batch_result.as_ref().map(|_| ()).map_err(duplicate_error));
        }
    }
    if lazy_since_opt.is_some() && !make_durable(database, commits) {
        tracing::error!("store closed with lazy writes that could not be made durable");
    }
}

/// Makes every earlier lazy commit durable. Returns false (and logs) if that failed.
fn make_durable<E: Engine>(database: &E, commits: &AtomicU64) -> bool {
    match database.sync() {
        Ok(()) => {
            commits.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(error) => {
            tracing::warn!(%error, "failed to make lazy store writes durable");
            false
        }
    }
}

/// Applies every job of `batch` in one write transaction, durable if `durable`. A failing
/// job drops the transaction uncommitted, which discards the whole batch.
fn apply_batch<E: Engine>(
    database: &E,
    batch: &mut [Box<dyn ErasedJob<E>>],
    durable: bool,
) -> StoreResult<()> {
    let mut transaction = database.begin(durable)?;
    for job in batch.iter_mut() {
        job.apply(&mut transaction)?;
    }
    database.commit(transaction)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use fjall::Readable;

    use super::*;

    fn open() -> (
        tempfile::TempDir,
        fjall::SingleWriterTxDatabase,
        fjall::SingleWriterTxKeyspace,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let database = fjall::SingleWriterTxDatabase::builder(dir.path())
            .open()
            .unwrap();
        let keyspace = database
            .keyspace("rows", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        (dir, database, keyspace)
    }

    fn read(
        database: &fjall::SingleWriterTxDatabase,
        rows: &fjall::SingleWriterTxKeyspace,
        key: &str,
    ) -> Option<Vec<u8>> {
        database
            .read_tx()
            .get(rows, key)
            .unwrap()
            .map(|value| value.to_vec())
    }

    /// A fjall batch reads its own writes, its last write per key is what commits, and
    /// nothing is visible before the commit.
    #[test]
    fn a_journal_batch_reads_its_own_writes_and_commits_the_last() {
        let (_dir, database, rows) = open();
        let mut setup = Engine::begin(&database, true).unwrap();
        setup.insert(&rows, "kept", "old");
        setup.insert(&rows, "gone", "old");
        Engine::commit(&database, setup).unwrap();

        let mut batch = Engine::begin(&database, true).unwrap();
        batch.insert(&rows, "new", "1");
        batch.insert(&rows, "new", "2");
        assert_eq!(&*batch.get(&rows, "new").unwrap().unwrap(), b"2");
        assert_eq!(&*batch.take(&rows, "gone").unwrap().unwrap(), b"old");
        assert_eq!(batch.take(&rows, "gone").unwrap(), None, "taken once");
        batch.remove(&rows, "brief");
        batch.insert(&rows, "brief", "back");
        batch.insert(&rows, "dropped", "x");
        batch.remove(&rows, "dropped");
        let keys: Vec<Vec<u8>> = batch
            .keys_in(&rows, ..)
            .unwrap()
            .into_iter()
            .map(|key| key.to_vec())
            .collect();
        assert_eq!(
            keys,
            [b"brief".to_vec(), b"kept".to_vec(), b"new".to_vec()],
            "the stored keys merged with the batch's"
        );
        assert_eq!(
            read(&database, &rows, "new"),
            None,
            "nothing visible before the commit"
        );

        Engine::commit(&database, batch).unwrap();
        assert_eq!(read(&database, &rows, "new").unwrap(), b"2");
        assert_eq!(read(&database, &rows, "brief").unwrap(), b"back");
        assert_eq!(read(&database, &rows, "kept").unwrap(), b"old");
        assert_eq!(read(&database, &rows, "gone"), None);
        assert_eq!(read(&database, &rows, "dropped"), None);
    }

    /// A batch that wrote nothing commits (and, durable, syncs) without error, and a
    /// dropped one leaves no trace.
    #[test]
    fn an_empty_or_dropped_journal_batch_changes_nothing() {
        let (_dir, database, rows) = open();
        Engine::commit(&database, Engine::begin(&database, true).unwrap()).unwrap();
        Engine::commit(&database, Engine::begin(&database, false).unwrap()).unwrap();
        let mut dropped = Engine::begin(&database, true).unwrap();
        dropped.insert(&rows, "never", "1");
        drop(dropped);
        assert_eq!(read(&database, &rows, "never"), None);
        assert!(
            database
                .read_tx()
                .range::<&str, _>(&rows, ..)
                .next()
                .is_none()
        );
    }

    /// A flush commits (syncs) only when a lazy commit is not durable yet.
    #[tokio::test]
    async fn a_flush_syncs_only_what_is_not_durable() {
        let (_dir, database, rows) = open();
        let committer = GroupCommitter::start("test", Arc::new(database)).unwrap();
        committer.flush().await.unwrap();
        assert_eq!(committer.commit_count(), 0, "nothing to make durable");

        let lazy_rows = rows.clone();
        committer
            .submit_lazy(move |transaction| {
                transaction.insert(&lazy_rows, "lazy", "1");
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(committer.commit_count(), 1);
        committer.flush().await.unwrap();
        assert_eq!(committer.commit_count(), 2, "the lazy commit was synced");
        committer.flush().await.unwrap();
        assert_eq!(committer.commit_count(), 2, "already durable");

        committer
            .submit_lazy(move |transaction| {
                transaction.insert(&rows, "lazy", "2");
                Ok(())
            })
            .await
            .unwrap();
        committer.submit(|_| Ok(())).await.unwrap();
        assert_eq!(committer.commit_count(), 4);
        committer.flush().await.unwrap();
        assert_eq!(
            committer.commit_count(),
            4,
            "a durable commit covered the lazy one"
        );
    }
}
