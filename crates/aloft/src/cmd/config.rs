//! `aloft config validate|show|machine`.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Check a fly.toml and report every problem with its line and column.
    Validate,
}

pub fn run(_cmd: ConfigCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`aloft config` is not implemented yet")
}
