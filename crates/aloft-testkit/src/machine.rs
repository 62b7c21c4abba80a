//! Machine configs for the busybox web image.

use aloft_types::machine::{
    MachineConfig, MachineGuest, MachinePort, MachineRestart, MachineService,
};

/// A shared-CPU, 1-vCPU machine of `memory_mb` running `image`, with one TCP service
/// on internal port 8080 exposed as port 80 (`http` handler) and restart policy `no`.
pub fn web_machine_config(image: &str, memory_mb: i64) -> MachineConfig {
    MachineConfig {
        image: image.to_string(),
        guest: Some(MachineGuest {
            cpu_kind: "shared".into(),
            cpus: 1,
            memory_mb,
            ..Default::default()
        }),
        services: vec![MachineService {
            protocol: "tcp".into(),
            internal_port: 8080,
            ports: vec![MachinePort {
                port: Some(80),
                handlers: vec!["http".into()],
                ..Default::default()
            }],
            ..Default::default()
        }],
        restart: Some(MachineRestart {
            policy: "no".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}
