//! The normalised app config, field for field as flyctl's `appconfig.Config`, with keys
//! spelled as in fly.toml. Empty values are omitted on output as Go's `omitempty` does.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::machine::{MachinePort, MachineServiceConcurrency};

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A whole fly.toml after flyctl's patches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AppConfig {
    #[serde(rename = "app", default, skip_serializing_if = "String::is_empty")]
    pub app_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub primary_region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_signal: Option<String>,
    /// A Go duration string ("5s").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_size_mb: Option<i64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub console_command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experimental: Option<Experimental>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<Deploy>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub processes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_service: Option<HttpService>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<String, ToplevelCheck>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<File>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_dedication_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub machine_config: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machine_checks: Vec<MachineCheckSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart: Vec<Restart>,
    #[serde(rename = "vm", default, skip_serializing_if = "Vec::is_empty")]
    pub compute: Vec<Compute>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statics: Vec<Static>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<Metrics>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Experimental {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec: Vec<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub auto_rollback: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub enable_consul: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub enable_etcd: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub lazy_load_images: bool,
    #[serde(default)]
    pub attached: Attached,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub machine_config: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Attached {
    #[serde(default)]
    pub secrets: AttachedSecrets,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttachedSecrets {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub export: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Build {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub builder: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buildpacks: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub builtin: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dockerfile: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ignorefile: String,
    #[serde(
        rename = "build-target",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub docker_build_target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compose: Option<BuildCompose>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub compression: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_level: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildCompose {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub file: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Deploy {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub strategy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub release_command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_command_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_command_vm: Option<Compute>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub seed_command: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Mount {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub destination: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub initial_size: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_retention: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_snapshots: Option<bool>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub auto_extend_size_threshold: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub auto_extend_size_increment: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub auto_extend_size_limit: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpService {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub internal_port: i64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub force_https: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_stop_machines: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_start_machines: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_machines_running: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<MachineServiceConcurrency>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_options: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_options: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<ServiceCheck>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machine_checks: Vec<MachineCheckSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Service {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub internal_port: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_stop_machines: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_start_machines: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_machines_running: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<MachinePort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<MachineServiceConcurrency>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_checks: Vec<ServiceCheck>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_checks: Vec<ServiceCheck>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machine_checks: Vec<MachineCheckSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
}

/// A `[[services.tcp_checks]]`, `[[services.http_checks]]` or `[[http_service.checks]]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceCheck {
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
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// A `[[machine_checks]]` entry (a test machine run after deploys).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineCheckSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_timeout: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToplevelCheck {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
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
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
    /// Aloft: the command of a `type = "exec"` check, run in the guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Aloft: failures in a row before `unhealthy` acts (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<i64>,
    /// Aloft: `"restart"` restarts the machine once the check keeps failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct File {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub guest_path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub local_path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub raw_value: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Static {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub guest_path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url_prefix: String,
    /// flyctl writes this one even when empty.
    #[serde(default)]
    pub tigris_bucket: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub index_document: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Restart {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub policy: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
}

/// A `[[vm]]` section: a size preset, a memory override, and any guest field inline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Compute {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub size: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub memory: String,
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
    pub persist_rootfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    #[serde(default)]
    pub port: i64,
    #[serde(default)]
    pub path: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub https: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
}
