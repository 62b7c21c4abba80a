//! One module per command group; each exposes its clap arguments and a `run`.

pub mod apps;
pub mod auth;
pub mod certs;
pub mod client;
pub mod common;
pub mod config;
pub mod deploy;
pub mod dev;
pub mod image;
pub mod launch;
pub mod logs;
pub mod machine;
pub mod proxy;
pub mod releases;
pub mod scale;
pub mod secrets;
pub mod ssh;
pub mod status;
pub mod tokens;
pub mod vm;
pub mod volumes;
