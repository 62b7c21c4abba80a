//! Imports of `docker save` tarballs and OCI image layouts (a directory or a tar of
//! one). The archive is read once: files referenced as blobs go straight into the
//! verified blob store, small metadata files are kept in memory.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::blobs::{BlobError, digest_hex};
use crate::store::{
    ImagePlan, ImageRecord, ImageStore, LayerDesc, Progress, ProgressFn, StoreError,
};

/// Metadata files larger than this are treated as blobs, not parsed.
const SMALL: u64 = 4 << 20;

/// An archive could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: neither a docker save archive (manifest.json) nor an OCI image layout (index.json)"
    )]
    UnknownFormat { path: PathBuf },
    #[error("{path}: missing {name}")]
    Missing { path: PathBuf, name: String },
    #[error("{path}: invalid {name}: {reason}")]
    BadJson {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    NoImage { path: PathBuf, reason: String },
    #[error("{path}: unsafe file name {name:?} in the archive metadata")]
    UnsafeName { path: PathBuf, name: String },
    /// The blob error is part of the message (it names the digest).
    #[error("{path}: {error}")]
    Blob { path: PathBuf, error: BlobError },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An imported image and the tags the archive named.
#[derive(Debug, Clone)]
pub struct Imported {
    pub record: ImageRecord,
    /// References named inside the archive (normalised), maybe none.
    pub tags: Vec<String>,
}

enum Source {
    Dir(PathBuf),
    Tar {
        small: HashMap<String, Vec<u8>>,
        big: HashMap<String, (String, u64)>,
    },
}

struct Archive<'a> {
    path: PathBuf,
    store: &'a ImageStore,
    source: Source,
}

fn clean_name(name: &str) -> Option<String> {
    let mut out = Vec::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(n) => out.push(n.to_str()?.to_string()),
            Component::CurDir => {}
            _ => return None,
        }
    }
    if out.is_empty() {
        return None;
    }
    Some(out.join("/"))
}

/// The digest a blob file name announces (`blobs/sha256/<hex>` or `<hex>.json`).
fn named_digest(name: &str) -> Option<String> {
    let hex = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".json"))?;
    let d = format!("sha256:{hex}");
    digest_hex(&d).ok()?;
    Some(d)
}

impl<'a> Archive<'a> {
    fn open(store: &'a ImageStore, path: &Path) -> Result<Self, ImportError> {
        let io_err = |source| ImportError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::metadata(path).map_err(io_err)?;
        if meta.is_dir() {
            return Ok(Self {
                path: path.to_path_buf(),
                store,
                source: Source::Dir(path.to_path_buf()),
            });
        }
        let file = File::open(path).map_err(io_err)?;
        let mut tar = tar::Archive::new(BufReader::with_capacity(1 << 16, file));
        let mut small = HashMap::new();
        let mut big = HashMap::new();
        for entry in tar.entries().map_err(io_err)? {
            let mut entry = entry.map_err(io_err)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let Some(name) = clean_name(&raw) else {
                continue;
            };
            let size = entry.header().size().map_err(io_err)?;
            if size <= SMALL {
                let mut buf = Vec::with_capacity(size as usize);
                entry.read_to_end(&mut buf).map_err(io_err)?;
                small.insert(name, buf);
            } else {
                let expected = named_digest(&name);
                let got = store
                    .blobs()
                    .ingest(&mut entry, expected.as_deref().map(|d| (d, Some(size))))
                    .map_err(|source| ImportError::Blob {
                        path: path.to_path_buf(),
                        error: source,
                    })?;
                big.insert(name, got);
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            store,
            source: Source::Tar { small, big },
        })
    }

    fn exists(&self, name: &str) -> bool {
        match &self.source {
            Source::Dir(d) => d.join(name).is_file(),
            Source::Tar { small, big } => small.contains_key(name) || big.contains_key(name),
        }
    }

    fn read_small(&self, name: &str) -> Result<Vec<u8>, ImportError> {
        let missing = || ImportError::Missing {
            path: self.path.clone(),
            name: name.to_string(),
        };
        match &self.source {
            Source::Dir(d) => {
                let p = d.join(name);
                match fs::read(&p) {
                    Ok(b) => Ok(b),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Err(missing()),
                    Err(source) => Err(ImportError::Io { path: p, source }),
                }
            }
            Source::Tar { small, .. } => small.get(name).cloned().ok_or_else(missing),
        }
    }

    fn json<T: for<'de> Deserialize<'de>>(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> Result<T, ImportError> {
        serde_json::from_slice(bytes).map_err(|e| ImportError::BadJson {
            path: self.path.clone(),
            name: name.to_string(),
            reason: e.to_string(),
        })
    }

    /// Puts the file `name` into the blob store (checked against `expected`).
    fn blob(
        &self,
        name: &str,
        expected: Option<(&str, Option<u64>)>,
    ) -> Result<(String, u64), ImportError> {
        let name = clean_name(name).ok_or_else(|| ImportError::UnsafeName {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        let blob_err = |source| ImportError::Blob {
            path: self.path.clone(),
            error: source,
        };
        let expected = expected
            .map(|(d, s)| (d.to_string(), s))
            .or_else(|| named_digest(&name).map(|d| (d, None)));
        let expected_ref = expected.as_ref().map(|(d, s)| (d.as_str(), *s));
        if let Some((d, s)) = expected_ref
            && self.store.blobs().has(d, s)
            && !matches!(self.source, Source::Tar { .. })
        {
            return Ok((d.to_string(), s.unwrap_or(0)));
        }
        match &self.source {
            Source::Dir(dir) => {
                let p = dir.join(&name);
                let f = File::open(&p).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => ImportError::Missing {
                        path: self.path.clone(),
                        name: name.clone(),
                    },
                    _ => ImportError::Io {
                        path: p.clone(),
                        source: e,
                    },
                })?;
                self.store.blobs().ingest(f, expected_ref).map_err(blob_err)
            }
            Source::Tar { small, big } => {
                if let Some(bytes) = small.get(&name) {
                    return self
                        .store
                        .blobs()
                        .ingest(&bytes[..], expected_ref)
                        .map_err(blob_err);
                }
                let (digest, size) = big.get(&name).ok_or_else(|| ImportError::Missing {
                    path: self.path.clone(),
                    name: name.clone(),
                })?;
                if let Some((d, s)) = expected_ref {
                    if d != digest {
                        return Err(blob_err(BlobError::DigestMismatch {
                            expected: d.to_string(),
                            actual: digest.clone(),
                        }));
                    }
                    if let Some(s) = s
                        && s != *size
                    {
                        return Err(blob_err(BlobError::SizeMismatch {
                            digest: d.to_string(),
                            expected: s,
                            actual: *size,
                        }));
                    }
                }
                Ok((digest.clone(), *size))
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Deserialize, Clone)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct OciIndex {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct OciManifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

fn is_index(media_type: &str) -> bool {
    media_type == "application/vnd.oci.image.index.v1+json"
        || media_type == "application/vnd.docker.distribution.manifest.list.v2+json"
}

/// Picks the linux/amd64 entry (or the only one) of an index.
fn pick(manifests: &[Descriptor]) -> Option<&Descriptor> {
    let usable: Vec<&Descriptor> = manifests
        .iter()
        .filter(|d| d.platform.as_ref().is_none_or(|p| p.os != "unknown"))
        .collect();
    usable
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .or_else(|| usable.iter().find(|d| d.platform.is_none()))
        .copied()
}

/// Normalises a reference the way pulls record tags (`docker.io/library/x:latest`).
pub fn normalise_reference(r: &str) -> Option<String> {
    r.parse::<oci_client::Reference>().ok().map(|r| r.whole())
}

/// Imports an archive or layout directory at `path` and builds its base image.
pub fn import(
    store: &ImageStore,
    path: &Path,
    progress: &ProgressFn,
) -> Result<Imported, ImportError> {
    let _lock = store.cache_lock(false)?;
    let archive = Archive::open(store, path)?;
    let (plan, tags) = if archive.exists("manifest.json") {
        let bytes = archive.read_small("manifest.json")?;
        let entries: Vec<DockerManifestEntry> = archive.json("manifest.json", &bytes)?;
        let entry = entries
            .into_iter()
            .next()
            .ok_or_else(|| ImportError::NoImage {
                path: path.to_path_buf(),
                reason: "manifest.json lists no image".into(),
            })?;
        let (config_digest, _) = archive.blob(&entry.config, None)?;
        let mut layers = Vec::new();
        for l in &entry.layers {
            let (digest, size) = archive.blob(l, None)?;
            layers.push(LayerDesc {
                digest,
                size: Some(size),
            });
        }
        let tags = entry
            .repo_tags
            .unwrap_or_default()
            .iter()
            .filter_map(|t| normalise_reference(t))
            .collect();
        (
            ImagePlan {
                config_digest,
                layers,
                manifest_digest: None,
            },
            tags,
        )
    } else if archive.exists("index.json") {
        let bytes = archive.read_small("index.json")?;
        let mut index: OciIndex = archive.json("index.json", &bytes)?;
        let mut tags = Vec::new();
        let mut depth = 0;
        let manifest_desc = loop {
            let desc = pick(&index.manifests)
                .cloned()
                .ok_or_else(|| ImportError::NoImage {
                    path: path.to_path_buf(),
                    reason: "the index has no linux/amd64 image".into(),
                })?;
            for key in [
                "io.containerd.image.name",
                "org.opencontainers.image.ref.name",
            ] {
                if let Some(t) = desc.annotations.get(key).and_then(|t| {
                    (t.contains(':') || t.contains('/'))
                        .then(|| normalise_reference(t))
                        .flatten()
                }) && !tags.contains(&t)
                {
                    tags.push(t);
                }
            }
            let (digest, _) = archive.blob(
                &blob_name(&desc.digest)?,
                Some((&desc.digest, Some(desc.size))),
            )?;
            let raw = store
                .blobs()
                .read(&digest)
                .map_err(|source| ImportError::Blob {
                    path: path.to_path_buf(),
                    error: source,
                })?;
            let nested = is_index(&desc.media_type)
                || serde_json::from_slice::<serde_json::Value>(&raw)
                    .ok()
                    .is_some_and(|v| v.get("manifests").is_some());
            if !nested {
                break desc;
            }
            depth += 1;
            if depth > 4 {
                return Err(ImportError::NoImage {
                    path: path.to_path_buf(),
                    reason: "indexes nested too deep".into(),
                });
            }
            index = archive.json(&desc.digest, &raw)?;
        };
        let raw = store
            .blobs()
            .read(&manifest_desc.digest)
            .map_err(|source| ImportError::Blob {
                path: path.to_path_buf(),
                error: source,
            })?;
        let manifest: OciManifest = archive.json(&manifest_desc.digest, &raw)?;
        let (config_digest, _) = archive.blob(
            &blob_name(&manifest.config.digest)?,
            Some((&manifest.config.digest, Some(manifest.config.size))),
        )?;
        let mut layers = Vec::new();
        for l in &manifest.layers {
            let (digest, size) =
                archive.blob(&blob_name(&l.digest)?, Some((&l.digest, Some(l.size))))?;
            layers.push(LayerDesc {
                digest,
                size: Some(size),
            });
        }
        (
            ImagePlan {
                config_digest,
                layers,
                manifest_digest: Some(manifest_desc.digest.clone()),
            },
            tags,
        )
    } else {
        return Err(ImportError::UnknownFormat {
            path: path.to_path_buf(),
        });
    };
    progress(&Progress::Resolved {
        reference: path.display().to_string(),
        manifest_digest: plan.manifest_digest.clone(),
        digest: plan.config_digest.clone(),
        layers: plan.layers.len(),
    });
    let record = store.build(&plan, progress)?;
    for t in &tags {
        store.tag(t, &record.digest, None)?;
    }
    progress(&Progress::Done {
        digest: record.digest.clone(),
        cached: false,
    });
    Ok(Imported { record, tags })
}

fn blob_name(digest: &str) -> Result<String, ImportError> {
    let hex = digest_hex(digest).map_err(|source| ImportError::Blob {
        path: PathBuf::new(),
        error: source,
    })?;
    Ok(format!("blobs/sha256/{hex}"))
}
