//! The `Vmm` driver trait and its QEMU `microvm` driver: command line, QMP client,
//! boot, pause/resume, suspend to a file, kill; the guest kernel and base initramfs;
//! the per-machine initramfs carrying `run.json`; qcow2 overlays.
//!
//! It owns one VM at a time and the host side of the guest channel. It must not keep
//! machine state or policy (restarts, health, placement): that is the agent's.

pub mod channel;
pub mod initramfs;
pub mod kernel;
pub mod qemu;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use qemu::{Accel, PortForward, QemuVm, VmError, VmFiles, VmNetwork, VmSpec};

/// A hypervisor driver. The agent holds one and never learns which it is.
#[async_trait::async_trait]
pub trait Vmm: Send + Sync {
    /// Writes the machine's boot files and disks (idempotent).
    async fn prepare(&self, spec: &VmSpec) -> Result<(), VmError>;
    /// Boots a prepared machine, or resumes it from a suspend file.
    async fn start(
        &self,
        spec: &VmSpec,
        resume_from: Option<&Path>,
    ) -> Result<Box<dyn Vm>, VmError>;
    /// Finds the VM already running in `dir` (after a supervisor restart).
    async fn attach(&self, dir: &Path) -> Result<Box<dyn Vm>, VmError>;
}

/// One running VM.
#[async_trait::async_trait]
pub trait Vm: Send + Sync {
    fn pid(&self) -> i32;
    /// The unix socket of the guest channel (`aloft.ctl`).
    fn ctl_socket(&self) -> PathBuf;
    async fn status(&self) -> Result<String, VmError>;
    async fn pause(&self) -> Result<(), VmError>;
    async fn resume(&self) -> Result<(), VmError>;
    /// Asks the guest to shut down (ACPI power button).
    async fn powerdown(&self) -> Result<(), VmError>;
    /// Ends the VM at once.
    async fn quit(&self) -> Result<(), VmError>;
    fn kill(&self);
    /// Waits for the VM process to end; `false` if it still runs after `limit`.
    async fn wait_exit(&self, limit: Duration) -> bool;
    /// Saves the VM to `state` and ends it.
    async fn suspend(&self, state: &Path) -> Result<(), VmError>;
    /// After a resume start: waits for the state to load and runs the guest.
    async fn finish_resume(&self) -> Result<(), VmError>;
    /// The last lines of the serial console.
    fn console_tail(&self, lines: usize) -> String;
    /// A clear error when the console shows why the guest failed (a kernel panic).
    fn boot_failure(&self) -> Option<VmError>;
    /// Guest memory the balloon leaves the guest, in bytes.
    async fn balloon_actual(&self) -> Result<u64, VmError>;
    /// Sets the balloon target (bytes of guest memory); the guest converges to it.
    async fn set_balloon(&self, target: u64) -> Result<(), VmError>;
}

/// The QEMU `microvm` driver.
#[derive(Debug, Default, Clone)]
pub struct QemuVmm;

#[async_trait::async_trait]
impl Vmm for QemuVmm {
    async fn prepare(&self, spec: &VmSpec) -> Result<(), VmError> {
        qemu::prepare(spec).await
    }

    async fn start(
        &self,
        spec: &VmSpec,
        resume_from: Option<&Path>,
    ) -> Result<Box<dyn Vm>, VmError> {
        Ok(Box::new(qemu::start(spec, resume_from).await?))
    }

    async fn attach(&self, dir: &Path) -> Result<Box<dyn Vm>, VmError> {
        Ok(Box::new(qemu::attach(dir).await?))
    }
}

#[async_trait::async_trait]
impl Vm for QemuVm {
    fn pid(&self) -> i32 {
        self.pid
    }
    fn ctl_socket(&self) -> PathBuf {
        QemuVm::ctl_socket(self)
    }
    async fn status(&self) -> Result<String, VmError> {
        QemuVm::status(self).await
    }
    async fn pause(&self) -> Result<(), VmError> {
        QemuVm::pause(self).await
    }
    async fn resume(&self) -> Result<(), VmError> {
        QemuVm::resume(self).await
    }
    async fn powerdown(&self) -> Result<(), VmError> {
        QemuVm::powerdown(self).await
    }
    async fn quit(&self) -> Result<(), VmError> {
        QemuVm::quit(self).await
    }
    fn kill(&self) {
        QemuVm::kill(self)
    }
    async fn wait_exit(&self, limit: Duration) -> bool {
        QemuVm::wait_exit(self, limit).await
    }
    async fn suspend(&self, state: &Path) -> Result<(), VmError> {
        QemuVm::suspend(self, state).await
    }
    async fn finish_resume(&self) -> Result<(), VmError> {
        QemuVm::finish_resume(self).await
    }
    fn console_tail(&self, lines: usize) -> String {
        QemuVm::console_tail(self, lines)
    }
    fn boot_failure(&self) -> Option<VmError> {
        QemuVm::boot_failure(self)
    }
    async fn balloon_actual(&self) -> Result<u64, VmError> {
        QemuVm::balloon_actual(self).await
    }
    async fn set_balloon(&self, target: u64) -> Result<(), VmError> {
        QemuVm::set_balloon(self, target).await
    }
}
