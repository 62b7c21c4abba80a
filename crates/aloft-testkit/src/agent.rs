//! The agent config VM tests start from.

use std::path::Path;

use aloft_agent::AgentConfig;
use aloft_vmm::Accel;

use crate::guest::{GuestFilesError, init_bin, kernel_dir};

/// Host `h1` in region `ams` working in `data`, with the kernel of [`kernel_dir`] and
/// the checked guest init of [`init_bin`], 4096 MB and 8 CPUs to place machines on,
/// accelerator `Auto`, port forwards on 127.0.0.1, a 32 MB TCG translation cache.
/// Override fields with struct update syntax.
pub fn agent_config(data: &Path) -> Result<AgentConfig, GuestFilesError> {
    Ok(AgentConfig {
        host_id: "h1".into(),
        region: "ams".into(),
        data_dir: data.to_path_buf(),
        kernel_dir: kernel_dir(),
        init_bin: init_bin()?,
        memory_mb_total: 4096,
        cpus_total: 8,
        accel: Accel::Auto,
        forward_addr: "127.0.0.1".into(),
        pull: Default::default(),
        tcg_tb_size_mb: Some(aloft_vmm::qemu::DEFAULT_TCG_TB_SIZE_MB),
    })
}
