//! Process groups: which sections belong to which group (flyctl's `Flatten`), and the
//! Machines API config a deploy sends for one group (flyctl's `ToMachineConfig`).

use std::collections::BTreeMap;

use super::model::{AppConfig, Compute, Service, ServiceCheck};
use super::units::{self, SizeUnits};
use crate::machine::{
    DnsConfig, MachineCheck, MachineConfig, MachineGuest, MachineHttpHeader, MachineMetrics,
    MachineMount, MachinePort, MachineRestart, MachineService, Static, StopConfig,
};

/// The group every app has when it declares no `[processes]`.
pub const DEFAULT_GROUP: &str = "app";

/// The version we put in `fly_flyctl_version` metadata.
pub const CLIENT_VERSION: &str = concat!("aloft-", env!("CARGO_PKG_VERSION"));

/// Why a group's machine config cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GroupError {
    #[error("process group {group:?} is not defined; the app has {known:?}")]
    UnknownGroup { group: String, known: Vec<String> },
    #[error(
        "check {check:?} for process group {group:?} has no port set and the group has no http_service to take it from"
    )]
    CheckWithoutPort {
        check: String,
        group: String,
        key: String,
    },
    #[error("could not parse the command of process group {group:?}")]
    BadCommand { group: String },
    #[error("process group {group:?} has {count} [[vm]] sections; at most 2 are allowed")]
    TooManyVms { group: String, count: usize },
    #[error("unknown VM size {size:?}")]
    UnknownSize { size: String, key: String },
    #[error("bad memory size {memory:?}: {reason}")]
    BadMemory {
        memory: String,
        reason: String,
        key: String,
    },
    #[error("invalid machine_config: {reason}")]
    MachineConfig { reason: String, key: String },
}

impl GroupError {
    /// The fly.toml key the problem is about.
    pub fn key(&self) -> &str {
        match self {
            GroupError::UnknownGroup { .. } => "processes",
            GroupError::BadCommand { .. } => "processes",
            GroupError::TooManyVms { .. } => "vm",
            GroupError::CheckWithoutPort { key, .. }
            | GroupError::UnknownSize { key, .. }
            | GroupError::BadMemory { key, .. }
            | GroupError::MachineConfig { key, .. } => key,
        }
    }
}

/// The group names: the sorted keys of `[processes]`, or `["app"]`.
pub fn process_names(cfg: &AppConfig) -> Vec<String> {
    if cfg.processes.is_empty() {
        vec![DEFAULT_GROUP.to_string()]
    } else {
        cfg.processes.keys().cloned().collect()
    }
}

/// `app` if it is a group, else the first group name.
pub fn default_group(cfg: &AppConfig) -> String {
    let names = process_names(cfg);
    if names.iter().any(|n| n == DEFAULT_GROUP) {
        DEFAULT_GROUP.to_string()
    } else {
        names
            .into_iter()
            .next()
            .unwrap_or_else(|| DEFAULT_GROUP.to_string())
    }
}

fn matches(cfg: &AppConfig, group: &str, processes: &[String]) -> bool {
    if processes.is_empty() {
        group == default_group(cfg)
    } else {
        processes.iter().any(|p| p == group)
    }
}

/// The config as seen by one group: only the sections that apply to it.
pub fn flatten(cfg: &AppConfig, group: &str) -> AppConfig {
    let only = || vec![group.to_string()];
    let mut dst = cfg.clone();
    dst.processes.retain(|k, _| k == group);
    dst.checks.retain(|_, c| matches(cfg, group, &c.processes));
    dst.checks.values_mut().for_each(|c| c.processes = only());
    if let Some(hs) = &mut dst.http_service {
        if matches(cfg, group, &hs.processes) {
            hs.processes = only();
        } else {
            dst.http_service = None;
        }
    }
    dst.services.retain(|s| matches(cfg, group, &s.processes));
    dst.services.iter_mut().for_each(|s| s.processes = only());
    dst.mounts.retain(|m| matches(cfg, group, &m.processes));
    dst.mounts.iter_mut().for_each(|m| m.processes = only());
    dst.files.retain(|x| matches(cfg, group, &x.processes));
    dst.files.iter_mut().for_each(|x| x.processes = only());
    dst.metrics.retain(|x| matches(cfg, group, &x.processes));
    dst.metrics.iter_mut().for_each(|x| x.processes = only());
    dst.restart.retain(|x| matches(cfg, group, &x.processes));
    dst.restart.iter_mut().for_each(|x| x.processes = only());
    // A [[vm]] naming the group wins over one that names none; a [[vm]] with no
    // processes applies to every group.
    let candidates: Vec<&Compute> = cfg
        .compute
        .iter()
        .filter(|c| c.processes.is_empty() || matches(cfg, group, &c.processes))
        .collect();
    let chosen = candidates
        .iter()
        .rev()
        .find(|c| c.processes.iter().any(|p| p == group))
        .or_else(|| candidates.first())
        .map(|c| (*c).clone());
    dst.compute = match chosen {
        Some(mut c) => {
            if !c.host_dedication_id.is_empty() {
                dst.host_dedication_id = c.host_dedication_id.clone();
            }
            c.processes = only();
            vec![c]
        }
        None => Vec::new(),
    };
    dst
}

/// The Machines API `config` a deploy sends for `group` (default group if `None`).
pub fn to_machine_config(
    cfg: &AppConfig,
    group: Option<&str>,
) -> Result<MachineConfig, GroupError> {
    let names = process_names(cfg);
    let group = match group {
        Some(g) => {
            if !cfg.processes.is_empty() && !names.iter().any(|n| n == g) {
                return Err(GroupError::UnknownGroup {
                    group: g.to_string(),
                    known: names,
                });
            }
            g.to_string()
        }
        None => default_group(cfg),
    };
    let c = flatten(cfg, &group);
    let mut m = MachineConfig::default();

    if let Some(first) = c.metrics.first() {
        m.metrics = Some(MachineMetrics {
            port: first.port,
            path: first.path.clone(),
            https: first.https,
        });
    }

    let mut cmd = match c.processes.get(&group) {
        Some(s) if !s.is_empty() => {
            Some(shlex::split(s).ok_or_else(|| GroupError::BadCommand {
                group: group.clone(),
            })?)
        }
        _ => None,
    };
    if let Some(exp) = &c.experimental {
        if cmd.is_none() && !exp.cmd.is_empty() {
            cmd = Some(exp.cmd.clone());
        }
        m.init.entrypoint = (!exp.entrypoint.is_empty()).then(|| exp.entrypoint.clone());
        m.init.exec = (!exp.exec.is_empty()).then(|| exp.exec.clone());
    }
    m.init.cmd = cmd;
    m.init.swap_size_mb = c.swap_size_mb;

    m.metadata
        .insert("fly_flyctl_version".into(), CLIENT_VERSION.into());
    m.metadata
        .insert("fly_platform_version".into(), "v2".into());
    m.metadata.insert("fly_process_group".into(), group.clone());

    let mut services: Vec<Service> = Vec::new();
    if let Some(hs) = &c.http_service {
        services.push(http_service_to_service(hs));
    }
    services.extend(c.services.iter().cloned());
    m.services = services.iter().map(service_to_machine).collect();

    for (name, check) in &c.checks {
        let mut mc = MachineCheck {
            port: check.port,
            kind: check.kind.clone(),
            interval: check.interval.clone(),
            timeout: check.timeout.clone(),
            grace_period: check.grace_period.clone(),
            method: check.method.as_ref().map(|s| s.to_uppercase()),
            path: check.path.clone(),
            protocol: check.protocol.clone(),
            tls_skip_verify: check.tls_skip_verify,
            tls_server_name: check.tls_server_name.clone(),
            headers: headers(&check.headers),
            command: check.command.clone(),
            failure_threshold: check.failure_threshold,
            unhealthy: check.unhealthy.clone(),
            ..Default::default()
        };
        if mc.port.is_none() && mc.kind.as_deref() != Some("exec") {
            match &c.http_service {
                Some(hs) => mc.port = Some(hs.internal_port),
                None => {
                    return Err(GroupError::CheckWithoutPort {
                        check: name.clone(),
                        group: group.clone(),
                        key: format!("checks.{name}"),
                    });
                }
            }
        }
        m.checks.insert(name.clone(), mc);
    }

    m.env = c.env.clone();
    m.env.insert("FLY_PROCESS_GROUP".into(), group.clone());
    if !c.primary_region.is_empty() {
        m.env
            .insert("PRIMARY_REGION".into(), c.primary_region.clone());
    }

    m.statics = c
        .statics
        .iter()
        .map(|s| Static {
            guest_path: s.guest_path.clone(),
            url_prefix: s.url_prefix.clone(),
            tigris_bucket: s.tigris_bucket.clone(),
            index_document: s.index_document.clone(),
        })
        .collect();

    m.mounts = c
        .mounts
        .iter()
        .map(|mt| {
            let gb = |s: &str| -> i64 {
                if s.is_empty() {
                    return 0;
                }
                units::parse_size(s, SizeUnits::Decimal, 1_000_000_000).map_or(0, |n| n as i64)
            };
            MachineMount {
                path: mt.destination.clone(),
                name: mt.source.clone(),
                extend_threshold_percent: mt.auto_extend_size_threshold,
                add_size_gb: gb(&mt.auto_extend_size_increment),
                size_gb_limit: gb(&mt.auto_extend_size_limit),
                ..Default::default()
            }
        })
        .collect();

    if c.kill_signal.is_some() || c.kill_timeout.is_some() {
        m.stop_config = Some(StopConfig {
            timeout: c.kill_timeout.clone(),
            signal: c.kill_signal.clone(),
        });
    }

    if c.compute.len() > 2 {
        return Err(GroupError::TooManyVms {
            group,
            count: c.compute.len(),
        });
    }
    if let Some(compute) = c.compute.first() {
        m.guest = Some(compute_to_guest(compute, &c.host_dedication_id, "vm")?);
    }

    for r in &c.restart {
        let policy = match r.policy.as_str() {
            "never" => "no",
            other => other,
        };
        m.restart = Some(MachineRestart {
            policy: policy.to_string(),
            max_retries: r.retries,
            ..Default::default()
        });
    }

    let extra = c
        .experimental
        .as_ref()
        .map(|e| e.machine_config.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(&c.machine_config);
    if !extra.is_empty() {
        merge_machine_config(&mut m, extra)?;
    }
    Ok(m)
}

/// `[http_service]` as flyctl expands it: ports 80 (http, force_https) and 443 (http+tls).
pub fn http_service_to_service(hs: &super::model::HttpService) -> Service {
    Service {
        protocol: "tcp".into(),
        internal_port: hs.internal_port,
        auto_stop_machines: hs.auto_stop_machines.clone(),
        auto_start_machines: hs.auto_start_machines,
        min_machines_running: hs.min_machines_running,
        ports: vec![
            MachinePort {
                port: Some(80),
                handlers: vec!["http".into()],
                force_https: hs.force_https,
                http_options: hs.http_options.clone(),
                ..Default::default()
            },
            MachinePort {
                port: Some(443),
                handlers: vec!["http".into(), "tls".into()],
                http_options: hs.http_options.clone(),
                tls_options: hs.tls_options.clone(),
                ..Default::default()
            },
        ],
        concurrency: hs.concurrency.clone(),
        http_checks: hs.checks.clone(),
        machine_checks: hs.machine_checks.clone(),
        processes: hs.processes.clone(),
        ..Default::default()
    }
}

fn service_to_machine(s: &Service) -> MachineService {
    let check = |kind: &str, c: &ServiceCheck| MachineCheck {
        kind: Some(kind.to_string()),
        interval: c.interval.clone(),
        timeout: c.timeout.clone(),
        grace_period: c.grace_period.clone(),
        method: c.method.clone(),
        path: c.path.clone(),
        protocol: c.protocol.clone(),
        tls_skip_verify: c.tls_skip_verify,
        tls_server_name: c.tls_server_name.clone(),
        headers: headers(&c.headers),
        ..Default::default()
    };
    let mut checks: Vec<MachineCheck> = s.tcp_checks.iter().map(|c| check("tcp", c)).collect();
    checks.extend(s.http_checks.iter().map(|c| check("http", c)));
    MachineService {
        protocol: s.protocol.clone(),
        internal_port: s.internal_port,
        autostop: s.auto_stop_machines.clone().map(serde_json::Value::String),
        autostart: s.auto_start_machines,
        min_machines_running: s.min_machines_running,
        ports: s.ports.clone(),
        checks,
        concurrency: s.concurrency.clone(),
        ..Default::default()
    }
}

fn headers(map: &BTreeMap<String, String>) -> Vec<MachineHttpHeader> {
    map.iter()
        .map(|(k, v)| MachineHttpHeader {
            name: k.clone(),
            values: vec![v.clone()],
        })
        .collect()
}

/// A `[[vm]]` section as a guest: the size preset (default `shared-cpu-1x`, or
/// `performance-8x` with a GPU), then `memory`, then every inline guest field.
pub fn compute_to_guest(
    compute: &Compute,
    host_dedication_id: &str,
    key: &str,
) -> Result<MachineGuest, GroupError> {
    let size = if !compute.size.is_empty() {
        compute.size.as_str()
    } else if !compute.gpu_kind.is_empty() {
        "performance-8x"
    } else {
        "shared-cpu-1x"
    };
    let mut guest = MachineGuest::from_size(size).ok_or_else(|| GroupError::UnknownSize {
        size: size.to_string(),
        key: format!("{key}.size"),
    })?;
    if !host_dedication_id.is_empty() {
        guest.host_dedication_id = host_dedication_id.to_string();
    }
    if !compute.memory.is_empty() {
        let bad = |reason: String| GroupError::BadMemory {
            memory: compute.memory.clone(),
            reason,
            key: format!("{key}.memory"),
        };
        match units::parse_size(&compute.memory, SizeUnits::Binary, 1024 * 1024) {
            Ok(0) => return Err(bad("memory cannot be zero".into())),
            Ok(mb) => guest.memory_mb = mb as i64,
            Err(e) => return Err(bad(e)),
        }
    }
    if !compute.cpu_kind.is_empty() {
        guest.cpu_kind = compute.cpu_kind.clone();
    }
    if compute.cpus != 0 {
        guest.cpus = compute.cpus;
    }
    if compute.memory_mb != 0 {
        guest.memory_mb = compute.memory_mb;
    }
    if compute.gpus != 0 {
        guest.gpus = compute.gpus;
    }
    if !compute.gpu_kind.is_empty() {
        guest.gpu_kind = compute.gpu_kind.clone();
    }
    if !compute.host_dedication_id.is_empty() {
        guest.host_dedication_id = compute.host_dedication_id.clone();
    }
    if !compute.kernel_args.is_empty() {
        guest.kernel_args = compute.kernel_args.clone();
    }
    if compute.persist_rootfs.is_some() {
        guest.persist_rootfs = compute.persist_rootfs.clone();
    }
    if compute.max_memory_mb.is_some() {
        guest.max_memory_mb = compute.max_memory_mb;
    }
    Ok(guest)
}

/// `machine_config` holds a JSON object merged over the generated config (flyctl also
/// accepts a path to a JSON file; a relative path is resolved by the caller).
fn merge_machine_config(m: &mut MachineConfig, json: &str) -> Result<(), GroupError> {
    let bad = |reason: String| GroupError::MachineConfig {
        reason,
        key: "machine_config".into(),
    };
    let extra: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let serde_json::Value::Object(extra) = extra else {
        return Err(bad("expected a JSON object".into()));
    };
    let mut base = serde_json::to_value(&*m).map_err(|e| bad(e.to_string()))?;
    if let serde_json::Value::Object(base_map) = &mut base {
        for (k, v) in extra {
            base_map.insert(k, v);
        }
    }
    let merged: MachineConfig = serde_json::from_value(base).map_err(|e| bad(e.to_string()))?;
    *m = merged;
    if m.dns == Some(DnsConfig::default()) {
        m.dns = None;
    }
    Ok(())
}

#[cfg(test)]
mod exec_check_tests {
    use crate::appconfig::{ConfigError, parse, to_machine_config};

    #[test]
    fn exec_checks_reach_the_machine_config() {
        let src = r#"
app = "exec"
[checks.alive]
type = "exec"
command = ["cat", "/tmp/healthy"]
interval = "5s"
failure_threshold = 2
unhealthy = "restart"
"#;
        let loaded = parse(src, "fly.toml").unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let m = to_machine_config(&loaded.config, None).unwrap();
        let c = &m.checks["alive"];
        assert_eq!(c.kind.as_deref(), Some("exec"));
        assert_eq!(c.command, ["cat", "/tmp/healthy"]);
        assert_eq!(
            (c.failure_threshold, c.unhealthy.as_deref()),
            (Some(2), Some("restart"))
        );
        assert_eq!(c.port, None, "no http_service port is needed");
    }

    #[test]
    fn exec_checks_are_validated() {
        let src = r#"
app = "exec"
[checks.nocmd]
type = "exec"
[checks.odd]
type = "exec"
command = ["true"]
unhealthy = "reboot"
failure_threshold = 0
"#;
        let Err(ConfigError::Invalid { errors, .. }) = parse(src, "fly.toml") else {
            panic!("accepted");
        };
        let keys: Vec<&str> = errors.iter().map(|d| d.key.as_str()).collect();
        for k in [
            "checks.nocmd.command",
            "checks.odd.unhealthy",
            "checks.odd.failure_threshold",
        ] {
            assert!(keys.contains(&k), "{k} not in {errors:?}");
        }
    }
}
