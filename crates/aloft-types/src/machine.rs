//! Fly Machines API shapes: the machine `config` object (image, env, init, guest,
//! services, checks, mounts, restart, stop_config, metadata …), machine states and events.
