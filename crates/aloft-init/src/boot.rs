//! One-shot machine set-up, in boot order: early mounts, modules, the switch to the
//! root disk, late mounts, volumes, files, names, network.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use aloft_types::guest::{GUEST_MODULES, RUN_CONFIG_PATH, RunConfig};

use crate::netlink::{self, Netlink};
use crate::sys;

/// A step of the set-up that failed, with what it was working on.
#[derive(Debug)]
pub struct BootError(pub String);

impl std::fmt::Display for BootError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> BootError {
    BootError(format!("{what}: {e}"))
}

fn mount_fs(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), BootError> {
    fs::create_dir_all(target).map_err(|e| err(format_args!("creating {target}"), e))?;
    sys::mount(src, Path::new(target), Some(fstype), flags, data)
        .map_err(|e| err(format_args!("mounting {fstype} on {target}"), e))
}

/// /proc, /sys and /dev (devtmpfs) inside the initramfs.
pub fn early_mounts() -> Result<(), BootError> {
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nodev, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nodev, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        libc::MS_NOSUID,
        Some("mode=0755"),
    )
}

/// Modules only a networked machine needs.
pub const NET_MODULES: &[&str] = &["failover", "net_failover", "virtio_net"];
/// Modules nothing needs before the app runs: loaded right after it has started (the
/// power button devices are opened then), which shortens the time to `InitStarted`.
pub const LATE_MODULES: &[&str] = &["virtio-rng", "virtio_balloon", "button", "evdev", "overlay"];

/// The root disk being mounted on /newroot by a thread of its own.
pub type RootMount = std::thread::JoinHandle<Result<u64, BootError>>;

/// What [`load_modules`] did: the late modules left for later, the root mount under
/// way, and how long each module's load took (guest ms), for the console timeline.
pub struct LoadedModules {
    pub late: Vec<&'static str>,
    pub root_mount: Option<RootMount>,
    pub times: Vec<(&'static str, u64)>,
}

/// Where the initramfs keeps the modules.
pub const MODULES_DIR: &str = "/lib/modules";

/// Loads the guest modules in dependency order, except `skip`; missing files are
/// skipped. The `LATE_MODULES` are only listed, for [`Initramfs::finish`]. With
/// `root_device`, the root disk starts mounting on /newroot as soon as `virtio_blk`
/// is in, so its I/O overlaps the loading of the other modules; [`wait_root`] waits
/// for it.
pub fn load_modules(skip: &[&str], root_device: Option<&str>) -> LoadedModules {
    let dir = Path::new(MODULES_DIR);
    let mut root_mount = None;
    let mut times = Vec::new();
    let present: Vec<&'static str> = GUEST_MODULES
        .iter()
        .copied()
        .filter(|n| !skip.contains(n) && dir.join(format!("{n}.ko")).exists())
        .collect();
    let (late, now): (Vec<&'static str>, Vec<&'static str>) =
        present.into_iter().partition(|n| LATE_MODULES.contains(n));
    // A kernel with virtio_blk built in (the one `cargo xtask setup` builds) has the
    // disk before /init runs: the mount starts at once, on a thread beside the module
    // loads when there are any; with none (that kernel has no modules) it runs on the
    // boot's path ([`wait_root`]), without a thread to start and join.
    if let Some(dev) = root_device
        && !now.contains(&"virtio_blk")
        && !now.is_empty()
    {
        root_mount = spawn_root_mount(dev);
    }
    for name in &now {
        let path = dir.join(format!("{name}.ko"));
        // Unsigned from memory first (signature checks are slow under TCG); a kernel
        // that enforces signatures gets the signed file.
        let started = sys::uptime_ms();
        let r = fs::read(&path)
            .and_then(|data| sys::init_module_unsigned(&data))
            .or_else(|_| sys::finit_module(&path));
        if let Err(e) = r {
            eprintln!("aloft-init: loading {}: {e}", path.display());
        }
        times.push((*name, sys::uptime_ms().saturating_sub(started)));
        if *name == "virtio_blk"
            && let Some(dev) = root_device
        {
            root_mount = spawn_root_mount(dev);
        }
    }
    LoadedModules {
        late,
        root_mount,
        times,
    }
}

/// Starts mounting the root disk on a thread of its own; `None` (mount later, on the
/// boot's path) when no thread can be made.
fn spawn_root_mount(dev: &str) -> Option<RootMount> {
    let dev = dev.to_string();
    match std::thread::Builder::new()
        .name("root-mount".into())
        .spawn(move || mount_root(&dev))
    {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("aloft-init: no thread for the root mount ({e}): mounting later");
            None
        }
    }
}

/// The initramfs once the root disk is /: reached through a directory descriptor
/// opened before the switch, for the late modules and for freeing its files, both
/// off the boot's path.
pub struct Initramfs {
    dir: fs::File,
    late: Vec<&'static str>,
}

impl Initramfs {
    /// Opens the initramfs root; call before [`switch_root`].
    pub fn open(late: Vec<&'static str>) -> Result<Initramfs, BootError> {
        let dir = fs::File::open("/").map_err(|e| err("opening the initramfs root", e))?;
        Ok(Initramfs { dir, late })
    }

    /// Loads the late modules, then removes the initramfs files nothing needs any
    /// more (their memory is freed; best effort).
    pub fn finish(self) {
        let from = sys::uptime_ms();
        let mut times = Vec::new();
        for name in &self.late {
            let started = sys::uptime_ms();
            let path = format!("lib/modules/{name}.ko");
            let r = sys::open_at(&self.dir, &path).and_then(|mut f| {
                let mut data = Vec::new();
                io::Read::read_to_end(&mut f, &mut data)?;
                sys::init_module_unsigned(&data)
            });
            if let Err(e) = r {
                eprintln!("aloft-init: loading module {name}: {e}");
            }
            times.push(format!(
                "{name} {}ms",
                sys::uptime_ms().saturating_sub(started)
            ));
        }
        for name in GUEST_MODULES {
            let _ = sys::unlink_at(&self.dir, &format!("lib/modules/{name}.ko"));
        }
        let _ = sys::unlink_at(&self.dir, RUN_CONFIG_PATH.trim_start_matches('/'));
        let _ = sys::unlink_at(&self.dir, "init");
        eprintln!(
            "aloft-init: late modules from {from} to {} ms after kernel start: {}",
            sys::uptime_ms(),
            times.join(", ")
        );
    }
}

/// Mounts the root disk on /newroot. `noinit_itable`: no background zeroing of inode
/// tables competing with the boot for the (emulated) CPU and writing to the overlay.
/// Returns how long the mount took (guest ms), for the console timeline.
fn mount_root(dev: &str) -> Result<u64, BootError> {
    wait_for_block(dev)?;
    raise_readahead(dev);
    fs::create_dir_all("/newroot").map_err(|e| err("creating /newroot", e))?;
    let started = sys::uptime_ms();
    sys::mount(
        dev,
        Path::new("/newroot"),
        Some("ext4"),
        ROOT_MOUNT_FLAGS,
        Some(ROOT_MOUNT_OPTIONS),
    )
    .map_err(|e| err(format_args!("mounting the root disk {dev} (ext4)"), e))?;
    Ok(sys::uptime_ms().saturating_sub(started))
}

/// Read-ahead of the root disk, in KiB. The kernel's default of 128 makes a program
/// start fault its file in 128 KiB at a time, each read a round trip through
/// virtio-blk that costs much emulated CPU under TCG; reading more per trip cuts the
/// app's start (the page cache it fills is reclaimable).
const ROOT_READ_AHEAD_KB: u32 = 2048;

/// Sets the read-ahead of `dev` (`/dev/vda` → `/sys/block/vda/...`), best effort.
fn raise_readahead(dev: &str) {
    let Some(name) = Path::new(dev).file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let knob = format!("/sys/block/{name}/queue/read_ahead_kb");
    if let Err(e) = fs::write(&knob, ROOT_READ_AHEAD_KB.to_string()) {
        eprintln!("aloft-init: setting {knob}: {e}");
    }
}

/// Starts reading the app's program file into the page cache while the rest of the
/// set-up runs, so its start finds it there instead of faulting it in from the disk.
/// Call once the root disk is `/`; best effort.
pub fn prefetch_program(cfg: &RunConfig) {
    let Some(program) = cfg
        .command()
        .ok()
        .and_then(|argv| crate::process::lookup(argv.first()?, &cfg.environment()))
    else {
        return;
    };
    if let Ok(file) = fs::File::open(&program)
        && let Err(e) = sys::will_need(&file)
    {
        eprintln!("aloft-init: reading {program} ahead: {e}");
    }
}

/// ext4 options of the root disk.
const ROOT_MOUNT_OPTIONS: &str = "noinit_itable";

/// Mount flags of the root disk: no access times, so reading the app's files does
/// not write their inodes (each a journal transaction under TCG).
const ROOT_MOUNT_FLAGS: libc::c_ulong = libc::MS_NOATIME;

/// Waits (bounded) for a device node or interface to show up.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T, BootError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(BootError(format!(
                "{what} did not appear within {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn wait_for_block(dev: &str) -> Result<(), BootError> {
    wait_for(dev, Duration::from_secs(10), || {
        Path::new(dev).exists().then_some(())
    })
}

/// Mounts the root disk on /newroot (or waits for [`load_modules`] to have done it).
/// Returns how long the mount itself took (guest ms).
pub fn wait_root(cfg: &RunConfig, mounting: Option<RootMount>) -> Result<u64, BootError> {
    match mounting {
        Some(h) => h
            .join()
            .map_err(|_| BootError("the root mount thread panicked".into()))?,
        None => mount_root(&cfg.root_device),
    }
}

/// Moves the API filesystems into the root mounted on /newroot and makes it / (a
/// move, nothing is copied).
pub fn switch_root() -> Result<(), BootError> {
    for m in ["/dev", "/proc", "/sys"] {
        let target = format!("/newroot{m}");
        fs::create_dir_all(&target).map_err(|e| err(format_args!("creating {target}"), e))?;
        sys::mount(m, Path::new(&target), None, libc::MS_MOVE, None)
            .map_err(|e| err(format_args!("moving {m} to {target}"), e))?;
    }
    std::env::set_current_dir("/newroot").map_err(|e| err("chdir /newroot", e))?;
    sys::mount(".", Path::new("/"), None, libc::MS_MOVE, None)
        .map_err(|e| err("moving /newroot to /", e))?;
    std::os::unix::fs::chroot(".").map_err(|e| err("chroot", e))?;
    std::env::set_current_dir("/").map_err(|e| err("chdir /", e))
}

/// The per-boot tmpfs: the metadata API socket and the files [`names`] generates,
/// so that a boot writes nothing to the root disk (its first write costs the journal
/// and the block allocator before the app starts).
pub const BOOT_TMPFS: &str = "/.fly";

/// /dev/pts, /dev/shm, /run, /tmp, [`BOOT_TMPFS`] and the /dev/fd links, inside the
/// new root.
pub fn late_mounts() -> Result<(), BootError> {
    let flags = libc::MS_NOSUID | libc::MS_NOEXEC;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        flags,
        Some("mode=0620,ptmxmode=0666"),
    )?;
    mount_fs(
        "shm",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs(
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "tmpfs",
        BOOT_TMPFS,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=0755,size=1m"),
    )?;
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    Ok(())
}

pub fn mount_volumes(cfg: &RunConfig) -> Result<(), BootError> {
    for v in &cfg.volumes {
        wait_for_block(&v.device)?;
        fs::create_dir_all(&v.path)
            .map_err(|e| err(format_args!("volume {}: creating {}", v.name, v.path), e))?;
        sys::mount(&v.device, Path::new(&v.path), Some(&v.fs), 0, None).map_err(|e| {
            err(
                format_args!(
                    "volume {}: mounting {} ({}) on {}",
                    v.name, v.device, v.fs, v.path
                ),
                e,
            )
        })?;
    }
    Ok(())
}

/// Unmounts volumes in reverse order; returns the failures.
pub fn unmount_volumes(cfg: &RunConfig) -> Vec<String> {
    let mut failed = Vec::new();
    for v in cfg.volumes.iter().rev() {
        if let Err(e) = sys::umount(Path::new(&v.path)) {
            failed.push(format!("volume {}: unmounting {}: {e}", v.name, v.path));
        }
    }
    failed
}

pub fn write_files(cfg: &RunConfig) -> Result<(), BootError> {
    let files = cfg.files().map_err(|e| BootError(e.to_string()))?;
    for (path, data, mode) in files {
        let p = Path::new(&path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| err(format_args!("file {path}: creating its directory"), e))?;
        }
        let _ = fs::remove_file(p);
        fs::write(p, &data).map_err(|e| err(format_args!("file {path}"), e))?;
        fs::set_permissions(p, fs::Permissions::from_mode(mode))
            .map_err(|e| err(format_args!("file {path}: chmod"), e))?;
    }
    Ok(())
}

/// Where the swap file of `init.swap_size_mb` lives (on the root disk's overlay).
pub const SWAP_FILE: &str = "/swapfile";

/// The first page of a swap area (what mkswap writes): version 1, the last usable
/// page, no bad pages, and the `SWAPSPACE2` magic at the end of the page.
pub fn swap_header(size_bytes: u64, page: usize) -> Vec<u8> {
    let mut h = vec![0u8; page];
    let last_page = (size_bytes / page as u64).saturating_sub(1) as u32;
    h[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    h[1028..1032].copy_from_slice(&last_page.to_le_bytes());
    h[page - 10..].copy_from_slice(b"SWAPSPACE2");
    h
}

/// Creates and enables a swap file of `init.swap_size_mb` MiB, if asked for.
pub fn swap(cfg: &RunConfig) -> Result<(), BootError> {
    let Some(mb) = cfg.config.init.swap_size_mb.filter(|mb| *mb > 0) else {
        return Ok(());
    };
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let what = format_args!("swap file {SWAP_FILE} of {mb} MiB");
    let size = (mb as u64) << 20;
    let _ = fs::remove_file(SWAP_FILE);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(SWAP_FILE)
        .map_err(|e| err(what, e))?;
    // SAFETY: fallocate on a file we own, with a range inside i64.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as libc::off_t) };
    if r < 0 {
        return Err(err(what, io::Error::last_os_error()));
    }
    // SAFETY: sysconf has no memory arguments.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    f.write_all(&swap_header(size, page))
        .map_err(|e| err(what, e))?;
    f.sync_all().map_err(|e| err(what, e))?;
    drop(f);
    let path = std::ffi::CString::new(SWAP_FILE).map_err(|e| err(what, e))?;
    // SAFETY: NUL-terminated path, no flags.
    if unsafe { libc::swapon(path.as_ptr(), 0) } < 0 {
        return Err(err(what, io::Error::last_os_error()));
    }
    Ok(())
}

/// The text of /etc/hosts.
pub fn hosts_file(cfg: &RunConfig) -> String {
    let name = cfg.hostname();
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    let mut own = false;
    for iface in &cfg.network.interfaces {
        for a in &iface.addresses {
            if let Some(c) = netlink::parse_cidr(a) {
                let _ = writeln!(s, "{}\t{name}", c.addr);
                own = true;
            }
        }
    }
    if !own {
        let _ = writeln!(s, "127.0.1.1\t{name}");
    }
    for h in &cfg.network.extra_hosts {
        let _ = writeln!(s, "{}\t{}", h.ip, h.names.join(" "));
    }
    s
}

/// The text of /etc/resolv.conf, if any name server is configured.
pub fn resolv_conf(cfg: &RunConfig) -> Option<String> {
    let dns = cfg.config.dns.as_ref();
    let mut servers: Vec<&String> = cfg.network.dns_servers.iter().collect();
    if let Some(d) = dns {
        servers.extend(d.nameservers.iter());
    }
    if servers.is_empty() {
        return None;
    }
    let mut s = String::new();
    if let Some(d) = dns.filter(|d| !d.searches.is_empty()) {
        let _ = writeln!(s, "search {}", d.searches.join(" "));
    }
    for srv in servers {
        let _ = writeln!(s, "nameserver {srv}");
    }
    Some(s)
}

/// Puts `text` at `/etc/<name>`: written to [`BOOT_TMPFS`] and bind-mounted over the
/// image's regular file (as Docker does), so the root disk is not written. Where the
/// image has no such file, or a symlink (an image's /etc/resolv.conf often points
/// into /run, gone now), the file is replaced on the root disk instead.
fn place_etc_file(name: &str, text: &str) -> Result<(), BootError> {
    let target = format!("/etc/{name}");
    if fs::symlink_metadata(&target).is_ok_and(|m| m.is_file()) {
        let source = format!("{BOOT_TMPFS}/etc/{name}");
        let placed = fs::create_dir_all(format!("{BOOT_TMPFS}/etc"))
            .and_then(|()| fs::write(&source, text))
            .and_then(|()| sys::mount(&source, Path::new(&target), None, libc::MS_BIND, None));
        match placed {
            Ok(()) => return Ok(()),
            Err(e) => eprintln!("aloft-init: bind-mounting {source} on {target}: {e}"),
        }
    }
    let _ = fs::remove_file(&target);
    fs::write(&target, text).map_err(|e| err(format_args!("writing {target}"), e))
}

pub fn names(cfg: &RunConfig) -> Result<(), BootError> {
    let name = cfg.hostname();
    sys::sethostname(name).map_err(|e| err(format_args!("sethostname {name:?}"), e))?;
    fs::create_dir_all("/etc").map_err(|e| err("creating /etc", e))?;
    place_etc_file("hostname", &format!("{name}\n"))?;
    place_etc_file("hosts", &hosts_file(cfg))?;
    if let Some(text) = resolv_conf(cfg) {
        place_etc_file("resolv.conf", &text)?;
    }
    Ok(())
}

fn exists_ok(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r,
    }
}

pub fn network(cfg: &RunConfig) -> Result<(), BootError> {
    let mut nl = Netlink::open().map_err(|e| err("opening rtnetlink", e))?;
    if let Some(lo) = netlink::if_index("lo") {
        nl.link_up(lo, None).map_err(|e| err("setting lo up", e))?;
    }
    for iface in &cfg.network.interfaces {
        let name = iface.name.as_str();
        let idx = wait_for(
            &format!("network interface {name}"),
            Duration::from_secs(5),
            || netlink::if_index(name),
        )?;
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{name}/accept_dad"), "0");
        // No IPv6 address or gateway configured: no link-local address, router
        // solicitations or MLD reports to make while booting.
        let v6 = iface.gateway6.is_some() || iface.addresses.iter().any(|a| a.contains(':'));
        if !v6 {
            let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        }
        nl.link_up(idx, iface.mtu)
            .map_err(|e| err(format_args!("setting {name} up"), e))?;
        for a in &iface.addresses {
            let c = netlink::parse_cidr(a)
                .ok_or_else(|| BootError(format!("{name}: bad address {a:?}")))?;
            exists_ok(nl.add_address(idx, c))
                .map_err(|e| err(format_args!("{name}: adding {a}"), e))?;
        }
        for gw in [&iface.gateway4, &iface.gateway6].into_iter().flatten() {
            let ip: IpAddr = gw
                .parse()
                .map_err(|_| BootError(format!("{name}: bad gateway {gw:?}")))?;
            exists_ok(nl.add_default_route(idx, ip))
                .map_err(|e| err(format_args!("{name}: default route via {gw}"), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_types::guest::{ExtraHost, InterfaceConfig};
    use aloft_types::machine::DnsConfig;

    #[test]
    fn swap_header_layout() {
        let h = swap_header(16 << 20, 4096);
        assert_eq!(h.len(), 4096);
        assert_eq!(&h[4086..], b"SWAPSPACE2");
        assert_eq!(u32::from_le_bytes(h[1024..1028].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(h[1028..1032].try_into().unwrap()), 4095);
        assert!(h[..1024].iter().all(|b| *b == 0));
    }

    #[test]
    fn hosts_and_resolv() {
        let mut cfg = RunConfig {
            machine_id: "m1".into(),
            ..Default::default()
        };
        assert!(hosts_file(&cfg).contains("127.0.1.1\tm1\n"));
        assert_eq!(resolv_conf(&cfg), None);
        cfg.network.interfaces.push(InterfaceConfig {
            name: "eth0".into(),
            addresses: vec!["172.19.0.2/24".into(), "fdaa::2/64".into()],
            ..Default::default()
        });
        cfg.network.extra_hosts.push(ExtraHost {
            ip: "172.19.0.3".into(),
            names: vec!["other".into(), "other.internal".into()],
        });
        cfg.network.dns_servers.push("fdaa::3".into());
        cfg.config.dns = Some(DnsConfig {
            searches: vec!["internal".into()],
            ..Default::default()
        });
        let hosts = hosts_file(&cfg);
        assert!(hosts.contains("172.19.0.2\tm1\n"), "{hosts}");
        assert!(hosts.contains("fdaa::2\tm1\n"), "{hosts}");
        assert!(
            hosts.contains("172.19.0.3\tother other.internal\n"),
            "{hosts}"
        );
        assert!(!hosts.contains("127.0.1.1"), "{hosts}");
        assert_eq!(
            resolv_conf(&cfg).unwrap(),
            "search internal\nnameserver fdaa::3\n"
        );
    }
}
