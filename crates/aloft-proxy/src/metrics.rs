//! Prometheus metrics and the access log.
//!
//! The hot path only touches atomics: every app's counters live in an [`AppMetrics`]
//! that the route table resolves once when it is built (a mutex is taken then, never
//! per request), and per-machine in-flight counts are the balancer's own counters,
//! read at scrape time by walking the current route tables. `/metrics` is served on a
//! separate admin listener ([`serve_admin`]) in the Prometheus text format (0.0.4).
//!
//! The access log is one `tracing` event per request, target `aloft_proxy::access`,
//! carrying the request id (`Fly-Request-Id`), app, machine, status, duration and
//! response body bytes; it is written when the response body ends (or is dropped).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::HeaderValue;
use tokio::net::TcpListener;

use crate::routes::Routes;

/// Upper bounds (seconds) of the latency histogram buckets; `+Inf` follows.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// The same bounds in microseconds, for the hot path.
const BUCKET_MICROS: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// Counters of one app. Every field is an atomic; nothing here allocates per request.
#[derive(Debug, Default)]
pub struct AppMetrics {
    /// Responses by status class: index 0 = 1xx … 4 = 5xx.
    status: [AtomicU64; 5],
    /// Cumulative-at-render histogram of the time to response head.
    buckets: [AtomicU64; 15],
    latency_sum_micros: AtomicU64,
    in_flight: AtomicI64,
    retries: AtomicU64,
    autostarts: AtomicU64,
    queue_rejections: AtomicU64,
}

impl AppMetrics {
    /// A request entered the proxy for this app; the guard counts it in flight.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// A response head went back to the client after `took`.
    pub fn observe(&self, status: u16, took: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.status[class].fetch_add(1, Ordering::Relaxed);
        let micros = took.as_micros().min(u128::from(u64::MAX)) as u64;
        let bucket = BUCKET_MICROS
            .iter()
            .position(|&b| micros <= b)
            .unwrap_or(BUCKET_MICROS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// A request was sent again to another machine.
    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// The proxy asked for a stopped machine to be started.
    pub fn autostart(&self) {
        self.autostarts.fetch_add(1, Ordering::Relaxed);
    }

    /// A request got 503 because every machine was full and the queue was full or
    /// waited too long.
    pub fn queue_rejected(&self) {
        self.queue_rejections.fetch_add(1, Ordering::Relaxed);
    }

    /// Responses of status class `class` (1..=5) so far.
    pub fn responses(&self, class: usize) -> u64 {
        self.status[class.clamp(1, 5) - 1].load(Ordering::Relaxed)
    }

    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
}

/// Holds one request in an app's in-flight gauge.
#[derive(Debug)]
pub struct InFlight(Arc<AppMetrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Registry {
    apps: Mutex<BTreeMap<Arc<str>, Arc<AppMetrics>>>,
    routes: Mutex<Vec<std::sync::Weak<Routes>>>,
    tls_ok: AtomicU64,
    tls_failed: AtomicU64,
    connections: AtomicU64,
    unrouted: AtomicU64,
}

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::default)
}

/// The counters of `app`, created on first use. Called when a route table is built,
/// not per request.
pub fn app(name: &str) -> Arc<AppMetrics> {
    let mut apps = registry().apps.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = apps.get(name) {
        return Arc::clone(m);
    }
    let m = Arc::new(AppMetrics::default());
    apps.insert(Arc::from(name), Arc::clone(&m));
    m
}

/// Makes the machines of `routes` appear in the per-machine in-flight gauge.
pub fn register_routes(routes: &Arc<Routes>) {
    let mut all = registry().routes.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|w| w.strong_count() > 0);
    if !all
        .iter()
        .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(routes)))
    {
        all.push(Arc::downgrade(routes));
    }
}

/// A TLS handshake with a client finished (`ok`) or failed.
pub fn tls_handshake(ok: bool) {
    let r = registry();
    if ok {
        r.tls_ok.fetch_add(1, Ordering::Relaxed);
    } else {
        r.tls_failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// A client connection was accepted.
pub fn connection_accepted() {
    registry().connections.fetch_add(1, Ordering::Relaxed);
}

/// A request matched no app (404 before any app is known).
pub fn unrouted() {
    registry().unrouted.fetch_add(1, Ordering::Relaxed);
}

fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Every metric in the Prometheus text exposition format 0.0.4.
pub fn render() -> String {
    let r = registry();
    let apps: Vec<(Arc<str>, Arc<AppMetrics>)> = r
        .apps
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (Arc::clone(k), Arc::clone(v)))
        .collect();
    let mut out = String::with_capacity(4096);
    let w = &mut out;

    let _ = writeln!(
        w,
        "# HELP aloft_proxy_requests_total Responses sent, by app and status class."
    );
    let _ = writeln!(w, "# TYPE aloft_proxy_requests_total counter");
    for (name, m) in &apps {
        let app = escape(name);
        for class in 1..=5 {
            let _ = writeln!(
                w,
                "aloft_proxy_requests_total{{app=\"{app}\",status=\"{class}xx\"}} {}",
                m.responses(class)
            );
        }
    }
    let _ = writeln!(
        w,
        "# HELP aloft_proxy_unrouted_requests_total Requests for a host no app serves."
    );
    let _ = writeln!(w, "# TYPE aloft_proxy_unrouted_requests_total counter");
    let _ = writeln!(
        w,
        "aloft_proxy_unrouted_requests_total {}",
        r.unrouted.load(Ordering::Relaxed)
    );

    let _ = writeln!(
        w,
        "# HELP aloft_proxy_request_duration_seconds Time from request head to response head."
    );
    let _ = writeln!(w, "# TYPE aloft_proxy_request_duration_seconds histogram");
    for (name, m) in &apps {
        let app = escape(name);
        let mut cum = 0u64;
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            cum += m.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                w,
                "aloft_proxy_request_duration_seconds_bucket{{app=\"{app}\",le=\"{le}\"}} {cum}"
            );
        }
        cum += m.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            w,
            "aloft_proxy_request_duration_seconds_bucket{{app=\"{app}\",le=\"+Inf\"}} {cum}"
        );
        let sum = m.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            w,
            "aloft_proxy_request_duration_seconds_sum{{app=\"{app}\"}} {sum}"
        );
        let _ = writeln!(
            w,
            "aloft_proxy_request_duration_seconds_count{{app=\"{app}\"}} {cum}"
        );
    }

    type Family<'a> = (&'a str, &'a str, &'a str, fn(&AppMetrics) -> i64);
    let gauges: [Family<'_>; 4] = [
        (
            "aloft_proxy_app_in_flight",
            "gauge",
            "Requests in flight, by app.",
            |m| m.in_flight.load(Ordering::Relaxed),
        ),
        (
            "aloft_proxy_retries_total",
            "counter",
            "Requests sent again to another machine.",
            |m| m.retries.load(Ordering::Relaxed) as i64,
        ),
        (
            "aloft_proxy_autostarts_total",
            "counter",
            "Stopped machines the proxy asked to start.",
            |m| m.autostarts.load(Ordering::Relaxed) as i64,
        ),
        (
            "aloft_proxy_queue_rejections_total",
            "counter",
            "Requests refused with 503 because every machine stayed at its hard limit.",
            |m| m.queue_rejections.load(Ordering::Relaxed) as i64,
        ),
    ];
    for (metric, kind, help, get) in gauges {
        let _ = writeln!(w, "# HELP {metric} {help}");
        let _ = writeln!(w, "# TYPE {metric} {kind}");
        for (name, m) in &apps {
            let _ = writeln!(w, "{metric}{{app=\"{}\"}} {}", escape(name), get(m));
        }
    }

    let _ = writeln!(
        w,
        "# HELP aloft_proxy_machine_in_flight Requests in flight, by machine."
    );
    let _ = writeln!(w, "# TYPE aloft_proxy_machine_in_flight gauge");
    let routes: Vec<Arc<Routes>> = r
        .routes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .collect();
    let mut seen = std::collections::HashSet::new();
    for routes in routes {
        let table = routes.load_full();
        for app in table.apps() {
            for svc in &app.services {
                for g in &svc.groups {
                    for b in &g.backends {
                        if !seen.insert(Arc::as_ptr(b) as usize) {
                            continue;
                        }
                        let _ = writeln!(
                            w,
                            "aloft_proxy_machine_in_flight{{proxy_region=\"{}\",app=\"{}\",machine=\"{}\",region=\"{}\",port=\"{}\"}} {}",
                            escape(routes.region()),
                            escape(&app.name),
                            escape(&b.machine_id),
                            escape(&b.region),
                            svc.internal_port,
                            b.in_flight()
                        );
                    }
                }
            }
        }
    }

    let _ = writeln!(
        w,
        "# HELP aloft_proxy_tls_handshakes_total TLS handshakes with clients, by result."
    );
    let _ = writeln!(w, "# TYPE aloft_proxy_tls_handshakes_total counter");
    let _ = writeln!(
        w,
        "aloft_proxy_tls_handshakes_total{{result=\"ok\"}} {}",
        r.tls_ok.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        w,
        "aloft_proxy_tls_handshakes_total{{result=\"failed\"}} {}",
        r.tls_failed.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        w,
        "# HELP aloft_proxy_connections_total Client connections accepted."
    );
    let _ = writeln!(w, "# TYPE aloft_proxy_connections_total counter");
    let _ = writeln!(
        w,
        "aloft_proxy_connections_total {}",
        r.connections.load(Ordering::Relaxed)
    );
    out
}

/// Serve `GET /metrics` (and `GET /healthz`) on `listener` until `shutdown` completes.
/// The admin listener is separate from the public ones so metrics are never routed to
/// an app and need not be exposed publicly.
pub async fn serve_admin(listener: TcpListener, shutdown: impl Future<Output = ()>) {
    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;

    let handle = |req: Request<Incoming>| async move {
        let (status, ctype, body) = match req.uri().path() {
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                render(),
            ),
            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
            p => (
                StatusCode::NOT_FOUND,
                "text/plain",
                format!("no admin endpoint {p}; try /metrics\n"),
            ),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ctype));
        Ok::<_, std::convert::Infallible>(resp)
    };
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle));
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

/// What the access log line of one request says; emitted once, when dropped.
#[derive(Debug)]
pub struct AccessLog {
    pub request_id: HeaderValue,
    pub app: Arc<str>,
    pub machine: Option<Arc<str>>,
    pub method: http::Method,
    pub status: u16,
    pub started: Instant,
    pub bytes: u64,
}

impl AccessLog {
    /// Whether access lines are wanted at all (checked before building one).
    pub fn enabled() -> bool {
        tracing::enabled!(target: "aloft_proxy::access", tracing::Level::INFO)
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        tracing::info!(
            target: "aloft_proxy::access",
            request_id = %String::from_utf8_lossy(self.request_id.as_bytes()),
            app = %self.app,
            machine = self.machine.as_deref().unwrap_or("-"),
            method = %self.method,
            status = self.status,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            bytes = self.bytes,
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_classes() {
        let m = app("metrics-unit-test");
        m.observe(200, Duration::from_micros(300));
        m.observe(503, Duration::from_millis(7));
        m.observe(404, Duration::from_secs(30));
        assert_eq!(m.responses(2), 1);
        assert_eq!(m.responses(5), 1);
        assert_eq!(m.responses(4), 1);
        let text = render();
        assert!(text.contains(
            "aloft_proxy_request_duration_seconds_bucket{app=\"metrics-unit-test\",le=\"0.0005\"} 1"
        ));
        assert!(text.contains(
            "aloft_proxy_request_duration_seconds_bucket{app=\"metrics-unit-test\",le=\"0.01\"} 2"
        ));
        assert!(text.contains(
            "aloft_proxy_request_duration_seconds_bucket{app=\"metrics-unit-test\",le=\"+Inf\"} 3"
        ));
        assert!(
            text.contains(
                "aloft_proxy_request_duration_seconds_count{app=\"metrics-unit-test\"} 3"
            )
        );
        let g = m.start();
        assert!(render().contains("aloft_proxy_app_in_flight{app=\"metrics-unit-test\"} 1"));
        drop(g);
        assert!(render().contains("aloft_proxy_app_in_flight{app=\"metrics-unit-test\"} 0"));
    }
}
