//! ACME issuance against a real CA: Debian's `pebble` on loopback, its names resolved
//! by `pebble-challtestsrv` (every name → 127.0.0.1), validating against the proxy's
//! own listener (pebble's `httpPort` is the proxy's port). Validation is real:
//! PEBBLE_VA_ALWAYS_VALID is not set.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use aloft_proxy::acme::{AcmeConfig, AcmeWorker, Challenges};
use aloft_proxy::{Listener, ProxyConfig, Routes};
use aloft_store::{SqliteStore, Store};
use aloft_types::catalog::{
    ACME_ACCOUNT_KEY, ACME_CHALLENGES_PREFIX, CertRecord, CertStatus, cert_key,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(90);

fn require(bin: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(bin);
        if p.exists() {
            return p;
        }
    }
    panic!("{bin} is not installed: run `cargo xtask setup` (apt package pebble)");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the child when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// Waits until the child prints a line containing `needle` (stdout or stderr).
async fn wait_for_line(child: &mut Child, needle: &str, what: &str) {
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for r in [
        Box::new(out) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(err),
    ] {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send(l);
            }
        });
    }
    drop(tx);
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(l) = rx.recv().await {
            let hit = l.contains(needle);
            seen.push(l);
            if hit {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(found, Ok(true)),
        "{what} did not print {needle:?}; output:\n{}",
        seen.join("\n")
    );
    // Keep draining (shown with a failing test's output).
    let what = what.to_string();
    tokio::spawn(async move {
        while let Some(l) = rx.recv().await {
            eprintln!("[{what}] {l}");
        }
    });
}

/// A test CA and a certificate for 127.0.0.1 signed by it (pebble's HTTPS listener).
struct TestPki {
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
}

fn test_pki(dir: &Path) -> TestPki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "aloft test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let pki = TestPki {
        ca_file: dir.join("ca.pem"),
        cert_file: dir.join("cert.pem"),
        key_file: dir.join("key.pem"),
    };
    std::fs::write(&pki.ca_file, ca_cert.pem()).unwrap();
    std::fs::write(&pki.cert_file, cert.pem()).unwrap();
    std::fs::write(&pki.key_file, key.serialize_pem()).unwrap();
    pki
}

/// pebble and its DNS, validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`.
struct Pebble {
    directory: String,
    management: String,
    pki: TestPki,
    _dns: Proc,
    _ca: Proc,
}

async fn start_pebble(dir: &Path, http_port: u16, tls_port: u16) -> Pebble {
    let pebble = require("pebble");
    let challtestsrv = require("pebble-challtestsrv");
    let pki = test_pki(dir);
    let dns_port = free_udp_port();
    let mut dns = Command::new(challtestsrv)
        .args([
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
            "-dns01",
            &format!("127.0.0.1:{dns_port}"),
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for_line(
        &mut dns,
        "Starting challenge servers",
        "pebble-challtestsrv",
    )
    .await;

    let (port, mport) = (free_port(), free_port());
    let config = serde_json::json!({
        "pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{mport}"),
            "certificate": pki.cert_file,
            "privateKey": pki.key_file,
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false
        }
    });
    let config_file = dir.join("pebble.json");
    std::fs::write(&config_file, config.to_string()).unwrap();
    let mut ca = Command::new(pebble)
        .arg("-config")
        .arg(&config_file)
        .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .env("PEBBLE_AUTHZREUSE", "0")
        .env_remove("PEBBLE_VA_ALWAYS_VALID")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for_line(&mut ca, "ACME directory available at", "pebble").await;
    Pebble {
        directory: format!("https://127.0.0.1:{port}/dir"),
        management: format!("https://127.0.0.1:{mport}"),
        pki,
        _dns: Proc(dns),
        _ca: Proc(ca),
    }
}

impl Pebble {
    /// The root that signs pebble's issuing chain (regenerated per run).
    async fn issuing_root(&self) -> Vec<u8> {
        let ca = std::fs::read(&self.pki.ca_file).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .build()
            .unwrap();
        let pem = client
            .get(format!("{}/roots/0", self.management))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .bytes()
            .await
            .unwrap();
        pem.to_vec()
    }
}

/// A proxy on `listener` answering HTTP-01 from `challenges` (when given).
fn start_proxy(
    listener: tokio::net::TcpListener,
    challenges: Option<Arc<Challenges>>,
) -> tokio::sync::oneshot::Sender<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let cfg = ProxyConfig {
        acme_challenges: challenges,
        ..ProxyConfig::default()
    };
    tokio::spawn(aloft_proxy::serve(
        vec![Listener {
            listener,
            public_port: 80,
        }],
        Arc::new(Routes::new("local")),
        cfg,
        async {
            let _ = rx.await;
        },
    ));
    tx
}

fn pending(hostname: &str) -> CertRecord {
    CertRecord::pending_acme(hostname, "app1", "2026-01-01T00:00:00Z")
}

/// `pending(host)` of app `app1`, with the app record the worker checks for.
async fn request(store: &dyn Store, host: &str) {
    let app = serde_json::json!({
        "schema": 1, "id": "app1", "name": "app1", "org": "personal",
        "network": "default", "created_at": "2026-01-01T00:00:00Z"
    });
    store
        .put(
            &aloft_types::catalog::app_key("app1"),
            app.to_string().into_bytes(),
        )
        .await
        .unwrap();
    store
        .put(&cert_key(host), serde_json::to_vec(&pending(host)).unwrap())
        .await
        .unwrap();
}

/// Waits (on store changes) until the record leaves pending/issuing.
async fn wait_settled(store: &dyn Store, hostname: &str) -> CertRecord {
    let key = cert_key(hostname);
    tokio::time::timeout(DEADLINE, async {
        loop {
            let l = store.list(&key).await.unwrap();
            if let Some(e) = l.entries.iter().find(|e| e.key == key) {
                let rec: CertRecord = serde_json::from_slice(&e.value).unwrap();
                if matches!(rec.status, CertStatus::Ready | CertStatus::Failed) {
                    return rec;
                }
            }
            let mut w = store.watch(&key, l.revision).await.unwrap();
            w.next().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{hostname}: no outcome within {DEADLINE:?}"))
}

fn verify_chain(rec: &CertRecord, root_pem: &[u8]) {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(rec.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    assert!(chain.len() >= 2, "leaf and intermediate expected");
    let mut roots = rustls::RootCertStore::empty();
    for r in CertificateDer::pem_slice_iter(root_pem) {
        roots.add(r.unwrap()).unwrap();
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &ServerName::try_from(rec.hostname.clone()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .expect("issued chain verifies against pebble's root for the hostname");
    // The stored key is the leaf's.
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(rec.key_pem.as_bytes()).unwrap();
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain, key, &provider).expect("key matches the leaf");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_issues_a_certificate_that_verifies() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_port = listener.local_addr().unwrap().port();
    let ca = start_pebble(dir.path(), http_port, free_port()).await;

    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("c.db")).await.unwrap());
    let challenges = Challenges::new(store.clone());
    tokio::spawn(challenges.clone().follow());
    let _stop = start_proxy(listener, Some(challenges.clone()));

    let mut cfg = AcmeConfig::new(ca.directory.clone());
    cfg.ca_file = Some(ca.pki.ca_file.clone());
    cfg.contact_email = Some("ops@example.test".into());
    let worker = AcmeWorker::new(store.clone(), cfg, Some(challenges), None);
    let (wtx, wrx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(worker.run(async {
        let _ = wrx.await;
    }));

    let host = "app1.example.test";
    request(store.as_ref(), host).await;
    let rec = wait_settled(store.as_ref(), host).await;
    assert_eq!(rec.status, CertStatus::Ready, "error: {:?}", rec.error);
    assert!(rec.error.is_none());
    assert!(rec.not_after.is_some());
    verify_chain(&rec, &ca.issuing_root().await);

    // Challenges are gone; the account is stored for the next order.
    let left = store.list(ACME_CHALLENGES_PREFIX).await.unwrap();
    assert!(
        left.entries.is_empty(),
        "challenges left: {:?}",
        left.entries
    );
    let account = store.get(ACME_ACCOUNT_KEY).await.unwrap().expect("account");
    let account: serde_json::Value = serde_json::from_slice(&account.value).unwrap();
    assert_eq!(account["directory_url"], ca.directory.as_str());

    // A second hostname reuses the stored account.
    let host2 = "www.app1.example.test";
    store
        .put(
            &cert_key(host2),
            serde_json::to_vec(&pending(host2)).unwrap(),
        )
        .await
        .unwrap();
    let rec2 = wait_settled(store.as_ref(), host2).await;
    assert_eq!(rec2.status, CertStatus::Ready, "error: {:?}", rec2.error);
    let again = store.get(ACME_ACCOUNT_KEY).await.unwrap().unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&again.value).unwrap(),
        account
    );
    let _ = wtx.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_issues_and_the_proxy_serves_the_certificate() {
    use rustls::pki_types::ServerName;
    use rustls::pki_types::pem::PemObject;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https_addr = https.local_addr().unwrap();
    // pebble validates tls-alpn-01 on the proxy's TLS port only (http-01 goes nowhere).
    let ca = start_pebble(dir.path(), free_port(), https_addr.port()).await;

    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("c.db")).await.unwrap());
    let routes = Arc::new(Routes::new("local"));
    tokio::spawn(aloft_proxy::tls::follow_certs(
        store.clone(),
        Arc::clone(routes.certs()),
    ));
    let cfg = ProxyConfig {
        tls_ports: Arc::from(vec![443]),
        ..ProxyConfig::default()
    };
    let (_stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(aloft_proxy::serve(
        vec![
            Listener {
                listener: http,
                public_port: 80,
            },
            Listener {
                listener: https,
                public_port: 443,
            },
        ],
        Arc::clone(&routes),
        cfg,
        async {
            let _ = rx.await;
        },
    ));

    let mut cfg = AcmeConfig::new(ca.directory.clone());
    cfg.ca_file = Some(ca.pki.ca_file.clone());
    cfg.prefer = aloft_proxy::acme::ChallengePreference::TlsAlpn01;
    let worker = AcmeWorker::new(store.clone(), cfg, None, Some(Arc::clone(routes.certs())));
    tokio::spawn(worker.run(std::future::pending()));

    let host = "alpn.example.test";
    request(store.as_ref(), host).await;
    let rec = wait_settled(store.as_ref(), host).await;
    assert_eq!(rec.status, CertStatus::Ready, "error: {:?}", rec.error);
    let root = ca.issuing_root().await;
    verify_chain(&rec, &root);

    // The proxy serves it: a client trusting only pebble's root connects by SNI.
    let mut roots = rustls::RootCertStore::empty();
    for r in rustls::pki_types::CertificateDer::pem_slice_iter(&root) {
        roots.add(r.unwrap()).unwrap();
    }
    let client = Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let connector = tokio_rustls::TlsConnector::from(client);
    let served = tokio::time::timeout(DEADLINE, async {
        loop {
            let tcp = tokio::net::TcpStream::connect(https_addr).await.unwrap();
            if let Ok(s) = connector
                .connect(ServerName::try_from(host).unwrap(), tcp)
                .await
            {
                return s.get_ref().1.peer_certificates().unwrap()[0].to_vec();
            }
            // The proxy's certificate set follows the catalog: wait for its next change.
            let mut sub = routes.certs().subscribe();
            if routes.certs().lookup(host).is_none() {
                let _ = sub.changed().await;
            }
        }
    })
    .await
    .expect("the proxy serves the issued certificate");
    let leaf = rustls::pki_types::CertificateDer::pem_slice_iter(rec.cert_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(served, leaf.to_vec());
    assert!(
        store
            .list(ACME_CHALLENGES_PREFIX)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_validation_ends_failed_with_the_reason() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_port = listener.local_addr().unwrap().port();
    let ca = start_pebble(dir.path(), http_port, free_port()).await;

    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("c.db")).await.unwrap());
    // The proxy does not answer challenges: pebble's request gets the proxy's 404.
    let _stop = start_proxy(listener, None);
    let mut cfg = AcmeConfig::new(ca.directory.clone());
    cfg.ca_file = Some(ca.pki.ca_file.clone());
    let worker = AcmeWorker::new(store.clone(), cfg, None, None);
    tokio::spawn(worker.run(std::future::pending()));

    let host = "broken.example.test";
    request(store.as_ref(), host).await;
    let rec = wait_settled(store.as_ref(), host).await;
    assert_eq!(rec.status, CertStatus::Failed);
    let err = rec.error.expect("a reason");
    assert!(
        err.contains("validation of broken.example.test failed") && err.contains("404"),
        "{err}"
    );
    assert!(rec.cert_pem.is_empty());
    let left = store.list(ACME_CHALLENGES_PREFIX).await.unwrap();
    assert!(left.entries.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_claims_a_hostname_and_a_stale_claim_is_taken_over() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_port = listener.local_addr().unwrap().port();
    let ca = start_pebble(dir.path(), http_port, free_port()).await;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("c.db")).await.unwrap());
    let challenges = Challenges::new(store.clone());
    tokio::spawn(challenges.clone().follow());
    let _stop = start_proxy(listener, Some(challenges.clone()));

    // Every status change of the hostnames, in order.
    let start = store.revision().await.unwrap();
    let mut watch = store.watch("certs/", start).await.unwrap();

    // Three proxies' workers on one catalog.
    for _ in 0..3 {
        let mut cfg = AcmeConfig::new(ca.directory.clone());
        cfg.ca_file = Some(ca.pki.ca_file.clone());
        let w = AcmeWorker::new(store.clone(), cfg, Some(challenges.clone()), None);
        tokio::spawn(w.run(std::future::pending()));
    }
    let host = "race.example.test";
    request(store.as_ref(), host).await;
    // A claim left by a proxy that died an hour ago.
    let stale_host = "stale.example.test";
    let mut stale = pending(stale_host);
    stale.status = CertStatus::Issuing;
    stale.updated_at = "2020-01-01T00:00:00Z".into();
    store
        .put(&cert_key(stale_host), serde_json::to_vec(&stale).unwrap())
        .await
        .unwrap();

    assert_eq!(
        wait_settled(store.as_ref(), host).await.status,
        CertStatus::Ready
    );
    let rec = wait_settled(store.as_ref(), stale_host).await;
    assert_eq!(rec.status, CertStatus::Ready, "{:?}", rec.error);

    let mut statuses: std::collections::BTreeMap<String, Vec<CertStatus>> = Default::default();
    let end = store.revision().await.unwrap();
    while let Ok(Some(Ok(c))) = tokio::time::timeout(DEADLINE, watch.next()).await {
        if let Some(v) = c.value {
            let r: CertRecord = serde_json::from_slice(&v).unwrap();
            statuses.entry(r.hostname).or_default().push(r.status);
        }
        if c.revision >= end {
            break;
        }
    }
    use CertStatus::*;
    assert_eq!(statuses[host], [Pending, Issuing, Ready], "claimed once");
    assert_eq!(
        statuses[stale_host],
        [Issuing, Issuing, Ready],
        "taken over once"
    );
}
