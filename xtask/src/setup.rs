//! Idempotent set-up of a Debian bookworm machine: apt packages, the musl target for
//! the guest init, and the guest kernel unpacked into the data directory. A second
//! run checks everything, changes nothing and takes a few seconds.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use aloft_types::datadir::{DATA_DIR_ENV, DataDir};
use anyhow::{Context, Result, bail};
use clap::Args;

use crate::util::{output, run as run_cmd, step};

/// Debian packages the project needs: QEMU and disk tools for VMs, the servers the
/// tests start (registry, NATS, ACME), the benchmark baselines and their load tools.
const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils",
    "e2fsprogs",
    "busybox-static",
    "cpio",
    "xz-utils",
    "lz4",
    "socat",
    "iproute2",
    "nftables",
    "musl-tools",
    "docker-registry",
    "apache2-utils",
    "nats-server",
    "pebble",
    "nginx",
    "haproxy",
    "skopeo",
    "umoci",
    "debootstrap",
    "wrk",
    "nghttp2-client",
    "curl",
];

/// Guest kernel modules copied next to the kernel, in the order `aloft-init` loads them.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
    "virtio-rng",
    "virtio_balloon",
    "button",
    "evdev",
    "overlay",
];

pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

#[derive(Args, Default)]
pub struct SetupArgs {
    /// Data directory to put the guest kernel in (default: ALOFT_DATA_DIR, then
    /// /var/lib/aloft as root or ~/.local/share/aloft).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// What set-up produced, for the commands that run after it.
pub struct SetupEnv {
    pub data_dir: DataDir,
}

impl SetupEnv {
    /// Environment for the test suite: where the shared kernel and guest init are.
    pub fn test_env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "ALOFT_KERNEL_DIR",
                self.data_dir.kernel_dir().display().to_string(),
            ),
            ("ALOFT_INIT_BIN", guest_init_path().display().to_string()),
        ]
    }
}

pub fn run(args: &SetupArgs) -> Result<SetupEnv> {
    let data_dir = resolve_data_dir(args.data_dir.clone());
    step(&format!(
        "set-up (data directory {})",
        data_dir.root().display()
    ));
    apt_packages()?;
    musl_target()?;
    guest_kernel(&data_dir)?;
    step("set-up complete");
    Ok(SetupEnv { data_dir })
}

fn resolve_data_dir(flag: Option<PathBuf>) -> DataDir {
    if let Some(root) = flag.or_else(|| std::env::var_os(DATA_DIR_ENV).map(PathBuf::from)) {
        return DataDir::new(root);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    DataDir::new(DataDir::default_root(is_root(), home.as_deref()))
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        println!("    apt packages: all {} present", APT_PACKAGES.len());
        return Ok(());
    }
    if !is_root() {
        bail!(
            "these Debian packages are missing and set-up is not running as root: {}\n\
             install them with: sudo apt-get install -y --no-install-recommends {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    println!("    apt packages missing: {}", missing.join(" "));
    step("apt-get update");
    run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
    // One at a time: a combined install has been seen to fail with "held broken
    // packages" where single installs succeed (shared/notes/qemu-microvm.md). An
    // install can also remove a package installed earlier (a backported qemu-utils is
    // removed by bookworm's qemu-system-x86), so check the whole list again after each
    // pass until nothing is missing.
    let mut missing = missing;
    for _pass in 0..3 {
        for pkg in &missing {
            step(&format!("apt-get install {pkg}"));
            run_cmd(
                Command::new("apt-get")
                    .args(["install", "-y", "-q", "--no-install-recommends", pkg])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
        }
        missing = APT_PACKAGES
            .iter()
            .copied()
            .filter(|p| !installed(p))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        println!(
            "    removed by a later install, installing again: {}",
            missing.join(" ")
        );
    }
    bail!(
        "apt packages still missing after set-up: {}",
        missing.join(" ")
    )
}

fn musl_target() -> Result<()> {
    let targets = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if targets.lines().any(|t| t.trim() == MUSL_TARGET) {
        println!("    rust target {MUSL_TARGET}: present");
        return Ok(());
    }
    step(&format!("rustup target add {MUSL_TARGET}"));
    run_cmd(Command::new("rustup").args(["target", "add", MUSL_TARGET]))
}

/// Where `cargo xtask` builds the guest init.
pub fn guest_init_path() -> PathBuf {
    crate::util::workspace_root()
        .join("target")
        .join(MUSL_TARGET)
        .join("release")
        .join("aloft-init")
}

pub fn build_guest_init() -> Result<()> {
    crate::util::cargo(
        &[
            "build",
            "--release",
            "-p",
            "aloft-init",
            "--target",
            MUSL_TARGET,
        ],
        &[],
    )
}

/// Fetch Debian's cloud kernel with `apt-get download` and unpack into
/// `<data>/kernel`: `vmlinuz`, the PVH `vmlinux` extracted from it, the guest
/// modules and `kernel.json`. Built in a temporary directory and renamed into place,
/// so an interrupted run leaves nothing half-written.
fn guest_kernel(data_dir: &DataDir) -> Result<()> {
    let dir = data_dir.kernel_dir();
    let manifest = dir.join("kernel.json");
    if manifest.exists() && dir.join("vmlinux").exists() && dir.join("vmlinuz").exists() {
        println!("    guest kernel: present in {}", dir.display());
        return Ok(());
    }
    let package = pick_kernel_package()?;
    step(&format!("downloading guest kernel {package}"));
    fs::create_dir_all(data_dir.root())
        .with_context(|| format!("creating {}", data_dir.root().display()))?;
    let work = data_dir.root().join("kernel.tmp");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(work.join("out/modules"))?;
    run_cmd(
        Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(&work),
    )?;
    let deb = fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb")?;
    run_cmd(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(work.join("x")),
    )?;
    let boot = work.join("x/boot");
    let vmlinuz = fs::read_dir(&boot)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz in {}", boot.display()))?;
    let release = vmlinuz
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .unwrap_or_default();
    let out = work.join("out");
    fs::copy(&vmlinuz, out.join("vmlinuz"))?;
    extract_vmlinux(&vmlinuz, &out.join("vmlinux"))?;
    let modules_root = work.join("x/lib/modules").join(&release);
    let mut copied = Vec::new();
    for name in GUEST_MODULES {
        let found = find_module(&modules_root, name)?
            .with_context(|| format!("module {name}.ko not found in {package}"))?;
        fs::copy(&found, out.join("modules").join(format!("{name}.ko")))?;
        copied.push(*name);
    }
    let meta = serde_json::json!({
        "package": package,
        "release": release,
        "kernel": "vmlinux",
        "bzimage": "vmlinuz",
        "modules": copied,
    });
    fs::write(out.join("kernel.json"), serde_json::to_vec_pretty(&meta)?)?;
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::rename(&out, &dir).with_context(|| format!("moving kernel into {}", dir.display()))?;
    fs::remove_dir_all(&work)?;
    println!("    guest kernel {release} installed in {}", dir.display());
    Ok(())
}

/// The newest `linux-image-6.1.0-N-cloud-amd64` the apt sources offer (6.1 is the
/// kernel the boot measurements in shared/notes were made with).
fn pick_kernel_package() -> Result<String> {
    let list = output(Command::new("apt-cache").args([
        "search",
        "--names-only",
        r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64$",
    ]))?;
    let best = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let abi = name
                .strip_prefix("linux-image-6.1.0-")?
                .strip_suffix("-cloud-amd64")?
                .parse::<u32>()
                .ok()?;
            Some((abi, name.to_string()))
        })
        .max();
    match best {
        Some((_, name)) => Ok(name),
        None => {
            bail!("apt offers no linux-image-6.1.0-*-cloud-amd64 package (run apt-get update?)")
        }
    }
}

fn find_module(root: &Path, name: &str) -> Result<Option<PathBuf>> {
    let wanted = format!("{name}.ko");
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == wanted.as_str()) {
                return Ok(Some(path));
            }
        }
    }
    Ok(None)
}

/// The cloud bzImage carries an LZ4-compressed ELF `vmlinux` with a PVH entry note;
/// booting that directly skips decompression under TCG. Find the LZ4 legacy-frame
/// magic and decompress the rest (as the kernel's scripts/extract-vmlinux does).
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<()> {
    const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
    let data = fs::read(bzimage)?;
    let start = data
        .windows(4)
        .position(|w| w == LZ4_LEGACY_MAGIC)
        .with_context(|| format!("no LZ4 payload in {}", bzimage.display()))?;
    let payload = out.with_extension("lz4");
    fs::write(&payload, &data[start..])?;
    // lz4 exits non-zero because of the trailing bytes after the frame; the ELF
    // magic of the result is the check that counts.
    let decoded = Command::new("lz4")
        .arg("-dc")
        .arg(&payload)
        .output()
        .context("running lz4")?;
    fs::remove_file(&payload)?;
    if !decoded.stdout.starts_with(b"\x7fELF") {
        bail!(
            "extracting vmlinux from {} gave no ELF image",
            bzimage.display()
        );
    }
    fs::write(out, &decoded.stdout)?;
    Ok(())
}
