//! `cargo xtask bench …`: each benchmark measures its baseline in the same run and
//! prints ratios plus one JSON line per result.

use anyhow::{Result, bail};
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
        BenchCommand::Store => bail!("bench store is not implemented yet"),
        BenchCommand::Image => bail!("bench image is not implemented yet"),
        BenchCommand::Proxy => bail!("bench proxy is not implemented yet"),
    }
}
