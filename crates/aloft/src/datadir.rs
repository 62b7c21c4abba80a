//! Choosing the data directory: `--data-dir`, then `ALOFT_DATA_DIR` (both handled by
//! clap), then the per-user default.

use std::path::PathBuf;

use aloft_types::datadir::DataDir;

pub fn resolve(flag: Option<PathBuf>) -> DataDir {
    match flag {
        Some(root) => DataDir::new(root),
        None => {
            let home = std::env::var_os("HOME").map(PathBuf::from);
            DataDir::new(DataDir::default_root(is_root(), home.as_deref()))
        }
    }
}

fn is_root() -> bool {
    // The owner of /proc/self is our effective uid; no unsafe needed.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}
