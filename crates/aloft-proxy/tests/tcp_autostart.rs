//! Autostart and autostop for raw TCP services through real sockets: a connection to
//! a service whose machines are all stopped starts one (once, however many connect)
//! and is relayed to it; a failed start closes the connection; a machine with an open
//! relayed connection is never idle for autostop, and is stopped once it closes.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aloft_proxy::{MachineStarter, Routes, RoutesSpec};
use common::{DEADLINE, TestProxy, read_line};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A TCP backend that greets `hello <name>\n`, then echoes.
async fn echo_backend(listener: TcpListener, name: &'static str) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let _ = s.write_all(format!("hello {name}\n").as_bytes()).await;
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// App `db` with a raw TCP service on public port 80 (`handlers = []`), and app
/// `other` with one on port 81; machines `(app, id, address, state)`.
fn spec(autostop: &str, machines: &[(&str, &str, SocketAddr, &str)]) -> RoutesSpec {
    let mut text = String::new();
    for (app, port) in [("db", 80), ("other", 81)] {
        text.push_str(&format!(
            r#"
            [[apps]]
            name = "{app}"
            hostnames = ["{app}.test"]
            [[apps.services]]
            internal_port = 5432
            ports = [{{ port = {port}, handlers = [] }}]
            autostop = "{autostop}"
            min_machines_running = 0
            "#
        ));
        for (_, id, addr, state) in machines.iter().filter(|m| m.0 == app) {
            text.push_str(&format!(
                "[[apps.machines]]\nid = \"{id}\"\nregion = \"local\"\naddress = \"{addr}\"\nstate = \"{state}\"\n"
            ));
        }
    }
    toml::from_str(&text).unwrap()
}

/// "Starts" machine m0 of `db`: binds a real echo backend, then publishes m0 as
/// started at its address.
struct BootEcho {
    routes: OnceLock<Arc<Routes>>,
    calls: AtomicUsize,
    fail: bool,
    backend: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[async_trait::async_trait]
impl MachineStarter for BootEcho {
    async fn start_machine(&self, app: &str, machine_id: &str) -> Result<(), String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        assert_eq!((app, machine_id), ("db", "m0"));
        if self.fail {
            return Err("no capacity on host h1".into());
        }
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        *self.backend.lock().unwrap() = Some(tokio::spawn(echo_backend(listener, "m0")));
        // A machine takes a moment to boot: connections arrive meanwhile.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let routes = self.routes.get().expect("routes set");
        routes
            .update(&spec("off", &[("db", "m0", addr, "started")]))
            .map_err(|e| e.to_string())
    }
}

impl Drop for BootEcho {
    fn drop(&mut self) {
        if let Some(t) = self.backend.lock().unwrap().take() {
            t.abort();
        }
    }
}

fn placeholder() -> SocketAddr {
    "127.0.0.1:1".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_to_stopped_machines_starts_one_and_relays() {
    let stopped = spec("off", &[("db", "m0", placeholder(), "stopped")]);
    let proxy = TestProxy::start(stopped, |_| {}).await;
    let starter = Arc::new(BootEcho {
        routes: OnceLock::new(),
        calls: AtomicUsize::new(0),
        fail: false,
        backend: Mutex::new(None),
    });
    let _ = starter.routes.set(Arc::clone(&proxy.routes));
    proxy.routes.set_starter(starter.clone());
    let clients = (0..3).map(|i| async move {
        let mut c = BufReader::new(TcpStream::connect(proxy.addr).await.unwrap());
        // The client speaks before any machine is started; its bytes wait.
        c.get_mut()
            .write_all(format!("ping {i}\n").as_bytes())
            .await
            .unwrap();
        let greeting = read_line(&mut c).await;
        let echo = read_line(&mut c).await;
        (greeting, echo, i)
    });
    for (greeting, echo, i) in futures::future::join_all(clients).await {
        assert_eq!(greeting, "hello m0\n");
        assert_eq!(echo, format!("ping {i}\n"));
    }
    assert_eq!(
        starter.calls.load(Ordering::SeqCst),
        1,
        "one start for three connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tcp_autostart_closes_the_connection() {
    let stopped = spec("off", &[("db", "m0", placeholder(), "stopped")]);
    let proxy = TestProxy::start(stopped, |_| {}).await;
    let starter = Arc::new(BootEcho {
        routes: OnceLock::new(),
        calls: AtomicUsize::new(0),
        fail: true,
        backend: Mutex::new(None),
    });
    proxy.routes.set_starter(starter.clone());
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(DEADLINE, c.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing relayed");
    assert_eq!(starter.calls.load(Ordering::SeqCst), 1);
}

/// Records autostop requests; machine states are left as they are.
#[derive(Default)]
struct RecordStops {
    stops: Mutex<Vec<String>>,
    changed: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl MachineStarter for RecordStops {
    async fn start_machine(&self, _app: &str, _machine_id: &str) -> Result<(), String> {
        Ok(())
    }
    async fn stop_machine(
        &self,
        app: &str,
        machine_id: &str,
        _suspend: bool,
    ) -> Result<(), String> {
        self.stops
            .lock()
            .unwrap()
            .push(format!("{app}/{machine_id}"));
        self.changed.notify_waiters();
        Ok(())
    }
}

impl RecordStops {
    fn count(&self, which: &str) -> usize {
        self.stops
            .lock()
            .unwrap()
            .iter()
            .filter(|s| *s == which)
            .count()
    }

    /// Wait until `which` has been asked to stop `n` times.
    async fn wait_stops(&self, which: &str, n: usize) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.count(which) >= n {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(DEADLINE, wait)
            .await
            .unwrap_or_else(|_| panic!("{which} not stopped {n} times in time"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tcp_connection_keeps_its_machine_from_autostop() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = tokio::spawn(echo_backend(listener, "m0"));
    // `other` has an idle machine the owner never stops: every autostop pass asks
    // for it again, which paces the test without sleeps.
    let s = spec(
        "stop",
        &[
            ("db", "m0", addr, "started"),
            ("other", "o1", placeholder(), "started"),
        ],
    );
    let proxy = TestProxy::start(s, |_| {}).await;
    let owner = Arc::new(RecordStops::default());
    proxy.routes.set_starter(owner.clone());

    let mut c = BufReader::new(TcpStream::connect(proxy.addr).await.unwrap());
    assert_eq!(read_line(&mut c).await, "hello m0\n");
    let idle = Duration::from_millis(200);
    let task = tokio::spawn(aloft_proxy::catalog::autostop(
        Arc::clone(&proxy.routes),
        idle,
    ));
    // Several passes after both machines were idle long enough: only `other` goes.
    owner.wait_stops("other/o1", 4).await;
    assert_eq!(owner.count("db/m0"), 0, "stopped with a connection open");
    c.get_mut().write_all(b"still here\n").await.unwrap();
    assert_eq!(read_line(&mut c).await, "still here\n");

    // Closed: the machine is idle from now on and gets stopped.
    drop(c);
    owner.wait_stops("db/m0", 1).await;
    task.abort();
    backend.abort();
}
