//! The API over two real `aloft_agent::Agent`s (own databases, image stores and data
//! directories, one shared catalog) for everything that needs no VM: machines created
//! with `skip_launch`, routing by the agents' published records, secrets handed to the
//! agent, metadata, leases, cordon, destroy, and volumes. Booting is the agent's own
//! VM tests' business.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aloft_agent::{Agent, AgentApi, AgentConfig};
use aloft_api::Role;
use aloft_store::{SqliteStore, Store};
use aloft_types::catalog::{MachineRecord, machine_key};
use axum::http::{Method, StatusCode};
use common::TestApi;

/// A one-file image, imported into the image store under `dir`; returns its reference.
fn tiny_image(dir: &Path) -> String {
    let root = dir.join("tree");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hello"), "hello\n").unwrap();
    let config = aloft_image::ImageConfig {
        cmd: Some(vec!["/bin/true".into()]),
        ..Default::default()
    };
    let layout = dir.join("layout");
    aloft_image::pack_dir(&root, &config, "tiny:v1", &layout).unwrap();
    let store = aloft_image::ImageStore::open(dir.join("images")).unwrap();
    aloft_image::import(&store, &layout, &aloft_image::no_progress()).unwrap();
    "tiny:v1".into()
}

async fn agent(dir: &Path, host: &str, region: &str, store: Arc<dyn Store>) -> Agent {
    std::fs::create_dir_all(dir).unwrap();
    tiny_image(dir);
    let cfg = AgentConfig {
        host_id: host.into(),
        region: region.into(),
        data_dir: dir.to_path_buf(),
        kernel_dir: dir.join("kernel"),
        init_bin: dir.join("aloft-init"),
        memory_mb_total: 2048,
        cpus_total: 2,
        accel: aloft_vmm::Accel::Auto,
        forward_addr: "127.0.0.1".into(),
        pull: Default::default(),
        tcg_tb_size_mb: Some(aloft_vmm::qemu::DEFAULT_TCG_TB_SIZE_MB),
    };
    Agent::open(cfg, store, Arc::new(aloft_vmm::QemuVmm))
        .await
        .unwrap()
}

#[tokio::test]
async fn api_drives_real_agents_without_vms() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(dir.path().join("catalog.db"))
            .await
            .unwrap(),
    );
    let ams = agent(&dir.path().join("h-ams"), "h-ams", "ams", store.clone()).await;
    let iad = agent(&dir.path().join("h-iad"), "h-iad", "iad", store.clone()).await;
    let agents: Vec<Arc<dyn AgentApi>> = vec![Arc::new(ams.clone()), Arc::new(iad.clone())];
    let api_dir = tempfile::tempdir().unwrap();
    let t = TestApi::with_agents(api_dir, store.clone(), agents).await;
    t.create_app("real").await;
    let tok = t.token(Some("real"), Role::Deploy).await;
    let r = t
        .call(
            Method::POST,
            "/v1/apps/real/secrets",
            Some(&tok),
            Some(r#"{"values":{"TOKEN":"s3cr3t-value"}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    let r = t
        .create_machine(
            "real",
            &tok,
            r#"{"region":"iad","skip_launch":true,"config":{"image":"tiny:v1","guest":{"memory_mb":256},"metadata":{"role":"db"}}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["state"], "created");
    assert_eq!(r.body["region"], "iad");
    let id = r.body["id"].as_str().unwrap().to_string();
    let base = format!("/v1/apps/real/machines/{id}");

    // The owning agent publishes the machine; the API routes by that record.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let rec: MachineRecord = loop {
        if let Some(e) = store.get(&machine_key("real", &id)).await.unwrap() {
            break serde_json::from_slice(&e.value).unwrap();
        }
        let mut w = store.watch("machines/real/", 0).await.unwrap();
        if store
            .get(&machine_key("real", &id))
            .await
            .unwrap()
            .is_none()
        {
            tokio::time::timeout_at(deadline, w.next())
                .await
                .expect("machine record never published");
        }
    };
    assert_eq!(rec.host, "h-iad");

    let r = t.call(Method::GET, &base, Some(&tok), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["config"]["image"], "tiny:v1");
    let r = t
        .call(
            Method::GET,
            "/v1/apps/real/machines?state=created&region=iad",
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 1, "{}", r.body);
    let r = t
        .call(
            Method::GET,
            &format!("{base}/wait?state=settled&timeout=5"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["state"], "created");

    // Metadata, leases (409 without the nonce), cordon.
    let r = t
        .call(
            Method::POST,
            &format!("{base}/metadata/tier"),
            Some(&tok),
            Some(r#"{"value":"gold"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let r = t
        .call(Method::GET, &format!("{base}/metadata"), Some(&tok), None)
        .await;
    assert_eq!(r.body["tier"], "gold", "{}", r.body);
    let r = t
        .call(
            Method::POST,
            &format!("{base}/lease"),
            Some(&tok),
            Some(r#"{"ttl":30}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let nonce = r.body["nonce"].as_str().unwrap().to_string();
    let r = t
        .call(
            Method::POST,
            &format!("{base}/lease"),
            Some(&tok),
            Some(r#"{"ttl":30}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = t.call(Method::DELETE, &base, Some(&tok), None).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = t
        .call(Method::POST, &format!("{base}/cordon"), Some(&tok), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // A wrong image is a 400 naming config.image; an impossible region a 400.
    let r = t
        .create_machine(
            "real",
            &tok,
            r#"{"skip_launch":true,"config":{"image":"127.0.0.1:1/nope:v1"}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(
        r.body["error"].as_str().unwrap().contains("config.image"),
        "{}",
        r.body
    );

    // Volumes on the real agent.
    let r = t
        .call(
            Method::POST,
            "/v1/apps/real/volumes",
            Some(&tok),
            Some(r#"{"name":"data","size_gb":1,"region":"ams"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let vol = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(ams.list_volumes("real").await.unwrap().len(), 1);
    let r = t
        .call(
            Method::PUT,
            &format!("/v1/apps/real/volumes/{vol}/extend"),
            Some(&tok),
            Some(r#"{"size_gb":2}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["volume"]["size_gb"], 2);
    let r = t
        .call(
            Method::DELETE,
            &format!("/v1/apps/real/volumes/{vol}"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // Destroy with the lease nonce.
    let r = t
        .call_with(
            Method::DELETE,
            &base,
            Some(&tok),
            None,
            &[("fly-machine-lease-nonce", &nonce)],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = t
        .call(
            Method::GET,
            &format!("{base}/wait?state=destroyed&timeout=10"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = t
        .call(Method::GET, "/v1/apps/real/machines", Some(&tok), None)
        .await;
    assert_eq!(r.body, serde_json::json!([]));

    // The secret never reached the catalog's files in clear (database and WAL).
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let p = f.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("catalog.db")
        {
            let bytes = std::fs::read(&p).unwrap();
            assert!(
                !bytes.windows(12).any(|w| w == b"s3cr3t-value"),
                "plaintext secret in {}",
                p.display()
            );
        }
    }
}
