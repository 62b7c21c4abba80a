//! Private networking in TAP mode (root): each machine gets a routed TAP with private
//! IPv6/IPv4 addresses; machines of one organisation reach each other, machines of
//! different organisations cannot; the host reaches every machine; destroy removes
//! the TAP.

use std::sync::Arc;
use std::time::Duration;

use aloft_agent::{Agent, AgentApi, AgentConfig, CreateMachine, net};
use aloft_store::{SqliteStore, Store};
use aloft_testkit::{BusyboxHttpd, agent_config, web_machine_config};
use aloft_vmm::QemuVmm;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organisations_are_isolated_on_the_private_network() {
    assert!(is_root(), "TAP networking needs root (CI runs as root)");
    let work = tempfile::tempdir().unwrap();
    let data = work.path();
    let digest = BusyboxHttpd::new("net:v1")
        .page("private hello\n")
        .quiet()
        .import(data, &data.join("images"))
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(data.join("catalog.db")).await.unwrap());
    // A host id unique to this run, so parallel runs do not share TAP names.
    let host = format!("nettest-{}", std::process::id());
    let cfg = AgentConfig {
        host_id: host.clone(),
        ..agent_config(data).expect("static guest init")
    };
    let agent = Agent::open_with_network(cfg, store, Arc::new(QemuVmm), true)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for (app, org) in [("a1", "acme"), ("a2", "acme"), ("b1", "globex")] {
        let m = agent
            .create_machine(CreateMachine {
                app: app.into(),
                org: org.into(),
                config: web_machine_config(&digest, 96),
                ..Default::default()
            })
            .await
            .unwrap();
        ids.push((app, org, m.id));
    }
    let ip = |i: usize| net::machine_net(&host, ids[i].1, (i + 1) as u16);
    // The host reaches a machine at its private IPv4.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ok = tokio::net::TcpStream::connect((ip(0).ipv4.as_str(), 8080))
            .await
            .is_ok();
        if ok {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "host cannot reach {}",
            ip(0).ipv4
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fetch = |from: usize, to: String| {
        let agent = agent.clone();
        let (app, _, id) = ids[from].clone();
        async move {
            let cmd = format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {to} 8080");
            agent
                .exec(
                    app,
                    &id,
                    vec!["/bin/sh".into(), "-c".into(), cmd],
                    Duration::from_secs(20),
                )
                .await
                .unwrap()
        }
    };
    // Same organisation, over IPv4 and IPv6: reachable.
    let same4 = fetch(0, ip(1).ipv4.clone()).await;
    assert!(
        same4.stdout.contains("private hello"),
        "a1 -> a2 (v4): {same4:?}"
    );
    let same6 = fetch(0, ip(1).ipv6.clone()).await;
    assert!(
        same6.stdout.contains("private hello"),
        "a1 -> a2 (v6): {same6:?}"
    );
    // Another organisation: not reachable, either way.
    let other = fetch(0, ip(2).ipv4.clone()).await;
    assert!(
        !other.stdout.contains("private hello"),
        "a1 -> b1 must fail: {other:?}"
    );
    let back = fetch(2, ip(0).ipv6.clone()).await;
    assert!(
        !back.stdout.contains("private hello"),
        "b1 -> a1 must fail: {back:?}"
    );

    for (app, _, id) in &ids {
        agent.destroy_machine(app, id, true, None).await.unwrap();
    }
    let links = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    let tap_prefix = &ip(0).tap[..7];
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(tap_prefix),
        "TAPs left behind"
    );
}
