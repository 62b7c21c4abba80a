//! `aloft image pull|import|ls|inspect|rm|gc`.

use std::process::ExitCode;

use aloft_types::datadir::DataDir;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// List cached images.
    Ls,
}

pub fn run(_cmd: ImageCommand, _data_dir: &DataDir) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`aloft image` is not implemented yet")
}
