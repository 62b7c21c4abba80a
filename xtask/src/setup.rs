//! Idempotent set-up of a Debian bookworm machine: apt packages, the musl target for
//! the guest init, and the guest kernel built (or, with `--debian-kernel`, unpacked)
//! into the data directory. A second run checks everything, changes nothing and takes
//! a few seconds.

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
    // The guest kernel is built from Debian's kernel source.
    "linux-source-6.1",
    "make",
    "gcc",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
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
    /// Unpack Debian's packaged cloud kernel (virtio drivers as modules, loaded by
    /// aloft-init at each boot) instead of building the microvm kernel: a faster
    /// set-up, slower boots.
    #[arg(long)]
    pub debian_kernel: bool,
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
    if args.debian_kernel {
        debian_guest_kernel(&data_dir)?;
    } else {
        built_guest_kernel(&data_dir)?;
    }
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

/// Debian's kernel source package and the tarball it installs.
const KERNEL_SOURCE_PACKAGE: &str = "linux-source-6.1";
const KERNEL_SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// The guest kernel's configuration, applied on top of `make allnoconfig`.
const KERNEL_CONFIG: &str = include_str!("../kernel/microvm.config");
/// Patches applied to the kernel source before it is built, in this order.
const KERNEL_PATCHES: &[(&str, &str)] = &[(
    "virtio-console-inbufs.patch",
    include_str!("../kernel/patches/virtio-console-inbufs.patch"),
)];

/// What the built kernel came from: set-up builds again when any of it changes.
fn kernel_build_id() -> Result<serde_json::Value> {
    use sha2::{Digest, Sha256};
    let version =
        output(Command::new("dpkg-query").args(["-W", "-f=${Version}", KERNEL_SOURCE_PACKAGE]))?;
    let mut patches = Sha256::new();
    for (name, text) in KERNEL_PATCHES {
        patches.update(name.as_bytes());
        patches.update(text.as_bytes());
    }
    Ok(serde_json::json!({
        "source": KERNEL_SOURCE_PACKAGE,
        "version": version.trim(),
        "config_sha256": hex::encode(Sha256::digest(KERNEL_CONFIG.as_bytes())),
        "patches_sha256": hex::encode(patches.finalize()),
    }))
}

/// Builds the microvm guest kernel from Debian's kernel source, patched with
/// `xtask/kernel/patches/`, with `xtask/kernel/microvm.config` (every virtio driver
/// built in, no modules) into `<data>/kernel`: the PVH `vmlinux` QEMU boots, the
/// `vmlinuz` bzImage, the `config` and `kernel.json`. About five minutes on two cores;
/// skipped while the source version, the config and the patches are unchanged. Built
/// in a temporary directory and renamed into place, so an interrupted run leaves
/// nothing half-written.
fn built_guest_kernel(data_dir: &DataDir) -> Result<()> {
    let dir = data_dir.kernel_dir();
    let build = kernel_build_id()?;
    let present = kernel_manifest(&dir).is_some_and(|m| m.get("build") == Some(&build));
    if present && dir.join("vmlinux").exists() {
        println!("    guest kernel: built, present in {}", dir.display());
        return Ok(());
    }
    step(&format!(
        "building the guest kernel from {KERNEL_SOURCE_PACKAGE} {} (a few minutes)",
        build["version"].as_str().unwrap_or_default()
    ));
    let work = fresh_kernel_work_dir(data_dir)?;
    run_cmd(
        Command::new("tar")
            .arg("xf")
            .arg(KERNEL_SOURCE_TARBALL)
            .arg("-C")
            .arg(&work),
    )?;
    // The tarball unpacks into a directory named like the package.
    let src = work.join(KERNEL_SOURCE_PACKAGE);
    for (name, text) in KERNEL_PATCHES {
        let patch = work.join(name);
        fs::write(&patch, text)?;
        run_cmd(
            Command::new("git")
                .args(["apply", "-p1"])
                .arg(&patch)
                .current_dir(&src),
        )
        .with_context(|| format!("applying xtask/kernel/patches/{name}"))?;
    }
    let fragment = work.join("microvm.config");
    fs::write(&fragment, KERNEL_CONFIG)?;
    let make = |args: &[&str]| {
        let mut cmd = Command::new("make");
        cmd.arg("-C")
            .arg(&src)
            .arg("-s")
            .arg("ARCH=x86_64")
            .args(args);
        cmd
    };
    run_cmd(make(&["allnoconfig"]).arg(format!("KCONFIG_ALLCONFIG={}", fragment.display())))?;
    let config = fs::read_to_string(src.join(".config"))?;
    let dropped = config_not_applied(KERNEL_CONFIG, &config);
    if !dropped.is_empty() {
        bail!(
            "xtask/kernel/microvm.config: Kconfig did not apply {} (a missing dependency?)",
            dropped.join(", ")
        );
    }
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get() + 1);
    run_cmd(&mut make(&[&format!("-j{jobs}"), "vmlinux", "bzImage"]))?;
    let release = output(&mut make(&["kernelrelease"]))?.trim().to_string();
    let out = work.join("out");
    fs::copy(src.join("vmlinux"), out.join("vmlinux"))?;
    fs::copy(src.join("arch/x86/boot/bzImage"), out.join("vmlinuz"))?;
    fs::write(out.join("config"), &config)?;
    let meta = serde_json::json!({
        "package": KERNEL_SOURCE_PACKAGE,
        "release": release,
        "build": build,
        "kernel": "vmlinux",
        "bzimage": "vmlinuz",
        "modules": [],
    });
    fs::write(out.join("kernel.json"), serde_json::to_vec_pretty(&meta)?)?;
    install_kernel_dir(&out, &dir)?;
    fs::remove_dir_all(&work)?;
    println!("    guest kernel {release} built into {}", dir.display());
    Ok(())
}

/// The `CONFIG_X=value` lines of `fragment` that `config` does not have: options
/// Kconfig dropped because something they depend on is off.
fn config_not_applied(fragment: &str, config: &str) -> Vec<String> {
    let have: std::collections::HashSet<&str> = config.lines().map(str::trim).collect();
    fragment
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_") && !have.contains(l))
        .map(str::to_string)
        .collect()
}

/// The `kernel.json` of the kernel in `dir`, if there is a readable one. A built
/// kernel's has a `build` entry; Debian's packaged one has none.
fn kernel_manifest(dir: &Path) -> Option<serde_json::Value> {
    let text = fs::read(dir.join("kernel.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

/// An empty `<data>/kernel.tmp` with `out/modules/` in it, where the kernel directory
/// is put together before it replaces `<data>/kernel`.
fn fresh_kernel_work_dir(data_dir: &DataDir) -> Result<PathBuf> {
    let work = data_dir.root().join("kernel.tmp");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(work.join("out/modules"))
        .with_context(|| format!("creating {}", work.display()))?;
    Ok(work)
}

/// Replaces `dir` with the finished `out`.
fn install_kernel_dir(out: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::rename(out, dir).with_context(|| format!("moving kernel into {}", dir.display()))
}

/// Fetch Debian's cloud kernel with `apt-get download` and unpack into
/// `<data>/kernel`: `vmlinuz`, the PVH `vmlinux` extracted from it, the guest
/// modules and `kernel.json`. Built in a temporary directory and renamed into place,
/// so an interrupted run leaves nothing half-written.
fn debian_guest_kernel(data_dir: &DataDir) -> Result<()> {
    let dir = data_dir.kernel_dir();
    let is_debian = kernel_manifest(&dir).is_some_and(|m| m.get("build").is_none());
    if is_debian && dir.join("vmlinux").exists() && dir.join("vmlinuz").exists() {
        println!("    guest kernel: Debian's, present in {}", dir.display());
        return Ok(());
    }
    let package = pick_kernel_package()?;
    step(&format!("downloading guest kernel {package}"));
    let work = fresh_kernel_work_dir(data_dir)?;
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
    install_kernel_dir(&out, &dir)?;
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

#[cfg(test)]
mod tests {
    #[test]
    fn config_lines_kconfig_dropped_are_named() {
        let fragment = "# comment\nCONFIG_A=y\nCONFIG_B=y\nCONFIG_C=\"x\"\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\n";
        assert_eq!(super::config_not_applied(fragment, config), ["CONFIG_B=y"]);
    }
}
