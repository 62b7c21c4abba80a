//! Test launchers: backends that count their own concurrency, a proxy on port 0, and
//! a small HTTP client. Everything binds 127.0.0.1:0 and is stopped by the test.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aloft_proxy::{Listener, ProxyConfig, Routes, RoutesSpec, ServeReport};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub const DEADLINE: Duration = Duration::from_secs(20);

/// What a test backend saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

struct BackendState {
    name: String,
    current: AtomicUsize,
    max: AtomicUsize,
    served: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    gate: watch::Receiver<bool>,
    /// Total requests currently inside the handler, for waiting on events.
    active: watch::Sender<usize>,
}

/// A keep-alive HTTP/1.1 backend answering `200 <name>`; it can hold requests at a
/// gate and be killed (listener and every connection dropped at once).
pub struct TestBackend {
    pub addr: SocketAddr,
    state: Arc<BackendState>,
    gate: watch::Sender<bool>,
    tasks: Option<tokio::task::JoinHandle<()>>,
}

impl TestBackend {
    pub async fn start(name: &str) -> TestBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (gate_tx, gate_rx) = watch::channel(true);
        let (active, _) = watch::channel(0usize);
        let state = Arc::new(BackendState {
            name: name.to_string(),
            current: AtomicUsize::new(0),
            max: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            gate: gate_rx,
            active,
        });
        let st = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = Arc::clone(&st);
                conns.spawn(async move {
                    let svc = service_fn(move |req| serve_one(req, Arc::clone(&st)));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            // Dropping `conns` (when this task is aborted) closes every connection.
        });
        TestBackend {
            addr,
            state,
            gate: gate_tx,
            tasks: Some(task),
        }
    }

    /// Hold new requests inside the handler until [`TestBackend::open`].
    pub fn close_gate(&self) {
        self.gate.send_replace(false);
    }

    pub fn open(&self) {
        self.gate.send_replace(true);
    }

    pub fn max_concurrent(&self) -> usize {
        self.state.max.load(Ordering::SeqCst)
    }

    pub fn served(&self) -> usize {
        self.state.served.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Requests inside the handler right now, as a watch to wait on.
    pub fn active(&self) -> watch::Receiver<usize> {
        self.state.active.subscribe()
    }

    /// Kill: stop accepting and drop every open connection.
    pub async fn kill(&mut self) {
        if let Some(t) = self.tasks.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        if let Some(t) = self.tasks.take() {
            t.abort();
        }
    }
}

async fn serve_one(
    req: Request<Incoming>,
    st: Arc<BackendState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let now = st.current.fetch_add(1, Ordering::SeqCst) + 1;
    st.max.fetch_max(now, Ordering::SeqCst);
    st.active.send_modify(|n| *n += 1);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    st.seen.lock().unwrap().push(Seen {
        path: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body,
    });
    let mut gate = st.gate.clone();
    let _ = gate.wait_for(|open| *open).await;
    st.served.fetch_add(1, Ordering::SeqCst);
    st.current.fetch_sub(1, Ordering::SeqCst);
    st.active.send_modify(|n| *n -= 1);
    let mut resp = Response::new(Full::new(Bytes::from(st.name.clone())));
    resp.headers_mut()
        .insert("x-machine", st.name.parse().unwrap());
    Ok(resp)
}

/// Wait until `rx` satisfies `f`, failing the test after [`DEADLINE`].
pub async fn wait_for<T>(rx: &mut watch::Receiver<T>, what: &str, f: impl FnMut(&T) -> bool) {
    match tokio::time::timeout(DEADLINE, rx.wait_for(f)).await {
        Ok(Ok(_)) => {}
        _ => panic!("timed out waiting for {what}"),
    }
}

/// A proxy served in-process on 127.0.0.1:0 with public port 80.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub routes: Arc<Routes>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<ServeReport>>,
}

impl TestProxy {
    pub async fn start(spec: RoutesSpec, cfg: impl FnOnce(&mut ProxyConfig)) -> TestProxy {
        let routes = Arc::new(Routes::new("local"));
        routes.update(&spec).expect("valid routes");
        let mut config = ProxyConfig::default();
        cfg(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(aloft_proxy::serve(
            vec![Listener {
                listener,
                public_port: 80,
            }],
            Arc::clone(&routes),
            config,
            async {
                let _ = rx.await;
            },
        ));
        TestProxy {
            addr,
            routes,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Signal shutdown; returns the join handle so a test can wait for the drain.
    pub fn shutdown(&mut self) -> tokio::task::JoinHandle<ServeReport> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("proxy already stopped")
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Routes for one app on public port 80 with the given machines `(id, region, addr)`.
pub fn spec(soft: u32, hard: u32, machines: &[(&str, &str, SocketAddr)]) -> RoutesSpec {
    let mut text = format!(
        r#"
        [[apps]]
        name = "web"
        hostnames = ["web.test", "*"]
        [[apps.services]]
        internal_port = 8080
        ports = [{{ port = 80, handlers = ["http"] }}]
        concurrency = {{ type = "requests", soft_limit = {soft}, hard_limit = {hard} }}
        "#
    );
    for (id, region, addr) in machines {
        text.push_str(&format!(
            "[[apps.machines]]\nid = \"{id}\"\nregion = \"{region}\"\naddress = \"{addr}\"\nstate = \"started\"\n"
        ));
    }
    toml::from_str(&text).unwrap()
}

/// A response as a test sees it.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

/// A keep-alive client connection to the proxy.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client { sender }
    }

    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Got {
        let mut b = Request::get(path).header("host", "web.test");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Full::new(Bytes::new())).unwrap()).await
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Got {
        let fut = async {
            self.sender.ready().await.unwrap();
            let resp = self.sender.send_request(req).await.unwrap();
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            Got {
                status: parts.status,
                headers: parts.headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            }
        };
        tokio::time::timeout(DEADLINE, fut)
            .await
            .expect("response within deadline")
    }
}

/// Send raw bytes on a new connection and read until the proxy closes it (or the
/// response head is complete and `Connection: close` is absent, up to the deadline).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The proxy may answer and close before we finish writing an oversized request.
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if complete_response(&out) {
                        break;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(DEADLINE, read).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn complete_response(b: &[u8]) -> bool {
    let text = String::from_utf8_lossy(b);
    let Some(end) = text.find("\r\n\r\n") else {
        return false;
    };
    let head = text[..end].to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    text.len() >= end + 4 + len
}

/// Count of each `x-machine` answer.
pub fn tally(answers: &[Got]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for g in answers {
        let k = g
            .headers
            .get("x-machine")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string();
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// A backend that answers every request head it reads with the same raw bytes, then
/// closes the connection if `close` is set.
pub async fn raw_backend(response: &'static [u8], close: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if s.write_all(response).await.is_err() {
                            return;
                        }
                        if close {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// One line from `r` (a relayed TCP stream), within [`DEADLINE`].
pub async fn read_line<R: tokio::io::AsyncRead + Unpin>(r: &mut tokio::io::BufReader<R>) -> String {
    use tokio::io::AsyncBufReadExt;
    let mut line = String::new();
    tokio::time::timeout(DEADLINE, r.read_line(&mut line))
        .await
        .expect("line in time")
        .unwrap();
    line
}
