//! `aloft ssh console` against an `https://` API: the console WebSocket goes over TLS
//! (wss://) and trusts what the CLI's HTTP client trusts (here `SSL_CERT_FILE`). The
//! server is a small TLS WebSocket endpoint made by the test, speaking the console's
//! frames; no VM is needed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// A CA (written to `ca.pem`) and a server config for 127.0.0.1 signed by it.
fn pki(dir: &Path) -> rustls::ServerConfig {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "aloft console test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap()
}

#[tokio::test]
async fn ssh_console_over_https_api_uses_wss() {
    let dir = tempfile::tempdir().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki(dir.path())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                // A client that does not trust the CA fails here; that is the point.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut seen = (String::new(), String::new());
                // The callback's error type is tungstenite's (large) handshake response.
                #[allow(clippy::result_large_err)]
                let record = |req: &Request, resp: Response| {
                    seen.0 = req.uri().to_string();
                    seen.1 = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    Ok(resp)
                };
                let mut ws = tokio_tungstenite::accept_hdr_async(tls, record)
                    .await
                    .unwrap();
                let _ = seen_tx.send(seen);
                let mut out = vec![aloft_api::console::STDOUT];
                out.extend_from_slice(b"over tls\n");
                ws.send(Message::Binary(out.into())).await.unwrap();
                ws.send(Message::Text(
                    r#"{"type":"exit","code":7,"signal":null}"#.into(),
                ))
                .await
                .unwrap();
                // Wait for the client's close (or its going away).
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                }
            });
        }
    });

    let run = |trust: bool| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_aloft"));
        cmd.arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["ssh", "console", "-a", "web", "--machine", "m1"])
            .args(["--no-pty", "-C", "echo hi"])
            .env("ALOFT_API_URL", format!("https://127.0.0.1:{port}"))
            .env("ALOFT_API_TOKEN", "sekrit")
            .env_remove("SSL_CERT_DIR")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if trust {
            cmd.env("SSL_CERT_FILE", dir.path().join("ca.pem"));
        } else {
            // Another CA only: the system store would not know ours either.
            let other = dir.path().join("other.pem");
            let key = rcgen::KeyPair::generate().unwrap();
            let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            std::fs::write(&other, ca.self_signed(&key).unwrap().pem()).unwrap();
            cmd.env("SSL_CERT_FILE", other);
        }
        async move {
            tokio::time::timeout(Duration::from_secs(30), cmd.output())
                .await
                .expect("aloft ssh console did not finish")
                .unwrap()
        }
    };

    let out = run(true).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "stderr: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "over tls\n");
    let (uri, auth) = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        uri.starts_with("/v1/apps/web/machines/m1/console?tty=false&cmd=echo%20hi"),
        "{uri}"
    );
    assert_eq!(auth, "Bearer sekrit");

    // A server certificate the CLI's roots do not vouch for is refused.
    let out = run(false).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "connected without trusting the CA");
    assert!(
        stderr.contains("cannot connect") && stderr.to_lowercase().contains("certificate"),
        "{stderr}"
    );
}
