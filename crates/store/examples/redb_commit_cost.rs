//! What one small redb write transaction costs, by durability: the floor under the embedded
//! store's per-message cost when messages arrive one at a time (`make bench`'s paced
//! scenario), where the group committer has nothing to group. BENCHMARKS.md quotes it.
//!
//! ```text
//! cargo run --release -p bluetick-store --example redb_commit_cost -- [COMMITS] [DIR]
//! ```
//!
//! Each transaction inserts one row into each of three tables (as an accept does) over
//! 100,000 existing rows. Modes: `immediate` (an fsync per commit, what a durable write
//! costs today), `none` (no fsync; a durable commit every 100), and `none+log` (`none`
//! plus a 300-byte append and `fdatasync` of a separate, preallocated log per commit: what
//! a write-ahead log in front of non-durable commits would cost). Prints the process CPU
//! time (user + system, from `/proc/self/stat`) and the wall time per commit.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use redb::{Database, Durability, TableDefinition};

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

fn insert_row(transaction: &redb::WriteTransaction, id: u64) {
    let key = format!("user{:06}/1/{id:016}", id % 200);
    for (table, value) in TABLES
        .iter()
        .zip([&[7u8; 200][..], &[1u8; 40][..], &[][..]])
    {
        let mut table = transaction.open_table(*table).unwrap();
        table.insert(key.as_bytes(), value).unwrap();
    }
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
        let durable = mode == "immediate" || index % 100 == 99;
        transaction
            .set_durability(if durable {
                Durability::Immediate
            } else {
                Durability::None
            })
            .unwrap();
        insert_row(&transaction, 1_000_000 + index);
        transaction.commit().unwrap();
        if mode == "none+log" {
            log.write_all_at(&[9u8; 300], log_offset % (64 << 20))
                .unwrap();
            log_offset += 300;
            log.sync_data().unwrap();
        }
    }
    let cpu = cpu_seconds() - cpu_before;
    let wall = started.elapsed().as_secs_f64();
    println!(
        "{mode:>9}: {commits} commits, {:6.1} us CPU and {:6.1} us wall per commit",
        cpu * 1e6 / commits as f64,
        wall * 1e6 / commits as f64
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
    for mode in ["immediate", "none", "none+log"] {
        run(&dir, mode, commits);
    }
    let _ = std::fs::remove_file(dir.join("commit-cost.log"));
}
