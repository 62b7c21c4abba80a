//! `aloft proxy`: the edge proxy daemon (static routes file or catalog-fed).

use std::process::ExitCode;

use aloft_types::datadir::DataDir;
use clap::Args;

#[derive(Args, Debug)]
pub struct ProxyArgs {}

pub fn run(_args: ProxyArgs, _data_dir: &DataDir) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`aloft proxy` is not implemented yet")
}
