//! The conformance suite against a real CQL engine (Apache Cassandra or ScyllaDB), plus what
//! only the CQL store promises: removed rows are gone from the table, the inbox floor skips
//! what was read, and a latency report.
//!
//! These tests need a running engine, so they are ignored by default:
//!
//! ```text
//! scripts/cassandra.sh install start
//! BLUETICK_TEST_CQL_URL=scylla://127.0.0.1:9042/bluetick_test \
//!     cargo test -p bluetick-store --test cql -- --ignored --nocapture
//! ```
//!
//! (`scripts/test-cql.sh` does all of it.) Run with `--ignored` but without the variable,
//! they fail rather than pass vacuously. All tests share one Tokio runtime, because stores
//! opened with one URL share a driver session bound to the runtime that opened it.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use bluetick_proto::common::v1::{DeviceAddress, TickStatus};
use bluetick_store::conformance::{self, now_ms, unique_id, unique_message_id};
use bluetick_store::cql::{CqlInboxStore, CqlLocation};
use bluetick_store::{AcceptOutcome, AcceptRecord, AckOutcome, InboxStore, SentRecord};
use bytes::Bytes;

const NEEDS_ENGINE: &str = "needs a CQL engine: scripts/cassandra.sh start, then BLUETICK_TEST_CQL_URL=scylla://127.0.0.1:9042/bluetick_test cargo test -p bluetick-store --test cql -- --ignored";

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
});

/// Returns the engine URL; panics (fails the test) when it is not set.
fn test_url() -> String {
    match std::env::var("BLUETICK_TEST_CQL_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!("BLUETICK_TEST_CQL_URL is not set; {NEEDS_ENGINE}"),
    }
}

/// Returns the test URL with one more query option.
fn url_with(option: &str) -> String {
    let url = test_url();
    if url.contains('?') {
        format!("{url}&{option}")
    } else {
        format!("{url}?{option}")
    }
}

/// The account store keeps every promise of the conformance suite.
#[test]
#[ignore = "needs a CQL engine: scripts/cassandra.sh start, then BLUETICK_TEST_CQL_URL=… cargo test -p bluetick-store --test cql -- --ignored"]
fn cql_account_store_conforms() {
    RUNTIME.block_on(async {
        let store = bluetick_store::open_account_store(&test_url())
            .await
            .unwrap();
        conformance::account_suite(store).await;
    });
}

/// The inbox store keeps every promise of the conformance suite.
#[test]
#[ignore = "needs a CQL engine: scripts/cassandra.sh start, then BLUETICK_TEST_CQL_URL=… cargo test -p bluetick-store --test cql -- --ignored"]
fn cql_inbox_store_conforms() {
    RUNTIME.block_on(async {
        let store = bluetick_store::open_inbox_store(&test_url()).await.unwrap();
        conformance::inbox_suite(store).await;
    });
}

/// The tick store keeps every promise of the conformance suite.
#[test]
#[ignore = "needs a CQL engine: scripts/cassandra.sh start, then BLUETICK_TEST_CQL_URL=… cargo test -p bluetick-store --test cql -- --ignored"]
fn cql_tick_store_conforms() {
    RUNTIME.block_on(async {
        let store = bluetick_store::open_tick_store(&test_url()).await.unwrap();
        conformance::tick_suite(store).await;
    });
}

/// The presence store keeps every promise of the conformance suite.
#[test]
#[ignore = "needs a CQL engine: scripts/cassandra.sh start, then BLUETICK_TEST_CQL_URL=… cargo test -p bluetick-store --test cql -- --ignored"]
fn cql_presence_store_conforms() {
    RUNTIME.block_on(async {
        let store = bluetick_store::open_presence_store(&test_url())
            .await
            .unwrap();
        conformance::presence_suite(store).await;
    });
}

fn record(sender: &DeviceAddress, recipient_user_id: &str, index: usize) -> AcceptRecord {
    let now = now_ms();
    AcceptRecord {
        message_id: unique_message_id(),
        sender: sender.clone(),
        client_msg_id: format!("c-{index}"),
        recipient_user_id: recipient_user_id.to_string(),
        sent_at_ms: now,
        expires_at_ms: now + 3_600_000,
        envelopes: vec![(1, Bytes::from(vec![7u8; 200]))],
    }
}

/// After `remove`, the inbox row is gone when the table is queried directly, and the
/// idempotency claim keeps answering resends.
#[test]
#[ignore = "needs a CQL engine: scripts/cassandra.sh start, then BLUETICK_TEST_CQL_URL=… cargo test -p bluetick-store --test cql -- --ignored"]
fn removed_message_row_is_gone_from_the_table() {
    RUNTIME.block_on(async {
        let location = CqlLocation::parse(&test_url()).unwrap();
        let store = CqlInboxStore::open(&location).await.unwrap();
        let sender = DeviceAddress::new(unique_id("sender"), 1);
        let recipient_user = unique_id("bob");
        let accepted = record(&sender, &recipient_user, 1);
        let message_id = accepted.message_id;
        assert_eq!(
            store.accept(accepted.clone()).await.unwrap(),
            AcceptOutcome::Stored
        );
        let driver = store.session().driver();
        let count_statement = driver
            .prepare("SELECT COUNT(*) FROM inbox WHERE user_id = ? AND device_id = ?")
            .await
            .unwrap();
        assert_eq!(
            count_rows(driver, &count_statement, &recipient_user).await,
            1,
            "the accepted message is a row"
        );
        let device = DeviceAddress::new(recipient_user.clone(), 1);
        store.mark_delivered(&device, &[message_id]).await.unwrap();
        store.remove(&device, &[message_id]).await.unwrap();
        assert_eq!(
            count_rows(driver, &count_statement, &recipient_user).await,
            0,
            "the removed message has no row"
        );
        assert!(!store.contains(&device, message_id).await.unwrap());
        // Marking a removed message delivered again must not resurrect it.
        store.mark_delivered(&device, &[message_id]).await.unwrap();
        assert_eq!(
            count_rows(driver, &count_statement, &recipient_user).await,
            0
        );
        let resend = AcceptRecord {
            message_id: unique_message_id(),
            ..accepted
        };
        assert!(matches!(
            store.accept(resend).await.unwrap(),
            AcceptOutcome::Duplicate { message_id: id, .. } if id == message_id
        ));
        assert_eq!(
            count_rows(driver, &count_statement, &recipient_user).await,
            0,
            "a resend of a read message stores nothing"
        );
    });
}

/// An accept that died between its claim and its inbox write (the claim is there, the
/// message is not) is finished by the resend, in its place in the batch: the original id
/// with the claimed payload, visible before the batch's later messages.
#[test]
#[ignore = "needs a CQL engine: scripts/cassandra.sh start, then BLUETICK_TEST_CQL_URL=… cargo test -p bluetick-store --test cql -- --ignored"]
fn interrupted_accept_is_finished_in_order_by_the_resend() {
    RUNTIME.block_on(async {
        let location = CqlLocation::parse(&test_url()).unwrap();
        let store = CqlInboxStore::open(&location).await.unwrap();
        let sender = DeviceAddress::new(unique_id("sender"), 1);
        let recipient_user = unique_id("bob");
        let device = DeviceAddress::new(recipient_user.clone(), 1);
        let interrupted = record(&sender, &recipient_user, 1);
        // What the first attempt left behind: its claim alone (claims are only written
        // with LWT).
        let driver = store.session().driver();
        let claim = driver
            .prepare(
                "INSERT INTO accept_claims (sender_user_id, sender_device_id, client_msg_id, \
                 message_id, recipient_user_id, sent_at_ms, expires_at_ms, envelopes) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS USING TTL 3600",
            )
            .await
            .unwrap();
        let envelopes: std::collections::HashMap<i32, Vec<u8>> = interrupted
            .envelopes
            .iter()
            .map(|(device_id, payload)| (*device_id as i32, payload.to_vec()))
            .collect();
        driver
            .execute_unpaged(
                &claim,
                (
                    sender.user_id.as_str(),
                    1i32,
                    interrupted.client_msg_id.as_str(),
                    (interrupted.message_id ^ (1 << 63)) as i64,
                    recipient_user.as_str(),
                    interrupted.sent_at_ms as i64,
                    interrupted.expires_at_ms as i64,
                    envelopes,
                ),
            )
            .await
            .unwrap();
        assert!(
            store
                .pending(&device, 0, 10, now_ms())
                .await
                .unwrap()
                .is_empty(),
            "the interrupted message is not in the inbox"
        );

        // The resend (a new id from messaging) in a batch with the sender's next message.
        let resend = AcceptRecord {
            message_id: unique_message_id(),
            envelopes: vec![(1, Bytes::from_static(b"resent payload, not stored"))],
            ..interrupted.clone()
        };
        let next = record(&sender, &recipient_user, 2);
        let outcomes = store.accept_batch(vec![resend, next.clone()]).await;
        assert_eq!(outcomes.len(), 2);
        assert_eq!(
            outcomes[0].as_ref().unwrap(),
            &AcceptOutcome::Duplicate {
                message_id: interrupted.message_id,
                sent_at_ms: interrupted.sent_at_ms
            }
        );
        assert_eq!(outcomes[1].as_ref().unwrap(), &AcceptOutcome::Stored);
        let pending = store.pending(&device, 0, 10, now_ms()).await.unwrap();
        let read: Vec<(u64, Bytes)> = pending
            .into_iter()
            .map(|message| (message.message_id, message.payload))
            .collect();
        assert_eq!(
            read,
            vec![
                (interrupted.message_id, interrupted.envelopes[0].1.clone()),
                (next.message_id, next.envelopes[0].1.clone()),
            ],
            "the original is finished with its own id and payload, before the next message"
        );
    });
}

/// A registration interrupted between its user row and its device rows (the process died,
/// or the caller's deadline cancelled it) is finished by a repeat with the same token; any
/// other token still finds the name taken.
#[test]
#[ignore = "needs a CQL engine: scripts/cassandra.sh start, then BLUETICK_TEST_CQL_URL=… cargo test -p bluetick-store --test cql -- --ignored"]
fn interrupted_registration_is_finished_by_its_repeat() {
    RUNTIME.block_on(async {
        let location = CqlLocation::parse(&test_url()).unwrap();
        let inbox = CqlInboxStore::open(&location).await.unwrap();
        let accounts = bluetick_store::open_account_store(&test_url())
            .await
            .unwrap();
        let user_id = unique_id("carol");
        let token = conformance::token_hash("carol");
        // What the interrupted registration left: the user row of its lightweight
        // transaction, no devices.
        let driver = inbox.session().driver();
        let create = driver
            .prepare(
                "INSERT INTO users (user_id, display_name, created_at_ms, device_count, \
                 registration_token_hash) VALUES (?, 'Carol', 1000, 1, ?) IF NOT EXISTS",
            )
            .await
            .unwrap();
        driver
            .execute_unpaged(&create, (user_id.as_str(), token.to_vec()))
            .await
            .unwrap();
        assert_eq!(accounts.authenticate(token).await.unwrap(), None);

        let other = accounts
            .create_user(&user_id, "Mallory", 2_000, conformance::token_hash("other"))
            .await;
        assert!(
            matches!(other, Err(bluetick_store::StoreError::AlreadyExists(_))),
            "another token finds the name taken: {other:?}"
        );
        accounts
            .create_user(&user_id, "Carol", 3_000, token)
            .await
            .expect("the repeat finishes the registration");
        assert_eq!(
            accounts.authenticate(token).await.unwrap(),
            Some(DeviceAddress::new(user_id.clone(), 1))
        );
        let user = accounts.get_user(&user_id).await.unwrap().unwrap();
        assert_eq!((user.created_at_ms, user.device_ids), (1_000, vec![1]));
    });
}

/// The schema set-up survives a start that died after adding a column but before recording
/// the version: the next start finds the column and records the version.
#[test]
#[ignore = "needs a CQL engine: scripts/cassandra.sh start, then BLUETICK_TEST_CQL_URL=… cargo test -p bluetick-store --test cql -- --ignored"]
fn schema_setup_is_repeatable_after_a_partial_upgrade() {
    RUNTIME.block_on(async {
        let location = CqlLocation::parse(&test_url()).unwrap();
        let inbox = CqlInboxStore::open(&location).await.unwrap();
        let driver = inbox.session().driver();
        driver
            .query_unpaged(
                "DELETE FROM schema_version WHERE component = 'bluetick-store' AND version = 2",
                (),
            )
            .await
            .unwrap();
        // A fresh, unshared session applies version 2 again.
        bluetick_store::cql::CqlSession::connect(location.clone())
            .await
            .expect("version 2 applies over its own column");
        let versions = driver
            .query_unpaged(
                "SELECT version FROM schema_version WHERE component = 'bluetick-store'",
                (),
            )
            .await
            .unwrap()
            .into_rows_result()
            .unwrap()
            .rows::<(i32,)>()
            .unwrap()
            .map(|row| row.unwrap().0)
            .collect::<Vec<_>>();
        assert!(
            versions.contains(&2),
            "version 2 recorded again: {versions:?}"
        );
    });
}

/// A node that has not yet received a schema change (another process just made it) refuses
/// statements on the new column as invalid: opening a store waits for the column instead of
/// failing. Simulated on one node by dropping the column and adding it back two seconds
/// later, in a keyspace of this test's own (dropped at the end).
#[test]
#[ignore = "needs a CQL engine: scripts/cassandra.sh start, then BLUETICK_TEST_CQL_URL=… cargo test -p bluetick-store --test cql -- --ignored"]
fn a_store_opened_before_a_schema_change_arrives_waits_for_it() {
    RUNTIME.block_on(async {
        let url = test_url();
        let (address, options) = url
            .split_once('?')
            .map_or((url.as_str(), None), |(a, o)| (a, Some(o)));
        let (base, _) = address.rsplit_once('/').unwrap();
        let keyspace = format!("bluetick_test_arrival_{}", now_ms());
        let own_url = match options {
            Some(options) => format!("{base}/{keyspace}?{options}"),
            None => format!("{base}/{keyspace}"),
        };
        let location = CqlLocation::parse(&own_url).unwrap();
        let inbox = CqlInboxStore::open(&location).await.unwrap();
        let session = inbox.session().clone();
        session
            .driver()
            .query_unpaged("ALTER TABLE users DROP registration_token_hash", ())
            .await
            .unwrap();
        let adder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            session
                .driver()
                .query_unpaged("ALTER TABLE users ADD registration_token_hash blob", ())
                .await
                .unwrap();
        });
        // Same URL: the same session, schema already recorded; only the statements are new.
        let started = Instant::now();
        let accounts = bluetick_store::cql::CqlAccountStore::open(&location).await;
        adder.await.unwrap();
        assert!(
            accounts.is_ok(),
            "the store opened once the column arrived: {:?}",
            accounts.err()
        );
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "the store did not open before the column existed"
        );
        drop(accounts);
        inbox
            .session()
            .driver()
            .query_unpaged(format!("DROP KEYSPACE {keyspace}"), ())
            .await
            .unwrap();
    });
}

/// Once read messages are behind the device's floor, `pending` starts above them: the
/// floor row moves past everything delivered, and later messages are still pending.
#[test]
#[ignore = "needs a CQL engine: scripts/cassandra.sh start, then BLUETICK_TEST_CQL_URL=… cargo test -p bluetick-store --test cql -- --ignored"]
fn inbox_floor_moves_past_read_messages() {
    RUNTIME.block_on(async {
        // No grace, so that rows written just now may be passed.
        let location = CqlLocation::parse(&url_with("inbox_floor_grace_ms=0")).unwrap();
        let store = CqlInboxStore::open(&location).await.unwrap();
        let sender = DeviceAddress::new(unique_id("sender"), 1);
        let recipient_user = unique_id("bob");
        let device = DeviceAddress::new(recipient_user.clone(), 1);
        let mut ids = Vec::new();
        for index in 0..300 {
            let accepted = record(&sender, &recipient_user, index);
            ids.push(accepted.message_id);
            store.accept(accepted).await.unwrap();
        }
        // Deliver everything, then read (remove) all but a few scattered messages.
        store.mark_delivered(&device, &ids).await.unwrap();
        let kept = [ids[10], ids[150]];
        let read: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| !kept.contains(id))
            .collect();
        store.remove(&device, &read).await.unwrap();
        let last = record(&sender, &recipient_user, 1_000);
        let last_id = last.message_id;
        assert_eq!(store.accept(last).await.unwrap(), AcceptOutcome::Stored);
        tokio::time::sleep(Duration::from_millis(5)).await;

        let pending = store.pending(&device, 0, 10, now_ms()).await.unwrap();
        assert_eq!(pending.len(), 1, "only the undelivered message is pending");
        let driver = store.session().driver();
        let read_floor = driver
            .prepare("SELECT floor FROM inbox_floor WHERE user_id = ? AND device_id = ?")
            .await
            .unwrap();
        let (floor,) = driver
            .execute_unpaged(&read_floor, (recipient_user.as_str(), 1i32))
            .await
            .unwrap()
            .into_rows_result()
            .unwrap()
            .single_row::<(i64,)>()
            .unwrap();
        let floor = (floor as u64) ^ (1 << 63);
        assert_eq!(
            floor,
            last_id - 1,
            "the floor passed every delivered and removed message, up to the pending one"
        );
        // Delivered but unread messages below the floor are still stored.
        assert!(store.contains(&device, kept[0]).await.unwrap());
        assert!(store.contains(&device, kept[1]).await.unwrap());
        // A message accepted later is above the floor, so it is pending.
        store
            .accept(record(&sender, &recipient_user, 2_000))
            .await
            .unwrap();
        assert_eq!(
            store.pending(&device, 0, 10, now_ms()).await.unwrap().len(),
            2
        );
    });
}

async fn count_rows(
    driver: &scylla::client::session::Session,
    statement: &scylla::statement::prepared::PreparedStatement,
    user_id: &str,
) -> i64 {
    driver
        .execute_unpaged(statement, (user_id, 1i32))
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .single_row::<(i64,)>()
        .unwrap()
        .0
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    println!(
        "{name:<18} n={:<4} p50={:>8.2?} p99={:>8.2?} max={:>8.2?}",
        samples.len(),
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        samples[samples.len() - 1],
    );
}

/// Prints p50/p99 latency of sequential store operations (`--nocapture` to see them).
#[test]
#[ignore = "needs a CQL engine: scripts/cassandra.sh start, then BLUETICK_TEST_CQL_URL=… cargo test -p bluetick-store --test cql -- --ignored"]
fn cql_operation_latencies() {
    const OPERATIONS: usize = 500;
    RUNTIME.block_on(async {
        let url = test_url();
        let inbox = bluetick_store::open_inbox_store(&url).await.unwrap();
        let ticks = bluetick_store::open_tick_store(&url).await.unwrap();
        let presence = bluetick_store::open_presence_store(&url).await.unwrap();
        let sender = DeviceAddress::new(unique_id("sender"), 1);
        let recipient_user = unique_id("bob");
        let device = DeviceAddress::new(recipient_user.clone(), 1);
        // Warm up connections and the engine's caches.
        for index in 0..20 {
            inbox
                .accept(record(&sender, &recipient_user, 100_000 + index))
                .await
                .unwrap();
        }
        let mut accept = Vec::new();
        let mut duplicate = Vec::new();
        let mut pending = Vec::new();
        let mut delivered = Vec::new();
        let mut remove = Vec::new();
        let mut record_sent = Vec::new();
        let mut acknowledge = Vec::new();
        let mut last_seen = Vec::new();
        let mut ids = Vec::new();
        for index in 0..OPERATIONS {
            let accepted = record(&sender, &recipient_user, index);
            let message_id = accepted.message_id;
            ids.push(message_id);
            let started = Instant::now();
            assert_eq!(
                inbox.accept(accepted.clone()).await.unwrap(),
                AcceptOutcome::Stored
            );
            accept.push(started.elapsed());

            if index % 5 == 0 {
                let started = Instant::now();
                let resend = AcceptRecord {
                    message_id: unique_message_id(),
                    ..accepted.clone()
                };
                inbox.accept(resend).await.unwrap();
                duplicate.push(started.elapsed());
            }

            let started = Instant::now();
            ticks
                .record_sent(SentRecord {
                    message_id,
                    sender: sender.clone(),
                    recipient_user_id: recipient_user.clone(),
                    recipient_device_ids: vec![1],
                    sent_at_ms: accepted.sent_at_ms,
                    expires_at_ms: accepted.expires_at_ms,
                })
                .await
                .unwrap();
            record_sent.push(started.elapsed());

            let started = Instant::now();
            let page = inbox.pending(&device, 0, 10, now_ms()).await.unwrap();
            pending.push(started.elapsed());
            assert!(!page.is_empty());

            let started = Instant::now();
            inbox.mark_delivered(&device, &[message_id]).await.unwrap();
            delivered.push(started.elapsed());

            let started = Instant::now();
            let outcomes = ticks
                .acknowledge(
                    &device,
                    TickStatus::Delivered,
                    vec![(message_id, index as u64 + 1)],
                    now_ms(),
                )
                .await
                .unwrap();
            acknowledge.push(started.elapsed());
            assert_eq!(outcomes.len(), 1);

            let started = Instant::now();
            inbox.remove(&device, &[message_id]).await.unwrap();
            remove.push(started.elapsed());

            let started = Instant::now();
            presence
                .record_last_seen(vec![(recipient_user.clone(), now_ms())])
                .await
                .unwrap();
            last_seen.push(started.elapsed());
        }
        // What the SDK sends after a backlog: acknowledgements of 256 ids at a time.
        let mut batch_acks = Vec::new();
        for (batch, chunk) in ids.chunks(256).enumerate() {
            let acks = chunk
                .iter()
                .enumerate()
                .map(|(offset, id)| (*id, (OPERATIONS + batch * 256 + offset) as u64 + 1))
                .collect::<Vec<_>>();
            let started = Instant::now();
            let outcomes = ticks
                .acknowledge(&device, TickStatus::Read, acks, now_ms())
                .await
                .unwrap();
            batch_acks.push(started.elapsed());
            assert!(
                outcomes
                    .iter()
                    .all(|outcome| matches!(outcome, AckOutcome::Advanced(_)))
            );
        }
        println!("CQL store latencies, {OPERATIONS} sequential calls each ({url}):");
        report("accept", accept);
        report("accept duplicate", duplicate);
        report("record_sent", record_sent);
        report("pending", pending);
        report("mark_delivered", delivered);
        report("acknowledge", acknowledge);
        report("remove", remove);
        report("record_last_seen", last_seen);
        report("acknowledge 256 ids", batch_acks);
    });
}

/// Run with `--ignored` but no engine URL, the CQL tests fail instead of passing.
#[test]
#[ignore = "needs a CQL engine: scripts/cassandra.sh start, then BLUETICK_TEST_CQL_URL=… cargo test -p bluetick-store --test cql -- --ignored"]
fn engine_url_is_set() {
    let url = test_url();
    assert!(
        CqlLocation::parse(&url).is_ok(),
        "BLUETICK_TEST_CQL_URL={url} is not a cql store url"
    );
}
