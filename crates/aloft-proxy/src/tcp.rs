//! Non-HTTP ports: what a listening port does with a new connection, and raw TCP to a
//! machine.
//!
//! A public port's mode comes from the handlers services give it (fly.toml
//! `[[services.ports]]`), indexed per route table ([`port_modes`]):
//! - any app naming `tls` → TLS first ([`crate::tls`]), then HTTP or raw bytes;
//! - else any app naming `http` → HTTP (also every port no service names);
//! - else (`[]`, `["proxy_proto"]`) → raw TCP to the first app (in table order)
//!   claiming the port; raw TCP has no host name to route by.
//!
//! Raw TCP ([`relay`]) first autostarts: when the service has no started machine but
//! the app has stopped or suspended ones, it asks the machine owner to start one and
//! holds the connection until the routes show it started (the same code and bound as
//! HTTP, [`crate::routes::Routes::autostart`]); bytes the client sends meanwhile wait
//! in the socket. It then takes a slot on a machine with the same balancing and
//! `hard_limit` admission as HTTP (one slot per connection, whatever the concurrency
//! type), waits up to `queue_timeout` when all are full, connects, retries a refused
//! connect on another machine, writes the PROXY protocol header when the port asks
//! for it, then copies bytes both ways until both sides close. The proxy never waits
//! for the client to speak first. The slot is held for the connection's whole life,
//! so a machine with an open relayed connection is busy, never idle, for autostop
//! ([`crate::catalog::autostop`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::balance::{self, Choice, Constraints, Lease};
use crate::proxy_proto;
use crate::routes::{AppRoute, RouteTable, ServiceRoute};
use crate::server::Shared;

/// What a listening port does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortMode {
    Http,
    Tls,
    /// Raw TCP to app `app` (index in the table).
    Tcp {
        app: usize,
    },
}

impl PortMode {
    fn rank(self) -> u8 {
        match self {
            PortMode::Tls => 2,
            PortMode::Http => 1,
            PortMode::Tcp { .. } => 0,
        }
    }
}

/// The mode of every public port services name (see the module doc for precedence).
pub(crate) fn port_modes(apps: &[AppRoute]) -> HashMap<u16, PortMode> {
    let mut out: HashMap<u16, PortMode> = HashMap::new();
    for (ai, app) in apps.iter().enumerate() {
        for svc in &app.services {
            for p in &svc.ports {
                let mode = if p.has_handler("tls") {
                    PortMode::Tls
                } else if p.has_handler("http") || p.has_handler("edge_http") {
                    PortMode::Http
                } else {
                    PortMode::Tcp { app: ai }
                };
                match out.get(&p.port) {
                    Some(cur) if cur.rank() >= mode.rank() => {}
                    _ => {
                        out.insert(p.port, mode);
                    }
                }
            }
        }
    }
    out
}

/// The mode of public port `port` with the table in force now; `tls_ports` of the
/// config turn HTTP ports (named so, or not named at all) into TLS ones.
pub(crate) fn port_mode(shared: &Shared, port: u16) -> PortMode {
    match shared.routes.load().port_mode(port) {
        PortMode::Http if shared.cfg.tls_ports.contains(&port) => PortMode::Tls,
        mode => mode,
    }
}

/// Serve a connection accepted on a TLS or raw TCP port (`mode` as [`port_mode`]
/// found it).
pub(crate) async fn serve_port(
    mode: PortMode,
    stream: TcpStream,
    peer: SocketAddr,
    public_port: u16,
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    match mode {
        PortMode::Tls => {
            crate::tls::serve_tls(stream, peer, public_port, shared, stop).await;
        }
        PortMode::Tcp { .. } => {
            // The app index is the fresh table's (it may have changed since accept).
            let table = shared.routes.load_full();
            let PortMode::Tcp { app } = table.port_mode(public_port) else {
                return;
            };
            let app = &table.apps()[app];
            let Some(svc) = app.service_for_port(public_port) else {
                return;
            };
            let local = stream.local_addr().unwrap_or(peer);
            relay(stream, peer, local, app, svc, public_port, &shared).await;
        }
        PortMode::Http => {
            let client = crate::tls::ClientStream::Tcp(stream);
            crate::server::serve_http_on(client, peer, public_port, shared, stop).await;
        }
    }
}

/// A slot on a machine of `svc` not in `tried`, waiting up to `queue_timeout` while
/// every one is at its hard limit. `None`: nothing can take the connection.
async fn admit(svc: &ServiceRoute, tried: &[usize], shared: &Shared) -> Option<Lease> {
    let capacity = &shared.capacity;
    let c = Constraints {
        exclude: tried,
        ..Constraints::default()
    };
    match balance::choose(svc, &c, capacity) {
        Choice::Leased(l) => return Some(l),
        Choice::Nothing => return None,
        Choice::Busy => {}
    }
    if capacity.waiters.load(Ordering::SeqCst) >= shared.cfg.max_queued {
        return None;
    }
    capacity.waiters.fetch_add(1, Ordering::SeqCst);
    struct Waiting<'a>(&'a balance::Capacity);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _waiting = Waiting(capacity);
    let deadline = tokio::time::Instant::now() + shared.cfg.queue_timeout;
    loop {
        let notified = capacity.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match balance::choose(svc, &c, capacity) {
            Choice::Leased(l) => return Some(l),
            Choice::Nothing => return None,
            Choice::Busy => {}
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return None;
        }
    }
}

/// Relay `client` (a TCP stream, or a terminated TLS stream) to a machine of `svc`;
/// `peer` is the client's address and `local` the address it connected to (both go
/// into a PROXY protocol header when the port asks for one).
pub(crate) async fn relay<S>(
    mut client: S,
    peer: SocketAddr,
    local: SocketAddr,
    app: &AppRoute,
    svc: &ServiceRoute,
    public_port: u16,
    shared: &Shared,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // autostart: no started machine but stopped ones → start one, wait (bounded).
    let fresh: Arc<RouteTable>;
    let stopped = crate::routes::autostart_candidates(&shared.routes.load(), app, public_port);
    let (app, svc) = match stopped {
        None => (app, svc),
        Some(stopped) => {
            let name = Arc::clone(&app.name);
            let served = |t: &RouteTable| match app_named(t, &name) {
                Some(a) => crate::routes::autostart_candidates(t, a, public_port).is_none(),
                None => true,
            };
            match shared.routes.autostart(&name, &stopped, served).await {
                Ok(t) => fresh = t,
                Err(e) => {
                    tracing::info!(app = %name, port = public_port, "tcp connection refused: {e}");
                    let _ = client.shutdown().await;
                    return;
                }
            }
            let found = app_named(&fresh, &name)
                .and_then(|a| a.service_for_port(public_port).map(|s| (a, s)));
            match found {
                Some(x) => x,
                None => {
                    tracing::info!(app = %name, port = public_port, "tcp connection refused: the service is gone");
                    let _ = client.shutdown().await;
                    return;
                }
            }
        }
    };
    let cfg = &shared.cfg;
    let pp = svc
        .ports
        .iter()
        .find(|p| p.port == public_port)
        .and_then(|p| p.proxy_proto);
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error = String::from("no started machine");
    for _ in 0..cfg.max_attempts.max(1) {
        let Some(lease) = admit(svc, &tried, shared).await else {
            break;
        };
        let backend = Arc::clone(lease.backend());
        let connected =
            match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(backend.addr)).await
            {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("connect timed out after {:?}", cfg.connect_timeout)),
            };
        let mut up = match connected {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(app = %app.name, machine = %backend.machine_id, error = %e, "tcp connect failed; trying another machine");
                balance::mark_failing(&backend, cfg.failing_for.as_millis() as u64);
                tried.push(Arc::as_ptr(&backend) as usize);
                last_error = format!("machine {}: {e}", backend.machine_id);
                continue;
            }
        };
        let _ = up.set_nodelay(true);
        if let Some(v) = pp {
            let header = proxy_proto::header(v, peer, local);
            if let Err(e) = up.write_all(&header).await {
                tracing::info!(app = %app.name, machine = %backend.machine_id, error = %e, "writing the PROXY header failed");
                return;
            }
        }
        match tokio::io::copy_bidirectional(&mut client, &mut up).await {
            Ok((to_machine, to_client)) => {
                tracing::debug!(app = %app.name, machine = %backend.machine_id, to_machine, to_client, "tcp connection done");
            }
            Err(e) => {
                tracing::debug!(app = %app.name, machine = %backend.machine_id, error = %e, "tcp connection ended");
            }
        }
        drop(lease);
        return;
    }
    tracing::info!(app = %app.name, port = public_port, "tcp connection refused: {last_error}");
    let _ = client.shutdown().await;
}

fn app_named<'a>(t: &'a RouteTable, name: &str) -> Option<&'a AppRoute> {
    t.apps().iter().find(|a| &*a.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{RouteTable, RoutesSpec};

    #[test]
    fn modes_by_handlers() {
        let spec: RoutesSpec = toml::from_str(
            r#"
            [[apps]]
            name = "a"
            hostnames = ["a.test"]
            [[apps.services]]
            internal_port = 1
            ports = [{ port = 80, handlers = ["http"] }, { port = 443, handlers = ["tls", "http"] }]
            [[apps.services]]
            internal_port = 2
            ports = [{ port = 5432, handlers = [] }, { port = 6000, handlers = ["proxy_proto"] }]
            [[apps]]
            name = "b"
            hostnames = ["b.test"]
            [[apps.services]]
            internal_port = 3
            ports = [{ port = 5432, handlers = [] }, { port = 7000, handlers = ["tls"] }]
            "#,
        )
        .unwrap();
        let t = RouteTable::build(&spec, "local", None).unwrap();
        assert_eq!(t.port_mode(80), PortMode::Http);
        assert_eq!(t.port_mode(443), PortMode::Tls);
        assert_eq!(t.port_mode(5432), PortMode::Tcp { app: 0 });
        assert_eq!(t.port_mode(6000), PortMode::Tcp { app: 0 });
        assert_eq!(t.port_mode(7000), PortMode::Tls);
        assert_eq!(t.port_mode(9999), PortMode::Http);
    }
}
