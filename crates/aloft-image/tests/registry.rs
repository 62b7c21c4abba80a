//! Pulls from a real `docker-registry` started on loopback by each test.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use aloft_image::{Credentials, ImageStore, Progress, PullError, PullOptions, no_progress};
use common::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn anon() -> PullOptions {
    PullOptions {
        credentials: Credentials::Anonymous,
        ..Default::default()
    }
}

fn pull(s: &ImageStore, r: &str, o: &PullOptions) -> Result<aloft_image::Pulled, PullError> {
    rt().block_on(aloft_image::pull(s, r, o, no_progress()))
}

#[test]
fn pull_busybox_then_cached_and_compressions() {
    let reg = Registry::start(None);
    let tmp = tempfile::tempdir().unwrap();
    let layout = write_layout(&tmp.path().join("bb"), &busybox_layers(), None);
    // Docker schema2 manifest for this one.
    reg.push_v2s2(&layout.dir, "bb:1");
    // A three-layer image with gzip, zstd and uncompressed layers.
    let mixed = write_layout(
        &tmp.path().join("mixed"),
        &[
            (
                layer_tar(&[E::File("g", b"gzip".to_vec(), 0o644)]),
                Compression::Gzip,
            ),
            (
                layer_tar(&[E::File("z", b"zstd".to_vec(), 0o644)]),
                Compression::Zstd,
            ),
            (
                layer_tar(&[E::File("n", b"none".to_vec(), 0o644)]),
                Compression::None,
            ),
        ],
        None,
    );
    reg.push_raw(&mixed, "mixed:1");

    let s = ImageStore::open(tmp.path().join("images")).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let progress: aloft_image::ProgressFn =
        Arc::new(move |p: &Progress| ev.lock().unwrap().push(p.clone()));
    let r = format!("{}/bb:1", reg.host());
    let p = rt()
        .block_on(aloft_image::pull(&s, &r, &anon(), progress))
        .unwrap();
    assert!(!p.cached);
    assert_eq!(p.record.digest, layout.config_digest);
    assert_eq!(p.reference, r);
    assert_eq!(
        p.record.config.cmd,
        Some(vec!["sh".into(), "-c".into(), "echo hi".into()])
    );
    assert!(debugfs(&p.record.rootfs, "stat /bin/busybox").contains("Mode:  0755"));
    assert!(
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, Progress::LayerDone { cached: false, .. }))
    );

    let t = Instant::now();
    let again = pull(&s, &r, &anon()).unwrap();
    let took = t.elapsed();
    assert!(again.cached);
    assert_eq!(again.record.rootfs, p.record.rootfs);
    assert!(took.as_millis() < 200, "cached pull took {took:?}");
    assert_eq!(s.lookup(&r, Some(&r)).unwrap().digest, layout.config_digest);

    let m = pull(&s, &format!("{}/mixed:1", reg.host()), &anon()).unwrap();
    for (f, c) in [("/g", "gzip"), ("/z", "zstd"), ("/n", "none")] {
        assert!(
            debugfs(&m.record.rootfs, &format!("cat {f}")).contains(c),
            "{f}"
        );
    }
}

#[test]
fn resume_and_present_blobs_are_skipped() {
    let reg = Registry::start(None);
    let tmp = tempfile::tempdir().unwrap();
    let layers = vec![
        (
            layer_tar(&[E::File("a", vec![7u8; 300_000], 0o644)]),
            Compression::Gzip,
        ),
        (
            layer_tar(&[E::File(
                "b",
                (0..200_000u32).map(|i| (i * 7) as u8).collect(),
                0o644,
            )]),
            Compression::None,
        ),
    ];
    let layout = write_layout(&tmp.path().join("l"), &layers, None);
    reg.push_raw(&layout, "two:1");
    let images = tmp.path().join("images");
    let s = ImageStore::open(&images).unwrap();
    // Layer 0 is already in the store; layer 1 was half downloaded when interrupted.
    let l0 = &layout.layer_digests[0];
    let l1 = &layout.layer_digests[1];
    let b0 = std::fs::read(layout.dir.join("blobs/sha256").join(&l0[7..])).unwrap();
    s.blobs().ingest(&b0[..], Some((l0, None))).unwrap();
    let b1 = std::fs::read(layout.dir.join("blobs/sha256").join(&l1[7..])).unwrap();
    std::fs::write(
        images.join("blobs/partial").join(&l1[7..]),
        &b1[..b1.len() / 2],
    )
    .unwrap();

    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let progress: aloft_image::ProgressFn =
        Arc::new(move |p: &Progress| ev.lock().unwrap().push(p.clone()));
    let p = rt()
        .block_on(aloft_image::pull(
            &s,
            &format!("{}/two:1", reg.host()),
            &anon(),
            progress,
        ))
        .unwrap();
    let ev = events.lock().unwrap();
    assert!(
        ev.iter()
            .any(|e| matches!(e, Progress::LayerDone { digest, cached: true } if digest == l0))
    );
    assert!(ev.iter().any(|e| matches!(e, Progress::LayerStart { digest, offset, .. } if digest == l1 && *offset == (b1.len() / 2) as u64)));
    assert!(debugfs(&p.record.rootfs, "stat /b").contains("Size: 200000"));
    assert!(!images.join("blobs/partial").join(&l1[7..]).exists());

    // A partial download holding wrong bytes is detected and started over.
    let images2 = tmp.path().join("images2");
    let s2 = ImageStore::open(&images2).unwrap();
    let mut bad = b1[..b1.len() / 2].to_vec();
    bad[10] ^= 0xff;
    std::fs::write(images2.join("blobs/partial").join(&l1[7..]), &bad).unwrap();
    let p2 = pull(&s2, &format!("{}/two:1", reg.host()), &anon()).unwrap();
    assert_eq!(p2.record.digest, p.record.digest);
    assert!(s2.blobs().has(l1, Some(b1.len() as u64)));
}

#[test]
fn basic_auth_registry() {
    let reg = Registry::start(Some(("alice", "s3cret")));
    let tmp = tempfile::tempdir().unwrap();
    let layout = write_layout(&tmp.path().join("bb"), &busybox_layers(), None);
    reg.push(&layout.dir, "private:1", Some(("alice", "s3cret")));
    let s = ImageStore::open(tmp.path().join("images")).unwrap();
    let r = format!("{}/private:1", reg.host());
    let err = pull(&s, &r, &anon()).unwrap_err();
    assert!(matches!(err, PullError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("401"), "{err}");
    let wrong = PullOptions {
        credentials: Credentials::Basic {
            username: "alice".into(),
            password: "nope".into(),
        },
        ..Default::default()
    };
    assert!(matches!(
        pull(&s, &r, &wrong).unwrap_err(),
        PullError::Unauthorized { .. }
    ));
    // Credentials from a docker config file.
    let cfg = tmp.path().join("config.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"YWxpY2U6czNjcmV0"}}}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    let from_file = PullOptions {
        docker_config: Some(cfg),
        ..Default::default()
    };
    let p = pull(&s, &r, &from_file).unwrap();
    assert_eq!(p.record.digest, layout.config_digest);
}

#[test]
fn error_cases_are_clear() {
    let reg = Registry::start(None);
    let tmp = tempfile::tempdir().unwrap();
    let s = ImageStore::open(tmp.path().join("images")).unwrap();

    // Missing tag.
    let layout = write_layout(&tmp.path().join("bb"), &busybox_layers(), None);
    reg.push(&layout.dir, "bb:1", None);
    let err = pull(&s, &format!("{}/bb:nope", reg.host()), &anon()).unwrap_err();
    assert!(matches!(err, PullError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("bb:nope"), "{err}");

    // Unknown registry: nothing listens there.
    let err = pull(&s, &format!("127.0.0.1:{}/bb:1", closed_port()), &anon()).unwrap_err();
    assert!(matches!(err, PullError::Unreachable { .. }), "{err}");

    // Wrong digest: the registry serves different bytes of the same size.
    let l1 = write_layout(
        &tmp.path().join("c"),
        &[(
            layer_tar(&[E::File("x", vec![1u8; 50_000], 0o644)]),
            Compression::None,
        )],
        None,
    );
    reg.push_raw(&l1, "corrupt:1");
    let blob = reg.blob_path(&l1.layer_digests[0]);
    let mut data = std::fs::read(&blob).unwrap();
    data[1000] ^= 0xff;
    std::fs::write(&blob, &data).unwrap();
    let err = pull(&s, &format!("{}/corrupt:1", reg.host()), &anon()).unwrap_err();
    assert!(err.to_string().contains(&l1.layer_digests[0]), "{err}");
    assert!(!s.blobs().has(&l1.layer_digests[0], None));

    // Truncated blob.
    let l2 = write_layout(
        &tmp.path().join("t"),
        &[(
            layer_tar(&[E::File("y", vec![2u8; 50_000], 0o644)]),
            Compression::None,
        )],
        None,
    );
    reg.push_raw(&l2, "trunc:1");
    let blob = reg.blob_path(&l2.layer_digests[0]);
    let data = std::fs::read(&blob).unwrap();
    std::fs::write(&blob, &data[..data.len() / 2]).unwrap();
    let err = pull(&s, &format!("{}/trunc:1", reg.host()), &anon()).unwrap_err();
    assert!(err.to_string().contains(&l2.layer_digests[0]), "{err}");
    assert!(!s.blobs().has(&l2.layer_digests[0], None));
    assert!(s.list().unwrap().is_empty());
}
