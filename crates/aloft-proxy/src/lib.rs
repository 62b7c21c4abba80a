//! The edge proxy: HTTP/1.1, HTTP/2, TLS by SNI, raw TCP, routing to the closest
//! machine with spare capacity, limits, retries, autostart/autostop, replay, metrics
//! and hitless reload.
//!
//! It owns the request path. It reads the catalog (possibly stale) and must not write
//! machine state: it asks the agent to start a machine and corrects itself at admission.
//!
//! Today it serves HTTP/1.1 with keep-alive, HTTP/2 with prior knowledge (h2c) and
//! protocol upgrades (WebSocket) on one port, and talks HTTP/1.1 to machines from the
//! client connection's own task ([`upstream`]). Routes come from a
//! [`routes::RoutesSpec`] published in [`routes::Routes`] (an atomically swapped
//! [`routes::RouteTable`]); the static TOML file ([`static_routes`]) is one source of
//! it, the catalog another, and both go through the same routing and balancing code
//! (`balance`). Not yet here: TLS/SNI and ACME, raw TCP services, HTTP/2 to machines
//! (gRPC), autostart/autostop, metrics.

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
