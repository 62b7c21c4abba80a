//! Where the guest kernel and the static guest init are found.

use std::path::{Path, PathBuf};

/// The guest kernel directory: `ALOFT_KERNEL_DIR`, or `/var/lib/aloft/kernel`
/// (where `cargo xtask setup` puts it).
pub fn kernel_dir() -> PathBuf {
    std::env::var_os("ALOFT_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/aloft/kernel"))
}

/// The static guest init's path, unchecked: `ALOFT_INIT_BIN`, or the workspace's
/// `target/x86_64-unknown-linux-musl/release/aloft-init`.
pub fn init_bin_path() -> PathBuf {
    std::env::var_os("ALOFT_INIT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/x86_64-unknown-linux-musl/release/aloft-init")
        })
}

/// A guest file a VM test needs is missing.
#[derive(Debug, thiserror::Error)]
pub enum GuestFilesError {
    #[error("no static aloft-init at {path} (run `cargo xtask test`)")]
    InitBinMissing { path: PathBuf },
}

/// [`init_bin_path`], checked to be a file.
pub fn init_bin() -> Result<PathBuf, GuestFilesError> {
    let path = init_bin_path();
    if path.is_file() {
        Ok(path)
    } else {
        Err(GuestFilesError::InitBinMissing { path })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn init_bin_path_is_under_the_workspace_target_without_the_env() {
        if std::env::var_os("ALOFT_INIT_BIN").is_none() {
            let p = super::init_bin_path();
            assert!(
                p.ends_with("target/x86_64-unknown-linux-musl/release/aloft-init"),
                "{}",
                p.display()
            );
            assert_eq!(super::init_bin().is_ok(), p.is_file());
        }
    }
}
