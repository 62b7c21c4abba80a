//! `aloft vm run` end to end: the real binary boots a busybox image in a real VM under
//! TCG. The app's exit code becomes the command's, its output and `-e` reach the
//! terminal, SIGINT stops the VM gracefully and leaves no QEMU and no machine
//! directory, `--boot-timeline` prints every stage in order, `-p` forwards a port, and
//! bad input fails clearly before anything boots.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_aloft")
}

/// A data directory with the guest kernel, and a busybox image as an OCI layout.
struct Env {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    layout: PathBuf,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        assert!(
            aloft_testkit::kernel_dir().join("vmlinux").is_file(),
            "no guest kernel in {} (run `cargo xtask setup`)",
            aloft_testkit::kernel_dir().display()
        );
        std::os::unix::fs::symlink(aloft_testkit::kernel_dir(), data.join("kernel")).unwrap();
        let tree = tmp.path().join("tree");
        for d in ["bin", "www", "etc"] {
            std::fs::create_dir_all(tree.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", tree.join("bin/busybox")).expect("busybox-static");
        for applet in ["sh", "sleep", "echo", "httpd"] {
            std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
        }
        std::fs::write(tree.join("www/index.html"), "hello from vm run\n").unwrap();
        std::fs::write(tree.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        let config = aloft_image::ImageConfig {
            cmd: Some(vec!["/bin/sh".into(), "-c".into(), "echo default".into()]),
            env: vec!["PATH=/bin".into()],
            ..Default::default()
        };
        let layout = tmp.path().join("layout");
        aloft_image::pack_dir(&tree, &config, "vmrun/busybox:1", &layout).unwrap();
        Env {
            _tmp: tmp,
            data,
            layout,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.arg("--data-dir")
            .arg(&self.data)
            .args(["vm", "run", "--accel", "tcg"])
            .args(args)
            .env("ALOFT_INIT_BIN", aloft_testkit::init_bin().unwrap());
        c
    }

    fn image(&self) -> String {
        self.layout.display().to_string()
    }

    /// No QEMU of this data directory runs, and no machine directory is left.
    fn assert_clean(&self) {
        let needle = self.data.display().to_string();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) {
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                assert!(
                    !(cmdline.contains("qemu-system") && cmdline.contains(&needle)),
                    "a QEMU is left: {cmdline}"
                );
            }
        }
        let runs = self.data.join("vm-run");
        let left: Vec<_> = std::fs::read_dir(&runs)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "machine directories left: {left:?}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Never leave a VM behind, whatever happened.
        let _ = Command::new("pkill")
            .args(["-9", "-f", &self.data.display().to_string()])
            .status();
    }
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `aloft vm run` whose output lines arrive on channels.
struct Running {
    child: Child,
    lines: mpsc::Receiver<(bool, String)>,
    stdout: Vec<String>,
    stderr: Vec<String>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for (is_err, pipe) in [
            (false, Box::new(out) as Box<dyn Read + Send>),
            (true, Box::new(err)),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send((is_err, line));
                }
            });
        }
        Running {
            child,
            lines,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }

    /// Waits for a line containing `needle` (on either stream).
    fn wait_line(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((is_err, line)) => {
                    if is_err {
                        self.stderr.push(line.clone());
                    } else {
                        self.stdout.push(line.clone());
                    }
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "no line with {needle:?} within {limit:?}\nstdout: {:?}\nstderr: {:?}",
                        self.stdout, self.stderr
                    );
                }
            }
        }
    }

    fn interrupt(&self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to end; returns its exit code and the remaining output.
    fn finish(mut self, limit: Duration) -> (i32, Vec<String>, Vec<String>) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((true, line)) => self.stderr.push(line),
                Ok((false, line)) => self.stdout.push(line),
                // Both pipes closed: the process is ending.
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "aloft vm run did not end within {limit:?}\nstdout: {:?}\nstderr: {:?}",
                        self.stdout, self.stderr
                    );
                }
            }
        }
        let status = self.child.wait().unwrap();
        (status.code().unwrap_or(-1), self.stdout, self.stderr)
    }
}

#[test]
fn exit_code_logs_and_env_reach_the_terminal() {
    let env = Env::new();
    let out = env
        .cmd(&[
            "-e",
            "GREETING=hello from env",
            &env.image(),
            "--",
            "/bin/sh",
            "-c",
            "echo \"out: $GREETING\"; echo 'to stderr' >&2; exit 3",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("out: hello from env"), "stdout: {stdout}");
    assert!(stderr.contains("to stderr"), "stderr: {stderr}");
    env.assert_clean();

    // The image's own CMD runs when none is given; the image is cached now.
    let out = env.cmd(&[&env.image()]).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("default"), "stdout: {stdout}");
    env.assert_clean();
}

#[test]
fn sigint_stops_the_vm_gracefully() {
    let env = Env::new();
    let mut run = Running::spawn(env.cmd(&[
        "--kill-timeout",
        "10s",
        &env.image(),
        "--",
        "/bin/sh",
        "-c",
        "trap 'echo got SIGINT; exit 7' INT; echo waiting; while true; do sleep 0.2; done",
    ]));
    run.wait_line("waiting", Duration::from_secs(120));
    run.interrupt();
    let (code, stdout, stderr) = run.finish(Duration::from_secs(60));
    assert_eq!(code, 7, "stdout: {stdout:?}\nstderr: {stderr:?}");
    assert!(
        stdout.iter().any(|l| l.contains("got SIGINT")),
        "stdout: {stdout:?}"
    );
    env.assert_clean();
}

#[test]
fn sigint_while_booting_removes_the_vm() {
    let env = Env::new();
    let run = Running::spawn(env.cmd(&[&env.image(), "--", "/bin/sleep", "60"]));
    // QEMU has started once a machine directory holds its pidfile.
    let deadline = Instant::now() + Duration::from_secs(60);
    let started = || {
        std::fs::read_dir(env.data.join("vm-run"))
            .map(|d| d.flatten().any(|e| e.path().join("qemu.pid").exists()))
            .unwrap_or(false)
    };
    while !started() {
        assert!(Instant::now() < deadline, "QEMU did not start within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    run.interrupt();
    let (code, stdout, stderr) = run.finish(Duration::from_secs(30));
    // Interrupted before the guest answered (130), or the app was stopped by the
    // signal (also 130): either way nothing is left.
    assert_eq!(code, 130, "stdout: {stdout:?}\nstderr: {stderr:?}");
    env.assert_clean();
}

#[test]
fn boot_timeline_lists_every_stage_in_order_and_port_forwards() {
    let env = Env::new();
    let port = aloft_testkit::free_port().unwrap();
    let publish = format!("{port}:8080");
    let mut run = Running::spawn(env.cmd(&[
        "--boot-timeline",
        "-p",
        &publish,
        &env.image(),
        "--",
        "/bin/httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
    ]));
    run.wait_line("app port accepting", Duration::from_secs(120));
    eprintln!("{}", run.stderr.join("\n"));
    let stages = [
        "qemu spawned",
        "first kernel console line",
        "init started",
        "root mounted",
        "network up",
        "app started",
        "app port accepting",
    ];
    let mut times = Vec::new();
    for stage in stages {
        let line = run
            .stderr
            .iter()
            .find(|l| l.contains(stage))
            .unwrap_or_else(|| panic!("no {stage:?} in {:?}", run.stderr));
        let ms: f64 = line
            .split_whitespace()
            .next()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no time on {line:?}"));
        times.push(ms);
    }
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "stages out of order: {:?}",
        run.stderr
    );
    // The port is accepting, through the forward.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.contains("hello from vm run"), "{body}");
    run.interrupt();
    let (code, stdout, stderr) = run.finish(Duration::from_secs(60));
    // httpd dies of SIGINT: 128 + 2.
    assert_eq!(code, 130, "stdout: {stdout:?}\nstderr: {stderr:?}");
    env.assert_clean();
}

#[test]
fn bad_input_fails_clearly_before_booting() {
    let env = Env::new();
    let out = env.cmd(&["--memory", "32", &env.image()]).output().unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("below the minimum of 64 MB"), "{stderr}");

    let out = env
        .cmd(&["127.0.0.1:1/nosuch/image:1", "--", "true"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("127.0.0.1:1/nosuch/image:1"), "{stderr}");

    let bare = env.data.parent().unwrap().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    let out = Command::new(bin())
        .arg("--data-dir")
        .arg(&bare)
        .args(["vm", "run", &env.image()])
        .env("ALOFT_INIT_BIN", aloft_testkit::init_bin().unwrap())
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("guest kernel not found"), "{stderr}");

    // An image with nothing to run.
    let out = env
        .cmd(&["--entrypoint", "", &env.image()])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("no entrypoint or cmd"), "{stderr}");
    env.assert_clean();
}
