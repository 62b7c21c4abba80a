//! aloft-init end to end: real QEMU (TCG here) through the aloft-vmm driver, a busybox
//! root disk built by the test, and the host side of the channel (`GuestChannel`).
//!
//! Needs the guest kernel (`ALOFT_KERNEL_DIR`, default /var/lib/aloft/kernel), the
//! static init (`ALOFT_INIT_BIN`, exported by `cargo xtask test`), busybox-static,
//! e2fsprogs and musl-gcc — all installed by `cargo xtask setup`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use aloft_types::guest::{
    GuestMessage, InterfaceConfig, NetworkConfig, RunConfig, VolumeMount, base64,
};
use aloft_types::machine::MachineFile;
use aloft_vmm::channel::{ChannelError, ExecRequest, GuestChannel, GuestExit};
use aloft_vmm::{Accel, PortForward, QemuVmm, Vm, VmNetwork, VmSpec, Vmm};
use tokio::sync::broadcast;

const BOOT: Duration = Duration::from_secs(90);
const STEP: Duration = Duration::from_secs(30);

fn kernel_dir() -> PathBuf {
    let dir = std::env::var_os("ALOFT_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/aloft/kernel"));
    assert!(
        dir.join("vmlinux").is_file(),
        "no guest kernel in {} (run `cargo xtask setup`)",
        dir.display()
    );
    dir
}

fn init_bin() -> PathBuf {
    let bin = std::env::var_os("ALOFT_INIT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/x86_64-unknown-linux-musl/release/aloft-init")
        });
    assert!(
        bin.is_file(),
        "no static aloft-init at {} (run `cargo xtask test`, or `cargo build --release -p aloft-init --target x86_64-unknown-linux-musl`)",
        bin.display()
    );
    bin
}

/// A static client for the guest's /.fly/api socket: request on stdin, response on stdout.
const API_CLIENT_C: &str = r#"
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <stdio.h>
int main(void) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    strcpy(a.sun_path, "/.fly/api");
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect /.fly/api"); return 1; }
    char buf[65536];
    ssize_t n;
    while ((n = read(0, buf, sizeof buf)) > 0) write(s, buf, n);
    while ((n = read(s, buf, sizeof buf)) > 0) write(1, buf, n);
    return 0;
}
"#;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An ext4 image holding busybox, users, and the API client.
fn busybox_root(work: &Path) -> PathBuf {
    let tree = work.join("rootfs");
    for d in ["bin", "etc", "home/app", "root", "www"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "busybox-static is not installed (cargo xtask setup)"
    );
    std::fs::copy(busybox, tree.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "cat", "echo", "id", "pwd", "httpd", "sleep", "stty", "test", "hostname", "ls",
        "true", "[", "wc", "ip", "cut",
    ] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        tree.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(tree.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
    // The image's own /etc/hosts is covered by the generated one (a bind mount); its
    // resolv.conf is a symlink into /run, as in many images, and is replaced; it has
    // no /etc/hostname, which is written.
    std::fs::write(tree.join("etc/hosts"), "127.0.0.1 image-hosts\n").unwrap();
    std::os::unix::fs::symlink(
        "../run/systemd/resolve/stub-resolv.conf",
        tree.join("etc/resolv.conf"),
    )
    .unwrap();
    let src = work.join("apireq.c");
    std::fs::write(&src, API_CLIENT_C).unwrap();
    run(Command::new("musl-gcc")
        .args(["-static", "-O2", "-o"])
        .arg(tree.join("bin/apireq"))
        .arg(&src));
    let img = work.join("root.ext4");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("64M"));
    img
}

fn empty_ext4(path: &Path) {
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .arg("16M"));
}

fn base_config(id: &str, cmd: &[&str]) -> RunConfig {
    let mut cfg = RunConfig {
        machine_id: id.into(),
        app_name: "demo".into(),
        region: "local".into(),
        kill_timeout_ms: 5000,
        kill_signal: "SIGINT".into(),
        root_device: "/dev/vda".into(),
        ..Default::default()
    };
    cfg.image_config.env = vec!["PATH=/bin".into()];
    cfg.config.init.cmd = Some(cmd.iter().map(|s| s.to_string()).collect());
    cfg
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Guest {
    spec: VmSpec,
    vm: Box<dyn Vm>,
    chan: GuestChannel,
    events: broadcast::Receiver<GuestMessage>,
    logs: Vec<String>,
    _work: tempfile::TempDir,
}

async fn boot(cfg: &RunConfig, network: VmNetwork, volumes: Vec<PathBuf>, memory_mb: u32) -> Guest {
    boot_raw(
        serde_json::to_vec(cfg).unwrap(),
        network,
        volumes,
        memory_mb,
    )
    .await
}

async fn boot_raw(
    run_json: Vec<u8>,
    network: VmNetwork,
    volumes: Vec<PathBuf>,
    memory_mb: u32,
) -> Guest {
    let work = tempfile::tempdir().unwrap();
    let root = busybox_root(work.path());
    let spec = VmSpec {
        dir: work.path().join("vm"),
        kernel_dir: kernel_dir(),
        init_bin: init_bin(),
        cache_dir: work.path().join("cache"),
        memory_mb,
        vcpus: 1,
        root_base: root,
        volumes,
        network,
        run_json,
        accel: Accel::Auto,
        tcg_tb_size_mb: Some(aloft_vmm::qemu::DEFAULT_TCG_TB_SIZE_MB),
    };
    QemuVmm.prepare(&spec).await.unwrap();
    let vm = QemuVmm.start(&spec, None).await.unwrap();
    let chan = match GuestChannel::connect(vm.ctl_socket(), BOOT).await {
        Ok(c) => c,
        Err(e) => {
            let tail = vm.console_tail(40);
            vm.kill();
            panic!("{e}\nconsole:\n{tail}");
        }
    };
    let events = chan.events();
    Guest {
        spec,
        vm,
        chan,
        events,
        logs: Vec::new(),
        _work: work,
    }
}

impl Guest {
    /// Reads events until `pred` matches one, up to `limit`; log lines are kept.
    async fn until(
        &mut self,
        what: &str,
        limit: Duration,
        mut pred: impl FnMut(&GuestMessage) -> bool,
    ) -> GuestMessage {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let ev = match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Ok(ev)) => ev,
                Ok(Err(e)) => panic!("event stream: {e}"),
                Err(_) => panic!(
                    "no {what} within {limit:?}; logs: {:?}\nconsole:\n{}",
                    self.logs,
                    self.vm.console_tail(30)
                ),
            };
            if let GuestMessage::Log { line, .. } = &ev {
                self.logs.push(line.clone());
            }
            if pred(&ev) {
                return ev;
            }
        }
    }

    async fn exit(&mut self) -> GuestExit {
        match self
            .until("Exit", STEP, |m| matches!(m, GuestMessage::Exit { .. }))
            .await
        {
            GuestMessage::Exit { code, signal, oom } => GuestExit { code, signal, oom },
            _ => unreachable!(),
        }
    }

    async fn powered_off(&self) {
        assert!(
            self.vm.wait_exit(STEP).await,
            "the VM did not power off after Exit; console:\n{}",
            self.vm.console_tail(20)
        );
    }
}

fn http_get(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(STEP)).unwrap();
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Runs `script` with `sh -c` in the guest; its stdout.
async fn sh_stdout(chan: &GuestChannel, script: &str) -> String {
    let r = chan.exec(&exec(&["sh", "-c", script]), STEP).await.unwrap();
    String::from_utf8_lossy(&r.stdout).into_owned()
}

fn exec(cmd: &[&str]) -> ExecRequest {
    ExecRequest {
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn app_env_user_files_network_ready_exec_metadata_reconnect_stop() {
    let mut cfg = base_config(
        "e2e-app",
        &[
            "/bin/sh",
            "-c",
            "echo env FOO=$FOO BAR=$BAR FLY=$FLY_APP_NAME HOME=$HOME; echo uid=$(id -u) gid=$(id -g); \
             echo cwd=$(pwd); echo to-stderr >&2; exec httpd -f -p 8080 -h /www",
        ],
    );
    cfg.image_config
        .env
        .extend(["FOO=image".into(), "BAR=image".into()]);
    cfg.image_config.user = "app".into();
    cfg.image_config.working_dir = "/home/app".into();
    cfg.config.env.insert("FOO".into(), "config".into());
    cfg.extra_env.insert("FLY_APP_NAME".into(), "demo".into());
    cfg.config.files.push(MachineFile {
        guest_path: "/www/index.html".into(),
        raw_value: Some(base64::encode(b"hello from aloft\n")),
        ..Default::default()
    });
    cfg.config.metadata.insert("role".into(), "primary".into());
    cfg.config.init.swap_size_mb = Some(16);
    cfg.network = NetworkConfig {
        interfaces: vec![InterfaceConfig {
            name: "eth0".into(),
            addresses: vec!["10.0.2.15/24".into(), "fdaa::2/64".into()],
            gateway4: Some("10.0.2.2".into()),
            gateway6: Some("fdaa::1".into()),
            mtu: Some(1400),
            ..Default::default()
        }],
        dns_servers: vec!["10.0.2.3".into()],
        extra_hosts: vec![],
    };
    cfg.ready_ports = vec![8080];
    let port = free_port();
    let mut g = boot(
        &cfg,
        VmNetwork::User {
            forwards: vec![PortForward {
                host_addr: "127.0.0.1".into(),
                host_port: port,
                guest_port: 8080,
            }],
        },
        vec![],
        256,
    )
    .await;

    g.until("InitStarted", BOOT, |m| {
        matches!(m, GuestMessage::InitStarted { .. })
    })
    .await;
    g.until("AppStarted", STEP, |m| {
        matches!(m, GuestMessage::AppStarted { .. })
    })
    .await;
    let ready = g
        .until("Ready", STEP, |m| matches!(m, GuestMessage::Ready { .. }))
        .await;
    assert!(matches!(ready, GuestMessage::Ready { port: 8080, .. }));
    assert_eq!(g.chan.wait_ready(STEP).await.unwrap(), 8080);
    for want in [
        "env FOO=config BAR=image FLY=demo HOME=/home/app",
        "uid=1000 gid=1000",
        "cwd=/home/app",
        "to-stderr",
    ] {
        assert!(
            g.logs.iter().any(|l| l == want),
            "{want:?} not in {:?}",
            g.logs
        );
    }

    // The file from the machine config, served by the app over the configured network.
    let resp = tokio::task::spawn_blocking(move || http_get(port))
        .await
        .unwrap();
    assert!(
        resp.starts_with("HTTP/1.") && resp.contains(" 200 "),
        "{resp}"
    );
    assert!(resp.ends_with("hello from aloft\n"), "{resp}");

    // exec: pipes, stdin, stderr, exit code; a PTY with its size; a missing program.
    let r = g
        .chan
        .exec(&exec(&["cat", "/etc/hostname"]), STEP)
        .await
        .unwrap();
    assert_eq!((r.code, r.stdout.as_slice()), (Some(0), &b"e2e-app\n"[..]));
    // A generated file covering the image's own is bind-mounted from the boot's tmpfs
    // (the boot writes nothing to the root disk for it).
    let out = sh_stdout(
        &g.chan,
        "cut -d ' ' -f 5 /proc/self/mountinfo; cat /etc/hosts",
    )
    .await;
    for want in ["/.fly", "/etc/hosts"] {
        assert!(
            out.lines().any(|l| l == want),
            "{want} is not a mount point:\n{out}"
        );
    }
    assert!(
        out.contains("e2e-app") && !out.contains("image-hosts"),
        "{out}"
    );
    let mut req = exec(&["sh", "-c", "cat; echo oops >&2; exit 3"]);
    req.stdin = b"abc".to_vec();
    let r = g.chan.exec(&req, STEP).await.unwrap();
    assert_eq!(r.code, Some(3));
    assert_eq!(r.stdout, b"abc");
    assert_eq!(r.stderr, b"oops\n");
    let mut req = exec(&["sh", "-c", "test -t 0 && stty size"]);
    (req.tty, req.rows, req.cols) = (true, 30, 100);
    let r = g.chan.exec(&req, STEP).await.unwrap();
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("30 100"),
        "{r:?}"
    );
    match g.chan.exec(&exec(&["no-such-program"]), STEP).await {
        Err(ChannelError::ExecFailed { message, .. }) => {
            assert!(message.contains("no-such-program"), "{message}")
        }
        other => panic!("expected ExecFailed, got {other:?}"),
    }

    // Addresses, routes, MTU and resolver as configured.
    let net = sh_stdout(
        &g.chan,
        "ip addr show eth0; ip route; ip -6 route; cat /etc/resolv.conf",
    )
    .await;
    for want in [
        "mtu 1400",
        "inet 10.0.2.15/24",
        "inet6 fdaa::2/64",
        "default via 10.0.2.2 dev eth0",
        "default via fdaa::1 dev eth0",
        "nameserver 10.0.2.3",
    ] {
        assert!(net.contains(want), "{want:?} missing from:\n{net}");
    }

    // Binary-safe, megabyte-sized output and input.
    let r = g
        .chan
        .exec(&exec(&["cat", "/bin/busybox"]), STEP)
        .await
        .unwrap();
    assert!(
        r.stdout == std::fs::read("/bin/busybox").unwrap(),
        "busybox bytes differ"
    );
    let mut req = exec(&["wc", "-c"]);
    req.stdin = vec![7u8; 3 << 20];
    let r = g.chan.exec(&req, STEP).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        (3 << 20).to_string()
    );

    // overlay is loaded after the app started.
    let r = g
        .chan
        .exec(&exec(&["cat", "/proc/filesystems"]), STEP)
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("\toverlay\n"),
        "{r:?}"
    );

    // init.swap_size_mb
    let r = g
        .chan
        .exec(&exec(&["cat", "/proc/swaps"]), STEP)
        .await
        .unwrap();
    let swaps = String::from_utf8_lossy(&r.stdout);
    assert!(
        swaps.lines().any(|l| l.starts_with("/swapfile ")),
        "{swaps}"
    );

    // Metadata: from the host, and from the app through /.fly/api.
    assert_eq!(
        g.chan.metadata_get("role", STEP).await.unwrap().as_deref(),
        Some("primary")
    );
    g.chan.metadata_set("color", "blue", STEP).await.unwrap();
    let mut req = exec(&["apireq"]);
    req.stdin = b"GET /v1/metadata/color HTTP/1.0\r\n\r\n".to_vec();
    let r = g.chan.exec(&req, STEP).await.unwrap();
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        text.starts_with("HTTP/1.0 200") && text.ends_with("\r\n\r\nblue"),
        "{r:?}"
    );
    req.stdin = b"POST /v1/metadata/from-app HTTP/1.0\r\nContent-Length: 3\r\n\r\nyes".to_vec();
    let r = g.chan.exec(&req, STEP).await.unwrap();
    assert!(
        String::from_utf8_lossy(&r.stdout).starts_with("HTTP/1.0 204"),
        "{r:?}"
    );
    assert_eq!(
        g.chan
            .metadata_get("from-app", STEP)
            .await
            .unwrap()
            .as_deref(),
        Some("yes")
    );
    g.chan.metadata_delete("from-app", STEP).await.unwrap();
    req.stdin = b"GET /v1/metadata/from-app HTTP/1.0\r\n\r\n".to_vec();
    let r = g.chan.exec(&req, STEP).await.unwrap();
    assert!(
        String::from_utf8_lossy(&r.stdout).starts_with("HTTP/1.0 404"),
        "{r:?}"
    );

    // An agent restart: a new client handshakes again and is served.
    let Guest {
        spec,
        vm,
        chan,
        _work,
        ..
    } = g;
    drop(chan);
    let chan = GuestChannel::connect(vm.ctl_socket(), STEP).await.unwrap();
    let events = chan.events();
    let g = Guest {
        spec,
        vm,
        chan,
        events,
        logs: Vec::new(),
        _work,
    };
    let r = g.chan.exec(&exec(&["echo", "again"]), STEP).await.unwrap();
    assert_eq!(r.stdout, b"again\n");

    // Graceful stop: httpd dies of the signal; the guest reports and powers off.
    let exit = g
        .chan
        .stop(libc_sigterm(), Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(
        exit,
        GuestExit {
            code: None,
            signal: Some(15),
            oom: false
        }
    );
    g.powered_off().await;
}

fn libc_sigterm() -> i32 {
    aloft_types::guest::signal_number("SIGTERM").unwrap()
}

#[tokio::test]
async fn exit_code_oom_and_volume_flushed() {
    let work = tempfile::tempdir().unwrap();
    let vol = work.path().join("vol.ext4");
    empty_ext4(&vol);
    let mut cfg = base_config(
        "e2e-exit",
        &[
            "/bin/sh",
            "-c",
            "echo persisted > /data/hello.txt; (x=0123456789abcdef; while :; do x=$x$x; done); echo survived; exit 7",
        ],
    );
    cfg.volumes.push(VolumeMount {
        name: "data".into(),
        device: "/dev/vdb".into(),
        path: "/data".into(),
        fs: "ext4".into(),
    });
    let mut g = boot(&cfg, VmNetwork::None, vec![vol.clone()], 128).await;
    let exit = g.exit().await;
    assert_eq!(
        exit,
        GuestExit {
            code: Some(7),
            signal: None,
            oom: true
        },
        "logs: {:?}",
        g.logs
    );
    assert!(g.logs.iter().any(|l| l == "survived"), "{:?}", g.logs);
    g.powered_off().await;
    // Written, synced and unmounted before power-off.
    let out = Command::new("debugfs")
        .args(["-R", "cat /hello.txt"])
        .arg(&vol)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "persisted\n");
}

/// Waits until the serial console shows `needle` (the guest echoes app output there).
async fn console_shows(vm: &dyn Vm, needle: &str, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while !vm.console_tail(200).contains(needle) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "console never showed {needle:?}:\n{}",
            vm.console_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn logs_kept_while_host_away_then_power_button_stops_with_kill_signal() {
    let mut cfg = base_config(
        "e2e-button",
        &[
            "/bin/sh",
            "-c",
            "trap 'echo got-int; exit 0' INT; echo armed; \
             (i=0; while [ $i -lt 40 ]; do i=$((i+1)); echo tick $i; sleep 0.1; done) & \
             sleep 1000 & wait",
        ],
    );
    cfg.kill_signal = "SIGINT".into();
    let g = boot(&cfg, VmNetwork::None, vec![], 128).await;
    // The host goes away (agent restart) while the app keeps logging.
    let Guest {
        spec,
        vm,
        chan,
        mut events,
        mut logs,
        _work,
    } = g;
    while !logs.iter().any(|l| l == "armed") {
        match tokio::time::timeout(BOOT, events.recv()).await {
            Ok(Ok(GuestMessage::Log { line, .. })) => logs.push(line),
            Ok(Ok(_)) => {}
            other => panic!(
                "no 'armed' log: {other:?}; console:\n{}",
                vm.console_tail(30)
            ),
        }
    }
    // Lines the host already read off the socket before it went away were delivered:
    // keep them, as the agent would have, by draining the closed channel's buffer.
    drop(chan);
    loop {
        match tokio::time::timeout(STEP, events.recv()).await {
            Ok(Ok(GuestMessage::Log { line, .. })) => logs.push(line),
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) => break,
            Err(_) => panic!("the dropped channel's events never closed"),
        }
    }
    console_shows(vm.as_ref(), "\ntick 8\n", STEP).await;
    let chan = GuestChannel::connect(vm.ctl_socket(), STEP).await.unwrap();
    let events = chan.events();
    let mut g = Guest {
        spec,
        vm,
        chan,
        events,
        logs: Vec::new(),
        _work,
    };
    g.until(
        "tick 8",
        STEP,
        |m| matches!(m, GuestMessage::Log { line, .. } if line == "tick 8"),
    )
    .await;
    let ticks: Vec<&String> = logs
        .iter()
        .chain(&g.logs)
        .filter(|l| l.starts_with("tick "))
        .collect();
    let expected: Vec<String> = (1..=8).map(|i| format!("tick {i}")).collect();
    assert!(
        ticks.len() >= 8 && ticks[..8].iter().zip(&expected).all(|(a, b)| *a == b),
        "log lines lost or reordered while the host was away: {ticks:?}"
    );

    g.vm.powerdown().await.unwrap();
    let exit = g.exit().await;
    assert_eq!(
        exit,
        GuestExit {
            code: Some(0),
            signal: None,
            oom: false
        },
        "logs: {:?}",
        g.logs
    );
    assert!(g.logs.iter().any(|l| l == "got-int"), "{:?}", g.logs);
    g.powered_off().await;
}

#[tokio::test]
async fn suspend_and_resume_keep_the_guest_and_its_channel() {
    // The app also runs on a terminal (init.tty); its output still arrives as lines.
    let mut cfg = base_config(
        "e2e-suspend",
        &[
            "/bin/sh",
            "-c",
            "test -t 1 && echo on-a-tty; exec sleep 1000",
        ],
    );
    cfg.config.init.tty = true;
    let mut g = boot(&cfg, VmNetwork::None, vec![], 128).await;
    g.until(
        "on-a-tty",
        BOOT,
        |m| matches!(m, GuestMessage::Log { line, .. } if line == "on-a-tty"),
    )
    .await;
    let r = g
        .chan
        .exec(&exec(&["sh", "-c", "echo kept > /tmp/marker"]), STEP)
        .await
        .unwrap();
    assert_eq!(r.code, Some(0));
    let state = g.spec.dir.join("suspend.state");
    let Guest {
        spec,
        vm,
        chan,
        _work,
        ..
    } = g;
    drop(chan);
    vm.suspend(&state).await.unwrap();
    assert!(vm.wait_exit(STEP).await);
    let vm = QemuVmm.start(&spec, Some(&state)).await.unwrap();
    vm.finish_resume().await.unwrap();
    let chan = GuestChannel::connect(vm.ctl_socket(), STEP).await.unwrap();
    let events = chan.events();
    let g = Guest {
        spec,
        vm,
        chan,
        events,
        logs: Vec::new(),
        _work,
    };
    // The same guest (its tmpfs survived), not a reboot.
    let r = g
        .chan
        .exec(&exec(&["cat", "/tmp/marker"]), STEP)
        .await
        .unwrap();
    assert_eq!(r.stdout, b"kept\n", "{r:?}");
    assert_eq!(g.chan.state().borrow().init_started_ms, None);
    let exit = g.chan.stop(15, Duration::from_secs(2)).await.unwrap();
    assert_eq!(exit.signal, Some(15));
    g.powered_off().await;
}

#[tokio::test]
async fn bad_run_config_is_reported_and_the_guest_powers_off() {
    let mut json = serde_json::to_value(base_config("e2e-bad", &["/bin/true"])).unwrap();
    json["bogus_field"] = serde_json::json!(1);
    let mut g = boot_raw(
        serde_json::to_vec(&json).unwrap(),
        VmNetwork::None,
        vec![],
        128,
    )
    .await;
    let err = g
        .until("Error", BOOT, |m| matches!(m, GuestMessage::Error { .. }))
        .await;
    let GuestMessage::Error { message } = err else {
        unreachable!()
    };
    assert!(
        message.contains("/run.json") && message.contains("bogus_field"),
        "{message}"
    );
    assert_eq!(
        g.exit().await,
        GuestExit {
            code: None,
            signal: None,
            oom: false
        }
    );
    g.powered_off().await;
}

#[tokio::test]
async fn nothing_to_run_is_a_clear_error() {
    let mut cfg = base_config("e2e-empty", &[]);
    cfg.config.init.cmd = None;
    let mut g = boot(&cfg, VmNetwork::None, vec![], 128).await;
    let err = g
        .until("Error", BOOT, |m| matches!(m, GuestMessage::Error { .. }))
        .await;
    let GuestMessage::Error { message } = err else {
        unreachable!()
    };
    assert!(message.contains("nothing to run"), "{message}");
    assert_eq!(
        g.exit().await,
        GuestExit {
            code: Some(127),
            signal: None,
            oom: false
        }
    );
    g.powered_off().await;
}

#[tokio::test]
async fn ignored_stop_signal_is_followed_by_sigkill_and_orphans_are_reaped_and_volumes_persist() {
    let work = tempfile::tempdir().unwrap();
    let vol = work.path().join("vol.ext4");
    empty_ext4(&vol);
    // The app ignores SIGINT/SIGTERM and leaves orphans behind (children whose parent
    // exits at once), which PID 1 must reap.
    let mut cfg = base_config(
        "e2e-ignore",
        &[
            "/bin/sh",
            "-c",
            "trap '' INT TERM; echo boot >> /data/boots; for i in 1 2 3 4 5; do sh -c 'sleep 0.2 &'; done; echo started; while :; do sleep 1; done",
        ],
    );
    cfg.kill_timeout_ms = 1500;
    cfg.volumes.push(VolumeMount {
        name: "data".into(),
        device: "/dev/vdb".into(),
        path: "/data".into(),
        fs: "ext4".into(),
    });
    let mut g = boot(&cfg, VmNetwork::None, vec![vol.clone()], 128).await;
    g.until(
        "app output",
        STEP,
        |m| matches!(m, GuestMessage::Log { line, .. } if line == "started"),
    )
    .await;
    // Give the orphans time to exit, then look for zombies.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let ps = g
        .chan
        .exec(&exec(&["/bin/busybox", "ps", "-o", "stat,comm"]), STEP)
        .await
        .unwrap();
    let listing = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !listing.lines().any(|l| l.trim_start().starts_with('Z')),
        "zombies left:\n{listing}"
    );
    // A graceful stop with SIGINT: ignored, so SIGKILL after kill_timeout.
    let started = std::time::Instant::now();
    let exit = g
        .chan
        .stop(
            aloft_types::guest::signal_number("SIGINT").unwrap(),
            Duration::from_millis(1500),
        )
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    assert!(
        took >= Duration::from_millis(1400),
        "killed too early: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "killed too late: {took:?}");
    g.powered_off().await;

    // The volume keeps its data across a second boot of the machine.
    let mut g2 = boot(&cfg, VmNetwork::None, vec![vol.clone()], 128).await;
    g2.until(
        "app output",
        STEP,
        |m| matches!(m, GuestMessage::Log { line, .. } if line == "started"),
    )
    .await;
    let out = g2
        .chan
        .exec(&exec(&["/bin/busybox", "cat", "/data/boots"]), STEP)
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "boot\nboot\n");
    g2.vm.kill();
    g2.vm.wait_exit(STEP).await;
}
