//! Packs a directory into a one-layer OCI image layout: how the demo app and the tests
//! turn a local tree into an image without a registry or a container engine.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::store::ImageConfig;

/// Why a directory could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("cannot pack {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Writes an OCI image layout at `layout` whose single layer is the tree at `rootfs`
/// (ownership recorded as root) and whose config is `config`. Returns the manifest
/// digest. The layout can then be imported with [`crate::import`].
pub fn pack_dir(
    rootfs: &Path,
    config: &ImageConfig,
    tag: &str,
    layout: &Path,
) -> Result<String, PackError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PackError::Io { path, source }
    };
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Deterministic);
    builder.append_dir_all(".", rootfs).map_err(io(rootfs))?;
    let layer = builder.into_inner().map_err(io(rootfs))?;
    let layer_digest = sha(&layer);
    let mut cfg = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": config.env,
            "Labels": config.labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    if let Some(e) = &config.entrypoint {
        cfg["config"]["Entrypoint"] = serde_json::json!(e);
    }
    if let Some(c) = &config.cmd {
        cfg["config"]["Cmd"] = serde_json::json!(c);
    }
    if let Some(w) = &config.working_dir {
        cfg["config"]["WorkingDir"] = serde_json::json!(w);
    }
    if let Some(u) = &config.user {
        cfg["config"]["User"] = serde_json::json!(u);
    }
    if !config.exposed_ports.is_empty() {
        let ports: serde_json::Map<String, serde_json::Value> = config
            .exposed_ports
            .iter()
            .map(|p| (p.clone(), serde_json::json!({})))
            .collect();
        cfg["config"]["ExposedPorts"] = serde_json::Value::Object(ports);
    }
    let cfg_bytes = serde_json::to_vec(&cfg).unwrap_or_default();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&cfg_bytes), "size": cfg_bytes.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    });
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap_or_default();
    let manifest_digest = sha(&manifest_bytes);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(io(&blobs))?;
    for data in [&layer, &cfg_bytes, &manifest_bytes] {
        let digest = sha(data);
        let path = blobs.join(&digest["sha256:".len()..]);
        fs::write(&path, data).map_err(io(&path))?;
    }
    let path = layout.join("oci-layout");
    fs::write(&path, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io(&path))?;
    let path = layout.join("index.json");
    fs::write(&path, serde_json::to_vec(&index).unwrap_or_default()).map_err(io(&path))?;
    Ok(manifest_digest)
}
