//! The proxy against real backends on loopback: balancing, hard limits, retries,
//! malformed requests, the bounded queue, headers, region preference and drain.

mod common;

use std::time::Duration;

use common::*;
use futures::future::join_all;
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spreads_load_over_machines() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let c = TestBackend::start("c").await;
    let proxy = TestProxy::start(
        spec(
            10,
            20,
            &[
                ("a", "local", a.addr),
                ("b", "local", b.addr),
                ("c", "local", c.addr),
            ],
        ),
        |_| {},
    )
    .await;
    let clients = (0..10).map(|_| async {
        let mut cl = Client::connect(proxy.addr).await;
        let mut out = Vec::new();
        for _ in 0..30 {
            out.push(cl.get("/", &[]).await);
        }
        out
    });
    let answers: Vec<Got> = join_all(clients).await.into_iter().flatten().collect();
    assert!(answers.iter().all(|g| g.status == StatusCode::OK));
    let t = tally(&answers);
    for m in ["a", "b", "c"] {
        let n = t.get(m).copied().unwrap_or(0);
        assert!(n >= 40, "machine {m} got only {n} of 300: {t:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_exceeds_hard_limit_under_load() {
    let backends = [
        TestBackend::start("a").await,
        TestBackend::start("b").await,
        TestBackend::start("c").await,
    ];
    for b in &backends {
        b.close_gate();
    }
    let machines: Vec<_> = ["a", "b", "c"]
        .iter()
        .zip(&backends)
        .map(|(n, b)| (*n, "local", b.addr))
        .collect();
    let proxy = TestProxy::start(spec(1, 2, &machines), |c| {
        c.queue_timeout = Duration::from_secs(15);
    })
    .await;

    let addr = proxy.addr;
    let requests: Vec<_> = (0..60)
        .map(|_| async move {
            let mut cl = Client::connect(addr).await;
            cl.get("/", &[]).await
        })
        .collect();
    let all = tokio::spawn(join_all(requests));
    // Every slot fills (3 machines × hard limit 2) while the gates are shut.
    for b in &backends {
        let mut active = b.active();
        wait_for(&mut active, "machine at its hard limit", |n| *n == 2).await;
    }
    for b in &backends {
        b.open();
    }
    let answers = all.await.unwrap();
    assert_eq!(answers.len(), 60);
    for g in &answers {
        assert_eq!(g.status, StatusCode::OK, "{}", g.body);
    }
    for b in &backends {
        assert!(
            b.max_concurrent() <= 2,
            "a machine saw {} at once",
            b.max_concurrent()
        );
    }
    let total: usize = backends.iter().map(|b| b.served()).sum();
    assert_eq!(total, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_machine_is_retried_elsewhere() {
    let mut a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let proxy = TestProxy::start(
        spec(10, 20, &[("a", "local", a.addr), ("b", "local", b.addr)]),
        |_| {},
    )
    .await;
    // Warm both machines' pools.
    let mut cl = Client::connect(proxy.addr).await;
    for _ in 0..40 {
        assert_eq!(cl.get("/", &[]).await.status, StatusCode::OK);
    }
    assert!(a.served() > 0 && b.served() > 0);
    a.kill().await;
    let served_b = b.served();
    let clients = (0..8).map(|_| async {
        let mut cl = Client::connect(proxy.addr).await;
        let mut out = Vec::new();
        for _ in 0..25 {
            out.push(cl.get("/after", &[]).await);
        }
        out
    });
    let answers: Vec<Got> = join_all(clients).await.into_iter().flatten().collect();
    for g in &answers {
        assert_eq!(g.status, StatusCode::OK, "client saw an error: {}", g.body);
        assert_eq!(g.body, "b");
    }
    assert_eq!(b.served() - served_b, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_machines_dead_gives_502_with_reason() {
    let mut a = TestBackend::start("a").await;
    let proxy = TestProxy::start(spec(10, 20, &[("a", "local", a.addr)]), |_| {}).await;
    a.kill().await;
    let mut cl = Client::connect(proxy.addr).await;
    let g = cl.get("/", &[]).await;
    assert_eq!(g.status, StatusCode::BAD_GATEWAY);
    assert!(g.body.contains("127.0.0.1"), "{}", g.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_never_reach_the_machine() {
    let a = TestBackend::start("a").await;
    let proxy = TestProxy::start(spec(10, 20, &[("a", "local", a.addr)]), |_| {}).await;
    let big = "x".repeat(40 * 1024);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec(),
            "400",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: web.test\r\nX-Big: {big}\r\n\r\n").into_bytes(),
            "431",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".to_vec(),
            "400",
        ),
        (b"GET / HTTP/1.1\r\nUser-Agent: x\r\n\r\n".to_vec(), "400"),
        (b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n".to_vec(), "400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(), "400"),
        (b"GET / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 1, 2\r\n\r\nab".to_vec(), "400"),
        (b"GET /\x01 HTTP/1.1\r\nHost: web.test\r\n\r\n".to_vec(), "400"),
    ];
    for (bytes, want) in cases {
        let got = raw(proxy.addr, &bytes).await;
        let first = got.lines().next().unwrap_or("");
        assert!(
            first.starts_with(&format!("HTTP/1.1 {want}")),
            "request {:?} got {first:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
        );
    }
    // A well-formed request afterwards is the only one the machine ever saw.
    let ok = raw(
        proxy.addr,
        b"GET /ok HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let seen: Vec<String> = a.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(seen, vec!["/ok".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_machines_give_503_after_a_short_wait() {
    let a = TestBackend::start("a").await;
    a.close_gate();
    let proxy = TestProxy::start(spec(1, 1, &[("a", "local", a.addr)]), |c| {
        c.queue_timeout = Duration::from_millis(200);
    })
    .await;
    let addr = proxy.addr;
    let first = tokio::spawn(async move { Client::connect(addr).await.get("/1", &[]).await });
    let mut active = a.active();
    wait_for(&mut active, "first request at the machine", |n| *n == 1).await;
    let started = std::time::Instant::now();
    let second = Client::connect(proxy.addr).await.get("/2", &[]).await;
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(second.body.contains("hard limit"), "{}", second.body);
    assert!(started.elapsed() >= Duration::from_millis(200));
    a.open();
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    assert_eq!(a.max_concurrent(), 1);
    assert_eq!(a.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_request_proceeds_when_a_slot_frees() {
    let a = TestBackend::start("a").await;
    a.close_gate();
    let proxy = TestProxy::start(spec(1, 1, &[("a", "local", a.addr)]), |c| {
        c.queue_timeout = Duration::from_secs(15);
    })
    .await;
    let addr = proxy.addr;
    let first = tokio::spawn(async move { Client::connect(addr).await.get("/1", &[]).await });
    let mut active = a.active();
    wait_for(&mut active, "first request at the machine", |n| *n == 1).await;
    let second = tokio::spawn(async move { Client::connect(addr).await.get("/2", &[]).await });
    a.open();
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    assert_eq!(second.await.unwrap().status, StatusCode::OK);
    assert_eq!(a.max_concurrent(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_set() {
    let a = TestBackend::start("a").await;
    let proxy = TestProxy::start(spec(10, 20, &[("a", "local", a.addr)]), |_| {}).await;
    let mut cl = Client::connect(proxy.addr).await;
    let g = cl
        .get(
            "/h?q=1",
            &[
                ("x-forwarded-for", "10.0.0.9"),
                ("fly-client-ip", "6.6.6.6"),
                ("connection", "x-hop"),
                ("x-hop", "secret"),
            ],
        )
        .await;
    assert_eq!(g.status, StatusCode::OK);
    let rid = g
        .headers
        .get("fly-request-id")
        .expect("response request id");
    assert!(g.headers.get("via").is_some());
    let seen = a.seen();
    let h = &seen[0].headers;
    assert_eq!(seen[0].path, "/h?q=1");
    assert_eq!(h["fly-client-ip"], "127.0.0.1");
    assert_eq!(h["fly-region"], "local");
    assert_eq!(&h["fly-request-id"], rid);
    assert!(rid.to_str().unwrap().ends_with("-local"));
    assert_eq!(h["x-forwarded-for"], "10.0.0.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-port"], "80");
    assert!(h["via"].to_str().unwrap().contains("aloft"));
    assert_eq!(h["host"], "web.test");
    assert!(h.get("x-hop").is_none(), "hop-by-hop header forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_body_is_forwarded() {
    let a = TestBackend::start("a").await;
    let proxy = TestProxy::start(spec(10, 20, &[("a", "local", a.addr)]), |_| {}).await;
    let mut cl = Client::connect(proxy.addr).await;
    let big = "y".repeat(200 * 1024);
    for body in ["hello".to_string(), big.clone()] {
        let req = http::Request::post("/p")
            .header("host", "web.test")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        assert_eq!(cl.send(req).await.status, StatusCode::OK);
    }
    let chunked = raw(
        proxy.addr,
        b"POST /c HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 200"), "{chunked}");
    let seen = a.seen();
    assert_eq!(seen[0].body, "hello");
    assert_eq!(seen[1].body.len(), big.len());
    assert_eq!(seen[2].body, "abcde");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_preference_and_forced_instance() {
    let local = TestBackend::start("near").await;
    let far = TestBackend::start("far").await;
    let proxy = TestProxy::start(
        spec(
            1,
            1,
            &[("near", "local", local.addr), ("far", "fra", far.addr)],
        ),
        |c| c.queue_timeout = Duration::from_millis(100),
    )
    .await;
    let mut cl = Client::connect(proxy.addr).await;
    for _ in 0..5 {
        assert_eq!(cl.get("/", &[]).await.body, "near", "own region first");
    }
    assert_eq!(
        cl.get("/", &[("fly-prefer-region", "fra")]).await.body,
        "far"
    );
    assert_eq!(
        cl.get("/", &[("fly-force-instance-id", "far")]).await.body,
        "far"
    );
    let g = cl.get("/", &[("fly-force-instance-id", "nope")]).await;
    assert_eq!(g.status, StatusCode::NOT_FOUND);

    // The local machine at its hard limit: the next region takes the request.
    local.close_gate();
    let addr = proxy.addr;
    let held = tokio::spawn(async move { Client::connect(addr).await.get("/held", &[]).await });
    let mut active = local.active();
    wait_for(&mut active, "local machine full", |n| *n == 1).await;
    assert_eq!(cl.get("/", &[]).await.body, "far");
    local.open();
    assert_eq!(held.await.unwrap().body, "near");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_and_port_are_explained() {
    let a = TestBackend::start("a").await;
    let mut s = spec(10, 20, &[("a", "local", a.addr)]);
    s.apps[0].hostnames = vec!["web.test".into()];
    let proxy = TestProxy::start(s, |_| {}).await;
    let got = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 404"), "{got}");
    assert!(got.contains("other.test"), "{got}");
    assert_eq!(a.seen().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_swap_takes_effect_without_restart() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let proxy = TestProxy::start(spec(10, 20, &[("a", "local", a.addr)]), |_| {}).await;
    let mut cl = Client::connect(proxy.addr).await;
    assert_eq!(cl.get("/", &[]).await.body, "a");
    proxy
        .routes
        .update(&spec(10, 20, &[("b", "local", b.addr)]))
        .unwrap();
    assert_eq!(cl.get("/", &[]).await.body, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests() {
    let a = TestBackend::start("a").await;
    a.close_gate();
    let mut proxy = TestProxy::start(spec(10, 20, &[("a", "local", a.addr)]), |c| {
        c.drain_timeout = Duration::from_secs(15);
    })
    .await;
    let addr = proxy.addr;
    let inflight = tokio::spawn(async move { Client::connect(addr).await.get("/slow", &[]).await });
    let mut active = a.active();
    wait_for(&mut active, "request in flight", |n| *n == 1).await;
    let done = proxy.shutdown();
    // The listener closes: new connections are refused.
    let refused = async {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(DEADLINE, refused)
        .await
        .expect("listener closed");
    assert!(!done.is_finished());
    a.open();
    assert_eq!(inflight.await.unwrap().status, StatusCode::OK);
    let report = tokio::time::timeout(DEADLINE, done).await.unwrap().unwrap();
    assert_eq!(report.cut_at_drain, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_framings_are_relayed() {
    let chunked = raw_backend(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Machine: c\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        false,
    )
    .await;
    let eof = raw_backend(b"HTTP/1.0 200 OK\r\nX-Machine: e\r\n\r\nuntil close", true).await;
    let empty = raw_backend(b"HTTP/1.1 204 No Content\r\nX-Machine: n\r\n\r\n", false).await;
    for (addr, want) in [(chunked, "hello world"), (eof, "until close"), (empty, "")] {
        let proxy = TestProxy::start(spec(10, 20, &[("m", "local", addr)]), |_| {}).await;
        let mut cl = Client::connect(proxy.addr).await;
        for _ in 0..3 {
            let g = cl.get("/", &[]).await;
            assert!(g.status.is_success(), "{g:?}");
            assert_eq!(g.body, want);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_response_gives_502() {
    let bad = raw_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        false,
    )
    .await;
    let proxy = TestProxy::start(spec(10, 20, &[("m", "local", bad)]), |_| {}).await;
    let g = Client::connect(proxy.addr).await.get("/", &[]).await;
    assert_eq!(g.status, StatusCode::BAD_GATEWAY);
    assert!(g.body.contains("Content-Length"), "{}", g.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_machine_gives_504() {
    let a = TestBackend::start("a").await;
    a.close_gate();
    let proxy = TestProxy::start(spec(10, 20, &[("a", "local", a.addr)]), |c| {
        c.response_timeout = Duration::from_millis(200);
    })
    .await;
    let g = Client::connect(proxy.addr).await.get("/", &[]).await;
    assert_eq!(g.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(g.body.contains("no response"), "{}", g.body);
    a.open();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_is_tunnelled() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A machine that accepts `Upgrade: echo` and then echoes bytes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.contains("upgrade: echo"), "{head}");
        assert!(head.contains("connection: upgrade"), "{head}");
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n",
        )
        .await
        .unwrap();
        let mut buf = [0u8; 64];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            s.write_all(&buf[..n]).await.unwrap();
        }
    });
    let proxy = TestProxy::start(spec(10, 20, &[("m", "local", addr)]), |_| {}).await;
    let mut c = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(
        b"GET /ws HTTP/1.1\r\nHost: web.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let exchange = async {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            c.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        c.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    };
    tokio::time::timeout(DEADLINE, exchange)
        .await
        .expect("tunnel works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_is_served() {
    use http_body_util::{BodyExt, Empty};
    let a = TestBackend::start("a").await;
    let proxy = TestProxy::start(spec(10, 20, &[("a", "local", a.addr)]), |_| {}).await;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = http::Request::get("http://web.test/h2")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = tokio::time::timeout(DEADLINE, sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"a");
    }
    assert_eq!(a.seen()[0].headers["host"], "web.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fly_replay_sends_the_request_to_the_named_region() {
    let near = raw_backend(
        b"HTTP/1.1 409 Conflict\r\nfly-replay: region=fra\r\nContent-Length: 7\r\n\r\nreplay!",
        false,
    )
    .await;
    let far = TestBackend::start("far").await;
    let proxy = TestProxy::start(
        spec(10, 20, &[("near", "local", near), ("far", "fra", far.addr)]),
        |_| {},
    )
    .await;
    let mut cl = Client::connect(proxy.addr).await;
    let g = cl.get("/r", &[]).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.body);
    assert_eq!(g.body, "far");
    let seen = far.seen();
    let src = seen[0].headers["fly-replay-src"].to_str().unwrap();
    assert!(
        src.contains("instance=near") && src.contains("region=local"),
        "{src}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_https_redirects() {
    let a = TestBackend::start("a").await;
    let mut s = spec(10, 20, &[("a", "local", a.addr)]);
    s.apps[0].services[0].ports[0].force_https = true;
    let proxy = TestProxy::start(s, |_| {}).await;
    let g = Client::connect(proxy.addr).await.get("/x?y=1", &[]).await;
    assert_eq!(g.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(g.headers["location"], "https://web.test/x?y=1");
    assert!(a.seen().is_empty());
}
