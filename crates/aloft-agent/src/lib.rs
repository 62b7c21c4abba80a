//! The per-host supervisor (Aloft's flyd): durable machine state machines in a local
//! SQLite database, restart policy, health checks, networking, volumes, logs, events,
//! catalog publishing and the host heartbeat.
//!
//! It owns the machines on its host and is their source of truth. It must not make
//! placement decisions for other hosts nor serve the public API itself.

mod agent;
pub mod api;
mod db;
mod health;
pub mod net;
mod volumes;

pub use agent::{Agent, AgentConfig, FAULT_ENV, rfc3339};
pub use db::images_in_use;

pub use api::MachineMemory;
pub use api::{
    AgentApi, AgentError, CreateMachine, CreateVolume, ExecOutput, LogLine, StopOptions,
    UpdateMachine, WaitFor,
};
