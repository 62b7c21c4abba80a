//! The guest end of the control channel: the `aloft.ctl` virtio-serial port.
//!
//! While no host is connected, the port reads EOF and polls POLLHUP, and writes would
//! block; so the port is left out of the main poll set then, and checked on a short
//! timer instead. After (re)connecting, `Hello` is repeated until `HelloAck`; queued
//! frames are written only after the ack. Log frames are dropped oldest-first when
//! more than [`LOG_BUFFER_BYTES`] are waiting.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aloft_types::guest::{
    CTL_PORT_NAME, FrameDecoder, GuestMessage, HELLO_INTERVAL_MS, HostMessage, PROTOCOL_VERSION,
    encode_frame,
};

use crate::sys;

/// Bytes of log frames kept while the host is away.
pub const LOG_BUFFER_BYTES: usize = 1 << 20;

/// Finds the device node of the named virtio-serial port.
pub fn find_port(sys_class: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_class).ok()?;
    for e in entries.flatten() {
        let port_name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No host on the other side (or the port is not open yet).
    Away,
    /// A host is connected; waiting for its `HelloAck`.
    Greeting,
    /// Handshake done: queued frames flow.
    Ready,
}

struct Frame {
    bytes: Vec<u8>,
    droppable: bool,
}

pub struct Port {
    file: Option<File>,
    state: State,
    queue: VecDeque<Frame>,
    queued_log_bytes: usize,
    /// Frame being written and how much of it went out.
    partial: Option<(Vec<u8>, usize)>,
    last_hello: Option<Instant>,
    last_find: Option<Instant>,
    decoder: FrameDecoder,
    boot_ms: u64,
    pub dropped_logs: u64,
}

impl Port {
    pub fn new(boot_ms: u64) -> Port {
        Port {
            file: None,
            state: State::Away,
            queue: VecDeque::new(),
            queued_log_bytes: 0,
            partial: None,
            last_hello: None,
            last_find: None,
            decoder: FrameDecoder::new(),
            boot_ms,
            dropped_logs: 0,
        }
    }

    /// Tries to find and open the port (cheap; rate-limited).
    fn try_open(&mut self, now: Instant) {
        if self.file.is_some() {
            return;
        }
        if self
            .last_find
            .is_some_and(|t| now < t + Duration::from_millis(20))
        {
            return;
        }
        self.last_find = Some(now);
        let Some(path) = find_port(Path::new("/sys/class/virtio-ports"), CTL_PORT_NAME) else {
            return;
        };
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(&path)
        {
            Ok(f) => self.file = Some(f),
            Err(e) => eprintln!("aloft-init: opening {}: {e}", path.display()),
        }
    }

    /// Queues a message; it goes out once the handshake is done.
    pub fn send(&mut self, msg: &GuestMessage) {
        let bytes = match encode_frame(msg) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("aloft-init: cannot encode a frame: {e}");
                return;
            }
        };
        let droppable = matches!(msg, GuestMessage::Log { .. });
        if droppable {
            self.queued_log_bytes += bytes.len();
            while self.queued_log_bytes > LOG_BUFFER_BYTES {
                let Some(pos) = self.queue.iter().position(|f| f.droppable) else {
                    break;
                };
                if let Some(f) = self.queue.remove(pos) {
                    self.queued_log_bytes -= f.bytes.len();
                    self.dropped_logs += 1;
                }
            }
        }
        self.queue.push_back(Frame { bytes, droppable });
    }

    /// Bytes waiting to be written (all frames).
    pub fn queued_bytes(&self) -> usize {
        self.queue.iter().map(|f| f.bytes.len()).sum::<usize>()
            + self.partial.as_ref().map_or(0, |(b, off)| b.len() - off)
    }

    pub fn has_pending(&self) -> bool {
        self.partial.is_some() || !self.queue.is_empty()
    }

    /// The pollfd to include in the main loop, if the port should be polled.
    pub fn pollfd(&self) -> Option<libc::pollfd> {
        let file = self.file.as_ref()?;
        if self.state == State::Away {
            return None;
        }
        let mut events = libc::POLLIN;
        if self.partial.is_some() || (self.state == State::Ready && !self.queue.is_empty()) {
            events |= libc::POLLOUT;
        }
        Some(libc::pollfd {
            fd: file.as_raw_fd(),
            events,
            revents: 0,
        })
    }

    /// How long the main loop may sleep at most, for the port's sake.
    pub fn timeout_ms(&self) -> Option<u64> {
        match self.state {
            State::Ready => None,
            _ => Some(if self.file.is_none() {
                20
            } else {
                HELLO_INTERVAL_MS
            }),
        }
    }

    fn disconnect(&mut self) {
        if self.state != State::Away {
            self.state = State::Away;
        }
        // The rest of a half-written frame would corrupt the next connection's stream.
        self.partial = None;
        self.decoder.reset();
    }

    /// Housekeeping after every poll round: (re)open, notice connects and disconnects,
    /// greet, read, write. Returns the host's messages.
    pub fn tick(&mut self, now: Instant) -> Vec<HostMessage> {
        self.try_open(now);
        let Some(fd) = self.file.as_ref().map(|f| f.as_raw_fd()) else {
            return Vec::new();
        };
        let rev = sys::poll_now(fd, libc::POLLIN | libc::POLLOUT);
        if rev & libc::POLLHUP != 0 {
            self.disconnect();
            return Vec::new();
        }
        if self.state == State::Away {
            self.state = State::Greeting;
            self.last_hello = None;
        }
        let mut out = Vec::new();
        if rev & libc::POLLIN != 0 {
            out = self.read_all();
        }
        if self.state == State::Greeting
            && self.partial.is_none()
            && self
                .last_hello
                .is_none_or(|t| now >= t + Duration::from_millis(HELLO_INTERVAL_MS))
        {
            self.last_hello = Some(now);
            let hello = GuestMessage::Hello {
                protocol_version: PROTOCOL_VERSION,
                boot_ms: self.boot_ms,
            };
            if let Ok(bytes) = encode_frame(&hello) {
                self.partial = Some((bytes, 0));
            }
        }
        self.flush();
        out
    }

    fn read_all(&mut self) -> Vec<HostMessage> {
        let mut out = Vec::new();
        let Some(file) = self.file.as_mut() else {
            return out;
        };
        let mut buf = [0u8; 16384];
        loop {
            match file.read(&mut buf) {
                Ok(0) => {
                    self.disconnect();
                    return out;
                }
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("aloft-init: reading the control port: {e}");
                    self.disconnect();
                    return out;
                }
            }
        }
        loop {
            match self.decoder.next_frame::<HostMessage>() {
                Ok(Some(HostMessage::HelloAck { .. })) => {
                    self.state = State::Ready;
                }
                // A host that (re)connected: handshake again.
                Ok(Some(HostMessage::Hello { .. })) => {
                    self.state = State::Greeting;
                    self.last_hello = None;
                }
                // `ps`: answered here from /proc, the app loop never sees it.
                Ok(Some(HostMessage::ProcessList { request_id })) => {
                    let (processes, mem_total_kb, mem_available_kb) =
                        crate::procfs::processes(Path::new("/proc"));
                    self.send(&GuestMessage::ProcessList {
                        request_id,
                        processes,
                        mem_total_kb,
                        mem_available_kb,
                    });
                }
                Ok(Some(HostMessage::Sync { request_id })) => {
                    sys::sync();
                    self.send(&GuestMessage::Synced { request_id });
                }
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => {
                    eprintln!("aloft-init: bad frame from the host: {e}");
                    self.decoder.reset();
                    break;
                }
            }
        }
        out
    }

    /// Writes as much as the port takes without blocking.
    pub fn flush(&mut self) {
        let Some(file) = self.file.as_mut() else {
            return;
        };
        loop {
            if self.partial.is_none() {
                if self.state != State::Ready {
                    return;
                }
                let Some(frame) = self.queue.pop_front() else {
                    return;
                };
                if frame.droppable {
                    self.queued_log_bytes -= frame.bytes.len();
                }
                self.partial = Some((frame.bytes, 0));
            }
            let Some((bytes, off)) = self.partial.as_mut() else {
                return;
            };
            match file.write(&bytes[*off..]) {
                Ok(n) => {
                    *off += n;
                    if *off >= bytes.len() {
                        self.partial = None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("aloft-init: writing the control port: {e}");
                    self.disconnect();
                    return;
                }
            }
        }
    }

    /// Before power-off: keeps the channel going until everything queued is written or
    /// `deadline` passes. A host that is away gets until the deadline to come back.
    pub fn drain(&mut self, deadline: Instant) {
        loop {
            let now = Instant::now();
            let _ = self.tick(now);
            if !self.has_pending() || now >= deadline {
                return;
            }
            let wait = (deadline - now).min(Duration::from_millis(10));
            match self.pollfd() {
                Some(p) => {
                    let mut p = [p];
                    let _ = sys::poll(&mut p, wait.as_millis() as i32);
                }
                None => std::thread::sleep(wait),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aloft_types::guest::Stream;

    #[test]
    fn logs_are_bounded_while_the_host_is_away_and_other_frames_kept() {
        let mut p = Port::new(0);
        p.send(&GuestMessage::AppStarted {
            pid: 7,
            uptime_ms: 1,
        });
        let line = "x".repeat(1000);
        for i in 0..3000 {
            p.send(&GuestMessage::Log {
                stream: Stream::Stdout,
                ts_ms: i,
                line: line.clone(),
            });
        }
        p.send(&GuestMessage::Exit {
            code: Some(0),
            signal: None,
            oom: false,
        });
        assert!(p.queued_log_bytes <= LOG_BUFFER_BYTES);
        assert!(p.dropped_logs > 1000, "{}", p.dropped_logs);
        let first = &p.queue.front().unwrap().bytes[4..];
        assert!(String::from_utf8_lossy(first).contains("AppStarted"));
        let last = &p.queue.back().unwrap().bytes[4..];
        assert!(String::from_utf8_lossy(last).contains("Exit"));
        // The newest log lines survive, the oldest went first.
        let second = String::from_utf8_lossy(&p.queue[1].bytes[4..]).to_string();
        assert!(!second.contains("\"ts_ms\":0,"), "{second}");
        let kept: usize = p
            .queue
            .iter()
            .filter(|f| f.droppable)
            .map(|f| f.bytes.len())
            .sum();
        assert_eq!(kept, p.queued_log_bytes);
    }
}
