//! One module per command group; each exposes its clap arguments and a `run`.

pub mod config;
pub mod image;
pub mod proxy;
