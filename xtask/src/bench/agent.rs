//! `cargo xtask bench agent`: the in-process `aloft_agent::Agent` on real QEMU (TCG)
//! with a busybox httpd image and 128 MB guests.
//!
//! * create → started (the guest channel handshake) for 10 machines one by one, then
//!   for 10 at once;
//! * start-from-stopped against the boot floor, 5 rounds interleaved in the same run
//!   (goal ≤ 1.2×). The machine has an HTTP service, so the agent calls it `started`
//!   when its app accepts on the port (the guest's Ready): the floor it is held to is
//!   raw QEMU with the same kernel serving HTTP straight from its initramfs, until the
//!   first HTTP 200 (the init-marker floor is printed beside it);
//! * density: N idle machines (default 20), RSS per QEMU 5 s after the last started;
//! * agent restart with those N running: `detach_all` + drop, then `Agent::open` on the
//!   same data dir until all N are supervised again (goal < 1 s).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aloft_agent::{Agent, AgentApi, AgentConfig, CreateMachine, StopOptions};
use aloft_store::{SqliteStore, Store};
use aloft_testkit::{BusyboxHttpd, web_machine_config};
use aloft_types::machine::MachineState;
use aloft_vmm::{Accel, QemuVmm};
use anyhow::{Context, Result, bail};
use serde_json::json;

use super::boot::{BenchEnv, FloorKind, Mem, floor_boot_sized, memory_of, min_median, ms};
use crate::util::step;

const APP: &str = "bench";
const MEMORY_MB: i64 = 128;
/// The TCG translation cache of the agent's machines (and of the floor held to them).
const TB_SIZE_MB: Option<u32> = Some(aloft_vmm::qemu::DEFAULT_TCG_TB_SIZE_MB);
const SERIAL: usize = 10;
const ROUNDS: usize = 5;
const SETTLE: Duration = Duration::from_secs(5);

pub fn run(machines: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let env = BenchEnv::new()?;
    let result = rt.block_on(bench(&env, machines));
    env.reaper.reap();
    result
}

/// A busybox image serving /www on 8080, imported into the agent's image store.
fn busybox_image(data: &Path) -> Result<String> {
    Ok(BusyboxHttpd::new("bench:v1")
        .quiet()
        .import(data, &data.join("images"))?)
}

async fn open_agent(env: &BenchEnv, data: &Path, store: Arc<dyn Store>) -> Result<Agent> {
    let cfg = AgentConfig {
        host_id: "bench".into(),
        region: "local".into(),
        data_dir: data.to_path_buf(),
        kernel_dir: env.kernel_dir.clone(),
        init_bin: env.init_bin.clone(),
        memory_mb_total: 1 << 20,
        cpus_total: 1024,
        accel: Accel::Tcg,
        forward_addr: "127.0.0.1".into(),
        pull: Default::default(),
        tcg_tb_size_mb: TB_SIZE_MB,
    };
    Ok(Agent::open(cfg, store, Arc::new(QemuVmm)).await?)
}

/// Creates one machine; returns its id and the ms until it was `started`.
async fn create(a: &Agent, image: &str) -> Result<(String, f64)> {
    let t = Instant::now();
    let m = a
        .create_machine(CreateMachine {
            app: APP.into(),
            config: web_machine_config(image, MEMORY_MB),
            secrets: BTreeMap::new(),
            ..Default::default()
        })
        .await?;
    let took = ms(t);
    if m.state != MachineState::Started {
        bail!("machine {} is {:?} after create", m.id, m.state);
    }
    Ok((m.id, took))
}

async fn destroy_all(a: &Agent, ids: &mut Vec<String>) -> Result<()> {
    for id in ids.drain(..) {
        a.destroy_machine(APP, &id, true, None).await?;
    }
    Ok(())
}

fn qemu_pid(data: &Path, id: &str) -> Result<u32> {
    let path = data
        .join("machines")
        .join(id)
        .join(aloft_vmm::VmFiles::PIDFILE);
    Ok(std::fs::read_to_string(&path)
        .with_context(|| path.display().to_string())?
        .trim()
        .parse()?)
}

fn mem_available_mib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn timing_line(case: &str, samples: &[f64], extra: serde_json::Value) -> String {
    let (min, median) = min_median(samples);
    let max = samples.iter().copied().fold(0.0, f64::max);
    println!(
        "{case:<36} n={:<3} min {min:>7.0} ms  median {median:>7.0} ms  max {max:>7.0} ms",
        samples.len()
    );
    let mut line = json!({
        "bench": "agent",
        "case": case,
        "n": samples.len(),
        "min_ms": (min * 10.0).round() / 10.0,
        "median_ms": (median * 10.0).round() / 10.0,
        "max_ms": (max * 10.0).round() / 10.0,
    });
    if let (Some(obj), Some(more)) = (line.as_object_mut(), extra.as_object()) {
        obj.extend(more.clone());
    }
    line.to_string()
}

async fn bench(env: &BenchEnv, machines: usize) -> Result<()> {
    let data = env.dir().join("agent");
    std::fs::create_dir_all(&data)?;
    step("building and importing the busybox httpd image");
    let image = busybox_image(&data)?;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(data.join("catalog.db")).await?);
    let a = open_agent(env, &data, store.clone()).await?;
    let mut json_lines = Vec::new();

    step("warm-up (not counted): one create");
    let mut ids = vec![create(&a, &image).await?.0];
    destroy_all(&a, &mut ids).await?;

    step(&format!("create → started, {SERIAL} machines one by one"));
    let mut serial = Vec::new();
    for _ in 0..SERIAL {
        let (id, took) = create(&a, &image).await?;
        serial.push(took);
        ids.push(id);
    }
    destroy_all(&a, &mut ids).await?;

    step(&format!("create → started, {SERIAL} machines at once"));
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..SERIAL {
        let (a, image) = (a.clone(), image.clone());
        set.spawn(async move { create(&a, &image).await });
    }
    let mut concurrent = Vec::new();
    let mut failed = None;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok((id, took))) => {
                concurrent.push(took);
                ids.push(id);
            }
            Ok(Err(e)) => failed = Some(e),
            Err(e) => failed = Some(e.into()),
        }
    }
    let all_started = ms(t0);
    if let Some(e) = failed {
        return Err(e.context("concurrent create"));
    }
    destroy_all(&a, &mut ids).await?;

    step(&format!(
        "start-from-stopped vs the boot floor, {ROUNDS} interleaved rounds"
    ));
    let (id, _) = create(&a, &image).await?;
    ids.push(id.clone());
    let mut floor = Vec::new();
    let mut floor_marker = Vec::new();
    let mut restart = Vec::new();
    let mut before_qemu = Vec::new();
    for round in 1..=ROUNDS {
        let stopped = a
            .stop_machine(APP, &id, StopOptions::default(), None)
            .await?;
        if stopped.state != MachineState::Stopped {
            bail!("machine {id} is {:?} after stop", stopped.state);
        }
        // The same guest size and translation cache as the agent's machines.
        let f = floor_boot_sized(env, FloorKind::Http, TB_SIZE_MB, MEMORY_MB as u32).await?;
        floor.push(f.http_ms.context("the HTTP floor reports its first 200")?);
        floor_marker.push(f.marker_ms);
        f.end().await;
        let t = Instant::now();
        let wall = std::time::SystemTime::now();
        let m = a.start_machine(APP, &id, None).await?;
        restart.push(ms(t));
        // The agent's own work before QEMU runs: until QEMU wrote its pidfile.
        let pidfile = data
            .join("machines")
            .join(&id)
            .join(aloft_vmm::VmFiles::PIDFILE);
        if let Ok(spawned) = std::fs::metadata(&pidfile)
            .and_then(|m| m.modified())
            .map(|at| at.duration_since(wall).unwrap_or_default())
        {
            before_qemu.push(spawned.as_secs_f64() * 1e3);
        }
        if m.state != MachineState::Started {
            bail!("machine {id} is {:?} after start", m.state);
        }
        println!(
            "    round {round}: floor {:.0} ms, start-from-stopped {:.0} ms (QEMU pidfile after {:.0} ms)",
            floor[round - 1],
            restart[round - 1],
            before_qemu.last().copied().unwrap_or_default()
        );
    }
    destroy_all(&a, &mut ids).await?;

    step(&format!(
        "density: {machines} idle {MEMORY_MB} MB machines (two at a time)"
    ));
    let available_before = mem_available_mib();
    let mut density_create = Vec::new();
    while ids.len() < machines {
        let batch = (machines - ids.len()).min(2);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let (a, image) = (a.clone(), image.clone());
            set.spawn(async move { create(&a, &image).await });
        }
        while let Some(r) = set.join_next().await {
            let (id, took) = r??;
            density_create.push(took);
            ids.push(id);
        }
    }
    tokio::time::sleep(SETTLE).await;
    let mems = ids
        .iter()
        .map(|id| qemu_pid(&data, id).and_then(memory_of))
        .collect::<Result<Vec<Mem>>>()?;
    let available_after = mem_available_mib();

    step(&format!(
        "agent restart with {machines} running machines: re-attach"
    ));
    a.detach_all().await;
    drop(a);
    let t = Instant::now();
    let a = open_agent(env, &data, store.clone()).await?;
    let reattach_ms = ms(t);
    let running = a.running_count().await;
    if running != machines {
        bail!("{running} of {machines} machines re-attached");
    }
    for id in &ids {
        let m = a.get_machine(APP, id).await?;
        if m.state != MachineState::Started {
            bail!("machine {id} is {:?} after re-attach", m.state);
        }
    }
    a.detach_all().await;
    drop(a);

    println!();
    json_lines.push(timing_line(
        "create_to_started.serial",
        &serial,
        json!({"memory_mb": MEMORY_MB}),
    ));
    json_lines.push(timing_line(
        "create_to_started.concurrent",
        &concurrent,
        json!({"memory_mb": MEMORY_MB, "all_started_ms": (all_started * 10.0).round() / 10.0}),
    ));
    println!("{:<36} all {SERIAL} started after {all_started:.0} ms", "");
    json_lines.push(timing_line("floor.init_marker", &floor_marker, json!({})));
    json_lines.push(timing_line("floor.port_accepting", &floor, json!({})));
    let (_, floor_med) = min_median(&floor);
    let (_, restart_med) = min_median(&restart);
    let ratio = restart_med / floor_med;
    // Each round's start against the floor of the same round (the same background
    // load), their median: steadier than the ratio of medians on a busy host.
    let per_round: Vec<f64> = restart.iter().zip(&floor).map(|(r, f)| r / f).collect();
    let (_, paired) = min_median(&per_round);
    json_lines.push(timing_line(
        "start_from_stopped",
        &restart,
        json!({"ratio": (ratio * 100.0).round() / 100.0, "paired_ratio": (paired * 100.0).round() / 100.0, "against": "floor.port_accepting", "goal_ratio": 1.2}),
    ));
    println!(
        "{:<36} start-from-stopped / floor port accepting = {ratio:.2}, paired {paired:.2} (goal <= 1.2: {})",
        "",
        if ratio <= 1.2 { "ok" } else { "MISSED" }
    );
    json_lines.push(timing_line(
        "start_from_stopped.until_qemu_pidfile",
        &before_qemu,
        json!({}),
    ));
    json_lines.push(timing_line(
        "density.create_to_started",
        &density_create,
        json!({"machines": machines}),
    ));
    println!(
        "{:<36} {reattach_ms:.0} ms for {machines} machines (goal < 1000 ms: {})",
        "agent restart: re-attach",
        if reattach_ms < 1000.0 { "ok" } else { "MISSED" }
    );
    json_lines.push(
        json!({
            "bench": "agent",
            "case": "reattach",
            "machines": machines,
            "ms": (reattach_ms * 10.0).round() / 10.0,
            "goal_ms": 1000.0,
        })
        .to_string(),
    );
    let n = mems.len().max(1) as f64;
    let total_rss: f64 = mems.iter().map(|m| m.rss).sum();
    let total_pss: f64 = mems.iter().map(|m| m.pss).sum();
    let avg_shared = mems.iter().map(|m| m.shared).sum::<f64>() / n;
    let used = available_before - available_after;
    let fit = (available_before / (total_pss / n)).floor();
    println!(
        "{:<36} {machines} machines: RSS total {total_rss:.0} MiB, {:.1} MiB each (Pss {:.1}, shared {avg_shared:.1}); MemAvailable fell {used:.0} MiB; ~{fit:.0} such machines fit in the {available_before:.0} MiB available",
        "density",
        total_rss / n,
        total_pss / n
    );
    json_lines.push(
        json!({
            "bench": "agent",
            "case": "density",
            "machines": machines,
            "memory_mb": MEMORY_MB,
            "rss_total_mib": total_rss.round(),
            "rss_per_machine_mib": (total_rss / n * 10.0).round() / 10.0,
            "pss_per_machine_mib": (total_pss / n * 10.0).round() / 10.0,
            "shared_per_machine_mib": (avg_shared * 10.0).round() / 10.0,
            "mem_available_drop_mib": used.round(),
            "machines_fitting_estimate": fit,
        })
        .to_string(),
    );
    println!();
    for line in json_lines {
        println!("{line}");
    }
    Ok(())
}
