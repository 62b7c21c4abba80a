//! The guest kernel that `cargo xtask setup` unpacked into `<data>/kernel`, and the
//! host facts its command line needs.

use std::path::{Path, PathBuf};

/// Why the guest kernel cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("guest kernel not found: {path} is missing (run `cargo xtask setup`)")]
    Missing { path: PathBuf },
}

/// Paths of the guest kernel and its modules.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    /// The PVH ELF `vmlinux` (boots faster than the bzImage and reboots reliably).
    pub vmlinux: PathBuf,
    pub modules_dir: PathBuf,
}

impl GuestKernel {
    /// The kernel in `dir` (`vmlinux` and `modules/`).
    pub fn from_dir(dir: &Path) -> Result<Self, KernelError> {
        let vmlinux = dir.join("vmlinux");
        if !vmlinux.is_file() {
            return Err(KernelError::Missing { path: vmlinux });
        }
        let modules_dir = dir.join("modules");
        if !modules_dir.is_dir() {
            return Err(KernelError::Missing { path: modules_dir });
        }
        Ok(GuestKernel {
            vmlinux,
            modules_dir,
        })
    }
}

/// The host TSC rate in kHz, for `tsc_early_khz=`: under TCG the guest TSC runs at the
/// host's rate, and without this hint about one boot in three hangs in calibration.
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn tsc_rate_is_read() {
        let khz = super::host_tsc_khz().expect("cpu MHz in /proc/cpuinfo");
        assert!(khz > 100_000, "{khz}");
    }
}
