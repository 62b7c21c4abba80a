//! `aloft scale count N [--region a,b] [--process-group G]`, `aloft scale memory MB` and
//! `aloft scale vm SIZE [--vm-memory MB]` (Fly's size presets: shared-cpu-1x, …).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use aloft_types::appconfig;
use aloft_types::datadir::DataDir;
use aloft_types::machine::{GUEST_PRESETS, Machine, MachineGuest, MachineState};
use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use super::client::{Api, block_on};
use super::common::{AppArgs, Progress, machine_group, parse_duration, print_json};
use super::deploy::{attach_volumes, is_deployed, wait_healthy};

#[derive(Args, Debug)]
pub struct ScaleArgs {
    #[command(flatten)]
    pub common: AppArgs,
    #[command(subcommand)]
    pub cmd: ScaleCommand,
}

#[derive(Subcommand, Debug)]
pub enum ScaleCommand {
    /// Create or destroy machines until the group has N (spread over the regions).
    Count {
        count: usize,
        /// Regions to act on, comma-separated (default: the regions the group runs in,
        /// else the primary region).
        #[arg(short = 'r', long = "region", value_delimiter = ',')]
        regions: Vec<String>,
        /// The process group (default: `app`).
        #[arg(long = "process-group", default_value = appconfig::DEFAULT_GROUP)]
        group: String,
        /// Do not wait for new machines to start.
        #[arg(short = 'd', long)]
        detach: bool,
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        wait_timeout: Duration,
    },
    /// Set the memory of every machine (of one group with --process-group).
    Memory {
        mb: i64,
        #[arg(long = "process-group")]
        group: Option<String>,
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        wait_timeout: Duration,
    },
    /// Set the VM size (CPU kind, CPUs and memory) of every machine (of one group
    /// with --process-group): shared-cpu-1x/2x/4x/8x, performance-1x/2x/4x/8x/16x.
    Vm {
        size: String,
        /// Memory in MB instead of the size's default.
        #[arg(long = "vm-memory", value_name = "MB")]
        memory: Option<i64>,
        #[arg(long = "process-group")]
        group: Option<String>,
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        wait_timeout: Duration,
    },
}

/// The guest of `size` with `memory` (MB) instead of its default, checked against
/// Fly's limits: 256 MB to 2 GB per shared CPU, 2 to 8 GB per performance CPU, in
/// steps of 256 MB.
pub fn vm_guest(size: &str, memory: Option<i64>) -> Result<MachineGuest> {
    let Some(mut g) = MachineGuest::from_size(size) else {
        let names: Vec<&str> = GUEST_PRESETS
            .iter()
            .filter(|p| p.gpus == 0)
            .map(|p| p.name)
            .collect();
        bail!("unknown VM size {size:?}; sizes: {}", names.join(", "));
    };
    if g.gpus > 0 {
        bail!("VM size {size} needs a GPU, which Aloft machines do not have");
    }
    if let Some(mb) = memory {
        let (min, max) = if g.cpu_kind == "performance" {
            (2048 * g.cpus, 8192 * g.cpus)
        } else {
            (256, 2048 * g.cpus)
        };
        if mb % 256 != 0 || mb < min || mb > max {
            bail!(
                "--vm-memory {mb} does not fit {size}: want a multiple of 256 from {min} to {max} MB"
            );
        }
        g.memory_mb = mb;
    }
    Ok(g)
}

/// Applies `change` to the guest of every live machine (of `group`), one machine at a
/// time, waiting for each running one to be healthy again. Returns the ids updated.
async fn update_guests(
    api: &Api,
    app: &str,
    group: Option<&str>,
    wait_timeout: Duration,
    progress: &Progress,
    what: &str,
    change: impl Fn(&mut MachineGuest),
) -> Result<Vec<String>> {
    let machines: Vec<Machine> = api
        .list_machines(app)
        .await?
        .into_iter()
        .filter(|m| live(m) && group.is_none_or(|g| machine_group(m) == g))
        .collect();
    let mut updated = Vec::new();
    for m in &machines {
        let mut cfg = m.config.clone();
        let g = cfg.guest.get_or_insert_with(|| MachineGuest {
            cpu_kind: "shared".into(),
            cpus: 1,
            ..Default::default()
        });
        change(g);
        progress.step(format!("setting machine {} to {what}", m.id));
        let running = m.state == MachineState::Started;
        let u = api
            .update_machine(app, &m.id, &cfg, Some(&m.instance_id), !running)
            .await?;
        if running {
            wait_healthy(api, app, &u, wait_timeout, progress).await?;
        }
        updated.push(m.id.clone());
    }
    Ok(updated)
}

/// Spreads `total` over `regions` in order: 3 over [a, b] is a=2, b=1.
pub fn spread(total: usize, regions: &[String]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    if regions.is_empty() {
        return out;
    }
    for (i, r) in regions.iter().enumerate() {
        let share = total / regions.len() + usize::from(i < total % regions.len());
        *out.entry(r.clone()).or_insert(0) += share;
    }
    out
}

fn live(m: &Machine) -> bool {
    !matches!(m.state, MachineState::Destroyed | MachineState::Destroying)
}

pub fn run(args: ScaleArgs, data_dir: &DataDir) -> Result<ExitCode> {
    let app = args.common.app()?;
    let json = args.common.json;
    let primary = args
        .common
        .config_path()
        .and_then(|p| std::fs::read_to_string(&p).ok().map(|s| (p, s)))
        .and_then(|(p, s)| appconfig::parse_unvalidated(&s, &p.display().to_string()).ok())
        .map(|l| l.config.primary_region)
        .filter(|r| !r.is_empty());
    let api = Api::connect(data_dir)?;
    block_on(async move {
        let progress = Progress::new();
        match args.cmd {
            ScaleCommand::Count {
                count,
                regions,
                group,
                detach,
                wait_timeout,
            } => {
                let machines: Vec<Machine> = api
                    .list_machines(&app)
                    .await?
                    .into_iter()
                    .filter(|m| live(m) && is_deployed(m) && machine_group(m) == group)
                    .collect();
                let Some(template) = machines.first().cloned() else {
                    bail!(
                        "app {app} has no machine in process group {group} to copy; run `aloft deploy` first"
                    );
                };
                let regions = if !regions.is_empty() {
                    regions
                } else {
                    let mut rs: Vec<String> = Vec::new();
                    for m in &machines {
                        if !rs.contains(&m.region) {
                            rs.push(m.region.clone());
                        }
                    }
                    if rs.is_empty() {
                        rs.extend(primary.clone());
                    }
                    rs
                };
                let target = spread(count, &regions);
                // New volumes get the size of the template's.
                let mut sizes = BTreeMap::new();
                for m in &template.config.mounts {
                    let v: Result<aloft_types::machine::Volume, _> = api
                        .get(&format!(
                            "/apps/{}/volumes/{}",
                            super::client::enc(&app),
                            super::client::enc(&m.volume)
                        ))
                        .await;
                    sizes.insert(m.name.clone(), v.map_or(1, |v| v.size_gb));
                }
                let mut created = Vec::new();
                let mut destroyed = Vec::new();
                for (region, want) in &target {
                    let mut here: Vec<&Machine> =
                        machines.iter().filter(|m| &m.region == region).collect();
                    for _ in here.len()..*want {
                        progress.step(format!("creating a {group} machine in {region}"));
                        let mut cfg = template.config.clone();
                        for m in &mut cfg.mounts {
                            m.volume.clear();
                        }
                        attach_volumes(&api, &app, &mut cfg, Some(region), &sizes, &progress)
                            .await?;
                        let m = api
                            .create_machine(&app, &cfg, Some(region), None, false)
                            .await?;
                        progress.done(format!("created machine {} in {region}", m.id));
                        created.push(m);
                    }
                    if here.len() > *want {
                        // Stopped machines go first, then the newest.
                        here.sort_by_key(|m| {
                            (
                                m.state == MachineState::Started,
                                std::cmp::Reverse(m.created_at.clone()),
                            )
                        });
                        for m in here.iter().take(here.len() - *want) {
                            progress.step(format!("destroying machine {} in {region}", m.id));
                            api.destroy_machine(&app, &m.id, true).await?;
                            progress.done(format!("destroyed machine {} in {region}", m.id));
                            destroyed.push(m.id.clone());
                        }
                    }
                }
                if !detach {
                    for m in &created {
                        wait_healthy(&api, &app, m, wait_timeout, &progress).await?;
                    }
                }
                progress.finish();
                if json {
                    print_json(&json!({
                        "app": app,
                        "group": group,
                        "target": target,
                        "created": created.iter().map(|m| &m.id).collect::<Vec<_>>(),
                        "destroyed": destroyed,
                    }))?;
                } else {
                    let plan: Vec<String> =
                        target.iter().map(|(r, n)| format!("{r}={n}")).collect();
                    println!(
                        "app {app} group {group} scaled to {count} ({}): {} created, {} destroyed",
                        plan.join(", "),
                        created.len(),
                        destroyed.len()
                    );
                }
            }
            ScaleCommand::Memory {
                mb,
                group,
                wait_timeout,
            } => {
                if mb < 128 {
                    bail!("memory must be at least 128 MB, got {mb}");
                }
                let updated = update_guests(
                    &api,
                    &app,
                    group.as_deref(),
                    wait_timeout,
                    &progress,
                    &format!("{mb} MB"),
                    |g| g.memory_mb = mb,
                )
                .await?;
                progress.finish();
                if json {
                    print_json(&json!({ "app": app, "memory_mb": mb, "updated": updated }))?;
                } else {
                    println!("set {} machine(s) of app {app} to {mb} MB", updated.len());
                }
            }
            ScaleCommand::Vm {
                size,
                memory,
                group,
                wait_timeout,
            } => {
                let guest = vm_guest(&size, memory)?;
                let what = format!(
                    "{size} ({} {} CPU, {} MB)",
                    guest.cpus, guest.cpu_kind, guest.memory_mb
                );
                let updated = update_guests(
                    &api,
                    &app,
                    group.as_deref(),
                    wait_timeout,
                    &progress,
                    &what,
                    |g| {
                        g.cpu_kind = guest.cpu_kind.clone();
                        g.cpus = guest.cpus;
                        g.memory_mb = guest.memory_mb;
                    },
                )
                .await?;
                progress.finish();
                if json {
                    print_json(&json!({
                        "app": app,
                        "size": size,
                        "cpu_kind": guest.cpu_kind,
                        "cpus": guest.cpus,
                        "memory_mb": guest.memory_mb,
                        "updated": updated,
                    }))?;
                } else {
                    println!("set {} machine(s) of app {app} to {what}", updated.len());
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_evenly_in_order() {
        let rs = vec!["ams".to_string(), "syd".to_string()];
        let s = spread(3, &rs);
        assert_eq!((s["ams"], s["syd"]), (2, 1));
        let s = spread(0, &rs);
        assert_eq!((s["ams"], s["syd"]), (0, 0));
        assert!(spread(2, &[]).is_empty());
    }

    #[test]
    fn vm_sizes_and_memory_limits() {
        let g = vm_guest("shared-cpu-2x", None).unwrap();
        assert_eq!(
            (g.cpu_kind.as_str(), g.cpus, g.memory_mb),
            ("shared", 2, 512)
        );
        let g = vm_guest("performance-1x", Some(4096)).unwrap();
        assert_eq!(
            (g.cpu_kind.as_str(), g.cpus, g.memory_mb),
            ("performance", 1, 4096)
        );
        assert!(vm_guest("shared-cpu-1x", Some(4096)).is_err());
        assert!(vm_guest("shared-cpu-1x", Some(300)).is_err());
        assert!(vm_guest("performance-2x", Some(2048)).is_err());
        assert!(vm_guest("a100-40gb", None).is_err());
        let e = vm_guest("huge", None).unwrap_err().to_string();
        assert!(e.contains("shared-cpu-1x") && !e.contains("a100"), "{e}");
    }
}
