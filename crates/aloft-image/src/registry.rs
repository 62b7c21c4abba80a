//! Pulls from Distribution v2 registries with `oci-client`: anonymous, bearer-token
//! (from `WWW-Authenticate`) and basic auth; an index resolves to linux/amd64; layers
//! download concurrently into the verified blob store and resume where an earlier
//! pull stopped; layers are applied in order while later ones still download.
//!
//! Plain HTTP is used only for loopback registries (127.0.0.0/8, ::1, localhost) and
//! registries the caller lists as insecure.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol, linux_amd64_resolver};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::blobs::BlobError;
use crate::store::{
    Begin, ImagePlan, ImageRecord, ImageStore, LayerDesc, Progress, ProgressFn, StoreError,
};

/// Credentials for a pull.
#[derive(Debug, Clone, Default)]
pub enum Credentials {
    /// Look in `~/.docker/config.json` (or the given file); anonymous if absent.
    #[default]
    DockerConfig,
    /// Anonymous (a bearer token is still fetched when the registry asks).
    Anonymous,
    /// HTTP basic credentials (also used to obtain bearer tokens).
    Basic { username: String, password: String },
}

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub credentials: Credentials,
    /// Docker config file (default `$DOCKER_CONFIG/config.json`, then `~/.docker/config.json`).
    pub docker_config: Option<PathBuf>,
    /// Registries (host[:port]) reached over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Layers downloaded at the same time.
    pub concurrency: usize,
    pub connect_timeout: Duration,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            credentials: Credentials::default(),
            docker_config: None,
            insecure_registries: Vec::new(),
            concurrency: 4,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A pull failed. Each variant names the reference, registry or digest involved.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    #[error(
        "registry {registry} refused access to {reference} (401 unauthorized): check --username/--password-stdin or ~/.docker/config.json"
    )]
    Unauthorized { reference: String, registry: String },
    #[error("image {reference} not found in registry {registry}")]
    NotFound { reference: String, registry: String },
    #[error("cannot reach registry {registry}: {reason}")]
    Unreachable { registry: String, reason: String },
    #[error("registry {registry} failed for {reference}")]
    Registry {
        reference: String,
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("downloading blob {digest}: {reason}")]
    Download { digest: String, reason: String },
    #[error("storing blob {digest}")]
    Blob {
        digest: String,
        #[source]
        source: BlobError,
    },
    #[error("docker config {path}: {reason}")]
    DockerConfig { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot set up an HTTP client for {registry}: {reason}")]
    Client { registry: String, reason: String },
    #[error("internal task failure: {0}")]
    Task(String),
}

/// The result of a pull.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub record: ImageRecord,
    /// The normalised reference, recorded as a tag.
    pub reference: String,
    /// Whether the base image was already built.
    pub cached: bool,
}

/// Is `registry` (host[:port]) a loopback address?
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                registry
            }
        })
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[derive(Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: std::collections::HashMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

fn docker_config_path(opts: &PullOptions) -> Option<PathBuf> {
    if let Some(p) = &opts.docker_config {
        return Some(p.clone());
    }
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Basic credentials for `registry` from a docker config file, if any.
fn docker_config_auth(opts: &PullOptions, registry: &str) -> Result<RegistryAuth, PullError> {
    let Some(path) = docker_config_path(opts) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => {
            return Err(PullError::DockerConfig {
                path,
                reason: e.to_string(),
            });
        }
    };
    let cfg: DockerConfigFile =
        serde_json::from_slice(&bytes).map_err(|e| PullError::DockerConfig {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let keys: Vec<String> = if registry == "index.docker.io" || registry == "docker.io" {
        vec![
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
            "docker.io".into(),
        ]
    } else {
        vec![
            registry.to_string(),
            format!("https://{registry}"),
            format!("http://{registry}"),
            format!("https://{registry}/v2/"),
        ]
    };
    for k in keys {
        let Some(a) = cfg.auths.get(&k) else { continue };
        if let (Some(u), Some(p)) = (&a.username, &a.password) {
            return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
        }
        if let Some(auth) = &a.auth {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| PullError::DockerConfig {
                    path: path.clone(),
                    reason: format!("auths.{k}.auth is not base64: {e}"),
                })?;
            let text = String::from_utf8_lossy(&decoded).into_owned();
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| PullError::DockerConfig {
                    path: path.clone(),
                    reason: format!("auths.{k}.auth is not user:password"),
                })?;
            return Ok(RegistryAuth::Basic(u.to_string(), p.to_string()));
        }
    }
    Ok(RegistryAuth::Anonymous)
}

fn classify(err: OciDistributionError, reference: &Reference) -> PullError {
    let registry = reference.registry().to_string();
    let whole = reference.whole();
    match err {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => PullError::Unauthorized {
            reference: whole,
            registry,
        },
        OciDistributionError::ImageManifestNotFoundError(_) => PullError::NotFound {
            reference: whole,
            registry,
        },
        OciDistributionError::RegistryError { ref envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown
                )
            }) =>
        {
            PullError::NotFound {
                reference: whole,
                registry,
            }
        }
        OciDistributionError::RegistryError { ref envelope, .. }
            if envelope
                .errors
                .iter()
                .any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)) =>
        {
            PullError::Unauthorized {
                reference: whole,
                registry,
            }
        }
        OciDistributionError::ServerError { code: 404, .. } => PullError::NotFound {
            reference: whole,
            registry,
        },
        OciDistributionError::RequestError(ref e) if e.is_connect() || e.is_timeout() => {
            let mut reason = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(s) = src {
                reason = format!("{reason}: {s}");
                src = s.source();
            }
            PullError::Unreachable { registry, reason }
        }
        source => PullError::Registry {
            reference: whole,
            registry,
            source,
        },
    }
}

/// Pulls `reference` into `store` and builds (or finds) its base image.
pub async fn pull(
    store: &ImageStore,
    reference: &str,
    opts: &PullOptions,
    progress: ProgressFn,
) -> Result<Pulled, PullError> {
    // Fast path for a cached tag on a plain-HTTP registry, before anything costly
    // (parsing with the full reference grammar compiles a large regex; building the
    // registry client loads the system root store).
    if let Some(q) = QuickRef::parse(reference)
        && (is_loopback_registry(&q.registry) || opts.insecure_registries.contains(&q.registry))
        && let Some(rec) = revalidate(store, &q).await
    {
        progress(&Progress::Done {
            digest: rec.digest.clone(),
            cached: true,
        });
        return Ok(Pulled {
            record: rec,
            reference: q.whole(),
            cached: true,
        });
    }
    let r: Reference =
        reference
            .parse()
            .map_err(|e: oci_client::ParseError| PullError::BadReference {
                reference: reference.to_string(),
                reason: e.to_string(),
            })?;
    let registry = r.resolve_registry().to_string();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut insecure = opts.insecure_registries.clone();
    if is_loopback_registry(&registry) {
        insecure.push(registry.clone());
    }
    // A plain-HTTP registry only needs roots for a token server elsewhere: the
    // compiled-in Mozilla roots spare loading the system store (~40 ms of CPU), which
    // keeps a cached pull from a local registry fast.
    let plain_http = insecure.iter().any(|r| r == &registry);
    let tls_certs_only = if plain_http {
        webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .map(|c| oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Der,
                data: c.to_vec(),
            })
            .collect()
    } else {
        Vec::new()
    };
    let client = Client::try_from(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(insecure),
        tls_certs_only,
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        connect_timeout: Some(opts.connect_timeout),
        read_timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    })
    .map_err(|e| PullError::Client {
        registry: registry.clone(),
        reason: e.to_string(),
    })?;
    let auth = match &opts.credentials {
        Credentials::Anonymous => RegistryAuth::Anonymous,
        Credentials::Basic { username, password } => {
            RegistryAuth::Basic(username.clone(), password.clone())
        }
        Credentials::DockerConfig => docker_config_auth(opts, &registry)?,
    };

    let (manifest, manifest_digest, list_digest) = client
        .pull_image_manifest_and_list_digest(&r, &auth)
        .await
        .map_err(|e| classify(e, &r))?;
    let config_digest = manifest.config.digest.clone();
    let plan = ImagePlan {
        config_digest: config_digest.clone(),
        layers: manifest
            .layers
            .iter()
            .map(|l| LayerDesc {
                digest: l.digest.clone(),
                size: u64::try_from(l.size).ok(),
            })
            .collect(),
        manifest_digest: Some(manifest_digest.clone()),
    };
    progress(&Progress::Resolved {
        reference: r.whole(),
        manifest_digest: Some(manifest_digest.clone()),
        digest: config_digest.clone(),
        layers: plan.layers.len(),
    });
    let tag = r.whole();
    let resolved = list_digest.unwrap_or_else(|| manifest_digest.clone());
    let done = |record: ImageRecord, cached: bool| -> Result<Pulled, PullError> {
        store.tag(&tag, &record.digest, Some(&resolved))?;
        progress(&Progress::Done {
            digest: record.digest.clone(),
            cached,
        });
        Ok(Pulled {
            record,
            reference: tag.clone(),
            cached,
        })
    };
    if let Some(rec) = store.cached(&config_digest) {
        return done(rec, true);
    }

    let _lock = store.cache_lock(false)?;
    let client = Arc::new(client);
    let cfg_size = u64::try_from(manifest.config.size).ok();
    if !store.blobs().has(&config_digest, cfg_size) {
        download(&client, &r, store, &manifest.config, &progress).await?;
    }
    let store2 = store.clone();
    let plan2 = plan.clone();
    let begun = tokio::task::spawn_blocking(move || store2.begin(&plan2))
        .await
        .map_err(|e| PullError::Task(e.to_string()))??;
    let mut build = match begun {
        Begin::Cached(rec) => return done(rec, true),
        Begin::Build(b) => b,
    };

    let sem = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let mut handles = Vec::new();
    for layer in &manifest.layers {
        let (client, r, store, layer, progress, sem) = (
            client.clone(),
            r.clone(),
            store.clone(),
            layer.clone(),
            progress.clone(),
            sem.clone(),
        );
        handles.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            download(&client, &r, &store, &layer, &progress).await
        }));
    }
    let abort_all = |handles: &[tokio::task::JoinHandle<Result<(), PullError>>]| {
        for h in handles {
            h.abort();
        }
    };
    for i in 0..handles.len() {
        let res = (&mut handles[i])
            .await
            .map_err(|e| PullError::Task(e.to_string()));
        if let Err(e) | Ok(Err(e)) = res {
            abort_all(&handles);
            return Err(e);
        }
        let p = progress.clone();
        let (b, res) = tokio::task::spawn_blocking(move || {
            let res = build.apply_next(&p);
            (build, res)
        })
        .await
        .map_err(|e| PullError::Task(e.to_string()))?;
        build = b;
        if let Err(e) = res {
            abort_all(&handles);
            return Err(e.into());
        }
    }
    let p = progress.clone();
    let record = tokio::task::spawn_blocking(move || build.finish(&p))
        .await
        .map_err(|e| PullError::Task(e.to_string()))??;
    done(record, false)
}

/// A reference split by hand the way Docker normalises names, for the cache fast
/// path only: anything unusual gives `None` and the full parser takes over.
#[derive(Debug, PartialEq, Eq)]
struct QuickRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl QuickRef {
    fn parse(s: &str) -> Option<Self> {
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => {
                crate::blobs::digest_hex(d).ok()?;
                (n, Some(d.to_string()))
            }
            None => (s, None),
        };
        let (name, tag) = match name_tag.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_string())),
            _ => (name_tag, None),
        };
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t,
        };
        if let Some(t) = &tag
            && (t.is_empty()
                || t.len() > 128
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)))
        {
            return None;
        }
        let (mut registry, mut repository) = match name.split_once('/') {
            Some((l, r)) if l.contains('.') || l.contains(':') || l == "localhost" => {
                (l.to_string(), r.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        if registry == "index.docker.io" {
            registry = "docker.io".into();
        }
        if registry == "docker.io" && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        let repo_ok = !repository.is_empty()
            && repository
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' | b'/'));
        let reg_ok = registry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".:-[]".contains(&b));
        (repo_ok && reg_ok).then_some(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The same string as `oci_client::Reference::whole()`.
    fn whole(&self) -> String {
        let mut s = format!("{}/{}", self.registry, self.repository);
        if let Some(t) = &self.tag {
            s = format!("{s}:{t}");
        }
        if let Some(d) = &self.digest {
            s = format!("{s}@{d}");
        }
        s
    }
}

/// Accept header for manifest requests: indexes and image manifests, OCI and Docker.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The cached image of a tag pulled earlier from a plain-HTTP registry, if the
/// registry still serves the same manifest for it: one anonymous HEAD request, no
/// TLS set-up (building the registry client loads the system root store, tens of
/// milliseconds). Any doubt (no record, auth needed, other digest) returns `None`
/// and the full path decides.
async fn revalidate(store: &ImageStore, r: &QuickRef) -> Option<ImageRecord> {
    let (image, resolved) = store.tag_target(&r.whole()).ok()??;
    let resolved = resolved?;
    let current = match &r.digest {
        Some(d) => d.clone(),
        None => head_manifest_digest(&r.registry, r).await?,
    };
    if current != resolved {
        return None;
    }
    store.cached(&image)
}

async fn head_manifest_digest(registry: &str, r: &QuickRef) -> Option<String> {
    use http_body_util::Empty;
    use hyper_util::client::legacy::Client as HttpClient;
    use hyper_util::rt::TokioExecutor;
    let what = r.tag.as_deref()?;
    let uri = format!("http://{registry}/v2/{}/manifests/{what}", r.repository);
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let req = http::Request::head(uri)
        .header(http::header::ACCEPT, MANIFEST_ACCEPT)
        .body(Empty::new())
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .ok()?
        .ok()?;
    if resp.status() != http::StatusCode::OK {
        return None;
    }
    let digest = resp.headers().get("docker-content-digest")?.to_str().ok()?;
    crate::blobs::digest_hex(digest).ok()?;
    Some(digest.to_string())
}

/// Downloads one blob into the store, resuming a partial download if one exists.
async fn download(
    client: &Client,
    r: &Reference,
    store: &ImageStore,
    desc: &OciDescriptor,
    progress: &ProgressFn,
) -> Result<(), PullError> {
    let resumed = store.blobs().partial_len(&desc.digest) > 0;
    match download_once(client, r, store, desc, progress).await {
        // A resumed download whose earlier bytes were bad: the partial file is gone
        // (the failed commit removed it), so one fresh attempt is worth it.
        Err(PullError::Blob {
            source: BlobError::DigestMismatch { .. },
            ..
        }) if resumed => download_once(client, r, store, desc, progress).await,
        other => other,
    }
}

async fn download_once(
    client: &Client,
    r: &Reference,
    store: &ImageStore,
    desc: &OciDescriptor,
    progress: &ProgressFn,
) -> Result<(), PullError> {
    let digest = desc.digest.clone();
    let size = u64::try_from(desc.size).ok();
    let blob_err = |source| PullError::Blob {
        digest: digest.clone(),
        source,
    };
    if store.blobs().has(&digest, size) {
        progress(&Progress::LayerDone {
            digest: digest.clone(),
            cached: true,
        });
        return Ok(());
    }
    let mut writer = store.blobs().resumable(&digest, size).map_err(blob_err)?;
    let offset = writer.written();
    progress(&Progress::LayerStart {
        digest: digest.clone(),
        size,
        offset,
    });
    if size.is_none_or(|s| offset < s) {
        let response = client
            .pull_blob_stream_partial(r, desc, offset, None)
            .await
            .map_err(|e| match classify(e, r) {
                PullError::NotFound { .. } => PullError::Download {
                    digest: digest.clone(),
                    reason: "blob not found in the registry".into(),
                },
                other => other,
            })?;
        let mut stream = match response {
            BlobResponse::Partial(s) => s,
            BlobResponse::Full(s) => {
                writer.restart().map_err(blob_err)?;
                s
            }
        };
        let mut last = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| PullError::Download {
                digest: digest.clone(),
                reason: e.to_string(),
            })?;
            std::io::Write::write_all(&mut writer, &chunk).map_err(|e| PullError::Download {
                digest: digest.clone(),
                reason: e.to_string(),
            })?;
            if size.is_some_and(|s| writer.written() > s) {
                break;
            }
            if writer.written() - last >= 1 << 20 {
                last = writer.written();
                progress(&Progress::LayerBytes {
                    digest: digest.clone(),
                    bytes: last,
                    size,
                });
            }
        }
    }
    writer.commit().map_err(blob_err)?;
    progress(&Progress::LayerDone {
        digest: digest.clone(),
        cached: false,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_reference_matches_the_full_parser() {
        let d = format!("sha256:{}", "ab".repeat(32));
        for r in [
            "busybox".to_string(),
            "busybox:1.36".into(),
            "library/busybox".into(),
            "index.docker.io/x/y:z".into(),
            "127.0.0.1:5000/app".into(),
            "127.0.0.1:5000/team/app:v1.2_3".into(),
            "localhost/app:1".into(),
            format!("127.0.0.1:5000/app@{d}"),
            format!("127.0.0.1:5000/app:1@{d}"),
        ] {
            let full: Reference = r.parse().unwrap();
            let quick = QuickRef::parse(&r).unwrap();
            assert_eq!(quick.whole(), full.whole(), "{r}");
        }
        for bad in ["UPPER/case", "a:b:c/d:", "x@sha256:12"] {
            assert!(QuickRef::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn loopback_detection() {
        for r in [
            "127.0.0.1:5000",
            "localhost",
            "localhost:80",
            "[::1]:5000",
            "127.9.9.9",
        ] {
            assert!(is_loopback_registry(r), "{r}");
        }
        for r in [
            "index.docker.io",
            "10.0.0.1:5000",
            "ghcr.io",
            "[2001:db8::1]:5000",
        ] {
            assert!(!is_loopback_registry(r), "{r}");
        }
    }
}
