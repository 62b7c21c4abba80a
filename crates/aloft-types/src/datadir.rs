//! The layout of Aloft's one data directory. Every piece of state lives under it so
//! that several instances (and tests) can run side by side without touching each other.
//!
//! Pure path arithmetic: resolving the default from the environment is the caller's job
//! (see [`DataDir::default_root`]), and creating directories is the owner's job.

use std::path::{Path, PathBuf};

/// Environment variable naming the data directory (overridden by `--data-dir`).
pub const DATA_DIR_ENV: &str = "ALOFT_DATA_DIR";

/// The root of one Aloft instance's state, and the places inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The default root: `/var/lib/aloft` for root, `$HOME/.local/share/aloft`
    /// otherwise (or `./.aloft` when there is no home directory).
    pub fn default_root(is_root: bool, home: Option<&Path>) -> PathBuf {
        if is_root {
            return PathBuf::from("/var/lib/aloft");
        }
        match home {
            Some(home) => home.join(".local/share/aloft"),
            None => PathBuf::from(".aloft"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The catalog database of the SQLite store backend.
    pub fn catalog_db(&self) -> PathBuf {
        self.root.join("catalog.db")
    }
    /// The agent's own durable state (machine FSMs).
    pub fn agent_db(&self) -> PathBuf {
        self.root.join("agent.db")
    }
    /// Guest kernel, modules and base initramfs.
    pub fn kernel_dir(&self) -> PathBuf {
        self.root.join("kernel")
    }
    /// Image cache: blobs, unpacked configs and ext4 base images.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }
    /// Per-machine files: overlays, initramfs, pidfiles.
    pub fn machines_dir(&self) -> PathBuf {
        self.root.join("machines")
    }
    /// Volumes (sparse disk files).
    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }
    /// Unix sockets (QMP, guest channel).
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    /// Logs (machine log stores, daemon logs).
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }
    /// Files written by `aloft dev` for the CLI to find (`dev.json`).
    pub fn dev_json(&self) -> PathBuf {
        self.root.join("dev.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_root_depends_on_user() {
        assert_eq!(
            DataDir::default_root(true, Some(Path::new("/root"))),
            PathBuf::from("/var/lib/aloft")
        );
        assert_eq!(
            DataDir::default_root(false, Some(Path::new("/home/u"))),
            PathBuf::from("/home/u/.local/share/aloft")
        );
    }

    #[test]
    fn everything_lives_under_the_root() {
        let d = DataDir::new("/tmp/x");
        for p in [
            d.catalog_db(),
            d.agent_db(),
            d.kernel_dir(),
            d.images_dir(),
            d.machines_dir(),
            d.volumes_dir(),
            d.run_dir(),
            d.logs_dir(),
            d.dev_json(),
        ] {
            assert!(p.starts_with("/tmp/x"), "{p:?}");
        }
    }
}
