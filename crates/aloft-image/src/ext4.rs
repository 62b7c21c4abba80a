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

/// Directories the guest mounts file systems on at every boot, made empty in the
/// image when it lacks them: created at boot instead, each would be the first write
/// to the disk, paying for the journal and the block allocator before the app starts.
/// `.fly` holds the per-boot tmpfs (the metadata API socket and the generated files
/// below).
const MOUNT_POINTS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    (".fly", 0o755),
    ("etc", 0o755),
];

/// Files the guest generates at every boot and bind-mounts over these paths from its
/// tmpfs, made empty in the image when it lacks them (for the same reason).
const GENERATED_FILES: &[&str] = &["etc/hostname", "etc/hosts", "etc/resolv.conf"];

/// Adds the missing [`MOUNT_POINTS`] and [`GENERATED_FILES`] to `staging` (an
/// existing entry of that name, even a symlink or a file, is left as the image has
/// it; nothing is made inside an `etc` that is not a directory).
fn add_mount_points(staging: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (name, mode) in MOUNT_POINTS {
        let path = staging.join(name);
        if fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        fs::create_dir(&path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
    }
    if !fs::symlink_metadata(staging.join("etc")).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    for name in GENERATED_FILES {
        let path = staging.join(name);
        if fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        fs::write(&path, b"")?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// Creates `out` (which must not exist) as an ext4 file system holding a copy of
/// `staging` plus its missing [`MOUNT_POINTS`], owned by root at its top.
/// `content_bytes`/`inodes` size it.
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
    add_mount_points(staging).map_err(|source| Ext4Error::Io {
        path: staging.to_path_buf(),
        source,
    })?;
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn missing_mount_points_are_added_and_existing_entries_kept() {
        let staging = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("/var/tmp", staging.path().join("tmp")).expect("symlink");
        std::fs::write(staging.path().join("run"), b"a file").expect("write");
        super::add_mount_points(staging.path()).expect("mount points");
        for (name, mode) in [("dev", 0o755), ("proc", 0o555), ("sys", 0o555)] {
            let meta = std::fs::symlink_metadata(staging.path().join(name)).expect(name);
            assert!(meta.is_dir(), "{name}");
            assert_eq!(meta.permissions().mode() & 0o7777, mode, "{name}");
        }
        let tmp = std::fs::symlink_metadata(staging.path().join("tmp")).expect("tmp");
        assert!(
            tmp.file_type().is_symlink(),
            "the image's /tmp symlink is kept"
        );
        assert_eq!(
            std::fs::read(staging.path().join("run")).expect("run"),
            b"a file"
        );
        let fly = std::fs::symlink_metadata(staging.path().join(".fly")).expect(".fly");
        assert!(fly.is_dir());
        for name in ["hostname", "hosts", "resolv.conf"] {
            let path = staging.path().join("etc").join(name);
            let meta = std::fs::symlink_metadata(&path).expect(name);
            assert!(meta.is_file() && meta.len() == 0, "{name}");
            assert_eq!(meta.permissions().mode() & 0o7777, 0o644, "{name}");
        }
    }

    #[test]
    fn generated_files_keep_the_images_own_and_never_leave_a_symlinked_etc() {
        let staging = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(outside.path(), staging.path().join("etc")).expect("symlink");
        super::add_mount_points(staging.path()).expect("mount points");
        assert_eq!(
            std::fs::read_dir(outside.path()).expect("outside").count(),
            0,
            "nothing is written through a symlinked /etc"
        );

        let staging = tempfile::tempdir().expect("tempdir");
        let etc = staging.path().join("etc");
        std::fs::create_dir(&etc).expect("etc");
        std::fs::write(etc.join("hosts"), b"127.0.0.1 image\n").expect("hosts");
        std::os::unix::fs::symlink("/run/resolv.conf", etc.join("resolv.conf")).expect("link");
        super::add_mount_points(staging.path()).expect("mount points");
        assert_eq!(
            std::fs::read(etc.join("hosts")).expect("hosts"),
            b"127.0.0.1 image\n"
        );
        assert!(
            std::fs::symlink_metadata(etc.join("resolv.conf"))
                .expect("resolv.conf")
                .file_type()
                .is_symlink()
        );
        assert!(etc.join("hostname").is_file());
    }
}
