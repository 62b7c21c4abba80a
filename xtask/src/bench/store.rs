//! `cargo xtask bench store`: runs the store benchmark example in release mode. It
//! measures raw rusqlite with the same pragmas in the same run as its baseline.

use anyhow::Result;

pub fn run() -> Result<()> {
    crate::util::cargo(
        &[
            "run",
            "--release",
            "-q",
            "-p",
            "aloft-store",
            "--example",
            "store_bench",
        ],
        &[],
    )
}
