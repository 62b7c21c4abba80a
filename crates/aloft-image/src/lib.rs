//! OCI images into bootable root filesystems: registry pulls (Distribution v2 with
//! token auth, index → linux/amd64, digest-verified, resumable, concurrent), imports of
//! `docker save` and OCI-layout archives, safe layer application, and one cached ext4
//! base image per image digest.
//!
//! It owns the image cache under the data directory. It must not know about machines,
//! overlays or VMs: it hands out a read-only base image and the image config.

pub mod apply;
pub mod archive;
pub mod blobs;
pub mod build;
pub mod ext4;
pub mod registry;
pub mod store;

pub use apply::{ApplyError, ApplyLimits};
pub use archive::{ImportError, Imported, import, normalise_reference};
pub use blobs::{BlobError, BlobStore};
pub use build::{PackError, pack_dir};
pub use registry::{Credentials, PullError, PullOptions, Pulled, pull};
pub use store::{
    GcReport, ImageConfig, ImageRecord, ImageStore, Progress, ProgressFn, StoreError, no_progress,
};
