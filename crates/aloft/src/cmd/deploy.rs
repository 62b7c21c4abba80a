//! `aloft deploy`: fly.toml + image -> the app's machines, group by group, with the
//! release command first, then a rolling (or immediate, canary, blue-green) update
//! that waits for each machine to start and pass its checks, and rolls every updated
//! machine back to its previous config when one does not.

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use aloft_types::appconfig::{self, AppConfig};
use aloft_types::datadir::DataDir;
use aloft_types::machine::{
    METADATA_PLATFORM_VERSION, METADATA_PROCESS_GROUP, Machine, MachineConfig, MachineRestart,
    MachineState, PLATFORM_VERSION_V2, RELEASE_COMMAND_GROUP,
};
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde::Serialize;

use super::client::{Api, ApiError, block_on, enc};
use super::common::{AppArgs, Progress, load_config, machine_group, parse_duration, print_json};
use super::logs::fetch_logs;

/// Metadata key holding the release version a machine was deployed with.
pub const METADATA_RELEASE_VERSION: &str = "fly_release_version";

#[derive(Args, Debug)]
pub struct DeployArgs {
    #[command(flatten)]
    pub common: AppArgs,
    /// The image to deploy (default: `[build] image`).
    #[arg(short = 'i', long)]
    pub image: Option<String>,
    /// rolling, immediate, canary or bluegreen (default: `[deploy] strategy`, else rolling).
    #[arg(long)]
    pub strategy: Option<String>,
    /// How long each machine may take to start and pass its checks (default:
    /// `[deploy] wait_timeout`, else 120s).
    #[arg(long, value_parser = parse_duration)]
    pub wait_timeout: Option<Duration>,
    /// Regions for the first machines of a new process group (one machine each).
    #[arg(long, value_delimiter = ',')]
    pub regions: Vec<String>,
    /// Only the given process groups (repeatable).
    #[arg(long = "process-groups", value_delimiter = ',')]
    pub only_groups: Vec<String>,
    /// Skip the release command.
    #[arg(long)]
    pub skip_release_command: bool,
}

impl DeployArgs {
    fn wait(&self) -> Duration {
        self.wait_timeout.unwrap_or(Duration::from_secs(120))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Rolling,
    Immediate,
    Canary,
    Bluegreen,
}

impl Strategy {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "" | "rolling" => Strategy::Rolling,
            "immediate" => Strategy::Immediate,
            "canary" => Strategy::Canary,
            "bluegreen" => Strategy::Bluegreen,
            other => {
                bail!("unknown deploy strategy {other:?}: rolling, immediate, canary or bluegreen")
            }
        })
    }
}

/// What a deploy did, for `--json`.
#[derive(Debug, Default, Serialize)]
struct Report {
    app: String,
    image: String,
    strategy: String,
    release_version: u64,
    /// The API recorded the release (and can roll back to it).
    release_recorded: bool,
    release_command: Option<ReleaseCommandReport>,
    groups: Vec<GroupReport>,
    destroyed_stale: Vec<String>,
    ok: bool,
    error: Option<String>,
}

#[derive(Debug, Default, Serialize)]
struct ReleaseCommandReport {
    machine_id: String,
    exit_code: Option<i64>,
}

#[derive(Debug, Default, Serialize)]
struct GroupReport {
    group: String,
    updated: Vec<String>,
    created: Vec<String>,
    destroyed: Vec<String>,
    rolled_back: Vec<String>,
}

pub fn run(mut args: DeployArgs, data_dir: &DataDir) -> Result<ExitCode> {
    let Some(loaded) = load_config(&args.common)? else {
        return Ok(ExitCode::FAILURE);
    };
    let cfg = loaded.config;
    if args.wait_timeout.is_none()
        && let Some(t) = cfg.deploy.as_ref().and_then(|d| d.wait_timeout.as_deref())
    {
        let d = appconfig::parse_go_duration(t)
            .map_err(|e| anyhow!("{}: [deploy] wait_timeout: {e}", loaded.file))?;
        args.wait_timeout = Some(d);
    }
    let app = match args.common.app.clone().filter(|a| !a.is_empty()) {
        Some(a) => a,
        None if !cfg.app_name.is_empty() => cfg.app_name.clone(),
        None => bail!(
            "no app: {} has no `app = \"NAME\"`; pass --app NAME",
            loaded.file
        ),
    };
    let image = args
        .image
        .clone()
        .or_else(|| cfg.build.as_ref().map(|b| b.image.clone()))
        .filter(|i| !i.is_empty())
        .ok_or_else(|| {
            anyhow!(
                "no image to deploy: pass --image REF or set [build] image in {}",
                loaded.file
            )
        })?;
    let strategy = Strategy::parse(
        args.strategy
            .as_deref()
            .or_else(|| cfg.deploy.as_ref().map(|d| d.strategy.as_str()))
            .unwrap_or(""),
    )?;
    // Every group's config first: a bad group fails before anything changes.
    let mut groups: Vec<(String, MachineConfig)> = Vec::new();
    for g in appconfig::process_names(&cfg) {
        if !args.only_groups.is_empty() && !args.only_groups.contains(&g) {
            continue;
        }
        let mut mc = appconfig::to_machine_config(&cfg, Some(&g)).with_context(|| {
            format!(
                "{}: cannot build the machine config of group {g}",
                loaded.file
            )
        })?;
        mc.image = image.clone();
        groups.push((g, mc));
    }
    if let Some(g) = args
        .only_groups
        .iter()
        .find(|g| !groups.iter().any(|(n, _)| n == *g))
    {
        bail!("{}: no process group {g:?}", loaded.file);
    }
    let api = Api::connect(data_dir)?;
    let json = args.common.json;
    let mut report = Report {
        app: app.clone(),
        image: image.clone(),
        strategy: format!("{strategy:?}").to_lowercase(),
        ..Default::default()
    };
    let result = block_on(deploy(
        &api,
        &app,
        &cfg,
        &args,
        strategy,
        groups,
        &mut report,
    ))?;
    report.ok = result.is_ok();
    if let Err(e) = &result {
        report.error = Some(format!("{e:#}"));
    }
    if report.release_recorded {
        let status = if report.ok { "complete" } else { "failed" };
        let path = format!(
            "/apps/{}/releases/{}",
            crate::cmd::client::enc(&app),
            report.release_version
        );
        let _ = block_on(async {
            api.send(
                reqwest::Method::PATCH,
                &path,
                Some(&serde_json::json!({"status": status})),
                None,
            )
            .await
        });
    }
    if json {
        print_json(&report)?;
    }
    match result {
        Ok(()) => {
            if !json {
                println!(
                    "deployed {image} to app {app} (release v{}, {} strategy)",
                    report.release_version, report.strategy
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if json {
                Ok(ExitCode::FAILURE)
            } else {
                Err(e)
            }
        }
    }
}

async fn deploy(
    api: &Api,
    app: &str,
    cfg: &AppConfig,
    args: &DeployArgs,
    strategy: Strategy,
    groups: Vec<(String, MachineConfig)>,
    report: &mut Report,
) -> Result<()> {
    let progress = Progress::new();
    progress.step(format!("checking app {app}"));
    match api
        .get::<serde_json::Value>(&format!("/apps/{}", enc(app)))
        .await
    {
        Ok(_) => {}
        Err(e @ ApiError::Status { status: 404, .. }) => {
            return Err(anyhow!(e).context(format!(
                "app {app} does not exist: run `aloft launch` or `aloft apps create {app}`"
            )));
        }
        Err(e) => return Err(anyhow!(e).context(format!("app {app}"))),
    }
    let all = api.list_machines(app).await?;
    let (live, unmanaged): (Vec<Machine>, Vec<Machine>) = all
        .into_iter()
        .filter(|m| {
            !matches!(m.state, MachineState::Destroyed | MachineState::Destroying)
                && machine_group(m) != RELEASE_COMMAND_GROUP
        })
        .partition(is_deployed);
    if !unmanaged.is_empty() {
        let ids: Vec<&str> = unmanaged.iter().map(|m| m.id.as_str()).collect();
        progress.done(format!(
            "leaving {} machine(s) not made by a deploy alone: {}",
            ids.len(),
            ids.join(", ")
        ));
    }
    let from_machines = live
        .iter()
        .filter_map(|m| m.config.metadata.get(METADATA_RELEASE_VERSION))
        .filter_map(|v| v.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    // The API numbers releases and keeps their configs for `aloft releases rollback`;
    // an API without releases leaves the numbering to the machines' metadata.
    let configs: std::collections::BTreeMap<String, MachineConfig> =
        groups.iter().cloned().collect();
    let recorded: Option<serde_json::Value> = api
        .post(
            &format!("/apps/{}/releases", crate::cmd::client::enc(app)),
            &serde_json::json!({
                "image": groups.first().map(|(_, c)| c.image.clone()).unwrap_or_default(),
                "configs": configs,
                "strategy": report.strategy,
                "description": "aloft deploy",
                "status": "running",
            }),
        )
        .await
        .ok();
    let version = recorded
        .as_ref()
        .and_then(|r| r.get("version").and_then(|v| v.as_u64()))
        .unwrap_or(from_machines);
    report.release_version = version;
    report.release_recorded = recorded.is_some();
    let groups: Vec<(String, MachineConfig)> = groups
        .into_iter()
        .map(|(g, mut mc)| {
            mc.metadata
                .insert(METADATA_RELEASE_VERSION.into(), version.to_string());
            (g, mc)
        })
        .collect();

    // The release command, in a machine of its own, before anything changes.
    let release_command = cfg
        .deploy
        .as_ref()
        .map(|d| d.release_command.trim().to_string())
        .filter(|c| !c.is_empty());
    if let (Some(cmd), false) = (release_command, args.skip_release_command) {
        let base = groups
            .iter()
            .find(|(g, _)| *g == appconfig::default_group(cfg))
            .or(groups.first())
            .map(|(_, c)| c.clone())
            .unwrap_or_default();
        let timeout = cfg
            .deploy
            .as_ref()
            .and_then(|d| d.release_command_timeout.as_deref())
            .and_then(|t| appconfig::parse_go_duration(t).ok())
            .unwrap_or(Duration::from_secs(300));
        let region = (!cfg.primary_region.is_empty()).then_some(cfg.primary_region.as_str());
        let rc = run_release_command(api, app, base, &cmd, region, timeout, &progress).await?;
        report.release_command = Some(rc);
    }

    for (group, mc) in &groups {
        let mut gr = GroupReport {
            group: group.clone(),
            ..Default::default()
        };
        let existing: Vec<Machine> = live
            .iter()
            .filter(|m| machine_group(m) == *group)
            .cloned()
            .collect();
        let leases = acquire_leases(api, app, &existing, args.wait(), &progress).await?;
        let r = deploy_group(
            api, app, cfg, args, group, mc, strategy, &existing, &leases, &progress, &mut gr,
        )
        .await;
        release_leases(api, app, &leases).await;
        report.groups.push(gr);
        r.with_context(|| format!("deploying process group {group} of app {app}"))?;
    }

    // Machines of groups that are no longer in the config go away, as flyctl does.
    if args.only_groups.is_empty() {
        for m in live
            .iter()
            .filter(|m| !groups.iter().any(|(g, _)| *g == machine_group(m)))
        {
            progress.step(format!(
                "destroying machine {} of process group {} (no longer in the config)",
                m.id,
                machine_group(m)
            ));
            api.destroy_machine(app, &m.id, true).await?;
            progress.done(format!("destroyed machine {} ({})", m.id, machine_group(m)));
            report.destroyed_stale.push(m.id.clone());
        }
    }
    progress.finish();
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn deploy_group(
    api: &Api,
    app: &str,
    cfg: &AppConfig,
    args: &DeployArgs,
    group: &str,
    mc: &MachineConfig,
    strategy: Strategy,
    existing: &[Machine],
    leases: &HashMap<String, String>,
    progress: &Progress,
    gr: &mut GroupReport,
) -> Result<()> {
    if existing.is_empty() {
        create_first(api, app, cfg, args, group, mc, strategy, progress, gr).await
    } else {
        match strategy {
            Strategy::Rolling | Strategy::Immediate => {
                rolling(api, app, args, mc, existing, strategy, leases, progress, gr).await
            }
            Strategy::Canary => {
                let region = existing[0].region.clone();
                progress.step(format!("[{group}] creating a canary machine in {region}"));
                let canary = api
                    .create_machine(app, &without_mounts(mc), Some(&region), None, false)
                    .await?;
                gr.created.push(canary.id.clone());
                let ok = wait_healthy(api, app, &canary, args.wait(), progress).await;
                progress.step(format!("[{group}] destroying canary {}", canary.id));
                let destroyed = api.destroy_machine(app, &canary.id, true).await;
                gr.destroyed.push(canary.id.clone());
                ok.with_context(|| format!("canary machine {} failed", canary.id))?;
                destroyed?;
                progress.done(format!("[{group}] canary {} healthy", canary.id));
                rolling(
                    api,
                    app,
                    args,
                    mc,
                    existing,
                    Strategy::Rolling,
                    leases,
                    progress,
                    gr,
                )
                .await
            }
            Strategy::Bluegreen => {
                bluegreen(api, app, args, mc, existing, leases, progress, gr).await
            }
        }
    }
}

/// Leases every machine about to change, so that a concurrent deploy or command cannot
/// interleave; all or none.
async fn acquire_leases(
    api: &Api,
    app: &str,
    machines: &[Machine],
    wait: Duration,
    progress: &Progress,
) -> Result<HashMap<String, String>> {
    let ttl = wait * (machines.len() as u32 + 1) + Duration::from_secs(60);
    let mut out = HashMap::new();
    for m in machines {
        progress.step(format!("leasing machine {}", m.id));
        match api.acquire_lease(app, &m.id, ttl, "aloft deploy").await {
            Ok(nonce) => {
                out.insert(m.id.clone(), nonce);
            }
            Err(e) => {
                release_leases(api, app, &out).await;
                return Err(e);
            }
        }
    }
    Ok(out)
}

/// Best effort: a destroyed machine's lease is gone with it.
async fn release_leases(api: &Api, app: &str, leases: &HashMap<String, String>) {
    for (id, nonce) in leases {
        let _ = api.release_lease(app, id, nonce).await;
    }
}

/// The client to change machine `id` with: carrying its lease when we hold one.
fn leased(api: &Api, leases: &HashMap<String, String>, id: &str) -> Api {
    leases
        .get(id)
        .map_or_else(|| api.clone(), |n| api.with_lease(n))
}

/// Was this machine made by a deploy (fly.toml's platform metadata), rather than by
/// `aloft machine run` or the API directly? Only those are deploy's to change.
pub fn is_deployed(m: &Machine) -> bool {
    m.config
        .metadata
        .get(METADATA_PLATFORM_VERSION)
        .is_some_and(|v| v == PLATFORM_VERSION_V2)
}

/// A volume belongs to one machine; temporary machines go without mounts.
fn without_mounts(mc: &MachineConfig) -> MachineConfig {
    let mut c = mc.clone();
    c.mounts.clear();
    c
}

#[allow(clippy::too_many_arguments)]
async fn create_first(
    api: &Api,
    app: &str,
    cfg: &AppConfig,
    args: &DeployArgs,
    group: &str,
    mc: &MachineConfig,
    strategy: Strategy,
    progress: &Progress,
    gr: &mut GroupReport,
) -> Result<()> {
    let regions: Vec<Option<String>> = if !args.regions.is_empty() {
        args.regions.iter().map(|r| Some(r.clone())).collect()
    } else if !cfg.primary_region.is_empty() {
        vec![Some(cfg.primary_region.clone())]
    } else {
        vec![None]
    };
    let mut created = Vec::new();
    for region in &regions {
        progress.step(format!(
            "[{group}] creating a machine{}",
            region
                .as_ref()
                .map(|r| format!(" in {r}"))
                .unwrap_or_default()
        ));
        let mut mc = mc.clone();
        attach_volumes(
            api,
            app,
            &mut mc,
            region.as_deref(),
            &initial_sizes(cfg),
            progress,
        )
        .await?;
        let m = api
            .create_machine(app, &mc, region.as_deref(), None, false)
            .await?;
        progress.done(format!(
            "[{group}] created machine {} in {}",
            m.id, m.region
        ));
        gr.created.push(m.id.clone());
        created.push(m);
    }
    if strategy != Strategy::Immediate {
        for m in &created {
            wait_healthy(api, app, m, args.wait(), progress).await?;
        }
    }
    Ok(())
}

/// `[[mounts]] source` -> `initial_size` in GB (1 when unset).
pub fn initial_sizes(cfg: &AppConfig) -> BTreeMap<String, i64> {
    cfg.mounts
        .iter()
        .map(|m| {
            let gb = appconfig::parse_size(
                &m.initial_size,
                appconfig::SizeUnits::Decimal,
                1_000_000_000,
            )
            .ok()
            .filter(|n| *n > 0)
            .map_or(1, |n| n as i64);
            (m.source.clone(), gb)
        })
        .collect()
}

/// Gives every mount without a volume id a volume of its name: an unattached one in
/// the region if there is one, else a new one (as flyctl does for new machines).
pub async fn attach_volumes(
    api: &Api,
    app: &str,
    mc: &mut MachineConfig,
    region: Option<&str>,
    sizes: &BTreeMap<String, i64>,
    progress: &Progress,
) -> Result<()> {
    if mc.mounts.iter().all(|m| !m.volume.is_empty()) {
        return Ok(());
    }
    let vols: Vec<aloft_types::machine::Volume> = api
        .get(&format!("/apps/{}/volumes", enc(app)))
        .await
        .with_context(|| format!("listing the volumes of app {app}"))?;
    let mut taken: Vec<String> = Vec::new();
    for mount in mc.mounts.iter_mut().filter(|m| m.volume.is_empty()) {
        let free = vols.iter().find(|v| {
            v.name == mount.name
                && v.attached_machine_id.as_deref().is_none_or(str::is_empty)
                && v.state != "destroyed"
                && region.is_none_or(|r| v.region == r)
                && !taken.contains(&v.id)
        });
        let id = match free {
            Some(v) => v.id.clone(),
            None => {
                let size = sizes.get(&mount.name).copied().unwrap_or(1);
                progress.step(format!("creating volume {} ({size}GB)", mount.name));
                let mut body = serde_json::json!({ "name": mount.name, "size_gb": size });
                if let Some(r) = region {
                    body["region"] = r.into();
                }
                let v: aloft_types::machine::Volume = api
                    .post(&format!("/apps/{}/volumes", enc(app)), &body)
                    .await
                    .with_context(|| format!("creating volume {} for app {app}", mount.name))?;
                progress.done(format!(
                    "created volume {} ({}) in {}",
                    v.name, v.id, v.region
                ));
                v.id
            }
        };
        taken.push(id.clone());
        mount.volume = id;
    }
    Ok(())
}

/// Keeps volume attachments of the machine being updated (the group config names
/// volumes by name; the machine has them by id).
fn config_for(existing: &Machine, new: &MachineConfig) -> MachineConfig {
    let mut c = new.clone();
    for mount in &mut c.mounts {
        if mount.volume.is_empty()
            && let Some(old) = existing
                .config
                .mounts
                .iter()
                .find(|o| o.path == mount.path || (!o.name.is_empty() && o.name == mount.name))
        {
            mount.volume = old.volume.clone();
        }
    }
    c
}

fn was_down(m: &Machine) -> bool {
    matches!(
        m.state,
        MachineState::Stopped | MachineState::Suspended | MachineState::Created
    )
}

#[allow(clippy::too_many_arguments)]
async fn rolling(
    api: &Api,
    app: &str,
    args: &DeployArgs,
    mc: &MachineConfig,
    existing: &[Machine],
    strategy: Strategy,
    leases: &HashMap<String, String>,
    progress: &Progress,
    gr: &mut GroupReport,
) -> Result<()> {
    // (id, the config before the update, was it down, the new version)
    let mut done: Vec<(Machine, String)> = Vec::new();
    for listed in existing {
        let prev = api.get_machine(app, &listed.id).await?;
        let new_cfg = config_for(&prev, mc);
        let skip_launch = was_down(&prev);
        progress.step(format!(
            "updating machine {} [{}] ({})",
            prev.id,
            machine_group(&prev),
            prev.region
        ));
        let updated = match leased(api, leases, &prev.id)
            .update_machine(
                app,
                &prev.id,
                &new_cfg,
                Some(&prev.instance_id),
                skip_launch,
            )
            .await
        {
            Ok(m) => m,
            Err(e) => {
                rollback(api, app, &done, leases, progress, gr).await;
                return Err(e);
            }
        };
        gr.updated.push(prev.id.clone());
        let new_version = updated.instance_id.clone();
        done.push((prev.clone(), new_version.clone()));
        if strategy == Strategy::Immediate {
            progress.done(format!("updated machine {}", prev.id));
            continue;
        }
        if skip_launch {
            progress.done(format!(
                "updated machine {} (was {}, left so)",
                prev.id, prev.state
            ));
            continue;
        }
        if let Err(e) = wait_healthy(api, app, &updated, args.wait(), progress).await {
            progress.fail(format!("machine {} failed: {e:#}", prev.id));
            rollback(api, app, &done, leases, progress, gr).await;
            return Err(e.context(format!(
                "machine {} did not become healthy; rolled back {} machine(s)",
                prev.id,
                done.len()
            )));
        }
    }
    Ok(())
}

/// Puts every updated machine back on the config it had before (best effort; every
/// failure is printed).
async fn rollback(
    api: &Api,
    app: &str,
    done: &[(Machine, String)],
    leases: &HashMap<String, String>,
    progress: &Progress,
    gr: &mut GroupReport,
) {
    for (prev, new_version) in done.iter().rev() {
        progress.step(format!(
            "rolling back machine {} to version {}",
            prev.id, prev.instance_id
        ));
        match leased(api, leases, &prev.id)
            .update_machine(
                app,
                &prev.id,
                &prev.config,
                Some(new_version),
                was_down(prev),
            )
            .await
        {
            Ok(m) => {
                if !was_down(prev) {
                    let _ = api
                        .wait_machine(
                            app,
                            &m.id,
                            "started",
                            Some(&m.instance_id),
                            Duration::from_secs(60),
                        )
                        .await;
                }
                progress.done(format!("rolled back machine {}", prev.id));
                gr.rolled_back.push(prev.id.clone());
            }
            Err(e) => progress.fail(format!("could not roll back machine {}: {e:#}", prev.id)),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn bluegreen(
    api: &Api,
    app: &str,
    args: &DeployArgs,
    mc: &MachineConfig,
    existing: &[Machine],
    leases: &HashMap<String, String>,
    progress: &Progress,
    gr: &mut GroupReport,
) -> Result<()> {
    if existing.iter().any(|m| !m.config.mounts.is_empty()) {
        bail!("blue-green deploys cannot move volumes; use the rolling strategy");
    }
    let mut green: Vec<Machine> = Vec::new();
    let mut failure = None;
    for blue in existing {
        progress.step(format!(
            "creating a green machine for {} in {}",
            blue.id, blue.region
        ));
        match api
            .create_machine(app, mc, Some(&blue.region), None, false)
            .await
        {
            Ok(m) => {
                gr.created.push(m.id.clone());
                green.push(m);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if failure.is_none() {
        for m in &green {
            if let Err(e) = wait_healthy(api, app, m, args.wait(), progress).await {
                failure = Some(e.context(format!("green machine {} failed", m.id)));
                break;
            }
        }
    }
    if let Some(e) = failure {
        for m in &green {
            progress.step(format!("destroying green machine {}", m.id));
            if let Err(d) = api.destroy_machine(app, &m.id, true).await {
                progress.fail(format!("{d:#}"));
            } else {
                gr.destroyed.push(m.id.clone());
            }
        }
        return Err(e.context("blue-green deploy failed; the old machines were left untouched"));
    }
    for blue in existing {
        progress.step(format!("destroying blue machine {}", blue.id));
        leased(api, leases, &blue.id)
            .destroy_machine(app, &blue.id, true)
            .await?;
        gr.destroyed.push(blue.id.clone());
    }
    progress.done(format!("{} green machine(s) took over", green.len()));
    Ok(())
}

/// Number of checks the machine should report: top-level plus service checks.
fn expected_checks(c: &MachineConfig) -> usize {
    c.checks.len() + c.services.iter().map(|s| s.checks.len()).sum::<usize>()
}

/// Waits for `started` (this version), then for every check to pass, all within
/// `timeout`. The error names the failing check and its output.
pub async fn wait_healthy(
    api: &Api,
    app: &str,
    m: &Machine,
    timeout: Duration,
    progress: &Progress,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    progress.step(format!("waiting for machine {} to start", m.id));
    let w = api
        .wait_machine(app, &m.id, "started", Some(&m.instance_id), timeout)
        .await;
    let now = api.get_machine(app, &m.id).await?;
    if now.state != MachineState::Started {
        let why = match w {
            Err(e) => format!("{e:#}"),
            Ok(w) => format!(
                "state {}",
                if w.state.is_empty() {
                    now.state.to_string()
                } else {
                    w.state
                }
            ),
        };
        bail!(
            "machine {} of app {app} did not start within {}s: {why}{}",
            m.id,
            timeout.as_secs(),
            exit_note(&now)
        );
    }
    let expected = expected_checks(&now.config);
    if expected == 0 {
        progress.done(format!("machine {} started ({})", m.id, now.region));
        return Ok(());
    }
    progress.step(format!(
        "waiting for {expected} check(s) of machine {} to pass",
        m.id
    ));
    let mut delay = Duration::from_millis(200);
    loop {
        let cur = api.get_machine(app, &m.id).await?;
        let passing = cur.checks.iter().filter(|c| c.status == "passing").count();
        if cur.checks.len() >= expected && passing == cur.checks.len() {
            progress.done(format!(
                "machine {} started and passes {passing} check(s)",
                m.id
            ));
            return Ok(());
        }
        if matches!(
            cur.state,
            MachineState::Stopped | MachineState::Failed | MachineState::Destroyed
        ) {
            bail!(
                "machine {} of app {app} is {} while waiting for its checks{}",
                m.id,
                cur.state,
                exit_note(&cur)
            );
        }
        if Instant::now() >= deadline {
            let failing: Vec<String> = cur
                .checks
                .iter()
                .filter(|c| c.status != "passing")
                .map(|c| format!("check {} is {}: {}", c.name, c.status, c.output.trim()))
                .collect();
            let detail = if failing.is_empty() {
                format!("{} of {expected} check(s) reported", cur.checks.len())
            } else {
                failing.join("; ")
            };
            bail!(
                "machine {} of app {app} is not healthy after {}s: {detail}",
                m.id,
                timeout.as_secs()
            );
        }
        tokio::time::sleep(delay.min(deadline.saturating_duration_since(Instant::now()))).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// `(exit code 1)` from the machine's last exit event, when there is one.
fn exit_note(m: &Machine) -> String {
    match last_exit_code(&m.events) {
        Some(c) => format!(" (last exit code {c})"),
        None => String::new(),
    }
}

/// The exit code of the newest `exit` event.
pub fn last_exit_code(events: &[aloft_types::machine::MachineEvent]) -> Option<i64> {
    events
        .iter()
        .filter(|e| e.kind == "exit")
        .max_by_key(|e| e.timestamp)
        .and_then(|e| e.request.as_ref())
        .and_then(|r| {
            r.pointer("/exit_event/exit_code")
                .or_else(|| r.get("exit_code"))
                .and_then(|c| c.as_i64())
        })
}

async fn run_release_command(
    api: &Api,
    app: &str,
    base: MachineConfig,
    cmd: &str,
    region: Option<&str>,
    timeout: Duration,
    progress: &Progress,
) -> Result<ReleaseCommandReport> {
    let mut mc = base;
    mc.init.cmd = Some(super::machine::split_words(cmd)?);
    mc.services.clear();
    mc.checks.clear();
    mc.mounts.clear();
    mc.restart = Some(MachineRestart {
        policy: "no".into(),
        ..Default::default()
    });
    // Kept until its exit code and logs are read, then destroyed here.
    mc.auto_destroy = false;
    mc.metadata
        .insert(METADATA_PROCESS_GROUP.into(), RELEASE_COMMAND_GROUP.into());
    progress.step(format!("running release command `{cmd}`"));
    let m = api.create_machine(app, &mc, region, None, false).await?;
    let waited = api
        .wait_machine(app, &m.id, "stopped,failed", None, timeout)
        .await;
    let events: Vec<aloft_types::machine::MachineEvent> = api
        .get(&format!(
            "/apps/{}/machines/{}/events?limit=50",
            enc(app),
            enc(&m.id)
        ))
        .await
        .unwrap_or_default();
    let state = api.get_machine(app, &m.id).await.map(|x| x.state).ok();
    let code = last_exit_code(&events);
    let report = ReleaseCommandReport {
        machine_id: m.id.clone(),
        exit_code: code,
    };
    let ok = code == Some(0) && state != Some(MachineState::Failed);
    if !ok {
        progress.fail(format!(
            "release command `{cmd}` failed in machine {}",
            m.id
        ));
        match fetch_logs(api, app, Some(&m.id), None).await {
            Ok(lines) => {
                for l in lines {
                    eprintln!("  {} {}", l.stream, l.message);
                }
            }
            Err(e) => eprintln!("  (no logs: {e:#})"),
        }
    }
    let _ = api.destroy_machine(app, &m.id, true).await;
    if !ok {
        let why = match (code, &waited) {
            (Some(c), _) => format!("exited with code {c}"),
            (None, Err(e)) => format!("did not finish within {}s: {e:#}", timeout.as_secs()),
            (None, Ok(w)) => format!("ended in state {} without an exit code", w.state),
        };
        bail!(
            "release command `{cmd}` (machine {}) {why}; deploy aborted, nothing changed",
            m.id
        );
    }
    progress.done(format!("release command `{cmd}` succeeded"));
    Ok(report)
}

/// Groups machines by process group (for status).
pub fn by_group(ms: &[Machine]) -> BTreeMap<String, Vec<&Machine>> {
    let mut out: BTreeMap<String, Vec<&Machine>> = BTreeMap::new();
    for m in ms {
        out.entry(machine_group(m)).or_default().push(m);
    }
    out
}
