//! The routing snapshot: apps → services → machines, built from a source-neutral
//! [`RoutesSpec`] and swapped atomically in [`Routes`].
//!
//! Every source of routes (the static TOML file, later the catalog watch) produces a
//! `RoutesSpec`; [`Routes::update`] validates it, compiles it into an immutable
//! [`RouteTable`] and publishes it. Per-machine runtime state (in-flight count, health
//! mark, upstream connection pool) lives in [`Backend`]s that survive swaps as long as
//! the machine keeps its id and upstream address, so a reload never resets load counts.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use serde::Deserialize;

use crate::upstream::Pool;

/// Fly's default concurrency limits when a service gives none.
const DEFAULT_SOFT_LIMIT: u32 = 20;
const DEFAULT_HARD_LIMIT: u32 = 25;

/// Machine states as the Machines API names them; only `started` takes traffic.
const MACHINE_STATES: &[&str] = &[
    "created",
    "starting",
    "started",
    "stopping",
    "stopped",
    "suspending",
    "suspended",
    "replacing",
    "destroying",
    "destroyed",
    "failed",
];

/// Handlers a service port may name (as in fly.toml).
const HANDLERS: &[&str] = &["http", "tls", "proxy_proto", "pg_tls", "edge_http"];

/// Everything the proxy needs to route, independent of where it came from.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoutesSpec {
    /// Regions other than the proxy's own, nearest first. Regions not listed come
    /// after these, in the order they first appear among the machines.
    #[serde(default)]
    pub region_order: Vec<String>,
    #[serde(default)]
    pub apps: Vec<AppSpec>,
    /// Certificates served by SNI in static mode (`[[certs]] hostname, cert, key`).
    #[serde(default)]
    pub certs: Vec<crate::tls::CertSpec>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    pub name: String,
    /// Host names routed to this app; `"*"` catches every host no app names exactly.
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub machines: Vec<MachineSpec>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub internal_port: u16,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub concurrency: Concurrency,
    /// `stop` or `suspend` idle machines above `min_machines_running`; absent or `off`
    /// keeps them running.
    #[serde(default)]
    pub autostop: Option<String>,
    #[serde(default)]
    pub min_machines_running: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub port: u16,
    #[serde(default)]
    pub handlers: Vec<String>,
    #[serde(default)]
    pub force_https: bool,
    /// Talk HTTP/2 (h2c) to the machine (fly.toml `http_options.h2_backend`), as
    /// gRPC needs; trailers pass through.
    #[serde(default)]
    pub h2_backend: bool,
    /// With the `proxy_proto` handler: `{ version = "v1" | "v2" }` (default v1).
    #[serde(default)]
    pub proxy_proto_options: Option<ProxyProtoOptions>,
    /// TLS on this port (fly.toml `tls_options`): ALPN offered, TLS versions
    /// accepted, a self-signed certificate when none matches.
    #[serde(default)]
    pub tls_options: Option<TlsOptions>,
}

/// fly.toml's `[services.ports.tls_options]` / `[http_service.tls_options]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsOptions {
    /// ALPN protocols offered, in the server's order of preference (absent: `h2`,
    /// `http/1.1` on HTTP ports, none on raw `["tls"]` ports).
    #[serde(default)]
    pub alpn: Option<Vec<String>>,
    /// `TLSv1.2` and/or `TLSv1.3` (absent or empty: both).
    #[serde(default)]
    pub versions: Vec<String>,
    /// Serve a self-signed certificate when no certificate matches the SNI.
    #[serde(default)]
    pub default_self_signed: bool,
}

/// A TLS protocol version a port may accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

impl TlsVersion {
    /// `TLSv1.2` / `TLSv1.3` as fly.toml spells them (any case).
    pub fn parse(s: &str) -> Option<TlsVersion> {
        match s.to_ascii_lowercase().as_str() {
            "tlsv1.2" => Some(TlsVersion::Tls12),
            "tlsv1.3" => Some(TlsVersion::Tls13),
            _ => None,
        }
    }
}

/// A port's validated TLS options: what its TLS server config is built from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortTls {
    /// ALPN protocols offered; `None`: the port kind's default.
    pub alpn: Option<Vec<Vec<u8>>>,
    /// Versions accepted, sorted and deduplicated; empty: both.
    pub versions: Vec<TlsVersion>,
    pub default_self_signed: bool,
}

/// fly.toml's `[services.ports.proxy_proto_options]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtoOptions {
    #[serde(default)]
    pub version: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    #[serde(rename = "type", default)]
    pub kind: ConcurrencyKind,
    #[serde(default = "default_soft")]
    pub soft_limit: u32,
    #[serde(default = "default_hard")]
    pub hard_limit: u32,
}

fn default_soft() -> u32 {
    DEFAULT_SOFT_LIMIT
}
fn default_hard() -> u32 {
    DEFAULT_HARD_LIMIT
}

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency {
            kind: ConcurrencyKind::default(),
            soft_limit: DEFAULT_SOFT_LIMIT,
            hard_limit: DEFAULT_HARD_LIMIT,
        }
    }
}

/// What a limit counts. Upstream HTTP/1.1 connections carry one request at a time, so
/// for proxied HTTP both count the requests in flight to the machine.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrencyKind {
    #[default]
    Connections,
    Requests,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MachineSpec {
    pub id: String,
    pub region: String,
    /// `ip` (the service's internal port is used) or `ip:port` (this port is used for
    /// every service of the app, handy when several machines share one host).
    pub address: String,
    pub state: String,
}

/// A routes spec that cannot be compiled; `key` is the dotted path of the bad value,
/// e.g. `apps[0].machines[2].address`.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{key}: {message}")]
pub struct RouteTableError {
    pub key: String,
    pub message: String,
}

fn bad(key: String, message: impl Into<String>) -> RouteTableError {
    RouteTableError {
        key,
        message: message.into(),
    }
}

/// Runtime state of one machine as the target of one service.
#[derive(Debug)]
pub struct Backend {
    pub machine_id: Arc<str>,
    pub region: Arc<str>,
    pub addr: SocketAddr,
    /// Requests in flight to this machine through this proxy.
    pub(crate) in_flight: AtomicU32,
    /// Milliseconds since [`crate::clock`]'s epoch until which the machine is
    /// considered failing (a connect to it failed).
    pub(crate) failing_until: AtomicU64,
    /// When a request last ended (or the machine appeared), for autostop.
    pub(crate) last_active: AtomicU64,
    pub(crate) pool: Pool,
    /// The shared HTTP/2 connection, for services with `h2_backend`.
    pub(crate) h2: crate::upstream::H2Conn,
}

impl Backend {
    fn new(machine_id: Arc<str>, region: Arc<str>, addr: SocketAddr) -> Self {
        Backend {
            machine_id,
            region,
            addr,
            in_flight: AtomicU32::new(0),
            failing_until: AtomicU64::new(0),
            last_active: AtomicU64::new(crate::clock::now_ms()),
            pool: Pool::new(),
            h2: crate::upstream::H2Conn::default(),
        }
    }

    /// Requests in flight to this machine right now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Idle upstream connections kept for this machine.
    pub fn idle_connections(&self) -> usize {
        self.pool.idle_len()
    }
}

/// The machines of one region able to serve a service.
#[derive(Debug)]
pub struct RegionGroup {
    pub region: Arc<str>,
    pub backends: Vec<Arc<Backend>>,
}

#[derive(Debug)]
pub struct PortRoute {
    pub port: u16,
    pub handlers: Vec<String>,
    pub force_https: bool,
    pub h2_backend: bool,
    /// The PROXY protocol header written to the machine (raw TCP ports).
    pub proxy_proto: Option<crate::proxy_proto::Version>,
    /// The port's `tls_options`, validated.
    pub tls: Option<PortTls>,
    /// The TLS server config for this port when its `tls_options` differ from the
    /// defaults; set once per table by [`Routes::update`] (see [`crate::tls`]).
    pub(crate) tls_config: Option<Arc<rustls::ServerConfig>>,
}

impl PortRoute {
    /// Whether the port's fly.toml `handlers` name `handler`.
    pub fn has_handler(&self, handler: &str) -> bool {
        self.handlers.iter().any(|h| h == handler)
    }
}

#[derive(Debug)]
pub struct ServiceRoute {
    pub internal_port: u16,
    pub ports: Vec<PortRoute>,
    pub concurrency: Concurrency,
    pub autostop: Option<String>,
    pub min_machines_running: u32,
    /// Started machines grouped by region: own region first, then nearest first.
    pub groups: Vec<RegionGroup>,
}

#[derive(Debug)]
pub struct AppRoute {
    pub name: Arc<str>,
    pub services: Vec<ServiceRoute>,
    /// Every machine id of the app, whatever its state (to tell "stopped" from
    /// "unknown" when a request forces an instance).
    pub machine_states: HashMap<String, String>,
    /// The region of every machine id of the app (autostart prefers the proxy's own).
    pub machine_regions: HashMap<String, String>,
    /// The app's counters, resolved once per table build (the request path only
    /// touches their atomics).
    pub metrics: Arc<crate::metrics::AppMetrics>,
}

impl AppRoute {
    /// The service answering on public port `port`.
    pub fn service_for_port(&self, port: u16) -> Option<&ServiceRoute> {
        self.services
            .iter()
            .find(|s| s.ports.iter().any(|p| p.port == port))
    }
}

/// An immutable routing snapshot.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// The region of the proxy the table was built for.
    region: String,
    apps: Vec<AppRoute>,
    hosts: HashMap<String, usize>,
    wildcard: Option<usize>,
    /// What each public port named by a service does with a connection.
    port_modes: HashMap<u16, crate::tcp::PortMode>,
}

impl RouteTable {
    /// Compile `spec` for a proxy in `own_region`, reusing backends of `previous`
    /// whose machine id and address are unchanged.
    pub fn build(
        spec: &RoutesSpec,
        own_region: &str,
        previous: Option<&RouteTable>,
    ) -> Result<RouteTable, RouteTableError> {
        let mut reuse: HashMap<(&str, SocketAddr), &Arc<Backend>> = HashMap::new();
        if let Some(prev) = previous {
            for app in &prev.apps {
                for svc in &app.services {
                    for g in &svc.groups {
                        for b in &g.backends {
                            reuse.insert((&b.machine_id, b.addr), b);
                        }
                    }
                }
            }
        }

        let mut table = RouteTable {
            region: own_region.to_string(),
            ..RouteTable::default()
        };
        let mut app_names: HashMap<&str, usize> = HashMap::new();
        for (ai, app) in spec.apps.iter().enumerate() {
            let akey = format!("apps[{ai}]");
            if app.name.is_empty() {
                return Err(bad(format!("{akey}.name"), "must not be empty"));
            }
            if app_names.insert(&app.name, ai).is_some() {
                return Err(bad(
                    format!("{akey}.name"),
                    format!("app {:?} is defined twice", app.name),
                ));
            }
            if app.hostnames.is_empty() {
                return Err(bad(
                    format!("{akey}.hostnames"),
                    "must name at least one host (or \"*\")",
                ));
            }
            for (hi, host) in app.hostnames.iter().enumerate() {
                let hkey = format!("{akey}.hostnames[{hi}]");
                if host == "*" {
                    if table.wildcard.is_some() {
                        return Err(bad(hkey, "only one app may claim \"*\""));
                    }
                    table.wildcard = Some(ai);
                    continue;
                }
                let norm = host.to_ascii_lowercase();
                if norm.is_empty()
                    || !norm
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
                {
                    return Err(bad(hkey, format!("{host:?} is not a valid host name")));
                }
                if let Some(other) = table.hosts.insert(norm, ai) {
                    return Err(bad(
                        hkey,
                        format!(
                            "host {host:?} is already routed to app {:?}",
                            spec.apps[other].name
                        ),
                    ));
                }
            }

            // Machines: validate once, then make a backend per service.
            let mut machine_states = HashMap::new();
            let mut machine_regions = HashMap::new();
            let mut parsed = Vec::new();
            for (mi, m) in app.machines.iter().enumerate() {
                let mkey = format!("{akey}.machines[{mi}]");
                if m.id.is_empty() {
                    return Err(bad(format!("{mkey}.id"), "must not be empty"));
                }
                if m.region.is_empty() {
                    return Err(bad(format!("{mkey}.region"), "must not be empty"));
                }
                if !MACHINE_STATES.contains(&m.state.as_str()) {
                    return Err(bad(
                        format!("{mkey}.state"),
                        format!(
                            "unknown machine state {:?} (expected one of {})",
                            m.state,
                            MACHINE_STATES.join(", ")
                        ),
                    ));
                }
                let addr = parse_address(&m.address).ok_or_else(|| {
                    bad(
                        format!("{mkey}.address"),
                        format!("{:?} is not an IP address or IP:port", m.address),
                    )
                })?;
                machine_regions.insert(m.id.clone(), m.region.clone());
                if machine_states
                    .insert(m.id.clone(), m.state.clone())
                    .is_some()
                {
                    return Err(bad(
                        format!("{mkey}.id"),
                        format!("machine {:?} is listed twice", m.id),
                    ));
                }
                parsed.push((m, addr));
            }

            let mut services = Vec::new();
            let mut seen_ports: HashMap<u16, usize> = HashMap::new();
            for (si, s) in app.services.iter().enumerate() {
                let skey = format!("{akey}.services[{si}]");
                if s.internal_port == 0 {
                    return Err(bad(format!("{skey}.internal_port"), "must not be 0"));
                }
                let c = s.concurrency;
                if c.hard_limit == 0 {
                    return Err(bad(
                        format!("{skey}.concurrency.hard_limit"),
                        "must be at least 1",
                    ));
                }
                if c.soft_limit == 0 || c.soft_limit > c.hard_limit {
                    return Err(bad(
                        format!("{skey}.concurrency.soft_limit"),
                        format!(
                            "must be between 1 and hard_limit ({}), got {}",
                            c.hard_limit, c.soft_limit
                        ),
                    ));
                }
                let mut ports = Vec::new();
                for (pi, p) in s.ports.iter().enumerate() {
                    let pkey = format!("{skey}.ports[{pi}]");
                    if let Some(other) = seen_ports.insert(p.port, si) {
                        return Err(bad(
                            format!("{pkey}.port"),
                            format!(
                                "port {} is already used by services[{other}] of this app",
                                p.port
                            ),
                        ));
                    }
                    for (hi, h) in p.handlers.iter().enumerate() {
                        if !HANDLERS.contains(&h.as_str()) {
                            return Err(bad(
                                format!("{pkey}.handlers[{hi}]"),
                                format!(
                                    "unknown handler {h:?} (expected one of {})",
                                    HANDLERS.join(", ")
                                ),
                            ));
                        }
                    }
                    let proxy_proto = match p
                        .proxy_proto_options
                        .as_ref()
                        .and_then(|o| o.version.as_deref())
                    {
                        _ if !p.handlers.iter().any(|h| h == "proxy_proto") => None,
                        None => Some(crate::proxy_proto::Version::V1),
                        Some(v) => {
                            Some(crate::proxy_proto::Version::parse(v).ok_or_else(|| {
                                bad(
                                    format!("{pkey}.proxy_proto_options.version"),
                                    format!(
                                        "unknown PROXY protocol version {v:?} (expected v1 or v2)"
                                    ),
                                )
                            })?)
                        }
                    };
                    let tls = match &p.tls_options {
                        None => None,
                        Some(o) => Some(port_tls(o, &format!("{pkey}.tls_options"))?),
                    };
                    ports.push(PortRoute {
                        proxy_proto,
                        tls,
                        tls_config: None,
                        port: p.port,
                        handlers: p.handlers.clone(),
                        force_https: p.force_https,
                        h2_backend: p.h2_backend,
                    });
                }

                let mut groups: Vec<RegionGroup> = Vec::new();
                for (m, addr) in &parsed {
                    if m.state != "started" {
                        continue;
                    }
                    let addr = match addr {
                        Address::Ip(ip) => SocketAddr::new(*ip, s.internal_port),
                        Address::Socket(sa) => *sa,
                    };
                    let backend = match reuse.get(&(m.id.as_str(), addr)) {
                        Some(b) if &*b.region == m.region.as_str() => Arc::clone(b),
                        _ => Arc::new(Backend::new(
                            Arc::from(m.id.as_str()),
                            Arc::from(m.region.as_str()),
                            addr,
                        )),
                    };
                    match groups.iter_mut().find(|g| *g.region == *m.region) {
                        Some(g) => g.backends.push(backend),
                        None => groups.push(RegionGroup {
                            region: Arc::clone(&backend.region),
                            backends: vec![backend],
                        }),
                    }
                }
                order_regions(&mut groups, own_region, &spec.region_order);
                services.push(ServiceRoute {
                    internal_port: s.internal_port,
                    ports,
                    concurrency: c,
                    autostop: s.autostop.clone().filter(|a| a != "off"),
                    min_machines_running: s.min_machines_running,
                    groups,
                });
            }
            table.apps.push(AppRoute {
                name: Arc::from(app.name.as_str()),
                services,
                machine_states,
                machine_regions,
                metrics: crate::metrics::app(&app.name),
            });
        }
        table.port_modes = crate::tcp::port_modes(&table.apps);
        Ok(table)
    }

    /// What public port `port` does with a connection (HTTP when no service names it).
    pub fn port_mode(&self, port: u16) -> crate::tcp::PortMode {
        self.port_modes
            .get(&port)
            .copied()
            .unwrap_or(crate::tcp::PortMode::Http)
    }

    /// The app serving `host` (lower-case, without port): exact name first, then `"*"`.
    pub fn app_for_host(&self, host: &str) -> Option<&AppRoute> {
        match self.hosts.get(host) {
            Some(&i) => Some(&self.apps[i]),
            None => self.wildcard.map(|i| &self.apps[i]),
        }
    }

    /// The region of the proxy this table routes for.
    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn apps(&self) -> &[AppRoute] {
        &self.apps
    }
}

/// An ALPN protocol id is 1 to 255 bytes (RFC 7301).
pub(crate) fn valid_alpn_id(proto: &str) -> bool {
    !proto.is_empty() && proto.len() <= 255
}

/// Validate a port's `tls_options`; `key` names them in errors.
fn port_tls(o: &TlsOptions, key: &str) -> Result<PortTls, RouteTableError> {
    let alpn = match &o.alpn {
        None => None,
        Some(list) => {
            let mut out = Vec::new();
            for (i, proto) in list.iter().enumerate() {
                if !valid_alpn_id(proto) {
                    return Err(bad(
                        format!("{key}.alpn[{i}]"),
                        "an ALPN protocol id is 1 to 255 bytes",
                    ));
                }
                out.push(proto.as_bytes().to_vec());
            }
            Some(out)
        }
    };
    let mut versions = Vec::new();
    for (i, v) in o.versions.iter().enumerate() {
        let parsed = TlsVersion::parse(v).ok_or_else(|| {
            bad(
                format!("{key}.versions[{i}]"),
                format!("unknown TLS version {v:?} (expected TLSv1.2 or TLSv1.3)"),
            )
        })?;
        versions.push(parsed);
    }
    versions.sort_unstable();
    versions.dedup();
    Ok(PortTls {
        alpn,
        versions,
        default_self_signed: o.default_self_signed,
    })
}

enum Address {
    Ip(IpAddr),
    Socket(SocketAddr),
}

fn parse_address(s: &str) -> Option<Address> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(Address::Socket(sa));
    }
    let ip = s.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
    ip.unwrap_or(s).parse::<IpAddr>().ok().map(Address::Ip)
}

/// Own region first, then the listed order, then the rest as they came.
fn order_regions(groups: &mut [RegionGroup], own: &str, order: &[String]) {
    groups.sort_by_key(|g| {
        if &*g.region == own {
            0
        } else {
            order
                .iter()
                .position(|r| *r == *g.region)
                .map_or(usize::MAX, |p| p + 1)
        }
    });
}

/// How long a request or a raw TCP connection waits for an autostarted machine (a
/// TCG boot takes seconds).
pub(crate) const AUTOSTART_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Autostart gave no started machine; names the app.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AutostartError {
    #[error("app {app}: could not start a machine: {why}")]
    Failed { app: String, why: String },
    #[error("app {app}: no machine started within {waited:?}")]
    Timeout {
        app: String,
        waited: std::time::Duration,
    },
}

/// When the service of `app` for public port `port` has no started machine but the
/// app has stopped, suspended or created ones: those machine ids, the proxy's own
/// region first, then by id (a stable choice between requests). Shared by HTTP
/// requests (app by host) and raw TCP connections (app by port).
pub(crate) fn autostart_candidates(
    table: &RouteTable,
    app: &AppRoute,
    port: u16,
) -> Option<Vec<String>> {
    let svc = app.service_for_port(port)?;
    if svc.groups.iter().any(|g| !g.backends.is_empty()) {
        return None;
    }
    let mut stopped: Vec<String> = app
        .machine_states
        .iter()
        .filter(|(_, s)| matches!(s.as_str(), "stopped" | "suspended" | "created"))
        .map(|(id, _)| id.clone())
        .collect();
    let own = |id: &String| app.machine_regions.get(id).map(String::as_str) != Some(table.region());
    stopped.sort_by(|a, b| (own(a), a).cmp(&(own(b), b)));
    (!stopped.is_empty()).then_some(stopped)
}

/// Starts a stopped or suspended machine on the proxy's behalf (autostart), and stops
/// or suspends an idle one (autostop). The proxy never changes machine state itself:
/// it asks whoever owns the machine.
#[async_trait::async_trait]
pub trait MachineStarter: Send + Sync {
    async fn start_machine(&self, app: &str, machine_id: &str) -> Result<(), String>;
    /// Stops (or, with `suspend`, suspends) an idle machine.
    async fn stop_machine(&self, app: &str, machine_id: &str, suspend: bool) -> Result<(), String> {
        let _ = (app, machine_id, suspend);
        Err("autostop is not supported by this machine owner".into())
    }
}

/// The current routing snapshot of a proxy, replaced atomically by any route source.
pub struct Routes {
    region: String,
    current: ArcSwap<RouteTable>,
    /// Woken on every new table (autostart waits on it).
    pub(crate) changed: tokio::sync::Notify,
    starter: std::sync::OnceLock<Arc<dyn MachineStarter>>,
    /// The RTT table, and whether cross-region forwards wait for it (`aloft dev`).
    latency: std::sync::OnceLock<(Arc<crate::LatencyMatrix>, bool)>,
    /// Certificates served by SNI on TLS ports (catalog, files, dev CA).
    certs: Arc<crate::tls::Certs>,
    /// Apps with an autostart in flight, and the last autostart failure per app.
    pub(crate) starting: std::sync::Mutex<HashMap<String, Option<String>>>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Routes {
    /// An empty table for a proxy in `region`.
    pub fn new(region: impl Into<String>) -> Self {
        Routes {
            region: region.into(),
            current: ArcSwap::from_pointee(RouteTable::default()),
            changed: tokio::sync::Notify::new(),
            starter: std::sync::OnceLock::new(),
            latency: std::sync::OnceLock::new(),
            certs: Arc::new(crate::tls::Certs::new()),
            starting: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Lets the proxy start stopped machines when a request finds none started.
    pub fn set_starter(&self, starter: Arc<dyn MachineStarter>) {
        let _ = self.starter.set(starter);
    }

    /// The certificates TLS ports serve (fed by `tls::follow_certs` or files).
    pub fn certs(&self) -> &Arc<crate::tls::Certs> {
        &self.certs
    }

    pub fn starter(&self) -> Option<&Arc<dyn MachineStarter>> {
        self.starter.get()
    }

    /// Order other regions by `matrix` (nearest first) whenever a spec names no
    /// `region_order`; with `inject`, every request forwarded to another region first
    /// waits for the pair's round trip (simulated regions in `aloft dev`).
    pub fn set_latency(&self, matrix: crate::LatencyMatrix, inject: bool) {
        let _ = self.latency.set((Arc::new(matrix), inject));
    }

    /// The simulated round trip to pay before forwarding to a machine in `region`.
    pub(crate) fn cross_region_delay(&self, region: &str) -> Option<std::time::Duration> {
        let (m, inject) = self.latency.get()?;
        if !*inject || region == self.region {
            return None;
        }
        Some(m.rtt(&self.region, region)).filter(|d| !d.is_zero())
    }

    /// Build a table from `spec` and publish it; on error the current table stays.
    pub fn update(&self, spec: &RoutesSpec) -> Result<(), RouteTableError> {
        let ordered;
        let spec = match self.latency.get() {
            Some((m, _)) if spec.region_order.is_empty() => {
                let regions = spec
                    .apps
                    .iter()
                    .flat_map(|a| a.machines.iter().map(|m| m.region.as_str()));
                ordered = RoutesSpec {
                    region_order: m.order(&self.region, regions),
                    ..spec.clone()
                };
                &ordered
            }
            _ => spec,
        };
        let prev = self.current.load();
        let mut table = RouteTable::build(spec, &self.region, Some(&prev))?;
        self.attach_tls_configs(&mut table);
        self.current.store(Arc::new(table));
        self.changed.notify_waiters();
        Ok(())
    }

    /// Give every port with `tls_options` its TLS server config, built (or reused
    /// from an earlier table: same options, same config and session cache) once per
    /// table, never per connection.
    fn attach_tls_configs(&self, table: &mut RouteTable) {
        for app in &mut table.apps {
            for svc in &mut app.services {
                for p in &mut svc.ports {
                    if let Some(opts) = &p.tls {
                        p.tls_config = self.certs.port_config(opts, !p.has_handler("http"));
                    }
                }
            }
        }
    }

    /// Asks the machine owner to start one of `stopped` (machines of `app`; one start
    /// per app at a time, however many requests and connections wait) and waits up to
    /// [`AUTOSTART_WAIT`] for a table in which `served` holds. Without a machine owner
    /// the current table is returned as is.
    pub(crate) async fn autostart(
        self: &Arc<Self>,
        app: &str,
        stopped: &[String],
        served: impl Fn(&RouteTable) -> bool,
    ) -> Result<Arc<RouteTable>, AutostartError> {
        let Some(starter) = self.starter().cloned() else {
            return Ok(self.load_full());
        };
        let lead = {
            let mut starting = match self.starting.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            match starting.get(app) {
                Some(None) => false,
                _ => {
                    starting.insert(app.to_string(), None);
                    true
                }
            }
        };
        if lead {
            let (routes2, app2, ids) = (Arc::clone(self), app.to_string(), stopped.to_vec());
            tokio::spawn(async move {
                // The first machine that starts wins; the errors of the others are kept.
                let mut result = Err(String::from("no machine to start"));
                let mut errors = Vec::new();
                for id in &ids {
                    tracing::info!(app = %app2, machine = %id, "autostart");
                    crate::metrics::app(&app2).autostart();
                    match starter.start_machine(&app2, id).await {
                        Ok(()) => {
                            result = Ok(());
                            break;
                        }
                        Err(e) => errors.push(format!("machine {id}: {e}")),
                    }
                }
                if result.is_err() && !errors.is_empty() {
                    result = Err(errors.join("; "));
                }
                let mut starting = match routes2.starting.lock() {
                    Ok(s) => s,
                    Err(p) => p.into_inner(),
                };
                match result {
                    Ok(()) => {
                        starting.remove(&app2);
                    }
                    Err(e) => {
                        starting.insert(app2, Some(e));
                    }
                }
                drop(starting);
                routes2.changed.notify_waiters();
            });
        }
        let deadline = tokio::time::Instant::now() + AUTOSTART_WAIT;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let table = self.load_full();
            if served(&table) {
                return Ok(table);
            }
            let failed = match self.starting.lock() {
                Ok(s) => s.get(app).cloned().flatten(),
                Err(p) => p.into_inner().get(app).cloned().flatten(),
            };
            if let Some(why) = failed {
                if let Ok(mut s) = self.starting.lock() {
                    s.remove(app);
                }
                return Err(AutostartError::Failed {
                    app: app.to_string(),
                    why,
                });
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(AutostartError::Timeout {
                    app: app.to_string(),
                    waited: AUTOSTART_WAIT,
                });
            }
        }
    }

    /// The snapshot in force now.
    pub fn load(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.current.load()
    }

    /// The snapshot in force now, as an owned handle (can be held across awaits).
    pub fn load_full(&self) -> Arc<RouteTable> {
        self.current.load_full()
    }

    pub fn region(&self) -> &str {
        &self.region
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> RoutesSpec {
        toml::from_str(toml_text).expect("spec parses")
    }

    const TWO: &str = r#"
        region_order = ["fra"]
        [[apps]]
        name = "web"
        hostnames = ["Web.Example", "*"]
        [[apps.services]]
        internal_port = 8080
        ports = [{ port = 80, handlers = ["http"] }]
        concurrency = { type = "requests", soft_limit = 2, hard_limit = 3 }
        [[apps.machines]]
        id = "m1"
        region = "ams"
        address = "127.0.0.1:9001"
        state = "started"
        [[apps.machines]]
        id = "m2"
        region = "fra"
        address = "127.0.0.2"
        state = "started"
        [[apps.machines]]
        id = "m3"
        region = "local"
        address = "127.0.0.3"
        state = "started"
        [[apps.machines]]
        id = "m4"
        region = "local"
        address = "127.0.0.4"
        state = "stopped"
    "#;

    #[test]
    fn builds_groups_in_region_order() {
        let t = RouteTable::build(&spec(TWO), "local", None).unwrap();
        let app = t.app_for_host("web.example").unwrap();
        let svc = app.service_for_port(80).unwrap();
        let regions: Vec<&str> = svc.groups.iter().map(|g| &*g.region).collect();
        assert_eq!(regions, ["local", "fra", "ams"]);
        assert_eq!(
            svc.groups[0].backends.len(),
            1,
            "stopped machine is skipped"
        );
        assert_eq!(svc.groups[1].backends[0].addr.to_string(), "127.0.0.2:8080");
        assert_eq!(svc.groups[2].backends[0].addr.to_string(), "127.0.0.1:9001");
        assert!(t.app_for_host("other").is_some(), "wildcard");
        assert!(app.service_for_port(443).is_none());
    }

    #[test]
    fn reload_keeps_backend_state() {
        let routes = Routes::new("local");
        routes.update(&spec(TWO)).unwrap();
        let first = routes.load();
        let b = Arc::clone(
            &first.app_for_host("web.example").unwrap().services[0].groups[0].backends[0],
        );
        b.in_flight.store(2, Ordering::Relaxed);
        routes.update(&spec(TWO)).unwrap();
        let again = routes.load();
        let b2 = &again.app_for_host("web.example").unwrap().services[0].groups[0].backends[0];
        assert!(Arc::ptr_eq(&b, b2));
        assert_eq!(b2.in_flight(), 2);
    }

    #[test]
    fn errors_name_the_key() {
        let s = spec(&TWO.replace("address = \"127.0.0.2\"", "address = \"nope\""));
        let e = RouteTable::build(&s, "local", None).unwrap_err();
        assert_eq!(e.key, "apps[0].machines[1].address");
        let s = spec(&TWO.replace("soft_limit = 2", "soft_limit = 9"));
        let e = RouteTable::build(&s, "local", None).unwrap_err();
        assert_eq!(e.key, "apps[0].services[0].concurrency.soft_limit");
        let s = spec(&TWO.replace("\"stopped\"", "\"sleeping\""));
        let e = RouteTable::build(&s, "local", None).unwrap_err();
        assert_eq!(e.key, "apps[0].machines[3].state");
    }
}
