//! The agent against real QEMU (TCG here) and the real guest init: create → HTTP
//! through the port forward → exec → logs → stop/start → agent restart without VM
//! restart → destroy leaving nothing; restart policy on-failure ending `failed`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aloft_agent::{Agent, AgentApi, CreateMachine, StopOptions, WaitFor};
use aloft_store::{SqliteStore, Store};
use aloft_testkit::{BusyboxHttpd, agent_config, web_machine_config};
use aloft_types::machine::{MachineConfig, MachineInit, MachineRestart, MachineState};
use aloft_vmm::QemuVmm;

/// A busybox image serving /www on port 8080, imported into the agent's image store.
fn busybox_image(data: &Path) -> String {
    BusyboxHttpd::new("hello:v1")
        .import(data, &data.join("images"))
        .expect("busybox image (busybox-static: cargo xtask setup)")
}

async fn agent(data: &Path, store: Arc<dyn Store>) -> Agent {
    let cfg = agent_config(data).expect("static guest init");
    Agent::open(cfg, store, Arc::new(QemuVmm)).await.unwrap()
}

fn web_config(image: &str) -> MachineConfig {
    web_machine_config(image, 128)
}

fn http_get(port: u16) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

async fn forward_port(store: &Arc<dyn Store>, app: &str, id: &str) -> u16 {
    let v = store
        .get(&aloft_types::catalog::machine_key(app, id))
        .await
        .unwrap()
        .expect("machine published");
    let rec: aloft_types::catalog::MachineRecord = serde_json::from_slice(&v.value).unwrap();
    rec.addresses[0]
        .address
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

async fn http_eventually(port: u16) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(body) = http_get(port)
            && body.contains("200")
        {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no HTTP answer on {port}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn qemu_running_in(dir: &Path) -> bool {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &dir.display().to_string()])
        .output()
        .unwrap();
    !out.stdout.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_lifecycle_survives_agent_restart() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path();
    let image = busybox_image(data);
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(data.join("catalog.db")).await.unwrap());
    let a = agent(data, store.clone()).await;

    let mut config = web_config(&image);
    config.env = BTreeMap::from([("GREETING".to_string(), "hi".to_string())]);
    let m = a
        .create_machine(CreateMachine {
            app: "web".into(),
            config,
            secrets: BTreeMap::from([("API_KEY".to_string(), "s3cret".to_string())]),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(m.state, MachineState::Started);
    let port = forward_port(&store, "web", &m.id).await;
    assert!(http_eventually(port).await.contains("hello from aloft"));

    let out = a
        .exec(
            "web",
            &m.id,
            vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo $GREETING $API_KEY $FLY_APP_NAME $FLY_REGION".into(),
            ],
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), "hi s3cret web ams");

    // The request above is in the app's log (busybox httpd -v logs to stderr).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let logs = a.logs("web", &m.id, None).await.unwrap();
        if logs.iter().any(|l| l.message.contains("response:200")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no request log: {logs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Agent restart: the VM keeps running and is re-attached, not restarted.
    let dir = data.join("machines").join(&m.id);
    let pid: i32 = std::fs::read_to_string(dir.join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    a.detach_all().await;
    drop(a);
    let a = agent(data, store.clone()).await;
    assert_eq!(a.running_count().await, 1);
    let again = a.get_machine("web", &m.id).await.unwrap();
    assert_eq!(again.state, MachineState::Started);
    let pid2: i32 = std::fs::read_to_string(dir.join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, pid2, "the VM was restarted");
    assert!(http_eventually(port).await.contains("hello from aloft"));
    // Logs written before the restart are still readable.
    assert!(!a.logs("web", &m.id, None).await.unwrap().is_empty());

    let stopped = a
        .stop_machine("web", &m.id, StopOptions::default(), None)
        .await
        .unwrap();
    assert_eq!(stopped.state, MachineState::Stopped);
    assert!(!qemu_running_in(&dir));
    let started = a.start_machine("web", &m.id, None).await.unwrap();
    assert_eq!(started.state, MachineState::Started);
    assert!(http_eventually(port).await.contains("hello from aloft"));

    // Destroy without force refuses a running machine; with force leaves nothing.
    assert!(a.destroy_machine("web", &m.id, false, None).await.is_err());
    a.destroy_machine("web", &m.id, true, None).await.unwrap();
    assert!(!qemu_running_in(&dir));
    assert!(!dir.exists());
    assert!(
        store
            .get(&aloft_types::catalog::machine_key("web", &m.id))
            .await
            .unwrap()
            .is_none()
    );
    assert!(a.get_machine("web", &m.id).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_restarts_then_fails_with_events() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path();
    let image = busybox_image(data);
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(data.join("catalog.db")).await.unwrap());
    let a = agent(data, store.clone()).await;
    let mut config = web_config(&image);
    config.services.clear();
    config.init = MachineInit {
        cmd: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo failing; exit 3".into(),
        ]),
        ..Default::default()
    };
    config.restart = Some(MachineRestart {
        policy: "on-failure".into(),
        max_retries: 2,
        ..Default::default()
    });
    let m = a
        .create_machine(CreateMachine {
            app: "job".into(),
            config,
            ..Default::default()
        })
        .await
        .unwrap();
    let state = a
        .wait_machine(
            "job",
            &m.id,
            WaitFor {
                states: vec!["failed".into()],
                instance_id: None,
                timeout: Duration::from_secs(120),
            },
        )
        .await
        .unwrap();
    assert_eq!(state, MachineState::Failed);
    let events = a.machine_events("job", &m.id).await.unwrap();
    let exits: Vec<_> = events.iter().filter(|e| e.kind == "exit").collect();
    assert_eq!(exits.len(), 3, "first run + 2 retries: {events:#?}");
    assert_eq!(
        exits[0].request.as_ref().unwrap()["exit_event"]["exit_code"],
        3
    );
    assert_eq!(events.iter().filter(|e| e.kind == "restart").count(), 2);
    let logs = a.logs("job", &m.id, None).await.unwrap();
    assert!(
        logs.iter().filter(|l| l.message == "failing").count() >= 3,
        "{logs:?}"
    );
    a.destroy_machine("job", &m.id, true, None).await.unwrap();
}
