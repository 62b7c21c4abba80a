//! `cargo xtask bench …`: each benchmark measures its baseline in the same run and
//! prints ratios plus one JSON line per result.

mod agent;
mod boot;
mod image;
mod platform;
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
    /// Boot to init/app/port against raw QEMU, resume, QEMU memory.
    Boot,
    /// Machines API: GET/list latency under 200 clients, create→started.
    Api,
    /// A 3-machine rolling deploy end to end, by phase.
    Deploy,
    /// Agent create→started, start-from-stopped, re-attach after restart, density.
    Agent {
        /// How many idle machines the density and re-attach part runs.
        #[arg(long, default_value_t = 20)]
        machines: usize,
    },
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Store => store::run(),
        BenchCommand::Image => image::run(),
        BenchCommand::Proxy => proxy::run(),
        BenchCommand::Boot => boot::run(),
        BenchCommand::Api => platform::api(),
        BenchCommand::Deploy => platform::deploy(),
        BenchCommand::Agent { machines } => agent::run(machines),
    }
}
