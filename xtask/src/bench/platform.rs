//! `cargo xtask bench api` and `cargo xtask bench deploy`: both run a release `aloft dev`
//! in a temporary data directory with the demo image, and drive it over HTTP and the CLI.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aloft_testkit::{DevChild, dev_command, free_port, httpd_config, kernel_dir};
use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::util::step;

/// A running `aloft dev` (stopped with its VMs on drop) and where to reach it.
struct Dev {
    child: DevChild,
    api: String,
    token: String,
    proxy: String,
}

fn repo() -> Result<PathBuf> {
    Ok(std::env::current_dir()?)
}

fn aloft_bin(repo: &Path) -> Result<PathBuf> {
    step("building aloft and aloft-init (release)");
    crate::util::cargo(&["build", "--release", "-p", "aloft"], &[])?;
    crate::setup::build_guest_init()?;
    Ok(repo.join("target/release/aloft"))
}

fn start_dev(bin: &Path, work: &Path, kernel: &Path) -> Result<Dev> {
    let data = work.join("data");
    std::fs::create_dir_all(&data)?;
    let _ = std::os::unix::fs::symlink(kernel, data.join("kernel"));
    let layout = crate::demo::build_hello_layout(&repo()?, work)?;
    let out = Command::new(bin)
        .arg("--data-dir")
        .arg(&data)
        .args(["image", "import", &layout.display().to_string()])
        .output()?;
    if !out.status.success() {
        bail!("image import: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (api_port, proxy_port) = (free_port()?, free_port()?);
    let mut cmd = dev_command(bin, &data, api_port, proxy_port);
    cmd.args(["--memory-mb", "16384"])
        .env("ALOFT_INIT_BIN", crate::setup::guest_init_path());
    let mut child = DevChild::spawn(cmd, &data)?.stop_within(Duration::from_secs(60));
    let info = child.wait_ready(Duration::from_secs(60))?;
    Ok(Dev {
        child,
        api: info.api_url,
        token: info.token,
        proxy: format!("127.0.0.1:{proxy_port}"),
    })
}

fn machine_config() -> Value {
    json!({
        "image": "hello:v1",
        "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 128},
        "services": [{"protocol": "tcp", "internal_port": 8080, "ports": [{"port": 80, "handlers": ["http"]}]}],
        "restart": {"policy": "no"}
    })
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn load(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    clients: usize,
    for_: Duration,
) -> (Vec<Duration>, u64) {
    let end = Instant::now() + for_;
    let mut tasks = Vec::new();
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..clients {
        let (client, url, token, errors) = (
            client.clone(),
            url.to_string(),
            token.to_string(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < end {
                let t = Instant::now();
                match client.get(&url).bearer_auth(&token).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        lat.push(t.elapsed());
                    }
                    _ => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        if let Ok(l) = t.await {
            all.extend(l);
        }
    }
    all.sort();
    (all, errors.load(std::sync::atomic::Ordering::Relaxed))
}

pub fn api() -> Result<()> {
    let repo = repo()?;
    let bin = aloft_bin(&repo)?;
    let work = tempfile::tempdir()?;
    let dev = start_dev(&bin, work.path(), &kernel_dir())?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
        let auth = |r: reqwest::RequestBuilder| r.bearer_auth(&dev.token);
        let r = auth(client.post(format!("{}/v1/apps", dev.api)))
            .json(&json!({"app_name": "bench", "org_slug": "personal"}))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("create app: {}", r.text().await?);
        }
        step("create→started through the API, 5 machines one by one");
        let mut one_by_one = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let r = auth(client.post(format!("{}/v1/apps/bench/machines", dev.api)))
                .json(&json!({"config": machine_config()}))
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("create machine: {}", r.text().await?);
            }
            let m: Value = r.json().await?;
            one_by_one.push(t.elapsed());
            ids.push(m["id"].as_str().unwrap_or_default().to_string());
        }
        one_by_one.sort();
        let id = ids.first().cloned().unwrap_or_default();
        let mut results = Vec::new();
        for (name, url) in [
            ("get_machine", format!("{}/v1/apps/bench/machines/{id}", dev.api)),
            ("list_machines", format!("{}/v1/apps/bench/machines", dev.api)),
        ] {
            step(&format!("{name}: 200 concurrent clients for 5 s"));
            let (lat, errors) = load(&client, &url, &dev.token, 200, Duration::from_secs(5)).await;
            let rps = lat.len() as f64 / 5.0;
            results.push(json!({"bench": "api", "case": name, "clients": 200, "requests_per_s": rps.round(), "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99), "errors": errors}));
        }
        results.push(json!({"bench": "api", "case": "create_to_started", "machines": 5, "min_ms": percentile(&one_by_one, 0.0), "median_ms": percentile(&one_by_one, 0.5), "max_ms": percentile(&one_by_one, 1.0)}));
        println!();
        for r in &results {
            println!("{r}");
        }
        for id in ids {
            let _ = auth(client.delete(format!("{}/v1/apps/bench/machines/{id}?force=true", dev.api))).send().await;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    drop(dev);
    Ok(())
}

pub fn deploy() -> Result<()> {
    let repo = repo()?;
    let bin = aloft_bin(&repo)?;
    let work = tempfile::tempdir()?;
    let dev = start_dev(&bin, work.path(), &kernel_dir())?;
    let app_dir = work.path().join("app");
    std::fs::create_dir_all(&app_dir)?;
    let toml = std::fs::read_to_string(repo.join("examples/hello/fly.toml"))?.replace(
        "auto_stop_machines = \"stop\"",
        "auto_stop_machines = \"off\"",
    );
    std::fs::write(app_dir.join("fly.toml"), toml)?;
    let run = |args: &[&str]| -> Result<Duration> {
        let t = Instant::now();
        let out = Command::new(&bin)
            .arg("--data-dir")
            .arg(dev.child.data())
            .args(args)
            .current_dir(&app_dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "aloft {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(t.elapsed())
    };
    run(&["apps", "create", "hello"])?;
    step("first deploy, then scale to 3 machines");
    let first = run(&["deploy"])?;
    let scale = run(&["scale", "count", "3"])?;
    // The v2 image: the same tree under a new tag and a changed page.
    step("importing hello:v2 (image phase)");
    let tree = work.path().join("rootfs");
    std::fs::write(tree.join("www/index.html"), "version two\n")?;
    let config = httpd_config(true);
    let layout = work.path().join("layout-v2");
    let t = Instant::now();
    aloft_image::pack_dir(&tree, &config, "hello:v2", &layout)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    run(&["image", "import", &layout.display().to_string()])?;
    let image_phase = t.elapsed();
    step("rolling deploy of hello:v2 to 3 machines (machines + health phases)");
    let rolling = run(&["deploy", "--image", "hello:v2"])?;
    let results = [
        json!({"bench": "deploy", "case": "first_deploy_1_machine", "ms": first.as_millis()}),
        json!({"bench": "deploy", "case": "scale_to_3", "ms": scale.as_millis()}),
        json!({"bench": "deploy", "case": "rolling_3_machines", "phase": "image", "ms": image_phase.as_millis()}),
        json!({"bench": "deploy", "case": "rolling_3_machines", "phase": "machines_and_health", "ms": rolling.as_millis(), "per_machine_ms": rolling.as_millis() / 3}),
        json!({"bench": "deploy", "case": "rolling_3_machines", "phase": "total", "ms": (image_phase + rolling).as_millis()}),
    ];
    println!();
    for r in &results {
        println!("{r}");
    }
    let _ = dev.proxy.len();
    Ok(())
}
