//! Catalog records (values stored under the `Store` keys of DESIGN §4): apps, machines
//! as published by their agent, hosts, volumes. JSON with a schema version, so a reader
//! can refuse what it does not understand.

use serde::{Deserialize, Serialize};

use crate::machine::{Machine, Volume};

/// The schema version every record below carries.
pub const SCHEMA_VERSION: u32 = 1;

/// `apps/{app}`
pub fn app_key(app: &str) -> String {
    format!("apps/{app}")
}

/// `machines/{app}/{id}`
pub fn machine_key(app: &str, id: &str) -> String {
    format!("machines/{app}/{id}")
}

/// `machines/{app}/` — every machine of an app.
pub fn machines_prefix(app: &str) -> String {
    format!("machines/{app}/")
}

/// `hosts/{host}`
pub fn host_key(host: &str) -> String {
    format!("hosts/{host}")
}

/// `volumes/{app}/{id}`
pub fn volume_key(app: &str, id: &str) -> String {
    format!("volumes/{app}/{id}")
}

/// An app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    pub schema: u32,
    pub id: String,
    pub name: String,
    /// The organisation slug (`personal` on a new install).
    pub org: String,
    /// The private network name (`default`).
    pub network: String,
    pub created_at: String,
}

/// Where the proxy reaches one service port of a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAddress {
    /// The service's `internal_port` in the machine config.
    pub internal_port: u16,
    /// `host:port` the proxy connects to (a TAP address or a user-mode forward).
    pub address: String,
}

/// A machine as its agent publishes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineRecord {
    pub schema: u32,
    pub app: String,
    /// The host (agent) that owns it.
    pub host: String,
    pub machine: Machine,
    #[serde(default)]
    pub addresses: Vec<ServiceAddress>,
}

/// A host's heartbeat, written under a lease so that it vanishes when the agent dies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub schema: u32,
    pub id: String,
    pub region: String,
    /// Where the agent can be reached (empty for in-process agents).
    #[serde(default)]
    pub address: String,
    pub memory_mb_total: u64,
    pub memory_mb_committed: u64,
    pub cpus_total: u32,
    pub cpus_committed: u32,
    pub machines: u32,
    /// RFC 3339 time of this heartbeat.
    pub updated_at: String,
}

/// A volume and the host it lives on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub schema: u32,
    pub app: String,
    pub host: String,
    pub volume: Volume,
}
