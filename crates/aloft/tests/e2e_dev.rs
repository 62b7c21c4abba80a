//! End to end: `aloft dev` (real VMs under TCG, real proxy, real API) driven by the
//! `aloft` CLI — deploy, requests through the proxy, a rolling v2 deploy under a
//! request loop with zero failed requests, going back to v1, logs, secrets as env, a
//! deploy whose check never passes rolling back, and app destroy leaving nothing.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aloft_testkit::{
    BusyboxHttpd, DevChild, dev_command, free_port, init_bin, kernel_dir, poll_for,
};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_aloft")
}

fn aloft(data: &Path, cwd: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .current_dir(cwd)
        .env_remove("ALOFT_API_URL")
        .env_remove("ALOFT_API_TOKEN")
        .output()
        .unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds an image `name` serving `page` with busybox httpd and imports it.
fn image(data: &Path, work: &Path, name: &str, page: &str) {
    let layout = BusyboxHttpd::new(name)
        .page(page)
        .pack(work)
        .expect("busybox image (busybox-static: cargo xtask setup)");
    ok(
        aloft(
            data,
            work,
            &["image", "import", &layout.display().to_string()],
        ),
        "image import",
    );
}

fn get(proxy: u16, host: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, out))
}

const FLY_TOML: &str = r#"app = "hello"
primary_region = "local"
kill_signal = "SIGTERM"
kill_timeout = 5

[build]
  image = "hello:v1"

[http_service]
  internal_port = 8080
  force_https = false
  auto_stop_machines = "off"
  auto_start_machines = false
  min_machines_running = 1

[checks.alive]
  type = "http"
  port = 8080
  path = "/"
  interval = "2s"
  timeout = "2s"

[[vm]]
  memory = "128mb"
"#;

fn machine_ids(data: &Path, cwd: &Path) -> Vec<String> {
    let out = ok(
        aloft(data, cwd, &["machine", "list", "-a", "hello", "--json"]),
        "machine list",
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn deploy_serve_roll_and_destroy() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::os::unix::fs::symlink(kernel_dir(), data.join("kernel")).unwrap();
    let app_dir = work.path().join("app");
    std::fs::create_dir_all(&app_dir).unwrap();
    std::fs::write(app_dir.join("fly.toml"), FLY_TOML).unwrap();
    image(&data, work.path(), "hello:v1", "version one\n");
    image(&data, work.path(), "hello:v2", "version two\n");

    let (api, proxy) = (free_port().unwrap(), free_port().unwrap());
    let mut cmd = dev_command(Path::new(bin()), &data, api, proxy);
    cmd.env("ALOFT_INIT_BIN", init_bin().expect("static guest init"));
    let mut dev = DevChild::spawn(cmd, &data).unwrap();
    dev.wait_ready(Duration::from_secs(60))
        .expect("aloft dev did not start");

    ok(
        aloft(&data, &app_dir, &["apps", "create", "hello"]),
        "apps create",
    );
    ok(
        aloft(
            &data,
            &app_dir,
            &["secrets", "set", "--stage", "SECRET_WORD=sesame"],
        ),
        "secrets set",
    );
    ok(aloft(&data, &app_dir, &["deploy"]), "deploy v1");
    ok(
        aloft(&data, &app_dir, &["scale", "count", "2"]),
        "scale count 2",
    );
    let ids = machine_ids(&data, &app_dir);
    assert_eq!(ids.len(), 2, "{ids:?}");

    let body = poll_for(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || match get(proxy, "hello.aloft.localhost") {
            Ok((200, body)) => Some(body),
            _ => None,
        },
    )
    .expect("v1 not served through the proxy");
    assert!(body.contains("version one"), "{body}");

    // v2, rolling, under a request loop: not one request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (good, bad, v2) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let looper = {
        let (stop, good, bad, v2, failures) = (
            stop.clone(),
            good.clone(),
            bad.clone(),
            v2.clone(),
            failures.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match get(proxy, "hello.aloft.localhost") {
                    Ok((200, body)) => {
                        good.fetch_add(1, Ordering::Relaxed);
                        if body.contains("version two") {
                            v2.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    other => {
                        bad.fetch_add(1, Ordering::Relaxed);
                        failures.lock().unwrap().push(format!("{other:?}"));
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    ok(
        aloft(&data, &app_dir, &["deploy", "--image", "hello:v2"]),
        "deploy v2",
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    looper.join().unwrap();
    let failures = failures.lock().unwrap().clone();
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "failed requests during the rolling deploy: {failures:?}"
    );
    assert!(good.load(Ordering::Relaxed) > 20);
    assert!(v2.load(Ordering::Relaxed) > 0, "v2 never served");
    let (_, body) = get(proxy, "hello.aloft.localhost").unwrap();
    assert!(body.contains("version two"), "{body}");

    // Back to v1 through the recorded releases.
    let list = ok(
        aloft(&data, &app_dir, &["releases", "-a", "hello"]),
        "releases",
    );
    assert!(
        list.contains("v1") && list.contains("v2") && list.contains("complete"),
        "{list}"
    );
    ok(
        aloft(&data, &app_dir, &["releases", "rollback", "-a", "hello"]),
        "releases rollback",
    );
    let (_, body) = get(proxy, "hello.aloft.localhost").unwrap();
    assert!(body.contains("version one"), "{body}");

    // Logs hold the app's output; secrets are env in the machine.
    let logs = ok(aloft(&data, &app_dir, &["logs", "-a", "hello"]), "logs");
    assert!(logs.contains("response:200"), "{logs}");
    let ids = machine_ids(&data, &app_dir);
    let out = ok(
        aloft(
            &data,
            &app_dir,
            &[
                "machine",
                "exec",
                &ids[0],
                "-a",
                "hello",
                "--",
                "/bin/sh",
                "-c",
                "echo word=$SECRET_WORD app=$FLY_APP_NAME",
            ],
        ),
        "machine exec",
    );
    assert!(out.contains("word=sesame app=hello"), "{out}");

    // A deploy whose check never passes rolls back and exits non-zero, saying why.
    let broken = FLY_TOML.replace("path = \"/\"", "path = \"/missing\"");
    std::fs::write(app_dir.join("broken.toml"), broken).unwrap();
    let out = aloft(
        &data,
        &app_dir,
        &[
            "deploy",
            "-c",
            "broken.toml",
            "--image",
            "hello:v2",
            "--wait-timeout",
            "20s",
        ],
    );
    assert!(
        !out.status.success(),
        "a failing check must fail the deploy"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("alive"),
        "the failing check is named: {stderr}"
    );
    let (code, body) = get(proxy, "hello.aloft.localhost").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("version one"), "rolled back to v1: {body}");

    // Destroying the app leaves no VM, no machine directory and no catalog entry.
    ok(
        aloft(&data, &app_dir, &["apps", "destroy", "hello"]),
        "apps destroy",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let qemus = Command::new("pgrep")
            .args(["-f", &data.join("machines").display().to_string()])
            .output()
            .unwrap();
        let dirs = std::fs::read_dir(data.join("machines"))
            .map(|d| d.count())
            .unwrap_or(0);
        if qemus.stdout.is_empty() && dirs == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: qemu {:?}, {dirs} machine dirs",
            String::from_utf8_lossy(&qemus.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = aloft(&data, &app_dir, &["status", "-a", "hello"]);
    assert!(!out.status.success());
}
