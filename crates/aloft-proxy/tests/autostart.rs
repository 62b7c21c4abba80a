//! Autostart: a request for an app whose machines are all stopped asks the machine
//! owner to start one, waits for the routes to show it started, and is served; a start
//! that fails gives a 503 saying why; concurrent requests cause one start.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use aloft_proxy::{MachineStarter, Routes, RoutesSpec};
use common::*;
use http::StatusCode;

fn with_state(mut spec: RoutesSpec, state: &str) -> RoutesSpec {
    for app in &mut spec.apps {
        for m in &mut app.machines {
            m.state = state.to_string();
        }
    }
    spec
}

/// "Starts" a machine by publishing it as started (its backend already listens).
struct PublishStarted {
    routes: std::sync::OnceLock<Arc<Routes>>,
    spec: RoutesSpec,
    calls: AtomicUsize,
    fail: bool,
}

#[async_trait::async_trait]
impl MachineStarter for PublishStarted {
    async fn start_machine(&self, app: &str, machine_id: &str) -> Result<(), String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        assert_eq!((app, machine_id), ("web", "a"));
        if self.fail {
            return Err("no capacity on host h1".into());
        }
        // A machine takes a moment to boot.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let routes = self.routes.get().expect("routes set");
        routes
            .update(&with_state(self.spec.clone(), "started"))
            .map_err(|e| e.to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_app_is_started_by_the_first_requests() {
    let a = TestBackend::start("a").await;
    let started = spec(10, 20, &[("a", "local", a.addr)]);
    let proxy = TestProxy::start(with_state(started.clone(), "stopped"), |_| {}).await;
    let starter = Arc::new(PublishStarted {
        routes: std::sync::OnceLock::new(),
        spec: started,
        calls: AtomicUsize::new(0),
        fail: false,
    });
    let _ = starter.routes.set(Arc::clone(&proxy.routes));
    proxy.routes.set_starter(starter.clone());
    let clients = (0..5).map(|_| async {
        let mut cl = Client::connect(proxy.addr).await;
        cl.get("/", &[]).await
    });
    let answers = futures::future::join_all(clients).await;
    for g in &answers {
        assert_eq!(g.status, StatusCode::OK, "{g:?}");
        assert_eq!(g.body, "a");
    }
    assert_eq!(
        starter.calls.load(Ordering::SeqCst),
        1,
        "one start for five requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_autostart_is_a_503_saying_why() {
    let a = TestBackend::start("a").await;
    let started = spec(10, 20, &[("a", "local", a.addr)]);
    let proxy = TestProxy::start(with_state(started.clone(), "stopped"), |_| {}).await;
    let starter = Arc::new(PublishStarted {
        routes: std::sync::OnceLock::new(),
        spec: started,
        calls: AtomicUsize::new(0),
        fail: true,
    });
    proxy.routes.set_starter(starter);
    let mut cl = Client::connect(proxy.addr).await;
    let g = cl.get("/", &[]).await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        g.body.contains("could not start a machine") && g.body.contains("no capacity"),
        "{}",
        g.body
    );
}

/// Records autostop requests.
#[derive(Default)]
struct RecordStops {
    stops: std::sync::Mutex<Vec<(String, bool)>>,
}

#[async_trait::async_trait]
impl MachineStarter for RecordStops {
    async fn start_machine(&self, _app: &str, _machine_id: &str) -> Result<(), String> {
        Ok(())
    }
    async fn stop_machine(
        &self,
        _app: &str,
        machine_id: &str,
        suspend: bool,
    ) -> Result<(), String> {
        self.stops
            .lock()
            .unwrap()
            .push((machine_id.to_string(), suspend));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_machines_above_the_minimum_are_stopped_one_per_pass() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let mut s = spec(10, 20, &[("a", "local", a.addr), ("b", "local", b.addr)]);
    s.apps[0].services[0].autostop = Some("suspend".into());
    s.apps[0].services[0].min_machines_running = 1;
    let proxy = TestProxy::start(s, |_| {}).await;
    let owner = Arc::new(RecordStops::default());
    proxy.routes.set_starter(owner.clone());
    let idle = std::time::Duration::from_millis(300);
    let task = tokio::spawn(aloft_proxy::catalog::autostop(
        Arc::clone(&proxy.routes),
        idle,
    ));
    // Busy: requests keep both machines active for a while, nothing is stopped.
    let mut cl = Client::connect(proxy.addr).await;
    let until = tokio::time::Instant::now() + std::time::Duration::from_millis(600);
    while tokio::time::Instant::now() < until {
        assert_eq!(cl.get("/", &[]).await.status, StatusCode::OK);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(owner.stops.lock().unwrap().is_empty(), "stopped while busy");
    // Idle: exactly one is suspended (the other is the minimum), one per pass.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while owner.stops.lock().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "nothing stopped");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let stops = owner.stops.lock().unwrap().clone();
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert!(stops[0].1, "suspend asked for");
    task.abort();
}
