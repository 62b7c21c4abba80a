//! `aloft-init`, the guest's PID 1: a static musl binary that loads modules, mounts
//! the root disk and switches to it, configures the network, runs the user's
//! entrypoint, forwards signals, reaps zombies and reports the exit over the
//! virtio-serial channel.
//!
//! It owns the inside of one VM. It must stay small and depend on `aloft-types`
//! alone: it never reaches the host's state except through the channel.

mod api;
mod boot;
mod netlink;
mod port;
mod process;
mod procfs;
mod sys;
mod users;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use aloft_types::guest::{GuestMessage, HostMessage, RUN_CONFIG_PATH, RunConfig, Stream};

use crate::port::Port;
use crate::process::{Output, Spawned};
use crate::sys::ExitStatus;

/// Signals PID 1 takes through its signalfd.
const HANDLED_SIGNALS: &[i32] = &[
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGQUIT,
    libc::SIGPWR,
];
/// Signals forwarded to the app.
const FORWARDED_SIGNALS: &[i32] = &[
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGQUIT,
];
/// How often the app's ready ports are looked for in /proc/net/tcp*: often while a
/// quick app is starting (the port is found on average half an interval late), less
/// once it has taken a while.
fn ready_check_every(since_app_start: Duration) -> Duration {
    if since_app_start < Duration::from_secs(1) {
        Duration::from_millis(5)
    } else if since_app_start < Duration::from_secs(10) {
        Duration::from_millis(20)
    } else {
        Duration::from_millis(100)
    }
}
/// How long output is still collected after a process ended (grandchildren may hold
/// the pipes open).
const OUTPUT_GRACE: Duration = Duration::from_millis(300);
/// Queued channel bytes above which exec output is left unread.
const EXEC_BACKLOG: usize = 4 << 20;
const EV_KEY: u16 = 1;
/// The late modules (rng, balloon, power button) wait for the app's readiness, so
/// that they do not delay it, but at most this long after the app started.
const LATE_MODULES_WAIT: Duration = Duration::from_secs(2);
/// The late modules load on a thread at idle priority (the app's first requests come
/// first); after this long it gets normal priority, so that a busy app cannot keep the
/// power button away for long.
const LATE_MODULES_IDLE_MAX: Duration = Duration::from_secs(1);
const KEY_POWER: u16 = 116;

fn main() {
    // SAFETY: getpid cannot fail.
    if unsafe { libc::getpid() } != 1 {
        eprintln!("aloft-init: this is a guest PID 1 and runs only as the init of an aloft VM");
        std::process::exit(2);
    }
    let boot_ms = sys::uptime_ms();
    let sigfd = match sys::signalfd(HANDLED_SIGNALS) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("aloft-init: signalfd: {e}");
            sys::power_off()
        }
    };
    let mut port = Port::new(boot_ms);
    if let Err(e) = boot::early_mounts() {
        fatal(&mut port, None, &e.to_string());
    }
    let mut phases = vec![("start", boot_ms), ("early", sys::uptime_ms())];
    let cfg = match std::fs::read(RUN_CONFIG_PATH)
        .map_err(|e| format!("{RUN_CONFIG_PATH}: {e}"))
        .and_then(|t| RunConfig::from_json(RUN_CONFIG_PATH, &t).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            // The channel needs its modules to report this.
            boot::load_modules(&[], None);
            fatal(&mut port, None, &e)
        }
    };
    phases.push(("config", sys::uptime_ms()));
    let skip = if cfg.network.interfaces.is_empty() {
        boot::NET_MODULES
    } else {
        &[]
    };
    // The root disk mounts in the background while the other modules load.
    let loaded = boot::load_modules(skip, Some(&cfg.root_device));
    phases.push(("modules", sys::uptime_ms()));
    // Host messages that arrive before the app runs are handled once it does.
    let mut early = port.tick(Instant::now());
    // The initramfs stays reachable for the late modules and its clean-up.
    let initramfs = match boot::Initramfs::open(loaded.late) {
        Ok(i) => Some(i),
        Err(e) => {
            eprintln!("aloft-init: {e}: no late modules");
            None
        }
    };
    let mut root_mount_ms = 0;
    let creds = match setup(&cfg, loaded.root_mount, &mut phases, &mut root_mount_ms) {
        Ok(c) => c,
        Err(e) => fatal(&mut port, Some(&cfg), &e),
    };
    if let Err(e) = boot::swap(&cfg) {
        let message = format!("continuing without swap: {e}");
        eprintln!("aloft-init: {message}");
        port.send(&GuestMessage::Error { message });
    }
    let now = sys::uptime_ms();
    port.send(&GuestMessage::InitStarted { uptime_ms: now });
    // Tell the host now, not once the main loop runs.
    early.extend(port.tick(Instant::now()));
    port.flush();
    let mut init = Init::new(cfg, creds, sigfd, port);
    init.initramfs = initramfs;
    init.start_app();
    init.port.flush();
    // The timeline goes to the (slow, emulated) serial console once the app runs.
    let steps: Vec<String> = phases
        .windows(2)
        .map(|w| format!("{} {}ms", w[1].0, w[1].1.saturating_sub(w[0].1)))
        .collect();
    eprintln!(
        "aloft-init: set up at {now} ms after kernel start ({})",
        steps.join(", ")
    );
    let modules: Vec<String> = loaded
        .times
        .iter()
        .map(|(name, ms)| format!("{name} {ms}ms"))
        .collect();
    eprintln!(
        "aloft-init: modules: {} (root disk mount {root_mount_ms}ms alongside; cpu idle {} ms since kernel start)",
        modules.join(", "),
        procfs_idle_ms()
    );
    for msg in early {
        init.on_host(msg);
    }
    init.run()
}

/// The guest's idle CPU time so far (from /proc/uptime), for the boot timeline.
fn procfs_idle_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0, |s| (s * 1000.0) as u64)
}

/// The tasks that used the most guest CPU so far (PID 1's count includes the kernel's
/// own start-up, which runs as PID 1 before /init).
fn boot_cpu_by_task() -> Vec<String> {
    let stats = procfs::process_stats(std::path::Path::new("/proc")).map(|(_, _, stat)| stat);
    procfs::busiest(stats, 8)
}

/// Everything between the initramfs and the app: root switch, mounts, names, network.
fn setup(
    cfg: &RunConfig,
    root_mount: Option<boot::RootMount>,
    phases: &mut Vec<(&'static str, u64)>,
    root_mount_ms: &mut u64,
) -> Result<users::Credentials, String> {
    cfg.kill_signal_number().map_err(|e| e.to_string())?;
    *root_mount_ms = boot::wait_root(cfg, root_mount).map_err(|e| e.to_string())?;
    phases.push(("root", sys::uptime_ms()));
    boot::switch_root().map_err(|e| e.to_string())?;
    boot::prefetch_program(cfg);
    phases.push(("switch", sys::uptime_ms()));
    boot::late_mounts().map_err(|e| e.to_string())?;
    boot::mount_volumes(cfg).map_err(|e| e.to_string())?;
    boot::write_files(cfg).map_err(|e| e.to_string())?;
    boot::names(cfg).map_err(|e| e.to_string())?;
    phases.push(("mounts+files", sys::uptime_ms()));
    boot::network(cfg).map_err(|e| e.to_string())?;
    phases.push(("network", sys::uptime_ms()));
    if let Err(e) = sys::raise_nofile() {
        eprintln!("aloft-init: raising RLIMIT_NOFILE: {e}");
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    users::resolve(&cfg.image_config.user, &passwd, &group)
        .map_err(|e| format!("image user {:?}: {e}", cfg.image_config.user))
}

/// Reports a failure that leaves nothing to run, then powers off.
fn fatal(port: &mut Port, cfg: Option<&RunConfig>, message: &str) -> ! {
    eprintln!("aloft-init: {message}");
    port.send(&GuestMessage::Error {
        message: message.to_string(),
    });
    finish(port, cfg, None, false)
}

/// Last words: unmount, report the exit, let the channel drain, power off.
fn finish(port: &mut Port, cfg: Option<&RunConfig>, status: Option<ExitStatus>, oom: bool) -> ! {
    sys::sync();
    if let Some(cfg) = cfg {
        for failure in boot::unmount_volumes(cfg) {
            eprintln!("aloft-init: {failure}");
            port.send(&GuestMessage::Error { message: failure });
        }
    }
    port.send(&GuestMessage::Exit {
        code: status.and_then(|s| s.code),
        signal: status.and_then(|s| s.signal),
        oom,
    });
    port.drain(Instant::now() + Duration::from_secs(3));
    sys::power_off()
}

fn read_oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|t| procfs::oom_kills(&t))
        .unwrap_or(0)
}

struct App {
    pid: i32,
    outputs: Vec<Output>,
    status: Option<ExitStatus>,
    ended_at: Option<Instant>,
}

struct ExecProc {
    pid: i32,
    stdin: Option<File>,
    stdin_buf: Vec<u8>,
    stdin_eof: bool,
    outputs: Vec<Output>,
    pty: Option<File>,
    status: Option<ExitStatus>,
    ended_at: Option<Instant>,
}

/// What a pollfd in the main loop belongs to.
#[derive(Clone, Copy)]
enum Slot {
    Signals,
    Port,
    AppOut(usize),
    ExecOut(u64, usize),
    ExecIn(u64),
    Api,
    Input(usize),
    LateModules,
}

/// The late modules loading on their own thread.
struct LateLoading {
    /// Hangs up when the thread is done (its write end is dropped).
    done: File,
    /// The thread's id, 0 until it has started.
    tid: std::sync::Arc<std::sync::atomic::AtomicI32>,
    /// When it stops being idle-only (`None` once it has normal priority).
    boost_at: Option<Instant>,
}

struct Init {
    cfg: RunConfig,
    creds: users::Credentials,
    env: BTreeMap<String, String>,
    sigfd: File,
    port: Port,
    app: Option<App>,
    /// Set when there is no app to wait for: the exit code to report (127/126 when it
    /// could not start, 0 when stopped before it started).
    app_failed: Option<i32>,
    execs: BTreeMap<u64, ExecProc>,
    metadata: BTreeMap<String, String>,
    api: Option<api::Api>,
    inputs: Vec<File>,
    /// The initramfs, until its late modules are loaded (see [`LATE_MODULES_WAIT`]).
    initramfs: Option<boot::Initramfs>,
    late_loading: Option<LateLoading>,
    app_started_at: Instant,
    ready_sent: bool,
    next_ready_check: Instant,
    stop_deadline: Option<Instant>,
    oom_before: u64,
}

impl Init {
    fn new(cfg: RunConfig, creds: users::Credentials, sigfd: File, port: Port) -> Init {
        let mut env = cfg.environment();
        env.entry("HOME".into())
            .or_insert_with(|| creds.home.clone());
        let metadata = cfg.config.metadata.clone();
        let api_path = Path::new(boot::BOOT_TMPFS).join("api");
        let api = match api::Api::bind(&api_path) {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("aloft-init: metadata API on {}: {e}", api_path.display());
                None
            }
        };
        Init {
            creds,
            env,
            sigfd,
            port,
            app: None,
            app_failed: None,
            execs: BTreeMap::new(),
            metadata,
            api,
            inputs: open_power_buttons(),
            initramfs: None,
            late_loading: None,
            app_started_at: Instant::now(),
            ready_sent: false,
            next_ready_check: Instant::now(),
            stop_deadline: None,
            oom_before: read_oom_kills(),
            cfg,
        }
    }

    fn start_app(&mut self) {
        let argv = match self.cfg.command() {
            Ok(a) => a,
            Err(e) => {
                self.error(e.to_string());
                self.app_failed = Some(127);
                return;
            }
        };
        let cwd = if self.cfg.image_config.working_dir.is_empty() {
            "/".to_string()
        } else {
            self.cfg.image_config.working_dir.clone()
        };
        let _ = std::fs::create_dir_all(&cwd);
        let tty = self.cfg.config.init.tty.then_some((24, 80));
        match process::spawn(&process::Spec {
            argv: &argv,
            env: &self.env,
            cwd: &cwd,
            creds: &self.creds,
            tty,
            stdin: false,
        }) {
            Ok(s) => {
                self.app_started_at = Instant::now();
                self.port.send(&GuestMessage::AppStarted {
                    pid: s.pid,
                    uptime_ms: sys::uptime_ms(),
                });
                self.app = Some(App {
                    pid: s.pid,
                    outputs: s.outputs,
                    status: None,
                    ended_at: None,
                });
            }
            Err(e) => {
                self.error(e.message);
                self.app_failed = Some(e.code);
            }
        }
    }

    fn error(&mut self, message: String) {
        eprintln!("aloft-init: {message}");
        self.port.send(&GuestMessage::Error { message });
    }

    fn app_running(&self) -> bool {
        self.app.as_ref().is_some_and(|a| a.status.is_none())
    }

    /// The app is done and its output collected (or the grace time is over).
    fn app_finished(&self, now: Instant) -> bool {
        if self.app_failed.is_some() {
            return true;
        }
        match &self.app {
            Some(a) => match a.ended_at {
                Some(t) => a.outputs.iter().all(|o| !o.open) || now >= t + OUTPUT_GRACE,
                None => false,
            },
            None => true,
        }
    }

    fn begin_stop(&mut self, signal: i32, timeout: Duration) {
        if let Some(app) = self.app.as_ref().filter(|a| a.status.is_none()) {
            let _ = sys::kill(app.pid, signal);
            let deadline = Instant::now() + timeout;
            self.stop_deadline = Some(self.stop_deadline.map_or(deadline, |d| d.min(deadline)));
        } else if self.app.is_none() && self.app_failed.is_none() {
            self.app_failed = Some(0);
        }
    }

    fn run(mut self) -> ! {
        loop {
            let now = Instant::now();
            if self.app_finished(now) {
                self.shutdown();
            }
            let mut fds = Vec::new();
            let mut slots = Vec::new();
            fds.push(pollfd(self.sigfd.as_raw_fd(), libc::POLLIN));
            slots.push(Slot::Signals);
            if let Some(p) = self.port.pollfd() {
                fds.push(p);
                slots.push(Slot::Port);
            }
            if let Some(app) = &self.app {
                for (i, o) in app.outputs.iter().enumerate().filter(|(_, o)| o.open) {
                    fds.push(pollfd(o.file.as_raw_fd(), libc::POLLIN));
                    slots.push(Slot::AppOut(i));
                }
            }
            // Exec output is not droppable: stop reading it while the channel is backed
            // up, so the command blocks instead of init's memory growing.
            let exec_room = self.port.queued_bytes() < EXEC_BACKLOG;
            for (id, e) in &self.execs {
                for (i, o) in e
                    .outputs
                    .iter()
                    .enumerate()
                    .filter(|(_, o)| o.open && exec_room)
                {
                    fds.push(pollfd(o.file.as_raw_fd(), libc::POLLIN));
                    slots.push(Slot::ExecOut(*id, i));
                }
                if let Some(stdin) = e.stdin.as_ref().filter(|_| !e.stdin_buf.is_empty()) {
                    fds.push(pollfd(stdin.as_raw_fd(), libc::POLLOUT));
                    slots.push(Slot::ExecIn(*id));
                }
            }
            if let Some(api) = &self.api {
                let before = fds.len();
                api.pollfds(&mut fds);
                slots.extend(std::iter::repeat_n(Slot::Api, fds.len() - before));
            }
            for (i, f) in self.inputs.iter().enumerate() {
                fds.push(pollfd(f.as_raw_fd(), libc::POLLIN));
                slots.push(Slot::Input(i));
            }
            if let Some(l) = &self.late_loading {
                fds.push(pollfd(l.done.as_raw_fd(), libc::POLLIN));
                slots.push(Slot::LateModules);
            }
            let timeout = self.timeout(now);
            if let Err(e) = sys::poll(&mut fds, timeout.as_millis().min(i32::MAX as u128) as i32) {
                eprintln!("aloft-init: poll: {e}");
            }
            let mut api_ready = false;
            for (p, slot) in fds.iter().zip(&slots) {
                if p.revents == 0 {
                    continue;
                }
                match *slot {
                    Slot::Signals => self.on_signals(),
                    Slot::Port => {}
                    Slot::AppOut(i) => self.on_app_output(i),
                    Slot::ExecOut(id, i) => self.on_exec_output(id, i),
                    Slot::ExecIn(id) => self.write_exec_stdin(id),
                    Slot::Api => api_ready = true,
                    Slot::Input(i) => self.on_input(i),
                    Slot::LateModules => {
                        // The power button devices are there now.
                        self.late_loading = None;
                        self.inputs = open_power_buttons();
                    }
                }
            }
            let now = Instant::now();
            if let Some(api) = self.api.as_mut().filter(|a| api_ready || a.has_conns()) {
                api.service(&mut self.metadata, now);
            }
            for msg in self.port.tick(now) {
                self.on_host(msg);
            }
            self.check_ready(now);
            self.load_late_modules(now);
            self.check_stop(now);
            self.finish_execs(now);
            self.port.flush();
        }
    }

    fn timeout(&self, now: Instant) -> Duration {
        let mut t = Duration::from_secs(1);
        if let Some(ms) = self.port.timeout_ms() {
            t = t.min(Duration::from_millis(ms));
        }
        if !self.ready_sent && !self.cfg.ready_ports.is_empty() && self.app_running() {
            t = t.min(self.next_ready_check.saturating_duration_since(now));
        }
        if let Some(d) = self.stop_deadline {
            t = t.min(d.saturating_duration_since(now));
        }
        if self.initramfs.is_some() {
            t = t.min((self.app_started_at + LATE_MODULES_WAIT).saturating_duration_since(now));
        }
        if let Some(at) = self.late_loading.as_ref().and_then(|l| l.boost_at) {
            t = t.min(at.saturating_duration_since(now));
        }
        if let Some(end) = self.app.as_ref().and_then(|a| a.ended_at) {
            t = t.min((end + OUTPUT_GRACE).saturating_duration_since(now));
        }
        let room = self.port.queued_bytes() < EXEC_BACKLOG;
        for e in self.execs.values().filter(|_| room) {
            if let Some(end) = e.ended_at {
                t = t.min((end + OUTPUT_GRACE).saturating_duration_since(now));
            }
        }
        if self.api.as_ref().is_some_and(|a| a.has_conns()) {
            t = t.min(Duration::from_millis(100));
        }
        t
    }

    fn on_signals(&mut self) {
        while let Some(sig) = sys::read_signal(&self.sigfd) {
            match sig {
                libc::SIGCHLD => self.reap(),
                libc::SIGPWR => self.graceful_stop(),
                s if FORWARDED_SIGNALS.contains(&s) => {
                    if let Some(app) = self.app.as_ref().filter(|a| a.status.is_none()) {
                        let _ = sys::kill(app.pid, s);
                    }
                }
                _ => {}
            }
        }
    }

    fn graceful_stop(&mut self) {
        let sig = self.cfg.kill_signal_number().unwrap_or(libc::SIGINT);
        self.begin_stop(sig, Duration::from_millis(self.cfg.kill_timeout_ms));
    }

    fn reap(&mut self) {
        let now = Instant::now();
        while let Some((pid, status)) = sys::reap_one() {
            if let Some(app) = self.app.as_mut().filter(|a| a.pid == pid) {
                app.status = Some(status);
                app.ended_at = Some(now);
            } else if let Some(e) = self.execs.values_mut().find(|e| e.pid == pid) {
                e.status = Some(status);
                e.ended_at = Some(now);
            }
        }
    }

    fn on_app_output(&mut self, i: usize) {
        let Some(o) = self.app.as_mut().and_then(|a| a.outputs.get_mut(i)) else {
            return;
        };
        let stream = o.stream;
        let lines = o.read_lines();
        for line in lines {
            echo(stream, &line);
            self.port.send(&GuestMessage::Log {
                stream,
                ts_ms: sys::wall_ms(),
                line,
            });
        }
    }

    fn on_exec_output(&mut self, id: u64, i: usize) {
        let Some(o) = self.execs.get_mut(&id).and_then(|e| e.outputs.get_mut(i)) else {
            return;
        };
        let stream = o.stream;
        let data = o.read_available();
        if !data.is_empty() {
            self.port
                .send(&GuestMessage::ExecOutput { id, stream, data });
        }
    }

    fn write_exec_stdin(&mut self, id: u64) {
        let Some(e) = self.execs.get_mut(&id) else {
            return;
        };
        if let Some(stdin) = e.stdin.as_mut() {
            while !e.stdin_buf.is_empty() {
                match stdin.write(&e.stdin_buf) {
                    Ok(n) => {
                        e.stdin_buf.drain(..n);
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        e.stdin_buf.clear();
                        e.stdin = None;
                        break;
                    }
                }
            }
        }
        if e.stdin_eof && e.stdin_buf.is_empty() && e.pty.is_none() {
            e.stdin = None;
        }
    }

    fn on_input(&mut self, i: usize) {
        let Some(f) = self.inputs.get_mut(i) else {
            return;
        };
        // struct input_event on x86-64: timeval (16), type u16, code u16, value i32.
        let mut buf = [0u8; 24 * 16];
        let mut power = false;
        match f.read(&mut buf) {
            Ok(n) => {
                for ev in buf[..n].chunks_exact(24) {
                    let kind = u16::from_ne_bytes([ev[16], ev[17]]);
                    let code = u16::from_ne_bytes([ev[18], ev[19]]);
                    let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
                    power |= kind == EV_KEY && code == KEY_POWER && value == 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => {
                self.inputs.remove(i);
            }
        }
        if power {
            eprintln!("aloft-init: power button: stopping the app");
            self.graceful_stop();
        }
    }

    fn on_host(&mut self, msg: HostMessage) {
        match msg {
            // ProcessList and Sync are answered by the port itself.
            HostMessage::Hello { .. }
            | HostMessage::HelloAck { .. }
            | HostMessage::ProcessList { .. }
            | HostMessage::Sync { .. } => {}
            HostMessage::Signal { signal } => {
                if let Some(app) = self.app.as_ref().filter(|a| a.status.is_none())
                    && let Err(e) = sys::kill(app.pid, signal)
                {
                    let message = format!("signal {signal} to pid {}: {e}", app.pid);
                    self.error(message);
                }
            }
            HostMessage::Stop { signal, timeout_ms } => {
                self.begin_stop(signal, Duration::from_millis(timeout_ms))
            }
            HostMessage::Exec {
                id,
                cmd,
                env,
                tty,
                rows,
                cols,
            } => self.start_exec(id, cmd, env, tty.then_some((rows, cols))),
            HostMessage::ExecStdin { id, data, eof } => {
                if let Some(e) = self.execs.get_mut(&id) {
                    e.stdin_buf.extend_from_slice(&data);
                    e.stdin_eof |= eof;
                    self.write_exec_stdin(id);
                }
            }
            HostMessage::ExecResize { id, rows, cols } => {
                if let Some(pty) = self.execs.get(&id).and_then(|e| e.pty.as_ref()) {
                    let _ = sys::set_winsize(pty.as_raw_fd(), rows, cols);
                }
            }
            HostMessage::MetadataGet { request_id, key } => {
                let value = self.metadata.get(&key).cloned();
                self.port.send(&GuestMessage::MetadataValue {
                    request_id,
                    key,
                    value,
                });
            }
            HostMessage::MetadataDelete { request_id, key } => {
                self.metadata.remove(&key);
                self.port.send(&GuestMessage::MetadataValue {
                    request_id,
                    key,
                    value: None,
                });
            }
            HostMessage::MetadataSet {
                request_id,
                key,
                value,
            } => {
                self.metadata.insert(key.clone(), value.clone());
                self.port.send(&GuestMessage::MetadataValue {
                    request_id,
                    key,
                    value: Some(value),
                });
            }
        }
    }

    fn start_exec(
        &mut self,
        id: u64,
        cmd: Vec<String>,
        extra: BTreeMap<String, String>,
        tty: Option<(u16, u16)>,
    ) {
        let mut env = self.env.clone();
        env.extend(extra);
        let root = users::Credentials {
            uid: 0,
            gid: 0,
            groups: vec![0],
            home: "/root".into(),
        };
        match process::spawn(&process::Spec {
            argv: &cmd,
            env: &env,
            cwd: "/",
            creds: &root,
            tty,
            stdin: true,
        }) {
            Ok(Spawned {
                pid,
                stdin,
                outputs,
                pty,
            }) => {
                self.port.send(&GuestMessage::ExecStarted { id, pid });
                self.execs.insert(
                    id,
                    ExecProc {
                        pid,
                        stdin,
                        stdin_buf: Vec::new(),
                        stdin_eof: false,
                        outputs,
                        pty,
                        status: None,
                        ended_at: None,
                    },
                );
            }
            Err(e) => self.port.send(&GuestMessage::ExecExit {
                id,
                code: Some(e.code),
                signal: None,
                error: Some(e.message),
            }),
        }
    }

    /// Reports exec'd commands that ended once their output is in.
    fn finish_execs(&mut self, now: Instant) {
        let room = self.port.queued_bytes() < EXEC_BACKLOG;
        let done: Vec<u64> = self
            .execs
            .iter()
            .filter(|(_, e)| match e.ended_at {
                // A PTY master never reports EOF while the session lives on; once the
                // child is gone, what is readable is all there is.
                Some(t) => {
                    e.outputs.iter().all(|o| !o.open)
                        || (room && (e.pty.is_some() || now >= t + OUTPUT_GRACE))
                }
                None => false,
            })
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            for i in 0..self.execs.get(&id).map_or(0, |e| e.outputs.len()) {
                self.on_exec_output(id, i);
            }
            if let Some(e) = self.execs.remove(&id) {
                let st = e.status.unwrap_or(ExitStatus {
                    code: None,
                    signal: None,
                });
                self.port.send(&GuestMessage::ExecExit {
                    id,
                    code: st.code,
                    signal: st.signal,
                    error: None,
                });
            }
        }
    }

    fn check_ready(&mut self, now: Instant) {
        if self.ready_sent
            || self.cfg.ready_ports.is_empty()
            || !self.app_running()
            || now < self.next_ready_check
        {
            return;
        }
        self.next_ready_check =
            now + ready_check_every(now.saturating_duration_since(self.app_started_at));
        let v4 = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let v6 = std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
        if let Some(port) = procfs::first_ready(&self.cfg.ready_ports, &[&v4, &v6]) {
            self.ready_sent = true;
            self.port.send(&GuestMessage::Ready {
                port,
                uptime_ms: sys::uptime_ms(),
            });
        }
    }

    /// Loads the late modules once the app is ready (or ended, or has no ready port,
    /// or had its time), then opens the power button they bring.
    fn load_late_modules(&mut self, now: Instant) {
        if let Some(l) = self.late_loading.as_mut()
            && l.boost_at.is_some_and(|at| now >= at)
        {
            l.boost_at = None;
            let tid = l.tid.load(std::sync::atomic::Ordering::Acquire);
            if tid > 0
                && let Err(e) = sys::set_sched_policy(tid, libc::SCHED_OTHER)
            {
                eprintln!("aloft-init: late modules at normal priority: {e}");
            }
        }
        let Some(initramfs) = self.initramfs.take() else {
            return;
        };
        let awaiting_ready =
            !self.ready_sent && !self.cfg.ready_ports.is_empty() && self.app_running();
        if awaiting_ready && now < self.app_started_at + LATE_MODULES_WAIT {
            self.initramfs = Some(initramfs);
            return;
        }
        self.port.flush();
        match spawn_late_loading(initramfs, now) {
            Ok(l) => self.late_loading = Some(l),
            Err((e, initramfs)) => {
                eprintln!("aloft-init: no thread for the late modules ({e}): loading them now");
                if let Some(i) = initramfs {
                    i.finish();
                }
                self.inputs = open_power_buttons();
            }
        }
    }

    fn check_stop(&mut self, now: Instant) {
        if let Some(d) = self.stop_deadline
            && now >= d
        {
            self.stop_deadline = None;
            if let Some(app) = self.app.as_ref().filter(|a| a.status.is_none()) {
                eprintln!("aloft-init: app did not stop in time: SIGKILL");
                let _ = sys::kill(-app.pid, libc::SIGKILL);
                let _ = sys::kill(app.pid, libc::SIGKILL);
            }
        }
    }

    /// The app is done: end the leftovers, report, power off.
    fn shutdown(&mut self) -> ! {
        // Collect what is still buffered in the app's pipes.
        for i in 0..self.app.as_ref().map_or(0, |a| a.outputs.len()) {
            self.on_app_output(i);
        }
        let _ = sys::kill(-1, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            self.reap();
            // SAFETY: probing for any remaining child; no memory arguments.
            let none_left = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } < 0;
            if none_left {
                break;
            }
            let mut p = [pollfd(self.sigfd.as_raw_fd(), libc::POLLIN)];
            let _ = sys::poll(&mut p, 20);
            while sys::read_signal(&self.sigfd).is_some() {}
        }
        let _ = sys::kill(-1, libc::SIGKILL);
        self.reap();
        let status = match (&self.app, self.app_failed) {
            (Some(a), _) => a.status,
            (None, Some(code)) => Some(ExitStatus {
                code: Some(code),
                signal: None,
            }),
            (None, None) => None,
        };
        let oom = read_oom_kills() > self.oom_before;
        if self.port.dropped_logs > 0 {
            eprintln!(
                "aloft-init: {} log lines were dropped while the host was away",
                self.port.dropped_logs
            );
        }
        finish(&mut self.port, Some(&self.cfg), status, oom)
    }
}

fn pollfd(fd: i32, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Starts loading `modules` on a thread at idle priority (only CPU time the app and
/// init leave unused), raised to normal priority at [`LATE_MODULES_IDLE_MAX`].
fn spawn_late_loading(
    initramfs: boot::Initramfs,
    now: Instant,
) -> Result<LateLoading, (std::io::Error, Option<boot::Initramfs>)> {
    use std::sync::atomic::{AtomicI32, Ordering};
    let (done, done_w) = match sys::pipe() {
        Ok(p) => p,
        Err(e) => return Err((e, Some(initramfs))),
    };
    let tid = std::sync::Arc::new(AtomicI32::new(0));
    let thread_tid = tid.clone();
    // The initramfs goes back to the caller if the thread cannot start.
    let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(initramfs)));
    let thread_slot = slot.clone();
    let spawned = std::thread::Builder::new()
        .name("late-modules".into())
        .spawn(move || {
            thread_tid.store(sys::gettid(), Ordering::Release);
            if let Err(e) = sys::set_sched_policy(0, libc::SCHED_IDLE) {
                eprintln!("aloft-init: late modules at idle priority: {e}");
            }
            let initramfs = thread_slot.lock().ok().and_then(|mut m| m.take());
            if let Some(i) = initramfs {
                i.finish();
            }
            eprintln!(
                "aloft-init: cpu by task since kernel start: {}",
                boot_cpu_by_task().join(", ")
            );
            drop(done_w);
        });
    match spawned {
        Ok(_) => Ok(LateLoading {
            done,
            tid,
            boost_at: Some(now + LATE_MODULES_IDLE_MAX),
        }),
        Err(e) => {
            let initramfs = slot.lock().ok().and_then(|mut m| m.take());
            Err((e, initramfs))
        }
    }
}

/// Copies a line of app output to the console.
fn echo(stream: Stream, line: &str) {
    let _ = match stream {
        Stream::Stdout => writeln!(std::io::stdout(), "{line}"),
        Stream::Stderr => writeln!(std::io::stderr(), "{line}"),
    };
}

/// Opens every input device (the ACPI power button is one of them).
fn open_power_buttons() -> Vec<File> {
    let Ok(entries) = std::fs::read_dir("/dev/input") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("event"))
        .filter_map(|e| {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(e.path())
                .ok()
        })
        .collect()
}
