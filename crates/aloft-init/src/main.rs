//! `aloft-init`, the guest's PID 1: a static musl binary that loads modules, mounts
//! the root disk and switches to it, configures the network, runs the user's
//! entrypoint, forwards signals, reaps zombies and reports the exit over the
//! virtio-serial channel.
//!
//! It owns the inside of one VM. It must stay small and depend on `aloft-types`
//! alone: it never reaches the host's state except through the channel.

fn main() {
    eprintln!(
        "aloft-init: not built yet (see the boot issue); this binary only runs as a guest PID 1"
    );
    std::process::exit(1);
}
