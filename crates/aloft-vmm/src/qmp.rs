//! A QMP client: capabilities negotiation, commands matched to their replies by id, and
//! asynchronous events (SHUTDOWN, POWERDOWN, STOP, RESUME, VSERPORT_CHANGE …) on a
//! broadcast channel.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, broadcast, oneshot};

/// A QMP failure, naming the socket.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP socket {path}: {message}")]
    Protocol { path: PathBuf, message: String },
    #[error("QMP command {command} on {path} failed: {class}: {desc}")]
    Command {
        path: PathBuf,
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP socket {path} closed (QEMU exited)")]
    Closed { path: PathBuf },
    #[error("QMP command {command} on {path} timed out")]
    Timeout { path: PathBuf, command: String },
}

/// One QMP event.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    pub event: String,
    pub data: Value,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>>>;

/// A connected, negotiated QMP session.
pub struct Qmp {
    path: PathBuf,
    writer: Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
}

const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

impl Qmp {
    /// Connects, retrying for up to `wait` (QEMU creates the socket while starting).
    pub async fn connect(path: &Path, wait: Duration) -> Result<Arc<Qmp>, QmpError> {
        let started = tokio::time::Instant::now();
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(source) => {
                    if started.elapsed() >= wait {
                        return Err(QmpError::Connect {
                            path: path.to_path_buf(),
                            source,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let protocol = |message: String| QmpError::Protocol {
            path: path.to_path_buf(),
            message,
        };
        // QEMU serves one QMP client at a time: a second one is accepted by the kernel
        // but never greeted.
        let greeting = tokio::time::timeout(wait.max(Duration::from_secs(2)), lines.next_line())
            .await
            .map_err(|_| protocol("no greeting (is another client connected?)".into()))?
            .map_err(|e| protocol(e.to_string()))?
            .ok_or_else(|| protocol("closed before the greeting".into()))?;
        if !greeting.contains("\"QMP\"") {
            return Err(protocol(format!("unexpected greeting {greeting}")));
        }
        let (events, _) = broadcast::channel(256);
        let qmp = Arc::new(Qmp {
            path: path.to_path_buf(),
            writer: Mutex::new(write),
            pending: Arc::default(),
            next_id: AtomicU64::new(1),
            events: events.clone(),
        });
        let pending = qmp.pending.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let Some(event) = msg.get("event").and_then(Value::as_str) {
                    let _ = events.send(QmpEvent {
                        event: event.to_string(),
                        data: msg.get("data").cloned().unwrap_or(Value::Null),
                    });
                    continue;
                }
                let Some(id) = msg.get("id").and_then(Value::as_u64) else {
                    continue;
                };
                let Some(reply) = pending.lock().await.remove(&id) else {
                    continue;
                };
                let result = match (msg.get("return"), msg.get("error")) {
                    (Some(r), _) => Ok(r.clone()),
                    (None, Some(e)) => Err((
                        e.get("class")
                            .and_then(Value::as_str)
                            .unwrap_or("Error")
                            .to_string(),
                        e.get("desc")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    )),
                    (None, None) => Ok(Value::Null),
                };
                let _ = reply.send(result);
            }
            // QEMU went away: fail everything still waiting.
            pending.lock().await.clear();
        });
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Subscribes to events from now on.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"execute": command, "id": id});
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().await.insert(id, tx);
        let mut line = msg.to_string();
        line.push('\n');
        let closed = || QmpError::Closed {
            path: self.path.clone(),
        };
        self.writer
            .lock()
            .await
            .write_all(line.as_bytes())
            .await
            .map_err(|_| closed())?;
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Err(_) => Err(QmpError::Timeout {
                path: self.path.clone(),
                command: command.to_string(),
            }),
            Ok(Err(_)) => Err(closed()),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                path: self.path.clone(),
                command: command.to_string(),
                class,
                desc,
            }),
        }
    }

    /// `query-status`: "running", "paused", "inmigrate", "postmigrate", "shutdown" …
    pub async fn status(&self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }
}
