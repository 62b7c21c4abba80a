//! `aloft ssh console` end to end: `aloft dev` with a real VM (busybox image), the CLI
//! in pipe mode (exit codes, stdin streamed to the default shell), on a pseudo-terminal
//! made by the test (`tty`, `stty size`, a resize through SIGWINCH), a bad machine id,
//! and the console WebSocket refusing tokens of another app or none.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_aloft")
}

/// `aloft dev` in a child process; stopped (and its VMs with it) on drop.
struct Dev {
    child: Child,
    data: PathBuf,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Never leave a VM of this test's data directory behind.
        let _ = Command::new("pkill")
            .args(["-9", "-f", &self.data.display().to_string()])
            .status();
    }
}

fn aloft_cmd(data: &Path, cwd: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("--data-dir")
        .arg(data)
        .args(args)
        .current_dir(cwd)
        .env_remove("ALOFT_API_URL")
        .env_remove("ALOFT_API_TOKEN")
        .env_remove("ALOFT_APP");
    c
}

fn aloft(data: &Path, cwd: &Path, args: &[&str]) -> Output {
    aloft_cmd(data, cwd, args)
        .stdin(Stdio::null())
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

/// A busybox image whose app sleeps, imported into `aloft dev`'s data dir.
fn image(data: &Path, work: &Path, name: &str) {
    let tree = work.join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).expect("busybox-static");
    for applet in ["sh", "tty", "stty", "sleep", "cat", "ps"] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
    std::fs::write(tree.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    let config = aloft_image::ImageConfig {
        cmd: Some(
            ["/bin/busybox", "sleep", "3600"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ),
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    };
    let layout = work.join("layout");
    aloft_image::pack_dir(&tree, &config, name, &layout).unwrap();
    ok(
        aloft(
            data,
            work,
            &["image", "import", &layout.display().to_string()],
        ),
        "image import",
    );
}

const FLY_TOML: &str = r#"app = "shell"
primary_region = "local"

[build]
  image = "shell:v1"

[[vm]]
  memory = "128mb"
"#;

/// A pseudo-terminal pair of `rows` x `cols`: (master, slave).
fn openpty(rows: u16, cols: u16) -> (OwnedFd, OwnedFd) {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    let slave = rustix::fs::open(
        name.as_c_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    set_size(&master, rows, cols);
    (master, slave)
}

fn set_size(fd: impl AsFd, rows: u16, cols: u16) {
    let ws = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(fd, ws).unwrap();
}

/// Is the terminal in its normal (canonical, echoing) mode?
fn cooked(fd: impl AsFd) -> bool {
    use rustix::termios::LocalModes;
    let t = rustix::termios::tcgetattr(fd).unwrap();
    t.local_modes
        .contains(LocalModes::ICANON | LocalModes::ECHO)
}

/// Reads the master side on a thread; lines of what arrived go to the channel.
fn pty_reader(master: OwnedFd) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut f = std::fs::File::from(master);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // EIO once every slave copy is closed (the CLI exited).
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Collects pty output until `want` appears, at most until `deadline`.
fn read_until(
    rx: &std::sync::mpsc::Receiver<Vec<u8>>,
    seen: &mut String,
    want: &str,
    deadline: Instant,
) {
    while !seen.contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            Err(_) => panic!("no {want:?} on the terminal; it showed: {seen:?}"),
        }
    }
}

fn wait_child(child: &mut Child, deadline: Instant) -> std::process::ExitStatus {
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "aloft ssh console did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The status and JSON error of a console WebSocket upgrade with `token`.
fn ws_status(api: &str, path: &str, token: Option<&str>) -> (u16, String) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("{}{path}", api.replace("http://", "ws://"));
    let mut req = url.as_str().into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        match tokio_tungstenite::connect_async(req).await {
            Ok((mut ws, resp)) => {
                let _ = ws.close(None).await;
                (resp.status().as_u16(), String::new())
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
                resp.status().as_u16(),
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
            ),
            Err(e) => panic!("{url}: {e}"),
        }
    })
}

#[test]
fn ssh_console_pipes_ptys_and_exit_codes() {
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::os::unix::fs::symlink(aloft_testkit::kernel_dir(), data.join("kernel")).unwrap();
    let app_dir = work.path().join("app");
    std::fs::create_dir_all(&app_dir).unwrap();
    std::fs::write(app_dir.join("fly.toml"), FLY_TOML).unwrap();
    image(&data, work.path(), "shell:v1");

    let api_port = aloft_testkit::free_port().unwrap();
    let child = Command::new(bin())
        .arg("--data-dir")
        .arg(&data)
        .args(["dev", "--regions", "local"])
        .args(["--api-listen", &format!("127.0.0.1:{api_port}")])
        .args([
            "--proxy-listen",
            &format!("127.0.0.1:{}", aloft_testkit::free_port().unwrap()),
        ])
        .env("ALOFT_INIT_BIN", aloft_testkit::init_bin().unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _dev = Dev {
        child,
        data: data.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !data.join("dev.json").exists() {
        assert!(Instant::now() < deadline, "aloft dev did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    ok(
        aloft(&data, &app_dir, &["apps", "create", "shell"]),
        "apps create",
    );
    ok(aloft(&data, &app_dir, &["deploy"]), "deploy");
    let list = ok(
        aloft(&data, &app_dir, &["machine", "list", "--json"]),
        "machine list",
    );
    let machines: serde_json::Value = serde_json::from_str(&list).unwrap();
    let id = machines[0]["id"].as_str().unwrap().to_string();
    eprintln!("deployed in {:?}", started.elapsed());

    // Pipe mode: output, the remote exit code as ours.
    let out = aloft(
        &data,
        &app_dir,
        &["ssh", "console", "-C", "echo hi; echo oops >&2; exit 3"],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");

    // Stdin is streamed: `read` takes the first line, `cat` the rest until our EOF.
    let piped = |args: &[&str], input: &[u8]| {
        let mut c = aloft_cmd(&data, &app_dir, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = c.stdin.take().unwrap();
        stdin.write_all(input).unwrap();
        drop(stdin);
        c.wait_with_output().unwrap()
    };
    let big = "x".repeat(300_000);
    let out = piped(
        &[
            "ssh",
            "console",
            "-C",
            "read line; echo got:$line; cat; exit 4",
        ],
        format!("first line\n{big}\nlast\n").as_bytes(),
    );
    assert_eq!(
        out.status.code(),
        Some(4),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("got:first line\n{big}\nlast\n")
    );
    // Without -C the image's shell runs the script on our stdin.
    let out = piped(
        &["ssh", "console", "--machine", &id],
        b"echo from-stdin; exit 7\n",
    );
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-stdin\n");

    // A terminal: the command gets a pty of our size, and follows a resize.
    let (master, slave) = openpty(33, 101);
    let term = slave.try_clone().unwrap();
    assert!(cooked(&term));
    let rx = pty_reader(master.try_clone().unwrap());
    let mut c = aloft_cmd(
        &data,
        &app_dir,
        &[
            "ssh",
            "console",
            "-C",
            "tty; stty size; while [ \"$(stty size)\" != \"40 120\" ]; do sleep 0.1; done; echo resized; exit 5",
        ],
    )
    .stdin(Stdio::from(slave.try_clone().unwrap()))
    .stdout(Stdio::from(slave.try_clone().unwrap()))
    .stderr(Stdio::from(slave))
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    read_until(&rx, &mut seen, "33 101", deadline);
    assert!(seen.contains("/dev/pts/"), "{seen:?}");
    set_size(&master, 40, 120);
    let _ = Command::new("kill")
        .args(["-WINCH", &c.id().to_string()])
        .status();
    read_until(&rx, &mut seen, "resized", deadline);
    let st = wait_child(&mut c, deadline);
    assert_eq!(st.code(), Some(5), "{seen:?}");
    assert!(cooked(&term), "the terminal was left in raw mode");

    // An interactive shell on the pty: what we type runs, `exit` ends it.
    let (master, slave) = openpty(24, 80);
    let term = slave.try_clone().unwrap();
    let rx = pty_reader(master.try_clone().unwrap());
    let mut c = aloft_cmd(&data, &app_dir, &["ssh", "console"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let mut typed = std::fs::File::from(master);
    typed.write_all(b"echo $((6*7))-$TERM\r").unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    read_until(&rx, &mut seen, "42-", deadline);
    assert!(!cooked(&term), "the terminal is not raw during the session");
    typed.write_all(b"exit 6\r").unwrap();
    let st = wait_child(&mut c, deadline);
    assert_eq!(st.code(), Some(6), "{seen:?}");
    assert!(cooked(&term), "the terminal was left in raw mode");

    // The client vanishing (SIGKILL) hangs the command up: it does not linger.
    let (master, slave) = openpty(24, 80);
    let rx = pty_reader(master.try_clone().unwrap());
    let mut c = aloft_cmd(
        &data,
        &app_dir,
        &["ssh", "console", "-C", "echo started; exec sleep 999"],
    )
    .stdin(Stdio::from(slave.try_clone().unwrap()))
    .stdout(Stdio::from(slave.try_clone().unwrap()))
    .stderr(Stdio::from(slave))
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    read_until(&rx, &mut String::new(), "started", deadline);
    let ps = || {
        ok(
            aloft(&data, &app_dir, &["machine", "exec", &id, "--", "ps"]),
            "machine exec ps",
        )
    };
    assert!(ps().contains("sleep 999"));
    c.kill().unwrap();
    c.wait().unwrap();
    loop {
        let procs = ps();
        if !procs.contains("sleep 999") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the console command outlived its client:\n{procs}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A machine that does not exist: a clear error, non-zero.
    let out = aloft(
        &data,
        &app_dir,
        &["ssh", "console", "--machine", "nosuchmachine", "-C", "true"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("nosuchmachine") && err.contains("not found"),
        "{err}"
    );

    // The WebSocket: no token and another app's deploy token are refused.
    let dev: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("dev.json")).unwrap()).unwrap();
    let api = dev["api_url"].as_str().unwrap().trim_end_matches('/');
    let admin = dev["token"].as_str().unwrap();
    ok(
        aloft(&data, &app_dir, &["apps", "create", "other"]),
        "apps create other",
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let other_token: String = rt.block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("{api}/v1/apps/other/deploy_token"))
            .bearer_auth(admin)
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{:?}", resp.status());
        let v: serde_json::Value = resp.json().await.unwrap();
        v["token"].as_str().unwrap().to_string()
    });
    let path = format!("/v1/apps/shell/machines/{id}/console?cmd=true");
    let (status, body) = ws_status(api, &path, Some(&other_token));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("limited to app"), "{body}");
    let (status, _) = ws_status(api, &path, None);
    assert_eq!(status, 401);
    let (status, _) = ws_status(api, &path, Some(admin));
    assert_eq!(status, 101);
    eprintln!("console test took {:?}", started.elapsed());
}
