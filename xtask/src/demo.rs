//! `cargo xtask demo`: set up, build, start `aloft dev` with two regions, build the
//! example app's image, deploy it with two machines, and fetch it through the proxy.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aloft_types::datadir::DataDir;
use anyhow::{Context, Result, bail};

use crate::util::step;

/// Packs `examples/hello/rootfs` plus the host's static busybox into an OCI layout
/// whose command serves `/www` on port 8080.
pub fn build_hello_layout(repo: &Path, out: &Path) -> Result<PathBuf> {
    let tree = out.join("rootfs");
    let _ = std::fs::remove_dir_all(&tree);
    let src = repo.join("examples/hello/rootfs");
    copy_tree(&src, &tree)?;
    std::fs::create_dir_all(tree.join("bin"))?;
    std::fs::create_dir_all(tree.join("etc"))?;
    std::fs::copy("/bin/busybox", tree.join("bin/busybox"))
        .context("copying /bin/busybox (busybox-static, installed by set-up)")?;
    std::os::unix::fs::symlink("busybox", tree.join("bin/sh"))?;
    std::fs::write(
        tree.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33:www:/www:/bin/sh\n",
    )?;
    std::fs::write(tree.join("etc/group"), "root:x:0:\nwww:x:33:\n")?;
    let config = aloft_image::ImageConfig {
        cmd: Some(
            [
                "/bin/busybox",
                "httpd",
                "-f",
                "-v",
                "-p",
                "8080",
                "-h",
                "/www",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ),
        env: vec!["PATH=/bin".into()],
        exposed_ports: vec!["8080/tcp".into()],
        ..Default::default()
    };
    let layout = out.join("layout");
    let _ = std::fs::remove_dir_all(&layout);
    aloft_image::pack_dir(&tree, &config, "hello:v1", &layout)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(layout)
}

fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        let to = dst.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &to)?;
        } else {
            std::fs::copy(entry.path(), &to)?;
        }
    }
    Ok(())
}

struct DevProcess(Child);

impl Drop for DevProcess {
    fn drop(&mut self) {
        // SIGINT lets `aloft dev` stop its machines; kill if it does not exit.
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn aloft(bin: &Path, data: &DataDir, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .arg("--data-dir")
        .arg(data.root())
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running aloft {}", args.join(" ")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("aloft {} failed:\n{stdout}", args.join(" "));
    }
    Ok(stdout)
}

fn http_get(addr: &str, host: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

pub fn run(repo: &Path, data: &DataDir) -> Result<()> {
    let bin = repo.join("target/release/aloft");
    let work = data.root().join("demo");
    std::fs::create_dir_all(&work)?;

    step("building the demo image hello:v1 from examples/hello");
    let layout = build_hello_layout(repo, &work)?;
    aloft(
        &bin,
        data,
        &["image", "import", &layout.display().to_string()],
    )?;

    step("starting aloft dev (regions local and remote)");
    let dev_json = data.dev_json();
    let _ = std::fs::remove_file(&dev_json);
    let child = Command::new(&bin)
        .arg("--data-dir")
        .arg(data.root())
        .args(["dev", "--regions", "local,remote"])
        .spawn()
        .context("starting aloft dev")?;
    let mut dev = DevProcess(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dev_json.exists() {
        if let Ok(Some(status)) = dev.0.try_wait() {
            bail!("aloft dev exited early ({status})");
        }
        if Instant::now() > deadline {
            bail!("aloft dev did not start within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let endpoint: serde_json::Value = serde_json::from_slice(&std::fs::read(&dev_json)?)?;
    let proxy = endpoint["proxy"]
        .as_str()
        .unwrap_or("http://127.0.0.1:8080")
        .trim_start_matches("http://")
        .to_string();

    step("deploying examples/hello (two machines, regions local and remote)");
    let fly_toml = repo.join("examples/hello/fly.toml");
    let fly = fly_toml.display().to_string();
    // A second demo run finds the app from the first one.
    let apps = aloft(&bin, data, &["apps", "list"])?;
    if !apps
        .lines()
        .any(|l| l.split_whitespace().next() == Some("hello"))
    {
        aloft(&bin, data, &["apps", "create", "hello"])?;
    }
    aloft(
        &bin,
        data,
        &["deploy", "-c", &fly, "--regions", "local,remote"],
    )?;

    step(&format!(
        "GET http://hello.aloft.localhost/ through the proxy at {proxy}"
    ));
    let body = http_get(&proxy, "hello.aloft.localhost")?;
    println!("{body}");
    if !body.contains("Hello from Aloft") {
        bail!("the app did not answer through the proxy");
    }
    println!();
    println!("The demo app is up: curl -H 'Host: hello.aloft.localhost' http://{proxy}/");
    println!("Try next (with --data-dir {}):", data.root().display());
    println!("  target/release/aloft status -a hello");
    println!("  target/release/aloft logs -a hello");
    println!("  target/release/aloft machine list -a hello");
    println!("Press Ctrl-C to stop aloft dev.");
    let status = dev.0.wait()?;
    println!("aloft dev exited ({status})");
    Ok(())
}
