//! The edge proxy: HTTP/1.1, HTTP/2, TLS by SNI, raw TCP, routing to the closest
//! machine with spare capacity, limits, retries, autostart/autostop, replay, metrics
//! and hitless reload.
//!
//! It owns the request path. It reads the catalog (possibly stale) and must not write
//! machine state: it asks the agent to start a machine and corrects itself at admission.
//!
//! Today it serves HTTP/1.1 with keep-alive. Routes come from a [`routes::RoutesSpec`]
//! published in [`routes::Routes`] (an atomically swapped [`routes::RouteTable`]);
//! the static TOML file ([`static_routes`]) is one source of it, the catalog another,
//! and both go through the same routing and balancing code ([`balance`]).

mod balance;
pub mod body;
pub mod catalog;
mod clock;
pub mod routes;
mod scan;
pub mod server;
pub mod static_routes;
mod upstream;

pub use balance::Lease;
pub use routes::{RouteTable, RouteTableError, Routes, RoutesSpec};
pub use server::{Listener, ProxyConfig, ServeReport, serve};
pub use static_routes::{RoutesFileError, load_routes_file, read_routes_file};
pub use upstream::{ConnectError, UpstreamError};
