//! The HTTP/1.1 edge: accept, limit, parse, route, forward, drain.
//!
//! The request path is a stack of small steps, each one concern:
//! 1. `accept`   — a connection slot (max connections), TCP_NODELAY, per-connection
//!    facts (client IP, public port).
//! 2. hyper      — parsing with header size/count limits (431/400) and a header
//!    read timeout that is also the keep-alive idle timeout (slowloris).
//! 3. `validate` — framing (Content-Length with Transfer-Encoding → 400) and Host.
//! 4. `route`    — Host → app → service of the public port (same table for every
//!    route source).
//! 5. `headers`  — Fly-* and X-Forwarded-* headers, hop-by-hop removal.
//! 6. `body`     — small bodies are read whole first (malformed ones never reach a
//!    machine, and they can be replayed); big ones stream.
//! 7. `dispatch` — choose a machine (balance), wait briefly if all are full, connect
//!    from the pool, retry on another machine while the request is unconsumed.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::balance::{self, Capacity, Choice, Constraints, Lease};
use crate::body::{ReqBody, RespBody};
use crate::routes::{AppRoute, RouteTable, Routes, ServiceRoute};
use crate::scan::ScanStream;
use crate::upstream::{self, Head, Sent, UpstreamBody, UpstreamError};

/// hyper's own limit on header fields when none is set.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// Per-connection read buffer bound (bounded memory per connection).
const READ_BUF_MAX: usize = 128 * 1024;

/// Bodies up to this size are read whole before a machine is chosen.
const BUFFER_LIMIT: usize = 64 * 1024;

static FLY_CLIENT_IP: HeaderName = HeaderName::from_static("fly-client-ip");
static FLY_REGION: HeaderName = HeaderName::from_static("fly-region");
static FLY_REQUEST_ID: HeaderName = HeaderName::from_static("fly-request-id");
static FLY_PREFER_REGION: HeaderName = HeaderName::from_static("fly-prefer-region");
static FLY_FORCE_INSTANCE: HeaderName = HeaderName::from_static("fly-force-instance-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Limits and timeouts of one proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Time allowed to receive a request's headers, which is also how long an idle
    /// keep-alive connection is kept.
    pub header_read_timeout: Duration,
    /// Time allowed to receive the first 64 KiB of a request body, and
    /// then between two pieces of a longer one.
    pub body_read_timeout: Duration,
    /// Largest request head (request line + headers) in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// Most header fields in one request; more gets 431.
    pub max_headers: usize,
    /// Most client connections open at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// How long a request may wait for a machine below its hard limit.
    pub queue_timeout: Duration,
    /// Most requests waiting at once across the proxy; more get 503 at once.
    pub max_queued: usize,
    pub connect_timeout: Duration,
    /// Time allowed for a machine to send response headers.
    pub response_timeout: Duration,
    /// Machines tried for one request (the first try included).
    pub max_attempts: usize,
    /// How long a machine that refused a connection is avoided.
    pub failing_for: Duration,
    /// How long in-flight requests may take to finish on shutdown.
    pub drain_timeout: Duration,
    /// On shutdown, how long an HTTP/1 keep-alive connection may stay open waiting for
    /// its next request (answered with `Connection: close`) before it is closed while
    /// idle. Closing an idle connection races with a client sending on it; this grace
    /// lets busy connections end cleanly after a response instead (hitless reload).
    pub drain_idle_grace: Duration,
    /// Pending ACME challenges: `GET /.well-known/acme-challenge/{token}` is answered
    /// from them before routing (HTTP-01).
    pub acme_challenges: Option<Arc<crate::acme::Challenges>>,
    /// Public ports served as TLS (then HTTP) even when no service names them with
    /// `tls` (e.g. `aloft dev`'s HTTPS listener on 443).
    pub tls_ports: Arc<[u16]>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(30),
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_connections: 16 * 1024,
            queue_timeout: Duration::from_secs(1),
            max_queued: 1024,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(60),
            max_attempts: 3,
            failing_for: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(10),
            drain_idle_grace: Duration::from_secs(1),
            acme_challenges: None,
            tls_ports: Arc::from(Vec::new()),
        }
    }
}

/// A bound listener and the public port its traffic is routed by.
#[derive(Debug)]
pub struct Listener {
    pub listener: TcpListener,
    /// The port services name in `ports` (the bound port unless mapped).
    pub public_port: u16,
}

/// What a proxy did before it stopped.
#[derive(Debug, Default, Clone, Copy)]
pub struct ServeReport {
    pub connections: u64,
    /// Connections still open when the drain timeout ran out.
    pub cut_at_drain: usize,
}

pub(crate) struct Shared {
    pub(crate) routes: Arc<Routes>,
    pub(crate) cfg: ProxyConfig,
    pub(crate) capacity: Arc<Capacity>,
    region: HeaderValue,
    via: HeaderValue,
    region_suffix: String,
    /// Set when shutdown begins: HTTP/1 responses then carry `Connection: close`.
    draining: AtomicBool,
}

struct ConnCtx {
    shared: Arc<Shared>,
    client_ip: IpAddr,
    client_ip_hv: HeaderValue,
    public_port: u16,
    port_hv: HeaderValue,
    /// Set by [`ScanStream`] when a request head had Content-Length and
    /// Transfer-Encoding.
    framing_conflict: Arc<AtomicBool>,
    /// The connection came over TLS (X-Forwarded-Proto https, no force_https).
    tls: bool,
}

/// Serve `listeners` with `routes` until `shutdown` completes, then stop accepting,
/// let in-flight requests finish (up to `drain_timeout`) and return.
pub async fn serve(
    listeners: Vec<Listener>,
    routes: Arc<Routes>,
    cfg: ProxyConfig,
    shutdown: impl Future<Output = ()>,
) -> ServeReport {
    let region = HeaderValue::from_str(routes.region())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    crate::metrics::register_routes(&routes);
    let shared = Arc::new(Shared {
        region_suffix: format!("-{}", routes.region()),
        draining: AtomicBool::new(false),
        routes,
        capacity: Arc::new(Capacity::default()),
        region,
        via: HeaderValue::from_static("1.1 aloft"),
        cfg,
    });
    let slots = Arc::new(Semaphore::new(shared.cfg.max_connections));
    let accepted = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let mut loops = Vec::new();
    for l in listeners {
        let shared = Arc::clone(&shared);
        let slots = Arc::clone(&slots);
        let accepted = Arc::clone(&accepted);
        let mut stop = stop_rx.clone();
        loops.push(tokio::spawn(async move {
            let port_hv = HeaderValue::from(l.public_port);
            loop {
                let permit = tokio::select! {
                    p = Arc::clone(&slots).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    _ = stop.changed() => return,
                };
                let (stream, peer) = tokio::select! {
                    r = l.listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            // Out of descriptors and the like: back off briefly.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    },
                    _ = stop.changed() => return,
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                crate::metrics::connection_accepted();
                let _ = stream.set_nodelay(true);
                // tls / tcp: ports whose services name `tls` or no `http` handler.
                let mode = crate::tcp::port_mode(&shared, l.public_port);
                if mode != crate::tcp::PortMode::Http {
                    let (shared, stop, port) = (Arc::clone(&shared), stop.clone(), l.public_port);
                    tokio::spawn(async move {
                        crate::tcp::serve_port(mode, stream, peer, port, shared, stop).await;
                        drop(permit);
                    });
                    continue;
                }
                let ip = canonical_ip(peer);
                let framing_conflict = Arc::new(AtomicBool::new(false));
                let stream = ScanStream::new(
                    crate::tls::ClientStream::Tcp(stream),
                    Arc::clone(&framing_conflict),
                );
                let ctx = Arc::new(ConnCtx {
                    tls: false,
                    framing_conflict,
                    shared: Arc::clone(&shared),
                    client_ip: ip,
                    client_ip_hv: header_value_of(&ip.to_string()),
                    public_port: l.public_port,
                    port_hv: port_hv.clone(),
                });
                let svc = service_fn(move |req| handle(req, Arc::clone(&ctx)));
                let cfg = shared.cfg.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    serve_connection(stream, svc, &cfg, stop).await;
                    tracing::trace!(%peer, "client connection closed");
                    drop(permit);
                });
            }
        }));
    }

    shutdown.await;
    shared.draining.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    // Every open connection holds a slot: draining is getting all slots back.
    let max = shared.cfg.max_connections;
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let cut_at_drain =
        match tokio::time::timeout(shared.cfg.drain_timeout, slots.acquire_many(all)).await {
            Ok(_) => 0,
            Err(_) => max.saturating_sub(slots.available_permits()),
        };
    ServeReport {
        connections: accepted.load(Ordering::Relaxed),
        cut_at_drain,
    }
}

/// The HTTP/2 connection preface a client with prior knowledge (h2c) starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Does the connection start with the HTTP/2 preface? Peeks without consuming,
/// deciding as soon as the first bytes differ.
async fn is_h2c(stream: &ScanStream<crate::tls::ClientStream>) -> std::io::Result<bool> {
    // Over TLS, ALPN has decided.
    let tcp = match stream.get_ref() {
        crate::tls::ClientStream::Tcp(t) => t,
        tls => return Ok(tls.alpn_h2() == Some(true)),
    };
    let mut buf = [0u8; 24];
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        // A partial preface: wait for more bytes to arrive.
        tcp.readable().await?;
    }
}

/// Serve one client connection: HTTP/1.1 (with upgrades) or, when it opens with the
/// preface, HTTP/2 (h2c). On `stop` the connection finishes its in-flight requests
/// and closes.
async fn serve_connection<S>(
    stream: ScanStream<crate::tls::ClientStream>,
    svc: S,
    cfg: &ProxyConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    S: hyper::service::HttpService<Incoming, ResBody = RespBody> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // The header read timeout bounds the wait for a first byte too.
    let h2 = match tokio::time::timeout(cfg.header_read_timeout, is_h2c(&stream)).await {
        Ok(Ok(h2)) => h2,
        _ => return,
    };
    let io = TokioIo::new(stream);
    let result = if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(256)
            .max_header_list_size(cfg.max_header_bytes.min(u32::MAX as usize) as u32)
            .serve_connection(io, svc);
        tokio::pin!(conn);
        let finished = tokio::select! {
            r = conn.as_mut() => Some(r),
            _ = stop.wait_for(|s| *s) => None,
        };
        match finished {
            Some(r) => r,
            None => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        if cfg.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            // hyper's default count uses an inline array; others allocate.
            b.max_headers(cfg.max_headers);
        }
        let conn = b
            .timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout)
            .max_header_size(cfg.max_header_bytes)
            .max_buf_size(READ_BUF_MAX.max(cfg.max_header_bytes + 8192))
            .keep_alive(true)
            .serve_connection(io, svc)
            .with_upgrades();
        tokio::pin!(conn);
        let mut finished = tokio::select! {
            r = conn.as_mut() => Some(r),
            _ = stop.wait_for(|s| *s) => None,
        };
        if finished.is_none() {
            // Draining: the next response carries `Connection: close`; give a
            // keep-alive client the grace to send it before closing an idle connection.
            if let Ok(r) = tokio::time::timeout(cfg.drain_idle_grace, conn.as_mut()).await {
                finished = Some(r);
            }
        }
        match finished {
            Some(r) => r,
            None => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// Serve HTTP on a connection the TLS (or port) layer has taken over: the same
/// request path as the accept loop's.
pub(crate) async fn serve_http_on(
    stream: crate::tls::ClientStream,
    peer: SocketAddr,
    public_port: u16,
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let ip = canonical_ip(peer);
    let tls = stream.alpn_h2().is_some();
    let framing_conflict = Arc::new(AtomicBool::new(false));
    let stream = ScanStream::new(stream, Arc::clone(&framing_conflict));
    let ctx = Arc::new(ConnCtx {
        tls,
        framing_conflict,
        shared: Arc::clone(&shared),
        client_ip: ip,
        client_ip_hv: header_value_of(&ip.to_string()),
        public_port,
        port_hv: HeaderValue::from(public_port),
    });
    let svc = service_fn(move |req| handle(req, Arc::clone(&ctx)));
    serve_connection(stream, svc, &shared.cfg, stop).await;
}

fn canonical_ip(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn header_value_of(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// A response written by the proxy itself; the body says why.
fn reply(status: StatusCode, why: impl Into<String>) -> Response<RespBody> {
    let mut text = why.into();
    text.push('\n');
    let mut resp = Response::new(RespBody::text(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn reply_close(status: StatusCode, why: impl Into<String>) -> Response<RespBody> {
    let mut resp = reply(status, why);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

async fn handle(
    req: Request<Incoming>,
    ctx: Arc<ConnCtx>,
) -> Result<Response<RespBody>, Infallible> {
    Ok(proxy_request(req, &ctx).await)
}

async fn proxy_request(mut req: Request<Incoming>, ctx: &ConnCtx) -> Response<RespBody> {
    let started = std::time::Instant::now();
    let upgrade = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    // validate: framing and Host (hyper has enforced the size limits).
    if parts.headers.contains_key(header::TRANSFER_ENCODING)
        && (parts.headers.contains_key(header::CONTENT_LENGTH)
            || ctx.framing_conflict.swap(false, Ordering::Relaxed))
    {
        return reply_close(
            StatusCode::BAD_REQUEST,
            "request has both Content-Length and Transfer-Encoding",
        );
    }
    let host = match request_host(&parts.uri, &parts.headers, parts.version) {
        Ok(h) => h,
        Err(why) => return reply_close(StatusCode::BAD_REQUEST, why),
    };
    if !parts.headers.contains_key(header::HOST) {
        // HTTP/2 carries the host in :authority; machines speak HTTP/1.1.
        if let Some(v) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, v);
        }
    }

    // acme: HTTP-01 challenges are answered by the proxy itself.
    if let Some(ch) = &ctx.shared.cfg.acme_challenges
        && let Some(resp) = crate::acme::http01_answer(ch, &parts.method, parts.uri.path()).await
    {
        return resp;
    }

    // route (starting a stopped machine first when none is started: autostart).
    let mut table = ctx.shared.routes.load_full();
    if let Some((app_name, stopped)) = autostart_candidates(&table, &host, ctx.public_port) {
        match autostart(
            &ctx.shared.routes,
            &app_name,
            &stopped,
            &host,
            ctx.public_port,
        )
        .await
        {
            Ok(t) => table = t,
            Err(resp) => return resp,
        }
    }
    let Some(app) = table.app_for_host(&host) else {
        crate::metrics::unrouted();
        return reply(
            StatusCode::NOT_FOUND,
            format!("no app is routed for host {host:?}"),
        );
    };
    // metrics: the app's in-flight gauge holds until the response head is ready.
    let _in_flight = app.metrics.start();
    let method = parts.method.clone();
    let client_h1 = parts.version != Version::HTTP_2;
    let Some(svc) = app.service_for_port(ctx.public_port) else {
        let resp = reply(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "app {} has no service on port {}",
                app.name, ctx.public_port
            ),
        );
        return finish(app, started, None, &method, resp);
    };
    if !ctx.tls
        && svc
            .ports
            .iter()
            .any(|p| p.port == ctx.public_port && p.force_https)
    {
        return finish(
            app,
            started,
            None,
            &method,
            redirect_https(&host, &parts.uri),
        );
    }

    // headers.
    let request_id = new_request_id(&ctx.shared.region_suffix);
    let upgrade_to = upgrade
        .as_ref()
        .and_then(|_| parts.headers.get(header::UPGRADE).cloned());
    // h2_backend (gRPC): `te: trailers` is end-to-end in HTTP/2 and gRPC asks for it.
    let h2_backend = svc
        .ports
        .iter()
        .any(|p| p.port == ctx.public_port && p.h2_backend);
    let te_trailers = h2_backend
        && header_str(&parts.headers, &header::TE).is_some_and(|v| v.contains("trailers"));
    strip_hop_by_hop(&mut parts.headers);
    if te_trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(proto) = upgrade_to {
        parts.headers.insert(header::UPGRADE, proto);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    add_forwarding_headers(&mut parts.headers, ctx, &request_id);
    let prefer_region = header_str(&parts.headers, &FLY_PREFER_REGION).map(str::to_owned);
    let force_instance = header_str(&parts.headers, &FLY_FORCE_INSTANCE).map(str::to_owned);
    if parts.version != Version::HTTP_11 {
        parts.version = Version::HTTP_11;
    }
    if parts.uri.authority().is_some() {
        // Absolute-form from the client: machines get origin-form.
        let pq = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        parts.uri = pq.parse().unwrap_or_else(|_| Uri::from_static("/"));
    }

    // body.
    let body = if h2_backend {
        // Streamed as it comes (gRPC streams interleave requests and responses).
        if body.is_end_stream() {
            ReqBody::Empty
        } else {
            ReqBody::Stream {
                prefix: None,
                rest: body,
            }
        }
    } else {
        match read_body_start(body, ctx.shared.cfg.body_read_timeout).await {
            Ok(b) => b,
            Err(resp) => return finish(app, started, Some(&request_id), &method, resp),
        }
    };

    // dispatch.
    let constraints = RequestConstraints {
        prefer_region,
        force_instance,
        h2_backend,
    };
    let mut resp = dispatch(parts, body, upgrade, app, svc, constraints, &ctx.shared).await;
    let h = resp.headers_mut();
    h.append(header::VIA, ctx.shared.via.clone());
    if ctx.shared.draining.load(Ordering::Relaxed) && client_h1 {
        // reload: a draining proxy closes keep-alive connections after a response,
        // never while a client may be sending on them (HTTP/2 drains with GOAWAY).
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let mut resp = finish(app, started, Some(&request_id), &method, resp);
    resp.headers_mut()
        .insert(FLY_REQUEST_ID.clone(), request_id);
    resp
}

/// metrics and access log: count `resp` for `app` (status class, time to response
/// head) and attach the request's access log line to it.
fn finish(
    app: &AppRoute,
    started: std::time::Instant,
    request_id: Option<&HeaderValue>,
    method: &Method,
    mut resp: Response<RespBody>,
) -> Response<RespBody> {
    let status = resp.status().as_u16();
    app.metrics.observe(status, started.elapsed());
    if crate::metrics::AccessLog::enabled() {
        let mut log = Box::new(crate::metrics::AccessLog {
            request_id: request_id
                .cloned()
                .unwrap_or_else(|| HeaderValue::from_static("-")),
            app: Arc::clone(&app.name),
            machine: None,
            method: method.clone(),
            status,
            started,
            bytes: 0,
        });
        match resp.body_mut() {
            RespBody::Upstream(u) => u.set_access(log),
            RespBody::Full(d) => {
                log.bytes = d.as_ref().map_or(0, |d| d.len() as u64);
                drop(log);
            }
        }
    }
    resp
}

/// When the service for `port` of the app at `host` has no started machine but the app
/// has stopped or suspended ones: the app and those machine ids.
fn autostart_candidates(
    table: &RouteTable,
    host: &str,
    port: u16,
) -> Option<(String, Vec<String>)> {
    let app = table.app_for_host(host)?;
    let stopped = crate::routes::autostart_candidates(table, app, port)?;
    Some((app.name.to_string(), stopped))
}

/// Starts one of `stopped` and waits, bounded, for a table in which the service has a
/// started machine ([`Routes::autostart`], shared with raw TCP); a 503 saying why not.
async fn autostart(
    routes: &Arc<Routes>,
    app: &str,
    stopped: &[String],
    host: &str,
    port: u16,
) -> Result<Arc<RouteTable>, Response<RespBody>> {
    routes
        .autostart(app, stopped, |t| {
            autostart_candidates(t, host, port).is_none()
        })
        .await
        .map_err(|e| reply(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

fn header_str<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// The host a request is for, lower-case and without port; errors say what is wrong.
fn request_host(uri: &Uri, headers: &HeaderMap, version: Version) -> Result<String, String> {
    let mut values = headers.get_all(header::HOST).iter();
    let from_header = values.next();
    if values.next().is_some() {
        return Err("request has more than one Host header".into());
    }
    let raw = match (uri.authority(), from_header) {
        (Some(a), _) => a.as_str(),
        (None, Some(v)) => v
            .to_str()
            .map_err(|_| "Host header is not visible ASCII".to_string())?,
        (None, None) if version == Version::HTTP_11 => {
            return Err("HTTP/1.1 request without a Host header".into());
        }
        (None, None) => "",
    };
    let host = split_host(raw).ok_or_else(|| format!("invalid Host header {raw:?}"))?;
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Ok(host.to_ascii_lowercase())
    } else {
        Ok(host.to_owned())
    }
}

/// `host[:port]` or `[v6][:port]` → host; `None` when malformed.
fn split_host(raw: &str) -> Option<&str> {
    let valid_port =
        |p: &str| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = raw.strip_prefix('[') {
        let end = rest.find(']')?;
        let (v6, after) = (&rest[..end], &rest[end + 1..]);
        if v6.is_empty()
            || !v6
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return None;
        }
        if !after.is_empty() && !after.strip_prefix(':').is_some_and(valid_port) {
            return None;
        }
        return Some(&raw[..end + 2]);
    }
    let host = match raw.rsplit_once(':') {
        Some((h, p)) if valid_port(p) => h,
        Some(_) => return None,
        None => raw,
    };
    if host.len() > 253
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return None;
    }
    Some(host)
}

fn redirect_https(host: &str, uri: &Uri) -> Response<RespBody> {
    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let location = format!("https://{host}{pq}");
    let mut resp = reply(StatusCode::MOVED_PERMANENTLY, format!("see {location}"));
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn new_request_id(region_suffix: &str) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = BytesMut::with_capacity(16 + region_suffix.len());
    let r = rand::random::<u64>();
    for i in (0..16).rev() {
        id.extend_from_slice(&[HEX[((r >> (i * 4)) & 0xf) as usize]]);
    }
    id.extend_from_slice(region_suffix.as_bytes());
    HeaderValue::from_maybe_shared(id.freeze())
        .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn is_hop_by_hop(n: &HeaderName) -> bool {
    n == header::CONNECTION
        || n == header::TE
        || n == header::TRAILER
        || n == header::TRANSFER_ENCODING
        || n == header::UPGRADE
        || n == KEEP_ALIVE
        || n == PROXY_CONNECTION
}

/// Remove hop-by-hop headers, including those the Connection header names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Usually there are none: one pass over the names is cheaper than the removals.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    if let Some(conn) = h.remove(header::CONNECTION) {
        // Names listed in Connection are hop-by-hop too.
        let extra: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .chain(std::iter::once(&conn))
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        h.remove(header::CONNECTION);
        for name in extra {
            h.remove(name);
        }
    }
    h.remove(&KEEP_ALIVE);
    h.remove(&PROXY_CONNECTION);
    h.remove(header::TE);
    h.remove(header::TRAILER);
    h.remove(header::TRANSFER_ENCODING);
    h.remove(header::UPGRADE);
}

fn add_forwarding_headers(h: &mut HeaderMap, ctx: &ConnCtx, request_id: &HeaderValue) {
    h.insert(FLY_CLIENT_IP.clone(), ctx.client_ip_hv.clone());
    h.insert(FLY_REGION.clone(), ctx.shared.region.clone());
    h.insert(FLY_REQUEST_ID.clone(), request_id.clone());
    let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => {
            header_value_of(&format!("{}, {}", prev.trim(), ctx.client_ip))
        }
        _ => ctx.client_ip_hv.clone(),
    };
    h.insert(X_FORWARDED_FOR.clone(), xff);
    let proto = if ctx.tls { "https" } else { "http" };
    h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    h.insert(X_FORWARDED_PORT.clone(), ctx.port_hv.clone());
    h.append(header::VIA, ctx.shared.via.clone());
}

/// Read up to [`BUFFER_LIMIT`] bytes of the body before any machine is involved: a
/// malformed or stalled body is answered here, and a small body can be replayed.
async fn read_body_start(
    mut body: Incoming,
    timeout: Duration,
) -> Result<ReqBody, Response<RespBody>> {
    if body.is_end_stream() {
        return Ok(ReqBody::Empty);
    }
    let mut buf = BytesMut::new();
    let read = async {
        loop {
            match std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await {
                None => return Ok(true),
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                    }
                    if body.is_end_stream() {
                        return Ok(true);
                    }
                    if buf.len() >= BUFFER_LIMIT {
                        return Ok(false);
                    }
                }
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(reply_close(
            StatusCode::REQUEST_TIMEOUT,
            format!("request body not received within {timeout:?}"),
        )),
        Ok(Err(e)) => Err(reply_close(
            StatusCode::BAD_REQUEST,
            format!("malformed request body: {e}"),
        )),
        Ok(Ok(true)) => Ok(ReqBody::Full(Some(buf.freeze()))),
        Ok(Ok(false)) => Ok(ReqBody::Stream {
            prefix: Some(buf.freeze()),
            rest: body,
        }),
    }
}

struct RequestConstraints {
    prefer_region: Option<String>,
    force_instance: Option<String>,
    /// Talk HTTP/2 to the machine (the port's `h2_backend`).
    h2_backend: bool,
}

/// Where a machine's `fly-replay` response header sends the request next.
#[derive(Debug, Default, PartialEq)]
struct Replay {
    region: Option<String>,
    instance: Option<String>,
    elsewhere: bool,
    /// Another app: not supported (the request is answered with 502).
    app: Option<String>,
}

/// Parse `fly-replay: region=ams;instance=abc;elsewhere=true` (`,` also separates).
fn parse_replay(v: &str) -> Replay {
    let mut r = Replay::default();
    for field in v.split([';', ',']) {
        let Some((k, val)) = field.split_once('=') else {
            continue;
        };
        let val = val.trim().to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "region" => r.region = Some(val),
            "instance" => r.instance = Some(val),
            "elsewhere" => r.elsewhere = val == "true",
            "app" => r.app = Some(val),
            _ => {}
        }
    }
    r
}

static FLY_REPLAY: HeaderName = HeaderName::from_static("fly-replay");
static FLY_REPLAY_SRC: HeaderName = HeaderName::from_static("fly-replay-src");
/// Replays one request may go through (a machine replaying to itself stops here).
const MAX_REPLAYS: usize = 2;

#[allow(clippy::too_many_arguments)]
async fn dispatch(
    mut parts: http::request::Parts,
    mut body: ReqBody,
    mut upgrade: Option<hyper::upgrade::OnUpgrade>,
    app: &AppRoute,
    svc: &ServiceRoute,
    mut rc: RequestConstraints,
    shared: &Shared,
) -> Response<RespBody> {
    let cfg = &shared.cfg;
    if let Some(id) = rc.force_instance.as_deref() {
        match app.machine_states.get(id) {
            None => {
                return reply(
                    StatusCode::NOT_FOUND,
                    format!(
                        "fly-force-instance-id: app {} has no machine {id}",
                        app.name
                    ),
                );
            }
            Some(state) if state != "started" => {
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "fly-force-instance-id: machine {id} of app {} is {state}",
                        app.name
                    ),
                );
            }
            Some(_) => {}
        }
    }
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    );
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error = String::new();
    let mut attempts = 0;
    let mut replays = 0;
    let mut retrying = false;
    while attempts < cfg.max_attempts {
        attempts += 1;
        if std::mem::take(&mut retrying) {
            app.metrics.retry();
        }
        let constraints = Constraints {
            prefer_region: rc.prefer_region.as_deref(),
            force_instance: rc.force_instance.as_deref(),
            exclude: &tried,
        };
        let lease = match admit(app, svc, &constraints, shared).await {
            Ok(l) => l,
            Err(_) if !tried.is_empty() => break,
            Err(resp) => return resp,
        };
        let backend = Arc::clone(lease.backend());
        let failing_ms = cfg.failing_for.as_millis() as u64;
        // region latency (`aloft dev`): a forward to another region pays its round trip.
        if let Some(d) = shared.routes.cross_region_delay(&backend.region) {
            tokio::time::sleep(d).await;
        }
        if rc.h2_backend {
            // h2_backend: one shared h2c connection per machine; trailers pass through.
            let authority = parts
                .headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("localhost")
                .to_owned();
            let head = Head {
                method: &parts.method,
                target: parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
                headers: &parts.headers,
            };
            let sender = match backend.h2.get(backend.addr, cfg.connect_timeout).await {
                Ok(s) => s,
                Err(e) => {
                    // Nothing was sent: another machine may take the request.
                    tracing::info!(machine = %backend.machine_id, error = %e, "h2 connect failed; trying another machine");
                    balance::mark_failing(&backend, failing_ms);
                    last_error = e.to_string();
                    tried.push(Arc::as_ptr(&backend) as usize);
                    retrying = true;
                    continue;
                }
            };
            // A buffered body can be sent again; a streamed one goes once.
            let send = match &mut body {
                ReqBody::Empty => ReqBody::Empty,
                ReqBody::Full(d) => ReqBody::Full(d.clone()),
                ReqBody::Stream { .. } => std::mem::replace(&mut body, ReqBody::Empty),
            };
            match upstream::h2_request(
                sender,
                backend.addr,
                &head,
                &authority,
                send,
                cfg.response_timeout,
            )
            .await
            {
                Ok(r) => {
                    let (rparts, rbody) = r.into_parts();
                    let mut resp = Response::new(RespBody::Upstream(UpstreamBody::h2(
                        rbody,
                        backend.addr,
                        lease,
                    )));
                    *resp.status_mut() = rparts.status;
                    *resp.headers_mut() = rparts.headers;
                    return resp;
                }
                Err(e) => {
                    // The request (and any streamed body) went to this machine.
                    tracing::info!(machine = %backend.machine_id, error = %e, "h2 exchange failed");
                    if matches!(e, UpstreamError::ResponseTimeout { .. }) {
                        return reply(
                            StatusCode::GATEWAY_TIMEOUT,
                            format!("machine {} of app {}: {e}", backend.machine_id, app.name),
                        );
                    }
                    last_error = format!("machine {}: {e}", backend.machine_id);
                    break;
                }
            }
        }
        let mut conn = match backend
            .pool
            .checkout(backend.addr, cfg.connect_timeout)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(machine = %backend.machine_id, error = %e, "connect failed; trying another machine");
                balance::mark_failing(&backend, failing_ms);
                last_error = e.to_string();
                tried.push(Arc::as_ptr(&backend) as usize);
                retrying = true;
                continue;
            }
        };
        let reused = conn.reused;
        let mut sent = Sent { body_pulled: false };
        let addr = backend.addr;
        let head = Head {
            method: &parts.method,
            target: parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
            headers: &parts.headers,
        };
        let exchange = async {
            upstream::write_request(
                &mut conn,
                &head,
                &mut body,
                &mut sent,
                cfg.body_read_timeout,
            )
            .await
            .map_err(|e| (e, false))?;
            match tokio::time::timeout(
                cfg.response_timeout,
                upstream::read_response(conn, &parts.method),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err((
                    UpstreamError::ResponseTimeout {
                        addr,
                        after: cfg.response_timeout,
                    },
                    true,
                )),
            }
        };
        match exchange.await {
            Ok((rhead, conn, _)) if rhead.status == StatusCode::SWITCHING_PROTOCOLS => {
                let Some(on_upgrade) = upgrade.take() else {
                    return reply(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "machine {} switched protocols without being asked",
                            backend.machine_id
                        ),
                    );
                };
                tokio::spawn(tunnel(on_upgrade, conn, lease));
                let mut resp = Response::new(RespBody::Full(None));
                *resp.status_mut() = rhead.status;
                *resp.headers_mut() = rhead.headers;
                return resp;
            }
            Ok((rhead, _, _))
                if rhead.headers.contains_key(&FLY_REPLAY)
                    && replays < MAX_REPLAYS
                    && !matches!(body, ReqBody::Stream { .. }) =>
            {
                // The machine asks for the request to be replayed elsewhere; its own
                // response (and connection) is dropped.
                let replay = rhead
                    .headers
                    .get(&FLY_REPLAY)
                    .and_then(|v| v.to_str().ok())
                    .map(parse_replay)
                    .unwrap_or_default();
                if let Some(other) = replay.app.filter(|a| **a != *app.name) {
                    return reply(
                        StatusCode::BAD_GATEWAY,
                        format!("fly-replay to another app ({other}) is not supported"),
                    );
                }
                replays += 1;
                attempts = 0;
                let src = format!(
                    "instance={};region={};state=replayed",
                    backend.machine_id, backend.region
                );
                if let Ok(v) = HeaderValue::from_str(&src) {
                    parts.headers.insert(FLY_REPLAY_SRC.clone(), v);
                }
                if replay.elsewhere {
                    tried.push(Arc::as_ptr(&backend) as usize);
                }
                if replay.region.is_some() {
                    rc.prefer_region = replay.region;
                }
                if replay.instance.is_some() {
                    rc.force_instance = replay.instance;
                }
                continue;
            }
            Ok((rhead, conn, plan)) => {
                let mut resp =
                    Response::new(RespBody::Upstream(UpstreamBody::new(conn, plan, lease)));
                *resp.status_mut() = rhead.status;
                *resp.headers_mut() = rhead.headers;
                strip_hop_by_hop(resp.headers_mut());
                return resp;
            }
            Err((e @ UpstreamError::ResponseTimeout { .. }, _)) => {
                return reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("machine {} of app {}: {e}", backend.machine_id, app.name),
                );
            }
            Err((UpstreamError::ClientBodyStalled(t), _)) => {
                return reply_close(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("request body stalled for {t:?}"),
                );
            }
            Err((UpstreamError::ClientBody(e), _)) => {
                return reply_close(
                    StatusCode::BAD_REQUEST,
                    format!("malformed request body: {e}"),
                );
            }
            Err((e, got_response)) => {
                tracing::info!(machine = %backend.machine_id, error = %e, reused, "upstream exchange failed");
                last_error = format!("machine {}: {e}", backend.machine_id);
                if !reused {
                    // A fresh connection that fails is a machine refusing work.
                    balance::mark_failing(&backend, failing_ms);
                }
                let may_retry = !got_response
                    && e.before_response()
                    && !sent.body_pulled
                    && (idempotent || reused);
                if !may_retry {
                    break;
                }
                tried.push(Arc::as_ptr(&backend) as usize);
                retrying = true;
            }
        }
    }
    reply(
        StatusCode::BAD_GATEWAY,
        format!(
            "app {}: no machine could take the request after {attempts} attempt(s): {last_error}",
            app.name
        ),
    )
}

/// Relay bytes both ways between an upgraded client connection (WebSocket and the
/// like) and the machine until either side closes; the machine's slot is held as
/// long as the tunnel lives.
async fn tunnel(on_upgrade: hyper::upgrade::OnUpgrade, conn: upstream::UpConn, lease: Lease) {
    use tokio::io::AsyncWriteExt;
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "client upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(upgraded);
    let (mut machine, early) = conn.into_io();
    if !early.is_empty() && client.write_all(&early).await.is_err() {
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut machine).await {
        tracing::debug!(machine = %lease.backend().machine_id, error = %e, "tunnel ended");
    }
    drop(lease);
}

/// Does the client ask to switch protocols (HTTP/1.1 `Connection: upgrade`)?
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// A slot on some machine, waiting up to `queue_timeout` when all are at hard limit.
async fn admit(
    app: &AppRoute,
    svc: &ServiceRoute,
    c: &Constraints<'_>,
    shared: &Shared,
) -> Result<Lease, Response<RespBody>> {
    let capacity = &shared.capacity;
    let cfg = &shared.cfg;
    let nothing = || {
        reply(
            StatusCode::SERVICE_UNAVAILABLE,
            match c.force_instance {
                Some(id) => format!("app {}: machine {id} cannot take requests", app.name),
                None => format!(
                    "app {} has no started machine for port service {}",
                    app.name, svc.internal_port
                ),
            },
        )
    };
    match balance::choose(svc, c, capacity) {
        Choice::Leased(l) => return Ok(l),
        Choice::Nothing => return Err(nothing()),
        Choice::Busy => {}
    }
    if capacity.waiters.load(Ordering::SeqCst) >= cfg.max_queued {
        app.metrics.queue_rejected();
        return Err(reply(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "app {}: every machine is at its hard limit ({}) and {} requests are already waiting",
                app.name, svc.concurrency.hard_limit, cfg.max_queued
            ),
        ));
    }
    capacity.waiters.fetch_add(1, Ordering::SeqCst);
    struct Waiting<'a>(&'a Capacity);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _waiting = Waiting(capacity);
    let deadline = tokio::time::Instant::now() + cfg.queue_timeout;
    loop {
        let notified = capacity.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match balance::choose(svc, c, capacity) {
            Choice::Leased(l) => return Ok(l),
            Choice::Nothing => return Err(nothing()),
            Choice::Busy => {}
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            app.metrics.queue_rejected();
            return Err(reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "app {}: every machine is at its hard limit ({} concurrent requests); waited {:?}",
                    app.name, svc.concurrency.hard_limit, cfg.queue_timeout
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_host_cases() {
        assert_eq!(split_host("example.com"), Some("example.com"));
        assert_eq!(split_host("example.com:8080"), Some("example.com"));
        assert_eq!(split_host("[::1]:80"), Some("[::1]"));
        assert_eq!(split_host("[::1]"), Some("[::1]"));
        assert_eq!(split_host("exa mple"), None);
        assert_eq!(split_host("a:b"), None);
        assert_eq!(split_host("a/b"), None);
        assert_eq!(split_host("[::1]x"), None);
    }

    #[test]
    fn replay_header_parses() {
        let r = parse_replay("region=ams;elsewhere=true, instance=m1");
        assert_eq!(r.region.as_deref(), Some("ams"));
        assert_eq!(r.instance.as_deref(), Some("m1"));
        assert!(r.elsewhere);
        assert_eq!(parse_replay("junk"), Replay::default());
    }

    #[test]
    fn hop_by_hop_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("x-kept").is_some());
    }
}
