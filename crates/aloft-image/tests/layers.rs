//! Layer application end to end: OCI layouts and docker-save archives built here are
//! imported, and the resulting ext4 base image is read back with debugfs.

mod common;

use std::collections::HashSet;
use std::time::Instant;

use aloft_image::{ApplyLimits, ImageStore, no_progress};
use common::*;

fn store(dir: &std::path::Path) -> ImageStore {
    ImageStore::open(dir.join("images")).unwrap()
}

#[test]
fn busybox_layout_imports_to_ext4_with_config() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = write_layout(
        &tmp.path().join("oci"),
        &busybox_layers(),
        Some("example.com/bb:1"),
    );
    let s = store(tmp.path());
    let imported = aloft_image::import(&s, &layout.dir, &no_progress()).unwrap();
    let rec = &imported.record;
    assert_eq!(rec.digest, layout.config_digest);
    assert_eq!(
        rec.manifest_digest.as_deref(),
        Some(layout.manifest_digest.as_str())
    );
    assert_eq!(imported.tags, vec!["example.com/bb:1".to_string()]);
    assert_eq!(
        rec.config.entrypoint,
        Some(vec!["/bin/busybox".to_string()])
    );
    assert_eq!(rec.config.exposed_ports, vec!["8080/tcp".to_string()]);
    assert_eq!(rec.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(rec.config.working_dir.as_deref(), Some("/work"));
    assert!(
        rec.rootfs
            .ends_with(format!("images/rootfs/{}.ext4", &rec.digest[7..]))
    );
    let st = debugfs(&rec.rootfs, "stat /bin/busybox");
    assert!(st.contains("Mode:  0755"), "{st}");
    assert!(debugfs(&rec.rootfs, "cat /etc/hostname").contains("busybox"));
    // Cache hit by digest is fast and returns the same record.
    let t = Instant::now();
    let again = s.cached(&rec.digest).unwrap();
    assert!(t.elapsed().as_millis() < 50, "{:?}", t.elapsed());
    assert_eq!(again.rootfs, rec.rootfs);
}

#[test]
fn whiteouts_opaque_links_modes_owners_and_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let l1 = layer_tar(&[
        E::Dir("etc/", 0o755),
        E::File("etc/keep", b"keep".to_vec(), 0o644),
        E::File("etc/gone", b"gone".to_vec(), 0o644),
        E::Dir("etc/sub/", 0o700),
        E::File("etc/sub/deep", b"deep".to_vec(), 0o644),
        E::Dir("opq/", 0o755),
        E::File("opq/lower", b"lower".to_vec(), 0o644),
        E::Dir("opq/d/", 0o755),
        E::File("opq/d/lower2", b"x".to_vec(), 0o644),
        E::Dir("usr/", 0o755),
        E::Dir("usr/lib/", 0o755),
        E::Symlink("lib", "/usr/lib"),
        E::File("replaced", b"a file".to_vec(), 0o644),
        E::Dir("dir2file/", 0o755),
        E::File("dir2file/x", b"x".to_vec(), 0o644),
    ]);
    let l2 = layer_tar(&[
        E::Whiteout("etc/.wh.gone"),
        E::Whiteout("etc/.wh.sub"),
        E::Opaque("opq/.wh..wh..opq"),
        E::File("opq/upper", b"upper".to_vec(), 0o600),
        // Written through the in-root symlink lib -> /usr/lib.
        E::File("lib/libfoo.so", b"foo".to_vec(), 0o755),
        E::Owned("owned", b"o".to_vec(), 0o4750, 1234, 5678),
        E::Hardlink("keep-link", "etc/keep"),
        E::Symlink("abs-link", "/etc/keep"),
        E::Dir("replaced/", 0o711),
        E::File("dir2file", b"now a file".to_vec(), 0o640),
        E::Fifo("fifo"),
        E::Char("null", 1, 3),
    ]);
    let layout = write_layout(
        &tmp.path().join("oci"),
        &[(l1, Compression::Gzip), (l2, Compression::Zstd)],
        None,
    );
    let s = store(tmp.path());
    let rec = aloft_image::import(&s, &layout.dir, &no_progress())
        .unwrap()
        .record;
    let img = &rec.rootfs;
    let ls_etc = debugfs(img, "ls -l /etc");
    assert!(ls_etc.contains("keep"), "{ls_etc}");
    assert!(
        !ls_etc.contains("gone") && !ls_etc.contains("sub"),
        "{ls_etc}"
    );
    assert!(!ls_etc.contains(".wh."), "{ls_etc}");
    let ls_opq = debugfs(img, "ls -l /opq");
    assert!(
        ls_opq.contains("upper") && !ls_opq.contains("lower") && !ls_opq.contains(" d\n"),
        "{ls_opq}"
    );
    assert!(debugfs(img, "cat /usr/lib/libfoo.so").contains("foo"));
    assert!(debugfs(img, "stat /lib").contains("Type: symlink"));
    let owned = debugfs(img, "stat /owned");
    assert!(
        owned.contains("Mode:  04750")
            && owned.contains("User:  1234")
            && owned.contains("Group:  5678"),
        "{owned}"
    );
    let keep = debugfs(img, "stat /etc/keep");
    assert!(keep.contains("Links: 2"), "{keep}");
    assert!(keep.contains(&format!("mtime: 0x{:08x}", MTIME)), "{keep}");
    let abs = debugfs(img, "stat /abs-link");
    assert!(abs.contains("Fast link dest: \"/etc/keep\""), "{abs}");
    assert!(debugfs(img, "stat /replaced").contains("Type: directory"));
    assert!(debugfs(img, "cat /dir2file").contains("now a file"));
    assert!(debugfs(img, "stat /fifo").contains("Type: FIFO"));
    let null = debugfs(img, "stat /null");
    assert!(null.contains("Type: character special"), "{null}");
    assert!(null.contains("Device major/minor number: 01:03"), "{null}");
    let root = debugfs(img, "stat /");
    assert!(
        root.contains("User:     0") || root.contains("User:  0"),
        "{root}"
    );
}

fn refused(layer: Vec<u8>, limits: Option<ApplyLimits>, want: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let mut s = store(tmp.path());
    if let Some(l) = limits {
        s = s.with_limits(l);
    }
    let base = layer_tar(&[E::Dir("d/", 0o755)]);
    let layout = write_layout(
        &tmp.path().join("oci"),
        &[(base, Compression::None), (layer, Compression::Gzip)],
        None,
    );
    let err = aloft_image::import(&s, &layout.dir, &no_progress())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&layout.layer_digests[1]),
        "error must name the layer: {err}"
    );
    for w in want {
        assert!(err.contains(w), "error must mention {w:?}: {err}");
    }
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "wrote outside the root"
    );
    assert!(
        std::fs::read_dir(tmp.path().join("images/rootfs"))
            .unwrap()
            .all(|e| { !e.unwrap().file_name().to_string_lossy().ends_with(".ext4") })
    );
    assert_eq!(
        std::fs::read_dir(tmp.path().join("images/staging"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn absolute_path_is_refused() {
    refused(
        layer_tar(&[E::File("/etc/passwd", b"x".to_vec(), 0o644)]),
        None,
        &["/etc/passwd", "absolute"],
    );
}

#[test]
fn dotdot_is_refused() {
    refused(
        layer_tar(&[E::File("d/../../../outside/x", b"x".to_vec(), 0o644)]),
        None,
        &["d/../../../outside/x", ".."],
    );
}

#[test]
fn symlink_escape_is_refused() {
    refused(
        layer_tar(&[
            E::Symlink("esc", "../../../../../../../../../../../../tmp"),
            E::File("esc/pwned", b"x".to_vec(), 0o644),
        ]),
        None,
        &["esc/pwned", "outside the root"],
    );
    // A whiteout through the same kind of link must not delete outside either.
    refused(
        layer_tar(&[
            E::Symlink("esc", "../../../../../../../../../../../../tmp"),
            E::Whiteout("esc/.wh.victim"),
        ]),
        None,
        &["esc/.wh.victim", "outside the root"],
    );
}

#[test]
fn hardlink_escape_is_refused() {
    refused(
        layer_tar(&[E::Hardlink("d/shadow", "../etc/shadow")]),
        None,
        &["d/shadow", "hardlink"],
    );
    refused(
        layer_tar(&[
            E::Symlink("up", "../../../../../../../../.."),
            E::Hardlink("d/passwd", "up/etc/passwd"),
        ]),
        None,
        &["d/passwd"],
    );
}

#[test]
fn decompression_bomb_is_refused() {
    let zeros = vec![0u8; 8 << 20];
    refused(
        layer_tar(&[E::File("d/bomb", zeros, 0o644)]),
        Some(ApplyLimits {
            max_bytes: 1 << 20,
            max_entries: 1000,
        }),
        &["d/bomb", "limit"],
    );
    let many: Vec<E> = (0..50)
        .map(|_| E::File("d/f", b"x".to_vec(), 0o644))
        .collect();
    refused(
        layer_tar(&many),
        Some(ApplyLimits {
            max_bytes: 1 << 30,
            max_entries: 20,
        }),
        &["entries"],
    );
}

#[test]
fn docker_save_tarball_imports_and_gc_frees_untagged() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = layer_tar(&[
        E::Dir("a/", 0o755),
        E::File("a/b", b"hello".to_vec(), 0o644),
    ]);
    let layer_id = sha(&layer);
    let config = serde_json::to_vec(&config_json(std::slice::from_ref(&layer_id))).unwrap();
    let config_digest = sha(&config);
    let manifest = serde_json::json!([{
        "Config": format!("{}.json", &config_digest[7..]),
        "RepoTags": ["saved:v1"],
        "Layers": ["abc/layer.tar"],
    }]);
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        (&format!("{}.json", &config_digest[7..])[..], config.clone()),
        ("abc/layer.tar", layer.clone()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    let archive = tmp.path().join("saved.tar");
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();
    let s = store(tmp.path());
    let imp = aloft_image::import(&s, &archive, &no_progress()).unwrap();
    assert_eq!(imp.record.digest, config_digest);
    assert_eq!(imp.tags, vec!["docker.io/library/saved:v1".to_string()]);
    assert!(debugfs(&imp.record.rootfs, "cat /a/b").contains("hello"));
    assert_eq!(
        s.lookup("saved:v1", Some("docker.io/library/saved:v1"))
            .unwrap()
            .digest,
        config_digest
    );
    assert_eq!(
        s.lookup(&config_digest[..15], None).unwrap().digest,
        config_digest
    );

    // Tagged: gc keeps it. In use: gc keeps it. Neither: gc removes it and its blobs.
    let r = s.gc(&HashSet::new()).unwrap();
    assert!(r.images_removed.is_empty() && r.blobs_removed == 0);
    assert_eq!(
        s.remove("saved:v1", Some("docker.io/library/saved:v1"))
            .unwrap()
            .len(),
        1
    );
    let r = s.gc(&HashSet::from([config_digest.clone()])).unwrap();
    assert!(r.images_removed.is_empty());
    assert!(imp.record.rootfs.exists());
    let r = s.gc(&HashSet::new()).unwrap();
    assert_eq!(r.images_removed, vec![config_digest.clone()]);
    assert_eq!(r.blobs_removed, 2);
    assert!(!imp.record.rootfs.exists());
    assert!(s.blobs().list().unwrap().is_empty());
}

#[test]
fn oci_layout_tar_with_corrupt_blob_names_the_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = write_layout(&tmp.path().join("oci"), &busybox_layers(), None);
    let layer = &layout.layer_digests[0];
    let p = layout.dir.join("blobs/sha256").join(&layer[7..]);
    let mut data = std::fs::read(&p).unwrap();
    let n = data.len();
    data[n / 2] ^= 0xff;
    std::fs::write(&p, data).unwrap();
    let archive = tmp.path().join("oci.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&archive).unwrap());
    b.append_dir_all(".", &layout.dir).unwrap();
    b.finish().unwrap();
    drop(b);
    let s = store(tmp.path());
    let err = aloft_image::import(&s, &archive, &no_progress())
        .unwrap_err()
        .to_string();
    assert!(err.contains(layer), "{err}");
    assert!(!s.blobs().has(layer, None));
}

#[test]
fn pax_xattrs_reach_the_ext4_image() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("SCHILY.xattr.user.aloft", &b"hello"[..])])
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "withattr", &b"hi"[..]).unwrap();
    let layer = b.into_inner().unwrap();
    let layout = write_layout(&tmp.path().join("oci"), &[(layer, Compression::Gzip)], None);
    let s = store(tmp.path());
    let rec = aloft_image::import(&s, &layout.dir, &no_progress())
        .unwrap()
        .record;
    let ea = debugfs(&rec.rootfs, "ea_list /withattr");
    assert!(ea.contains("user.aloft") && ea.contains("hello"), "{ea}");
}
