//! The QEMU driver against real QEMU (TCG here), with a tiny marker `/init` so these
//! tests check the driver alone: detached start, QMP status/pause/resume, attach,
//! suspend to a file and resume, quit, and the refusals.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use aloft_vmm::{Accel, QemuVmm, VmError, VmNetwork, VmSpec, Vmm};

fn kernel_dir() -> PathBuf {
    std::env::var_os("ALOFT_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/aloft/kernel"))
}

/// A static /init that prints a marker, then counts on the console every 100 ms.
const MARKER_INIT_C: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
int main(void) {
    int fd = open("/dev/console", O_WRONLY);
    dprintf(fd, "ALOFT-MARKER init started\n");
    for (unsigned long n = 0;; n++) {
        dprintf(fd, "tick %lu\n", n);
        usleep(100000);
    }
}
"#;

fn build_marker_init(dir: &Path) -> PathBuf {
    let src = dir.join("marker.c");
    std::fs::write(&src, MARKER_INIT_C).unwrap();
    let bin = dir.join("marker-init");
    let status = Command::new("musl-gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("musl-gcc is installed by `cargo xtask setup`");
    assert!(status.success());
    bin
}

fn empty_ext4(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(16 << 20).unwrap();
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

fn spec(work: &Path, init: &Path, name: &str) -> VmSpec {
    let root = work.join("root.ext4");
    if !root.exists() {
        empty_ext4(&root);
    }
    VmSpec {
        dir: work.join(name),
        kernel_dir: kernel_dir(),
        init_bin: init.to_path_buf(),
        cache_dir: work.join("cache"),
        memory_mb: 128,
        vcpus: 1,
        root_base: root,
        volumes: vec![],
        network: VmNetwork::None,
        run_json: b"{}".to_vec(),
        accel: Accel::Auto,
        tcg_tb_size_mb: Some(aloft_vmm::qemu::DEFAULT_TCG_TB_SIZE_MB),
    }
}

/// Waits until the console log contains `needle`, up to `limit`.
async fn console_contains(dir: &Path, needle: &str, limit: Duration) -> bool {
    let path = dir.join(aloft_vmm::VmFiles::CONSOLE);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if std::fs::read_to_string(&path).is_ok_and(|t| t.contains(needle)) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn last_tick(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join(aloft_vmm::VmFiles::CONSOLE)).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
        .unwrap_or(0)
}

#[tokio::test]
async fn boots_pauses_suspends_resumes_and_quits() {
    let work = tempfile::tempdir().unwrap();
    let init = build_marker_init(work.path());
    let spec = spec(work.path(), &init, "m1");
    let vmm = QemuVmm;
    vmm.prepare(&spec).await.unwrap();
    let vm = vmm.start(&spec, None).await.unwrap();
    assert!(
        console_contains(&spec.dir, "ALOFT-MARKER", Duration::from_secs(60)).await,
        "no marker; console:\n{}",
        vm.console_tail(20)
    );
    assert_eq!(vm.status().await.unwrap(), "running");

    // A supervisor that restarts finds the same VM through its directory (QEMU serves
    // one QMP client at a time, so the old handle goes first).
    let pid = vm.pid();
    drop(vm);
    let vm = vmm.attach(&spec.dir).await.unwrap();
    assert_eq!(vm.pid(), pid);

    vm.pause().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), "paused");
    vm.resume().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), "running");

    // Suspend: the counter's value survives into the resumed VM and keeps counting.
    assert!(console_contains(&spec.dir, "tick 3\r\n", Duration::from_secs(30)).await);
    let state = spec.dir.join(aloft_vmm::VmFiles::STATE);
    vm.suspend(&state).await.unwrap();
    assert!(vm.wait_exit(Duration::from_secs(5)).await);
    assert!(state.metadata().unwrap().len() > 1 << 20);
    let before = last_tick(&spec.dir);
    assert!(before >= 3);

    let resumed = vmm.start(&spec, Some(&state)).await.unwrap();
    resumed.finish_resume().await.unwrap();
    assert_eq!(resumed.status().await.unwrap(), "running");
    // The console log restarts with the new QEMU: the next ticks continue the count.
    let next = format!("tick {}\r\n", before + 2);
    assert!(
        console_contains(&spec.dir, &next, Duration::from_secs(30)).await,
        "counter did not continue from {before}: {}",
        resumed.console_tail(5)
    );
    assert!(
        !std::fs::read_to_string(spec.dir.join(aloft_vmm::VmFiles::CONSOLE))
            .unwrap()
            .contains("ALOFT-MARKER"),
        "resume must not reboot"
    );

    resumed.quit().await.unwrap();
    assert!(resumed.wait_exit(Duration::from_secs(5)).await);
    match vmm.attach(&spec.dir).await {
        Err(VmError::NotRunning { .. }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("attached to a VM that has quit"),
    }
}

#[tokio::test]
async fn refuses_bad_specs_clearly() {
    let work = tempfile::tempdir().unwrap();
    let init = work.path().join("init");
    std::fs::write(&init, b"not used").unwrap();

    let mut small = spec(work.path(), &init, "small");
    small.memory_mb = 16;
    let err = QemuVmm.prepare(&small).await.expect_err("must refuse");
    assert!(matches!(err, VmError::MemoryTooSmall { .. }), "{err}");
    assert!(err.to_string().contains("16 MB"), "{err}");

    let mut no_kernel = spec(work.path(), &init, "nokernel");
    no_kernel.kernel_dir = work.path().join("no-such-kernel");
    let err = QemuVmm.prepare(&no_kernel).await.expect_err("must refuse");
    assert!(err.to_string().contains("no-such-kernel"), "{err}");

    let mut no_disk = spec(work.path(), &init, "nodisk");
    no_disk.root_base = work.path().join("missing.ext4");
    let err = QemuVmm.prepare(&no_disk).await.expect_err("must refuse");
    assert!(matches!(err, VmError::MissingDisk { .. }), "{err}");
}

/// An init that returns at once: the kernel panics ("Attempted to kill init"), QEMU
/// exits (`panic=-1`, `-no-reboot`), and the driver says so with the console's end.
#[tokio::test]
async fn kernel_panic_is_a_clear_error_with_the_console() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("quit.c");
    std::fs::write(&src, "int main(void) { return 3; }\n").unwrap();
    let init = work.path().join("quit-init");
    let status = Command::new("musl-gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&init)
        .arg(&src)
        .status()
        .expect("musl-gcc is installed by `cargo xtask setup`");
    assert!(status.success());
    let spec = spec(work.path(), &init, "panics");
    QemuVmm.prepare(&spec).await.unwrap();
    let vm = QemuVmm.start(&spec, None).await.unwrap();
    assert!(
        vm.wait_exit(Duration::from_secs(60)).await,
        "QEMU must exit after the panic"
    );
    let err = vm.boot_failure().expect("the panic is detected");
    let text = err.to_string();
    assert!(text.contains("kernel panicked"), "{text}");
    assert!(text.contains("Attempted to kill init"), "{text}");
}
