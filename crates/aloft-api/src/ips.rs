//! IP assignments (`/apps/{app}/ip_assignments…`): public and private addresses an
//! app is reachable on, allocated from the install's pools ([`IpPools`]).
//!
//! Types are Fly's: `shared_v4` (the one address every app shares), `v4` (a dedicated
//! address from the v4 pool), `v6` (a dedicated address from the v6 pool) and
//! `private_v6` (a Flycast-style address from the private pool, on a named network).
//! Each assignment is `ipassign/{app}/{ip}`; a dedicated address is also claimed as
//! `ipclaims/{ip}`, both written in one compare-and-set batch, so two apps can never
//! hold one address however they race. Destroying an app releases its addresses.
//! Pools come from `ApiState::set_ip_pools`, else `<data_dir>/ip-pools.json`
//! (`{"shared_v4": …, "v4": …, "v6": …, "private_v6": …}`, each optional).
//! This module only books addresses: it does not configure interfaces or routes.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aloft_store::{Expect, Op, StoreError};
use aloft_types::catalog::{AppRecord, SCHEMA_VERSION, app_key};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ipnet::{Ipv4Net, Ipv6Net};
use rand::Rng;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ApiState;
use crate::auth::read_record;
use crate::error::{ApiError, ErrorResponse};
use crate::extract::JsonBody;
use crate::util::now_rfc3339;

/// `ipassign/{app}/` — the prefix of an app's assignments.
pub fn assign_prefix(app: &str) -> String {
    format!("ipassign/{app}/")
}

/// `ipclaims/{ip}` — the claim of a dedicated address.
pub fn claim_key(ip: &IpAddr) -> String {
    format!("ipclaims/{ip}")
}

/// Where addresses come from. Defaults: the shared v4 address 192.0.2.1 and
/// dedicated v6 addresses from 2001:db8:a10f::/48 (documentation ranges, RFC 5737 and
/// RFC 3849), dedicated v4 from the private 10.254.0.0/16, private v6 from the ULA
/// fdaa:a10f::/48.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpPools {
    pub shared_v4: Ipv4Addr,
    pub v4: Ipv4Net,
    pub v6: Ipv6Net,
    pub private_v6: Ipv6Net,
}

impl Default for IpPools {
    fn default() -> Self {
        Self {
            shared_v4: Ipv4Addr::new(192, 0, 2, 1),
            v4: Ipv4Net::new(Ipv4Addr::new(10, 254, 0, 0), 16).unwrap_or_default(),
            v6: Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, 0xa10f, 0, 0, 0, 0, 0), 48)
                .unwrap_or_default(),
            private_v6: Ipv6Net::new(Ipv6Addr::new(0xfdaa, 0xa10f, 0, 0, 0, 0, 0, 0), 48)
                .unwrap_or_default(),
        }
    }
}

impl IpPools {
    /// Pools from their text forms (`"192.0.2.1"`, `"10.254.0.0/16"`, …), checked.
    pub fn parse(
        shared_v4: &str,
        v4: &str,
        v6: &str,
        private_v6: &str,
    ) -> Result<IpPools, IpError> {
        let bad = |what: &'static str, text: &str| IpError::BadPool {
            pool: what,
            text: text.to_string(),
        };
        let pools = IpPools {
            shared_v4: shared_v4.parse().map_err(|_| bad("shared_v4", shared_v4))?,
            v4: v4.parse().map_err(|_| bad("v4", v4))?,
            v6: v6.parse().map_err(|_| bad("v6", v6))?,
            private_v6: private_v6
                .parse()
                .map_err(|_| bad("private_v6", private_v6))?,
        };
        if pools.v4.prefix_len() > 30 {
            return Err(bad("v4", v4));
        }
        if pools.v6.prefix_len() > 124 || pools.private_v6.prefix_len() > 124 {
            return Err(bad("v6", v6));
        }
        Ok(pools)
    }
}

/// `<data_dir>/ip-pools.json`: any of the pools, as text; the rest keep their defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolsFile {
    shared_v4: Option<String>,
    v4: Option<String>,
    v6: Option<String>,
    private_v6: Option<String>,
}

impl IpPools {
    /// The pools `<dir>/ip-pools.json` names (defaults for those it leaves out), or
    /// the defaults when there is no such file.
    pub fn from_data_dir(dir: &std::path::Path) -> Result<IpPools, IpError> {
        let path = dir.join("ip-pools.json");
        let bad = |message: String| IpError::PoolsFile {
            path: path.clone(),
            message,
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(IpPools::default()),
            Err(e) => return Err(bad(e.to_string())),
        };
        let f: PoolsFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let d = IpPools::default();
        IpPools::parse(
            &f.shared_v4.unwrap_or_else(|| d.shared_v4.to_string()),
            &f.v4.unwrap_or_else(|| d.v4.to_string()),
            &f.v6.unwrap_or_else(|| d.v6.to_string()),
            &f.private_v6.unwrap_or_else(|| d.private_v6.to_string()),
        )
        .map_err(|e| bad(e.to_string()))
    }
}

/// Errors of IP assignment; each names the app, address or field it failed on.
#[derive(Debug, thiserror::Error)]
pub enum IpError {
    #[error("invalid IP pool {pool}: {text:?} (a v4 pool needs at most /30, a v6 one /124)")]
    BadPool { pool: &'static str, text: String },
    #[error("IP pools file {path}: {message}")]
    PoolsFile {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("invalid field `type`: {0:?} is not one of v4, shared_v4, v6, private_v6")]
    BadType(String),
    #[error("invalid field `{field}`: {reason}")]
    BadField { field: &'static str, reason: String },
    #[error("invalid path parameter `ip`: {0:?} is not an IP address")]
    BadIp(String),
    #[error("app {app:?} has no IP assignment {ip}")]
    NotAssigned { app: String, ip: String },
    #[error("app {app:?} already has {ip} ({kind})")]
    AlreadyAssigned {
        app: String,
        ip: String,
        kind: &'static str,
    },
    #[error("the {pool} pool {net} has no free address")]
    Exhausted { pool: &'static str, net: String },
    #[error("app {0:?} not found")]
    NoApp(String),
    #[error("catalog record {key}: {message}")]
    Record { key: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<IpError> for ApiError {
    fn from(e: IpError) -> Self {
        match e {
            IpError::BadType(_) | IpError::BadField { .. } | IpError::BadIp(_) => {
                ApiError::BadRequest(e.to_string())
            }
            IpError::NotAssigned { .. } | IpError::NoApp(_) => ApiError::NotFound(e.to_string()),
            IpError::AlreadyAssigned { .. } => ApiError::Conflict(e.to_string()),
            IpError::Exhausted { .. } => ApiError::Capacity(e.to_string()),
            IpError::Store(s) => s.into(),
            IpError::BadPool { .. } | IpError::PoolsFile { .. } | IpError::Record { .. } => {
                ApiError::Internal(e.to_string())
            }
        }
    }
}

/// The kind of an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IpKind {
    SharedV4,
    V4,
    V6,
    PrivateV6,
}

impl IpKind {
    fn parse(s: &str) -> Option<IpKind> {
        match s {
            "shared_v4" => Some(IpKind::SharedV4),
            "v4" => Some(IpKind::V4),
            "v6" => Some(IpKind::V6),
            "private_v6" => Some(IpKind::PrivateV6),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            IpKind::SharedV4 => "shared_v4",
            IpKind::V4 => "v4",
            IpKind::V6 => "v6",
            IpKind::PrivateV6 => "private_v6",
        }
    }
}

/// `ipassign/{app}/{ip}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpRecord {
    pub schema: u32,
    pub app: String,
    pub ip: String,
    pub kind: IpKind,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub service_name: String,
    #[serde(default)]
    pub network: String,
    pub created_at: String,
}

/// Fly's `IPAssignment`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IPAssignment {
    pub ip: String,
    pub region: String,
    pub service_name: String,
    pub shared: bool,
    pub created_at: String,
}

/// Fly's `listIPAssignmentsResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = listIPAssignmentsResponse)]
pub struct ListIpAssignmentsResponse {
    pub ips: Vec<IPAssignment>,
}

/// Fly's `assignIPRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
#[schema(as = assignIPRequest)]
pub struct AssignIpRequest {
    /// v4, shared_v4, v6 or private_v6.
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: String,
    pub region: Option<String>,
    pub service_name: Option<String>,
    /// The private network (`private_v6` only).
    pub network: Option<String>,
    pub org_slug: Option<String>,
}

fn shown(r: &IpRecord) -> IPAssignment {
    IPAssignment {
        ip: r.ip.clone(),
        region: r.region.clone(),
        service_name: r.service_name.clone(),
        shared: r.kind == IpKind::SharedV4,
        created_at: r.created_at.clone(),
    }
}

async fn records(state: &ApiState, app: &str) -> Result<Vec<(String, IpRecord)>, IpError> {
    let listing = state.store().list(&assign_prefix(app)).await?;
    listing
        .entries
        .into_iter()
        .map(|e| {
            let rec = serde_json::from_slice(&e.value).map_err(|err| IpError::Record {
                key: e.key.clone(),
                message: err.to_string(),
            })?;
            Ok((e.key, rec))
        })
        .collect()
}

/// The catalog keys to delete with the app: its assignments and their claims.
pub async fn app_keys(state: &ApiState, app: &str) -> Result<Vec<String>, IpError> {
    let mut keys = Vec::new();
    for (key, rec) in records(state, app).await? {
        if rec.kind != IpKind::SharedV4
            && let Ok(ip) = rec.ip.parse::<IpAddr>()
        {
            keys.push(claim_key(&ip));
        }
        keys.push(key);
    }
    Ok(keys)
}

fn v4_candidate(pool: &Ipv4Net, shared: Ipv4Addr, used: &HashSet<IpAddr>) -> Option<IpAddr> {
    pool.hosts()
        .map(IpAddr::V4)
        .find(|ip| *ip != IpAddr::V4(shared) && !used.contains(ip))
}

fn v6_candidate(pool: &Ipv6Net) -> IpAddr {
    let host_bits = 128 - u32::from(pool.prefix_len());
    let mask = if host_bits >= 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    // Neither the subnet-router anycast (::0) nor ::1 of the pool.
    let host = (rand::thread_rng().r#gen::<u128>() & mask).max(2);
    IpAddr::V6(Ipv6Addr::from(u128::from(pool.network()) | host))
}

/// Assigns a new address of `kind` to `app`; race-free against other allocations.
pub async fn assign(
    state: &ApiState,
    app: &str,
    kind: IpKind,
    region: String,
    service_name: String,
    network: String,
) -> Result<IpRecord, IpError> {
    let pools = state.ip_pools()?.clone();
    for _ in 0..32 {
        let ip = match kind {
            IpKind::SharedV4 => IpAddr::V4(pools.shared_v4),
            IpKind::V4 => {
                let claims = state.store().list("ipclaims/").await?;
                let used: HashSet<IpAddr> = claims
                    .entries
                    .iter()
                    .filter_map(|e| e.key.strip_prefix("ipclaims/")?.parse().ok())
                    .collect();
                v4_candidate(&pools.v4, pools.shared_v4, &used).ok_or_else(|| {
                    IpError::Exhausted {
                        pool: "v4",
                        net: pools.v4.to_string(),
                    }
                })?
            }
            IpKind::V6 => v6_candidate(&pools.v6),
            IpKind::PrivateV6 => v6_candidate(&pools.private_v6),
        };
        let rec = IpRecord {
            schema: SCHEMA_VERSION,
            app: app.to_string(),
            ip: ip.to_string(),
            kind,
            region: region.clone(),
            service_name: service_name.clone(),
            network: network.clone(),
            created_at: now_rfc3339(),
        };
        let key = format!("{}{ip}", assign_prefix(app));
        let value = serde_json::to_vec(&rec).map_err(|e| IpError::Record {
            key: key.clone(),
            message: e.to_string(),
        })?;
        let mut ops = vec![Op::Put {
            key: key.clone(),
            value,
            expect: Expect::Absent,
            lease: None,
        }];
        if kind != IpKind::SharedV4 {
            ops.push(Op::Put {
                key: claim_key(&ip),
                value: app.as_bytes().to_vec(),
                expect: Expect::Absent,
                lease: None,
            });
        }
        match state.store().apply(ops).await {
            Ok(_) => return Ok(rec),
            Err(StoreError::Conflict { key: k, .. }) if k == key && kind == IpKind::SharedV4 => {
                return Err(IpError::AlreadyAssigned {
                    app: app.to_string(),
                    ip: ip.to_string(),
                    kind: kind.name(),
                });
            }
            // Someone took the address first: pick another.
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(IpError::Exhausted {
        pool: kind.name(),
        net: match kind {
            IpKind::V4 => pools.v4.to_string(),
            IpKind::PrivateV6 => pools.private_v6.to_string(),
            _ => pools.v6.to_string(),
        },
    })
}

/// Releases `ip` of `app` (and its claim).
pub async fn release(state: &ApiState, app: &str, ip_text: &str) -> Result<(), IpError> {
    let ip: IpAddr = ip_text
        .parse()
        .map_err(|_| IpError::BadIp(ip_text.to_string()))?;
    let key = format!("{}{ip}", assign_prefix(app));
    let not_assigned = || IpError::NotAssigned {
        app: app.to_string(),
        ip: ip.to_string(),
    };
    let entry = state.store().get(&key).await?.ok_or_else(not_assigned)?;
    let rec: IpRecord = serde_json::from_slice(&entry.value).map_err(|e| IpError::Record {
        key: key.clone(),
        message: e.to_string(),
    })?;
    let mut ops = vec![Op::Delete {
        key: key.clone(),
        expect: Expect::Revision(entry.revision),
    }];
    if rec.kind != IpKind::SharedV4 {
        ops.push(Op::Delete {
            key: claim_key(&ip),
            expect: Expect::Any,
        });
    }
    match state.store().apply(ops).await {
        Ok(_) => Ok(()),
        // Released concurrently by another request.
        Err(StoreError::Conflict { .. }) => Err(not_assigned()),
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(get, path = "/apps/{app_name}/ip_assignments", tag = "Apps", operation_id = "App_IPAssignments_list",
    params(("app_name" = String, Path, description = "Fly App Name")),
    responses((status = 200, description = "OK", body = ListIpAssignmentsResponse)))]
pub async fn list(
    State(state): State<ApiState>,
    Path(app): Path<String>,
) -> Result<Json<ListIpAssignmentsResponse>, ApiError> {
    let mut recs: Vec<IpRecord> = records(&state, &app)
        .await?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    recs.sort_by(|a, b| (&a.created_at, &a.ip).cmp(&(&b.created_at, &b.ip)));
    Ok(Json(ListIpAssignmentsResponse {
        ips: recs.iter().map(shown).collect(),
    }))
}

#[utoipa::path(post, path = "/apps/{app_name}/ip_assignments", tag = "Apps", operation_id = "App_IPAssignments_create",
    params(("app_name" = String, Path, description = "Fly App Name")),
    request_body(content = AssignIpRequest, description = "Assign IP request"),
    responses((status = 200, description = "OK", body = IPAssignment),
        (status = 400, description = "Bad Request", body = ErrorResponse),
        (status = 409, description = "Conflict", body = ErrorResponse)))]
pub async fn create(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    JsonBody(req): JsonBody<AssignIpRequest>,
) -> Result<Json<IPAssignment>, ApiError> {
    let kind = IpKind::parse(&req.kind).ok_or_else(|| IpError::BadType(req.kind.clone()))?;
    let region = req.region.unwrap_or_default();
    if !region.is_empty() && !state.agents().iter().any(|a| a.region() == region) {
        return Err(IpError::BadField {
            field: "region",
            reason: format!("no host serves region {region:?}"),
        }
        .into());
    }
    if let Some(org) = req.org_slug.as_deref().filter(|o| !o.is_empty()) {
        let rec: Option<AppRecord> = read_record(state.store(), &app_key(&app)).await?;
        let rec = rec.ok_or_else(|| IpError::NoApp(app.clone()))?;
        if rec.org != org {
            return Err(IpError::BadField {
                field: "org_slug",
                reason: format!("app {app:?} belongs to {:?}, not {org:?}", rec.org),
            }
            .into());
        }
    }
    let network = req.network.unwrap_or_default();
    if !network.is_empty() && kind != IpKind::PrivateV6 {
        return Err(IpError::BadField {
            field: "network",
            reason: "only a private_v6 address is on a named network".into(),
        }
        .into());
    }
    let service_name = req.service_name.unwrap_or_default();
    if service_name.len() > 63 {
        return Err(IpError::BadField {
            field: "service_name",
            reason: "longer than 63 characters".into(),
        }
        .into());
    }
    let rec = assign(&state, &app, kind, region, service_name, network).await?;
    Ok(Json(shown(&rec)))
}

#[utoipa::path(delete, path = "/apps/{app_name}/ip_assignments/{ip}", tag = "Apps", operation_id = "App_IPAssignments_delete",
    params(("app_name" = String, Path, description = "Fly App Name"),
        ("ip" = String, Path, description = "IP address")),
    responses((status = 204, description = "No Content"),
        (status = 400, description = "Bad Request", body = ErrorResponse),
        (status = 404, description = "Not Found", body = ErrorResponse)))]
pub async fn delete(
    State(state): State<ApiState>,
    Path((app, ip)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    release(&state, &app, &ip).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_picks_lowest_free_and_skips_shared() {
        let pool: Ipv4Net = "10.0.0.0/30".parse().unwrap();
        let shared = Ipv4Addr::new(10, 0, 0, 1);
        let mut used = HashSet::new();
        let a = v4_candidate(&pool, shared, &used).unwrap();
        assert_eq!(a.to_string(), "10.0.0.2");
        used.insert(a);
        assert_eq!(v4_candidate(&pool, shared, &used), None);
    }

    #[test]
    fn v6_stays_in_pool() {
        let pool: Ipv6Net = "2001:db8:a10f::/48".parse().unwrap();
        for _ in 0..100 {
            let IpAddr::V6(a) = v6_candidate(&pool) else {
                panic!()
            };
            assert!(pool.contains(&a));
        }
        let tiny: Ipv6Net = "fdaa::/126".parse().unwrap();
        let IpAddr::V6(a) = v6_candidate(&tiny) else {
            panic!()
        };
        assert!(tiny.contains(&a) && u128::from(a) >= 2);
    }

    #[test]
    fn pools_file_overrides_defaults_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            IpPools::from_data_dir(dir.path()).unwrap(),
            IpPools::default()
        );
        let path = dir.path().join("ip-pools.json");
        std::fs::write(&path, r#"{"v4": "172.30.0.0/24"}"#).unwrap();
        let p = IpPools::from_data_dir(dir.path()).unwrap();
        assert_eq!(p.v4.to_string(), "172.30.0.0/24");
        assert_eq!(p.v6, IpPools::default().v6);
        std::fs::write(&path, r#"{"v4": "nope"}"#).unwrap();
        let e = IpPools::from_data_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("ip-pools.json") && e.contains("nope"), "{e}");
        std::fs::write(&path, r#"{"v7": "x"}"#).unwrap();
        assert!(IpPools::from_data_dir(dir.path()).is_err());
    }

    #[test]
    fn pools_parse_and_refuse_nonsense() {
        assert!(IpPools::parse("192.0.2.1", "10.1.0.0/24", "2001:db8::/48", "fdaa::/48").is_ok());
        assert!(IpPools::parse("x", "10.1.0.0/24", "2001:db8::/48", "fdaa::/48").is_err());
        assert!(IpPools::parse("192.0.2.1", "10.1.0.0/32", "2001:db8::/48", "fdaa::/48").is_err());
        let d = IpPools::default();
        assert_eq!(d.v4.to_string(), "10.254.0.0/16");
        assert_eq!(d.v6.to_string(), "2001:db8:a10f::/48");
    }
}
