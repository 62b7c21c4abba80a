//! `AgentApi`: the operations one host's agent offers, in Fly's terms. The Machines API
//! drives agents only through this trait; the in-process implementation is
//! [`crate::Agent`], and a NATS transport can implement it later.

use std::time::Duration;

use aloft_types::machine::{
    Lease, Machine, MachineConfig, MachineEvent, MachineState, Volume, VolumeSnapshot,
};
use serde::{Deserialize, Serialize};

/// What went wrong, in categories the API maps to HTTP statuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AgentError {
    /// 404
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    /// 400/422: the request is wrong; `field` names what.
    #[error("invalid {field}: {message}")]
    Invalid { field: String, message: String },
    /// 409: a lease is held by someone else, or the state does not allow it.
    #[error("{0}")]
    Conflict(String),
    /// 408
    #[error("timed out waiting for machine {id} to be {wanted}")]
    WaitTimeout { id: String, wanted: String },
    /// 422/503: no capacity on this host.
    #[error("not enough capacity on host {host}: {detail}")]
    Capacity { host: String, detail: String },
    /// 500: the host failed; the message says what to look at.
    #[error("{0}")]
    Internal(String),
}

/// `POST /apps/{app}/machines`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateMachine {
    pub app: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    pub config: MachineConfig,
    /// Create without booting (`created`, then `start`).
    #[serde(default)]
    pub skip_launch: bool,
    /// Secrets as env, decrypted by the API for this machine only.
    #[serde(default)]
    pub secrets: std::collections::BTreeMap<String, String>,
    /// Create a lease with this TTL (seconds) as part of the call.
    #[serde(default)]
    pub lease_ttl: Option<u64>,
    /// The app's organisation: machines of different organisations cannot reach each
    /// other on the private network.
    #[serde(default)]
    pub org: String,
}

/// `POST /apps/{app}/machines/{id}` (update)
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpdateMachine {
    pub config: MachineConfig,
    #[serde(default)]
    pub name: Option<String>,
    /// Refuse unless the machine is at this version.
    #[serde(default)]
    pub current_version: Option<String>,
    #[serde(default)]
    pub skip_launch: bool,
    #[serde(default)]
    pub secrets: std::collections::BTreeMap<String, String>,
}

/// `POST .../stop`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StopOptions {
    /// Default: the config's `stop_config.signal`, else SIGINT.
    #[serde(default)]
    pub signal: Option<String>,
    /// Default: the config's `stop_config.timeout`, else 5 s.
    #[serde(default)]
    pub timeout: Option<Duration>,
}

/// `GET .../wait`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WaitFor {
    /// Any of these states (`settled` = any non-transient state).
    pub states: Vec<String>,
    #[serde(default)]
    pub instance_id: Option<String>,
    pub timeout: Duration,
}

/// `POST .../exec` result: Fly's `flydv1.ExecResponse`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecOutput {
    pub exit_code: i32,
    #[serde(default)]
    pub exit_signal: i32,
    pub stdout: String,
    pub stderr: String,
}

/// One log line of a machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub machine_id: String,
    pub region: String,
    /// Unix milliseconds.
    pub timestamp: i64,
    /// `stdout`, `stderr` or `system` (the agent's own notes: exits, restarts).
    pub stream: String,
    pub message: String,
}

/// `POST /apps/{app}/volumes`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateVolume {
    pub app: String,
    pub name: String,
    pub size_gb: i64,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub snapshot_retention: Option<i64>,
    /// Restore: the new volume starts as a copy of this snapshot (held by this host).
    #[serde(default)]
    pub snapshot_id: Option<String>,
}

/// `GET/PUT .../memory`: Fly's `main.memoryResponse`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineMemory {
    /// Memory the guest may use now: its boot memory less what the balloon holds.
    pub limit_mb: i64,
    /// What the guest reports as available to its apps (`MemAvailable`); 0 when the
    /// machine is not running.
    pub available_mb: i64,
}

/// `GET /apps/{app}/machines/{id}/console` (an Aloft extension): an interactive command.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConsoleRequest {
    /// argv; the API defaults it to the image's shell (`/bin/sh`).
    pub command: Vec<String>,
    /// Extra environment (e.g. the client's `TERM`).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Run on a pseudo-terminal of `rows` x `cols` (stdout and stderr merged).
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub rows: u16,
    #[serde(default)]
    pub cols: u16,
}

/// What the client of a console sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleInput {
    Stdin(Vec<u8>),
    /// End of stdin (closes the command's stdin; a no-op on a pty).
    Eof,
    Resize {
        rows: u16,
        cols: u16,
    },
}

/// What a console reports; `Exit` is the last item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
    },
}

/// A started console command. Dropping `input` means the client went away: the agent
/// then ends the command's stdin (pipes) or types ^C ^D (pty) as a hang-up.
/// `output` closing without `Exit` means the guest connection was lost, or the client
/// fell too far behind the output (bounded queue; a note on stderr says so).
#[derive(Debug)]
pub struct ConsoleSession {
    pub pid: i32,
    pub input: tokio::sync::mpsc::Sender<ConsoleInput>,
    pub output: tokio::sync::mpsc::Receiver<ConsoleOutput>,
}

/// The operations of one host's agent.
#[async_trait::async_trait]
pub trait AgentApi: Send + Sync {
    /// The host's id and region.
    fn host_id(&self) -> &str;
    fn region(&self) -> &str;

    async fn create_machine(&self, req: CreateMachine) -> Result<Machine, AgentError>;
    async fn get_machine(&self, app: &str, id: &str) -> Result<Machine, AgentError>;
    async fn list_machines(&self, app: &str) -> Result<Vec<Machine>, AgentError>;
    async fn update_machine(
        &self,
        app: &str,
        id: &str,
        req: UpdateMachine,
        lease_nonce: Option<&str>,
    ) -> Result<Machine, AgentError>;
    async fn start_machine(
        &self,
        app: &str,
        id: &str,
        lease_nonce: Option<&str>,
    ) -> Result<Machine, AgentError>;
    async fn stop_machine(
        &self,
        app: &str,
        id: &str,
        opts: StopOptions,
        lease_nonce: Option<&str>,
    ) -> Result<Machine, AgentError>;
    async fn restart_machine(
        &self,
        app: &str,
        id: &str,
        opts: StopOptions,
        lease_nonce: Option<&str>,
    ) -> Result<Machine, AgentError>;
    async fn suspend_machine(
        &self,
        app: &str,
        id: &str,
        lease_nonce: Option<&str>,
    ) -> Result<Machine, AgentError>;
    async fn signal_machine(&self, app: &str, id: &str, signal: &str) -> Result<(), AgentError>;
    async fn destroy_machine(
        &self,
        app: &str,
        id: &str,
        force: bool,
        lease_nonce: Option<&str>,
    ) -> Result<(), AgentError>;
    async fn cordon_machine(&self, app: &str, id: &str, cordoned: bool) -> Result<(), AgentError>;
    async fn wait_machine(
        &self,
        app: &str,
        id: &str,
        wait: WaitFor,
    ) -> Result<MachineState, AgentError>;
    async fn machine_events(&self, app: &str, id: &str) -> Result<Vec<MachineEvent>, AgentError>;

    async fn acquire_lease(
        &self,
        app: &str,
        id: &str,
        ttl: Duration,
        description: &str,
        existing_nonce: Option<&str>,
    ) -> Result<Lease, AgentError>;
    async fn get_lease(&self, app: &str, id: &str) -> Result<Lease, AgentError>;
    async fn release_lease(&self, app: &str, id: &str, nonce: &str) -> Result<(), AgentError>;

    async fn exec(
        &self,
        app: &str,
        id: &str,
        command: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecOutput, AgentError>;
    async fn logs(
        &self,
        app: &str,
        id: &str,
        since_ms: Option<i64>,
    ) -> Result<Vec<LogLine>, AgentError>;
    async fn metadata_get(
        &self,
        app: &str,
        id: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, AgentError>;
    async fn metadata_set(
        &self,
        app: &str,
        id: &str,
        key: &str,
        value: &str,
    ) -> Result<(), AgentError>;
    async fn metadata_delete(&self, app: &str, id: &str, key: &str) -> Result<(), AgentError>;

    async fn create_volume(&self, req: CreateVolume) -> Result<Volume, AgentError>;
    async fn list_volumes(&self, app: &str) -> Result<Vec<Volume>, AgentError>;
    async fn get_volume(&self, app: &str, id: &str) -> Result<Volume, AgentError>;
    async fn extend_volume(&self, app: &str, id: &str, size_gb: i64) -> Result<Volume, AgentError>;
    async fn destroy_volume(&self, app: &str, id: &str) -> Result<Volume, AgentError>;

    /// Starts an interactive command (Aloft's `ssh console`); returns once the guest
    /// has started it (a command that cannot start is `Invalid`).
    async fn console(
        &self,
        app: &str,
        id: &str,
        req: ConsoleRequest,
    ) -> Result<ConsoleSession, AgentError>;

    /// `GET .../ps`: the guest's processes, read by its init from /proc.
    async fn machine_ps(
        &self,
        app: &str,
        id: &str,
    ) -> Result<Vec<aloft_types::guest::ProcessStat>, AgentError>;
    /// `GET .../memory`
    async fn get_memory(&self, app: &str, id: &str) -> Result<MachineMemory, AgentError>;
    /// `PUT .../memory`: inflate or deflate the balloon so the running guest keeps
    /// `limit_mb` (at most its boot memory) until its next boot.
    async fn set_memory_limit(
        &self,
        app: &str,
        id: &str,
        limit_mb: i64,
    ) -> Result<MachineMemory, AgentError>;
    /// `POST .../memory/reclaim`: inflate the balloon by `amount_mb`, then deflate it
    /// again; the pages the guest gave up go back to the host. Returns the MB reclaimed.
    async fn reclaim_memory(&self, app: &str, id: &str, amount_mb: i64) -> Result<i64, AgentError>;
    /// `POST /apps/{app}/volumes/{id}/snapshots`: a consistent copy of the volume (the
    /// machine using it is paused for the copy).
    async fn create_volume_snapshot(
        &self,
        app: &str,
        volume_id: &str,
    ) -> Result<VolumeSnapshot, AgentError>;
    /// `GET /apps/{app}/volumes/{id}/snapshots`, newest last.
    async fn list_volume_snapshots(
        &self,
        app: &str,
        volume_id: &str,
    ) -> Result<Vec<VolumeSnapshot>, AgentError>;
}
