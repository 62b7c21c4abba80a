//! Thin wrappers over the syscalls PID 1 needs, each returning `io::Result`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "string contains NUL"))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn mount(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = cstr(source)?;
    let target = cpath(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    // SAFETY: every pointer is a valid NUL-terminated string or null, alive for the call.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    })
    .map(drop)
}

pub fn umount(target: &Path) -> io::Result<()> {
    let target = cpath(target)?;
    // SAFETY: valid NUL-terminated path.
    check(unsafe { libc::umount2(target.as_ptr(), 0) }).map(drop)
}

/// Loads a kernel module from a file; "already loaded" counts as success.
pub fn finit_module(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    let params = c"";
    // SAFETY: finit_module takes an fd, a NUL-terminated parameter string and flags.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// Marker at the end of a signed module.
const MODULE_SIG_MAGIC: &[u8] = b"~Module signature appended~\n";

/// A module image without its appended signature (unchanged when it has none).
pub fn strip_module_signature(data: &[u8]) -> &[u8] {
    let Some(body) = data.strip_suffix(MODULE_SIG_MAGIC) else {
        return data;
    };
    // struct module_signature (12 bytes) ends with the big-endian signature length.
    if body.len() < 12 {
        return data;
    }
    let info = &body[body.len() - 12..];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    match body.len().checked_sub(12 + sig_len) {
        Some(end) => &body[..end],
        None => data,
    }
}

/// Hides a module's `.BTF` section from the kernel by renaming it (its section
/// header then names `BTF`): with BTF the kernel parses and checks the module's type
/// information on load, and on the first such module the whole vmlinux BTF, which
/// under TCG costs tens of milliseconds of boot. Nothing in the guest uses module
/// BTF (it serves BPF tracing). Returns whether the section was found; an image that
/// is not a well-formed ELF64 is left as it is.
pub fn hide_module_btf(image: &mut [u8]) -> bool {
    fn u16_at(d: &[u8], o: usize) -> Option<usize> {
        Some(u16::from_le_bytes(d.get(o..o + 2)?.try_into().ok()?) as usize)
    }
    fn u32_at(d: &[u8], o: usize) -> Option<usize> {
        Some(u32::from_le_bytes(d.get(o..o + 4)?.try_into().ok()?) as usize)
    }
    fn u64_at(d: &[u8], o: usize) -> Option<usize> {
        usize::try_from(u64::from_le_bytes(d.get(o..o + 8)?.try_into().ok()?)).ok()
    }
    let find = |d: &[u8]| -> Option<usize> {
        if d.get(..5)? != b"\x7fELF\x02" {
            return None;
        }
        let shoff = u64_at(d, 0x28)?;
        let (shentsize, shnum, shstrndx) = (u16_at(d, 0x3a)?, u16_at(d, 0x3c)?, u16_at(d, 0x3e)?);
        let strtab = u64_at(
            d,
            shoff
                .checked_add(shstrndx.checked_mul(shentsize)?)?
                .checked_add(0x18)?,
        )?;
        (0..shnum).find_map(|i| {
            let sh = shoff.checked_add(i.checked_mul(shentsize)?)?;
            let name = strtab.checked_add(u32_at(d, sh)?)?;
            (d.get(name..name + 5)? == b".BTF\0").then_some(sh)
        })
    };
    match find(image) {
        Some(sh) => {
            let name = u32::from_le_bytes([image[sh], image[sh + 1], image[sh + 2], image[sh + 3]]);
            image[sh..sh + 4].copy_from_slice(&(name + 1).to_le_bytes());
            true
        }
        None => false,
    }
}

/// Asks the kernel to start reading all of `file` into the page cache; it queues the
/// reads and returns without waiting for them.
pub fn will_need(file: &File) -> io::Result<()> {
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
    let ret = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(ret))
    }
}

/// Loads a kernel module from memory without its signature: verifying it costs
/// a lot of emulated CPU under TCG, and the initramfs is already trusted. Its BTF
/// is hidden ([`hide_module_btf`]). "Already loaded" counts as success.
pub fn init_module_unsigned(data: &[u8]) -> io::Result<()> {
    let mut image = strip_module_signature(data).to_vec();
    hide_module_btf(&mut image);
    let image = image.as_slice();
    let params = c"";
    // SAFETY: init_module reads `image.len()` bytes from `image` and a NUL-terminated
    // parameter string.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_init_module,
            image.as_ptr(),
            image.len() as libc::c_ulong,
            params.as_ptr(),
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// Opens `path` relative to the directory `dir` (read-only, close-on-exec).
pub fn open_at(dir: &File, path: &str) -> io::Result<File> {
    let c = cstr(path)?;
    // SAFETY: a directory fd we hold and a NUL-terminated path.
    let fd = check(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: openat just returned this fresh descriptor; we own it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Removes the file `path` relative to the directory `dir`.
pub fn unlink_at(dir: &File, path: &str) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: a directory fd we hold and a NUL-terminated path.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) }).map(drop)
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Puts thread `tid` (0: the calling thread) under scheduling `policy` (`SCHED_IDLE`,
/// `SCHED_OTHER`). A raw syscall: musl's wrapper is a stub that returns ENOSYS.
pub fn set_sched_policy(tid: i32, policy: i32) -> io::Result<()> {
    // The kernel's struct sched_param is one int (musl's has more fields).
    let priority: libc::c_int = 0;
    // SAFETY: sched_setscheduler reads one int (the priority) from a valid pointer.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_sched_setscheduler,
            tid,
            policy,
            &priority as *const libc::c_int,
        )
    };
    check(ret as libc::c_int).map(drop)
}

pub fn sync() {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::sync() };
}

/// Powers the machine off. Never returns.
pub fn power_off() -> ! {
    sync();
    // SAFETY: reboot(2) with a valid command; as PID 1 we hold CAP_SYS_BOOT.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    // Only reached when reboot failed; exiting PID 1 panics the kernel, which QEMU
    // (-no-reboot) also turns into an exit.
    std::process::exit(1)
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// Raises RLIMIT_NOFILE as far as the kernel allows (up to 1 Mi).
pub fn raise_nofile() -> io::Result<()> {
    let mut last = Ok(0);
    for n in [1 << 20, 1 << 16, 1 << 14] {
        let lim = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        // SAFETY: valid pointer to an rlimit.
        last = check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) });
        if last.is_ok() {
            break;
        }
    }
    last.map(drop)
}

/// A pipe, both ends close-on-exec: (read, write).
pub fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds points to two ints.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 just returned these two fresh descriptors; we own them.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; invalid fds only yield EBADF.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(drop)
}

/// poll(2); an interrupted call counts as "nothing ready".
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: the slice is valid for its length.
    let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(err);
    }
    Ok(ret as usize)
}

/// Revents of one fd polled with no wait.
pub fn poll_now(fd: RawFd, events: libc::c_short) -> libc::c_short {
    let mut p = [libc::pollfd {
        fd,
        events,
        revents: 0,
    }];
    match poll(&mut p, 0) {
        Ok(_) => p[0].revents,
        Err(_) => libc::POLLERR,
    }
}

pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill(2) has no memory arguments.
    check(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// Blocks `signals` for this process and returns a signalfd delivering them.
pub fn signalfd(signals: &[i32]) -> io::Result<File> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in signals {
        // SAFETY: as above.
        unsafe { libc::sigaddset(&mut set, *s) };
    }
    // SAFETY: valid set pointer, null old-set.
    check(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) })?;
    // SAFETY: -1 asks for a new fd; the set is valid.
    let fd = check(unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) })?;
    // SAFETY: signalfd returned a new descriptor that we now own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Next pending signal number from a signalfd, if any.
pub fn read_signal(fd: &File) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reading at most `size` bytes into `info`.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    (n == size as isize).then_some(info.ssi_signo as i32)
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// Reaps one exited child without blocking.
pub fn reap_one() -> Option<(i32, ExitStatus)> {
    let mut status = 0;
    // SAFETY: valid pointer to an int.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    if pid <= 0 {
        return None;
    }
    let st = if libc::WIFEXITED(status) {
        ExitStatus {
            code: Some(libc::WEXITSTATUS(status)),
            signal: None,
        }
    } else {
        ExitStatus {
            code: None,
            signal: Some(libc::WTERMSIG(status)),
        }
    };
    Some((pid, st))
}

fn clock_ms(clock: libc::clockid_t) -> u64 {
    // SAFETY: timespec is plain data.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; the clock ids used here always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// Milliseconds since the kernel booted.
pub fn uptime_ms() -> u64 {
    clock_ms(libc::CLOCK_BOOTTIME)
}

/// Wall clock, Unix milliseconds.
pub fn wall_ms() -> u64 {
    clock_ms(libc::CLOCK_REALTIME)
}

/// A new pseudo-terminal: (master, slave), both close-on-exec, with the window size set.
pub fn open_pty(rows: u16, cols: u16) -> io::Result<(File, File)> {
    // SAFETY: NUL-terminated path.
    let master = check(unsafe {
        libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: open returned a fresh descriptor we own.
    let master = unsafe { File::from_raw_fd(master) };
    let mut unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK takes a pointer to int.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &mut unlock) })?;
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes an unsigned int.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n) })?;
    let path = CString::new(format!("/dev/pts/{n}"))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pts path"))?;
    // SAFETY: NUL-terminated path.
    let slave = check(unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fresh descriptor we own.
    let slave = unsafe { File::from_raw_fd(slave) };
    set_winsize(master.as_raw_fd(), rows, cols)?;
    Ok((master, slave))
}

pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: if rows == 0 { 24 } else { rows },
        ws_col: if cols == 0 { 80 } else { cols },
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize.
    check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// In a forked child before exec: new session, optional controlling tty on fd 0, and
/// credentials. Only async-signal-safe calls.
pub fn child_setup(ctty: bool, uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
    // PID 1 blocks the signals it reads through its signalfd; the child must not
    // inherit that mask (nor std's ignored SIGPIPE).
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a sigset_t.
    unsafe { libc::sigemptyset(&mut empty) };
    // SAFETY: valid set pointer, null old-set.
    check(unsafe { libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) })?;
    // SAFETY: restoring the default disposition of a signal.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // SAFETY: setsid has no arguments.
    check(unsafe { libc::setsid() })?;
    if ctty {
        // SAFETY: TIOCSCTTY with an integer argument on our stdin.
        check(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) })?;
    }
    // SAFETY: pointer/length describe `groups`.
    check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setgid(gid) })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setuid(uid) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 image with a null section, one named `section`, and the
    /// section-name table: the fields [`hide_module_btf`] reads.
    fn elf_with_section(section: &str) -> Vec<u8> {
        const SHENTSIZE: usize = 64;
        let names = format!("\0{section}\0.shstrtab\0");
        let strtab_at = 64;
        let shoff = (strtab_at + names.len()).next_multiple_of(8);
        let mut d = vec![0u8; shoff + 3 * SHENTSIZE];
        d[..5].copy_from_slice(b"\x7fELF\x02");
        d[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        d[0x3a..0x3c].copy_from_slice(&(SHENTSIZE as u16).to_le_bytes());
        d[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        d[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        d[strtab_at..strtab_at + names.len()].copy_from_slice(names.as_bytes());
        let header = |i: usize| shoff + i * SHENTSIZE;
        d[header(1)..header(1) + 4].copy_from_slice(&1u32.to_le_bytes());
        let strtab_name = (section.len() + 2) as u32;
        d[header(2)..header(2) + 4].copy_from_slice(&strtab_name.to_le_bytes());
        d[header(2) + 0x18..header(2) + 0x20].copy_from_slice(&(strtab_at as u64).to_le_bytes());
        d
    }

    #[test]
    fn module_btf_is_hidden() {
        let original = elf_with_section(".BTF");
        let mut image = original.clone();
        assert!(hide_module_btf(&mut image), "the image has a .BTF section");
        assert!(!hide_module_btf(&mut image), "hidden once, gone after");
        assert_eq!(image.len(), original.len());
        let mut other = elf_with_section(".text");
        assert!(!hide_module_btf(&mut other));
        assert_eq!(other, elf_with_section(".text"), "left as it was");
        let mut junk = b"\x7fELF\x02 too short".to_vec();
        assert!(!hide_module_btf(&mut junk));
    }

    #[test]
    fn module_signature_is_stripped() {
        let mut m = b"\x7fELF body".to_vec();
        assert_eq!(strip_module_signature(&m), &m[..]);
        let sig = [9u8; 5];
        let unsigned_len = m.len();
        m.extend_from_slice(&sig);
        m.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        m.extend_from_slice(&(sig.len() as u32).to_be_bytes());
        m.extend_from_slice(MODULE_SIG_MAGIC);
        assert_eq!(strip_module_signature(&m), b"\x7fELF body");
        assert_eq!(strip_module_signature(&m).len(), unsigned_len);
        // A length that does not fit leaves the data alone.
        let mut bad = b"x".to_vec();
        bad.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        bad.extend_from_slice(&1000u32.to_be_bytes());
        bad.extend_from_slice(MODULE_SIG_MAGIC);
        assert_eq!(strip_module_signature(&bad), &bad[..]);
    }
}
