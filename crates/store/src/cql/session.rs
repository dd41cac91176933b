//! [`CqlSession`]: one driver session per store URL and process, the schema set-up, and the
//! few execution helpers every CQL store uses (bounded in-flight requests, error mapping,
//! row decoding).
//!
//! Opening a store calls [`CqlSession::shared`]: the first open of a URL connects, creates the
//! keyspace with the URL's replication if it is missing, and applies every schema version
//! not yet recorded in `schema_version` (statements are `IF NOT EXISTS`, so a crash half-way
//! is repaired by the next start). Later opens of the same URL reuse that session while any
//! store still holds it. A session's connections run on the Tokio runtime that created it.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Weak};

use futures::TryStreamExt;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::Batch;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};
use tokio::sync::{Mutex, Semaphore, SemaphorePermit};

use super::{CqlLocation, decode_error, execution_error, new_session_error, pager_error};
use crate::{StoreError, StoreResult};

/// The schema versions, in order: `(version, CQL text)`. Never edit an applied version.
const SCHEMA_VERSIONS: &[(i32, &str)] = &[
    (1, include_str!("../../schema/v1.cql")),
    (2, include_str!("../../schema/v2.cql")),
];

/// How many times the schema set-up is tried before the store fails to open, and the pause
/// between attempts.
const SCHEMA_ATTEMPTS: u32 = 10;
const SCHEMA_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// How many times a statement refused as invalid is prepared before the refusal counts
/// (see [`CqlSession::prepare`]), and the pause between attempts.
const PREPARE_ATTEMPTS: u32 = 20;
const PREPARE_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

/// The `schema_version` component this crate records its versions under.
const SCHEMA_COMPONENT: &str = "bluetick-store";

/// Values of one statement in a batch.
pub(crate) type BatchValue = Box<dyn SerializeRow + Send + Sync>;

/// Sessions by URL; weak so that the last store to go closes the connections.
static SESSIONS: LazyLock<Mutex<HashMap<String, Weak<CqlSession>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// A connected driver session with the keyspace in use and the schema applied.
pub struct CqlSession {
    session: Session,
    location: CqlLocation,
    /// Bounds the requests in flight from this process, so a burst of calls queues here
    /// instead of overloading the engine (which would answer with timeouts).
    in_flight: Semaphore,
}

impl std::fmt::Debug for CqlSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CqlSession")
            .field("hosts", &self.location.hosts)
            .field("keyspace", &self.location.keyspace)
            .field("consistency", &self.location.consistency)
            .finish_non_exhaustive()
    }
}

impl CqlSession {
    /// Returns the session for `location`, connecting and applying the schema on first use.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when no contact point answers; [`StoreError::Internal`]
    /// when the engine refuses the schema.
    pub async fn shared(location: &CqlLocation) -> StoreResult<Arc<Self>> {
        let mut sessions = SESSIONS.lock().await;
        if let Some(session) = sessions.get(&location.url).and_then(Weak::upgrade) {
            return Ok(session);
        }
        let session = Arc::new(Self::connect(location.clone()).await?);
        sessions.retain(|_, weak| weak.strong_count() > 0);
        sessions.insert(location.url.clone(), Arc::downgrade(&session));
        Ok(session)
    }

    /// Connects a new, unshared session and applies the schema.
    ///
    /// # Errors
    /// As [`CqlSession::shared`].
    pub async fn connect(location: CqlLocation) -> StoreResult<Self> {
        let mut policy = DefaultPolicy::builder().token_aware(true);
        if let Some(datacenter) = &location.local_datacenter_opt {
            policy = policy.prefer_datacenter(datacenter.clone());
        }
        let profile = ExecutionProfile::builder()
            .consistency(location.consistency)
            .serial_consistency(Some(location.serial_consistency))
            .request_timeout(Some(location.request_timeout))
            .load_balancing_policy(policy.build())
            .build();
        let session = SessionBuilder::new()
            .known_nodes(&location.hosts)
            .connection_timeout(
                location
                    .request_timeout
                    .min(std::time::Duration::from_secs(5)),
            )
            .default_execution_profile_handle(profile.into_handle())
            .build()
            .await
            .map_err(|error| new_session_error(&location, error))?;
        let cql_session = Self {
            session,
            in_flight: Semaphore::new(location.max_in_flight),
            location,
        };
        // Several processes may set the schema up at once on a fresh cluster (every service
        // starts together in Kubernetes): one may see a table another created before every
        // node knows it. Waiting for schema agreement and trying again settles it.
        retry_after_agreement(
            &cql_session.session,
            "the cql schema set-up",
            SCHEMA_ATTEMPTS,
            SCHEMA_RETRY_PAUSE,
            |_| true,
            || cql_session.apply_schema(),
        )
        .await?;
        Ok(cql_session)
    }

    /// Returns the parsed URL this session was opened with.
    pub fn location(&self) -> &CqlLocation {
        &self.location
    }

    /// Returns the driver session, for tests and tools (e.g. to inspect rows directly).
    pub fn driver(&self) -> &Session {
        &self.session
    }

    async fn apply_schema(&self) -> StoreResult<()> {
        let keyspace = &self.location.keyspace;
        self.ddl(&format!(
            "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {} AND durable_writes = true",
            self.location.replication_cql()
        ))
        .await?;
        self.agree().await?;
        self.session
            .use_keyspace(keyspace.as_str(), false)
            .await
            .map_err(|error| {
                StoreError::Unavailable(format!("failed to use keyspace {keyspace}: {error}"))
            })?;
        self.ddl(
            "CREATE TABLE IF NOT EXISTS schema_version (component text, version int, \
             applied_at_ms bigint, PRIMARY KEY ((component), version))",
        )
        .await?;
        // An `IF NOT EXISTS` that found the table (created by another process) is no schema
        // change, so the driver does not wait for agreement on its own.
        self.agree().await?;
        let read_versions = self
            .prepare(
                "SELECT version FROM schema_version WHERE component = ?",
                true,
            )
            .await?;
        let record_version = self
            .prepare(
                "INSERT INTO schema_version (component, version, applied_at_ms) VALUES (?, ?, ?)",
                true,
            )
            .await?;
        let applied: Vec<(i32,)> = self.rows(&read_versions, (SCHEMA_COMPONENT,)).await?;
        let current = applied.iter().map(|(version,)| *version).max().unwrap_or(0);
        for (version, text) in SCHEMA_VERSIONS {
            if *version <= current {
                continue;
            }
            tracing::info!(keyspace = %keyspace, version, "applying cql schema version");
            for statement in schema_statements(text) {
                if let Some((table, column)) = added_column(&statement)
                    && self.has_column(table, column).await?
                {
                    // Added by an earlier start that died before recording the version.
                    continue;
                }
                self.ddl(&statement).await?;
            }
            self.agree().await?;
            self.execute(
                &record_version,
                (
                    SCHEMA_COMPONENT,
                    *version,
                    super::ms_to_cql(super::wall_clock_ms()),
                ),
            )
            .await?;
        }
        Ok(())
    }

    /// Returns whether `table` of this keyspace has `column`.
    async fn has_column(&self, table: &str, column: &str) -> StoreResult<bool> {
        let statement = self
            .prepare(
                "SELECT column_name FROM system_schema.columns \
                 WHERE keyspace_name = ? AND table_name = ? AND column_name = ?",
                true,
            )
            .await?;
        let row: Option<(String,)> = self
            .first_row(&statement, (self.location.keyspace.as_str(), table, column))
            .await?;
        Ok(row.is_some())
    }

    /// Waits until every node reports the same schema version.
    async fn agree(&self) -> StoreResult<()> {
        self.session
            .await_schema_agreement()
            .await
            .map(|_| ())
            .map_err(|error| {
                StoreError::Unavailable(format!("schema agreement not reached: {error}"))
            })
    }

    /// Runs a schema statement (DDL takes no bind markers, so it is not prepared).
    async fn ddl(&self, statement: &str) -> StoreResult<()> {
        self.session
            .query_unpaged(statement, ())
            .await
            .map(|_| ())
            .map_err(|error| execution_error("schema statement failed", error))
    }

    /// Prepares a data statement. `idempotent` statements may be retried by the driver
    /// after a timeout; conditional (LWT) statements must not be marked so.
    ///
    /// A node may refuse a statement as invalid because a schema change another process just
    /// made has not reached it yet (several services set the schema up at once on a fresh
    /// cluster): such a refusal is tried again after schema agreement, for
    /// [`PREPARE_ATTEMPTS`] attempts, before it counts.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if no node answers, [`StoreError::Internal`] if the
    /// statement is refused.
    pub(crate) async fn prepare(
        &self,
        statement: &str,
        idempotent: bool,
    ) -> StoreResult<PreparedStatement> {
        let mut prepared = retry_after_agreement(
            &self.session,
            statement,
            PREPARE_ATTEMPTS,
            PREPARE_RETRY_PAUSE,
            refused_as_invalid,
            || self.session.prepare(statement),
        )
        .await
        .map_err(|error| prepare_error(statement, error))?;
        prepared.set_is_idempotent(idempotent);
        Ok(prepared)
    }

    async fn permit(&self) -> StoreResult<SemaphorePermit<'_>> {
        self.in_flight
            .acquire()
            .await
            .map_err(|_| StoreError::Unavailable("cql session closed".to_string()))
    }

    /// Executes a prepared statement whose result is not read (or is read by the caller).
    pub(crate) async fn execute(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> StoreResult<QueryResult> {
        let _permit = self.permit().await?;
        self.session
            .execute_unpaged(statement, values)
            .await
            .map_err(|error| execution_error(statement_name(statement), error))
    }

    /// Executes a bounded query (a primary-key lookup or one with `LIMIT`) and decodes every
    /// row.
    pub(crate) async fn rows<R>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> StoreResult<Vec<R>>
    where
        R: for<'frame> DeserializeRow<'frame, 'frame>,
    {
        let result = self.execute(statement, values).await?;
        decode_rows(statement_name(statement), result)
    }

    /// Executes a query and decodes its first row, if any.
    pub(crate) async fn first_row<R>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> StoreResult<Option<R>>
    where
        R: for<'frame> DeserializeRow<'frame, 'frame>,
    {
        Ok(self.rows(statement, values).await?.into_iter().next())
    }

    /// Executes a conditional (LWT) statement and returns whether it was applied.
    pub(crate) async fn execute_conditional(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> StoreResult<bool> {
        let result = self.execute(statement, values).await?;
        applied(statement_name(statement), result)
    }

    /// Executes a batch; `values` holds one entry per statement.
    pub(crate) async fn batch(
        &self,
        batch: &Batch,
        values: Vec<BatchValue>,
    ) -> StoreResult<QueryResult> {
        let _permit = self.permit().await?;
        self.session
            .batch(batch, values)
            .await
            .map_err(|error| execution_error("batch", error))
    }

    /// Executes a conditional batch (one partition) and returns whether it was applied.
    pub(crate) async fn batch_conditional(
        &self,
        batch: &Batch,
        values: Vec<BatchValue>,
    ) -> StoreResult<bool> {
        let result = self.batch(batch, values).await?;
        applied("conditional batch", result)
    }

    /// Streams a query page by page (`page_size` rows per round trip) and passes each
    /// decoded row to `visit` until it returns `false` or the rows run out. Never holds
    /// more than a page or two in memory.
    pub(crate) async fn for_each_row<R, F>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
        page_size: i32,
        mut visit: F,
    ) -> StoreResult<()>
    where
        R: for<'frame, 'metadata> DeserializeRow<'frame, 'metadata>,
        F: FnMut(R) -> StoreResult<bool>,
    {
        let _permit = self.permit().await?;
        let name = statement_name(statement);
        let mut paged = statement.clone();
        paged.set_page_size(page_size.max(1));
        let pager = self
            .session
            .execute_iter(paged, values)
            .await
            .map_err(|error| pager_error(name, error))?;
        let mut stream = pager
            .rows_stream::<R>()
            .map_err(|error| decode_error(name, error))?;
        loop {
            let next = stream.try_next().await.map_err(|error| match error {
                scylla::errors::NextRowError::NextPageError(page_error) => {
                    StoreError::Unavailable(format!("{name}: {page_error}"))
                }
                other => decode_error(name, other),
            })?;
            let Some(row) = next else {
                return Ok(());
            };
            if !visit(row)? {
                return Ok(());
            }
        }
    }
}

/// Returns a short name of a statement for error messages (its CQL text).
fn statement_name(statement: &PreparedStatement) -> &str {
    statement.get_statement()
}

/// Decodes every row of a result.
pub(crate) fn decode_rows<R>(what: &str, result: QueryResult) -> StoreResult<Vec<R>>
where
    R: for<'frame> DeserializeRow<'frame, 'frame>,
{
    let rows_result = result
        .into_rows_result()
        .map_err(|error| decode_error(what, error))?;
    let rows = rows_result
        .rows::<R>()
        .map_err(|error| decode_error(what, error))?;
    rows.collect::<Result<Vec<R>, _>>()
        .map_err(|error| decode_error(what, error))
}

/// Reads the `[applied]` column of a conditional statement's result.
fn applied(what: &str, result: QueryResult) -> StoreResult<bool> {
    let rows: Vec<Row> = decode_rows(what, result)?;
    match rows.first().and_then(|row| row.columns.first()) {
        Some(Some(CqlValue::Boolean(applied))) => Ok(*applied),
        other => Err(StoreError::Internal(format!(
            "{what}: expected an [applied] column, got {other:?}"
        ))),
    }
}

/// Splits a schema file into statements: comments dropped, split at `;` ending a line.
fn schema_statements(text: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.split("--").next().unwrap_or("").trim_end();
        if line.trim().is_empty() {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if line.ends_with(';') {
            statements.push(current.trim().trim_end_matches(';').to_string());
            current.clear();
        }
    }
    if !current.trim().is_empty() {
        statements.push(current.trim().to_string());
    }
    statements
}

/// `(table, column)` of an `ALTER TABLE <table> ADD <column> <type>` statement. CQL has no
/// `ADD IF NOT EXISTS` on every engine, so the set-up checks for the column first.
fn added_column(statement: &str) -> Option<(&str, &str)> {
    let mut words = statement.split_whitespace();
    let keyword = |word: Option<&str>, expected: &str| {
        word.is_some_and(|word| word.eq_ignore_ascii_case(expected))
    };
    if !keyword(words.next(), "ALTER") || !keyword(words.next(), "TABLE") {
        return None;
    }
    let table = words.next()?;
    if !keyword(words.next(), "ADD") {
        return None;
    }
    Some((table, words.next()?))
}

/// Runs `attempt` until it succeeds, fails in a way `retryable` does not accept, or has been
/// tried `attempts` times; between tries, waits for every node to report the same schema
/// version, then `pause`. `what` names the work in the warning logged for each retry.
async fn retry_after_agreement<T, E, F>(
    session: &Session,
    what: &str,
    attempts: u32,
    pause: std::time::Duration,
    retryable: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: Future<Output = Result<T, E>>,
{
    let mut tried = 1;
    loop {
        match attempt().await {
            Err(error) if tried < attempts && retryable(&error) => {
                tracing::warn!(%error, attempt = tried, what, "retrying after schema agreement");
                let _ = session.await_schema_agreement().await;
                tokio::time::sleep(pause).await;
                tried += 1;
            }
            result => return result,
        }
    }
}

/// Maps a failed preparation: a refused statement is [`StoreError::Internal`], anything
/// else (no node answered) [`StoreError::Unavailable`].
fn prepare_error(statement: &str, error: scylla::errors::PrepareError) -> StoreError {
    let message = format!("failed to prepare {statement:?}: {error}");
    match error {
        scylla::errors::PrepareError::AllAttemptsFailed { first_attempt }
            if !super::attempt_error_is_transient(&first_attempt) =>
        {
            StoreError::Internal(message)
        }
        _ => StoreError::Unavailable(message),
    }
}

/// Whether a node refused a statement as invalid (an unknown table or column, among others).
fn refused_as_invalid(error: &scylla::errors::PrepareError) -> bool {
    matches!(
        error,
        scylla::errors::PrepareError::AllAttemptsFailed {
            first_attempt: scylla::errors::RequestAttemptError::DbError(
                scylla::errors::DbError::Invalid,
                _
            ),
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_columns_are_recognised() {
        assert_eq!(
            added_column("ALTER TABLE users ADD registration_token_hash blob"),
            Some(("users", "registration_token_hash"))
        );
        assert_eq!(
            added_column("alter table users\nadd x int"),
            Some(("users", "x"))
        );
        assert_eq!(added_column("ALTER TABLE users WITH comment = 'x'"), None);
        assert_eq!(
            added_column("CREATE TABLE IF NOT EXISTS t (a int PRIMARY KEY)"),
            None
        );
        // Every later schema version's ALTER is one the set-up can check.
        for (_, text) in SCHEMA_VERSIONS {
            for statement in schema_statements(text) {
                if statement.to_ascii_uppercase().starts_with("ALTER") {
                    assert!(added_column(&statement).is_some(), "{statement}");
                }
            }
        }
    }

    #[test]
    fn schema_v1_splits_into_create_statements() {
        let statements = schema_statements(SCHEMA_VERSIONS[0].1);
        assert!(statements.len() >= 12, "{statements:#?}");
        for statement in &statements {
            assert!(
                statement.starts_with("CREATE TABLE IF NOT EXISTS "),
                "{statement}"
            );
            assert!(!statement.contains(';'), "{statement}");
        }
    }
}
