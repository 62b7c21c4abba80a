//! fly.toml `tls_options` on TLS ports, through real sockets: `alpn` decides what
//! ALPN offers (`["http/1.1"]` never negotiates h2), `versions` which TLS versions a
//! client may use (`["TLSv1.3"]` refuses a TLS 1.2-only client), and
//! `default_self_signed` serves a certificate for an SNI that has none. Options are
//! per app and port: the SNI's app decides.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use aloft_proxy::RoutesSpec;
use aloft_proxy::tls::{LocalCa, certified_key};
use common::{DEADLINE, TestBackend, TestProxy};
use rustls::SupportedProtocolVersion;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Apps on public port 80 (`["tls", "http"]`), each with its host `<name>.test` and
/// the given `tls_options` (TOML inline table, or empty), all on `backend`.
fn spec(backend: SocketAddr, apps: &[(&str, &str)]) -> RoutesSpec {
    let mut text = String::new();
    for (name, opts) in apps {
        let opts = if opts.is_empty() {
            String::new()
        } else {
            format!(", tls_options = {opts}")
        };
        text.push_str(&format!(
            r#"
            [[apps]]
            name = "{name}"
            hostnames = ["{name}.test"]
            [[apps.services]]
            internal_port = 8080
            ports = [{{ port = 80, handlers = ["tls", "http"] {opts} }}]
            [[apps.machines]]
            id = "m-{name}"
            region = "local"
            address = "{backend}"
            state = "started"
            "#
        ));
    }
    toml::from_str(&text).unwrap()
}

fn client(
    ca_pem: &str,
    alpn: &[&[u8]],
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

const BOTH: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
const ONLY_12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];
const ONLY_13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
const H2_AND_H1: &[&[u8]] = &[b"h2", b"http/1.1"];

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

async fn http1_get(mut s: TlsStream<TcpStream>, host: &str) -> String {
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

/// A proxy serving `apps` with one CA-issued certificate for `certified` hosts.
async fn proxy(apps: &[(&str, &str)], certified: &[&str]) -> (TestProxy, TestBackend, LocalCa) {
    let backend = TestBackend::start("app").await;
    let proxy = TestProxy::start(spec(backend.addr, apps), |_| {}).await;
    let ca = LocalCa::generate().unwrap();
    for host in certified {
        let (pem, key) = ca.issue(&[host]).unwrap();
        proxy
            .routes
            .certs()
            .insert_file(host, certified_key(host, &pem, &key).unwrap());
    }
    (proxy, backend, ca)
}

#[tokio::test]
async fn alpn_option_limits_the_protocols_offered() {
    let (proxy, _backend, ca) = proxy(
        &[("h1", r#"{ alpn = ["http/1.1"] }"#), ("dflt", "")],
        &["h1.test", "dflt.test"],
    )
    .await;
    let cfg = client(ca.cert_pem(), H2_AND_H1, BOTH);
    // Without options the client's h2 wins.
    let s = handshake(proxy.addr, "dflt.test", Arc::clone(&cfg))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // alpn = ["http/1.1"]: never h2, and HTTP/1.1 is served.
    let s = handshake(proxy.addr, "h1.test", Arc::clone(&cfg))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let resp = http1_get(s, "h1.test").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("app"), "{resp}");
    // A client offering h2 only has nothing in common with that port.
    let h2_only = client(ca.cert_pem(), &[b"h2"], BOTH);
    assert!(handshake(proxy.addr, "h1.test", h2_only).await.is_err());
}

#[tokio::test]
async fn versions_option_refuses_other_tls_versions() {
    let (proxy, _backend, ca) = proxy(
        &[
            ("v13", r#"{ versions = ["TLSv1.3"] }"#),
            ("v12", r#"{ versions = ["TLSv1.2"] }"#),
            ("dflt", ""),
        ],
        &["v13.test", "v12.test", "dflt.test"],
    )
    .await;
    let tls12 = client(ca.cert_pem(), &[], ONLY_12);
    let tls13 = client(ca.cert_pem(), &[], ONLY_13);
    // The default port takes either.
    for cfg in [&tls12, &tls13] {
        handshake(proxy.addr, "dflt.test", Arc::clone(cfg))
            .await
            .unwrap();
    }
    let err = handshake(proxy.addr, "v13.test", Arc::clone(&tls12)).await;
    assert!(err.is_err(), "a TLS 1.2-only client must be refused");
    let s = handshake(proxy.addr, "v13.test", Arc::clone(&tls13))
        .await
        .unwrap();
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let resp = http1_get(s, "v13.test").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        handshake(proxy.addr, "v12.test", Arc::clone(&tls13))
            .await
            .is_err()
    );
    let s = handshake(proxy.addr, "v12.test", client(ca.cert_pem(), &[], BOTH))
        .await
        .unwrap();
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

#[tokio::test]
async fn default_self_signed_serves_a_host_without_certificate() {
    let (proxy, _backend, _ca) = proxy(
        &[
            ("selfie", r#"{ default_self_signed = true }"#),
            ("plain", ""),
        ],
        &[],
    )
    .await;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let cfg = Arc::new(cfg);
    assert!(
        handshake(proxy.addr, "plain.test", Arc::clone(&cfg))
            .await
            .is_err(),
        "no certificate, no handshake"
    );
    let s = handshake(proxy.addr, "selfie.test", cfg).await.unwrap();
    let resp = http1_get(s, "selfie.test").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

#[test]
fn unknown_tls_version_names_its_key() {
    let s = spec(
        "127.0.0.1:1".parse().unwrap(),
        &[("x", r#"{ versions = ["TLSv1.3", "SSLv3"] }"#)],
    );
    let e = aloft_proxy::RouteTable::build(&s, "local", None).unwrap_err();
    assert_eq!(
        e.key,
        "apps[0].services[0].ports[0].tls_options.versions[1]"
    );
}

/// Accepts any server certificate (the self-signed one is trusted by nobody).
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
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[tokio::test]
async fn raw_tls_port_offers_the_alpn_it_is_given() {
    // A `["tls"]` port relays bytes; it offers no ALPN unless `tls_options` says so.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    let echo_task = tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let text = format!(
        r#"
        [[apps]]
        name = "pg"
        hostnames = ["pg.test"]
        [[apps.services]]
        internal_port = 5432
        ports = [{{ port = 80, handlers = ["tls"], tls_options = {{ alpn = ["postgresql"] }} }}]
        [[apps.machines]]
        id = "m1"
        region = "local"
        address = "{echo_addr}"
        state = "started"
        "#
    );
    let proxy = TestProxy::start(toml::from_str(&text).unwrap(), |_| {}).await;
    let ca = LocalCa::generate().unwrap();
    let (pem, key) = ca.issue(&["pg.test"]).unwrap();
    proxy
        .routes
        .certs()
        .insert_file("pg.test", certified_key("pg.test", &pem, &key).unwrap());
    let cfg = client(ca.cert_pem(), &[b"postgresql"], BOTH);
    let mut s = handshake(proxy.addr, "pg.test", cfg).await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&back, b"ping");
    echo_task.abort();
}
