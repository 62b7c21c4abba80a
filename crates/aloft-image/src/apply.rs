//! Safe application of OCI/Docker layer tarballs into a staging directory.
//!
//! Layers are applied in order. Whiteouts (`.wh.NAME`) delete what lower layers put
//! there, opaque markers (`.wh..wh..opq`) hide a lower directory's whole content.
//! Hardlinks, symlinks, modes, owners, mtimes and (as root) device nodes and fifos are
//! reproduced.
//!
//! Nothing is ever written outside the root: entry names that are absolute or contain
//! `..` are refused; every parent component is resolved inside the root (an absolute
//! symlink target is read relative to the root, as the guest will see it) and a
//! resolution that would leave the root is refused; the last component is never
//! followed (an existing entry there is replaced, not written through); hardlink
//! targets are resolved the same way. Decompression bombs are stopped by limits on
//! unpacked bytes and entry count. Each refusal names the layer digest and the entry.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};
use tar::EntryType;

/// Limits protecting the host from hostile layers.
#[derive(Debug, Clone, Copy)]
pub struct ApplyLimits {
    /// Maximum unpacked bytes over all layers of one image (decompressed stream).
    pub max_bytes: u64,
    /// Maximum number of tar entries over all layers of one image.
    pub max_entries: u64,
}

impl Default for ApplyLimits {
    fn default() -> Self {
        Self {
            max_bytes: 32 << 30,
            max_entries: 2_000_000,
        }
    }
}

/// A layer could not be applied. Each variant names the layer and, where there is
/// one, the entry path.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("layer {layer}: entry {path:?} refused: {reason}")]
    Refused {
        layer: String,
        path: String,
        reason: &'static str,
    },
    #[error("layer {layer}: entry {path:?}: unpacked size exceeds the limit of {limit} bytes")]
    TooLarge {
        layer: String,
        path: String,
        limit: u64,
    },
    #[error("layer {layer}: entry {path:?}: more than {limit} entries")]
    TooManyEntries {
        layer: String,
        path: String,
        limit: u64,
    },
    #[error(
        "layer {layer}: uncompressed content has digest {actual}, the image config says {expected}"
    )]
    DiffIdMismatch {
        layer: String,
        expected: String,
        actual: String,
    },
    #[error("layer {layer}: entry {path:?}")]
    Io {
        layer: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: unreadable tar stream")]
    Tar {
        layer: String,
        #[source]
        source: io::Error,
    },
}

/// Compression of a layer blob, sniffed from its first bytes.
fn decompressor<'a>(
    mut reader: BufReader<Box<dyn Read + Send + 'a>>,
) -> io::Result<Box<dyn Read + Send + 'a>> {
    let head = reader.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(reader)?))
    } else {
        Ok(Box::new(reader))
    }
}

/// Counts and hashes the decompressed stream, failing once it passes `limit`.
struct Meter<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
}

impl<R: Read> Read for Meter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::other(BombError));
        }
        Ok(n)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("decompressed stream exceeds the unpack limit")]
struct BombError;

/// Applies layers, in order, into one staging directory.
pub struct LayerApplier {
    root: PathBuf,
    limits: ApplyLimits,
    is_root: bool,
    bytes: u64,
    entries: u64,
    /// mtimes of directories, set once all layers are in (writing into a directory
    /// changes its mtime).
    dir_times: HashMap<PathBuf, SystemTime>,
    /// Parent directories already resolved (relative name → host path).
    resolved: HashMap<PathBuf, PathBuf>,
}

impl LayerApplier {
    /// `root` must exist and be empty (or hold the result of earlier layers).
    pub fn new(root: impl Into<PathBuf>, limits: ApplyLimits) -> Self {
        Self {
            root: root.into(),
            limits,
            is_root: rustix::process::geteuid().is_root(),
            bytes: 0,
            entries: 0,
            dir_times: HashMap::new(),
            resolved: HashMap::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Applies one layer blob (gzip, zstd or plain tar). When `diff_id` is given the
    /// uncompressed stream must hash to it.
    pub fn apply(
        &mut self,
        layer: &str,
        blob: impl Read + Send,
        diff_id: Option<&str>,
    ) -> Result<(), ApplyError> {
        let tar_err = |source| ApplyError::Tar {
            layer: layer.to_string(),
            source,
        };
        let boxed: Box<dyn Read + Send + '_> = Box::new(blob);
        let reader = decompressor(BufReader::with_capacity(1 << 16, boxed)).map_err(tar_err)?;
        let mut meter = Meter {
            inner: reader,
            hasher: Sha256::new(),
            count: 0,
            limit: self.limits.max_bytes.saturating_sub(self.bytes),
        };
        let result = self.apply_tar(layer, &mut meter);
        if result.is_err() && meter.count > meter.limit {
            return Err(ApplyError::TooLarge {
                layer: layer.to_string(),
                path: "(decompressed stream)".to_string(),
                limit: self.limits.max_bytes,
            });
        }
        result?;
        // Drain trailing padding so the digest covers the whole stream.
        io::copy(&mut meter, &mut io::sink()).map_err(tar_err)?;
        self.bytes += meter.count;
        if let Some(expected) = diff_id {
            let actual = format!("sha256:{}", hex::encode(meter.hasher.finalize()));
            if actual != expected {
                return Err(ApplyError::DiffIdMismatch {
                    layer: layer.to_string(),
                    expected: expected.to_string(),
                    actual,
                });
            }
        }
        Ok(())
    }

    /// Sets directory mtimes. Call once after the last layer.
    pub fn finish(&mut self) -> Result<(), ApplyError> {
        let mut dirs: Vec<_> = self.dir_times.drain().collect();
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (path, mtime) in dirs {
            let secs = mtime
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            // Never follows a symlink: a later layer may have replaced the directory.
            lutimes(&path, secs);
        }
        Ok(())
    }

    fn apply_tar(&mut self, layer: &str, stream: &mut dyn Read) -> Result<(), ApplyError> {
        let tar_err = |source| ApplyError::Tar {
            layer: layer.to_string(),
            source,
        };
        let mut archive = tar::Archive::new(stream);
        let mut created: HashSet<PathBuf> = HashSet::new();
        let mut layer_bytes = 0u64;
        self.resolved.clear();
        for entry in archive.entries().map_err(tar_err)? {
            let mut entry = entry.map_err(tar_err)?;
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw).into_owned();
            let ctx = EntryCtx {
                layer,
                path: &shown,
            };
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(ApplyError::TooManyEntries {
                    layer: layer.to_string(),
                    path: shown,
                    limit: self.limits.max_entries,
                });
            }
            let size = entry.header().size().map_err(tar_err)?;
            layer_bytes = layer_bytes.saturating_add(size);
            if self.bytes.saturating_add(layer_bytes) > self.limits.max_bytes {
                return Err(ApplyError::TooLarge {
                    layer: layer.to_string(),
                    path: shown,
                    limit: self.limits.max_bytes,
                });
            }
            let rel = ctx.relative(&raw)?;
            let Some(name) = rel.file_name().map(OsStr::to_os_string) else {
                // The root itself ("./"): take its metadata.
                if entry.header().entry_type() == EntryType::Directory {
                    let root = self.root.clone();
                    self.set_meta_path(&ctx, &root, &entry, true)?;
                }
                continue;
            };
            let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            let name_bytes = name.as_bytes();
            if name_bytes.starts_with(b".wh.") {
                let parent = self.resolve_parent(&ctx, &parent_rel, false)?;
                let Some(parent) = parent else { continue };
                if name_bytes == b".wh..wh..opq" {
                    opaque(&ctx, &parent, &created)?;
                    self.resolved.clear();
                } else if name_bytes.starts_with(b".wh..wh.") {
                    // aufs bookkeeping (.wh..wh.plnk etc.): nothing to do.
                } else {
                    let target = parent.join(OsStr::from_bytes(&name_bytes[4..]));
                    if !created.contains(&target) {
                        remove_any(&ctx, &target)?;
                        self.resolved.clear();
                    }
                }
                continue;
            }
            let Some(parent) = self.resolve_parent(&ctx, &parent_rel, true)? else {
                continue;
            };
            let dest = parent.join(&name);
            let kind = entry.header().entry_type();
            match kind {
                EntryType::Directory => {
                    match fs::symlink_metadata(&dest) {
                        Ok(m) if m.is_dir() => {}
                        Ok(_) => {
                            remove_any(&ctx, &dest)?;
                            self.resolved.clear();
                            mkdir(&ctx, &dest)?;
                        }
                        Err(_) => mkdir(&ctx, &dest)?,
                    }
                    self.set_meta_path(&ctx, &dest, &entry, true)?;
                    set_xattrs(&mut entry, &dest);
                }
                EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                    self.replace(&ctx, &dest)?;
                    let mut file = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                        .mode(0o600)
                        .open(&dest)
                        .map_err(|e| ctx.io(e))?;
                    io::copy(&mut entry, &mut file).map_err(|e| ctx.io(e))?;
                    self.set_meta_file(&ctx, &file, &entry)?;
                    set_xattrs(&mut entry, &dest);
                }
                EntryType::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| ctx.refused("symlink without a target"))?
                        .into_owned();
                    self.replace(&ctx, &dest)?;
                    std::os::unix::fs::symlink(OsStr::from_bytes(&target), &dest)
                        .map_err(|e| ctx.io(e))?;
                    self.set_owner_nofollow(&ctx, &dest, &entry)?;
                    if let Ok(mtime) = entry.header().mtime() {
                        lutimes(&dest, mtime);
                    }
                }
                EntryType::Link => {
                    let link = entry
                        .link_name_bytes()
                        .ok_or_else(|| ctx.refused("hardlink without a target"))?
                        .into_owned();
                    let link_rel = ctx
                        .relative(&link)
                        .map_err(|_| ctx.refused("hardlink target is absolute or contains '..'"))?;
                    let link_parent = link_rel.parent().unwrap_or(Path::new(""));
                    let Some(link_name) = link_rel.file_name() else {
                        return Err(ctx.refused("hardlink to the root directory"));
                    };
                    let target = self
                        .resolve_parent(&ctx, link_parent, false)?
                        .map(|p| p.join(link_name))
                        .ok_or_else(|| ctx.refused("hardlink target does not exist"))?;
                    match fs::symlink_metadata(&target) {
                        Ok(m) if m.is_dir() => {
                            return Err(ctx.refused("hardlink to a directory"));
                        }
                        Ok(_) => {}
                        Err(_) => return Err(ctx.refused("hardlink target does not exist")),
                    }
                    if target == dest {
                        continue;
                    }
                    self.replace(&ctx, &dest)?;
                    fs::hard_link(&target, &dest).map_err(|e| ctx.io(e))?;
                }
                EntryType::Char | EntryType::Block | EntryType::Fifo => {
                    if !self.is_root && kind != EntryType::Fifo {
                        tracing::warn!(layer, path = %shown, "skipping device node: not root");
                        continue;
                    }
                    self.replace(&ctx, &dest)?;
                    let h = entry.header();
                    let major = h.device_major().ok().flatten().unwrap_or(0);
                    let minor = h.device_minor().ok().flatten().unwrap_or(0);
                    let ftype = match kind {
                        EntryType::Char => rustix::fs::FileType::CharacterDevice,
                        EntryType::Block => rustix::fs::FileType::BlockDevice,
                        _ => rustix::fs::FileType::Fifo,
                    };
                    rustix::fs::mknodat(
                        rustix::fs::CWD,
                        &dest,
                        ftype,
                        rustix::fs::Mode::from_raw_mode(0o600),
                        rustix::fs::makedev(major, minor),
                    )
                    .map_err(|e| ctx.io(e.into()))?;
                    self.set_meta_path(&ctx, &dest, &entry, false)?;
                }
                _ => {
                    tracing::debug!(layer, path = %shown, ?kind, "skipping tar entry type");
                    continue;
                }
            }
            created.insert(dest);
        }
        Ok(())
    }

    /// Clears the way for a non-directory entry at `dest` (never following it).
    fn replace(&mut self, ctx: &EntryCtx, dest: &Path) -> Result<(), ApplyError> {
        match fs::symlink_metadata(dest) {
            Ok(m) => {
                if m.is_dir() || m.is_symlink() {
                    self.resolved.clear();
                }
                remove_any(ctx, dest)
            }
            Err(_) => Ok(()),
        }
    }

    /// Resolves a relative parent directory inside the root, following symlinks
    /// as the guest would but refusing to leave the root. With `create`, missing
    /// directories are made; without, `None` means the parent does not exist.
    fn resolve_parent(
        &mut self,
        ctx: &EntryCtx,
        rel: &Path,
        create: bool,
    ) -> Result<Option<PathBuf>, ApplyError> {
        if let Some(p) = self.resolved.get(rel) {
            return Ok(Some(p.clone()));
        }
        let mut stack: Vec<OsString> = Vec::new();
        let mut queue: Vec<OsString> = rel
            .components()
            .rev()
            .map(|c| c.as_os_str().to_os_string())
            .collect();
        let mut hops = 0;
        let mut missing = false;
        while let Some(c) = queue.pop() {
            if c.is_empty() || c == "." || c == "/" {
                continue;
            }
            if c == ".." {
                if stack.pop().is_none() {
                    return Err(ctx.refused("path resolves outside the root through a symlink"));
                }
                continue;
            }
            stack.push(c);
            if missing {
                continue;
            }
            let host: PathBuf = self.root.join(stack.iter().collect::<PathBuf>());
            match fs::symlink_metadata(&host) {
                Ok(m) if m.is_symlink() => {
                    hops += 1;
                    if hops > 40 {
                        return Err(ctx.refused("too many levels of symlinks"));
                    }
                    let target = fs::read_link(&host).map_err(|e| ctx.io(e))?;
                    stack.pop();
                    if target.is_absolute() {
                        stack.clear();
                    }
                    for comp in target.components().rev() {
                        match comp {
                            Component::Normal(n) => queue.push(n.to_os_string()),
                            Component::ParentDir => queue.push("..".into()),
                            _ => {}
                        }
                    }
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(ctx.refused("a parent component is not a directory")),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    missing = true;
                }
                Err(e) => return Err(ctx.io(e)),
            }
        }
        let host = self.root.join(stack.iter().collect::<PathBuf>());
        if missing {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&host)
                .map_err(|e| ctx.io(e))?;
        }
        self.resolved.insert(rel.to_path_buf(), host.clone());
        Ok(Some(host))
    }

    fn set_meta_file(
        &mut self,
        ctx: &EntryCtx,
        file: &File,
        entry: &tar::Entry<impl Read>,
    ) -> Result<(), ApplyError> {
        let h = entry.header();
        if self.is_root {
            let uid = h.uid().unwrap_or(0) as u32;
            let gid = h.gid().unwrap_or(0) as u32;
            std::os::unix::fs::fchown(file, Some(uid), Some(gid)).map_err(|e| ctx.io(e))?;
        }
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| ctx.io(e))?;
        if let Ok(mtime) = h.mtime() {
            let t = UNIX_EPOCH + Duration::from_secs(mtime);
            file.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
                .map_err(|e| ctx.io(e))?;
        }
        Ok(())
    }

    fn set_meta_path(
        &mut self,
        ctx: &EntryCtx,
        path: &Path,
        entry: &tar::Entry<impl Read>,
        is_dir: bool,
    ) -> Result<(), ApplyError> {
        let h = entry.header();
        self.set_owner_nofollow(ctx, path, entry)?;
        let mode = h.mode().unwrap_or(0o755) & 0o7777;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| ctx.io(e))?;
        if let Ok(mtime) = h.mtime() {
            let t = UNIX_EPOCH + Duration::from_secs(mtime);
            if is_dir {
                self.dir_times.insert(path.to_path_buf(), t);
            }
        }
        Ok(())
    }

    fn set_owner_nofollow(
        &self,
        ctx: &EntryCtx,
        path: &Path,
        entry: &tar::Entry<impl Read>,
    ) -> Result<(), ApplyError> {
        if !self.is_root {
            return Ok(());
        }
        let h = entry.header();
        let uid = h.uid().unwrap_or(0) as u32;
        let gid = h.gid().unwrap_or(0) as u32;
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| ctx.io(e))
    }
}

struct EntryCtx<'a> {
    layer: &'a str,
    path: &'a str,
}

impl EntryCtx<'_> {
    fn refused(&self, reason: &'static str) -> ApplyError {
        ApplyError::Refused {
            layer: self.layer.to_string(),
            path: self.path.to_string(),
            reason,
        }
    }
    fn io(&self, source: io::Error) -> ApplyError {
        ApplyError::Io {
            layer: self.layer.to_string(),
            path: self.path.to_string(),
            source,
        }
    }
    /// The entry name as a clean relative path: no root, no `..`.
    fn relative(&self, raw: &[u8]) -> Result<PathBuf, ApplyError> {
        let p = Path::new(OsStr::from_bytes(raw));
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                Component::RootDir | Component::Prefix(_) => {
                    return Err(self.refused("absolute path"));
                }
                Component::ParentDir => return Err(self.refused("path contains '..'")),
                Component::CurDir => {}
                Component::Normal(n) => out.push(n),
            }
        }
        Ok(out)
    }
}

/// Applies `SCHILY.xattr.*` PAX records (file capabilities, ACLs, …). Best effort:
/// a file system or privilege that refuses one is logged, not fatal.
fn set_xattrs(entry: &mut tar::Entry<impl Read>, path: &Path) {
    let Ok(Some(exts)) = entry.pax_extensions() else {
        return;
    };
    for ext in exts.flatten() {
        let Some(name) = ext.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr.")) else {
            continue;
        };
        if let Err(e) = rustix::fs::lsetxattr(
            path,
            name,
            ext.value_bytes(),
            rustix::fs::XattrFlags::empty(),
        ) {
            tracing::warn!(path = %path.display(), name, error = %e, "could not set xattr");
        }
    }
}

/// Sets atime and mtime of `path` itself (a symlink is not followed). Best effort.
fn lutimes(path: &Path, secs: u64) {
    let ts = rustix::fs::Timespec {
        tv_sec: secs as i64,
        tv_nsec: 0,
    };
    let _ = rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &rustix::fs::Timestamps {
            last_access: ts,
            last_modification: ts,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    );
}

fn mkdir(ctx: &EntryCtx, path: &Path) -> Result<(), ApplyError> {
    fs::DirBuilder::new()
        .mode(0o755)
        .create(path)
        .map_err(|e| ctx.io(e))
}

/// Removes whatever is at `path` (never following a symlink there).
fn remove_any(ctx: &EntryCtx, path: &Path) -> Result<(), ApplyError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(|e| ctx.io(e)),
        Ok(_) => fs::remove_file(path).map_err(|e| ctx.io(e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ctx.io(e)),
    }
}

/// Hides everything lower layers put in `dir`, keeping what this layer created.
fn opaque(ctx: &EntryCtx, dir: &Path, created: &HashSet<PathBuf>) -> Result<(), ApplyError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ctx.io(e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| ctx.io(e))?.path();
        if !created.contains(&path) {
            remove_any(ctx, &path)?;
        } else if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            opaque(ctx, &path, created)?;
        }
    }
    Ok(())
}

/// Total apparent size (bytes, rounded to 4 KiB blocks) and inode count of a tree.
pub fn tree_usage(root: &Path) -> io::Result<(u64, u64)> {
    let mut bytes = 0u64;
    let mut inodes = 1u64;
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let m = entry.metadata()?;
            use std::os::unix::fs::MetadataExt;
            if m.nlink() > 1 && !m.is_dir() && !seen.insert(m.ino()) {
                continue;
            }
            inodes += 1;
            bytes += m.len().div_ceil(4096) * 4096;
            if m.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}
