//! Operations: Prometheus metrics on the admin listener, the access log, and hitless
//! reload of the real `aloft proxy` binary.

mod common;

use std::io::Write as _;
use std::sync::{Arc, Mutex};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `GET path` on a fresh connection; the whole response as text.
async fn get_text(addr: std::net::SocketAddr, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("admin answers in time")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of the sample line starting with `prefix` (metric name and labels).
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in\n{text}"))
}

#[tokio::test]
async fn metrics_count_requests_latency_retries_and_in_flight() {
    let up = TestBackend::start("up").await;
    // A machine that refuses connections: requests that pick it are retried.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut s = spec(
        10,
        20,
        &[("m-up", "local", up.addr), ("m-dead", "local", dead)],
    );
    s.apps[0].name = "ops-metrics".into();
    let proxy = TestProxy::start(s, |_| {}).await;
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    tokio::spawn(aloft_proxy::metrics::serve_admin(
        admin,
        std::future::pending(),
    ));

    let mut c = Client::connect(proxy.addr).await;
    for _ in 0..20 {
        assert_eq!(c.get("/", &[]).await.status, StatusCode::OK);
    }
    // Gate the live machine: one request stays in flight on it.
    up.close_gate();
    let mut held = Client::connect(proxy.addr).await;
    let pending = tokio::spawn(async move { held.get("/held", &[]).await });
    let mut active = up.active();
    wait_for(&mut active, "a request held by the machine", |n| *n == 1).await;

    let text = get_text(admin_addr, "/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("content-type: text/plain; version=0.0.4"));
    assert_eq!(
        sample(
            &text,
            "aloft_proxy_requests_total{app=\"ops-metrics\",status=\"2xx\"}"
        ),
        20.0
    );
    assert_eq!(
        sample(
            &text,
            "aloft_proxy_request_duration_seconds_count{app=\"ops-metrics\"}"
        ),
        20.0
    );
    assert_eq!(
        sample(
            &text,
            "aloft_proxy_request_duration_seconds_bucket{app=\"ops-metrics\",le=\"+Inf\"}"
        ),
        20.0
    );
    // The dead machine was picked at least once in 20 tries of two (power of two
    // choices on equal load); each pick was retried on the live one.
    assert!(
        sample(&text, "aloft_proxy_retries_total{app=\"ops-metrics\"}") >= 1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "aloft_proxy_app_in_flight{app=\"ops-metrics\"}"),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "aloft_proxy_machine_in_flight{proxy_region=\"local\",app=\"ops-metrics\",machine=\"m-up\""
        ),
        1.0
    );
    assert!(text.contains("# TYPE aloft_proxy_request_duration_seconds histogram"));
    assert!(text.contains("aloft_proxy_tls_handshakes_total{result=\"ok\"}"));

    up.open();
    let got = tokio::time::timeout(DEADLINE, pending)
        .await
        .expect("held request finishes")
        .unwrap();
    assert_eq!(got.status, StatusCode::OK);
    let text = get_text(admin_addr, "/metrics").await;
    assert_eq!(
        sample(&text, "aloft_proxy_app_in_flight{app=\"ops-metrics\"}"),
        0.0
    );
    assert!(
        get_text(admin_addr, "/nope")
            .await
            .starts_with("HTTP/1.1 404")
    );
}

/// Collects formatted log lines written by a `tracing_subscriber::fmt` layer.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn access_log_line_carries_request_id_machine_status_and_bytes() {
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "aloft_proxy::access=info",
        ))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // current_thread runtime: every task of the proxy logs through this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let up = TestBackend::start("hello").await;
    let mut s = spec(10, 20, &[("m-access", "local", up.addr)]);
    s.apps[0].name = "ops-access".into();
    let proxy = TestProxy::start(s, |_| {}).await;
    let mut c = Client::connect(proxy.addr).await;
    let got = c.get("/x", &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    let id = got.headers["fly-request-id"].to_str().unwrap().to_string();
    // The line is written when the body ends, which the client has seen: but the
    // proxy's task may drop the body a moment later; wait for it with a deadline.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let line = loop {
        let text = String::from_utf8_lossy(&lines.0.lock().unwrap()).into_owned();
        if let Some(l) = text.lines().find(|l| l.contains(&id)) {
            break l.to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no access line for {id} in:\n{text}"
        );
        tokio::task::yield_now().await;
    };
    assert!(line.contains("aloft_proxy::access"), "{line}");
    assert!(line.contains("app=ops-access"), "{line}");
    assert!(
        line.contains("machine=\"m-access\"") || line.contains("machine=m-access"),
        "{line}"
    );
    assert!(line.contains("status=200"), "{line}");
    assert!(
        line.contains(&format!("bytes={}", got.body.len())),
        "{line}"
    );
    assert!(line.contains("duration_ms="), "{line}");
    let _ = std::io::stderr().flush();
}

/// The `aloft` binary next to this test's own (`target/<profile>/aloft`), or
/// `ALOFT_BIN`.
fn aloft_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("ALOFT_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("aloft"))
        .unwrap();
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build -p aloft` (or set ALOFT_BIN)",
        bin.display()
    );
    bin
}

/// A running `aloft proxy` whose stdout lines are read as events.
struct ProxyProcess {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl ProxyProcess {
    fn start(args: &[&str]) -> ProxyProcess {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(aloft_bin())
            .arg("proxy")
            .args(args)
            .env("ALOFT_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("aloft proxy starts");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = tokio::io::BufReader::new(out).lines();
            while let Ok(Some(l)) = r.next_line().await {
                let _ = tx.send(l);
            }
        });
        ProxyProcess { child, lines }
    }

    /// Wait for a stdout line containing `what`.
    async fn wait_line(&mut self, what: &str) -> String {
        let wait = async {
            while let Some(l) = self.lines.recv().await {
                if l.contains(what) {
                    return l;
                }
            }
            panic!("aloft proxy exited before printing {what:?}");
        };
        tokio::time::timeout(DEADLINE, wait)
            .await
            .unwrap_or_else(|_| panic!("no {what:?} from aloft proxy in time"))
    }
}

#[derive(Default)]
struct LoopStats {
    ok: std::sync::atomic::AtomicUsize,
    failed: std::sync::atomic::AtomicUsize,
    reconnects: std::sync::atomic::AtomicUsize,
    errors: Mutex<Vec<String>>,
}

impl LoopStats {
    fn fail(&self, why: String) {
        self.failed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.errors.lock().unwrap().push(why);
    }
}

async fn h1_connect(
    addr: std::net::SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

fn get_req(close: bool) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut b = http::Request::get("/loop").header("host", "web.test");
    if close {
        b = b.header("connection", "close");
    }
    b.body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap()
}

/// Requests one after another on a keep-alive connection, opening a new one when the
/// proxy answered `Connection: close` (as every HTTP client does). A request is
/// failed when it was sent and no complete 200 came back.
async fn keep_alive_loop(
    addr: std::net::SocketAddr,
    stats: Arc<LoopStats>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    use http_body_util::BodyExt;
    use std::sync::atomic::Ordering::SeqCst;
    let mut sender = None;
    while !*stop.borrow() {
        if sender.is_none() {
            match h1_connect(addr).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    stats.fail(e);
                    continue;
                }
            }
        }
        let s = sender.as_mut().unwrap();
        if s.ready().await.is_err() {
            // Closed while idle, before this request was sent: not a failure.
            stats.reconnects.fetch_add(1, SeqCst);
            sender = None;
            continue;
        }
        let resp = match s.try_send_request(get_req(false)).await {
            Ok(r) => r,
            Err(e) if e.message().is_some() => {
                // Never written to the connection: send it again on a new one.
                stats.reconnects.fetch_add(1, SeqCst);
                sender = None;
                continue;
            }
            Err(e) => {
                stats.fail(format!("keep-alive request: {}", e.error()));
                sender = None;
                continue;
            }
        };
        let close = resp
            .headers()
            .get("connection")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let status = resp.status();
        match resp.into_body().collect().await {
            Ok(_) if status == StatusCode::OK => {
                stats.ok.fetch_add(1, SeqCst);
            }
            Ok(_) => stats.fail(format!("keep-alive status {status}")),
            Err(e) => stats.fail(format!("keep-alive body: {e}")),
        }
        if close {
            stats.reconnects.fetch_add(1, SeqCst);
            sender = None;
        }
    }
}

/// One request per new connection.
async fn new_connection_loop(
    addr: std::net::SocketAddr,
    stats: Arc<LoopStats>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    use http_body_util::BodyExt;
    use std::sync::atomic::Ordering::SeqCst;
    while !*stop.borrow() {
        let mut s = match h1_connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                stats.fail(e);
                continue;
            }
        };
        match s.send_request(get_req(true)).await {
            Ok(resp) if resp.status() == StatusCode::OK => match resp.into_body().collect().await {
                Ok(_) => {
                    stats.ok.fetch_add(1, SeqCst);
                }
                Err(e) => stats.fail(format!("new-connection body: {e}")),
            },
            Ok(resp) => stats.fail(format!("new-connection status {}", resp.status())),
            Err(e) => stats.fail(format!("new-connection request: {e}")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hitless_reload_hands_over_sockets_with_zero_failed_requests() {
    use std::sync::atomic::Ordering::SeqCst;
    let backend = TestBackend::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    let mut f = std::fs::File::create(&routes).unwrap();
    write!(
        f,
        r#"
[[apps]]
name = "reload"
hostnames = ["*"]
[[apps.services]]
internal_port = 8080
ports = [{{ port = 80, handlers = ["http"] }}]
concurrency = {{ type = "requests", soft_limit = 100, hard_limit = 200 }}
[[apps.machines]]
id = "m1"
region = "local"
address = "{}"
state = "started"
"#,
        backend.addr
    )
    .unwrap();
    drop(f);
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let sock = dir.path().join("handoff.sock");
    let (addr_s, metrics_s) = (format!("{addr}=80"), metrics.to_string());
    let args = [
        "--listen",
        &addr_s,
        "--routes",
        routes.to_str().unwrap(),
        "--handoff-socket",
        sock.to_str().unwrap(),
        "--metrics-listen",
        &metrics_s,
        "--drain-timeout-secs",
        "5",
        "--threads",
        "1",
    ];
    let mut old = ProxyProcess::start(&args);
    old.wait_line("listening on").await;
    old.wait_line("metrics on").await;

    let stats = Arc::new(LoopStats::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut loops = Vec::new();
    for _ in 0..3 {
        loops.push(tokio::spawn(keep_alive_loop(
            addr,
            Arc::clone(&stats),
            stop_rx.clone(),
        )));
    }
    for _ in 0..2 {
        loops.push(tokio::spawn(new_connection_loop(
            addr,
            Arc::clone(&stats),
            stop_rx.clone(),
        )));
    }
    let wait_ok = |n: usize| {
        let stats = Arc::clone(&stats);
        async move {
            let target = stats.ok.load(SeqCst) + n;
            let deadline = tokio::time::Instant::now() + DEADLINE;
            while stats.ok.load(SeqCst) < target {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "request loops stalled"
                );
                tokio::task::yield_now().await;
            }
        }
    };
    wait_ok(200).await;

    // Reload: a second process on the same address takes the sockets over; the first
    // drains and exits by itself.
    let started = std::time::Instant::now();
    let mut new = ProxyProcess::start(&args);
    new.wait_line(&format!("took over {addr}")).await;
    new.wait_line(&format!("took over {metrics}")).await;
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), old.child.wait())
        .await
        .expect("the old proxy drains and exits within its drain timeout")
        .unwrap();
    let took = started.elapsed();
    assert!(status.success(), "old proxy exit: {status}");
    let during = stats.ok.load(SeqCst);
    // Keep going on the new process alone, then reload once more back the other way.
    wait_ok(200).await;
    let admin = get_text(metrics, "/metrics").await;
    assert!(admin.contains("aloft_proxy_requests_total{app=\"reload\",status=\"2xx\"}"));
    let mut third = ProxyProcess::start(&args);
    third.wait_line(&format!("took over {addr}")).await;
    tokio::time::timeout(std::time::Duration::from_secs(10), new.child.wait())
        .await
        .expect("the second proxy drains and exits")
        .unwrap();
    wait_ok(200).await;

    stop_tx.send_replace(true);
    for l in loops {
        tokio::time::timeout(DEADLINE, l).await.unwrap().unwrap();
    }
    let errors = stats.errors.lock().unwrap().clone();
    eprintln!(
        "reload: {} ok, {} failed, {} reconnects, old proxy gone after {took:?} ({during} ok by then)",
        stats.ok.load(SeqCst),
        stats.failed.load(SeqCst),
        stats.reconnects.load(SeqCst)
    );
    assert!(
        errors.is_empty(),
        "failed requests across reload: {errors:?}"
    );
    assert!(
        stats.reconnects.load(SeqCst) >= 3,
        "keep-alive connections were closed by the draining proxies"
    );
    let _ = third.child.start_kill();
}

#[tokio::test]
async fn region_latency_orders_regions_and_delays_cross_region_forwards() {
    use std::time::{Duration, Instant};
    // The proxy is in ams, which has no machine. By the matrix syd is nearer than iad
    // (on purpose, against geography), so syd is tried first, iad when syd is full.
    let syd = TestBackend::start("syd").await;
    let iad = TestBackend::start("iad").await;
    let mut s = spec(
        1,
        1,
        &[("m-iad", "iad", iad.addr), ("m-syd", "syd", syd.addr)],
    );
    s.apps[0].name = "ops-latency".into();
    let routes = Arc::new(aloft_proxy::Routes::new("ams"));
    let matrix = aloft_proxy::LatencyMatrix::parse("ams-syd=40ms,ams-iad=150ms").unwrap();
    routes.set_latency(matrix, true);
    routes.update(&s).unwrap();
    let table = routes.load_full();
    let groups: Vec<&str> = table.apps()[0].services[0]
        .groups
        .iter()
        .map(|g| &*g.region)
        .collect();
    assert_eq!(groups, ["syd", "iad"], "nearest region first by the matrix");

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(aloft_proxy::serve(
        vec![aloft_proxy::Listener {
            listener,
            public_port: 80,
        }],
        Arc::clone(&routes),
        aloft_proxy::ProxyConfig::default(),
        std::future::pending(),
    ));

    let mut c = Client::connect(addr).await;
    let t0 = Instant::now();
    let got = c.get("/", &[]).await;
    let took = t0.elapsed();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, "syd", "nearest region with capacity");
    assert!(
        took >= Duration::from_millis(40),
        "the ams-syd round trip is injected: took {took:?}"
    );

    // syd at its hard limit (one request held): the next request goes to iad and
    // pays the longer round trip.
    syd.close_gate();
    let mut held = Client::connect(addr).await;
    let pending = tokio::spawn(async move { held.get("/held", &[]).await });
    let mut active = syd.active();
    wait_for(&mut active, "a request held in syd", |n| *n == 1).await;
    let t0 = Instant::now();
    let got = c.get("/", &[]).await;
    let took = t0.elapsed();
    assert_eq!(got.body, "iad", "next-closest region when syd is full");
    assert!(
        took >= Duration::from_millis(150),
        "the ams-iad round trip is injected: took {took:?}"
    );
    syd.open();
    let held = tokio::time::timeout(DEADLINE, pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.body, "syd");
}

#[tokio::test]
async fn a_successor_missing_an_address_does_not_take_over() {
    let backend = TestBackend::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        format!(
            "[[apps]]\nname = \"partial\"\nhostnames = [\"*\"]\n[[apps.services]]\n\
             internal_port = 8080\nports = [{{ port = 80, handlers = [\"http\"] }}]\n\
             [[apps.machines]]\nid = \"m1\"\nregion = \"local\"\naddress = \"{}\"\n\
             state = \"started\"\n",
            backend.addr
        ),
    )
    .unwrap();
    let free = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (addr, metrics) = (free(), free());
    let sock = dir.path().join("handoff.sock");
    let (addr_s, metrics_s) = (format!("{addr}=80"), metrics.to_string());
    let (r, s) = (routes.to_str().unwrap(), sock.to_str().unwrap());
    let mut old = ProxyProcess::start(&[
        "--listen",
        &addr_s,
        "--routes",
        r,
        "--handoff-socket",
        s,
        "--metrics-listen",
        &metrics_s,
    ]);
    old.wait_line("metrics on").await;
    // No --metrics-listen: taking over would leave the metrics address unserved.
    let mut new = ProxyProcess::start(&["--listen", &addr_s, "--routes", r, "--handoff-socket", s]);
    let status = tokio::time::timeout(DEADLINE, new.child.wait())
        .await
        .expect("the successor gives up")
        .unwrap();
    assert!(!status.success());
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the old proxy keeps running"
    );
    let mut c = Client::connect(addr).await;
    assert_eq!(c.get("/", &[]).await.status, StatusCode::OK);
    assert!(
        get_text(metrics, "/metrics")
            .await
            .starts_with("HTTP/1.1 200")
    );
    // A complete successor still can take over afterwards.
    let mut third = ProxyProcess::start(&[
        "--listen",
        &addr_s,
        "--routes",
        r,
        "--handoff-socket",
        s,
        "--metrics-listen",
        &metrics_s,
    ]);
    third.wait_line(&format!("took over {addr}")).await;
    tokio::time::timeout(DEADLINE, old.child.wait())
        .await
        .expect("the old proxy drains and exits")
        .unwrap();
    let mut c = Client::connect(addr).await;
    assert_eq!(c.get("/", &[]).await.status, StatusCode::OK);
}
