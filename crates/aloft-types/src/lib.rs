//! Domain model and wire types of Aloft: apps, machine config and states, events,
//! the fly.toml model with flyctl's v1→v2 normalisation and validation, and the
//! messages of the host↔guest protocol.
//!
//! This crate owns *shapes and rules*, never effects: it must not do I/O (no files,
//! sockets, clocks or processes), so that the guest init, the agent, the API and the
//! CLI can all share it.

pub mod appconfig;
pub mod catalog;
pub mod datadir;
pub mod guest;
pub mod machine;
