//! The agent's local database (`agent.db`): the source of truth for the machines on
//! this host, their in-flight operations, events, leases, logs, host ports and
//! volumes. SQLite in WAL mode with `synchronous=FULL`, so that a step recorded here
//! survives the agent being killed the instant after.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aloft_types::machine::{Lease, Machine, MachineEvent, Volume, VolumeSnapshot};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// A database failure, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("agent database {path}: {source}")]
pub struct DbError {
    pub path: PathBuf,
    #[source]
    pub source: rusqlite::Error,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS machines (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    machine TEXT NOT NULL,
    extra TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ops (
    machine_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    step INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id TEXT NOT NULL,
    event TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_machine ON events(machine_id, seq);
CREATE TABLE IF NOT EXISTS leases (
    machine_id TEXT PRIMARY KEY,
    lease TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    stream TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_machine ON logs(machine_id, ts);
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    volume TEXT NOT NULL,
    path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    volume_id TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    path TEXT NOT NULL
);
";

/// What the agent keeps about a machine beyond Fly's `Machine` object.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MachineExtra {
    /// Secrets given as env at create/update time.
    #[serde(default)]
    pub secrets: std::collections::BTreeMap<String, String>,
    /// Host ports forwarded to each service `internal_port` (user-mode networking).
    #[serde(default)]
    pub forwards: Vec<(u16, u16)>,
    /// Restarts done by the restart policy since the last user start.
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub cordoned: bool,
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Digest of the image the machine boots.
    #[serde(default)]
    pub image_digest: String,
    /// The stop was asked for by a user (so the exit is not a crash to restart).
    #[serde(default)]
    pub stop_requested: bool,
    /// The app's organisation (private network isolation).
    #[serde(default)]
    pub org: String,
    /// The machine's slot on this host's private network (TAP mode).
    #[serde(default)]
    pub net_slot: Option<u16>,
    /// A restart is under way: its stop half may have finished, its start not yet.
    #[serde(default)]
    pub restart_pending: bool,
}

/// An operation in flight: `kind` (create, start, stop, restart, update, suspend,
/// destroy) and the last step recorded as done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub machine_id: String,
    pub kind: String,
    pub step: u32,
    pub data: String,
}

/// Log retention per machine.
pub const LOG_LINES_KEPT: i64 = 20_000;

pub struct AgentDb {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl AgentDb {
    pub fn open(path: &Path) -> Result<AgentDb, DbError> {
        let err = |source| DbError {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;",
        )
        .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(AgentDb {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, DbError> {
        let conn = match self.conn.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&conn).map_err(|source| DbError {
            path: self.path.clone(),
            source,
        })
    }

    pub fn put_machine(&self, app: &str, m: &Machine, extra: &MachineExtra) -> Result<(), DbError> {
        let mj = to_json(m);
        let ej = to_json(extra);
        self.with(|c| {
            c.execute(
                "INSERT INTO machines(id, app, machine, extra) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET machine = ?3, extra = ?4",
                params![m.id, app, mj, ej],
            )
            .map(|_| ())
        })
    }

    /// The machine, its app and the agent's extra state.
    pub fn get_machine(
        &self,
        id: &str,
    ) -> Result<Option<(String, Machine, MachineExtra)>, DbError> {
        self.with(|c| {
            c.query_row(
                "SELECT app, machine, extra FROM machines WHERE id = ?1",
                params![id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                },
            )
            .optional()
        })
        .map(|o| {
            o.and_then(|(a, m, e)| Some((a, from_json(&m)?, from_json(&e).unwrap_or_default())))
        })
    }

    /// Machines of `app`, or of every app when `None`.
    pub fn list_machines(
        &self,
        app: Option<&str>,
    ) -> Result<Vec<(String, Machine, MachineExtra)>, DbError> {
        let rows: Vec<(String, String, String)> = self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT app, machine, extra FROM machines WHERE (?1 IS NULL OR app = ?1) ORDER BY id",
            )?;
            let rows = st
                .query_map(params![app], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(a, m, e)| Some((a, from_json(&m)?, from_json(&e).unwrap_or_default())))
            .collect())
    }

    pub fn delete_machine(&self, id: &str) -> Result<(), DbError> {
        self.with(|c| {
            c.execute("DELETE FROM machines WHERE id = ?1", params![id])?;
            c.execute("DELETE FROM ops WHERE machine_id = ?1", params![id])?;
            c.execute("DELETE FROM leases WHERE machine_id = ?1", params![id])?;
            c.execute("DELETE FROM logs WHERE machine_id = ?1", params![id])?;
            Ok(())
        })
    }

    pub fn begin_op(&self, machine_id: &str, kind: &str, data: &str) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO ops(machine_id, kind, step, data) VALUES (?1, ?2, 0, ?3)
                 ON CONFLICT(machine_id) DO UPDATE SET kind = ?2, step = 0, data = ?3",
                params![machine_id, kind, data],
            )
            .map(|_| ())
        })
    }

    pub fn op_step(&self, machine_id: &str, step: u32) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE ops SET step = ?2 WHERE machine_id = ?1",
                params![machine_id, step],
            )
            .map(|_| ())
        })
    }

    pub fn end_op(&self, machine_id: &str) -> Result<(), DbError> {
        self.with(|c| {
            c.execute("DELETE FROM ops WHERE machine_id = ?1", params![machine_id])
                .map(|_| ())
        })
    }

    pub fn ops(&self) -> Result<Vec<Op>, DbError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT machine_id, kind, step, data FROM ops")?;
            let rows = st
                .query_map([], |r| {
                    Ok(Op {
                        machine_id: r.get(0)?,
                        kind: r.get(1)?,
                        step: r.get(2)?,
                        data: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    pub fn add_event(&self, machine_id: &str, e: &MachineEvent) -> Result<(), DbError> {
        let ej = to_json(e);
        self.with(|c| {
            c.execute(
                "INSERT INTO events(machine_id, event) VALUES (?1, ?2)",
                params![machine_id, ej],
            )
            .map(|_| ())
        })
    }

    /// Newest first, as Fly lists them.
    pub fn events(&self, machine_id: &str) -> Result<Vec<MachineEvent>, DbError> {
        let rows: Vec<String> = self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT event FROM events WHERE machine_id = ?1 ORDER BY seq DESC LIMIT 200",
            )?;
            let rows = st
                .query_map(params![machine_id], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        Ok(rows.iter().filter_map(|e| from_json(e)).collect())
    }

    pub fn put_lease(&self, machine_id: &str, lease: Option<&Lease>) -> Result<(), DbError> {
        self.with(|c| {
            match lease {
                Some(l) => c.execute(
                    "INSERT INTO leases(machine_id, lease) VALUES (?1, ?2)
                     ON CONFLICT(machine_id) DO UPDATE SET lease = ?2",
                    params![machine_id, to_json(l)],
                )?,
                None => c.execute(
                    "DELETE FROM leases WHERE machine_id = ?1",
                    params![machine_id],
                )?,
            };
            Ok(())
        })
    }

    pub fn lease(&self, machine_id: &str) -> Result<Option<Lease>, DbError> {
        self.with(|c| {
            c.query_row(
                "SELECT lease FROM leases WHERE machine_id = ?1",
                params![machine_id],
                |r| r.get::<_, String>(0),
            )
            .optional()
        })
        .map(|o| o.and_then(|s| from_json(&s)))
    }

    pub fn add_log(
        &self,
        machine_id: &str,
        ts: i64,
        stream: &str,
        message: &str,
    ) -> Result<(), DbError> {
        self.with(|c| {
            c.prepare_cached(
                "INSERT INTO logs(machine_id, ts, stream, message) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![machine_id, ts, stream, message])?;
            Ok(())
        })
    }

    /// Keeps the newest [`LOG_LINES_KEPT`] lines of each machine, and none older than
    /// `oldest_ms`.
    pub fn prune_logs(&self, oldest_ms: i64) -> Result<(), DbError> {
        self.with(|c| {
            c.execute("DELETE FROM logs WHERE ts < ?1", params![oldest_ms])?;
            c.execute(
                "DELETE FROM logs WHERE seq IN (
                   SELECT seq FROM (SELECT seq, ROW_NUMBER() OVER (PARTITION BY machine_id ORDER BY seq DESC) AS n FROM logs)
                   WHERE n > ?1)",
                params![LOG_LINES_KEPT],
            )?;
            Ok(())
        })
    }

    /// Lines of a machine at or after `since_ms`, oldest first.
    pub fn logs(
        &self,
        machine_id: &str,
        since_ms: i64,
    ) -> Result<Vec<(i64, String, String)>, DbError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT ts, stream, message FROM logs WHERE machine_id = ?1 AND ts >= ?2 ORDER BY seq LIMIT 10000",
            )?;
            let rows = st
                .query_map(params![machine_id, since_ms], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    pub fn put_volume(&self, app: &str, v: &Volume, path: &Path) -> Result<(), DbError> {
        let vj = to_json(v);
        let p = path.display().to_string();
        self.with(|c| {
            c.execute(
                "INSERT INTO volumes(id, app, volume, path) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET volume = ?3, path = ?4",
                params![v.id, app, vj, p],
            )
            .map(|_| ())
        })
    }

    pub fn volumes(&self, app: Option<&str>) -> Result<Vec<(String, Volume, PathBuf)>, DbError> {
        let rows: Vec<(String, String, String)> = self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT app, volume, path FROM volumes WHERE (?1 IS NULL OR app = ?1) ORDER BY id",
            )?;
            let rows = st
                .query_map(params![app], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(a, v, p)| Some((a, from_json(&v)?, PathBuf::from(p))))
            .collect())
    }

    pub fn delete_volume(&self, id: &str) -> Result<(), DbError> {
        self.with(|c| {
            c.execute("DELETE FROM volumes WHERE id = ?1", params![id])
                .map(|_| ())
        })
    }
}

impl AgentDb {
    pub fn put_snapshot(
        &self,
        volume_id: &str,
        snap: &VolumeSnapshot,
        path: &Path,
    ) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO snapshots (id, volume_id, snapshot, path) VALUES (?1, ?2, ?3, ?4)",
                params![snap.id, volume_id, to_json(snap), path.display().to_string()],
            )
            .map(drop)
        })
    }

    /// Snapshots of one volume, oldest first.
    pub fn snapshots(&self, volume_id: &str) -> Result<Vec<(VolumeSnapshot, PathBuf)>, DbError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT snapshot, path FROM snapshots WHERE volume_id = ?1 ORDER BY rowid",
            )?;
            let rows = st.query_map(params![volume_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (snap, path) = row?;
                if let Some(snap) = from_json(&snap) {
                    out.push((snap, PathBuf::from(path)));
                }
            }
            Ok(out)
        })
    }

    /// One snapshot by id: (volume id, snapshot, file).
    pub fn snapshot(&self, id: &str) -> Result<Option<(String, VolumeSnapshot, PathBuf)>, DbError> {
        self.with(|c| {
            c.query_row(
                "SELECT volume_id, snapshot, path FROM snapshots WHERE id = ?1",
                params![id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                },
            )
            .optional()
        })
        .map(|row| {
            row.and_then(|(v, snap, path)| Some((v, from_json(&snap)?, PathBuf::from(path))))
        })
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<(), DbError> {
        self.with(|c| {
            c.execute("DELETE FROM snapshots WHERE id = ?1", params![id])
                .map(drop)
        })
    }
}

fn to_json<T: Serialize>(v: &T) -> String {
    // Our own types always serialise.
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn from_json<T: for<'de> Deserialize<'de>>(s: &str) -> Option<T> {
    serde_json::from_str(s).ok()
}

/// Image digests that machines recorded in any agent database under `data_dir`
/// (`agent-*.db`) boot from, so that image garbage collection keeps them.
pub fn images_in_use(data_dir: &Path) -> Result<std::collections::HashSet<String>, DbError> {
    let mut out = std::collections::HashSet::new();
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return Ok(out);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("agent-") && name.ends_with(".db")) {
            continue;
        }
        let db = AgentDb::open(&entry.path())?;
        for (_, m, extra) in db.list_machines(None)? {
            if !extra.image_digest.is_empty() {
                out.insert(extra.image_digest);
            } else if m.config.image.starts_with("sha256:") {
                // A machine not booted yet names its image only by reference.
                out.insert(m.config.image.clone());
            }
        }
    }
    Ok(out)
}
