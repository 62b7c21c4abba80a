//! The shared conformance suite against the SQLite backend.

use std::sync::Arc;

use aloft_store::{SqliteStore, Store};

async fn fresh() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("catalog.db"))
        .await
        .unwrap();
    (Arc::new(store), dir)
}

aloft_store::conformance_tests!(fresh);
