//! The catalog store: the `Store` trait (get, put, compare-and-swap by revision,
//! delete, list by prefix, watch a prefix from a revision, TTL leases) and its
//! backends (SQLite for one host; NATS JetStream KV for many).
//!
//! It owns durability and ordering of catalog records. It must not interpret the
//! values it stores: keys and JSON bytes in, keys and JSON bytes out.
//!
//! The contract every backend keeps (and [`conformance`] checks):
//! - one revision counter per store, increased by every change; a key's `revision`
//!   is the revision of its last change;
//! - a change is acknowledged only once it is durable;
//! - a watch from revision `r` delivers every change with revision `> r` whose key has
//!   the prefix, exactly once and in revision order, then follows live changes;
//! - keys attached to a lease are deleted (with delete events) when the lease lapses.

pub mod conformance;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;

pub use sqlite::SqliteStore;

/// A store-wide, strictly increasing change number. 0 means "before any change".
pub type Revision = u64;

/// Identifies a TTL lease.
pub type LeaseId = u64;

/// A key with its value and the revision of its last change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    pub revision: Revision,
    pub lease: Option<LeaseId>,
}

/// What a write expects to find, for compare-and-swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Expect {
    /// Write whatever is there.
    #[default]
    Any,
    /// The key must not exist (create).
    Absent,
    /// The key must exist at exactly this revision.
    Revision(Revision),
}

/// One write of a batch, applied atomically with the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
        expect: Expect,
    },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            expect: Expect::Any,
            lease: None,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } => key,
        }
    }
}

/// A change as delivered to watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub revision: Revision,
    pub key: String,
    /// `None` for a delete.
    pub value: Option<Vec<u8>>,
}

/// The keys under a prefix, as of one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<Entry>,
    /// The store revision the listing reflects; watch from it to follow on.
    pub revision: Revision,
}

/// Errors of every store operation; each names the key or lease it failed on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("conflict on key {key:?}: expected {expected:?}, found revision {actual}")]
    Conflict {
        key: String,
        expected: Expect,
        /// The key's current revision (0 when absent).
        actual: Revision,
    },
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("lease {0} does not exist or has expired")]
    LeaseNotFound(LeaseId),
    #[error("revision {requested} was compacted (oldest kept change is {oldest}); list again")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    #[error("store database {path}: {source}")]
    Database {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store is closed")]
    Closed,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A live watch: changes in revision order, exactly once.
pub struct Watch {
    rx: tokio::sync::mpsc::Receiver<Result<Change>>,
}

impl Watch {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Result<Change>>) -> Self {
        Self { rx }
    }

    /// The next change, or `None` when the store has shut down.
    pub async fn next(&mut self) -> Option<Result<Change>> {
        self.rx.recv().await
    }
}

/// The catalog store. Values are opaque bytes (JSON by convention).
#[async_trait]
pub trait Store: Send + Sync {
    async fn get(&self, key: &str) -> Result<Option<Entry>>;

    /// Apply writes atomically (all or none); returns the revision of the batch.
    /// A failed expectation fails the whole batch with [`StoreError::Conflict`].
    async fn apply(&self, ops: Vec<Op>) -> Result<Revision>;

    async fn list(&self, prefix: &str) -> Result<Listing>;

    /// Follow every change under `prefix` with a revision greater than `after`.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch>;

    /// The current store revision.
    async fn revision(&self) -> Result<Revision>;

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;
    /// End a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// Put a value; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        self.apply(vec![Op::put(key, value)]).await
    }

    /// Compare-and-swap: put only if the key is as `expect` says.
    async fn put_if(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<Revision> {
        self.apply(vec![Op::Put {
            key: key.to_string(),
            value,
            expect,
            lease: None,
        }])
        .await
    }

    /// Put a value that vanishes when `lease` lapses.
    async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision> {
        self.apply(vec![Op::Put {
            key: key.to_string(),
            value,
            expect: Expect::Any,
            lease: Some(lease),
        }])
        .await
    }

    /// Delete a key (a no-op change is still recorded only if the key existed).
    async fn delete(&self, key: &str, expect: Expect) -> Result<Revision> {
        self.apply(vec![Op::Delete {
            key: key.to_string(),
            expect,
        }])
        .await
    }
}

/// Keys are non-empty, printable, without NUL, at most 1 KiB (JetStream KV accepts a
/// similar alphabet; `/` separates path segments).
pub fn validate_key(key: &str) -> Result<()> {
    let bad = |reason| {
        Err(StoreError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key.len() > 1024 {
        return bad("longer than 1024 bytes");
    }
    if key.chars().any(|c| c.is_control() || c == ' ') {
        return bad("contains a control character or space");
    }
    Ok(())
}
