//! The QEMU `microvm` driver: prepares a machine's boot files, builds the command line,
//! starts QEMU detached (`-daemonize`: its own session, a pidfile, a QMP socket) so a
//! supervisor can restart without killing it, and drives it through QMP.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::process::Command;

use crate::initramfs::{self, InitramfsError};
use crate::kernel::{self, GuestKernel, KernelError};
use crate::qmp::{Qmp, QmpError};

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// The smallest guest our kernel and init boot in.
pub const MIN_MEMORY_MB: u32 = 64;

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when a working one is present, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// The machine's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmNetwork {
    None,
    /// QEMU user-mode networking (guest 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3)
    /// with TCP forwards `host_addr:host_port -> guest_port`.
    User {
        forwards: Vec<PortForward>,
    },
    /// A TAP device the caller created (and attached to a bridge).
    Tap {
        ifname: String,
        mac: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForward {
    pub host_addr: String,
    pub host_port: u16,
    pub guest_port: u16,
}

/// Everything needed to boot one machine.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The machine's own directory: sockets, pidfile, console log, disks, initrd.
    pub dir: PathBuf,
    pub kernel_dir: PathBuf,
    /// The static `aloft-init` binary.
    pub init_bin: PathBuf,
    /// Where built base initramfs archives are cached.
    pub cache_dir: PathBuf,
    pub memory_mb: u32,
    pub vcpus: u32,
    /// The image's ext4 base; the machine writes to a qcow2 overlay over it.
    pub root_base: PathBuf,
    /// Volume disks (raw ext4 files), attached as /dev/vdb, /dev/vdc … in this order.
    pub volumes: Vec<PathBuf>,
    pub network: VmNetwork,
    /// The guest's `run.json`.
    pub run_json: Vec<u8>,
    pub accel: Accel,
    /// TCG translation cache size in MiB (QEMU's default is large; smaller saves RSS).
    pub tcg_tb_size_mb: Option<u32>,
}

/// The TCG translation cache aloft gives a machine, in MiB. A traced boot of a busybox
/// app translates ~36 MiB of code up to its first answer; with 32 the cache was flushed
/// just as the app started and everything hot was translated again (~100 ms of a
/// 900 ms boot). The cache's resident size is the code actually translated, so a
/// larger limit costs memory only for machines that run more code.
pub const DEFAULT_TCG_TB_SIZE_MB: u32 = 48;

/// Why a VM could not be prepared, started or driven.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("memory {memory_mb} MB is below the minimum of {min} MB")]
    MemoryTooSmall { memory_mb: u32, min: u32 },
    #[error("root disk {path} does not exist")]
    MissingDisk { path: PathBuf },
    #[error("{command} failed for {dir}: {detail}")]
    Tool {
        command: String,
        dir: PathBuf,
        detail: String,
    },
    #[error("QEMU failed to start the VM in {dir}: {stderr}")]
    Start { dir: PathBuf, stderr: String },
    #[error("no running VM in {dir}: {detail}")]
    NotRunning { dir: PathBuf, detail: String },
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("suspend of the VM in {dir} failed: {detail}")]
    Suspend { dir: PathBuf, detail: String },
    #[error("the guest kernel panicked in {dir}:\n{console_tail}")]
    KernelPanic { dir: PathBuf, console_tail: String },
}

impl VmError {
    /// QEMU could not listen on a forwarded host port: something else took it between
    /// the caller choosing it and QEMU binding it. Starting again with other ports works.
    pub fn is_host_forward_taken(&self) -> bool {
        matches!(self, VmError::Start { stderr, .. }
            if stderr.contains("Could not set up host forwarding rule"))
    }
}

/// File names inside a machine directory.
pub struct VmFiles;

impl VmFiles {
    pub const QMP: &'static str = "qmp.sock";
    pub const CTL: &'static str = "ctl.sock";
    pub const PIDFILE: &'static str = "qemu.pid";
    pub const CONSOLE: &'static str = "console.log";
    pub const INITRD: &'static str = "initrd.cpio";
    pub const ROOT: &'static str = "root.qcow2";
    pub const STATE: &'static str = "suspend.state";
}

/// Creates the machine's qcow2 overlay (once) and writes its initrd.
pub async fn prepare(spec: &VmSpec) -> Result<(), VmError> {
    if spec.memory_mb < MIN_MEMORY_MB {
        return Err(VmError::MemoryTooSmall {
            memory_mb: spec.memory_mb,
            min: MIN_MEMORY_MB,
        });
    }
    let kernel = GuestKernel::from_dir(&spec.kernel_dir)?;
    if !spec.root_base.is_file() {
        return Err(VmError::MissingDisk {
            path: spec.root_base.clone(),
        });
    }
    for v in &spec.volumes {
        if !v.is_file() {
            return Err(VmError::MissingDisk { path: v.clone() });
        }
    }
    std::fs::create_dir_all(&spec.dir).map_err(|source| VmError::Io {
        path: spec.dir.clone(),
        source,
    })?;
    let base = initramfs::base_initramfs(&kernel, &spec.init_bin, &spec.cache_dir)?;
    initramfs::machine_initrd(&base, &spec.run_json, &spec.dir.join(VmFiles::INITRD))?;
    let overlay = spec.dir.join(VmFiles::ROOT);
    if !overlay.exists() {
        create_overlay(&spec.root_base, &overlay, &spec.dir).await?;
    }
    Ok(())
}

/// `qemu-img create -f qcow2 -b BASE -F raw OVERLAY`, written under a temporary name.
pub async fn create_overlay(base: &Path, overlay: &Path, dir: &Path) -> Result<(), VmError> {
    let tmp = overlay.with_extension("qcow2.tmp");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(&tmp)
        .output()
        .await
        .map_err(|e| VmError::Tool {
            command: "qemu-img create".into(),
            dir: dir.to_path_buf(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(VmError::Tool {
            command: "qemu-img create".into(),
            dir: dir.to_path_buf(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    std::fs::rename(&tmp, overlay).map_err(|source| VmError::Io {
        path: overlay.to_path_buf(),
        source,
    })
}

/// The kernel command line: serial console, and under TCG the TSC hint without which
/// about one boot in three hangs; `panic=-1` with `-no-reboot` turns a panic into exit.
pub fn kernel_cmdline(accel: Accel) -> String {
    let mut cmdline = String::from("console=ttyS0 quiet cryptomgr.notests panic=-1");
    if accel == Accel::Tcg
        && let Some(khz) = kernel::host_tsc_khz()
    {
        cmdline.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
    }
    if let Some(extra) = extra_kernel_args() {
        cmdline.push(' ');
        cmdline.push_str(&extra);
    }
    cmdline
}

/// Extra kernel command-line options from `ALOFT_KERNEL_ARGS` (for trying boot
/// options; `cargo xtask bench boot` gives its floor the same ones).
pub fn extra_kernel_args() -> Option<String> {
    std::env::var("ALOFT_KERNEL_ARGS")
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The full QEMU argument list for `spec` (without `-incoming`).
pub fn command_line(spec: &VmSpec, accel: Accel) -> Vec<String> {
    let dir = &spec.dir;
    let p = |name: &str| dir.join(name).display().to_string();
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-M", "microvm,x-option-roms=off,isa-serial=on"]);
    match accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        _ => {
            let tcg = match spec.tcg_tb_size_mb {
                Some(mb) => format!("tcg,tb-size={mb}"),
                None => "tcg".into(),
            };
            push(&["-accel", &tcg]);
        }
    }
    push(&[
        "-m",
        &format!("{}M", spec.memory_mb),
        "-smp",
        &spec.vcpus.max(1).to_string(),
    ]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&["-daemonize", "-pidfile", &p(VmFiles::PIDFILE)]);
    push(&[
        "-chardev",
        &format!("file,id=ser0,path={}", p(VmFiles::CONSOLE)),
        "-serial",
        "chardev:ser0",
    ]);
    push(&["-kernel", &GuestKernel::vmlinux_in(&spec.kernel_dir)]);
    push(&["-initrd", &p(VmFiles::INITRD)]);
    push(&["-append", &kernel_cmdline(accel)]);
    push(&[
        "-drive",
        &format!(
            "id=root,file={},format=qcow2,if=none,cache=unsafe,discard=unmap",
            p(VmFiles::ROOT)
        ),
        "-device",
        "virtio-blk-device,drive=root",
    ]);
    for (i, v) in spec.volumes.iter().enumerate() {
        push(&[
            "-drive",
            &format!("id=vol{i},file={},format=raw,if=none", v.display()),
            "-device",
            &format!("virtio-blk-device,drive=vol{i}"),
        ]);
    }
    match &spec.network {
        VmNetwork::None => {}
        VmNetwork::User { forwards } => {
            let mut netdev = String::from("user,id=n0");
            for f in forwards {
                netdev.push_str(&format!(
                    ",hostfwd=tcp:{}:{}-:{}",
                    f.host_addr, f.host_port, f.guest_port
                ));
            }
            push(&["-netdev", &netdev, "-device", "virtio-net-device,netdev=n0"]);
        }
        VmNetwork::Tap { ifname, mac } => push(&[
            "-netdev",
            &format!("tap,id=n0,ifname={ifname},script=no,downscript=no"),
            "-device",
            &format!("virtio-net-device,netdev=n0,mac={mac}"),
        ]),
    }
    push(&[
        "-device",
        // Two ports (port 0 is reserved for a console): the guest sets up two queues
        // per port, and the default 31 ports cost ~60 queues to probe under TCG.
        "virtio-serial-device,max_ports=2",
        "-chardev",
        &format!("socket,id=ctl,path={},server=on,wait=off", p(VmFiles::CTL)),
        "-device",
        "virtserialport,id=port-ctl,chardev=ctl,name=aloft.ctl",
    ]);
    push(&[
        "-device",
        "virtio-rng-device",
        "-device",
        "virtio-balloon-device",
    ]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", p(VmFiles::QMP)),
    ]);
    a
}

impl GuestKernel {
    fn vmlinux_in(dir: &Path) -> String {
        dir.join("vmlinux").display().to_string()
    }
}

/// A running (or paused) QEMU, found through its directory.
pub struct QemuVm {
    pub dir: PathBuf,
    pub pid: i32,
    pub qmp: Arc<Qmp>,
}

/// Starts QEMU for a prepared `spec`; with `incoming`, resumes from a suspend file.
pub async fn start(spec: &VmSpec, incoming: Option<&Path>) -> Result<QemuVm, VmError> {
    let accel = resolve_accel(spec.accel);
    for stale in [VmFiles::QMP, VmFiles::CTL, VmFiles::PIDFILE] {
        let _ = std::fs::remove_file(spec.dir.join(stale));
    }
    let console = spec.dir.join(VmFiles::CONSOLE);
    let _ = std::fs::remove_file(&console);
    let mut cmd = Command::new(QEMU);
    cmd.args(command_line(spec, accel));
    // The saved state is handed over as an open descriptor (`fd:`), so QEMU reads
    // the file itself rather than through a pipe from `sh -c cat`.
    let state_file = match incoming {
        Some(state) => Some(std::fs::File::open(state).map_err(|source| VmError::Io {
            path: state.to_path_buf(),
            source,
        })?),
        None => None,
    };
    if let Some(file) = &state_file {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        cmd.arg("-incoming").arg(format!("fd:{fd}"));
        // SAFETY: runs between fork and exec and only calls fcntl (async-signal-safe)
        // to let the state file's descriptor, open until the spawn has returned,
        // survive the exec.
        unsafe {
            cmd.pre_exec(move || {
                let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())
                    .map_err(std::io::Error::from)
            });
        }
    }
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|e| VmError::Start {
            dir: spec.dir.clone(),
            stderr: format!("cannot run {QEMU}: {e}"),
        })?;
    if !out.status.success() {
        return Err(VmError::Start {
            dir: spec.dir.clone(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    drop(state_file);
    attach(&spec.dir).await
}

/// Re-attaches to the QEMU running in `dir` (after an agent restart, say).
pub async fn attach(dir: &Path) -> Result<QemuVm, VmError> {
    let pidfile = dir.join(VmFiles::PIDFILE);
    let not_running = |detail: String| VmError::NotRunning {
        dir: dir.to_path_buf(),
        detail,
    };
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .map_err(|e| not_running(format!("{}: {e}", pidfile.display())))?
        .trim()
        .parse()
        .map_err(|_| not_running(format!("{} holds no pid", pidfile.display())))?;
    if !process_alive(pid) {
        return Err(not_running(format!("process {pid} has exited")));
    }
    let qmp = Qmp::connect(&dir.join(VmFiles::QMP), Duration::from_secs(5)).await?;
    Ok(QemuVm {
        dir: dir.to_path_buf(),
        pid,
        qmp,
    })
}

impl QemuVm {
    pub fn ctl_socket(&self) -> PathBuf {
        self.dir.join(VmFiles::CTL)
    }

    pub fn console_log(&self) -> PathBuf {
        self.dir.join(VmFiles::CONSOLE)
    }

    pub async fn status(&self) -> Result<String, VmError> {
        Ok(self.qmp.status().await?)
    }

    pub async fn pause(&self) -> Result<(), VmError> {
        self.qmp.execute("stop", None).await?;
        Ok(())
    }

    pub async fn resume(&self) -> Result<(), VmError> {
        self.qmp.execute("cont", None).await?;
        Ok(())
    }

    /// ACPI power button: aloft-init stops the app and powers off.
    pub async fn powerdown(&self) -> Result<(), VmError> {
        self.qmp.execute("system_powerdown", None).await?;
        Ok(())
    }

    /// Ends QEMU at once (no guest shutdown).
    pub async fn quit(&self) -> Result<(), VmError> {
        match self.qmp.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.wait_exit(Duration::from_secs(5)).await;
        Ok(())
    }

    /// SIGKILL by pid: for a QEMU that no longer answers.
    pub fn kill(&self) {
        kill_pid(self.pid);
    }

    /// Waits until the QEMU process is gone, up to `limit`. Returns whether it is.
    pub async fn wait_exit(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        // The pid is not our child (QEMU daemonized), so poll its existence; the
        // interval is short next to any VM lifetime.
        while process_alive(self.pid) {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Saves the whole VM to `state` (migration to a file) and ends QEMU. The machine
    /// resumes by [`start`] with the same spec and `incoming = Some(state)`.
    pub async fn suspend(&self, state: &Path) -> Result<(), VmError> {
        let fail = |detail: String| VmError::Suspend {
            dir: self.dir.clone(),
            detail,
        };
        let tmp = state.with_extension("partial");
        self.qmp
            .execute(
                "migrate-set-parameters",
                Some(json!({"max-bandwidth": 10_737_418_240u64})),
            )
            .await?;
        self.qmp.execute("stop", None).await?;
        let uri = format!("exec:cat > {}", shell_quote(&tmp.display().to_string()));
        self.qmp
            .execute("migrate", Some(json!({ "uri": uri })))
            .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let info = self.qmp.execute("query-migrate", None).await?;
            match info.get("status").and_then(|s| s.as_str()) {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => {
                    let _ = self.qmp.execute("cont", None).await;
                    return Err(fail(format!("migration ended: {info}")));
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = self.qmp.execute("migrate_cancel", None).await;
                let _ = self.qmp.execute("cont", None).await;
                return Err(fail("migration did not complete in 120 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        std::fs::rename(&tmp, state).map_err(|source| VmError::Io {
            path: state.to_path_buf(),
            source,
        })?;
        self.quit().await
    }

    /// After an `-incoming` start: waits for the state to load, then runs the guest.
    pub async fn finish_resume(&self) -> Result<(), VmError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.qmp.status().await?;
            if status != "inmigrate" {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VmError::Suspend {
                    dir: self.dir.clone(),
                    detail: "state did not load within 60 s".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.qmp.execute("cont", None).await?;
        Ok(())
    }

    /// `query-balloon`: the guest memory the balloon leaves it, in bytes.
    pub async fn balloon_actual(&self) -> Result<u64, VmError> {
        let v = self.qmp.execute("query-balloon", None).await?;
        Ok(v.get("actual")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0))
    }

    /// `balloon`: asks the guest's balloon driver to leave it `target` bytes (inflating
    /// gives the difference back to the host). Returns at once; the guest converges.
    pub async fn set_balloon(&self, target: u64) -> Result<(), VmError> {
        self.qmp
            .execute("balloon", Some(serde_json::json!({"value": target})))
            .await?;
        Ok(())
    }

    /// The last `lines` lines of the serial console.
    pub fn console_tail(&self, lines: usize) -> String {
        console_tail(&self.console_log(), lines)
    }

    /// Why the guest is not coming up, when the console says: a kernel panic, with the
    /// console's last lines.
    pub fn boot_failure(&self) -> Option<VmError> {
        let text = std::fs::read_to_string(self.console_log()).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        let at = lines.iter().position(|l| l.contains("Kernel panic"))?;
        // The panic line, what led to it, and a little of the trace.
        let from = at.saturating_sub(10);
        let to = (at + 6).min(lines.len());
        Some(VmError::KernelPanic {
            dir: self.dir.clone(),
            console_tail: lines[from..to].join("\n"),
        })
    }
}

/// The last lines of a console log, for error messages.
pub fn console_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether a console log shows a kernel panic.
pub fn console_shows_panic(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains("Kernel panic"))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn process_alive(pid: i32) -> bool {
    let Some(id) = rustix::process::Pid::from_raw(pid) else {
        return false;
    };
    // A zombie has exited. QEMU daemonized, so init reaps it, and an init that reaps
    // late (1.5 s on the test host) would make every stop wait for it.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !exited_state(&stat),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        // No /proc: signal 0 probes existence (a zombie counts as alive).
        Err(_) => rustix::process::test_kill_process(id).is_ok(),
    }
}

/// Whether a `/proc/<pid>/stat` line shows a process that has exited (zombie or
/// dead). The state follows the command name, which may itself hold `)`.
fn exited_state(stat: &str) -> bool {
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    matches!(state, Some('Z' | 'X'))
}

fn kill_pid(pid: i32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// KVM when `/dev/kvm` runs a guest, else TCG. Decided once per process.
pub fn resolve_accel(accel: Accel) -> Accel {
    match accel {
        Accel::Auto => *KVM_PROBE.get_or_init(probe_kvm),
        other => other,
    }
}

static KVM_PROBE: std::sync::OnceLock<Accel> = std::sync::OnceLock::new();

/// Whether KVM can run a real guest here. Opening /dev/kvm is not enough (some hosts
/// expose a paravirtual KVM that cannot run ordinary kernels), so ask QEMU to start
/// a KVM machine and look at whether it comes up.
fn probe_kvm() -> Accel {
    if std::env::var("ALOFT_ACCEL").is_ok_and(|v| v == "tcg") {
        return Accel::Tcg;
    }
    if std::env::var("ALOFT_ACCEL").is_ok_and(|v| v == "kvm") {
        return Accel::Kvm;
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Accel::Tcg;
    }
    // An empty microvm under KVM with the `none` firmware: QEMU exits 0 quickly when
    // KVM works; errors (or hangs) mean we must not rely on it.
    let child = std::process::Command::new(QEMU)
        .args([
            "-M",
            "microvm,x-option-roms=off",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "64M",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-S",
            "-qmp",
            "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        return Accel::Tcg;
    };
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        let _ = stdin.write_all(
            b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-kvm\"}\n{\"execute\":\"quit\"}\n",
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Accel::Tcg;
            }
        }
    }
    let Ok(out) = child.wait_with_output() else {
        return Accel::Tcg;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && stdout.contains("\"enabled\": true") && guest_kernel_runs_on_kvm() {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// Paravirtual KVMs accept the VM but fail real kernels; set `ALOFT_KVM_TRUSTED=1` on
/// a host whose KVM is known good. Without it, KVM is used only where the CPU
/// advertises hardware virtualisation to the host (`vmx`/`svm` in /proc/cpuinfo).
fn guest_kernel_runs_on_kvm() -> bool {
    if std::env::var("ALOFT_KVM_TRUSTED").is_ok_and(|v| v == "1") {
        return true;
    }
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zombies_count_as_exited() {
        assert!(super::exited_state(
            "4242 (qemu-system-x86) Z 1 4242 4242 0 -1"
        ));
        assert!(super::exited_state("4242 (odd) name)) X 1 4242"));
        assert!(!super::exited_state("4242 (qemu (x)) S 1 4242 4242 0 -1"));
        assert!(!super::exited_state("garbage"));
        assert!(super::process_alive(std::process::id() as i32));
        assert!(!super::process_alive(i32::MAX));
    }

    #[test]
    fn host_forward_taken_is_recognised_from_qemu_stderr() {
        let taken = VmError::Start {
            dir: PathBuf::from("/m/1"),
            stderr: "qemu-system-x86_64: -netdev user,id=n0,hostfwd=tcp:127.0.0.1:39829-:8080: \
                     Could not set up host forwarding rule 'tcp:127.0.0.1:39829-:8080'"
                .into(),
        };
        assert!(taken.is_host_forward_taken());
        let other = VmError::Start {
            dir: PathBuf::from("/m/1"),
            stderr: "qemu-system-x86_64: -kernel /k/vmlinux: No such file or directory".into(),
        };
        assert!(!other.is_host_forward_taken());
    }
}
