//! `cargo xtask bench …`: each benchmark measures its baseline in the same run and
//! prints ratios plus one JSON line per result.

mod image;
mod proxy;
mod store;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Store writes/s (sync and batched) and watch delivery latency.
    Store,
    /// Image pull + unpack + ext4 against skopeo + umoci + mkfs.ext4.
    Image,
    /// Proxy throughput and latency against nginx and HAProxy.
    Proxy,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Store => store::run(),
        BenchCommand::Image => image::run(),
        BenchCommand::Proxy => proxy::run(),
    }
}
