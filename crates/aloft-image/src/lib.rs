//! OCI images into bootable root filesystems: registry pulls (Distribution v2 with
//! token auth, index → linux/amd64, digest-verified, resumable, concurrent), imports of
//! `docker save` and OCI-layout archives, safe layer application, and one cached ext4
//! base image per image digest.
//!
//! It owns the image cache under the data directory. It must not know about machines,
//! overlays or VMs: it hands out a read-only base image and the image config.

pub mod apply;
pub mod blobs;
