//! Guest boot files: the base initramfs (aloft-init as `/init`, the virtio modules,
//! `/dev/console`), built once per (init, kernel) pair and cached, and the per-machine
//! initrd, which is the base with a small second cpio archive holding `/run.json`
//! appended (Linux unpacks concatenated archives in order).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::kernel::GuestKernel;

/// Why boot files could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The modules aloft-init loads, in load order (there is no modules.dep).
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

/// A cpio archive in the "newc" format, built in memory.
#[derive(Default)]
pub struct CpioWriter {
    buf: Vec<u8>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl CpioWriter {
    pub fn dir(&mut self, path: &str, mode: u32) {
        self.entry(path, S_IFDIR | mode, 0, 0, &[]);
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, S_IFREG | mode, 0, 0, data);
    }

    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.entry(path, S_IFCHR | mode, major, minor, &[]);
    }

    fn entry(&mut self, path: &str, mode: u32, rmajor: u32, rminor: u32, data: &[u8]) {
        self.ino += 1;
        let name_len = path.len() + 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len(),
            0,
            0,
            rmajor,
            rminor,
            name_len,
            0
        );
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(path.as_bytes());
        self.buf.push(0);
        self.pad4();
        self.buf.extend_from_slice(data);
        self.pad4();
    }

    fn pad4(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Ends the archive with the trailer entry.
    pub fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, 0, 0, &[]);
        self.buf
    }
}

/// What the base archive is made of, as the files' identities: path, inode, length
/// and modification time of the init binary and of every module included.
type Ingredients = Vec<(PathBuf, u64, u64, std::time::SystemTime)>;

/// Cache keys already computed in this process, by [`Ingredients`]: a machine's start
/// then neither reads nor hashes the init binary and the modules again (1.4 MB and
/// more, ~40 ms in an unoptimised build).
static KNOWN_KEYS: std::sync::Mutex<Vec<(Ingredients, String)>> = std::sync::Mutex::new(Vec::new());

/// The kernel's modules that go into the base archive, in load order, with their files.
fn present_modules(kernel: &GuestKernel) -> Vec<(&'static str, PathBuf)> {
    GUEST_MODULES
        .iter()
        .map(|name| (*name, kernel.modules_dir.join(format!("{name}.ko"))))
        .filter(|(_, path)| path.exists())
        .collect()
}

fn ingredients(init_bin: &Path, modules: &[(&str, PathBuf)]) -> Option<Ingredients> {
    use std::os::unix::fs::MetadataExt;
    std::iter::once(init_bin)
        .chain(modules.iter().map(|(_, path)| path.as_path()))
        .map(|path| {
            let meta = fs::metadata(path).ok()?;
            Some((
                path.to_path_buf(),
                meta.ino(),
                meta.len(),
                meta.modified().ok()?,
            ))
        })
        .collect()
}

/// Builds (or finds in the cache) the base initramfs for this init binary and kernel.
/// The cache key is the hash of the init binary and of every module included.
pub fn base_initramfs(
    kernel: &GuestKernel,
    init_bin: &Path,
    cache_dir: &Path,
) -> Result<PathBuf, InitramfsError> {
    let module_files = present_modules(kernel);
    let made_of = ingredients(init_bin, &module_files);
    if let (Some(made_of), Ok(known)) = (&made_of, KNOWN_KEYS.lock())
        && let Some((_, key)) = known.iter().find(|(i, _)| i == made_of)
    {
        let path = cache_dir.join(format!("initramfs-{key}.cpio"));
        if path.exists() {
            return Ok(path);
        }
    }
    let read = |path: &Path| {
        fs::read(path).map_err(|source| InitramfsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let init = read(init_bin)?;
    let mut modules = Vec::new();
    for (name, path) in &module_files {
        modules.push((name.to_string(), read(path)?));
    }
    let mut hasher = Sha256::new();
    hasher.update(&init);
    for (name, data) in &modules {
        hasher.update(name.as_bytes());
        hasher.update(data);
    }
    let key = hex::encode(&hasher.finalize()[..12]);
    if let (Some(made_of), Ok(mut known)) = (made_of, KNOWN_KEYS.lock()) {
        known.retain(|(i, _)| *i != made_of);
        known.push((made_of, key.clone()));
    }
    let path = cache_dir.join(format!("initramfs-{key}.cpio"));
    if path.exists() {
        return Ok(path);
    }
    let mut cpio = CpioWriter::default();
    for dir in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "newroot",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(dir, 0o755);
    }
    cpio.char_device("dev/console", 0o600, 5, 1);
    cpio.char_device("dev/null", 0o666, 1, 3);
    cpio.file("init", 0o755, &init);
    for (name, data) in &modules {
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, data);
    }
    write_atomically(&path, &cpio.finish())?;
    Ok(path)
}

/// The per-machine initrd: the base archive followed by one holding `/run.json`.
/// The base is copied in the kernel (`copy_file_range`, a reflink where the file
/// system has them) and the small archive appended. It is not fsynced: it is rewritten
/// before every boot, so a copy lost in a host crash is never used.
pub fn machine_initrd(base: &Path, run_json: &[u8], dest: &Path) -> Result<(), InitramfsError> {
    let err = |source| InitramfsError::Write {
        path: dest.to_path_buf(),
        source,
    };
    let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
    fs::copy(base, &tmp).map_err(|source| InitramfsError::Read {
        path: base.to_path_buf(),
        source,
    })?;
    let mut cpio = CpioWriter::default();
    cpio.file("run.json", 0o600, run_json);
    let appended = fs::OpenOptions::new()
        .append(true)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&cpio.finish()));
    if let Err(e) = appended {
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    fs::rename(&tmp, dest).map_err(err)
}

pub(crate) fn write_atomically(path: &Path, data: &[u8]) -> Result<(), InitramfsError> {
    let err = |source| InitramfsError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    // Unique per writer: several machines may build the same cached file at once.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let mut f = fs::File::create(&tmp).map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_is_readable_by_gnu_cpio() {
        let mut w = CpioWriter::default();
        w.dir("etc", 0o755);
        w.file("etc/hello.txt", 0o644, b"hello\n");
        w.file("run.json", 0o600, b"{}");
        let data = w.finish();
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        fs::write(&archive, &data).unwrap();
        let out = std::process::Command::new("cpio")
            .args(["-it", "-F"])
            .arg(&archive)
            .output()
            .expect("cpio is installed by `cargo xtask setup`");
        let listing = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            listing.lines().collect::<Vec<_>>(),
            ["etc", "etc/hello.txt", "run.json"]
        );
    }
}

#[cfg(test)]
mod machine_initrd_tests {
    #[test]
    fn machine_initrd_is_base_then_run_json() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.cpio");
        let mut w = super::CpioWriter::default();
        w.file("init", 0o755, b"#!init");
        let base_data = w.finish();
        std::fs::write(&base, &base_data).unwrap();
        let dest = dir.path().join("m/initrd.cpio");
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        for json in [&b"{\"a\":1}"[..], b"{}"] {
            super::machine_initrd(&base, json, &dest).unwrap();
            let data = std::fs::read(&dest).unwrap();
            assert!(data.starts_with(&base_data));
            let tail = &data[base_data.len()..];
            assert!(tail.windows(json.len()).any(|w| w == json));
        }
        assert_eq!(
            std::fs::read_dir(dest.parent().unwrap()).unwrap().count(),
            1
        );
    }
}

#[cfg(test)]
mod concurrency_tests {
    use super::write_atomically;

    #[test]
    fn concurrent_writers_of_one_file_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.cpio");
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || write_atomically(&path, &[i as u8; 4096]))
            })
            .collect();
        for t in threads {
            t.join().unwrap().expect("every writer succeeds");
        }
        assert_eq!(std::fs::read(&path).unwrap().len(), 4096);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp files left"
        );
    }
}

#[cfg(test)]
mod base_tests {
    use super::{GuestKernel, base_initramfs};

    #[test]
    fn base_archive_follows_the_init_binary() {
        let dir = tempfile::tempdir().unwrap();
        let modules_dir = dir.path().join("modules");
        std::fs::create_dir(&modules_dir).unwrap();
        let kernel = GuestKernel {
            vmlinux: dir.path().join("vmlinux"),
            modules_dir,
        };
        let cache = dir.path().join("cache");
        let init = dir.path().join("init");
        std::fs::write(&init, b"first init").unwrap();
        let first = base_initramfs(&kernel, &init, &cache).unwrap();
        // The second call finds the key it computed; the archive is still the same.
        assert_eq!(base_initramfs(&kernel, &init, &cache).unwrap(), first);
        // A new init binary (a new file, as a build writes it) gets its own archive.
        let next = dir.path().join("init.new");
        std::fs::write(&next, b"second init, a different length").unwrap();
        std::fs::rename(&next, &init).unwrap();
        let second = base_initramfs(&kernel, &init, &cache).unwrap();
        assert_ne!(second, first);
        let data = std::fs::read(&second).unwrap();
        assert!(data.windows(11).any(|w| w == b"second init"));
        // A removed cache file is built again.
        std::fs::remove_file(&second).unwrap();
        assert_eq!(base_initramfs(&kernel, &init, &cache).unwrap(), second);
        assert!(second.exists());
    }
}
