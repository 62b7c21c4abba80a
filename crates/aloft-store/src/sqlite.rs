//! The SQLite backend: one database file in WAL mode with `synchronous=FULL`, so a
//! write is acknowledged only after its WAL frame is fsynced (it survives a process
//! kill and a power loss). Every change gets its own revision and is appended to a
//! change log that watchers read from; the log is compacted to its newest
//! [`CHANGE_LOG_KEEP`] entries.
//!
//! SQLite calls are blocking and run on tokio's blocking pool, never on the async
//! workers. A background task expires leases; it ends when the store is dropped.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::{mpsc, watch};

use crate::{
    Change, Entry, Expect, LeaseId, Listing, Op, Result, Revision, Store, StoreError, Watch,
    validate_key,
};

/// How many changes the log keeps for watchers that resume.
pub const CHANGE_LOG_KEEP: u64 = 100_000;
/// How often leases are checked for expiry.
const LEASE_TICK: Duration = Duration::from_millis(100);
/// Changes a watcher reads per query.
const WATCH_PAGE: i64 = 512;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    revision INTEGER NOT NULL,
    lease INTEGER
);
CREATE INDEX IF NOT EXISTS kv_lease ON kv(lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    value BLOB
);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta(name, value) VALUES ('revision', 0), ('compacted', 0), ('schema', 1);
";

/// The SQLite-backed [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    head: watch::Sender<Revision>,
}

impl SqliteStore {
    /// Open (creating if needed) the store at `path`. Must be called inside a tokio
    /// runtime: it starts the lease-expiry task.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let p = path.clone();
        let (writer, reader, revision) = tokio::task::spawn_blocking(move || {
            let db = |e| StoreError::Database {
                path: p.display().to_string(),
                source: e,
            };
            let writer = open_connection(&p).map_err(db)?;
            writer.execute_batch(SCHEMA).map_err(db)?;
            let revision = read_meta(&writer, "revision").map_err(db)?;
            let reader = open_connection(&p).map_err(db)?;
            Ok::<_, StoreError>((writer, reader, revision))
        })
        .await
        .map_err(|_| StoreError::Closed)??;
        let (head, _) = watch::channel(revision);
        let inner = Arc::new(Inner {
            path,
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            head,
        });
        tokio::spawn(lease_expiry(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Run `f` with the writer connection inside one transaction, on the blocking pool.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.write(f))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.read(f))
            .await
            .map_err(|_| StoreError::Closed)?
    }
}

impl Inner {
    fn db_err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Database {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.writer.lock().map_err(|_| StoreError::Closed)?;
        let tx = conn.transaction().map_err(|e| self.db_err(e))?;
        let out = f(&tx)?;
        let revision = read_meta(&tx, "revision").map_err(|e| self.db_err(e))?;
        tx.commit().map_err(|e| self.db_err(e))?;
        drop(conn);
        // Publish only after the commit is durable.
        self.head.send_if_modified(|head| {
            let changed = *head != revision;
            *head = revision;
            changed
        });
        Ok(out)
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = self.reader.lock().map_err(|_| StoreError::Closed)?;
        f(&conn).map_err(|e| self.db_err(e))
    }
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

fn read_meta(conn: &Connection, name: &str) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT value FROM meta WHERE name = ?1")?
        .query_row([name], |r| r.get::<_, i64>(0))
        .map(|v| v as u64)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The half-open key range `[prefix, upper)` covering every key with `prefix`.
fn prefix_range(prefix: &str) -> (String, String) {
    // U+10FFFF encodes as F4 8F BF BF, the largest UTF-8 sequence: appending it twice
    // bounds every string that starts with `prefix` under bytewise comparison.
    (prefix.to_string(), format!("{prefix}\u{10FFFF}\u{10FFFF}"))
}

/// Record one change: bump the revision, append to the log. Returns the revision.
fn record_change(tx: &Transaction<'_>, key: &str, value: Option<&[u8]>) -> rusqlite::Result<u64> {
    let revision = read_meta(tx, "revision")? + 1;
    tx.prepare_cached("UPDATE meta SET value = ?1 WHERE name = 'revision'")?
        .execute([revision as i64])?;
    tx.prepare_cached("INSERT INTO changes(revision, key, value) VALUES (?1, ?2, ?3)")?
        .execute(params![revision as i64, key, value])?;
    Ok(revision)
}

fn current_revision(tx: &Transaction<'_>, key: &str) -> rusqlite::Result<u64> {
    Ok(tx
        .prepare_cached("SELECT revision FROM kv WHERE key = ?1")?
        .query_row([key], |r| r.get::<_, i64>(0))
        .optional()?
        .map(|r| r as u64)
        .unwrap_or(0))
}

fn check_expect(key: &str, expect: Expect, actual: u64) -> Result<()> {
    let ok = match expect {
        Expect::Any => true,
        Expect::Absent => actual == 0,
        Expect::Revision(r) => actual == r && r != 0,
    };
    if ok {
        Ok(())
    } else {
        Err(StoreError::Conflict {
            key: key.to_string(),
            expected: expect,
            actual,
        })
    }
}

fn apply_ops(
    tx: &Transaction<'_>,
    ops: &[Op],
    db: impl Fn(rusqlite::Error) -> StoreError,
) -> Result<()> {
    for op in ops {
        let key = op.key();
        let actual = current_revision(tx, key).map_err(&db)?;
        match op {
            Op::Put {
                value,
                expect,
                lease,
                ..
            } => {
                check_expect(key, *expect, actual)?;
                if let Some(lease) = lease {
                    let exists: Option<i64> = tx
                        .query_row(
                            "SELECT id FROM leases WHERE id = ?1",
                            [*lease as i64],
                            |r| r.get(0),
                        )
                        .optional()
                        .map_err(&db)?;
                    if exists.is_none() {
                        return Err(StoreError::LeaseNotFound(*lease));
                    }
                }
                let revision = record_change(tx, key, Some(value)).map_err(&db)?;
                tx.prepare_cached(
                    "INSERT INTO kv(key, value, revision, lease) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value,
                        revision = excluded.revision, lease = excluded.lease",
                )
                .and_then(|mut stmt| {
                    stmt.execute(params![
                        key,
                        value,
                        revision as i64,
                        lease.map(|l| l as i64)
                    ])
                })
                .map_err(&db)?;
            }
            Op::Delete { expect, .. } => {
                check_expect(key, *expect, actual)?;
                if actual != 0 {
                    record_change(tx, key, None).map_err(&db)?;
                    tx.execute("DELETE FROM kv WHERE key = ?1", [key])
                        .map_err(&db)?;
                }
            }
        }
    }
    Ok(())
}

/// Delete a lease and its keys, recording a delete change per key.
fn drop_lease(tx: &Transaction<'_>, lease: LeaseId) -> rusqlite::Result<()> {
    let keys: Vec<String> = {
        let mut stmt = tx.prepare("SELECT key FROM kv WHERE lease = ?1 ORDER BY key")?;
        let rows = stmt.query_map([lease as i64], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for key in keys {
        record_change(tx, &key, None)?;
        tx.execute("DELETE FROM kv WHERE key = ?1", [&key])?;
    }
    tx.execute("DELETE FROM leases WHERE id = ?1", [lease as i64])?;
    Ok(())
}

/// Expire lapsed leases and compact the change log, until the store is dropped.
async fn lease_expiry(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(LEASE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tick.tick().await;
        ticks += 1;
        let Some(inner) = inner.upgrade() else { return };
        let compact = ticks.is_multiple_of(100);
        let result = tokio::task::spawn_blocking(move || {
            inner.write(|tx| {
                let db = |e| StoreError::Database {
                    path: String::new(),
                    source: e,
                };
                let lapsed: Vec<i64> = {
                    let mut stmt = tx
                        .prepare("SELECT id FROM leases WHERE expires_at_ms <= ?1")
                        .map_err(db)?;
                    let rows = stmt.query_map([now_ms()], |r| r.get(0)).map_err(db)?;
                    rows.collect::<rusqlite::Result<_>>().map_err(db)?
                };
                for lease in lapsed {
                    drop_lease(tx, lease as u64).map_err(db)?;
                }
                if compact {
                    let revision = read_meta(tx, "revision").map_err(db)?;
                    let floor = revision.saturating_sub(CHANGE_LOG_KEEP);
                    if floor > read_meta(tx, "compacted").map_err(db)? {
                        tx.execute("DELETE FROM changes WHERE revision <= ?1", [floor as i64])
                            .map_err(db)?;
                        tx.execute(
                            "UPDATE meta SET value = ?1 WHERE name = 'compacted'",
                            [floor as i64],
                        )
                        .map_err(db)?;
                    }
                }
                Ok(())
            })
        })
        .await;
        if let Ok(Err(err)) = result {
            tracing::warn!(%err, "lease expiry pass failed");
        }
    }
}

fn row_to_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    Ok(Entry {
        key: r.get(0)?,
        value: r.get(1)?,
        revision: r.get::<_, i64>(2)? as u64,
        lease: r.get::<_, Option<i64>>(3)?.map(|l| l as u64),
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(&self, key: &str) -> Result<Option<Entry>> {
        validate_key(key)?;
        let key = key.to_string();
        self.read(move |c| {
            c.query_row(
                "SELECT key, value, revision, lease FROM kv WHERE key = ?1",
                [&key],
                row_to_entry,
            )
            .optional()
        })
        .await
    }

    async fn apply(&self, ops: Vec<Op>) -> Result<Revision> {
        for op in &ops {
            validate_key(op.key())?;
        }
        let path = self.inner.path.display().to_string();
        self.write(move |tx| {
            apply_ops(tx, &ops, |e| StoreError::Database {
                path: path.clone(),
                source: e,
            })?;
            read_meta(tx, "revision").map_err(|e| StoreError::Database {
                path: path.clone(),
                source: e,
            })
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        let (lo, hi) = prefix_range(prefix);
        self.read(move |c| {
            // One read transaction so the entries and the revision agree.
            c.execute_batch("BEGIN")?;
            let result = (|| {
                let mut stmt = c.prepare_cached(
                    "SELECT key, value, revision, lease FROM kv
                     WHERE key >= ?1 AND key < ?2 ORDER BY key",
                )?;
                let entries = stmt
                    .query_map([&lo, &hi], row_to_entry)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let revision = read_meta(c, "revision")?;
                Ok(Listing { entries, revision })
            })();
            c.execute_batch("COMMIT")?;
            result
        })
        .await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch> {
        let compacted = self.read(|c| read_meta(c, "compacted")).await?;
        if after < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                oldest: compacted + 1,
            });
        }
        let (tx, rx) = mpsc::channel(1024);
        let inner = Arc::downgrade(&self.inner);
        let head = self.inner.head.subscribe();
        tokio::spawn(follow(inner, head, prefix.to_string(), after, tx));
        Ok(Watch::new(rx))
    }

    async fn revision(&self) -> Result<Revision> {
        Ok(*self.inner.head.borrow())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl_ms = ttl.as_millis() as i64;
        let path = self.inner.path.display().to_string();
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO leases(ttl_ms, expires_at_ms) VALUES (?1, ?2)",
                params![ttl_ms, now_ms() + ttl_ms],
            )
            .map_err(|e| StoreError::Database { path, source: e })?;
            Ok(tx.last_insert_rowid() as u64)
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let path = self.inner.path.display().to_string();
        self.write(move |tx| {
            let n = tx
                .execute(
                    "UPDATE leases SET expires_at_ms = ?1 + ttl_ms WHERE id = ?2",
                    params![now_ms(), lease as i64],
                )
                .map_err(|e| StoreError::Database { path, source: e })?;
            if n == 0 {
                return Err(StoreError::LeaseNotFound(lease));
            }
            Ok(())
        })
        .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let path = self.inner.path.display().to_string();
        self.write(move |tx| {
            let db = |e| StoreError::Database {
                path: path.clone(),
                source: e,
            };
            let exists: Option<i64> = tx
                .query_row("SELECT id FROM leases WHERE id = ?1", [lease as i64], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(db)?;
            if exists.is_none() {
                return Err(StoreError::LeaseNotFound(lease));
            }
            drop_lease(tx, lease).map_err(db)
        })
        .await
    }
}

/// Deliver every change under `prefix` after `after`, in order, then follow the head.
async fn follow(
    inner: Weak<Inner>,
    mut head: watch::Receiver<Revision>,
    prefix: String,
    after: Revision,
    tx: mpsc::Sender<Result<Change>>,
) {
    let (lo, hi) = prefix_range(&prefix);
    // `scanned` is the revision up to which the log has been read for this prefix.
    let mut scanned = after;
    loop {
        let target = *head.borrow_and_update();
        while scanned < target {
            let Some(store) = inner.upgrade() else { return };
            let (lo, hi) = (lo.clone(), hi.clone());
            let from = scanned;
            let page = tokio::task::spawn_blocking(move || {
                store.read(|c| {
                    let compacted = read_meta(c, "compacted")?;
                    let mut stmt = c.prepare_cached(
                        "SELECT revision, key, value FROM changes
                         WHERE revision > ?1 AND revision <= ?2 AND key >= ?3 AND key < ?4
                         ORDER BY revision LIMIT ?5",
                    )?;
                    let rows = stmt
                        .query_map(
                            params![from as i64, target as i64, lo, hi, WATCH_PAGE],
                            |r| {
                                Ok(Change {
                                    revision: r.get::<_, i64>(0)? as u64,
                                    key: r.get(1)?,
                                    value: r.get(2)?,
                                })
                            },
                        )?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok((compacted, rows))
                })
            })
            .await;
            let (compacted, rows) = match page {
                Ok(Ok(page)) => page,
                Ok(Err(err)) => {
                    let _ = tx.send(Err(err)).await;
                    return;
                }
                Err(_) => return,
            };
            if from < compacted {
                let _ = tx
                    .send(Err(StoreError::Compacted {
                        requested: from,
                        oldest: compacted + 1,
                    }))
                    .await;
                return;
            }
            let full = rows.len() as i64 == WATCH_PAGE;
            for change in rows {
                scanned = change.revision;
                if tx.send(Ok(change)).await.is_err() {
                    return;
                }
            }
            if !full {
                scanned = target;
            }
        }
        tokio::select! {
            changed = head.changed() => if changed.is_err() { return },
            _ = tx.closed() => return,
        }
    }
}
