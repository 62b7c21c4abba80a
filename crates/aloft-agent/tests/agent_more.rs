//! The agent's health, memory, process and volume-snapshot operations against real
//! QEMU (TCG here) and the real guest init, on one machine with one volume: a command
//! check passes with its output kept, `ps` lists the app with its listening socket, the
//! balloon reclaims memory and sets a limit, a snapshot of the attached volume is taken
//! while the machine keeps running and restores into a new volume, a cordoned machine
//! is published as such and keeps serving, and a command check failing three times in a
//! row restarts the machine (`unhealthy = "restart"`) with an event saying why, and a
//! suspend file QEMU cannot load makes the next start a fresh boot instead of a failure.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use aloft_agent::{Agent, AgentApi, AgentError, CreateMachine, CreateVolume};
use aloft_image::{ImageConfig, ImageStore};
use aloft_store::{SqliteStore, Store};
use aloft_types::catalog::MachineRecord;
use aloft_types::machine::{
    CheckStatus, MachineCheck, MachineConfig, MachineGuest, MachineInit, MachineMount, MachinePort,
    MachineRestart, MachineService, MachineState,
};
use aloft_vmm::QemuVmm;

const APP: &str = "more";

/// A busybox image with /www to serve, imported into the agent's image store.
fn busybox_image(data: &Path) -> String {
    let root = data.join("tree");
    for d in ["bin", "www", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static (cargo xtask setup)");
    // No `sync` in the image: the snapshot's flush is init's own.
    for link in ["sh", "cat", "rm"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(link)).unwrap();
    }
    std::fs::write(root.join("www/index.html"), "hello from aloft\n").unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    let config = ImageConfig {
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    };
    let layout = data.join("layout");
    aloft_image::pack_dir(&root, &config, "more:v1", &layout).unwrap();
    let store = ImageStore::open(data.join("images")).unwrap();
    let imported = aloft_image::import(&store, &layout, &aloft_image::no_progress()).unwrap();
    imported.record.digest
}

async fn agent(data: &Path, store: Arc<dyn Store>) -> Agent {
    let cfg = aloft_testkit::agent_config(data).expect("static guest init");
    Agent::open(cfg, store, Arc::new(QemuVmm)).await.unwrap()
}

/// httpd on 8080 that marks itself healthy at boot; `alive` is a command check that
/// reads the mark and restarts the machine after 3 failures in a row.
fn config(image: &str, volume: &str) -> MachineConfig {
    MachineConfig {
        image: image.to_string(),
        guest: Some(MachineGuest {
            cpu_kind: "shared".into(),
            cpus: 1,
            memory_mb: 128,
            ..Default::default()
        }),
        init: MachineInit {
            cmd: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo fine > /tmp/healthy; exec /bin/busybox httpd -f -p 8080 -h /www".into(),
            ]),
            ..Default::default()
        },
        services: vec![MachineService {
            protocol: "tcp".into(),
            internal_port: 8080,
            ports: vec![MachinePort {
                port: Some(80),
                handlers: vec!["http".into()],
                ..Default::default()
            }],
            ..Default::default()
        }],
        checks: [(
            "alive".to_string(),
            MachineCheck {
                kind: Some("exec".into()),
                command: vec!["/bin/cat".into(), "/tmp/healthy".into()],
                interval: Some("1s".into()),
                timeout: Some("10s".into()),
                failure_threshold: Some(3),
                unhealthy: Some("restart".into()),
                ..Default::default()
            },
        )]
        .into(),
        mounts: vec![MachineMount {
            volume: volume.to_string(),
            path: "/data".into(),
            ..Default::default()
        }],
        // One restart in the budget, for unhealthy restarts too.
        restart: Some(MachineRestart {
            policy: "no".into(),
            max_retries: 1,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn record(store: &Arc<dyn Store>, id: &str) -> MachineRecord {
    let v = store
        .get(&aloft_types::catalog::machine_key(APP, id))
        .await
        .unwrap()
        .expect("machine published");
    serde_json::from_slice(&v.value).unwrap()
}

fn http_get(port: u16) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Polls `probe` (a cheap read of agent state) until it gives a value or `secs` pass.
async fn eventually<T, F, Fut>(what: &str, secs: u64, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn check(a: &Agent, id: &str) -> Option<CheckStatus> {
    let m = a.get_machine(APP, id).await.ok()?;
    m.checks.into_iter().find(|c| c.name == "alive")
}

async fn sh(a: &Agent, id: &str, script: &str) -> String {
    let out = a
        .exec(
            APP,
            id,
            vec!["/bin/sh".into(), "-c".into(), script.into()],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{script}: {out:?}");
    out.stdout
}

/// The content of `/f` in an ext4 image, read on the host (journal replayed first).
fn read_in_image(image: &Path) -> String {
    let copy = image.with_extension("check");
    std::fs::copy(image, &copy).unwrap();
    let _ = Command::new("e2fsck").args(["-fy"]).arg(&copy).output();
    let out = Command::new("debugfs")
        .args(["-R", "cat /f"])
        .arg(&copy)
        .output()
        .expect("debugfs (e2fsprogs)");
    std::fs::remove_file(&copy).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_ps_memory_snapshots_cordon_and_unhealthy_restart() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path();
    let image = busybox_image(data);
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(data.join("catalog.db")).await.unwrap());
    let a = agent(data, store.clone()).await;

    let vol = a
        .create_volume(CreateVolume {
            app: APP.into(),
            name: "data".into(),
            size_gb: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let m = a
        .create_machine(CreateMachine {
            app: APP.into(),
            config: config(&image, &vol.id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(m.state, MachineState::Started);
    let id = m.id.clone();
    let port: u16 = record(&store, &id).await.addresses[0]
        .address
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();

    // 1. The command check passes, keeps its output, and is published.
    let c = eventually("alive passing", 60, || async {
        check(&a, &id).await.filter(|c| c.status == "passing")
    })
    .await;
    assert_eq!(c.output, "fine");
    let published = eventually("check published", 10, || async {
        let r = record(&store, &id).await;
        r.machine
            .checks
            .iter()
            .any(|c| c.name == "alive")
            .then_some(r)
    })
    .await;
    assert_eq!(published.machine.checks[0].status, "passing");

    // 2. ps: init and the app, with the app's listening socket.
    let t0 = std::time::Instant::now();
    let ps = a.machine_ps(APP, &id).await.unwrap();
    eprintln!("figure: ps of {} processes in {:?}", ps.len(), t0.elapsed());
    assert!(ps.iter().any(|p| p.pid == 1), "{ps:#?}");
    let httpd = ps
        .iter()
        .find(|p| p.command.contains("httpd"))
        .unwrap_or_else(|| panic!("no httpd in {ps:#?}"));
    assert!(
        httpd
            .listen_sockets
            .iter()
            .any(|s| s.address.ends_with(":8080")),
        "{httpd:?}"
    );
    assert!(
        httpd.rss > 0 && httpd.directory.starts_with('/'),
        "{httpd:?}"
    );

    // 3. Memory: the balloon reclaims and gives back; a limit holds; bad limits fail.
    let mem = a.get_memory(APP, &id).await.unwrap();
    assert_eq!(mem.limit_mb, 128, "{mem:?}");
    assert!(mem.available_mb > 0 && mem.available_mb < 128, "{mem:?}");
    let t0 = std::time::Instant::now();
    let reclaimed = a.reclaim_memory(APP, &id, 32).await.unwrap();
    eprintln!(
        "figure: reclaimed {reclaimed} of 32 MB in {:?}",
        t0.elapsed()
    );
    assert!((16..=32).contains(&reclaimed), "reclaimed {reclaimed} MB");
    assert_eq!(a.get_memory(APP, &id).await.unwrap().limit_mb, 128);
    let limited = a.set_memory_limit(APP, &id, 96).await.unwrap();
    assert!((96..=97).contains(&limited.limit_mb), "{limited:?}");
    assert!(matches!(
        a.set_memory_limit(APP, &id, 4096).await,
        Err(AgentError::Invalid { .. })
    ));
    assert_eq!(
        a.set_memory_limit(APP, &id, 128).await.unwrap().limit_mb,
        128
    );

    // 4. Snapshot of the attached volume while the machine runs; restore it.
    // Not synced by the app: the snapshot's guest flush must carry it.
    sh(&a, &id, "echo v1 > /data/f").await;
    let pid_before =
        std::fs::read_to_string(data.join("machines").join(&id).join("qemu.pid")).unwrap();
    let t0 = std::time::Instant::now();
    let snap = a.create_volume_snapshot(APP, &vol.id).await.unwrap();
    eprintln!(
        "figure: snapshot of a 1 GiB volume ({} bytes used) in {:?}",
        snap.size,
        t0.elapsed()
    );
    assert_eq!(snap.status, "created");
    assert_eq!(snap.volume_size, 1 << 30);
    assert!(
        snap.size > 0 && snap.size < snap.volume_size,
        "sparse: {snap:?}"
    );
    assert_eq!(
        a.get_machine(APP, &id).await.unwrap().state,
        MachineState::Started
    );
    assert!(http_get(port).unwrap().contains("hello from aloft"));
    sh(&a, &id, "echo v2 > /data/f").await;
    let snaps = a.list_volume_snapshots(APP, &vol.id).await.unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].id, snap.id);
    let restored = a
        .create_volume(CreateVolume {
            app: APP.into(),
            name: "restored".into(),
            size_gb: 2,
            snapshot_id: Some(snap.id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(restored.size_gb, 2);
    let restored_file = data.join("volumes").join(format!("{}.ext4", restored.id));
    assert_eq!(std::fs::metadata(&restored_file).unwrap().len(), 2 << 30);
    assert_eq!(read_in_image(&restored_file), "v1");
    assert!(matches!(
        a.create_volume(CreateVolume {
            app: APP.into(),
            name: "nope".into(),
            size_gb: 1,
            snapshot_id: Some("vs_missing".into()),
            ..Default::default()
        })
        .await,
        Err(AgentError::NotFound { .. })
    ));

    // 5. Cordon: published as cordoned, still started and serving; uncordon clears it.
    a.cordon_machine(APP, &id, true).await.unwrap();
    let r = record(&store, &id).await;
    assert!(r.machine.cordoned);
    assert_eq!(r.machine.state, MachineState::Started);
    assert!(http_get(port).unwrap().contains("hello from aloft"));
    a.cordon_machine(APP, &id, false).await.unwrap();
    assert!(!record(&store, &id).await.machine.cordoned);

    // 6. The check fails (output kept), three times in a row: the agent restarts the
    //    machine and says why; the new boot is healthy again.
    sh(&a, &id, "rm /tmp/healthy").await;
    let failing = eventually("alive critical", 30, || async {
        check(&a, &id).await.filter(|c| c.status == "critical")
    })
    .await;
    assert!(failing.output.contains("exit code 1"), "{failing:?}");
    let restart = eventually("unhealthy restart event", 60, || async {
        a.machine_events(APP, &id)
            .await
            .ok()?
            .into_iter()
            .find(|e| e.kind == "restart" && e.source == "flyd")
    })
    .await;
    let detail = restart.request.unwrap();
    assert_eq!(detail["reason"], "unhealthy");
    assert!(
        detail["detail"]
            .as_str()
            .unwrap()
            .contains("alive failed 3 times in a row"),
        "{detail}"
    );
    eventually("healthy after the restart", 90, || async {
        let m = a.get_machine(APP, &id).await.ok()?;
        let c = check(&a, &id).await?;
        (m.state == MachineState::Started && c.status == "passing").then_some(())
    })
    .await;
    let pid_after =
        std::fs::read_to_string(data.join("machines").join(&id).join("qemu.pid")).unwrap();
    assert_ne!(pid_before, pid_after, "a new VM after the restart");
    // The volume survived the restart.
    assert_eq!(sh(&a, &id, "cat /data/f").await.trim(), "v2");
    // Failing again with the restart budget (max_retries = 1) used: reported, logged,
    // not restarted.
    sh(&a, &id, "rm /tmp/healthy").await;
    eventually("restart refused", 60, || async {
        let logs = a.logs(APP, &id, None).await.ok()?;
        logs.iter()
            .any(|l| l.stream == "system" && l.message.contains("not restarting: 1 restarts used"))
            .then_some(())
    })
    .await;
    let restarts = a.machine_events(APP, &id).await.unwrap();
    assert_eq!(
        restarts.iter().filter(|e| e.kind == "restart").count(),
        1,
        "{restarts:#?}"
    );
    assert_eq!(
        a.get_machine(APP, &id).await.unwrap().state,
        MachineState::Started
    );
    assert_eq!(
        std::fs::read_to_string(data.join("machines").join(&id).join("qemu.pid")).unwrap(),
        pid_after
    );

    // 7. A suspend file QEMU cannot load does not strand the machine: the start boots
    //    it fresh from its disk, drops the file and says why.
    a.suspend_machine(APP, &id, None).await.unwrap();
    let state_file = data
        .join("machines")
        .join(&id)
        .join(aloft_vmm::VmFiles::STATE);
    assert!(state_file.exists(), "suspended without a state file");
    std::fs::write(&state_file, b"not a QEMU migration stream").unwrap();
    let started = a.start_machine(APP, &id, None).await.unwrap();
    assert_eq!(started.state, MachineState::Started);
    assert!(!state_file.exists(), "the damaged state file is kept");
    assert!(http_get(port).unwrap().contains("hello from aloft"));
    let logs = a.logs(APP, &id, None).await.unwrap();
    assert!(
        logs.iter()
            .any(|l| l.stream == "system" && l.message.contains("resume failed")),
        "{logs:#?}"
    );

    // 8. A restarted agent drops snapshot files no record names (a copy cut short by
    //    a crash), keeps the others; snapshots go with their volume.
    a.destroy_machine(APP, &id, true, None).await.unwrap();
    let snap_dir = data.join("snapshots").join(&vol.id);
    let stray = snap_dir.join("vs_cut_short.ext4.tmp");
    std::fs::write(&stray, b"partial").unwrap();
    drop(a);
    let a = agent(data, store.clone()).await;
    assert!(!stray.exists());
    assert!(snap_dir.join(format!("{}.ext4", snap.id)).exists());
    a.destroy_volume(APP, &vol.id).await.unwrap();
    assert!(!data.join("snapshots").join(&vol.id).exists());
    a.destroy_volume(APP, &restored.id).await.unwrap();
    assert!(matches!(
        a.machine_ps(APP, &id).await,
        Err(AgentError::NotFound { .. })
    ));
}
