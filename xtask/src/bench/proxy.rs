//! `cargo xtask bench proxy`.

use anyhow::{Result, bail};

pub fn run() -> Result<()> {
    bail!("bench proxy is not implemented yet")
}
