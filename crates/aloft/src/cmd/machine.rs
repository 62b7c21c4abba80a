//! `aloft machine run|list|status|start|stop|restart|suspend|destroy|exec|update|clone`.

use std::process::ExitCode;
use std::time::Duration;

use aloft_types::datadir::DataDir;
use aloft_types::machine::{
    Machine, MachineConfig, MachineGuest, MachinePort, MachineRestart, MachineService,
};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use super::client::{Api, block_on, enc};
use super::common::{
    AppArgs, checks_summary, machine_group, parse_duration, parse_kv, print_json, print_table,
};

#[derive(Args, Debug)]
pub struct MachineArgs {
    #[command(flatten)]
    pub common: AppArgs,
    #[command(subcommand)]
    pub cmd: MachineCommand,
}

/// What shapes a machine's config on `run` and `update`.
#[derive(Args, Debug, Clone, Default)]
pub struct ConfigFlags {
    /// Environment variable (repeatable).
    #[arg(short = 'e', long = "env", value_name = "K=V", value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    /// Published port: EDGE[:INTERNAL][/PROTOCOL[:HANDLER...]], e.g. 80:8080/tcp:http
    /// (repeatable).
    #[arg(short = 'p', long = "port", value_name = "PORT")]
    pub port: Vec<String>,
    /// Memory in MB.
    #[arg(long = "memory", alias = "vm-memory", value_name = "MB")]
    pub memory: Option<i64>,
    /// Number of CPUs.
    #[arg(long = "cpus", alias = "vm-cpus")]
    pub cpus: Option<i64>,
    /// CPU kind (`shared` or `performance`).
    #[arg(long = "vm-cpu-kind")]
    pub cpu_kind: Option<String>,
    /// Restart policy: no, always, on-failure.
    #[arg(long)]
    pub restart: Option<String>,
    /// Replace the image's entrypoint (a shell-style string).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Metadata (repeatable).
    #[arg(long = "metadata", value_name = "K=V", value_parser = parse_kv)]
    pub metadata: Vec<(String, String)>,
}

#[derive(Subcommand, Debug)]
pub enum MachineCommand {
    /// Create and start a machine from an image.
    Run {
        image: String,
        /// Region to place it in.
        #[arg(short = 'r', long)]
        region: Option<String>,
        /// The machine's name.
        #[arg(short = 'n', long)]
        name: Option<String>,
        #[command(flatten)]
        flags: ConfigFlags,
        /// Destroy the machine when it exits.
        #[arg(long)]
        rm: bool,
        /// Do not wait for the machine to start.
        #[arg(short = 'd', long)]
        detach: bool,
        /// How long to wait for `started`.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        wait_timeout: Duration,
        /// The command, after `--`.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List the app's machines.
    #[command(alias = "ls")]
    List,
    /// Show one machine, its checks and recent events.
    Status { id: String },
    /// Start a stopped or suspended machine.
    Start { ids: Vec<String> },
    /// Stop a machine.
    Stop {
        ids: Vec<String>,
        /// Signal to send (default: the config's, else SIGINT).
        #[arg(short = 's', long)]
        signal: Option<String>,
        /// How long to wait before killing it (`10s`).
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Restart a machine.
    Restart {
        ids: Vec<String>,
        #[arg(short = 's', long)]
        signal: Option<String>,
    },
    /// Suspend a machine (snapshot its memory).
    Suspend { ids: Vec<String> },
    /// Destroy a machine.
    #[command(alias = "rm", alias = "remove")]
    Destroy {
        ids: Vec<String>,
        /// Kill it if it is running.
        #[arg(short = 'f', long)]
        force: bool,
    },
    /// Run a command in a machine.
    Exec {
        id: String,
        /// Seconds before the command is killed.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// The command, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Change a machine's config (a new version) and restart it.
    Update {
        id: String,
        #[arg(long)]
        image: Option<String>,
        #[command(flatten)]
        flags: ConfigFlags,
        /// Replace the command.
        #[arg(long)]
        command: Option<String>,
        #[arg(short = 'd', long)]
        detach: bool,
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        wait_timeout: Duration,
    },
    /// Create a new machine with the config of an existing one.
    Clone {
        id: String,
        #[arg(short = 'r', long)]
        region: Option<String>,
        #[arg(short = 'n', long)]
        name: Option<String>,
        #[arg(short = 'd', long)]
        detach: bool,
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        wait_timeout: Duration,
    },
}

/// Parses `EDGE[:INTERNAL][/PROTOCOL[:HANDLER...]]` into a service (one port).
pub fn parse_port(spec: &str) -> Result<MachineService> {
    let bad = |why: &str| anyhow::anyhow!("invalid --port {spec:?}: {why}");
    let (ports, proto) = match spec.split_once('/') {
        Some((p, rest)) => (p, Some(rest)),
        None => (spec, None),
    };
    let (edge, internal) = match ports.split_once(':') {
        Some((e, i)) => (e, Some(i)),
        None => (ports, None),
    };
    let num = |s: &str| -> Result<i64> {
        match s.parse::<i64>() {
            Ok(n) if (1..=65535).contains(&n) => Ok(n),
            _ => Err(bad("ports are numbers 1-65535")),
        }
    };
    let mut port = MachinePort::default();
    let edge_first = match edge.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return Err(bad("range start after end"));
            }
            port.start_port = Some(a);
            port.end_port = Some(b);
            a
        }
        None => {
            let p = num(edge)?;
            port.port = Some(p);
            p
        }
    };
    let internal_port = match internal {
        Some(i) => num(i)?,
        None => edge_first,
    };
    let mut protocol = "tcp".to_string();
    if let Some(rest) = proto {
        let mut parts = rest.split(':');
        protocol = parts.next().unwrap_or("tcp").to_ascii_lowercase();
        if protocol != "tcp" && protocol != "udp" {
            return Err(bad("protocol is tcp or udp"));
        }
        for h in parts {
            match h {
                "http" | "tls" | "proxy_proto" | "pg_tls" | "edge_http" => {
                    port.handlers.push(h.to_string())
                }
                _ => return Err(bad(&format!("unknown handler {h:?}"))),
            }
        }
    }
    Ok(MachineService {
        protocol,
        internal_port,
        ports: vec![port],
        ..Default::default()
    })
}

/// Applies the flags to a config (used for `run` from scratch and for `update`).
pub fn apply_flags(cfg: &mut MachineConfig, f: &ConfigFlags) -> Result<()> {
    for (k, v) in &f.env {
        cfg.env.insert(k.clone(), v.clone());
    }
    for (k, v) in &f.metadata {
        cfg.metadata.insert(k.clone(), v.clone());
    }
    if !f.port.is_empty() {
        let mut services: Vec<MachineService> = Vec::new();
        for spec in &f.port {
            let s = parse_port(spec)?;
            match services
                .iter_mut()
                .find(|x| x.internal_port == s.internal_port && x.protocol == s.protocol)
            {
                Some(x) => x.ports.extend(s.ports),
                None => services.push(s),
            }
        }
        cfg.services = services;
    }
    if f.memory.is_some() || f.cpus.is_some() || f.cpu_kind.is_some() {
        let g = cfg.guest.get_or_insert_with(|| MachineGuest {
            cpu_kind: "shared".into(),
            cpus: 1,
            memory_mb: 256,
            ..Default::default()
        });
        if let Some(m) = f.memory {
            if m <= 0 {
                bail!("--memory must be positive, got {m}");
            }
            g.memory_mb = m;
        }
        if let Some(c) = f.cpus {
            if c <= 0 {
                bail!("--cpus must be positive, got {c}");
            }
            g.cpus = c;
        }
        if let Some(k) = &f.cpu_kind {
            g.cpu_kind = k.clone();
        }
    }
    if let Some(p) = &f.restart {
        if !matches!(p.as_str(), "no" | "always" | "on-failure") {
            bail!("--restart must be no, always or on-failure, got {p:?}");
        }
        cfg.restart = Some(MachineRestart {
            policy: p.clone(),
            ..Default::default()
        });
    }
    if let Some(e) = &f.entrypoint {
        cfg.init.entrypoint = Some(split_words(e)?);
    }
    Ok(())
}

pub fn split_words(s: &str) -> Result<Vec<String>> {
    // Simple shell-style split: quotes group words.
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut has = false;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                has = true;
            }
            (None, c) if c.is_whitespace() => {
                if has || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    has = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if quote.is_some() {
        bail!("unterminated quote in {s:?}");
    }
    if has || !cur.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

/// One-line description of a machine for human output.
pub fn machine_row(m: &Machine) -> Vec<String> {
    vec![
        m.id.clone(),
        m.name.clone(),
        m.state.to_string(),
        m.region.clone(),
        machine_group(m),
        m.config.image.clone(),
        m.instance_id.clone(),
        checks_summary(m),
        m.updated_at.clone(),
    ]
}

pub const MACHINE_HEADER: &[&str] = &[
    "ID", "NAME", "STATE", "REGION", "PROCESS", "IMAGE", "VERSION", "CHECKS", "UPDATED",
];

/// Waits for `started` unless `detach`; prints the machine.
async fn finish_launch(
    api: &Api,
    app: &str,
    m: Machine,
    detach: bool,
    timeout: Duration,
    json: bool,
    verb: &str,
) -> Result<ExitCode> {
    let mut m = m;
    if !detach {
        let w = api
            .wait_machine(app, &m.id, "started", Some(&m.instance_id), timeout)
            .await?;
        if !w.ok && w.state != "started" {
            bail!(
                "machine {} of app {app} did not start within {}s (state {})",
                m.id,
                timeout.as_secs(),
                w.state
            );
        }
        m = api.get_machine(app, &m.id).await?;
    }
    if json {
        print_json(&m)?;
    } else {
        println!(
            "{verb} machine {} ({}) in app {app}, region {}: {}",
            m.id, m.name, m.region, m.state
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: MachineArgs, data_dir: &DataDir) -> Result<ExitCode> {
    let common = args.common;
    let app = common.app()?;
    let api = Api::connect(data_dir)?;
    let json = common.json;
    block_on(async move {
        match args.cmd {
            MachineCommand::Run {
                image,
                region,
                name,
                flags,
                rm,
                detach,
                wait_timeout,
                command,
            } => {
                let mut cfg = MachineConfig {
                    image: image.clone(),
                    auto_destroy: rm,
                    ..Default::default()
                };
                apply_flags(&mut cfg, &flags)?;
                if !command.is_empty() {
                    cfg.init.cmd = Some(command);
                }
                let m = api
                    .create_machine(&app, &cfg, region.as_deref(), name.as_deref(), false)
                    .await?;
                if !json {
                    eprintln!("created machine {} from {image}", m.id);
                }
                finish_launch(&api, &app, m, detach, wait_timeout, json, "started").await
            }
            MachineCommand::List => {
                let ms = api.list_machines(&app).await?;
                if json {
                    print_json(&ms)?;
                } else if ms.is_empty() {
                    println!("app {app} has no machines");
                } else {
                    let rows: Vec<_> = ms.iter().map(machine_row).collect();
                    print_table(MACHINE_HEADER, &rows);
                }
                Ok(ExitCode::SUCCESS)
            }
            MachineCommand::Status { id } => {
                let m = api.get_machine(&app, &id).await?;
                let events: Vec<aloft_types::machine::MachineEvent> = api
                    .get(&format!(
                        "/apps/{}/machines/{}/events?limit=20",
                        enc(&app),
                        enc(&id)
                    ))
                    .await
                    .unwrap_or_else(|_| m.events.clone());
                if json {
                    let mut v = serde_json::to_value(&m)?;
                    v["events"] = serde_json::to_value(&events)?;
                    print_json(&v)?;
                    return Ok(ExitCode::SUCCESS);
                }
                println!("machine {} ({}) of app {app}", m.id, m.name);
                println!("  state     {}", m.state);
                println!("  region    {}", m.region);
                println!("  image     {}", m.config.image);
                println!("  version   {}", m.instance_id);
                println!("  process   {}", machine_group(&m));
                println!("  private   {}", m.private_ip);
                println!("  created   {}", m.created_at);
                println!("  updated   {}", m.updated_at);
                if !m.checks.is_empty() {
                    println!("checks:");
                    for c in &m.checks {
                        println!("  {:<20} {:<9} {}", c.name, c.status, c.output.trim());
                    }
                }
                if !events.is_empty() {
                    println!("events:");
                    for e in &events {
                        println!(
                            "  {}  {:<9} {:<10} {}",
                            e.timestamp, e.kind, e.status, e.source
                        );
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            MachineCommand::Start { ids } => {
                simple_action(&api, &app, &ids, "start", json!({}), json, "started").await
            }
            MachineCommand::Stop {
                ids,
                signal,
                timeout,
            } => {
                let mut body = json!({});
                if let Some(s) = signal {
                    body["signal"] = s.into();
                }
                if let Some(t) = timeout {
                    parse_duration(&t).map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
                    body["timeout"] = t.into();
                }
                simple_action(&api, &app, &ids, "stop", body, json, "stopped").await
            }
            MachineCommand::Restart { ids, signal } => {
                let action = match &signal {
                    Some(s) => format!("restart?signal={}", enc(s)),
                    None => "restart".to_string(),
                };
                simple_action(&api, &app, &ids, &action, json!({}), json, "restarted").await
            }
            MachineCommand::Suspend { ids } => {
                simple_action(&api, &app, &ids, "suspend", json!({}), json, "suspended").await
            }
            MachineCommand::Destroy { ids, force } => {
                if ids.is_empty() {
                    bail!("name at least one machine id");
                }
                let mut out = Vec::new();
                for id in &ids {
                    api.destroy_machine(&app, id, force).await?;
                    if !json {
                        println!("destroyed machine {id} of app {app}");
                    }
                    out.push(json!({ "id": id, "destroyed": true }));
                }
                if json {
                    print_json(&out)?;
                }
                Ok(ExitCode::SUCCESS)
            }
            MachineCommand::Exec {
                id,
                timeout,
                command,
            } => {
                let body = json!({ "command": command, "timeout": timeout });
                let out: serde_json::Value = api
                    .call(
                        reqwest::Method::POST,
                        &format!("/apps/{}/machines/{}/exec", enc(&app), enc(&id)),
                        Some(&body),
                        Some(Duration::from_secs(timeout + 30)),
                    )
                    .await
                    .with_context(|| format!("exec in machine {id} of app {app}"))?;
                let code = out.get("exit_code").and_then(|c| c.as_i64()).unwrap_or(0);
                if json {
                    print_json(&out)?;
                } else {
                    use std::io::Write;
                    let s = |k: &str| {
                        out.get(k)
                            .and_then(|v| v.as_str())
                            .unwrap_or_default()
                            .to_string()
                    };
                    std::io::stdout().write_all(s("stdout").as_bytes())?;
                    std::io::stderr().write_all(s("stderr").as_bytes())?;
                }
                Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
            }
            MachineCommand::Update {
                id,
                image,
                flags,
                command,
                detach,
                wait_timeout,
            } => {
                let cur = api.get_machine(&app, &id).await?;
                let mut cfg = cur.config.clone();
                if let Some(i) = image {
                    cfg.image = i;
                }
                apply_flags(&mut cfg, &flags)?;
                if let Some(c) = command {
                    cfg.init.cmd = Some(split_words(&c)?);
                }
                let m = api
                    .update_machine(&app, &id, &cfg, Some(&cur.instance_id), false)
                    .await?;
                finish_launch(&api, &app, m, detach, wait_timeout, json, "updated").await
            }
            MachineCommand::Clone {
                id,
                region,
                name,
                detach,
                wait_timeout,
            } => {
                let src = api.get_machine(&app, &id).await?;
                let region = region.unwrap_or_else(|| src.region.clone());
                let mut cfg = src.config.clone();
                // Volumes belong to one machine; a clone must get its own.
                if !cfg.mounts.is_empty() {
                    bail!(
                        "machine {id} of app {app} mounts a volume; create a volume and run a \
                         machine with it instead of cloning"
                    );
                }
                cfg.metadata.remove("fly_release_id");
                let m = api
                    .create_machine(&app, &cfg, Some(&region), name.as_deref(), false)
                    .await?;
                if !json {
                    eprintln!("cloned machine {id} into {}", m.id);
                }
                finish_launch(&api, &app, m, detach, wait_timeout, json, "started").await
            }
        }
    })?
}

async fn simple_action(
    api: &Api,
    app: &str,
    ids: &[String],
    action: &str,
    body: serde_json::Value,
    json: bool,
    past: &str,
) -> Result<ExitCode> {
    if ids.is_empty() {
        bail!("name at least one machine id");
    }
    let mut out = Vec::new();
    for id in ids {
        let v = api.machine_action(app, id, action, body.clone()).await?;
        if !json {
            println!("{past} machine {id} of app {app}");
        }
        out.push(json!({ "id": id, "ok": true, "response": v }));
    }
    if json {
        print_json(&out)?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        let s = parse_port("80:8080/tcp:http").unwrap();
        assert_eq!(s.internal_port, 8080);
        assert_eq!(s.ports[0].port, Some(80));
        assert_eq!(s.ports[0].handlers, vec!["http"]);
        let s = parse_port("443:8080/tcp:tls:http").unwrap();
        assert_eq!(s.ports[0].handlers, vec!["tls", "http"]);
        let s = parse_port("5000-5010:6000/udp").unwrap();
        assert_eq!(
            (
                s.ports[0].start_port,
                s.ports[0].end_port,
                s.protocol.as_str()
            ),
            (Some(5000), Some(5010), "udp")
        );
        assert_eq!(parse_port("8080").unwrap().internal_port, 8080);
        assert!(parse_port("http").is_err());
        assert!(parse_port("80:70000").is_err());
        assert!(parse_port("80/sctp").is_err());
        assert!(parse_port("80/tcp:bogus").is_err());
    }

    #[test]
    fn words() {
        assert_eq!(
            split_words(r#"sh -c "echo hi""#).unwrap(),
            vec!["sh", "-c", "echo hi"]
        );
        assert_eq!(split_words("a ''").unwrap(), vec!["a", ""]);
        assert!(split_words("'open").is_err());
    }

    #[test]
    fn flags_merge_ports_by_internal_port() {
        let mut c = MachineConfig::default();
        let f = ConfigFlags {
            port: vec!["80:8080/tcp:http".into(), "443:8080/tcp:tls:http".into()],
            memory: Some(512),
            ..Default::default()
        };
        apply_flags(&mut c, &f).unwrap();
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.services[0].ports.len(), 2);
        assert_eq!(c.guest.unwrap().memory_mb, 512);
    }
}
