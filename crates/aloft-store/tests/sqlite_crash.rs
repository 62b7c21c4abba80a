//! A process killed with SIGKILL mid-write loses no acknowledged write.
//!
//! The test re-executes its own binary as a child writer (selected by an environment
//! variable); the child prints each revision after `put` returns, the parent kills it
//! while it writes, reopens the database and checks every acknowledged key.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aloft_store::{SqliteStore, Store};

const CHILD_ENV: &str = "ALOFT_STORE_CRASH_CHILD_DB";

#[tokio::test]
async fn crash_child_writer() {
    // Only does something when started by `acknowledged_writes_survive_sigkill`.
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = SqliteStore::open(&path).await.unwrap();
    for i in 0u64.. {
        let rev = store
            .put(&format!("acks/{i:08}"), i.to_string().into_bytes())
            .await
            .unwrap();
        // The acknowledgement: printed only after put returned.
        println!("ACK {i} {rev}");
    }
}

#[tokio::test]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("catalog.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut acked: Vec<u64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = BufReader::new(stdout).lines();
    // Let it acknowledge a few hundred writes, then kill it mid-stream.
    while acked.len() < 300 {
        assert!(
            Instant::now() < deadline,
            "child too slow: {} acks",
            acked.len()
        );
        let line = lines.next().expect("child ended early").unwrap();
        if let Some(rest) = line.strip_prefix("ACK ") {
            acked.push(rest.split(' ').next().unwrap().parse().unwrap());
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Acks that were already in the pipe count too.
    for line in lines.map_while(Result::ok) {
        if let Some(Ok(n)) = line
            .strip_prefix("ACK ")
            .and_then(|rest| rest.split(' ').next())
            .map(str::parse::<u64>)
        {
            acked.push(n);
        }
    }
    let store = SqliteStore::open(&db).await.unwrap();
    for i in &acked {
        let e = store
            .get(&format!("acks/{i:08}"))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged write {i} lost"));
        assert_eq!(e.value, i.to_string().into_bytes());
    }
    // Revisions stay consistent after recovery: new writes continue past the old head.
    let head = store.revision().await.unwrap();
    assert!(head as usize >= acked.len());
    assert!(store.put("after", vec![]).await.unwrap() > head);
}
