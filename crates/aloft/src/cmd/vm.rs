//! `aloft vm run IMAGE`: one VM in the foreground, like `docker run`.
//!
//! The image is found in the cache, imported (a path to an archive or OCI layout) or
//! pulled; the machine gets its own directory (overlay, initrd, sockets), user-mode
//! networking with the `-p` forwards, and its app's output on this terminal as the
//! guest sends it. Ctrl-C (or SIGTERM) stops it gracefully: the kill signal to the app,
//! SIGKILL after the kill timeout, power off, and QEMU is killed if it still runs.
//! The app's exit code becomes ours (a signal n gives 128 + n), and the machine
//! directory is removed afterwards.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use aloft_image::{ImageRecord, ImageStore, PullOptions, normalise_reference};
use aloft_types::datadir::DataDir;
use aloft_types::guest::{
    self, GuestMessage, InterfaceConfig, NetworkConfig, RunConfig, Stream, signal_number,
};
use aloft_vmm::channel::GuestChannel;
use aloft_vmm::qemu::{self, QemuVm};
use aloft_vmm::{Accel, PortForward, VmNetwork, VmSpec};
use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use tokio::sync::broadcast::error::RecvError;

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Run an image as one VM in the foreground (logs here, Ctrl-C stops it, its exit
    /// code becomes this command's).
    Run(RunArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Image reference (cached, or pulled), image digest, or the path of a
    /// `docker save` tarball / OCI layout to import.
    pub image: String,
    /// Environment variable for the app (repeatable).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Guest memory in MB.
    #[arg(long, default_value_t = 256)]
    pub memory: u32,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Forward a host port to a guest port (`[ADDR:]HOST:GUEST`, repeatable; the
    /// address defaults to 127.0.0.1).
    #[arg(short = 'p', long = "publish", value_name = "HOST:GUEST")]
    pub publish: Vec<String>,
    /// Replace the image's entrypoint (split on white space).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Signal the app gets on Ctrl-C.
    #[arg(long, default_value = "SIGINT")]
    pub kill_signal: String,
    /// How long the app has to exit after the kill signal before it is killed.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub kill_timeout: Duration,
    /// Accelerator: auto (KVM when it works, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: String,
    /// Registry (host[:port]) to pull from over plain HTTP. Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// Print when each boot stage was reached (to stderr).
    #[arg(long)]
    pub boot_timeline: bool,
    /// The command (replaces the image's CMD).
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

pub fn run(cmd: VmCommand, data_dir: &DataDir) -> Result<ExitCode> {
    match cmd {
        VmCommand::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let code = rt.block_on(run_vm(args, data_dir))?;
            Ok(ExitCode::from(code))
        }
    }
}

/// How long the guest may take to boot to its first message.
const BOOT_LIMIT: Duration = Duration::from_secs(120);

fn parse_duration(s: &str) -> Result<Duration, String> {
    aloft_types::appconfig::parse_go_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

/// One `-p` forward.
fn parse_publish(s: &str) -> Result<PortForward> {
    let parts: Vec<&str> = s.rsplitn(3, ':').collect();
    let (addr, host, guest) = match parts.as_slice() {
        [guest, host] => ("127.0.0.1", *host, *guest),
        [guest, host, addr] => (*addr, *host, *guest),
        _ => bail!("-p {s:?}: use HOST:GUEST or ADDR:HOST:GUEST"),
    };
    let port = |p: &str, what: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| anyhow!("-p {s:?}: {what} port {p:?} is not a port number"))
    };
    Ok(PortForward {
        host_addr: addr.trim_matches(['[', ']']).to_string(),
        host_port: port(host, "host")?,
        guest_port: port(guest, "guest")?,
    })
}

fn parse_env(kv: &str) -> Result<(String, String)> {
    match kv.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => bail!("-e {kv:?}: use KEY=VALUE"),
    }
}

/// Finds the image: a path is imported, a cached reference or digest is used as it
/// is, anything else is pulled.
async fn resolve_image(
    store: &ImageStore,
    image: &str,
    insecure: &[String],
) -> Result<ImageRecord> {
    let path = Path::new(image);
    if path.exists() {
        let imported = aloft_image::import(store, path, &aloft_image::no_progress())
            .with_context(|| format!("importing the image from {}", path.display()))?;
        return Ok(imported.record);
    }
    let normalised = normalise_reference(image);
    if let Ok(rec) = store.lookup(image, normalised.as_deref()) {
        return Ok(rec);
    }
    if normalised.is_none() {
        bail!("image {image:?} is neither a cached image, an archive path nor a valid reference");
    }
    let opts = PullOptions {
        insecure_registries: insecure.to_vec(),
        ..Default::default()
    };
    eprintln!("pulling {image} …");
    let pulled = aloft_image::pull(store, image, &opts, aloft_image::no_progress())
        .await
        .with_context(|| format!("image {image:?} is not cached and could not be pulled"))?;
    Ok(pulled.record)
}

fn run_config(
    id: &str,
    args: &RunArgs,
    image: &ImageRecord,
    forwards: &[PortForward],
) -> Result<RunConfig> {
    let ic = &image.config;
    let mut extra = BTreeMap::new();
    for (k, v) in [
        ("APP_NAME", "vm"),
        ("MACHINE_ID", id),
        ("ALLOC_ID", id),
        ("REGION", "local"),
        ("PRIVATE_IP", "10.0.2.15"),
        ("IMAGE_REF", args.image.as_str()),
        ("MACHINE_VERSION", "1"),
        ("PROCESS_GROUP", "app"),
    ] {
        extra.insert(format!("FLY_{k}"), v.to_string());
        extra.insert(format!("ALOFT_{k}"), v.to_string());
    }
    for kv in &args.env {
        let (k, v) = parse_env(kv)?;
        extra.insert(k, v);
    }
    let mut cfg = RunConfig {
        machine_id: id.to_string(),
        app_name: "vm".into(),
        region: "local".into(),
        image_ref: args.image.clone(),
        machine_version: "1".into(),
        hostname: id.to_string(),
        process_group: "app".into(),
        image_config: guest::ImageConfig {
            entrypoint: ic.entrypoint.clone().unwrap_or_default(),
            cmd: ic.cmd.clone().unwrap_or_default(),
            env: ic.env.clone(),
            working_dir: ic.working_dir.clone().unwrap_or_default(),
            user: ic.user.clone().unwrap_or_default(),
            exposed_ports: ic.exposed_ports.clone(),
            labels: ic.labels.clone(),
        },
        extra_env: extra,
        network: NetworkConfig {
            interfaces: vec![InterfaceConfig {
                name: "eth0".into(),
                addresses: vec!["10.0.2.15/24".into()],
                gateway4: Some("10.0.2.2".into()),
                ..Default::default()
            }],
            dns_servers: vec!["10.0.2.3".into()],
            extra_hosts: vec![],
        },
        kill_timeout_ms: args.kill_timeout.as_millis() as u64,
        kill_signal: args.kill_signal.clone(),
        root_device: "/dev/vda".into(),
        ..Default::default()
    };
    if let Some(ep) = &args.entrypoint {
        cfg.config.init.entrypoint = Some(ep.split_whitespace().map(String::from).collect());
    }
    if !args.cmd.is_empty() {
        cfg.config.init.cmd = Some(args.cmd.clone());
    }
    // The app counts as accepting once a published port listens (else an exposed one).
    let mut ready: Vec<u16> = forwards.iter().map(|f| f.guest_port).collect();
    if ready.is_empty() {
        ready = ic
            .exposed_ports
            .iter()
            .filter(|p| !p.ends_with("/udp"))
            .filter_map(|p| p.split('/').next()?.parse().ok())
            .collect();
    }
    ready.dedup();
    cfg.ready_ports = ready;
    cfg.command()
        .map_err(|_| anyhow!("image {:?} has no entrypoint or cmd, and none was given (add `-- CMD …` or --entrypoint)", args.image))?;
    Ok(cfg)
}

fn unique_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("vm-{}-{nanos:08x}", std::process::id())
}

/// Removes the machine directory on every way out, and kills a QEMU still running.
struct Cleanup {
    dir: PathBuf,
    pid: Option<i32>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            // QEMU daemonized, so it is not our child: kill it by the pid it wrote.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn run_vm(args: RunArgs, data_dir: &DataDir) -> Result<u8> {
    let accel = match args.accel.as_str() {
        "auto" => Accel::Auto,
        "kvm" => Accel::Kvm,
        "tcg" => Accel::Tcg,
        other => bail!("--accel {other:?}: use auto, kvm or tcg"),
    };
    if args.memory < qemu::MIN_MEMORY_MB {
        bail!(
            "--memory {} MB is below the minimum of {} MB",
            args.memory,
            qemu::MIN_MEMORY_MB
        );
    }
    if args.cpus == 0 {
        bail!("--cpus must be at least 1");
    }
    let kill_signal = signal_number(&args.kill_signal)
        .ok_or_else(|| anyhow!("--kill-signal {:?} is not a signal", args.kill_signal))?;
    let forwards = args
        .publish
        .iter()
        .map(|p| parse_publish(p))
        .collect::<Result<Vec<_>>>()?;
    let kernel_dir = data_dir.kernel_dir();
    aloft_vmm::kernel::GuestKernel::from_dir(&kernel_dir).map_err(|e| {
        anyhow!("{e} (or pass --data-dir pointing at a data directory set up with a kernel)")
    })?;
    let init_bin = super::dev::find_init_bin()?;

    let store = ImageStore::open(data_dir.images_dir()).with_context(|| {
        format!(
            "opening the image cache in {}",
            data_dir.images_dir().display()
        )
    })?;
    let image = resolve_image(&store, &args.image, &args.insecure_registries).await?;
    let id = unique_id();
    let run = run_config(&id, &args, &image, &forwards)?;
    let dir = data_dir.root().join("vm-run").join(&id);
    let mut cleanup = Cleanup {
        dir: dir.clone(),
        pid: None,
    };
    let spec = VmSpec {
        dir: dir.clone(),
        kernel_dir,
        init_bin,
        cache_dir: data_dir.root().join("kernel-cache"),
        memory_mb: args.memory,
        vcpus: args.cpus,
        root_base: image.rootfs.clone(),
        volumes: vec![],
        network: VmNetwork::User {
            forwards: forwards.clone(),
        },
        run_json: serde_json::to_vec(&run)?,
        accel,
        tcg_tb_size_mb: Some(aloft_vmm::qemu::DEFAULT_TCG_TB_SIZE_MB),
    };
    // From here on an interrupt must not leave QEMU or the directory behind.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = qemu::prepare(&spec) => {
            r.with_context(|| format!("preparing the VM in {}", dir.display()))?;
        }
        _ = sigint.recv() => return Ok(interrupted()),
        _ = sigterm.recv() => return Ok(interrupted()),
    }

    let mut timeline = Timeline::default();
    let console = dir.join(aloft_vmm::VmFiles::CONSOLE);
    let t0 = Instant::now();
    let (first_tx, first_line) = tokio::sync::watch::channel(None);
    tokio::spawn(first_console_line(console.clone(), t0, first_tx));
    let vm = qemu::start(&spec, None)
        .await
        .with_context(|| format!("starting QEMU for {}", args.image))?;
    cleanup.pid = Some(vm.pid);
    timeline.qemu_running = Some(ms(t0));

    let chan = tokio::select! {
        c = GuestChannel::connect(vm.ctl_socket(), BOOT_LIMIT) => c,
        _ = wait_gone(&vm) => {
            return Err(boot_failed(&vm, "QEMU exited before the guest said hello"));
        }
        // Nothing of the app runs yet: no graceful stop to make.
        _ = sigint.recv() => {
            vm.kill();
            vm.wait_exit(Duration::from_secs(5)).await;
            return Ok(interrupted());
        }
        _ = sigterm.recv() => {
            vm.kill();
            vm.wait_exit(Duration::from_secs(5)).await;
            return Ok(interrupted());
        }
    };
    let chan = match chan {
        Ok(c) => c,
        Err(e) => {
            let err = boot_failed(&vm, &e.to_string());
            vm.kill();
            return Err(err);
        }
    };
    let mut events = chan.events();
    let mut stopping: Option<Instant> = None;
    let mut powered_down = false;
    let mut exit = None;
    let mut timeline_printed = false;
    let stop_grace = args.kill_timeout + Duration::from_secs(5);
    loop {
        // Escalation while stopping: power off after the guest's own stop had its time,
        // then kill.
        let escalate = async {
            match stopping {
                Some(at) => tokio::time::sleep_until((at + stop_grace).into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(msg) => {
                    timeline.on_message(&msg, ms(t0));
                    match msg {
                        GuestMessage::Log { stream, line, .. } => print_line(stream, &line),
                        GuestMessage::Error { message } => eprintln!("aloft: guest: {message}"),
                        GuestMessage::Exit { code, signal, oom } => {
                            exit = Some((code, signal, oom));
                            break;
                        }
                        _ => {}
                    }
                    if args.boot_timeline && !timeline_printed && timeline.complete(&run) {
                        timeline_printed = true;
                        timeline.print(&console, first_line.borrow().clone());
                    }
                }
                Err(RecvError::Lagged(n)) => eprintln!("aloft: {n} guest messages were lost (output too fast)"),
                Err(RecvError::Closed) => break,
            },
            _ = sigint.recv() => {
                if stopping.is_some() {
                    eprintln!("aloft: second interrupt: killing the VM");
                    vm.kill();
                    break;
                }
                eprintln!("aloft: stopping (sending {} to the app, {:?} to exit; Ctrl-C again to kill)", args.kill_signal, args.kill_timeout);
                stopping = Some(Instant::now());
                let _ = chan.send(guest::HostMessage::Stop { signal: kill_signal, timeout_ms: args.kill_timeout.as_millis() as u64 });
            }
            _ = sigterm.recv(), if stopping.is_none() => {
                stopping = Some(Instant::now());
                let _ = chan.send(guest::HostMessage::Stop { signal: kill_signal, timeout_ms: args.kill_timeout.as_millis() as u64 });
            }
            _ = escalate => {
                if powered_down {
                    eprintln!("aloft: the VM did not power off: killing it");
                    vm.kill();
                    break;
                }
                eprintln!("aloft: the app did not stop in time: powering the VM off");
                powered_down = true;
                let _ = vm.powerdown().await;
                stopping = Some(Instant::now() - args.kill_timeout);
            }
            _ = wait_gone(&vm) => break,
        }
    }
    // Let the guest finish powering off; then make sure QEMU is gone.
    if !vm.wait_exit(Duration::from_secs(10)).await {
        vm.kill();
        vm.wait_exit(Duration::from_secs(5)).await;
    }
    cleanup.pid = None;
    if args.boot_timeline && !timeline_printed {
        timeline.print(&console, first_line.borrow().clone());
    }
    // A reader that lagged behind a flood of output may have missed the `Exit` frame;
    // the channel's state has it.
    if exit.is_none()
        && let Some(e) = chan.state().borrow().exit
    {
        exit = Some((e.code, e.signal, e.oom));
    }
    drop(chan);
    match exit {
        Some((code, signal, oom)) => {
            if oom {
                eprintln!("aloft: the guest's OOM killer ran (the app ran out of memory)");
            }
            match (code, signal) {
                (Some(c), _) => Ok(c.clamp(0, 255) as u8),
                (None, Some(s)) => Ok((128 + s).clamp(0, 255) as u8),
                (None, None) => Err(boot_failed(
                    &vm,
                    "the guest failed before the app could run",
                )),
            }
        }
        None => Err(boot_failed(&vm, "the VM ended without reporting an exit")),
    }
}

/// An interrupt before the app ran: exit code 130, like a shell.
fn interrupted() -> u8 {
    eprintln!("aloft: interrupted while booting: the VM was removed");
    130
}

/// Resolves when QEMU's process has gone.
async fn wait_gone(vm: &QemuVm) {
    while !vm.wait_exit(Duration::from_secs(3600)).await {}
}

/// A clear error for a guest that did not come up: the kernel panic with the console
/// lines leading to it, or the console's last lines.
fn boot_failed(vm: &QemuVm, what: &str) -> anyhow::Error {
    if let Some(panic) = vm.boot_failure() {
        return anyhow!(panic);
    }
    let tail = vm.console_tail(15);
    if tail.trim().is_empty() {
        anyhow!("{what} (the console is empty)")
    } else {
        anyhow!("{what}; last console lines:\n{tail}")
    }
}

fn print_line(stream: Stream, line: &str) {
    let _ = match stream {
        Stream::Stdout => writeln!(std::io::stdout().lock(), "{line}"),
        Stream::Stderr => writeln!(std::io::stderr().lock(), "{line}"),
    };
}

fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

/// The time the first complete line appeared on the serial console (QEMU writes it to
/// a file, so its length is watched).
async fn first_console_line(
    path: PathBuf,
    t0: Instant,
    tx: tokio::sync::watch::Sender<Option<(f64, String)>>,
) {
    let deadline = t0 + BOOT_LIMIT;
    while Instant::now() < deadline && !tx.is_closed() {
        if let Ok(data) = tokio::fs::read(&path).await
            && let Some(end) = data.iter().position(|b| *b == b'\n')
        {
            let line = String::from_utf8_lossy(&data[..end]).trim().to_string();
            let _ = tx.send(Some((ms(t0), line)));
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Boot stages, in ms since QEMU was spawned.
#[derive(Default)]
struct Timeline {
    qemu_running: Option<f64>,
    /// Host arrival time minus guest uptime, smallest seen: maps guest clock to ours.
    offset: Option<f64>,
    pid1_uptime: Option<u64>,
    init_started: Option<f64>,
    app_started: Option<f64>,
    ready: Option<f64>,
}

impl Timeline {
    fn on_message(&mut self, msg: &GuestMessage, now: f64) {
        let mut calibrate = |uptime: u64| {
            let o = now - uptime as f64;
            self.offset = Some(self.offset.map_or(o, |x: f64| x.min(o)));
        };
        match msg {
            GuestMessage::Hello { boot_ms, .. } => self.pid1_uptime = Some(*boot_ms),
            GuestMessage::InitStarted { uptime_ms } => {
                calibrate(*uptime_ms);
                self.init_started.get_or_insert(now);
            }
            GuestMessage::AppStarted { uptime_ms, .. } => {
                calibrate(*uptime_ms);
                self.app_started.get_or_insert(now);
            }
            GuestMessage::Ready { uptime_ms, .. } => {
                calibrate(*uptime_ms);
                self.ready.get_or_insert(now);
            }
            _ => {}
        }
    }

    fn complete(&self, run: &RunConfig) -> bool {
        self.app_started.is_some() && (run.ready_ports.is_empty() || self.ready.is_some())
    }

    fn print(&self, console: &Path, first: Option<(f64, String)>) {
        let phases = guest_phases(console, self.pid1_uptime);
        let guest = |uptime: Option<u64>| -> Option<f64> { Some(uptime? as f64 + self.offset?) };
        let phase = |name: &str| guest(phases.iter().find(|(n, _)| n == name).map(|(_, u)| *u));
        let pid1 = guest(self.pid1_uptime.or(phases.first().map(|(_, u)| *u)));
        let rows: Vec<(&str, Option<f64>, String)> = vec![
            ("qemu spawned", Some(0.0), String::new()),
            (
                "qemu running",
                self.qemu_running,
                "(daemonized, QMP up)".into(),
            ),
            (
                "first kernel console line",
                first.as_ref().map(|(t, _)| *t),
                first.map(|(_, l)| format!("{l:.60}")).unwrap_or_default(),
            ),
            ("init started", pid1, "(guest PID 1)".into()),
            ("modules loaded", phase("modules"), String::new()),
            ("root mounted", phase("root"), String::new()),
            ("network up", phase("network"), String::new()),
            ("init done", self.init_started, "(InitStarted)".into()),
            ("app started", self.app_started, String::new()),
            ("app port accepting", self.ready, "(guest Ready)".into()),
        ];
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "boot timeline (ms since QEMU was spawned):");
        for (name, t, note) in rows {
            let t = t.map_or("       -".to_string(), |t| format!("{t:8.0}"));
            let _ = writeln!(err, "  {t}  {name} {note}");
        }
    }
}

/// aloft-init's phase line on the console, as (phase, guest uptime ms):
/// `aloft-init: set up at N ms after kernel start (modules 12ms, root 3ms, …)`.
fn guest_phases(console: &Path, start: Option<u64>) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let Some(line) = text
        .lines()
        .find_map(|l| l.split_once("aloft-init: set up at ").map(|(_, r)| r))
    else {
        return Vec::new();
    };
    let Some((total, rest)) = line.split_once(" ms after kernel start (") else {
        return Vec::new();
    };
    let Ok(total) = total.trim().parse::<u64>() else {
        return Vec::new();
    };
    let steps: Vec<(String, u64)> = rest
        .trim_end_matches(')')
        .split(", ")
        .filter_map(|s| {
            let (name, d) = s.rsplit_once(' ')?;
            Some((name.to_string(), d.trim_end_matches("ms").parse().ok()?))
        })
        .collect();
    // The deltas count from init's start (its `Hello`); without it, from what remains
    // of the total before them.
    let sum: u64 = steps.iter().map(|(_, d)| d).sum();
    let mut at = start.unwrap_or(total.saturating_sub(sum));
    let mut out = vec![("start".to_string(), at)];
    for (name, d) in steps {
        at += d;
        out.push((name, at));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_forms() {
        let f = parse_publish("8081:80").unwrap();
        assert_eq!(
            (f.host_addr.as_str(), f.host_port, f.guest_port),
            ("127.0.0.1", 8081, 80)
        );
        let f = parse_publish("0.0.0.0:1:2").unwrap();
        assert_eq!(
            (f.host_addr.as_str(), f.host_port, f.guest_port),
            ("0.0.0.0", 1, 2)
        );
        assert!(parse_publish("80").is_err());
        assert!(parse_publish("x:80").is_err());
    }
}
