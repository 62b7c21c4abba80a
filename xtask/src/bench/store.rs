//! `cargo xtask bench store`.

use anyhow::{Result, bail};

pub fn run() -> Result<()> {
    bail!("bench store is not implemented yet")
}
