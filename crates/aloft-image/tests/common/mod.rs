//! Test helpers: OCI layouts built in Rust, a real `docker-registry` on loopback,
//! pushes with skopeo, and ext4 inspection with debugfs.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub fn need(bin: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let p = Path::new(dir).join(bin);
        if p.exists() {
            return p;
        }
    }
    panic!("{bin} is missing: run `cargo xtask setup` (apt package needed for this test)");
}

/// One tar entry of a test layer. Names are written raw (no validation), so
/// hostile names can be produced.
#[derive(Clone)]
pub enum E {
    Dir(&'static str, u32),
    File(&'static str, Vec<u8>, u32),
    Owned(&'static str, Vec<u8>, u32, u64, u64),
    Symlink(&'static str, &'static str),
    Hardlink(&'static str, &'static str),
    Fifo(&'static str),
    Char(&'static str, u32, u32),
    Whiteout(&'static str),
    Opaque(&'static str),
}

pub const MTIME: u64 = 1_600_000_000;

fn header(name: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    let bytes = name.as_bytes();
    assert!(bytes.len() < 100, "test names must be short");
    h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn set_link(h: &mut tar::Header, target: &str) {
    let b = target.as_bytes();
    h.as_old_mut().linkname[..b.len()].copy_from_slice(b);
}

pub fn layer_tar(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        use tar::EntryType as T;
        let (mut h, data): (tar::Header, Vec<u8>) = match e {
            E::Dir(p, m) => (header(p, T::Directory, 0, *m), vec![]),
            E::File(p, d, m) => (header(p, T::Regular, d.len() as u64, *m), d.clone()),
            E::Owned(p, d, m, u, g) => {
                let mut h = header(p, T::Regular, d.len() as u64, *m);
                h.set_uid(*u);
                h.set_gid(*g);
                (h, d.clone())
            }
            E::Symlink(p, t) => {
                let mut h = header(p, T::Symlink, 0, 0o777);
                set_link(&mut h, t);
                (h, vec![])
            }
            E::Hardlink(p, t) => {
                let mut h = header(p, T::Link, 0, 0o644);
                set_link(&mut h, t);
                (h, vec![])
            }
            E::Fifo(p) => (header(p, T::Fifo, 0, 0o644), vec![]),
            E::Char(p, maj, min) => {
                let mut h = header(p, T::Char, 0, 0o666);
                h.set_device_major(*maj).unwrap();
                h.set_device_minor(*min).unwrap();
                (h, vec![])
            }
            E::Whiteout(p) => (header(p, T::Regular, 0, 0o644), vec![]),
            E::Opaque(p) => (header(p, T::Regular, 0, 0o644), vec![]),
        };
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub fn compress(tar: &[u8], c: Compression) -> (Vec<u8>, &'static str) {
    match c {
        Compression::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            (
                e.finish().unwrap(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        Compression::Zstd => (
            zstd::encode_all(tar, 1).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    }
}

/// An OCI image layout written to a directory.
pub struct Layout {
    pub dir: PathBuf,
    pub config_digest: String,
    pub manifest_digest: String,
    pub layer_digests: Vec<String>,
}

fn put_blob(dir: &Path, data: &[u8]) -> String {
    let d = sha(data);
    let p = dir.join("blobs/sha256").join(&d[7..]);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
    d
}

pub fn config_json(diff_ids: &[String]) -> serde_json::Value {
    serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/busybox"],
            "Cmd": ["sh", "-c", "echo hi"],
            "Env": ["PATH=/bin", "HELLO=world"],
            "WorkingDir": "/work",
            "User": "1000:1000",
            "ExposedPorts": {"8080/tcp": {}},
            "Labels": {"org.example": "yes"}
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
}

/// Writes an OCI layout with the given layers (each already a tar) to `dir`.
pub fn write_layout(
    dir: &Path,
    layers: &[(Vec<u8>, Compression)],
    ref_name: Option<&str>,
) -> Layout {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut layer_digests = Vec::new();
    for (tar, c) in layers {
        diff_ids.push(sha(tar));
        let (blob, mt) = compress(tar, *c);
        let d = put_blob(dir, &blob);
        layer_digests.push(d.clone());
        descs.push(serde_json::json!({"mediaType": mt, "digest": d, "size": blob.len()}));
    }
    let config = serde_json::to_vec(&config_json(&diff_ids)).unwrap();
    let config_digest = put_blob(dir, &config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let manifest_digest = put_blob(dir, &manifest);
    let mut entry = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest, "size": manifest.len(),
        "platform": {"architecture": "amd64", "os": "linux"},
    });
    if let Some(r) = ref_name {
        entry["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": r});
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [entry]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    Layout {
        dir: dir.to_path_buf(),
        config_digest,
        manifest_digest,
        layer_digests,
    }
}

/// The busybox test image: /bin/busybox and a few links.
pub fn busybox_layers() -> Vec<(Vec<u8>, Compression)> {
    let bb = std::fs::read(need("busybox")).unwrap();
    vec![(
        layer_tar(&[
            E::Dir("bin/", 0o755),
            E::File("bin/busybox", bb, 0o755),
            E::Symlink("bin/sh", "busybox"),
            E::Dir("work/", 0o755),
            E::Dir("etc/", 0o755),
            E::File("etc/hostname", b"busybox\n".to_vec(), 0o644),
        ]),
        Compression::Gzip,
    )]
}

/// Runs debugfs on an ext4 image and returns stdout.
pub fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new(need("debugfs"))
        .args(["-R", request])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `docker-registry` on 127.0.0.1, killed on drop.
pub struct Registry {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback port nothing listens on.
pub fn closed_port() -> u16 {
    free_port()
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
    line.split_whitespace().nth(1)?.parse().ok()
}

impl Registry {
    pub fn start(basic_auth: Option<(&str, &str)>) -> Registry {
        let bin = need("docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut auth = String::new();
        if let Some((u, p)) = basic_auth {
            let out = Command::new(need("htpasswd"))
                .args(["-Bbn", u, p])
                .output()
                .unwrap();
            assert!(out.status.success());
            std::fs::write(dir.path().join("htpasswd"), &out.stdout).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.path().join("storage").display()
        );
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let reg = Registry { port, dir, child };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(code) = http_status(port, "/v2/")
                && (code == 200 || code == 401)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "registry on port {port} did not become ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        reg
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes an OCI layout as `name:tag` with skopeo.
    pub fn push(&self, layout: &Path, name_tag: &str, creds: Option<(&str, &str)>) {
        self.skopeo(layout, name_tag, creds, &[]);
    }

    /// Pushes an OCI layout as a Docker schema2 image.
    pub fn push_v2s2(&self, layout: &Path, name_tag: &str) {
        self.skopeo(layout, name_tag, None, &["--format", "v2s2"]);
    }

    fn skopeo(&self, layout: &Path, name_tag: &str, creds: Option<(&str, &str)>, extra: &[&str]) {
        let mut cmd = Command::new(need("skopeo"));
        cmd.args(["--insecure-policy", "copy", "-q", "--dest-tls-verify=false"]);
        cmd.args(extra);
        if let Some((u, p)) = creds {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        cmd.arg(format!("oci:{}", layout.display()))
            .arg(format!("docker://{}/{name_tag}", self.host()));
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "skopeo push failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The registry's stored copy of a blob.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = &digest[7..];
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Pushes an OCI layout exactly as it is (no recompression, unlike skopeo),
    /// with oci-client's monolithic uploads.
    pub fn push_raw(&self, layout: &Layout, name_tag: &str) {
        use oci_client::client::{ClientConfig, ClientProtocol};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let r: oci_client::Reference = format!("{}/{name_tag}", self.host()).parse().unwrap();
        let client = oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        });
        let blobs = layout.dir.join("blobs/sha256");
        let manifest = std::fs::read(blobs.join(&layout.manifest_digest[7..])).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            client
                .auth(
                    &r,
                    &oci_client::secrets::RegistryAuth::Anonymous,
                    oci_client::RegistryOperation::Push,
                )
                .await
                .unwrap();
            let mut digests = layout.layer_digests.clone();
            digests.push(layout.config_digest.clone());
            for d in digests {
                let data = std::fs::read(blobs.join(&d[7..])).unwrap();
                client.push_blob(&r, data, &d).await.unwrap();
            }
            client
                .push_manifest_raw(
                    &r,
                    manifest,
                    http::HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
                )
                .await
                .unwrap();
        });
    }
}
