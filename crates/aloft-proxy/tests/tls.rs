//! TLS termination by SNI through real sockets: exact and wildcard certificates, an
//! unknown SNI refused, HTTP/2 by ALPN, a catalog certificate served without a
//! restart, a TLS-ALPN-01 challenge answered from its record, certificates from the
//! routes file.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use aloft_proxy::tls::{LocalCa, certified_key};
use aloft_proxy::{Routes, RoutesSpec};
use aloft_store::{SqliteStore, Store};
use aloft_types::catalog::{
    AcmeChallengeKind, AcmeChallengeRecord, CertRecord, CertSource, CertStatus, acme_challenge_key,
    cert_key,
};
use bytes::Bytes;
use common::{DEADLINE, TestBackend, TestProxy};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// One app on public port 80 served as `["tls", "http"]`.
fn tls_spec(backend: SocketAddr) -> RoutesSpec {
    toml::from_str(&format!(
        r#"
        [[apps]]
        name = "web"
        hostnames = ["*"]
        [[apps.services]]
        internal_port = 8080
        ports = [{{ port = 80, handlers = ["tls", "http"] }}]
        [[apps.machines]]
        id = "m1"
        region = "local"
        address = "{backend}"
        state = "started"
        "#
    ))
    .unwrap()
}

fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

async fn handshake(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio::time::timeout(DEADLINE, TlsConnector::from(cfg).connect(name, tcp))
        .await
        .expect("handshake finished in time")
}

fn leaf(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn pem_leaf(cert_pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// One HTTP/1.1 request over an established stream; returns the raw response.
async fn http1_get(mut s: TlsStream<TcpStream>, host: &str) -> String {
    s.write_all(
        format!("GET /hello HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn sni_picks_exact_then_wildcard_and_refuses_unknown() {
    let backend = TestBackend::start("b1").await;
    let proxy = TestProxy::start(tls_spec(backend.addr), |_| {}).await;
    let ca = LocalCa::generate().unwrap();
    let (exact_pem, exact_key) = ca.issue(&["a.example.test"]).unwrap();
    let (wild_pem, wild_key) = ca.issue(&["*.example.test"]).unwrap();
    let certs = proxy.routes.certs();
    certs.insert_file(
        "a.example.test",
        certified_key("a.example.test", &exact_pem, &exact_key).unwrap(),
    );
    certs.insert_file(
        "*.example.test",
        certified_key("*.example.test", &wild_pem, &wild_key).unwrap(),
    );
    let cfg = client_config(ca.cert_pem(), &[b"http/1.1"]);

    let exact = handshake(proxy.addr, "a.example.test", cfg.clone())
        .await
        .unwrap();
    assert_eq!(
        leaf(&exact),
        pem_leaf(&exact_pem),
        "exact name beats wildcard"
    );
    let resp = http1_get(exact, "a.example.test").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("b1"), "{resp}");
    let seen = backend.seen();
    assert_eq!(seen[0].headers["x-forwarded-proto"], "https");

    let wild = handshake(proxy.addr, "b.example.test", cfg.clone())
        .await
        .unwrap();
    assert_eq!(
        leaf(&wild),
        pem_leaf(&wild_pem),
        "wildcard for another label"
    );

    // A wildcard covers one label only, and an unknown name has no certificate.
    for sni in ["x.b.example.test", "unknown.test", "example.test"] {
        let r = handshake(proxy.addr, sni, cfg.clone()).await;
        assert!(r.is_err(), "{sni} must be refused");
    }
}

#[tokio::test]
async fn alpn_h2_round_trip() {
    let backend = TestBackend::start("b1").await;
    let proxy = TestProxy::start(tls_spec(backend.addr), |_| {}).await;
    let ca = LocalCa::generate().unwrap();
    let (pem, key) = ca.issue(&["h2.test"]).unwrap();
    proxy
        .routes
        .certs()
        .insert_file("h2.test", certified_key("h2.test", &pem, &key).unwrap());
    let s = handshake(
        proxy.addr,
        "h2.test",
        client_config(ca.cert_pem(), &[b"h2", b"http/1.1"]),
    )
    .await
    .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // The server's suite order wins: AES-128-GCM/SHA-256 although the client lists
    // AES-256-GCM/SHA-384 first.
    assert_eq!(
        s.get_ref().1.negotiated_cipher_suite().unwrap().suite(),
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    );
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let req = http::Request::get(format!("https://h2.test/r{i}"))
            .body(Empty::new())
            .unwrap();
        let resp = tokio::time::timeout(DEADLINE, send.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"b1");
    }
    let seen = backend.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[2].path, "/r2");
    assert_eq!(seen[2].headers["host"], "h2.test");
    assert_eq!(seen[2].headers["x-forwarded-proto"], "https");
}

fn cert_record(hostname: &str, status: CertStatus, pem: &str, key: &str) -> Vec<u8> {
    serde_json::to_vec(&CertRecord {
        schema: 1,
        hostname: hostname.into(),
        app: "web".into(),
        source: CertSource::Custom,
        status,
        cert_pem: pem.into(),
        key_pem: key.into(),
        not_after: None,
        error: None,
        created_at: "2026-01-01T00:00:00Z".into(),
        updated_at: "2026-01-01T00:00:00Z".into(),
    })
    .unwrap()
}

/// Wait (bounded) until the proxy's certificates satisfy `f`.
async fn wait_certs(routes: &Routes, what: &str, f: impl Fn(&aloft_proxy::tls::Certs) -> bool) {
    let certs = routes.certs();
    let mut rx = certs.subscribe();
    let wait = async {
        while !f(certs) {
            rx.changed().await.unwrap();
        }
    };
    tokio::time::timeout(DEADLINE, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test]
async fn catalog_certificate_is_served_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("c.db")).await.unwrap());
    let backend = TestBackend::start("b1").await;
    let proxy = TestProxy::start(tls_spec(backend.addr), |_| {}).await;
    let follow = tokio::spawn(aloft_proxy::tls::follow_certs(
        Arc::clone(&store),
        Arc::clone(proxy.routes.certs()),
    ));
    let ca = LocalCa::generate().unwrap();
    let cfg = client_config(ca.cert_pem(), &[b"http/1.1"]);
    assert!(
        handshake(proxy.addr, "new.test", cfg.clone())
            .await
            .is_err()
    );

    // A record still pending is not served.
    let (pem, key) = ca.issue(&["new.test"]).unwrap();
    store
        .put(
            &cert_key("new.test"),
            cert_record("new.test", CertStatus::Pending, "", ""),
        )
        .await
        .unwrap();
    store
        .put(
            &cert_key("other.test"),
            cert_record("other.test", CertStatus::Ready, &pem, &key),
        )
        .await
        .unwrap();
    wait_certs(&proxy.routes, "other.test", |c| {
        c.lookup("other.test").is_some()
    })
    .await;
    assert!(proxy.routes.certs().lookup("new.test").is_none());

    store
        .put(
            &cert_key("new.test"),
            cert_record("new.test", CertStatus::Ready, &pem, &key),
        )
        .await
        .unwrap();
    wait_certs(&proxy.routes, "new.test", |c| {
        c.lookup("new.test").is_some()
    })
    .await;
    let s = handshake(proxy.addr, "new.test", cfg.clone())
        .await
        .unwrap();
    assert_eq!(leaf(&s), pem_leaf(&pem));
    let resp = http1_get(s, "new.test").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    // Deleting the record stops serving it.
    store
        .delete(&cert_key("new.test"), aloft_store::Expect::Any)
        .await
        .unwrap();
    wait_certs(&proxy.routes, "new.test gone", |c| {
        c.lookup("new.test").is_none()
    })
    .await;
    assert!(handshake(proxy.addr, "new.test", cfg).await.is_err());
    follow.abort();
}

#[tokio::test]
async fn tls_alpn_01_challenge_is_answered_from_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("c.db")).await.unwrap());
    let backend = TestBackend::start("b1").await;
    let proxy = TestProxy::start(tls_spec(backend.addr), |_| {}).await;
    let follow = tokio::spawn(aloft_proxy::tls::follow_certs(
        Arc::clone(&store),
        Arc::clone(proxy.routes.certs()),
    ));
    let ca = LocalCa::generate().unwrap();
    // An RFC 8737 certificate: self-signed, with the critical acmeIdentifier extension.
    let (challenge_pem, challenge_key) = {
        let mut p = rcgen::CertificateParams::new(vec!["acme.test".to_string()]).unwrap();
        p.custom_extensions
            .push(rcgen::CustomExtension::new_acme_identifier(&[7u8; 32]));
        let key = rcgen::KeyPair::generate().unwrap();
        (p.self_signed(&key).unwrap().pem(), key.serialize_pem())
    };
    let (normal_pem, normal_key) = ca.issue(&["acme.test"]).unwrap();
    let record = AcmeChallengeRecord {
        schema: 1,
        hostname: "acme.test".into(),
        kind: AcmeChallengeKind::TlsAlpn01,
        token: "tok1".into(),
        key_authorization: "tok1.thumb".into(),
        cert_pem: challenge_pem.clone(),
        key_pem: challenge_key,
    };
    store
        .put(
            &acme_challenge_key("tok1"),
            serde_json::to_vec(&record).unwrap(),
        )
        .await
        .unwrap();
    store
        .put(
            &cert_key("acme.test"),
            cert_record("acme.test", CertStatus::Ready, &normal_pem, &normal_key),
        )
        .await
        .unwrap();
    wait_certs(&proxy.routes, "challenge", |c| {
        c.has_challenge("acme.test") && c.lookup("acme.test").is_some()
    })
    .await;

    // Like an ACME validator, the client checks the certificate itself.
    let acme_cfg = {
        let mut c = (*client_config(ca.cert_pem(), &[b"acme-tls/1"])).clone();
        c.dangerous()
            .set_certificate_verifier(Arc::new(AcceptAny(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))));
        Arc::new(c)
    };
    let mut s = handshake(proxy.addr, "acme.test", acme_cfg.clone())
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"acme-tls/1"[..]));
    assert_eq!(leaf(&s), pem_leaf(&challenge_pem), "challenge certificate");
    // id-pe-acmeIdentifier (1.3.6.1.5.5.7.1.31), then critical, then the digest.
    let oid = [0x06, 0x08, 0x2B, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1F];
    assert!(leaf(&s).windows(oid.len()).any(|w| w == oid));
    // The proxy closes after the handshake.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);

    // Ordinary clients still get the ordinary certificate.
    let s = handshake(
        proxy.addr,
        "acme.test",
        client_config(ca.cert_pem(), &[b"http/1.1"]),
    )
    .await
    .unwrap();
    assert_eq!(leaf(&s), pem_leaf(&normal_pem));

    // No challenge for that name: the acme-tls/1 handshake fails.
    let (other_pem, other_key) = ca.issue(&["plain.test"]).unwrap();
    proxy.routes.certs().insert_file(
        "plain.test",
        certified_key("plain.test", &other_pem, &other_key).unwrap(),
    );
    assert!(handshake(proxy.addr, "plain.test", acme_cfg).await.is_err());
    follow.abort();
}

#[tokio::test]
async fn routes_file_certificates_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let backend = TestBackend::start("b1").await;
    let ca = LocalCa::generate().unwrap();
    let (pem, key) = ca.issue(&["*.files.test"]).unwrap();
    std::fs::write(dir.path().join("c.pem"), &pem).unwrap();
    std::fs::write(dir.path().join("c.key"), &key).unwrap();
    let routes_path = dir.path().join("routes.toml");
    std::fs::write(
        &routes_path,
        format!(
            r#"
            [[certs]]
            hostname = "*.files.test"
            cert = "c.pem"
            key = "c.key"
            [[apps]]
            name = "web"
            hostnames = ["*"]
            [[apps.services]]
            internal_port = 8080
            ports = [{{ port = 80, handlers = ["tls", "http"] }}]
            [[apps.machines]]
            id = "m1"
            region = "local"
            address = "{}"
            state = "started"
            "#,
            backend.addr
        ),
    )
    .unwrap();
    let spec = aloft_proxy::read_routes_file(&routes_path).unwrap();
    let proxy = TestProxy::start(spec, |_| {}).await;
    aloft_proxy::load_routes_file(&routes_path, &proxy.routes).unwrap();
    let s = handshake(
        proxy.addr,
        "www.files.test",
        client_config(ca.cert_pem(), &[b"http/1.1"]),
    )
    .await
    .unwrap();
    let resp = http1_get(s, "www.files.test").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    // A missing key file is an error naming the host, and the certificate stays.
    std::fs::remove_file(dir.path().join("c.key")).unwrap();
    let e = aloft_proxy::load_routes_file(&routes_path, &proxy.routes).unwrap_err();
    let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(msg.contains("*.files.test"), "{msg}");
    assert!(proxy.routes.certs().lookup("www.files.test").is_some());
}

#[tokio::test]
async fn tls_ports_terminate_tls_on_ports_services_name_as_http() {
    let backend = TestBackend::start("b1").await;
    // The service names port 80 as plain HTTP; the config makes it a TLS port.
    let spec = common::spec(5, 10, &[("m1", "local", backend.addr)]);
    let proxy = TestProxy::start(spec, |c| c.tls_ports = Arc::from(vec![80])).await;
    let ca = LocalCa::generate().unwrap();
    let (pem, key) = ca.issue(&["web.test"]).unwrap();
    proxy
        .routes
        .certs()
        .insert_file("web.test", certified_key("web.test", &pem, &key).unwrap());
    let s = handshake(
        proxy.addr,
        "web.test",
        client_config(ca.cert_pem(), &[b"http/1.1"]),
    )
    .await
    .unwrap();
    let resp = http1_get(s, "web.test").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

/// Accepts any server certificate: the test compares the certificate itself, as an
/// ACME validator does for a TLS-ALPN-01 one (webpki cannot parse it).
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
