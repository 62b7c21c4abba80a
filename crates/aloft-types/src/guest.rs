//! Host ↔ guest protocol: the run config the agent hands to `aloft-init` (`run.json`)
//! and the frames exchanged over the virtio-serial channel.
