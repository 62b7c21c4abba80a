//! The edge proxy: HTTP/1.1, HTTP/2, TLS by SNI, raw TCP, routing to the closest
//! machine with spare capacity, limits, retries, autostart/autostop, replay, metrics
//! and hitless reload.
//!
//! It owns the request path. It reads the catalog (possibly stale) and must not write
//! machine state: it asks the agent to start a machine and corrects itself at admission.
//!
//! Each listening port is HTTP (HTTP/1.1 with keep-alive, h2c, WebSocket upgrades),
//! TLS ([`tls`]: certificates by SNI, ALPN h2/http1.1, ACME TLS-ALPN-01 answers) or raw
//! TCP ([`tcp`], with PROXY protocol v1/v2). Requests go to machines over HTTP/1.1 from
//! the client connection's own task, or over one shared h2c connection per machine for
//! `h2_backend` ports ([`upstream`]). Routes come from a [`routes::RoutesSpec`]
//! published in [`routes::Routes`] (an atomically swapped [`routes::RouteTable`]); the
//! static TOML file ([`static_routes`]) is one source of it, the catalog ([`catalog`])
//! another, and both go through the same routing and balancing code (`balance`).
//! [`acme`] obtains certificates, [`metrics`] counts, [`reload`] hands listeners to a
//! successor process.

pub mod acme;
mod balance;
pub mod body;
pub mod catalog;
mod clock;
pub mod metrics;
pub mod proxy_proto;
pub mod reload;
pub mod routes;
mod scan;
pub mod server;
pub mod static_routes;
pub mod tcp;
pub mod tls;
pub mod upstream;

pub use balance::{LatencyMatrix, LatencyMatrixError, Lease};
pub use routes::{MachineStarter, RouteTable, RouteTableError, Routes, RoutesSpec};
pub use server::{Listener, ProxyConfig, ServeReport, serve};
pub use static_routes::{RoutesFileError, load_routes_file, read_routes_file};
pub use upstream::{ConnectError, UpstreamError};
