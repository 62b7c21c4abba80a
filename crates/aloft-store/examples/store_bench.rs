//! Measures the SQLite store against raw rusqlite with the same pragmas, in one run.
//! Run through `cargo xtask bench store`. Prints a human line and a JSON line per result.

use std::time::{Duration, Instant};

use aloft_store::{Op, SqliteStore, Store};
use rusqlite::{Connection, params};

const SYNC_WRITES: usize = 2_000;
const BATCH: usize = 100;
const BATCHED_WRITES: usize = 50_000;
const WATCH_SAMPLES: usize = 1_000;

fn raw_conn(path: &std::path::Path) -> Connection {
    let c = Connection::open(path).expect("open baseline db");
    c.pragma_update(None, "journal_mode", "WAL").expect("wal");
    c.pragma_update(None, "synchronous", "FULL").expect("sync");
    c.execute_batch("CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
        .expect("schema");
    c
}

fn raw_writes(path: &std::path::Path, total: usize, batch: usize) -> f64 {
    let mut c = raw_conn(path);
    let value = vec![b'x'; 200];
    let start = Instant::now();
    for chunk in 0..total / batch {
        let tx = c.transaction().expect("tx");
        for i in 0..batch {
            tx.execute(
                "INSERT OR REPLACE INTO kv(key, value) VALUES (?1, ?2)",
                params![format!("machines/app/{:08}", chunk * batch + i), value],
            )
            .expect("insert");
        }
        tx.commit().expect("commit");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

async fn store_writes(store: &SqliteStore, total: usize, batch: usize) -> f64 {
    let value = vec![b'x'; 200];
    let start = Instant::now();
    for chunk in 0..total / batch {
        let ops = (0..batch)
            .map(|i| {
                Op::put(
                    format!("machines/app/{:08}", chunk * batch + i),
                    value.clone(),
                )
            })
            .collect();
        store.apply(ops).await.expect("apply");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn report(name: &str, value: f64, unit: &str, baseline: f64, baseline_name: &str) {
    let ratio = value / baseline;
    println!(
        "{name:<28} {value:>12.1} {unit:<6} baseline {baseline_name} {baseline:>12.1}  ratio {ratio:.2}"
    );
    println!(
        "{}",
        serde_json::json!({"bench": "store", "metric": name, "value": value, "unit": unit,
            "baseline": baseline_name, "baseline_value": baseline, "ratio": ratio})
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");

    let raw_sync = raw_writes(&dir.path().join("raw1.db"), SYNC_WRITES, 1);
    let store = SqliteStore::open(dir.path().join("s1.db"))
        .await
        .expect("open");
    let store_sync = store_writes(&store, SYNC_WRITES, 1).await;
    report(
        "writes_per_sec_sync",
        store_sync,
        "ops/s",
        raw_sync,
        "rusqlite_insert_per_txn",
    );

    let raw_batched = raw_writes(&dir.path().join("raw2.db"), BATCHED_WRITES, BATCH);
    let store2 = SqliteStore::open(dir.path().join("s2.db"))
        .await
        .expect("open");
    let store_batched = store_writes(&store2, BATCHED_WRITES, BATCH).await;
    report(
        "writes_per_sec_batched",
        store_batched,
        "ops/s",
        raw_batched,
        "rusqlite_100_per_txn",
    );

    // Watch delivery: time from put acknowledged to the watcher receiving it, against
    // the put's own commit latency measured in the same loop.
    let mut w = store
        .watch("w/", store.revision().await.expect("rev"))
        .await
        .expect("watch");
    let mut delivery = Vec::with_capacity(WATCH_SAMPLES);
    let mut commit = Vec::with_capacity(WATCH_SAMPLES);
    for i in 0..WATCH_SAMPLES {
        let t0 = Instant::now();
        store.put(&format!("w/{i}"), vec![1]).await.expect("put");
        let t1 = Instant::now();
        w.next().await.expect("watch open").expect("change");
        delivery.push(t1.elapsed());
        commit.push(t1 - t0);
    }
    delivery.sort();
    commit.sort();
    let (c50, c99) = (percentile(&commit, 0.5), percentile(&commit, 0.99));
    report(
        "watch_delivery_p50",
        percentile(&delivery, 0.5),
        "us",
        c50,
        "put_commit_p50",
    );
    report(
        "watch_delivery_p99",
        percentile(&delivery, 0.99),
        "us",
        c99,
        "put_commit_p99",
    );
}
