//! The conformance suite every [`Store`] backend must pass, written once. A backend's
//! tests call [`conformance_tests!`](crate::conformance_tests) with a factory that
//! returns a fresh, empty store (and a guard keeping its resources alive).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::{Change, Expect, Op, Revision, Store, StoreError};

/// Generate one `#[tokio::test]` per conformance case for a backend.
/// `$factory` is an async closure/fn returning `(Arc<dyn Store>, guard)`.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@cases $factory;
            put_get_delete, compare_and_swap, batch_is_atomic, invalid_keys,
            concurrent_cas_increments, list_prefix, watch_resumes_without_gaps_or_duplicates,
            watch_from_listing_revision, watch_filters_prefix, lease_expiry_deletes_keys,
            lease_keep_alive_and_revoke);
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let (store, _guard) = ($factory)().await;
                $crate::conformance::$case(store).await;
            }
        )*
    };
}

const DEADLINE: Duration = Duration::from_secs(10);

async fn next_change(w: &mut crate::Watch) -> Change {
    match tokio::time::timeout(DEADLINE, w.next()).await {
        Ok(Some(Ok(c))) => c,
        Ok(Some(Err(e))) => panic!("watch error: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no change within {DEADLINE:?}"),
    }
}

pub async fn put_get_delete(store: Arc<dyn Store>) {
    assert!(store.get("apps/a").await.unwrap().is_none());
    let r1 = store.put("apps/a", b"1".to_vec()).await.unwrap();
    let r2 = store.put("apps/a", b"2".to_vec()).await.unwrap();
    assert!(r2 > r1 && r1 > 0, "revisions increase: {r1} {r2}");
    let e = store.get("apps/a").await.unwrap().unwrap();
    assert_eq!((e.value.as_slice(), e.revision), (&b"2"[..], r2));
    assert_eq!(store.revision().await.unwrap(), r2);
    let r3 = store.delete("apps/a", Expect::Any).await.unwrap();
    assert!(r3 > r2);
    assert!(store.get("apps/a").await.unwrap().is_none());
    // Deleting an absent key changes nothing.
    assert_eq!(store.delete("apps/a", Expect::Any).await.unwrap(), r3);
}

pub async fn compare_and_swap(store: Arc<dyn Store>) {
    let r1 = store
        .put_if("k", b"a".to_vec(), Expect::Absent)
        .await
        .unwrap();
    match store.put_if("k", b"b".to_vec(), Expect::Absent).await {
        Err(StoreError::Conflict { key, actual, .. }) => {
            assert_eq!((key.as_str(), actual), ("k", r1))
        }
        other => panic!("expected conflict, got {other:?}"),
    }
    match store
        .put_if("k", b"b".to_vec(), Expect::Revision(r1 + 100))
        .await
    {
        Err(StoreError::Conflict {
            key,
            actual,
            expected,
        }) => {
            assert_eq!(
                (key.as_str(), actual, expected),
                ("k", r1, Expect::Revision(r1 + 100))
            )
        }
        other => panic!("expected conflict, got {other:?}"),
    }
    let r2 = store
        .put_if("k", b"b".to_vec(), Expect::Revision(r1))
        .await
        .unwrap();
    assert!(matches!(
        store.delete("k", Expect::Revision(r1)).await,
        Err(StoreError::Conflict { .. })
    ));
    store.delete("k", Expect::Revision(r2)).await.unwrap();
    assert!(matches!(
        store.put_if("k", b"c".to_vec(), Expect::Revision(r2)).await,
        Err(StoreError::Conflict { actual: 0, .. })
    ));
}

pub async fn batch_is_atomic(store: Arc<dyn Store>) {
    store.put("y", b"0".to_vec()).await.unwrap();
    let before = store.revision().await.unwrap();
    let err = store
        .apply(vec![
            Op::put("x", b"1".to_vec()),
            Op::Put {
                key: "y".into(),
                value: b"1".to_vec(),
                expect: Expect::Revision(before + 999),
                lease: None,
            },
        ])
        .await;
    assert!(
        matches!(err, Err(StoreError::Conflict { ref key, .. }) if key == "y"),
        "{err:?}"
    );
    assert!(store.get("x").await.unwrap().is_none(), "no partial batch");
    assert_eq!(store.revision().await.unwrap(), before);
    let r = store
        .apply(vec![
            Op::put("x", b"1".to_vec()),
            Op::put("z", b"1".to_vec()),
        ])
        .await
        .unwrap();
    assert_eq!(r, before + 2);
}

pub async fn invalid_keys(store: Arc<dyn Store>) {
    for key in ["", "has space", "nul\0"] {
        assert!(
            matches!(
                store.put(key, vec![]).await,
                Err(StoreError::InvalidKey { .. })
            ),
            "{key:?}"
        );
    }
}

/// 8 tasks doing 1,000 compare-and-swap increments in total end at exactly 1,000.
pub async fn concurrent_cas_increments(store: Arc<dyn Store>) {
    store.put("counter", b"0".to_vec()).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0u64;
            for _ in 0..125 {
                loop {
                    let e = store.get("counter").await.unwrap().unwrap();
                    let n: u64 = std::str::from_utf8(&e.value).unwrap().parse().unwrap();
                    match store
                        .put_if(
                            "counter",
                            (n + 1).to_string().into_bytes(),
                            Expect::Revision(e.revision),
                        )
                        .await
                    {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => conflicts += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            conflicts
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let e = store.get("counter").await.unwrap().unwrap();
    assert_eq!(e.value, b"1000");
}

pub async fn list_prefix(store: Arc<dyn Store>) {
    for k in ["a/1", "a/2", "ab/1", "b/1", "a/"] {
        store.put(k, k.as_bytes().to_vec()).await.unwrap();
    }
    let l = store.list("a/").await.unwrap();
    let keys: Vec<_> = l.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["a/", "a/1", "a/2"]);
    assert_eq!(l.revision, store.revision().await.unwrap());
    assert_eq!(store.list("").await.unwrap().entries.len(), 5);
    assert!(store.list("zzz").await.unwrap().entries.is_empty());
}

/// A watcher that disconnects and resumes from its last revision misses nothing and
/// sees nothing twice.
pub async fn watch_resumes_without_gaps_or_duplicates(store: Arc<dyn Store>) {
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..200u32 {
                if i % 7 == 0 {
                    store
                        .delete(&format!("m/{}", i - i.min(3)), Expect::Any)
                        .await
                        .unwrap();
                } else {
                    store
                        .put(&format!("m/{i}"), i.to_string().into_bytes())
                        .await
                        .unwrap();
                }
            }
        })
    };
    let mut seen: Vec<Revision> = Vec::new();
    let mut last = 0;
    // Reconnect every 23 changes while the writer runs.
    loop {
        let mut w = store.watch("m/", last).await.unwrap();
        for _ in 0..23 {
            let c = next_change(&mut w).await;
            assert!(c.revision > last, "order: {} after {last}", c.revision);
            last = c.revision;
            seen.push(c.revision);
        }
        drop(w);
        if writer.is_finished() && last == store.revision().await.unwrap() {
            break;
        }
        if seen.len() > 150 {
            // Drain what is left in one go.
            writer.await.unwrap();
            let head = store.revision().await.unwrap();
            let mut w = store.watch("m/", last).await.unwrap();
            while last < head {
                let c = next_change(&mut w).await;
                assert!(c.revision > last);
                last = c.revision;
                seen.push(c.revision);
            }
            break;
        }
    }
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no change twice");
    let head = store.revision().await.unwrap();
    // Every change is under m/ here, so the revisions must be exactly 1..=head.
    assert_eq!(seen, (1..=head).collect::<Vec<_>>());
}

pub async fn watch_from_listing_revision(store: Arc<dyn Store>) {
    store.put("s/1", b"a".to_vec()).await.unwrap();
    let listing = store.list("s/").await.unwrap();
    let mut w = store.watch("s/", listing.revision).await.unwrap();
    let r = store.put("s/2", b"b".to_vec()).await.unwrap();
    let c = next_change(&mut w).await;
    assert_eq!(
        (c.key.as_str(), c.revision, c.value),
        ("s/2", r, Some(b"b".to_vec()))
    );
    let r = store.delete("s/1", Expect::Any).await.unwrap();
    let c = next_change(&mut w).await;
    assert_eq!((c.key.as_str(), c.revision, c.value), ("s/1", r, None));
}

pub async fn watch_filters_prefix(store: Arc<dyn Store>) {
    let mut w = store.watch("machines/app1/", 0).await.unwrap();
    store.put("machines/app2/x", b"no".to_vec()).await.unwrap();
    store.put("machines/app1", b"no".to_vec()).await.unwrap();
    let r = store.put("machines/app1/m", b"yes".to_vec()).await.unwrap();
    let c = next_change(&mut w).await;
    assert_eq!((c.key.as_str(), c.revision), ("machines/app1/m", r));
}

pub async fn lease_expiry_deletes_keys(store: Arc<dyn Store>) {
    let lease = store.grant_lease(Duration::from_millis(300)).await.unwrap();
    store
        .put_with_lease("hosts/h1", b"up".to_vec(), lease)
        .await
        .unwrap();
    store.put("hosts/h2", b"up".to_vec()).await.unwrap();
    let mut w = store
        .watch("hosts/", store.revision().await.unwrap())
        .await
        .unwrap();
    let c = next_change(&mut w).await;
    assert_eq!((c.key.as_str(), c.value), ("hosts/h1", None));
    assert!(store.get("hosts/h1").await.unwrap().is_none());
    assert!(store.get("hosts/h2").await.unwrap().is_some());
    assert!(
        matches!(store.keep_alive(lease).await, Err(StoreError::LeaseNotFound(l)) if l == lease)
    );
    assert!(matches!(
        store.put_with_lease("hosts/h3", vec![], lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

pub async fn lease_keep_alive_and_revoke(store: Arc<dyn Store>) {
    let lease = store.grant_lease(Duration::from_millis(600)).await.unwrap();
    store
        .put_with_lease("hosts/h1", b"up".to_vec(), lease)
        .await
        .unwrap();
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while tokio::time::Instant::now() < until {
        tick.tick().await;
        store.keep_alive(lease).await.unwrap();
    }
    assert!(
        store.get("hosts/h1").await.unwrap().is_some(),
        "kept alive past its TTL"
    );
    store.revoke_lease(lease).await.unwrap();
    assert!(store.get("hosts/h1").await.unwrap().is_none());
}
