//! Fly Machines API shapes: the machine `config` object (image, env, init, guest,
//! services, checks, mounts, restart, stop_config, metadata …), in exactly the JSON
//! shape of Fly's OpenAPI document (`fly.MachineConfig` and friends). Absent optional
//! fields are omitted, as Go's `omitempty` does.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// `fly.MachineConfig`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "MachineInit::is_empty")]
    pub init: MachineInit,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<MachineGuest>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MachineMount>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<MachineService>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MachineMetrics>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<String, MachineCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<MachineRestart>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub auto_destroy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<MachineProcess>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub standbys: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<MachineFile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statics: Vec<Static>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_config: Option<StopConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_machine_autostart: Option<bool>,
    /// Deprecated in Fly's API, accepted for compatibility.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_drive: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<serde_json::Value>,
}

/// `fly.MachineInit`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineInit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub tty: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_size_mb: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_args: Vec<String>,
}

impl MachineInit {
    pub fn is_empty(&self) -> bool {
        self == &MachineInit::default()
    }
}

/// `fly.MachineGuest`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineGuest {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cpu_kind: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cpus: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub memory_mb: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gpus: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gpu_kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_dedication_id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persist_rootfs: Option<String>,
}

/// A named preset of [`MachineGuest`] (Fly's VM sizes).
pub struct GuestPreset {
    pub name: &'static str,
    pub cpu_kind: &'static str,
    pub cpus: i64,
    pub memory_mb: i64,
    pub gpus: i64,
    pub gpu_kind: &'static str,
}

/// Fly's VM size presets (fly-go `MachinePresets`).
pub const GUEST_PRESETS: &[GuestPreset] = &[
    preset("shared-cpu-1x", "shared", 1, 256),
    preset("shared-cpu-2x", "shared", 2, 512),
    preset("shared-cpu-4x", "shared", 4, 1024),
    preset("shared-cpu-8x", "shared", 8, 2048),
    preset("performance-1x", "performance", 1, 2048),
    preset("performance-2x", "performance", 2, 4096),
    preset("performance-4x", "performance", 4, 8192),
    preset("performance-8x", "performance", 8, 16384),
    preset("performance-16x", "performance", 16, 32768),
    gpu("a100-40gb", 8, 32768, "a100-pcie-40gb"),
    gpu("a100-80gb", 8, 32768, "a100-sxm4-80gb"),
    gpu("l40s", 8, 32768, "l40s"),
    gpu("a10", 8, 32768, "a10"),
];

const fn preset(name: &'static str, kind: &'static str, cpus: i64, mb: i64) -> GuestPreset {
    GuestPreset {
        name,
        cpu_kind: kind,
        cpus,
        memory_mb: mb,
        gpus: 0,
        gpu_kind: "",
    }
}
const fn gpu(name: &'static str, cpus: i64, mb: i64, kind: &'static str) -> GuestPreset {
    GuestPreset {
        name,
        cpu_kind: "performance",
        cpus,
        memory_mb: mb,
        gpus: 1,
        gpu_kind: kind,
    }
}

impl MachineGuest {
    /// The guest of a named size, or `None` for an unknown size.
    pub fn from_size(size: &str) -> Option<Self> {
        GUEST_PRESETS
            .iter()
            .find(|p| p.name == size)
            .map(|p| MachineGuest {
                cpu_kind: p.cpu_kind.into(),
                cpus: p.cpus,
                memory_mb: p.memory_mb,
                gpus: p.gpus,
                gpu_kind: p.gpu_kind.into(),
                ..Default::default()
            })
    }
}

/// `fly.MachineMount`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineMount {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub volume: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size_gb: i64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub encrypted: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub extend_threshold_percent: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub add_size_gb: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size_gb_limit: i64,
}

/// `fly.MachineService`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineService {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub internal_port: i64,
    /// Fly sends `autostop` as a bool or one of "off", "stop", "suspend".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostop: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_machines_running: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<MachinePort>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<MachineCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<MachineServiceConcurrency>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_instance_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_instance_description: Option<String>,
}

/// `fly.MachinePort`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachinePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handlers: Vec<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub force_https: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_options: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_options: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_proto_options: Option<serde_json::Value>,
}

impl MachinePort {
    /// Does this port entry cover `port` (single port or range)?
    pub fn covers(&self, port: i64) -> bool {
        match (self.port, self.start_port, self.end_port) {
            (Some(p), _, _) => p == port,
            (None, Some(s), Some(e)) => (s..=e).contains(&port),
            _ => false,
        }
    }
}

/// `fly.MachineServiceConcurrency`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineServiceConcurrency {
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hard_limit: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub soft_limit: i64,
}

/// `fly.MachineCheck` (also used for service checks, `fly.MachineServiceCheck`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineCheck {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Go duration string, e.g. "10s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_skip_verify: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<MachineHttpHeader>,
    /// "informational" or "readiness".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind_detail: Option<String>,
    /// Aloft extension for `type = "exec"` (as Fly's `fly.ExecHealthcheck.command`):
    /// the command run in the guest through the exec channel; exit 0 passes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Aloft extension (as Fly's `fly.ContainerHealthcheck.failure_threshold`): failed
    /// runs in a row, after the grace period, before `unhealthy` acts. Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<i64>,
    /// Aloft extension (as Fly's `fly.ContainerHealthcheck.unhealthy`): `"restart"`
    /// makes the agent restart a machine whose check failed `failure_threshold` times
    /// in a row. Absent (the default): failures are only reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy: Option<String>,
}

/// [`MachineCheck::unhealthy`] value that restarts the machine.
pub const UNHEALTHY_RESTART: &str = "restart";
/// [`MachineCheck::failure_threshold`] when absent.
pub const DEFAULT_FAILURE_THRESHOLD: i64 = 3;

/// `fly.MachineHTTPHeader`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineHttpHeader {
    pub name: String,
    #[serde(default)]
    pub values: Vec<String>,
}

/// `fly.MachineRestart`. Policies: "no", "always", "on-failure", "spot-price".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineRestart {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub policy: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_retries: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_bid_price: Option<f64>,
}

/// `fly.StopConfig`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopConfig {
    /// Go duration string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
}

/// `fly.MachineMetrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineMetrics {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub port: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub https: bool,
}

/// `fly.DNSConfig`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DnsConfig {
    #[serde(default, skip_serializing_if = "is_false")]
    pub skip_registration: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub searches: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname_fqdn: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// `fly.File`: a file written into the guest at boot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineFile {
    pub guest_path: String,
    /// Base64 content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_config: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// `fly.Static`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Static {
    pub guest_path: String,
    pub url_prefix: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tigris_bucket: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub index_document: String,
}

/// `fly.MachineProcess` (kept opaque beyond its common fields).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineProcess {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// Metadata keys flyctl sets on every machine it deploys.
pub const METADATA_PROCESS_GROUP: &str = "fly_process_group";
pub const METADATA_PLATFORM_VERSION: &str = "fly_platform_version";
pub const METADATA_FLYCTL_VERSION: &str = "fly_flyctl_version";
pub const PLATFORM_VERSION_V2: &str = "v2";
/// The process group flyctl uses for release-command machines.
pub const RELEASE_COMMAND_GROUP: &str = "fly_app_release_command";

/// A machine's lifecycle state, as Fly names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    Created,
    Starting,
    Started,
    Stopping,
    Stopped,
    Suspending,
    Suspended,
    Replacing,
    Destroying,
    Destroyed,
    Failed,
}

impl MachineState {
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Created => "created",
            MachineState::Starting => "starting",
            MachineState::Started => "started",
            MachineState::Stopping => "stopping",
            MachineState::Stopped => "stopped",
            MachineState::Suspending => "suspending",
            MachineState::Suspended => "suspended",
            MachineState::Replacing => "replacing",
            MachineState::Destroying => "destroying",
            MachineState::Destroyed => "destroyed",
            MachineState::Failed => "failed",
        }
    }

    /// Parses a state name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "created" => MachineState::Created,
            "starting" => MachineState::Starting,
            "started" => MachineState::Started,
            "stopping" => MachineState::Stopping,
            "stopped" => MachineState::Stopped,
            "suspending" => MachineState::Suspending,
            "suspended" => MachineState::Suspended,
            "replacing" => MachineState::Replacing,
            "destroying" => MachineState::Destroying,
            "destroyed" => MachineState::Destroyed,
            "failed" => MachineState::Failed,
            _ => return None,
        })
    }

    /// Not in the middle of a transition (`settled` in Fly's wait API).
    pub fn is_settled(self) -> bool {
        !matches!(
            self,
            MachineState::Starting
                | MachineState::Stopping
                | MachineState::Suspending
                | MachineState::Replacing
                | MachineState::Destroying
        )
    }
}

impl std::fmt::Display for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Fly's `Machine` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub id: String,
    pub name: String,
    pub state: MachineState,
    pub region: String,
    /// The version: a new one on every update.
    pub instance_id: String,
    #[serde(default)]
    pub private_ip: String,
    pub config: MachineConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_ref: Option<ImageRef>,
    /// RFC 3339.
    pub created_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<MachineEvent>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckStatus>,
    /// `ok`, `unknown` or `unreachable`.
    #[serde(default = "host_ok")]
    pub host_status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Aloft: set in the catalog record of a cordoned machine (the proxy sends it no
    /// new traffic; it keeps running). Not part of Fly's object, omitted when false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cordoned: bool,
}

fn host_ok() -> String {
    "ok".into()
}

/// Fly's `ImageRef`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageRef {
    #[serde(default)]
    pub registry: String,
    #[serde(default)]
    pub repository: String,
    #[serde(default)]
    pub tag: String,
    #[serde(default)]
    pub digest: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Fly's `MachineEvent`: `launch`, `start`, `stop`, `exit`, `restart`, `update`,
/// `suspend`, `destroy` … with the source (`user`, `flyd`) and details in `request`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineEvent {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub status: String,
    pub source: String,
    /// Unix milliseconds.
    pub timestamp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<serde_json::Value>,
}

/// Fly's `CheckStatus`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckStatus {
    pub name: String,
    /// `passing`, `warning` or `critical`.
    pub status: String,
    #[serde(default)]
    pub output: String,
    pub updated_at: String,
}

/// Fly's `Lease`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub nonce: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub owner: String,
    pub description: String,
    pub version: String,
}

/// Fly's `Volume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub state: String,
    pub size_gb: i64,
    pub region: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub encrypted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_machine_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_alloc_id: Option<String>,
    pub created_at: String,
    #[serde(default = "host_ok")]
    pub host_status: String,
    #[serde(default = "ext4")]
    pub fstype: String,
    #[serde(default)]
    pub snapshot_retention: i64,
    #[serde(default)]
    pub auto_backup_enabled: bool,
}

fn ext4() -> String {
    "ext4".into()
}

/// Fly's `VolumeSnapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeSnapshot {
    pub id: String,
    pub created_at: String,
    /// `created` once the copy is complete.
    pub status: String,
    /// Bytes the snapshot takes on disk (sparse: only what was written).
    pub size: i64,
    /// Size of the volume it was taken from, in bytes.
    #[serde(default)]
    pub volume_size: i64,
    /// Empty: Aloft does not hash snapshots (Fly's content digest).
    #[serde(default)]
    pub digest: String,
    #[serde(default)]
    pub retention_days: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn omits_absent_fields_like_go() {
        let c = MachineConfig {
            image: "nginx".into(),
            ..Default::default()
        };
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"image":"nginx"}"#);
    }

    #[test]
    fn round_trips_fly_json() {
        let j = r#"{"env":{"A":"1"},"init":{"cmd":["a","b"]},"guest":{"cpu_kind":"shared","cpus":1,"memory_mb":256},
          "services":[{"protocol":"tcp","internal_port":8080,"autostop":"stop","autostart":true,
          "ports":[{"port":80,"handlers":["http"],"force_https":true}],
          "concurrency":{"type":"requests","hard_limit":25,"soft_limit":20}}],
          "restart":{"policy":"on-failure","max_retries":3},"stop_config":{"timeout":"5s","signal":"SIGTERM"},
          "checks":{"alive":{"type":"tcp","port":8080,"interval":"15s"}}}"#;
        let c: MachineConfig = serde_json::from_str(j).unwrap();
        let back: serde_json::Value = serde_json::to_value(&c).unwrap();
        let orig: serde_json::Value = serde_json::from_str(j).unwrap();
        assert_eq!(back, orig);
    }

    #[test]
    fn presets() {
        let g = MachineGuest::from_size("performance-2x").unwrap();
        assert_eq!(
            (g.cpu_kind.as_str(), g.cpus, g.memory_mb),
            ("performance", 2, 4096)
        );
        assert!(MachineGuest::from_size("huge").is_none());
    }
}
