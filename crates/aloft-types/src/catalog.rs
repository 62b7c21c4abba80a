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

/// `certs/{hostname}` — one certificate (or a request for one) per hostname.
pub fn cert_key(hostname: &str) -> String {
    format!("certs/{}", hostname.to_ascii_lowercase())
}

/// `certs/` — every certificate.
pub const CERTS_PREFIX: &str = "certs/";

/// `acme/challenges/{token}` — a pending ACME challenge every proxy answers.
pub fn acme_challenge_key(token: &str) -> String {
    format!("acme/challenges/{token}")
}

/// `acme/challenges/` — every pending challenge.
pub const ACME_CHALLENGES_PREFIX: &str = "acme/challenges/";

/// `acme/account` — the ACME account (one per install and directory).
pub const ACME_ACCOUNT_KEY: &str = "acme/account";

/// Where a certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertSource {
    /// Issued by the ACME directory the proxy is configured with.
    Acme,
    /// Uploaded by the user (`certificates/custom`).
    Custom,
    /// Signed by the install's local CA (dev: `*.aloft.localhost`).
    Local,
}

/// Where a certificate is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertStatus {
    /// Asked for; no proxy has started issuing it.
    Pending,
    /// A proxy holds the ACME order and is answering its challenges.
    Issuing,
    /// `cert_pem`/`key_pem` are valid and served.
    Ready,
    /// The last issuance failed; `error` says why.
    Failed,
}

/// A hostname's certificate: the proxy serves `cert_pem`/`key_pem` for SNI `hostname`
/// (a `*.` hostname matches one label).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertRecord {
    pub schema: u32,
    /// Lower-case hostname, possibly `*.example.com`.
    pub hostname: String,
    pub app: String,
    pub source: CertSource,
    pub status: CertStatus,
    /// PEM chain, leaf first (empty until issued).
    #[serde(default)]
    pub cert_pem: String,
    /// PEM private key of the leaf (empty until issued).
    #[serde(default)]
    pub key_pem: String,
    /// RFC 3339 expiry of the leaf, when issued.
    #[serde(default)]
    pub not_after: Option<String>,
    /// Why the last issuance failed.
    #[serde(default)]
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl CertRecord {
    /// A hostname just attached to `app`, waiting for ACME to issue its certificate.
    pub fn pending_acme(hostname: impl Into<String>, app: impl Into<String>, now: &str) -> Self {
        CertRecord {
            schema: SCHEMA_VERSION,
            hostname: hostname.into(),
            app: app.into(),
            source: CertSource::Acme,
            status: CertStatus::Pending,
            cert_pem: String::new(),
            key_pem: String::new(),
            not_after: None,
            error: None,
            created_at: now.to_string(),
            updated_at: now.to_string(),
        }
    }
}

/// The kind of an ACME challenge being answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AcmeChallengeKind {
    /// `GET /.well-known/acme-challenge/{token}` answers `key_authorization`.
    Http01,
    /// A TLS handshake with ALPN `acme-tls/1` and SNI `hostname` gets `cert_pem`/`key_pem`.
    TlsAlpn01,
}

/// A challenge every proxy answers while an order is pending.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcmeChallengeRecord {
    pub schema: u32,
    pub hostname: String,
    pub kind: AcmeChallengeKind,
    pub token: String,
    pub key_authorization: String,
    /// For tls-alpn-01: the self-signed challenge certificate (with the acmeIdentifier
    /// extension) and its key.
    #[serde(default)]
    pub cert_pem: String,
    #[serde(default)]
    pub key_pem: String,
}
