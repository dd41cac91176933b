//! What one small write transaction costs in each embedded engine, by durability: the floor
//! under the embedded store's per-message cost when messages arrive one at a time
//! (`make bench`'s paced scenario), where the group committer has nothing to group.
//! BENCHMARKS.md quotes it.
//!
//! ```text
//! cargo run --release -p bluetick-store --example commit_cost -- [COMMITS] [DIR]
//! ```
//!
//! Each transaction reads one key and inserts one row into each of three tables (as an
//! accept does) over 100,000 existing rows. redb modes: `redb` (an fsync per commit, what
//! accounts and presence pay), `redb-none` (no fsync; a durable commit every 100), and
//! `redb-none+log` (`redb-none` plus a 300-byte append and `fdatasync` of a separate,
//! preallocated log per commit: a write-ahead log in front of non-durable commits). fjall
//! modes, what the inbox and ticks pay: `fjall` (journal append and `fdatasync` per commit)
//! and `fjall-none` (no `fdatasync`; one every 100). Prints the process CPU time (user +
//! system, from `/proc/self/stat`) and the wall time per commit.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fjall::{KeyspaceCreateOptions, PersistMode, Readable, SingleWriterTxDatabase};
use redb::{Database, Durability, ReadableTable, TableDefinition};

const TABLES: [TableDefinition<'static, &[u8], &[u8]>; 3] = [
    TableDefinition::new("rows"),
    TableDefinition::new("claims"),
    TableDefinition::new("expiry"),
];

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may hold spaces) start at field 3.
    let after_name = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn row_key(id: u64) -> String {
    format!("user{:06}/1/{id:016}", id % 200)
}

fn insert_row(transaction: &redb::WriteTransaction, id: u64) {
    let key = row_key(id);
    for (table, value) in TABLES
        .iter()
        .zip([&[7u8; 200][..], &[1u8; 40][..], &[][..]])
    {
        let mut table = transaction.open_table(*table).unwrap();
        table.insert(key.as_bytes(), value).unwrap();
    }
}

fn report(mode: &str, commits: u64, cpu: f64, wall: f64) {
    println!(
        "{mode:>13}: {commits} commits, {:6.1} us CPU and {:6.1} us wall per commit",
        cpu * 1e6 / commits as f64,
        wall * 1e6 / commits as f64
    );
}

fn run_fjall(dir: &Path, mode: &str, commits: u64) {
    let path = dir.join("commit-cost-fjall");
    let _ = std::fs::remove_dir_all(&path);
    let database = SingleWriterTxDatabase::builder(&path).open().unwrap();
    let keyspaces: Vec<_> = ["rows", "claims", "expiry"]
        .into_iter()
        .map(|name| {
            database
                .keyspace(name, KeyspaceCreateOptions::default)
                .unwrap()
        })
        .collect();
    let insert = |transaction: &mut fjall::SingleWriterWriteTx<'_>, id: u64| {
        let key = row_key(id);
        for (keyspace, value) in keyspaces
            .iter()
            .zip([&[7u8; 200][..], &[1u8; 40][..], &[][..]])
        {
            transaction.insert(keyspace, key.as_bytes(), value);
        }
    };
    let mut preload = database.write_tx();
    for id in 0..100_000 {
        insert(&mut preload, id);
    }
    preload.commit().unwrap();
    database.persist(PersistMode::SyncData).unwrap();

    let (cpu_before, started) = (cpu_seconds(), Instant::now());
    for index in 0..commits {
        let durable = mode == "fjall" || index % 100 == 99;
        let mut transaction = database
            .write_tx()
            .durability(durable.then_some(PersistMode::SyncData));
        let id = 1_000_000 + index;
        assert!(
            transaction
                .get(&keyspaces[1], row_key(id).as_bytes())
                .unwrap()
                .is_none()
        );
        insert(&mut transaction, id);
        transaction.commit().unwrap();
    }
    report(
        mode,
        commits,
        cpu_seconds() - cpu_before,
        started.elapsed().as_secs_f64(),
    );
    drop(keyspaces);
    drop(database);
    let _ = std::fs::remove_dir_all(&path);
}

fn run(dir: &Path, mode: &str, commits: u64) {
    let path = dir.join(format!("commit-cost-{}.redb", mode.replace('+', "-")));
    let _ = std::fs::remove_file(&path);
    let database = Database::create(&path).unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(dir.join("commit-cost.log"))
        .unwrap();
    // Written out once, so that appends change no file size or extent (no metadata to sync).
    log.write_all_at(&vec![0u8; 64 << 20], 0).unwrap();
    log.sync_all().unwrap();
    let preload = database.begin_write().unwrap();
    for id in 0..100_000 {
        insert_row(&preload, id);
    }
    preload.commit().unwrap();

    let (cpu_before, started) = (cpu_seconds(), Instant::now());
    let mut log_offset = 0u64;
    for index in 0..commits {
        let mut transaction = database.begin_write().unwrap();
        let durable = mode == "redb" || index % 100 == 99;
        transaction
            .set_durability(if durable {
                Durability::Immediate
            } else {
                Durability::None
            })
            .unwrap();
        let id = 1_000_000 + index;
        let claims = transaction.open_table(TABLES[1]).unwrap();
        assert!(claims.get(row_key(id).as_bytes()).unwrap().is_none());
        drop(claims);
        insert_row(&transaction, id);
        transaction.commit().unwrap();
        if mode == "redb-none+log" {
            log.write_all_at(&[9u8; 300], log_offset % (64 << 20))
                .unwrap();
            log_offset += 300;
            log.sync_data().unwrap();
        }
    }
    report(
        mode,
        commits,
        cpu_seconds() - cpu_before,
        started.elapsed().as_secs_f64(),
    );
    drop(database);
    let _ = std::fs::remove_file(&path);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let commits: u64 = args
        .next()
        .map_or(10_000, |count| count.parse().expect("COMMITS"));
    let dir = args.next().map_or_else(std::env::temp_dir, PathBuf::from);
    for mode in ["redb", "redb-none", "redb-none+log"] {
        run(&dir, mode, commits);
    }
    for mode in ["fjall", "fjall-none"] {
        run_fjall(&dir, mode, commits);
    }
    let _ = std::fs::remove_file(dir.join("commit-cost.log"));
}
