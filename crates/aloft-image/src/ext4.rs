//! ext4 base images built from a staging directory with `mkfs.ext4 -d`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Building an ext4 image failed.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error("could not run mkfs.ext4 (install e2fsprogs)")]
    Spawn(#[source] io::Error),
    #[error("mkfs.ext4 failed building {path}: {status}: {stderr}")]
    Mkfs {
        path: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("ext4 image {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Headroom added to the content: 20 % plus 64 MiB (journal, metadata, slack).
pub fn image_size(content_bytes: u64, inodes: u64) -> u64 {
    let raw = content_bytes + content_bytes / 5 + (64 << 20) + inodes * 256;
    raw.div_ceil(1 << 20) << 20
}

/// Creates `out` (which must not exist) as an ext4 file system holding a copy of
/// `staging`, owned by root at its top. `content_bytes`/`inodes` size it.
pub fn build(
    staging: &Path,
    out: &Path,
    content_bytes: u64,
    inodes: u64,
) -> Result<u64, Ext4Error> {
    let io_err = |source| Ext4Error::Io {
        path: out.to_path_buf(),
        source,
    };
    let size = image_size(content_bytes, inodes);
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(io_err)?;
    file.set_len(size).map_err(io_err)?;
    drop(file);
    let inode_count = (inodes + inodes / 5 + 4096).to_string();
    let output = Command::new(mkfs_path())
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-N", &inode_count])
        .args([
            "-E",
            "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1",
        ])
        .arg("-d")
        .arg(staging)
        .arg(out)
        .output()
        .map_err(Ext4Error::Spawn)?;
    if !output.status.success() {
        let _ = fs::remove_file(out);
        return Err(Ext4Error::Mkfs {
            path: out.to_path_buf(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(size)
}

fn mkfs_path() -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin"] {
        let p = Path::new(dir).join("mkfs.ext4");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("mkfs.ext4")
}
