//! The `Vmm` driver trait and its QEMU `microvm` driver: command line, QMP client,
//! boot, pause/resume, suspend to a file, kill; the guest kernel and base initramfs;
//! the per-machine initramfs carrying `run.json`; qcow2 overlays.
//!
//! It owns one VM at a time and the host side of the guest channel. It must not keep
//! machine state or policy (restarts, health, placement): that is the agent's.
