//! `cargo xtask bench image`: pull + unpack + ext4 of a ~150 MB image with many small
//! files (a synthetic rootfs made of this host's /usr/share and /usr/lib), served by a
//! local `docker-registry`. Baseline, measured in the same run and interleaved:
//! `skopeo copy docker://… oci:…` + `umoci unpack` + `mkfs.ext4 -d`. Also measures a
//! cached `aloft image pull` of the same reference (goal < 50 ms).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::util::{cargo, have, output, run as run_cmd, step, workspace_root};

const TARGET_BYTES: u64 = 150 << 20;
const LAYERS: usize = 4;
const ROUNDS: usize = 3;

pub fn run() -> Result<()> {
    for bin in ["docker-registry", "skopeo", "umoci", "mkfs.ext4"] {
        if !have(bin) && !Path::new("/usr/sbin").join(bin).exists() {
            bail!("{bin} is missing: run `cargo xtask setup`");
        }
    }
    step("building aloft (release)");
    cargo(&["build", "--release", "-q", "-p", "aloft"], &[])?;
    let aloft = workspace_root().join("target/release/aloft");

    let work = tempfile::tempdir().context("creating a temporary directory")?;
    let w = work.path();

    step("building a synthetic ~150 MB image from /usr/share and /usr/lib");
    let (files, bytes) = build_layout(&w.join("layout"))?;
    println!(
        "    {files} files, {} MiB in {LAYERS} gzip layers",
        bytes >> 20
    );

    step("starting docker-registry on loopback");
    let registry = Registry::start(&w.join("registry"))?;
    let reference = format!("127.0.0.1:{}/bench:1", registry.port);
    run_cmd(
        Command::new("skopeo")
            .args(["--insecure-policy", "copy", "-q", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:bench", w.join("layout").display()))
            .arg(format!("docker://{reference}")),
    )?;

    let mut aloft_times = Vec::new();
    let mut base_times = Vec::new();
    let mut cached_times = Vec::new();
    let mut ratios = Vec::new();
    for round in 1..=ROUNDS {
        // aloft: fresh data directory.
        let data = w.join(format!("aloft-{round}"));
        let t = Instant::now();
        let out = output(
            Command::new(&aloft)
                .arg("--data-dir")
                .arg(&data)
                .args(["image", "pull", &reference]),
        )?;
        let aloft_s = t.elapsed().as_secs_f64();
        let v: serde_json::Value = serde_json::from_str(out.trim()).context("aloft output")?;
        let rootfs = v["rootfs"].as_str().unwrap_or_default().to_string();
        if !Path::new(&rootfs).is_file() {
            bail!("aloft did not produce a rootfs: {out}");
        }
        // Cached: same reference, same data directory.
        let t = Instant::now();
        output(
            Command::new(&aloft)
                .arg("--data-dir")
                .arg(&data)
                .args(["image", "pull", &reference]),
        )?;
        let cached_s = t.elapsed().as_secs_f64();

        // Baseline: skopeo + umoci + mkfs.ext4.
        let base = w.join(format!("base-{round}"));
        fs::create_dir_all(&base)?;
        let t = Instant::now();
        run_cmd(
            Command::new("skopeo")
                .args(["--insecure-policy", "copy", "-q", "--src-tls-verify=false"])
                .arg(format!("docker://{reference}"))
                .arg(format!("oci:{}:bench", base.join("oci").display())),
        )?;
        run_cmd(
            Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:bench", base.join("oci").display()))
                .arg(base.join("bundle"))
                .stdout(Stdio::null()),
        )?;
        let unpacked = t.elapsed();
        // Sizing is not timed (aloft's own sizing is included in its time).
        let (content, inodes) = usage(&base.join("bundle/rootfs"))?;
        let size = content + content / 5 + (64 << 20) + inodes * 256;
        let img = base.join("rootfs.ext4");
        File::create(&img)?.set_len(size.div_ceil(1 << 20) << 20)?;
        let t = Instant::now();
        run_cmd(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-N"])
                .arg((inodes + inodes / 5 + 4096).to_string())
                .args(["-E", "root_owner=0:0"])
                .arg("-d")
                .arg(base.join("bundle/rootfs"))
                .arg(&img),
        )?;
        let base_s = (unpacked + t.elapsed()).as_secs_f64();

        println!(
            "    round {round}: aloft {aloft_s:.2}s  baseline {base_s:.2}s  ratio {:.2}  cached {:.1} ms",
            aloft_s / base_s,
            cached_s * 1e3
        );
        ratios.push(aloft_s / base_s);
        aloft_times.push(aloft_s);
        base_times.push(base_s);
        cached_times.push(cached_s);
        let _ = fs::remove_dir_all(&data);
        let _ = fs::remove_dir_all(&base);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (a, b, c, ratio) = (
        med(&mut aloft_times),
        med(&mut base_times),
        med(&mut cached_times),
        med(&mut ratios),
    );
    println!(
        "image pull+unpack+ext4 (medians): aloft {a:.2}s vs skopeo+umoci+mkfs {b:.2}s; ratio {ratio:.2}x (goal <= 1.0x); cached {:.1} ms (goal < 50 ms)",
        c * 1e3
    );
    let line = serde_json::json!({
        "bench": "image",
        "files": files,
        "bytes": bytes,
        "layers": LAYERS,
        "rounds": ROUNDS,
        "aloft_s": a,
        "baseline_s": b,
        "ratio": ratio,
        "cached_ms": c * 1e3,
        "goal_ratio": 1.0,
        "goal_cached_ms": 50.0,
    });
    println!("{line}");
    drop(registry);
    Ok(())
}

/// Apparent bytes (4 KiB blocks) and inode count of a tree.
fn usage(root: &Path) -> Result<(u64, u64)> {
    let out = output(Command::new("du").args(["-s", "--block-size=1"]).arg(root))?;
    let bytes: u64 = out.split_whitespace().next().unwrap_or("0").parse()?;
    let inodes = output(Command::new("find").arg(root).args(["-printf", "."]))?.len() as u64;
    Ok((bytes, inodes))
}

/// Files (sorted, depth first) from /usr/share then /usr/lib until the target size.
fn collect(dir: &Path, out: &mut Vec<(PathBuf, u64)>, total: &mut u64) -> Result<()> {
    let mut entries: Vec<_> = match fs::read_dir(dir) {
        Ok(e) => e.filter_map(|e| e.ok()).collect(),
        Err(_) => return Ok(()),
    };
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if *total >= TARGET_BYTES {
            return Ok(());
        }
        let p = e.path();
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            out.push((p.clone(), 0));
            collect(&p, out, total)?;
        } else if (m.is_file() && m.len() <= 8 << 20) || m.is_symlink() {
            *total += m.len();
            out.push((p, m.len()));
        }
    }
    Ok(())
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn put_blob(dir: &Path, data: &[u8]) -> Result<String> {
    let d = sha(data);
    fs::write(dir.join("blobs/sha256").join(&d[7..]), data)?;
    Ok(d)
}

/// Writes an OCI layout with `LAYERS` gzip layers; returns (files, bytes).
fn build_layout(dir: &Path) -> Result<(usize, u64)> {
    fs::create_dir_all(dir.join("blobs/sha256"))?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut entries = Vec::new();
    let mut total = 0;
    for root in ["/usr/share", "/usr/lib"] {
        entries.push((PathBuf::from(root), 0));
        collect(Path::new(root), &mut entries, &mut total)?;
    }
    let files = entries.iter().filter(|(_, s)| *s > 0).count();
    let per = total.div_ceil(LAYERS as u64);
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    let mut it = entries.into_iter().peekable();
    for i in 0..LAYERS {
        let mut tar = tar::Builder::new(Vec::new());
        tar.follow_symlinks(false);
        tar.mode(tar::HeaderMode::Complete);
        let mut bytes = 0;
        while let Some((p, size)) = it.peek().cloned() {
            if bytes >= per && i + 1 < LAYERS {
                break;
            }
            it.next();
            let name = p.strip_prefix("/").unwrap_or(&p);
            // Unreadable files are skipped.
            if tar.append_path_with_name(&p, name).is_ok() {
                bytes += size;
            }
        }
        let tar = tar.into_inner()?;
        diff_ids.push(sha(&tar));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        gz.write_all(&tar)?;
        let blob = gz.finish()?;
        let d = put_blob(dir, &blob)?;
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d, "size": blob.len(),
        }));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let config_digest = put_blob(dir, &config)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": layers,
    }))?;
    let manifest_digest = put_blob(dir, &manifest)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest, "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "bench"},
    }]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok((files, total))
}

struct Registry {
    port: u16,
    child: Child,
}

impl Registry {
    fn start(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let cfg = dir.join("config.yml");
        fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("storage").display()
            ),
        )?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting docker-registry")?;
        let reg = Registry { port, child };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !ready(port) {
            if Instant::now() > deadline {
                bail!("docker-registry did not answer on 127.0.0.1:{port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(reg)
    }
}

fn ready(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if n >= 12 && &buf[9..12] == b"200")
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
