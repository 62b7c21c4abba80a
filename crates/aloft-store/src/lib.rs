//! The catalog store: the `Store` trait (get, put, compare-and-swap by revision,
//! delete, list by prefix, watch a prefix from a revision, TTL leases) and its
//! backends (SQLite for one host; NATS JetStream KV for many).
//!
//! It owns durability and ordering of catalog records. It must not interpret the
//! values it stores: keys and JSON bytes in, keys and JSON bytes out.
