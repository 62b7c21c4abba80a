//! flyctl's `Validate` (its `validation.go`), over the typed config, with every problem
//! pointed at the line of the key it is about. Rules that concern a single value were
//! already checked by the schema walk; these are the ones that need the whole file.
//!
//! Where flyctl only fails at deploy time (a check with no port and no http_service,
//! more than one mount for a group, a `[[vm]]` that cannot become a guest), we report it
//! here: `validate` exists to catch what a deploy would trip on.

use std::time::Duration;

use super::model::{AppConfig, ServiceCheck};
use super::schema::{DEPLOY_STRATEGIES, RESTART_POLICIES, SpanIndex, Walker};
use super::units::{self, SizeUnits};
use super::{Severity, group};

const GB: u64 = 1_000_000_000;

pub(crate) fn validate(cfg: &AppConfig, spans: &SpanIndex, w: &mut Walker<'_>) {
    let mut report = |severity: Severity, path: &str, message: String| {
        let at = spans.find(path).unwrap_or(0);
        w.diag_at(severity, at, path, message);
    };
    let err = Severity::Error;
    let warn = Severity::Warning;
    let groups = group::process_names(cfg);

    if let Some(deploy) = &cfg.deploy {
        if shlex::split(&deploy.release_command).is_none() {
            report(
                err,
                "deploy.release_command",
                "cannot shell-split the release command".into(),
            );
        }
        let s = deploy.strategy.as_str();
        if !s.is_empty() && !DEPLOY_STRATEGIES.contains(&s) {
            report(
                err,
                "deploy.strategy",
                format!(
                    "unsupported deployment strategy {s:?}; use one of {}",
                    DEPLOY_STRATEGIES.join(", ")
                ),
            );
        }
        if deploy.strategy == "canary" && !cfg.mounts.is_empty() {
            report(
                err,
                "deploy.strategy",
                "the canary deployment strategy is not supported when using mounted volumes".into(),
            );
        }
    }
    if shlex::split(&cfg.console_command).is_none() {
        report(
            err,
            "console_command",
            "cannot shell-split the console command".into(),
        );
    }
    if let Some(build) = &cfg.build {
        if !matches!(build.compression.as_str(), "" | "gzip" | "zstd") {
            report(
                err,
                "build.compression",
                format!(
                    "invalid compression {:?}; use \"gzip\" or \"zstd\"",
                    build.compression
                ),
            );
        }
        if let Some(level) = build.compression_level
            && !(0..=9).contains(&level)
        {
            report(
                err,
                "build.compression_level",
                format!("compression level {level} is not between 0 and 9"),
            );
        }
    }

    for (name, check) in &cfg.checks {
        let path = format!("checks.{name}");
        match check.kind.as_deref() {
            Some("http" | "tcp") => {}
            // Aloft: a command run in the guest.
            Some("exec") if check.command.is_empty() => report(
                err,
                &format!("{path}.command"),
                "an exec check needs a command, e.g. [\"cat\", \"/tmp/healthy\"]".into(),
            ),
            Some("exec") => {}
            Some(other) => report(
                err,
                &format!("{path}.type"),
                format!("invalid check type {other:?}, must be \"http\", \"tcp\" or \"exec\""),
            ),
            None => report(
                err,
                &path,
                "missing check type, must be \"http\", \"tcp\" or \"exec\"".into(),
            ),
        }
        if let Some(u) = check.unhealthy.as_deref()
            && u != crate::machine::UNHEALTHY_RESTART
        {
            report(
                err,
                &format!("{path}.unhealthy"),
                format!("invalid value {u:?}, the only action is \"restart\""),
            );
        }
        if let Some(n) = check.failure_threshold
            && !(1..=100).contains(&n)
        {
            report(
                err,
                &format!("{path}.failure_threshold"),
                format!("{n} is not between 1 and 100"),
            );
        }
        if let Some(d) = parsed(&check.interval)
            && d < Duration::from_secs(2)
        {
            report(
                err,
                &format!("{path}.interval"),
                format!(
                    "check interval {} is too short, the minimum is 2s",
                    units::format_go_duration(d)
                ),
            );
        }
        if let Some(d) = parsed(&check.timeout)
            && d > Duration::from_secs(60)
        {
            report(
                err,
                &format!("{path}.timeout"),
                format!(
                    "check timeout {} is too long, the maximum is 60s",
                    units::format_go_duration(d)
                ),
            );
        }
        for p in &check.processes {
            if !groups.contains(p) {
                report(
                    err,
                    &format!("{path}.processes"),
                    undefined_process("check", p),
                );
            }
        }
    }

    let process_count = cfg.processes.len();
    let mut services: Vec<ServiceView<'_>> = Vec::new();
    if let Some(hs) = &cfg.http_service {
        services.push(ServiceView {
            path: "http_service".into(),
            processes: &hs.processes,
            has_ports: true,
            checks: hs.checks.iter().map(|c| ("checks", c)).collect(),
        });
    }
    for (i, s) in cfg.services.iter().enumerate() {
        let mut checks: Vec<(&str, _)> = s.tcp_checks.iter().map(|c| ("tcp_checks", c)).collect();
        checks.extend(s.http_checks.iter().map(|c| ("http_checks", c)));
        services.push(ServiceView {
            path: format!("services[{i}]"),
            processes: &s.processes,
            has_ports: !s.ports.is_empty(),
            checks,
        });
    }
    for ServiceView {
        path,
        processes,
        has_ports,
        checks,
    } in &services
    {
        if processes.is_empty() && process_count > 0 {
            report(
                err,
                path,
                format!(
                    "service has no processes set but the app defines {process_count} processes; set processes for each service"
                ),
            );
        }
        for p in processes.iter() {
            if !groups.contains(p) {
                report(
                    err,
                    &format!("{path}.processes"),
                    undefined_process("service", p),
                );
            }
        }
        if !has_ports {
            report(
                warn,
                path,
                "service must expose at least one port; add a [[services.ports]] section".into(),
            );
        }
        for (kind, check) in checks {
            for (field, value, zero_ok) in [
                ("interval", &check.interval, false),
                ("timeout", &check.timeout, false),
                ("grace_period", &check.grace_period, true),
            ] {
                let Some(d) = parsed(value) else { continue };
                let key = format!("{path}.{kind}.{field}");
                if d < Duration::from_secs(1) && !(zero_ok && d.is_zero()) {
                    report(
                        warn,
                        &key,
                        format!(
                            "{} is less than 1 second; it will be raised to 1 second",
                            units::format_go_duration(d)
                        ),
                    );
                } else if d > Duration::from_secs(60) {
                    report(
                        warn,
                        &key,
                        format!(
                            "{} is greater than 1 minute; it will be lowered to 1 minute",
                            units::format_go_duration(d)
                        ),
                    );
                }
            }
        }
    }

    for (name, command) in &cfg.processes {
        if !command.is_empty() && shlex::split(command).is_none() {
            report(
                err,
                &format!("processes.{name}"),
                format!("could not parse the command of process group {name:?}"),
            );
        }
    }

    for (i, m) in cfg.mounts.iter().enumerate() {
        let path = format!("mounts[{i}]");
        let size_gb =
            |field: &str, value: &str, report: &mut dyn FnMut(Severity, &str, String)| -> u64 {
                if value.is_empty() {
                    return 0;
                }
                match units::parse_size(value, SizeUnits::Decimal, GB) {
                    Ok(n) => n,
                    Err(e) => {
                        report(err, &format!("{path}.{field}"), e);
                        0
                    }
                }
            };
        if !m.initial_size.is_empty() && size_gb("initial_size", &m.initial_size, &mut report) < 1 {
            report(
                err,
                &format!("{path}.initial_size"),
                format!(
                    "mount {:?} has an initial_size {:?} smaller than 1GB",
                    m.source, m.initial_size
                ),
            );
        }
        if let Some(r) = m.snapshot_retention
            && !(1..=60).contains(&r)
        {
            report(
                err,
                &format!("{path}.snapshot_retention"),
                format!(
                    "mount {:?} has a snapshot_retention that is not between 1 and 60 days",
                    m.source
                ),
            );
        }
        let increment = size_gb(
            "auto_extend_size_increment",
            &m.auto_extend_size_increment,
            &mut report,
        );
        let limit = size_gb(
            "auto_extend_size_limit",
            &m.auto_extend_size_limit,
            &mut report,
        );
        let threshold = m.auto_extend_size_threshold;
        if threshold != 0 || increment != 0 || limit != 0 {
            if threshold != 0 && increment == 0 && limit == 0 {
                report(
                    err,
                    &path,
                    format!(
                        "mount {:?}: auto_extend_size_threshold, auto_extend_size_increment and auto_extend_size_limit must be all defined or none",
                        m.source
                    ),
                );
            }
            if !(50..=99).contains(&threshold) {
                report(
                    err,
                    &format!("{path}.auto_extend_size_threshold"),
                    format!(
                        "mount {:?}: auto_extend_size_threshold must be between 50 and 99",
                        m.source
                    ),
                );
            }
            if !(1..=100).contains(&increment) {
                report(
                    err,
                    &format!("{path}.auto_extend_size_increment"),
                    format!(
                        "mount {:?}: auto_extend_size_increment must be between 1GB and 100GB",
                        m.source
                    ),
                );
            }
            if limit != 0 && !(1..=500).contains(&limit) {
                report(
                    err,
                    &format!("{path}.auto_extend_size_limit"),
                    format!(
                        "mount {:?}: auto_extend_size_limit must be between 1GB and 500GB",
                        m.source
                    ),
                );
            }
        }
    }

    for (i, r) in cfg.restart.iter().enumerate() {
        if !RESTART_POLICIES.contains(&r.policy.as_str()) {
            report(
                err,
                &format!("restart[{i}].policy"),
                format!(
                    "invalid restart policy {:?}; use one of {}",
                    r.policy,
                    RESTART_POLICIES.join(", ")
                ),
            );
        }
        for p in &r.processes {
            if !groups.contains(p) {
                report(
                    err,
                    &format!("restart[{i}].processes"),
                    undefined_process("restart policy", p),
                );
            }
        }
    }

    // What a deploy of each group would trip on.
    for name in &groups {
        let flat = group::flatten(cfg, name);
        if flat.mounts.len() > 1 {
            report(
                err,
                "mounts",
                format!("process group {name:?} has more than one [[mounts]] section"),
            );
        }
        if let Err(e) = group::to_machine_config(cfg, Some(name)) {
            report(err, e.key(), e.to_string());
        }
    }
}

/// What validation needs of a service, whether `[http_service]` or `[[services]]`.
struct ServiceView<'a> {
    path: String,
    processes: &'a Vec<String>,
    has_ports: bool,
    checks: Vec<(&'static str, &'a ServiceCheck)>,
}

fn parsed(value: &Option<String>) -> Option<Duration> {
    value
        .as_deref()
        .and_then(|s| units::parse_go_duration(s).ok())
}

fn undefined_process(what: &str, name: &str) -> String {
    format!("{what} names process {name:?}, but [processes] defines no such group")
}
