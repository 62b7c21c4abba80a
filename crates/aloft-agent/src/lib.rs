//! The per-host supervisor (Aloft's flyd): durable machine state machines in a local
//! SQLite database, restart policy, health checks, networking, volumes, logs, events,
//! catalog publishing and the host heartbeat.
//!
//! It owns the machines on its host and is their source of truth. It must not make
//! placement decisions for other hosts nor serve the public API itself.

pub mod api;

pub use api::{
    AgentApi, AgentError, CreateMachine, CreateVolume, ExecOutput, LogLine, StopOptions,
    UpdateMachine, WaitFor,
};
