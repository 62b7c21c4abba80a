//! The image cache under `<data>/images`: blobs, ext4 base images, image configs and
//! the tag index.
//!
//! Layout:
//! - `blobs/sha256/<hex>`: verified blobs (layers, configs), shared by images;
//! - `rootfs/<hex>.ext4` and `rootfs/<hex>.json`: the base image of the image whose
//!   config digest is `sha256:<hex>`, and its [`ImageRecord`];
//! - `staging/`: layer trees being built (removed when done or on the next build);
//! - `index.json`: tag → image digest.
//!
//! The image digest is the digest of the image config blob (the "image ID"): it names
//! the exact layer stack, so the same image pulled or imported shares one ext4 file.
//! The ext4 file is renamed into place only after the record beside it was written,
//! so its presence means the base image is complete. Safe to re-run after a crash:
//! leftovers in `staging/` and `*.tmp` files are removed by the next build or `gc`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::apply::{ApplyError, ApplyLimits, LayerApplier, tree_usage};
use crate::blobs::{BlobError, BlobStore, digest_hex};
use crate::ext4::{self, Ext4Error};

/// The parts of an image config a machine needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub exposed_ports: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// One cached image: its base image and config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Digest of the image config blob (the image ID).
    pub digest: String,
    /// The read-only ext4 base image.
    pub rootfs: PathBuf,
    pub config: ImageConfig,
    /// Size of the ext4 file in bytes.
    pub size_bytes: u64,
    /// Digest of the manifest it came from, when known.
    #[serde(default)]
    pub manifest_digest: Option<String>,
    /// Layer blob digests, bottom first.
    #[serde(default)]
    pub layers: Vec<String>,
    /// Tags pointing at it (filled from the index, not stored in the record).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// A layer to apply: blob digest and, when known, its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDesc {
    pub digest: String,
    pub size: Option<u64>,
}

/// Everything needed to build a base image once its blobs are in the store.
#[derive(Debug, Clone)]
pub struct ImagePlan {
    pub config_digest: String,
    pub layers: Vec<LayerDesc>,
    pub manifest_digest: Option<String>,
}

/// Progress of a pull or import, for bars or JSON events.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    Resolved {
        reference: String,
        manifest_digest: Option<String>,
        digest: String,
        layers: usize,
    },
    LayerStart {
        digest: String,
        size: Option<u64>,
        offset: u64,
    },
    LayerBytes {
        digest: String,
        bytes: u64,
        size: Option<u64>,
    },
    LayerDone {
        digest: String,
        cached: bool,
    },
    Apply {
        digest: String,
        index: usize,
        count: usize,
    },
    Ext4 {
        digest: String,
    },
    Done {
        digest: String,
        cached: bool,
    },
}

/// Receives [`Progress`] events.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// A progress receiver that drops everything.
pub fn no_progress() -> ProgressFn {
    Arc::new(|_| {})
}

/// Errors of the image cache.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Ext4(#[from] Ext4Error),
    #[error("image config {digest}: {reason}")]
    BadConfig { digest: String, reason: String },
    #[error("no image matches {reference:?}")]
    NotFound { reference: String },
    #[error("image cache I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `gc` removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    pub images_removed: Vec<String>,
    pub blobs_removed: usize,
    pub bytes_freed: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TagIndex {
    /// tag → image digest.
    tags: BTreeMap<String, String>,
    /// tag → the manifest (or index) digest the registry served for it, used to
    /// revalidate a cached tag with one HEAD request.
    #[serde(default)]
    resolved: BTreeMap<String, String>,
}

/// The image cache of one data directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    blobs: BlobStore,
    limits: ApplyLimits,
}

impl ImageStore {
    /// Opens (creating) the cache in `dir` (normally `DataDir::images_dir()`).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        for sub in ["rootfs", "staging"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let blobs = BlobStore::open(dir.join("blobs"))?;
        Ok(Self {
            dir,
            blobs,
            limits: ApplyLimits::default(),
        })
    }

    /// Replaces the unpack limits (decompression-bomb protection).
    pub fn with_limits(mut self, limits: ApplyLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    fn rootfs_paths(&self, digest: &str) -> Result<(PathBuf, PathBuf), StoreError> {
        let hex = digest_hex(digest)?;
        let base = self.dir.join("rootfs");
        Ok((
            base.join(format!("{hex}.ext4")),
            base.join(format!("{hex}.json")),
        ))
    }

    /// The cached base image of `digest`, if it is complete.
    pub fn cached(&self, digest: &str) -> Option<ImageRecord> {
        let (ext4, json) = self.rootfs_paths(digest).ok()?;
        if !ext4.is_file() {
            return None;
        }
        let record: ImageRecord = serde_json::from_slice(&fs::read(json).ok()?).ok()?;
        Some(record)
    }

    /// Takes the per-image build lock (blocking while another process builds it).
    fn build_lock(&self, digest: &str) -> Result<File, StoreError> {
        let hex = digest_hex(digest)?;
        let path = self.dir.join("rootfs").join(format!("{hex}.lock"));
        let f = File::create(&path).map_err(io_err(&path))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
            StoreError::Io {
                path: path.clone(),
                source: e.into(),
            }
        })?;
        Ok(f)
    }

    /// Takes the cache-wide lock: shared for pulls/imports, exclusive for `gc`.
    pub fn cache_lock(&self, exclusive: bool) -> Result<File, StoreError> {
        let path = self.dir.join("gc.lock");
        let f = File::create(&path).map_err(io_err(&path))?;
        let op = if exclusive {
            rustix::fs::FlockOperation::LockExclusive
        } else {
            rustix::fs::FlockOperation::LockShared
        };
        rustix::fs::flock(&f, op).map_err(|e| StoreError::Io {
            path: path.clone(),
            source: e.into(),
        })?;
        Ok(f)
    }

    /// Starts building the base image of `plan`, or returns the cached one.
    pub fn begin(&self, plan: &ImagePlan) -> Result<Begin, StoreError> {
        if let Some(rec) = self.cached(&plan.config_digest) {
            return Ok(Begin::Cached(rec));
        }
        let lock = self.build_lock(&plan.config_digest)?;
        if let Some(rec) = self.cached(&plan.config_digest) {
            return Ok(Begin::Cached(rec));
        }
        let raw = self.blobs.read(&plan.config_digest)?;
        let parsed = parse_config(&plan.config_digest, &raw)?;
        if !parsed.diff_ids.is_empty() && parsed.diff_ids.len() != plan.layers.len() {
            return Err(StoreError::BadConfig {
                digest: plan.config_digest.clone(),
                reason: format!(
                    "{} layers in the manifest but {} diff_ids in the config",
                    plan.layers.len(),
                    parsed.diff_ids.len()
                ),
            });
        }
        let hex = digest_hex(&plan.config_digest)?;
        let staging = self.dir.join("staging").join(hex);
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
        }
        fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        Ok(Begin::Build(Box::new(RootfsBuild {
            store: self.clone(),
            plan: plan.clone(),
            config: parsed.config,
            diff_ids: parsed.diff_ids,
            applier: LayerApplier::new(&staging, self.limits),
            staging,
            next: 0,
            _lock: lock,
        })))
    }

    /// Builds the base image of `plan` from blobs already in the store.
    pub fn build(
        &self,
        plan: &ImagePlan,
        progress: &ProgressFn,
    ) -> Result<ImageRecord, StoreError> {
        match self.begin(plan)? {
            Begin::Cached(rec) => Ok(rec),
            Begin::Build(mut b) => {
                for _ in 0..plan.layers.len() {
                    b.apply_next(progress)?;
                }
                b.finish(progress)
            }
        }
    }

    fn read_index(&self) -> Result<TagIndex, StoreError> {
        let path = self.dir.join("index.json");
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Io {
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(TagIndex::default()),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    fn update_index<T>(&self, f: impl FnOnce(&mut TagIndex) -> T) -> Result<T, StoreError> {
        let lock_path = self.dir.join("index.lock");
        let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
            StoreError::Io {
                path: lock_path.clone(),
                source: e.into(),
            }
        })?;
        let mut index = self.read_index()?;
        let out = f(&mut index);
        let path = self.dir.join("index.json");
        let tmp = self.dir.join("index.json.tmp");
        let bytes = serde_json::to_vec_pretty(&index).unwrap_or_default();
        fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        drop(lock);
        Ok(out)
    }

    /// Points `tag` (a normalised reference) at `digest`; `resolved` is the
    /// manifest digest a registry served for the tag, when it came from one.
    pub fn tag(&self, tag: &str, digest: &str, resolved: Option<&str>) -> Result<(), StoreError> {
        let index = self.read_index()?;
        if index.tags.get(tag).map(String::as_str) == Some(digest)
            && index.resolved.get(tag).map(String::as_str) == resolved
        {
            return Ok(());
        }
        self.update_index(|i| {
            i.tags.insert(tag.to_string(), digest.to_string());
            match resolved {
                Some(r) => i.resolved.insert(tag.to_string(), r.to_string()),
                None => i.resolved.remove(tag),
            };
        })
    }

    /// The image digest a tag points at, and the manifest digest it was resolved
    /// from (when pulled).
    pub fn tag_target(&self, tag: &str) -> Result<Option<(String, Option<String>)>, StoreError> {
        let index = self.read_index()?;
        Ok(index
            .tags
            .get(tag)
            .map(|d| (d.clone(), index.resolved.get(tag).cloned())))
    }

    /// Every complete cached image, with its tags.
    pub fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let index = self.read_index()?;
        let dir = self.dir.join("rootfs");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let name = entry.map_err(io_err(&dir))?.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if let Some(mut rec) = self.cached(&format!("sha256:{hex}")) {
                rec.tags = index
                    .tags
                    .iter()
                    .filter(|(_, d)| **d == rec.digest)
                    .map(|(t, _)| t.clone())
                    .collect();
                out.push(rec);
            }
        }
        out.sort_by(|a, b| a.tags.cmp(&b.tags).then(a.digest.cmp(&b.digest)));
        Ok(out)
    }

    /// Finds an image by tag (normalised reference), full digest, manifest digest
    /// or unique digest prefix (at least 4 hex digits).
    pub fn lookup(
        &self,
        what: &str,
        normalised_tag: Option<&str>,
    ) -> Result<ImageRecord, StoreError> {
        let all = self.list()?;
        let what_hex = what.strip_prefix("sha256:").unwrap_or(what);
        let found: Vec<&ImageRecord> = all
            .iter()
            .filter(|r| {
                r.tags
                    .iter()
                    .any(|t| Some(t.as_str()) == normalised_tag || t == what)
                    || r.digest == what
                    || r.manifest_digest.as_deref() == Some(what)
            })
            .collect();
        let found = if found.is_empty()
            && what_hex.len() >= 4
            && what_hex.bytes().all(|b| b.is_ascii_hexdigit())
        {
            all.iter()
                .filter(|r| r.digest["sha256:".len()..].starts_with(what_hex))
                .collect()
        } else {
            found
        };
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            _ => Err(StoreError::NotFound {
                reference: what.to_string(),
            }),
        }
    }

    /// Removes the tag `what` (or, for a digest, every tag of that image). The
    /// base image and blobs stay until [`ImageStore::gc`]. Returns removed tags.
    pub fn remove(
        &self,
        what: &str,
        normalised_tag: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        let rec = self.lookup(what, normalised_tag)?;
        let by_tag = rec
            .tags
            .iter()
            .find(|t| Some(t.as_str()) == normalised_tag || *t == what)
            .cloned();
        self.update_index(|i| {
            let mut removed = Vec::new();
            match &by_tag {
                Some(t) => {
                    i.tags.remove(t);
                    removed.push(t.clone());
                }
                None => i.tags.retain(|t, d| {
                    let keep = *d != rec.digest;
                    if !keep {
                        removed.push(t.clone());
                    }
                    keep
                }),
            }
            for t in &removed {
                i.resolved.remove(t);
            }
            removed
        })
    }

    /// Removes every image neither tagged nor in `in_use` (digests of images that
    /// machines use), then every blob no remaining image references, and leftovers
    /// of interrupted builds.
    pub fn gc(&self, in_use: &HashSet<String>) -> Result<GcReport, StoreError> {
        let _lock = self.cache_lock(true)?;
        let index = self.read_index()?;
        let tagged: HashSet<&String> = index.tags.values().collect();
        let mut report = GcReport::default();
        let mut keep_blobs = BTreeSet::new();
        let dir = self.dir.join("rootfs");
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.contains(".tmp") {
                report.bytes_freed += entry.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&path).map_err(io_err(&path))?;
                continue;
            }
            let Some(hex) = name.strip_suffix(".json") else {
                continue;
            };
            let digest = format!("sha256:{hex}");
            let record = self.cached(&digest);
            if tagged.contains(&digest) || in_use.contains(&digest) {
                if let Some(r) = record {
                    keep_blobs.insert(r.digest.clone());
                    keep_blobs.extend(r.layers);
                }
                continue;
            }
            let (ext4, json) = self.rootfs_paths(&digest)?;
            report.bytes_freed += fs::metadata(&ext4).map(|m| m.len()).unwrap_or(0);
            for p in [&ext4, &json] {
                match fs::remove_file(p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(StoreError::Io {
                            path: p.clone(),
                            source: e,
                        });
                    }
                }
            }
            let _ = fs::remove_file(dir.join(format!("{hex}.lock")));
            report.images_removed.push(digest);
        }
        for digest in self.blobs.list()? {
            if !keep_blobs.contains(&digest) {
                let path = self.blobs.path(&digest)?;
                report.bytes_freed += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                self.blobs.remove(&digest)?;
                report.blobs_removed += 1;
            }
        }
        self.blobs.clean_tmp()?;
        let staging = self.dir.join("staging");
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
            fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        }
        Ok(report)
    }
}

/// Result of [`ImageStore::begin`].
#[allow(clippy::large_enum_variant)]
pub enum Begin {
    Cached(ImageRecord),
    Build(Box<RootfsBuild>),
}

/// A base image being built: layers are applied in order, then `finish` makes the
/// ext4 file. Dropping it removes the staging tree.
pub struct RootfsBuild {
    store: ImageStore,
    plan: ImagePlan,
    config: ImageConfig,
    diff_ids: Vec<String>,
    applier: LayerApplier,
    staging: PathBuf,
    next: usize,
    _lock: File,
}

impl RootfsBuild {
    /// Index of the next layer to apply.
    pub fn next_layer(&self) -> usize {
        self.next
    }

    /// Applies the next layer; its blob must be in the store.
    pub fn apply_next(&mut self, progress: &ProgressFn) -> Result<(), StoreError> {
        let layer = &self.plan.layers[self.next];
        progress(&Progress::Apply {
            digest: layer.digest.clone(),
            index: self.next,
            count: self.plan.layers.len(),
        });
        let blob = self.store.blobs.open_blob(&layer.digest)?;
        let diff_id = self.diff_ids.get(self.next).map(String::as_str);
        self.applier.apply(&layer.digest, blob, diff_id)?;
        self.next += 1;
        Ok(())
    }

    /// Makes the ext4 file and the record beside it.
    pub fn finish(mut self, progress: &ProgressFn) -> Result<ImageRecord, StoreError> {
        self.applier.finish()?;
        let digest = self.plan.config_digest.clone();
        progress(&Progress::Ext4 {
            digest: digest.clone(),
        });
        let (bytes, inodes) = tree_usage(&self.staging).map_err(io_err(&self.staging))?;
        let (ext4_path, json_path) = self.store.rootfs_paths(&digest)?;
        let tmp = ext4_path.with_extension(format!("ext4.tmp{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let size_bytes = ext4::build(&self.staging, &tmp, bytes, inodes)?;
        let record = ImageRecord {
            digest: digest.clone(),
            rootfs: ext4_path.clone(),
            config: std::mem::take(&mut self.config),
            size_bytes,
            manifest_digest: self.plan.manifest_digest.clone(),
            layers: self.plan.layers.iter().map(|l| l.digest.clone()).collect(),
            tags: Vec::new(),
        };
        let json_tmp = json_path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&record).unwrap_or_default();
        let res = fs::write(&json_tmp, body)
            .and_then(|()| fs::rename(&json_tmp, &json_path))
            .and_then(|()| fs::rename(&tmp, &ext4_path));
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::Io {
                path: ext4_path,
                source: e,
            });
        }
        Ok(record)
    }
}

impl Drop for RootfsBuild {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.staging);
    }
}

struct ParsedConfig {
    config: ImageConfig,
    diff_ids: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawImage {
    config: Option<RawConfig>,
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRootfs {
    diff_ids: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct RawConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    labels: Option<BTreeMap<String, String>>,
}

fn parse_config(digest: &str, raw: &[u8]) -> Result<ParsedConfig, StoreError> {
    let img: RawImage = serde_json::from_slice(raw).map_err(|e| StoreError::BadConfig {
        digest: digest.to_string(),
        reason: e.to_string(),
    })?;
    let c = img.config.unwrap_or_default();
    Ok(ParsedConfig {
        config: ImageConfig {
            entrypoint: c.entrypoint,
            cmd: c.cmd,
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.filter(|w| !w.is_empty()),
            user: c.user.filter(|u| !u.is_empty()),
            exposed_ports: c.exposed_ports.unwrap_or_default().into_keys().collect(),
            labels: c.labels.unwrap_or_default(),
        },
        diff_ids: img.rootfs.map(|r| r.diff_ids).unwrap_or_default(),
    })
}
