//! Raw TCP services through real sockets: `[]` relays bytes (the machine may speak
//! first), `["tls"]` terminates TLS and relays plaintext, `proxy_proto` writes the v1
//! or v2 header, `hard_limit` bounds connections, and a refused connect is retried
//! on another machine.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aloft_proxy::RoutesSpec;
use aloft_proxy::tls::{LocalCa, certified_key};
use common::{DEADLINE, TestProxy, read_line};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// A TCP backend that greets `hello <name>\n` first, then echoes; it counts its open
/// connections (watchable) and the most it ever had at once.
struct EchoBackend {
    addr: SocketAddr,
    open: watch::Receiver<usize>,
    max: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoBackend {
    async fn start(name: &'static str) -> EchoBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open_tx, open) = watch::channel(0usize);
        let open_tx = Arc::new(open_tx);
        let max = Arc::new(AtomicUsize::new(0));
        let max2 = Arc::clone(&max);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let (open_tx, max) = (Arc::clone(&open_tx), Arc::clone(&max2));
                open_tx.send_modify(|n| {
                    *n += 1;
                    max.fetch_max(*n, Ordering::SeqCst);
                });
                tokio::spawn(async move {
                    let _ = s.write_all(format!("hello {name}\n").as_bytes()).await;
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    open_tx.send_modify(|n| *n -= 1);
                });
            }
        });
        EchoBackend {
            addr,
            open,
            max,
            task,
        }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One app whose service answers public port 80 with `handlers` (TOML array) and
/// `extra` port options, on machines `addrs`.
fn spec(handlers: &str, extra: &str, hard: u32, addrs: &[SocketAddr]) -> RoutesSpec {
    let mut text = format!(
        r#"
        [[apps]]
        name = "db"
        hostnames = ["*"]
        [[apps.services]]
        internal_port = 5432
        ports = [{{ port = 80, handlers = {handlers} {extra} }}]
        concurrency = {{ type = "connections", soft_limit = {hard}, hard_limit = {hard} }}
        "#
    );
    for (i, a) in addrs.iter().enumerate() {
        text.push_str(&format!(
            "[[apps.machines]]\nid = \"m{i}\"\nregion = \"local\"\naddress = \"{a}\"\nstate = \"started\"\n"
        ));
    }
    toml::from_str(&text).unwrap()
}

#[tokio::test]
async fn raw_tcp_relays_both_ways_and_the_machine_may_speak_first() {
    let backend = EchoBackend::start("m0").await;
    let proxy = TestProxy::start(spec("[]", "", 10, &[backend.addr]), |_| {}).await;
    let mut c = BufReader::new(TcpStream::connect(proxy.addr).await.unwrap());
    // The greeting arrives before the client sends anything.
    assert_eq!(read_line(&mut c).await, "hello m0\n");
    c.get_mut().write_all(b"ping 1\n").await.unwrap();
    assert_eq!(read_line(&mut c).await, "ping 1\n");
    let big = vec![b'x'; 256 * 1024];
    c.get_mut().write_all(&big).await.unwrap();
    let mut back = vec![0u8; big.len()];
    tokio::time::timeout(DEADLINE, c.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, big);
    drop(c);
    let mut open = backend.open.clone();
    common::wait_for(&mut open, "backend connection closed", |n| *n == 0).await;
}

#[tokio::test]
async fn tls_handler_terminates_and_relays_plaintext() {
    let backend = EchoBackend::start("m0").await;
    let proxy = TestProxy::start(spec(r#"["tls"]"#, "", 10, &[backend.addr]), |_| {}).await;
    let ca = LocalCa::generate().unwrap();
    let (pem, key) = ca.issue(&["db.test"]).unwrap();
    proxy
        .routes
        .certs()
        .insert_file("db.test", certified_key("db.test", &pem, &key).unwrap());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    // A raw TLS port negotiates no application protocol, whatever the client offers.
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("db.test").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let mut c = BufReader::new(tls);
    assert_eq!(read_line(&mut c).await, "hello m0\n");
    c.get_mut().write_all(b"over tls\n").await.unwrap();
    assert_eq!(read_line(&mut c).await, "over tls\n");
}

/// A backend that reads a PROXY header (v1 line or v2 binary) and sends what it read
/// to the test, then echoes.
async fn proxy_proto_backend() -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                let mut first = [0u8; 16];
                if r.read_exact(&mut first[..5]).await.is_err() {
                    return;
                }
                let mut header = first[..5].to_vec();
                if &first[..5] == b"PROXY" {
                    let mut rest = Vec::new();
                    r.read_until(b'\n', &mut rest).await.unwrap();
                    header.extend_from_slice(&rest);
                } else {
                    r.read_exact(&mut first[5..16]).await.unwrap();
                    let len = u16::from_be_bytes([first[14], first[15]]) as usize;
                    let mut addrs = vec![0u8; len];
                    r.read_exact(&mut addrs).await.unwrap();
                    header = first.to_vec();
                    header.extend_from_slice(&addrs);
                }
                let _ = tx.send(header).await;
                let (mut rd, mut wr) = tokio::io::split(r);
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn proxy_proto_v1_header_reaches_the_machine() {
    let (addr, mut headers) = proxy_proto_backend().await;
    let proxy = TestProxy::start(spec(r#"["proxy_proto"]"#, "", 10, &[addr]), |_| {}).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let me = c.local_addr().unwrap();
    c.write_all(b"data\n").await.unwrap();
    let h = tokio::time::timeout(DEADLINE, headers.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8(h).unwrap(),
        format!(
            "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
            me.port(),
            proxy.addr.port()
        )
    );
    let mut line = BufReader::new(c);
    assert_eq!(read_line(&mut line).await, "data\n");
}

#[tokio::test]
async fn proxy_proto_v2_header_reaches_the_machine() {
    let (addr, mut headers) = proxy_proto_backend().await;
    let proxy = TestProxy::start(
        spec(
            r#"["proxy_proto"]"#,
            r#", proxy_proto_options = { version = "v2" }"#,
            10,
            &[addr],
        ),
        |_| {},
    )
    .await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let me = c.local_addr().unwrap();
    c.write_all(b"x").await.unwrap();
    let h = tokio::time::timeout(DEADLINE, headers.recv())
        .await
        .unwrap()
        .unwrap();
    let mut want = vec![
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
        0x21, 0x11, 0, 12, // v2 PROXY, TCP over IPv4, 12 bytes
        127, 0, 0, 1, 127, 0, 0, 1,
    ];
    want.extend_from_slice(&me.port().to_be_bytes());
    want.extend_from_slice(&proxy.addr.port().to_be_bytes());
    assert_eq!(h, want);
}

#[tokio::test]
async fn bad_proxy_proto_version_is_rejected() {
    let text = spec(
        r#"["proxy_proto"]"#,
        r#", proxy_proto_options = { version = "v9" }"#,
        1,
        &[],
    );
    let e = aloft_proxy::RouteTable::build(&text, "local", None).unwrap_err();
    assert_eq!(
        e.key,
        "apps[0].services[0].ports[0].proxy_proto_options.version"
    );
}

#[tokio::test]
async fn hard_limit_bounds_tcp_connections() {
    let backend = EchoBackend::start("m0").await;
    let proxy = TestProxy::start(spec("[]", "", 2, &[backend.addr]), |c| {
        c.queue_timeout = Duration::from_millis(300);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = BufReader::new(TcpStream::connect(proxy.addr).await.unwrap());
        assert_eq!(read_line(&mut c).await, "hello m0\n");
        held.push(c);
    }
    // A third waits for a slot, then is closed without reaching the machine.
    let mut third = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(DEADLINE, third.read(&mut buf))
        .await
        .expect("third connection closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "the third connection must not be relayed");
    assert_eq!(backend.max.load(Ordering::SeqCst), 2);

    // A fourth that arrives while one slot frees up gets through.
    let mut fourth = BufReader::new(TcpStream::connect(proxy.addr).await.unwrap());
    drop(held.pop());
    assert_eq!(read_line(&mut fourth).await, "hello m0\n");
    assert_eq!(
        backend.max.load(Ordering::SeqCst),
        2,
        "never above hard_limit"
    );
}

#[tokio::test]
async fn refused_connect_is_retried_on_another_machine() {
    let live = EchoBackend::start("live").await;
    // A port nobody listens on: connects are refused.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let proxy = TestProxy::start(spec("[]", "", 10, &[dead, live.addr]), |_| {}).await;
    for _ in 0..6 {
        let mut c = BufReader::new(TcpStream::connect(proxy.addr).await.unwrap());
        assert_eq!(read_line(&mut c).await, "hello live\n");
    }
}
