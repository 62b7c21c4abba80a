//! The edge proxy: HTTP/1.1, HTTP/2, TLS by SNI, raw TCP, routing to the closest
//! machine with spare capacity, limits, retries, autostart/autostop, replay, metrics
//! and hitless reload.
//!
//! It owns the request path. It reads the catalog (possibly stale) and must not write
//! machine state: it asks the agent to start a machine and corrects itself at admission.
