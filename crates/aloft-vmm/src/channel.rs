//! The host side of the guest channel: length-prefixed JSON frames over the unix socket
//! of the VM's `aloft.ctl` virtio-serial port (a QEMU chardev in server mode).
//!
//! One background task owns the connection. It connects (retrying while the socket is
//! absent or refuses), answers every `Hello` with `HelloAck`, and reconnects after the
//! connection drops, handshaking again. Host messages queued while no connection is
//! acknowledged wait and go out after the next handshake. Guest messages go to every
//! subscriber of [`GuestChannel::events`], and update [`GuestState`]; replies to
//! exec and metadata requests are routed to their callers.
//!
//! The transport is behind [`Transport`] so that vsock can be added next to unix sockets.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aloft_types::guest::{
    FrameDecoder, GuestMessage, HostMessage, PROTOCOL_VERSION, Stream, encode_frame,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// How often a refused or missing socket is retried.
const RETRY_EVERY: Duration = Duration::from_millis(20);
/// How often the host repeats its Hello until the guest handshakes.
const HOST_HELLO_EVERY: Duration = Duration::from_millis(200);
/// Largest stdin payload per frame (well under the frame limit once base64-encoded).
pub const STDIN_CHUNK: usize = 256 * 1024;
/// Capacity of the event broadcast (log lines included).
const EVENT_CAPACITY: usize = 16 * 1024;

/// A way to reach the guest's channel.
pub trait Transport: Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    fn connect(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
    /// What errors name (for a unix socket: its path).
    fn endpoint(&self) -> String;
}

/// The QEMU chardev unix socket.
#[derive(Debug, Clone)]
pub struct UnixTransport(pub PathBuf);

impl Transport for UnixTransport {
    type Stream = tokio::net::UnixStream;

    fn connect(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send {
        tokio::net::UnixStream::connect(self.0.clone())
    }

    fn endpoint(&self) -> String {
        self.0.display().to_string()
    }
}

/// Why a channel operation failed; every variant names the endpoint (socket path).
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("guest channel {endpoint}: no handshake with the guest within {timeout:?}")]
    Handshake { endpoint: String, timeout: Duration },
    #[error("guest channel {endpoint}: no {what} within {timeout:?}")]
    Timeout {
        endpoint: String,
        what: String,
        timeout: Duration,
    },
    #[error("guest channel {endpoint}: the channel task has ended")]
    Closed { endpoint: String },
    #[error("guest channel {endpoint}: exec {id} could not start: {message}")]
    ExecFailed {
        endpoint: String,
        id: u64,
        message: String,
    },
    #[error("guest channel {endpoint}: the app exited before becoming ready ({exit:?})")]
    ExitedBeforeReady { endpoint: String, exit: GuestExit },
}

/// How the app ended, as the guest reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom: bool,
}

/// What the host knows about the guest, updated as messages arrive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestState {
    /// A connection is up and has been handshaken.
    pub connected: bool,
    /// Completed handshakes so far (reconnects included).
    pub handshakes: u64,
    pub protocol_version: Option<u32>,
    /// Kernel uptime when init started.
    pub boot_ms: Option<u64>,
    pub init_started_ms: Option<u64>,
    pub app_pid: Option<i32>,
    pub ready_port: Option<u16>,
    pub exit: Option<GuestExit>,
    /// The last `Error` message the guest sent.
    pub last_error: Option<String>,
}

/// A command to run in the guest.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub cmd: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Written to the command's stdin, then EOF (pipes only).
    pub stdin: Vec<u8>,
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
}

/// The outcome of [`GuestChannel::exec`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecResult {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// What an exec session reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Started {
        pid: i32,
    },
    Output {
        stream: Stream,
        data: Vec<u8>,
    },
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        error: Option<String>,
    },
}

struct Shared {
    endpoint: String,
    out_tx: mpsc::UnboundedSender<HostMessage>,
    events: broadcast::Sender<GuestMessage>,
    first_events: Mutex<Option<broadcast::Receiver<GuestMessage>>>,
    state: watch::Sender<GuestState>,
    metadata: Mutex<HashMap<u64, oneshot::Sender<Option<String>>>>,
    execs: Mutex<HashMap<u64, mpsc::UnboundedSender<ExecEvent>>>,
    next_id: AtomicU64,
}

impl Shared {
    fn closed(&self) -> ChannelError {
        ChannelError::Closed {
            endpoint: self.endpoint.clone(),
        }
    }

    fn send(&self, msg: HostMessage) -> Result<(), ChannelError> {
        self.out_tx.send(msg).map_err(|_| self.closed())
    }

    fn dispatch(&self, msg: GuestMessage) {
        match &msg {
            GuestMessage::Hello {
                protocol_version,
                boot_ms,
            } => self.state.send_modify(|s| {
                s.protocol_version = Some(*protocol_version);
                s.boot_ms = Some(*boot_ms);
            }),
            GuestMessage::InitStarted { uptime_ms } => self
                .state
                .send_modify(|s| s.init_started_ms = Some(*uptime_ms)),
            GuestMessage::AppStarted { pid, .. } => {
                self.state.send_modify(|s| s.app_pid = Some(*pid))
            }
            GuestMessage::Ready { port, .. } => {
                self.state.send_modify(|s| s.ready_port = Some(*port))
            }
            GuestMessage::Exit { code, signal, oom } => self.state.send_modify(|s| {
                s.exit = Some(GuestExit {
                    code: *code,
                    signal: *signal,
                    oom: *oom,
                })
            }),
            GuestMessage::Error { message } => {
                tracing::warn!(endpoint = %self.endpoint, "guest error: {message}");
                self.state
                    .send_modify(|s| s.last_error = Some(message.clone()))
            }
            GuestMessage::MetadataValue {
                request_id, value, ..
            } => {
                let waiter = lock(&self.metadata).remove(request_id);
                if let Some(tx) = waiter {
                    let _ = tx.send(value.clone());
                }
            }
            GuestMessage::ExecStarted { id, pid } => {
                self.exec_event(*id, ExecEvent::Started { pid: *pid }, false)
            }
            GuestMessage::ExecOutput { id, stream, data } => self.exec_event(
                *id,
                ExecEvent::Output {
                    stream: *stream,
                    data: data.clone(),
                },
                false,
            ),
            GuestMessage::ExecExit {
                id,
                code,
                signal,
                error,
            } => self.exec_event(
                *id,
                ExecEvent::Exit {
                    code: *code,
                    signal: *signal,
                    error: error.clone(),
                },
                true,
            ),
            GuestMessage::Log { .. }
            | GuestMessage::ProcessList { .. }
            | GuestMessage::Synced { .. } => {}
        }
        let _ = self.events.send(msg);
    }

    fn exec_event(&self, id: u64, ev: ExecEvent, last: bool) {
        let mut execs = lock(&self.execs);
        if let Some(tx) = execs.get(&id) {
            let _ = tx.send(ev);
        }
        if last {
            execs.remove(&id);
        }
    }
}

/// Locks a std mutex that is never held across an await, recovering from poison.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A live channel to one guest. Dropping it ends the background task.
pub struct GuestChannel {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for GuestChannel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GuestChannel {
    /// Connects to the unix socket at `path` (retrying until it accepts) and waits for
    /// the first handshake, at most `timeout`.
    pub async fn connect(
        path: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<GuestChannel, ChannelError> {
        Self::connect_with(UnixTransport(path.as_ref().to_path_buf()), timeout).await
    }

    /// As [`connect`](Self::connect), over any transport.
    pub async fn connect_with<T: Transport>(
        transport: T,
        timeout: Duration,
    ) -> Result<GuestChannel, ChannelError> {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (events, first) = broadcast::channel(EVENT_CAPACITY);
        let (state, mut state_rx) = watch::channel(GuestState::default());
        let shared = Arc::new(Shared {
            endpoint: transport.endpoint(),
            out_tx,
            events,
            first_events: Mutex::new(Some(first)),
            state,
            metadata: Mutex::new(HashMap::new()),
            execs: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        });
        let task = tokio::spawn(run(transport, shared.clone(), out_rx));
        let chan = GuestChannel { shared, task };
        let waited = tokio::time::timeout(timeout, state_rx.wait_for(|s| s.handshakes > 0)).await;
        match waited {
            Ok(Ok(_)) => Ok(chan),
            Ok(Err(_)) => Err(chan.shared.closed()),
            Err(_) => Err(ChannelError::Handshake {
                endpoint: chan.shared.endpoint.clone(),
                timeout,
            }),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.shared.endpoint
    }

    /// Guest messages. The first call gets every message since `connect` began; later
    /// calls get those from now on. A slow reader may see `Lagged`.
    pub fn events(&self) -> broadcast::Receiver<GuestMessage> {
        lock(&self.shared.first_events)
            .take()
            .unwrap_or_else(|| self.shared.events.subscribe())
    }

    /// Guest messages from now on, never the backlog kept for the first
    /// [`events`](Self::events) caller: for request/reply exchanges (ps, sync) that must
    /// not take the supervisor's receiver.
    pub fn subscribe(&self) -> broadcast::Receiver<GuestMessage> {
        self.shared.events.subscribe()
    }

    /// The guest's state as far as the host knows it.
    pub fn state(&self) -> watch::Receiver<GuestState> {
        self.shared.state.subscribe()
    }

    /// Queues a message; it is written once a handshaken connection is up.
    pub fn send(&self, msg: HostMessage) -> Result<(), ChannelError> {
        self.shared.send(msg)
    }

    /// Delivers a signal to the app.
    pub fn signal(&self, signal: i32) -> Result<(), ChannelError> {
        self.send(HostMessage::Signal { signal })
    }

    async fn wait_state<R>(
        &self,
        what: &str,
        timeout: Duration,
        mut pick: impl FnMut(&GuestState) -> Option<R>,
    ) -> Result<R, ChannelError> {
        let mut rx = self.state();
        let mut found = None;
        let waited = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| {
                found = pick(s);
                found.is_some()
            }),
        )
        .await;
        match (waited, found) {
            (Ok(Ok(_)), Some(v)) => Ok(v),
            (Ok(_), _) => Err(self.shared.closed()),
            (Err(_), _) => Err(ChannelError::Timeout {
                endpoint: self.shared.endpoint.clone(),
                what: what.to_string(),
                timeout,
            }),
        }
    }

    /// Waits until one of the run config's `ready_ports` listens; fails early if the
    /// app exits first.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<u16, ChannelError> {
        let r = self
            .wait_state("readiness", timeout, |s| match (s.ready_port, s.exit) {
                (Some(p), _) => Some(Ok(p)),
                (None, Some(e)) => Some(Err(e)),
                _ => None,
            })
            .await?;
        r.map_err(|exit| ChannelError::ExitedBeforeReady {
            endpoint: self.shared.endpoint.clone(),
            exit,
        })
    }

    /// Waits for the guest's `Exit` report.
    pub async fn wait_exit(&self, timeout: Duration) -> Result<GuestExit, ChannelError> {
        self.wait_state("exit report", timeout, |s| s.exit).await
    }

    /// Graceful stop: `signal` to the app, SIGKILL after `timeout`, then the guest
    /// powers off. Returns the exit report.
    pub async fn stop(&self, signal: i32, timeout: Duration) -> Result<GuestExit, ChannelError> {
        self.send(HostMessage::Stop {
            signal,
            timeout_ms: timeout.as_millis() as u64,
        })?;
        self.wait_exit(timeout + Duration::from_secs(10)).await
    }

    fn next_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub async fn metadata_get(
        &self,
        key: &str,
        timeout: Duration,
    ) -> Result<Option<String>, ChannelError> {
        let request_id = self.next_id();
        self.metadata_request(
            request_id,
            HostMessage::MetadataGet {
                request_id,
                key: key.to_string(),
            },
            timeout,
        )
        .await
    }

    pub async fn metadata_set(
        &self,
        key: &str,
        value: &str,
        timeout: Duration,
    ) -> Result<(), ChannelError> {
        let request_id = self.next_id();
        self.metadata_request(
            request_id,
            HostMessage::MetadataSet {
                request_id,
                key: key.to_string(),
                value: value.to_string(),
            },
            timeout,
        )
        .await
        .map(drop)
    }

    pub async fn metadata_delete(&self, key: &str, timeout: Duration) -> Result<(), ChannelError> {
        let request_id = self.next_id();
        self.metadata_request(
            request_id,
            HostMessage::MetadataDelete {
                request_id,
                key: key.to_string(),
            },
            timeout,
        )
        .await
        .map(drop)
    }

    async fn metadata_request(
        &self,
        request_id: u64,
        msg: HostMessage,
        timeout: Duration,
    ) -> Result<Option<String>, ChannelError> {
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.metadata).insert(request_id, tx);
        self.send(msg)?;
        let r = tokio::time::timeout(timeout, rx).await;
        lock(&self.shared.metadata).remove(&request_id);
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(self.shared.closed()),
            Err(_) => Err(ChannelError::Timeout {
                endpoint: self.shared.endpoint.clone(),
                what: format!("metadata reply {request_id}"),
                timeout,
            }),
        }
    }

    /// Starts a command in the guest and returns its session (interactive use).
    pub fn start_exec(&self, req: &ExecRequest) -> Result<ExecSession, ChannelError> {
        let id = self.next_id();
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.shared.execs).insert(id, tx);
        self.send(HostMessage::Exec {
            id,
            cmd: req.cmd.clone(),
            env: req.env.clone(),
            tty: req.tty,
            rows: req.rows,
            cols: req.cols,
        })?;
        Ok(ExecSession {
            id,
            shared: self.shared.clone(),
            events: rx,
        })
    }

    /// Runs a command to completion, collecting its output, at most `timeout`.
    pub async fn exec(
        &self,
        req: &ExecRequest,
        timeout: Duration,
    ) -> Result<ExecResult, ChannelError> {
        let mut s = self.start_exec(req)?;
        if !req.tty {
            s.stdin(&req.stdin, true)?;
        } else if !req.stdin.is_empty() {
            s.stdin(&req.stdin, false)?;
        }
        let id = s.id;
        let collect = async {
            let mut out = ExecResult::default();
            while let Some(ev) = s.events.recv().await {
                match ev {
                    ExecEvent::Started { .. } => {}
                    ExecEvent::Output { stream, data } => match stream {
                        Stream::Stdout => out.stdout.extend(data),
                        Stream::Stderr => out.stderr.extend(data),
                    },
                    ExecEvent::Exit {
                        error: Some(message),
                        ..
                    } => {
                        return Err(ChannelError::ExecFailed {
                            endpoint: self.shared.endpoint.clone(),
                            id,
                            message,
                        });
                    }
                    ExecEvent::Exit { code, signal, .. } => {
                        out.code = code;
                        out.signal = signal;
                        return Ok(out);
                    }
                }
            }
            Err(self.shared.closed())
        };
        match tokio::time::timeout(timeout, collect).await {
            Ok(r) => r,
            Err(_) => Err(ChannelError::Timeout {
                endpoint: self.shared.endpoint.clone(),
                what: format!("end of exec {id} ({:?})", req.cmd),
                timeout,
            }),
        }
    }
}

/// One running exec: its events, stdin and window size.
pub struct ExecSession {
    pub id: u64,
    shared: Arc<Shared>,
    events: mpsc::UnboundedReceiver<ExecEvent>,
}

impl ExecSession {
    /// The next event; `None` after `Exit` (or if the channel ended).
    pub async fn next_event(&mut self) -> Option<ExecEvent> {
        self.events.recv().await
    }

    /// Sends stdin data (in frames of at most [`STDIN_CHUNK`] bytes); `eof` closes it.
    pub fn stdin(&self, data: &[u8], eof: bool) -> Result<(), ChannelError> {
        let mut chunks: Vec<&[u8]> = data.chunks(STDIN_CHUNK).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            self.shared.send(HostMessage::ExecStdin {
                id: self.id,
                data: chunk.to_vec(),
                eof: eof && i == last,
            })?;
        }
        Ok(())
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ChannelError> {
        self.shared.send(HostMessage::ExecResize {
            id: self.id,
            rows,
            cols,
        })
    }
}

impl Drop for ExecSession {
    fn drop(&mut self) {
        lock(&self.shared.execs).remove(&self.id);
    }
}

/// The connection loop: connect, serve until the connection drops, repeat.
async fn run<T: Transport>(
    transport: T,
    shared: Arc<Shared>,
    mut out_rx: mpsc::UnboundedReceiver<HostMessage>,
) {
    let mut held: Option<HostMessage> = None;
    loop {
        let stream = match transport.connect().await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(RETRY_EVERY).await;
                continue;
            }
        };
        tracing::debug!(endpoint = %shared.endpoint, "guest channel connected");
        let r = serve(stream, &shared, &mut out_rx, &mut held).await;
        shared.state.send_modify(|s| s.connected = false);
        match r {
            Ok(()) => tracing::debug!(endpoint = %shared.endpoint, "guest channel closed"),
            Err(e) => tracing::debug!(endpoint = %shared.endpoint, "guest channel dropped: {e}"),
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// One connection. `held` keeps a message whose write failed, for the next connection.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    shared: &Shared,
    out_rx: &mut mpsc::UnboundedReceiver<HostMessage>,
    held: &mut Option<HostMessage>,
) -> io::Result<()> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut acked = false;
    // Our own Hello, repeated until the handshake: a guest that missed the reconnect
    // would otherwise stay silent.
    let mut greet = tokio::time::interval(HOST_HELLO_EVERY);
    loop {
        if acked && let Some(msg) = held.take() {
            write_msg(&mut wr, &msg, held).await?;
            continue;
        }
        tokio::select! {
            _ = greet.tick(), if !acked => {
                let hello = HostMessage::Hello { protocol_version: PROTOCOL_VERSION };
                let frame = encode_frame(&hello).map_err(io::Error::other)?;
                wr.write_all(&frame).await?;
            }
            n = rd.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                decoder.push(&buf[..n]);
                loop {
                    let msg = match decoder.next_frame::<GuestMessage>() {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                    };
                    // Every Hello is answered: the guest repeats it until it hears us.
                    // Any other frame first means the guest missed our reconnect.
                    let hello = matches!(msg, GuestMessage::Hello { .. });
                    if hello || !acked {
                        let ack = HostMessage::HelloAck { protocol_version: PROTOCOL_VERSION };
                        let frame = encode_frame(&ack).map_err(io::Error::other)?;
                        wr.write_all(&frame).await?;
                        if !acked {
                            acked = true;
                            shared.state.send_modify(|s| {
                                s.connected = true;
                                s.handshakes += 1;
                            });
                        }
                    }
                    shared.dispatch(msg);
                }
            }
            msg = out_rx.recv(), if acked => {
                let Some(msg) = msg else { return Ok(()) };
                write_msg(&mut wr, &msg, held).await?;
            }
        }
    }
}

async fn write_msg<W: AsyncWrite + Unpin>(
    wr: &mut W,
    msg: &HostMessage,
    held: &mut Option<HostMessage>,
) -> io::Result<()> {
    let frame = match encode_frame(msg) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("dropping a host message that cannot be framed: {e}");
            return Ok(());
        }
    };
    if let Err(e) = wr.write_all(&frame).await {
        *held = Some(msg.clone());
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{UnixListener, UnixStream};

    /// A scripted stand-in for the guest, on the server side of the socket like QEMU.
    /// `volunteer_hello: false` plays a guest that missed the reconnect and only speaks
    /// when greeted.
    async fn fake_guest(
        mut s: UnixStream,
        hang_up_after_ack: bool,
        volunteer_hello: bool,
    ) -> Vec<HostMessage> {
        let mut dec = FrameDecoder::new();
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 65536];
        let mut acked = false;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut metadata = BTreeMap::new();
        loop {
            tokio::select! {
                _ = tick.tick(), if !acked && volunteer_hello => {
                    let f = encode_frame(&GuestMessage::Hello { protocol_version: 1, boot_ms: 42 }).unwrap();
                    s.write_all(&f).await.unwrap();
                }
                n = s.read(&mut buf) => {
                    let n = n.unwrap();
                    if n == 0 { return seen; }
                    dec.push(&buf[..n]);
                    while let Some(m) = dec.next_frame::<HostMessage>().unwrap() {
                        let mut reply = Vec::new();
                        match &m {
                            HostMessage::Hello { .. } => {
                                reply.push(GuestMessage::Hello { protocol_version: 1, boot_ms: 42 });
                            }
                            HostMessage::HelloAck { .. } if !acked => {
                                acked = true;
                                if hang_up_after_ack {
                                    seen.push(m);
                                    return seen;
                                }
                                reply.push(GuestMessage::InitStarted { uptime_ms: 5 });
                                reply.push(GuestMessage::Log { stream: Stream::Stdout, ts_ms: 1, line: "hi".into() });
                            }
                            HostMessage::MetadataGet { request_id, key } => reply.push(GuestMessage::MetadataValue {
                                request_id: *request_id, key: key.clone(), value: metadata.get(key).cloned(),
                            }),
                            HostMessage::MetadataSet { request_id, key, value } => {
                                metadata.insert(key.clone(), value.clone());
                                reply.push(GuestMessage::MetadataValue { request_id: *request_id, key: key.clone(), value: Some(value.clone()) });
                            }
                            HostMessage::MetadataDelete { request_id, key } => {
                                metadata.remove(key);
                                reply.push(GuestMessage::MetadataValue { request_id: *request_id, key: key.clone(), value: None });
                            }
                            HostMessage::Exec { id, cmd, .. } if cmd[0] == "missing" => reply.push(GuestMessage::ExecExit {
                                id: *id, code: Some(127), signal: None, error: Some("not found".into()),
                            }),
                            HostMessage::Exec { id, .. } => reply.push(GuestMessage::ExecStarted { id: *id, pid: 9 }),
                            HostMessage::ExecStdin { id, data, eof: true } => {
                                reply.push(GuestMessage::ExecOutput { id: *id, stream: Stream::Stdout, data: data.clone() });
                                reply.push(GuestMessage::ExecOutput { id: *id, stream: Stream::Stderr, data: b"e".to_vec() });
                                reply.push(GuestMessage::ExecExit { id: *id, code: Some(0), signal: None, error: None });
                            }
                            HostMessage::Stop { signal, .. } => reply.push(GuestMessage::Exit { code: None, signal: Some(*signal), oom: false }),
                            _ => {}
                        }
                        seen.push(m);
                        for r in reply {
                            s.write_all(&encode_frame(&r).unwrap()).await.unwrap();
                        }
                    }
                }
            }
        }
    }

    fn sock_path(name: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        (dir, p)
    }

    #[tokio::test]
    async fn handshake_events_exec_metadata_stop() {
        let (_dir, path) = sock_path("ctl.sock");
        // The channel starts before the socket exists: it must retry.
        let connecting = tokio::spawn({
            let path = path.clone();
            async move { GuestChannel::connect(&path, Duration::from_secs(10)).await }
        });
        let listener = UnixListener::bind(&path).unwrap();
        let (s, _) = listener.accept().await.unwrap();
        let guest = tokio::spawn(fake_guest(s, false, true));
        let chan = connecting.await.unwrap().unwrap();
        let mut ev = chan.events();
        assert!(matches!(
            ev.recv().await.unwrap(),
            GuestMessage::Hello { boot_ms: 42, .. }
        ));
        let mut saw_log = false;
        while !saw_log {
            saw_log = matches!(ev.recv().await.unwrap(), GuestMessage::Log { .. });
        }
        assert_eq!(chan.state().borrow().boot_ms, Some(42));

        let t = Duration::from_secs(5);
        assert_eq!(chan.metadata_get("role", t).await.unwrap(), None);
        chan.metadata_set("role", "primary", t).await.unwrap();
        assert_eq!(
            chan.metadata_get("role", t).await.unwrap().as_deref(),
            Some("primary")
        );
        chan.metadata_delete("role", t).await.unwrap();
        assert_eq!(chan.metadata_get("role", t).await.unwrap(), None);

        let r = chan
            .exec(
                &ExecRequest {
                    cmd: vec!["cat".into()],
                    stdin: b"abc".to_vec(),
                    ..Default::default()
                },
                t,
            )
            .await
            .unwrap();
        assert_eq!(
            r,
            ExecResult {
                code: Some(0),
                signal: None,
                stdout: b"abc".to_vec(),
                stderr: b"e".to_vec()
            }
        );
        let err = chan
            .exec(
                &ExecRequest {
                    cmd: vec!["missing".into()],
                    ..Default::default()
                },
                t,
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );

        let exit = chan.stop(15, Duration::from_millis(100)).await.unwrap();
        assert_eq!(
            exit,
            GuestExit {
                code: None,
                signal: Some(15),
                oom: false
            }
        );
        drop(chan);
        let seen = guest.await.unwrap();
        assert!(
            seen.iter().any(|m| matches!(
                m,
                HostMessage::HelloAck {
                    protocol_version: 1
                }
            )),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn reconnects_and_handshakes_again() {
        let (_dir, path) = sock_path("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let connecting = tokio::spawn({
            let path = path.clone();
            async move { GuestChannel::connect(&path, Duration::from_secs(10)).await }
        });
        // First connection: the guest side hangs up right after the ack.
        let (s, _) = listener.accept().await.unwrap();
        fake_guest(s, true, true).await;
        let chan = connecting.await.unwrap().unwrap();
        // A request made while disconnected is held and sent after the next handshake.
        let pending = tokio::spawn({
            let mut st = chan.state();
            async move {
                st.wait_for(|s| s.handshakes >= 2)
                    .await
                    .map(|s| s.handshakes)
            }
        });
        let (s, _) = listener.accept().await.unwrap();
        let guest = tokio::spawn(fake_guest(s, false, false));
        assert_eq!(
            chan.metadata_get("k", Duration::from_secs(5))
                .await
                .unwrap(),
            None
        );
        assert_eq!(pending.await.unwrap().unwrap(), 2);
        assert!(chan.state().borrow().connected);
        drop(chan);
        guest.await.unwrap();
    }

    #[tokio::test]
    async fn handshake_timeout_names_the_socket() {
        let (_dir, path) = sock_path("never.sock");
        let err = GuestChannel::connect(&path, Duration::from_millis(200))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ChannelError::Handshake { .. }));
        assert!(err.to_string().contains("never.sock"), "{err}");
    }
}
