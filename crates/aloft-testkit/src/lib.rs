//! Fixtures shared by Aloft's tests and benches: busybox httpd OCI images built and
//! imported on the spot ([`BusyboxHttpd`]), the kernel and static guest-init lookup
//! with the `ALOFT_KERNEL_DIR` / `ALOFT_INIT_BIN` conventions ([`kernel_dir`],
//! [`init_bin`]), free loopback ports ([`free_port`]), a guard that runs an
//! `aloft dev` child and stops it and its VMs on drop ([`DevChild`]), machine configs
//! for a busybox web machine ([`web_machine_config`]), the agent config VM tests start
//! from ([`agent_config`]) and polling with a deadline
//! ([`poll_until`], [`poll_for`]). It is a dev-dependency only (tests, benches,
//! xtask): it must never be a dependency of a crate that ships in the product binary,
//! and it holds no product logic — only ways of setting up and tearing down real
//! components for a test.

mod agent;
mod dev;
mod guest;
mod image;
mod machine;
mod net;
mod wait;

pub use agent::agent_config;
pub use dev::{DevChild, DevError, DevInfo, dev_command};
pub use guest::{GuestFilesError, init_bin, init_bin_path, kernel_dir};
pub use image::{BusyboxHttpd, ImageFixtureError, httpd_config};
pub use machine::web_machine_config;
pub use net::free_port;
pub use wait::{poll_for, poll_until};
