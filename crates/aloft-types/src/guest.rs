//! Host ↔ guest protocol: the run config the agent hands to `aloft-init` (`run.json`)
//! and the frames exchanged over the virtio-serial channel.
//!
//! # Contract with the QEMU driver (aloft-vmm) — change only together
//!
//! * initrd = base initramfs (`/init` = aloft-init, `/lib/modules/<name>.ko` for every
//!   name in [`GUEST_MODULES`], `/dev/console`) concatenated with a per-machine cpio
//!   holding [`RUN_CONFIG_PATH`] (`/run.json`, a [`RunConfig`]). The kernel command line
//!   carries nothing aloft-specific.
//! * virtio-mmio devices, in this order: the root disk (`/dev/vda`, ext4), the volumes
//!   (`/dev/vdb`, `/dev/vdc`, … in [`RunConfig::volumes`] order), virtio-net (only when
//!   [`NetworkConfig::interfaces`] is not empty), virtio-serial-device with one port
//!   named [`CTL_PORT_NAME`], virtio-rng, virtio-balloon. The ACPI power button stops the
//!   app gracefully (kill signal, kill timeout) and powers off.
//! * Framing on the port: a 4-byte big-endian length, then that many bytes of JSON of a
//!   [`GuestMessage`] (guest → host) or a [`HostMessage`] (host → guest), both tagged by
//!   `"type"`. A frame is at most [`MAX_FRAME_LEN`] bytes.
//! * Handshake: the guest sends [`GuestMessage::Hello`] every [`HELLO_INTERVAL_MS`] until
//!   the host answers [`HostMessage::HelloAck`]; only then does it send anything else
//!   (logs produced meanwhile are kept in a bounded buffer, oldest dropped first). When
//!   the host side disconnects (agent restart) the guest goes back to sending `Hello`.
//!   Because a quick reconnect can go unnoticed by the guest (QEMU reports the close and
//!   the new open back to back), the host also sends [`HostMessage::Hello`] on connect
//!   (repeated until the handshake completes); the guest answers it by handshaking
//!   again (its own `Hello`, then waiting for `HelloAck`). A host that sees any frame
//!   other than `Hello` before its ack answers `HelloAck` too.
//! * Files with `secret_name` and no `raw_value` take their (base64) content from the
//!   secret of that name in [`RunConfig::extra_env`].
//! * Binary payloads (exec stdin/output) are base64 (standard alphabet, padded) in JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::machine::MachineConfig;

/// Version of the wire protocol spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;
/// Name of the virtio-serial port carrying the channel.
pub const CTL_PORT_NAME: &str = "aloft.ctl";
/// Where the per-machine initramfs puts the run config.
pub const RUN_CONFIG_PATH: &str = "/run.json";
/// Largest frame either side accepts (the length prefix excluded).
pub const MAX_FRAME_LEN: u32 = 16 * 1024 * 1024;
/// How often the guest repeats `Hello` until it is acknowledged.
pub const HELLO_INTERVAL_MS: u64 = 50;
/// Kernel modules the guest loads, in this order (no modules.dep; missing ones are
/// skipped). The network ones are skipped when the machine has no interface, and
/// `overlay` is loaded only once the app has started.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
    "virtio-rng",
    "virtio_balloon",
    "button",
    "evdev",
    "overlay",
];
/// `PATH` given to the app when neither the image nor the config sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn default_kill_timeout_ms() -> u64 {
    5000
}
fn default_kill_signal() -> String {
    "SIGINT".to_string()
}
fn default_root_device() -> String {
    "/dev/vda".to_string()
}
fn default_fs() -> String {
    "ext4".to_string()
}

/// `run.json`: everything the guest needs to run one machine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub machine_id: String,
    pub app_name: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub image_ref: String,
    /// The machine's instance id (changes on every update).
    #[serde(default)]
    pub machine_version: String,
    /// Defaults to `machine_id` when empty.
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub process_group: String,
    /// The Fly machine config as the API stored it.
    #[serde(default)]
    pub config: MachineConfig,
    /// The image's own config (entrypoint, cmd, env …).
    #[serde(default)]
    pub image_config: ImageConfig,
    /// Environment computed host-side (FLY_* variables, secrets); wins over everything.
    #[serde(default)]
    pub extra_env: BTreeMap<String, String>,
    #[serde(default)]
    pub network: NetworkConfig,
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    /// TCP ports whose LISTEN state means "ready"; the guest reports the first one.
    #[serde(default)]
    pub ready_ports: Vec<u16>,
    #[serde(default = "default_kill_timeout_ms")]
    pub kill_timeout_ms: u64,
    /// Signal name (`SIGINT`, `SIGTERM`, `INT` …) sent on a graceful stop.
    #[serde(default = "default_kill_signal")]
    pub kill_signal: String,
    /// Block device of the root filesystem (ext4).
    #[serde(default = "default_root_device")]
    pub root_device: String,
}

/// The OCI image config fields the guest uses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `K=V` strings, as in the OCI config.
    pub env: Vec<String>,
    pub working_dir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    pub user: String,
    pub exposed_ports: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkConfig {
    pub interfaces: Vec<InterfaceConfig>,
    pub dns_servers: Vec<String>,
    pub extra_hosts: Vec<ExtraHost>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// Interface name in the guest, e.g. `eth0`.
    pub name: String,
    #[serde(default)]
    pub mac: String,
    /// CIDR addresses, e.g. `172.19.0.2/24`, `fdaa::2/64`.
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub gateway4: Option<String>,
    #[serde(default)]
    pub gateway6: Option<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
}

/// One `/etc/hosts` line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraHost {
    pub ip: String,
    pub names: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    pub name: String,
    /// `/dev/vdb`, `/dev/vdc` …
    pub device: String,
    pub path: String,
    #[serde(default = "default_fs")]
    pub fs: String,
}

/// Why a run config cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RunConfigError {
    #[error("{path}: invalid run config: {message}")]
    Parse { path: String, message: String },
    #[error(
        "machine {machine_id}: nothing to run: no init.exec, no entrypoint and no cmd in the machine config or the image"
    )]
    NothingToRun { machine_id: String },
    #[error("machine {machine_id}: unknown kill signal {signal:?}")]
    BadSignal { machine_id: String, signal: String },
    #[error("file {guest_path}: {message}")]
    File { guest_path: String, message: String },
}

impl RunConfig {
    /// Parses `run.json` text; `path` only names the source in the error.
    pub fn from_json(path: &str, text: &[u8]) -> Result<RunConfig, RunConfigError> {
        serde_json::from_slice(text).map_err(|e| RunConfigError::Parse {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    pub fn hostname(&self) -> &str {
        if self.hostname.is_empty() {
            &self.machine_id
        } else {
            &self.hostname
        }
    }

    /// The argv to run: `init.exec` if set; otherwise entrypoint (the config's override,
    /// else the image's) followed by cmd (the config's override, else the image's — but,
    /// as Docker does, not the image's cmd when the entrypoint was overridden).
    pub fn command(&self) -> Result<Vec<String>, RunConfigError> {
        let init = &self.config.init;
        let argv = if let Some(exec) = init.exec.as_ref().filter(|e| !e.is_empty()) {
            exec.clone()
        } else {
            let (entrypoint, image_cmd_allowed) = match &init.entrypoint {
                Some(ep) => (ep.clone(), false),
                None => (self.image_config.entrypoint.clone(), true),
            };
            let cmd = match &init.cmd {
                Some(cmd) => cmd.clone(),
                None if image_cmd_allowed => self.image_config.cmd.clone(),
                None => Vec::new(),
            };
            entrypoint.into_iter().chain(cmd).collect()
        };
        if argv.is_empty() || argv[0].is_empty() {
            return Err(RunConfigError::NothingToRun {
                machine_id: self.machine_id.clone(),
            });
        }
        Ok(argv)
    }

    /// The app's environment, later sources overriding earlier ones: `PATH` default and
    /// `HOSTNAME`, the image's env, the machine config's env, then `extra_env`.
    pub fn environment(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
        env.insert("HOSTNAME".to_string(), self.hostname().to_string());
        for kv in &self.image_config.env {
            match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    env.insert(k.to_string(), v.to_string());
                }
                _ => {}
            }
        }
        for (k, v) in self.config.env.iter().chain(&self.extra_env) {
            env.insert(k.clone(), v.clone());
        }
        env
    }

    /// The signal number of `kill_signal` (the machine config's `stop_config.signal`
    /// wins when set).
    pub fn kill_signal_number(&self) -> Result<i32, RunConfigError> {
        let name = self
            .config
            .stop_config
            .as_ref()
            .and_then(|s| s.signal.as_deref())
            .unwrap_or(&self.kill_signal);
        signal_number(name).ok_or_else(|| RunConfigError::BadSignal {
            machine_id: self.machine_id.clone(),
            signal: name.to_string(),
        })
    }

    /// Content of each configured file, decoded.
    pub fn files(&self) -> Result<Vec<(String, Vec<u8>, u32)>, RunConfigError> {
        let mut out = Vec::new();
        for f in &self.config.files {
            let err = |message: String| RunConfigError::File {
                guest_path: f.guest_path.clone(),
                message,
            };
            if !f.guest_path.starts_with('/') {
                return Err(err("guest_path must be absolute".into()));
            }
            let encoded = match (&f.raw_value, &f.secret_name) {
                (Some(raw), _) => raw.as_str(),
                (None, Some(secret)) => self
                    .extra_env
                    .get(secret)
                    .map(String::as_str)
                    .ok_or_else(|| err(format!("secret {secret:?} is not set")))?,
                (None, None) => return Err(err("neither raw_value nor secret_name".into())),
            };
            let data = base64::decode(encoded).map_err(|e| err(format!("bad base64: {e}")))?;
            out.push((f.guest_path.clone(), data, f.mode.unwrap_or(0o644)));
        }
        Ok(out)
    }
}

/// Linux x86-64 number of a signal given as `SIGTERM`, `TERM` or `15`.
pub fn signal_number(name: &str) -> Option<i32> {
    let name = name.trim();
    if let Ok(n) = name.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = name.to_ascii_uppercase();
    let short = upper.strip_prefix("SIG").unwrap_or(&upper);
    Some(match short {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "TRAP" => 5,
        "ABRT" => 6,
        "BUS" => 7,
        "FPE" => 8,
        "KILL" => 9,
        "USR1" => 10,
        "SEGV" => 11,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        "STKFLT" => 16,
        "CHLD" => 17,
        "CONT" => 18,
        "STOP" => 19,
        "TSTP" => 20,
        "TTIN" => 21,
        "TTOU" => 22,
        "URG" => 23,
        "XCPU" => 24,
        "XFSZ" => 25,
        "VTALRM" => 26,
        "PROF" => 27,
        "WINCH" => 28,
        "IO" => 29,
        "PWR" => 30,
        "SYS" => 31,
        _ => return None,
    })
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Guest → host frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum GuestMessage {
    /// Repeated until acknowledged. `boot_ms`: kernel uptime when init started.
    Hello {
        protocol_version: u32,
        boot_ms: u64,
    },
    /// The root filesystem is mounted and the machine is configured; the app is next.
    InitStarted {
        uptime_ms: u64,
    },
    AppStarted {
        pid: i32,
        uptime_ms: u64,
    },
    /// One of `ready_ports` is listening.
    Ready {
        port: u16,
        uptime_ms: u64,
    },
    /// One line of app output (without the newline); `ts_ms`: guest wall clock, Unix ms.
    Log {
        stream: Stream,
        ts_ms: u64,
        line: String,
    },
    /// The app ended; the guest powers off next. `code` 127/126 without a signal also
    /// means the command could not be started (an `Error` comes first); neither code nor
    /// signal means set-up failed before the app could run.
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        oom: bool,
    },
    ExecStarted {
        id: u64,
        pid: i32,
    },
    ExecOutput {
        id: u64,
        stream: Stream,
        #[serde(with = "base64::serde")]
        data: Vec<u8>,
    },
    /// The exec'd command ended (or `error` says why it never started).
    ExecExit {
        id: u64,
        code: Option<i32>,
        #[serde(default)]
        signal: Option<i32>,
        #[serde(default)]
        error: Option<String>,
    },
    MetadataValue {
        request_id: u64,
        key: String,
        value: Option<String>,
    },
    Error {
        message: String,
    },
    /// Answer to [`HostMessage::ProcessList`]: the guest's processes (read from /proc)
    /// and its memory counters from /proc/meminfo.
    ProcessList {
        request_id: u64,
        processes: Vec<ProcessStat>,
        #[serde(default)]
        mem_total_kb: u64,
        #[serde(default)]
        mem_available_kb: u64,
    },
    /// Answer to [`HostMessage::Sync`]: every filesystem was flushed.
    Synced {
        request_id: u64,
    },
}

/// A listening socket of a guest process (Fly's `ListenSocket`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenSocket {
    /// `tcp`, `tcp6`, `udp` or `udp6`.
    pub proto: String,
    /// `ip:port` (`[ip]:port` for IPv6).
    pub address: String,
}

/// One guest process (Fly's `ProcessStat`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStat {
    pub pid: i32,
    /// The command line, arguments separated by spaces (`[comm]` for kernel threads).
    pub command: String,
    /// CPU time used, user + system, in milliseconds.
    pub cpu: u64,
    /// Resident memory in bytes.
    pub rss: u64,
    /// Time since the process started, in milliseconds.
    pub rtime: u64,
    /// CPU time used in the kernel, in milliseconds.
    pub stime: u64,
    /// Working directory.
    pub directory: String,
    #[serde(default)]
    pub listen_sockets: Vec<ListenSocket>,
}

/// Host → guest frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum HostMessage {
    /// The host's greeting on (re)connect; the guest answers with its own `Hello`.
    Hello {
        #[serde(default)]
        protocol_version: u32,
    },
    HelloAck {
        #[serde(default)]
        protocol_version: u32,
    },
    /// Deliver a signal (Linux number) to the app.
    Signal {
        signal: i32,
    },
    /// Graceful stop: `signal` to the app, SIGKILL after `timeout_ms`, then sync, unmount
    /// volumes and power off.
    Stop {
        signal: i32,
        timeout_ms: u64,
    },
    Exec {
        id: u64,
        cmd: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        #[serde(default)]
        tty: bool,
        #[serde(default)]
        rows: u16,
        #[serde(default)]
        cols: u16,
    },
    ExecStdin {
        id: u64,
        #[serde(with = "base64::serde")]
        data: Vec<u8>,
        #[serde(default)]
        eof: bool,
    },
    ExecResize {
        id: u64,
        rows: u16,
        cols: u16,
    },
    MetadataGet {
        request_id: u64,
        key: String,
    },
    MetadataSet {
        request_id: u64,
        key: String,
        value: String,
    },
    /// Answered with a `MetadataValue` whose value is `None`.
    MetadataDelete {
        request_id: u64,
        key: String,
    },
    /// Answered with a [`GuestMessage::ProcessList`] of the same `request_id`.
    ProcessList {
        request_id: u64,
    },
    /// Flush every filesystem (`sync(2)`), e.g. before a volume snapshot; answered
    /// with a [`GuestMessage::Synced`] of the same `request_id` once done.
    Sync {
        request_id: u64,
    },
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: u32 },
    #[error("malformed frame: {0}")]
    Json(#[from] serde_json::Error),
}

/// Encodes one frame: length prefix and JSON.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    serde_json::to_writer(&mut out, msg)?;
    let len = out.len() - 4;
    if len > MAX_FRAME_LEN as usize {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Incremental frame decoder: feed it bytes as they arrive, take whole messages out.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Forgets a partial frame (after a disconnect).
    pub fn reset(&mut self) {
        self.buf.clear();
    }

    /// Bytes held that do not yet form a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, if one is buffered. After an error the decoder's state is
    /// unusable and should be [`reset`](Self::reset) with the connection.
    pub fn next_frame<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge {
                len: len as usize,
                max: MAX_FRAME_LEN,
            });
        }
        let end = 4 + len as usize;
        if self.buf.len() < end {
            return Ok(None);
        }
        let parsed = serde_json::from_slice(&self.buf[4..end]);
        self.buf.drain(..end);
        Ok(Some(parsed?))
    }
}

/// Standard base64 (RFC 4648, padded), enough for the protocol's binary payloads.
pub mod base64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// Why a base64 string is invalid.
    #[derive(Debug, thiserror::Error, PartialEq)]
    pub enum DecodeError {
        #[error("invalid character {0:?}")]
        BadChar(char),
        #[error("length {0} is not a whole number of 4-character groups")]
        BadLength(usize),
    }

    /// Decodes padded or unpadded standard base64; ASCII whitespace is skipped.
    pub fn decode(text: &str) -> Result<Vec<u8>, DecodeError> {
        let mut vals = Vec::with_capacity(text.len());
        for c in text.chars() {
            let v = match c {
                'A'..='Z' => c as u8 - b'A',
                'a'..='z' => c as u8 - b'a' + 26,
                '0'..='9' => c as u8 - b'0' + 52,
                '+' => 62,
                '/' => 63,
                '=' => continue,
                c if c.is_ascii_whitespace() => continue,
                c => return Err(DecodeError::BadChar(c)),
            };
            vals.push(v);
        }
        if vals.len() % 4 == 1 {
            return Err(DecodeError::BadLength(vals.len()));
        }
        let mut out = Vec::with_capacity(vals.len() * 3 / 4);
        for group in vals.chunks(4) {
            let mut n = 0u32;
            for (i, v) in group.iter().enumerate() {
                n |= u32::from(*v) << (18 - 6 * i);
            }
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&bytes[..group.len() - 1]);
        }
        Ok(out)
    }

    /// `#[serde(with = "base64::serde")]` for `Vec<u8>` fields.
    pub mod serde {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&super::encode(data))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            let text = String::deserialize(d)?;
            super::decode(&text).map_err(serde::de::Error::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{MachineFile, MachineInit, StopConfig};

    fn cfg() -> RunConfig {
        RunConfig {
            machine_id: "m1".into(),
            app_name: "app".into(),
            kill_timeout_ms: 5000,
            kill_signal: "SIGINT".into(),
            root_device: "/dev/vda".into(),
            ..Default::default()
        }
    }

    #[test]
    fn base64_round_trip_and_known_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64::encode(plain.as_bytes()), enc);
            assert_eq!(base64::decode(enc).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64::decode(&base64::encode(&all)).unwrap(), all);
        assert_eq!(base64::decode("Zm9v\nYmFy").unwrap(), b"foobar");
        assert_eq!(
            base64::decode("Zm9vY"),
            Err(base64::DecodeError::BadLength(5))
        );
        assert_eq!(
            base64::decode("Zm9*"),
            Err(base64::DecodeError::BadChar('*'))
        );
    }

    #[test]
    fn frames_round_trip_across_split_reads() {
        let msgs = vec![
            GuestMessage::Hello {
                protocol_version: PROTOCOL_VERSION,
                boot_ms: 1234,
            },
            GuestMessage::Log {
                stream: Stream::Stderr,
                ts_ms: 1,
                line: "héllo \"world\"".into(),
            },
            GuestMessage::ExecOutput {
                id: 7,
                stream: Stream::Stdout,
                data: vec![0, 1, 2, 255],
            },
            GuestMessage::Exit {
                code: None,
                signal: Some(9),
                oom: true,
            },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend(encode_frame(m).unwrap());
        }
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for byte in wire.chunks(3) {
            dec.push(byte);
            while let Some(m) = dec.next_frame::<GuestMessage>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(dec.pending(), 0);
    }

    #[test]
    fn host_messages_round_trip_and_wire_shape() {
        let msgs = vec![
            HostMessage::HelloAck {
                protocol_version: 1,
            },
            HostMessage::Stop {
                signal: 15,
                timeout_ms: 100,
            },
            HostMessage::ExecStdin {
                id: 3,
                data: b"ls\n".to_vec(),
                eof: true,
            },
            HostMessage::MetadataSet {
                request_id: 1,
                key: "k".into(),
                value: "v".into(),
            },
        ];
        for m in msgs {
            let f = encode_frame(&m).unwrap();
            let mut d = FrameDecoder::new();
            d.push(&f);
            assert_eq!(d.next_frame::<HostMessage>().unwrap(), Some(m));
        }
        let f = encode_frame(&HostMessage::ExecStdin {
            id: 3,
            data: b"ls\n".to_vec(),
            eof: false,
        })
        .unwrap();
        assert_eq!(
            u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize,
            f.len() - 4
        );
        assert_eq!(
            std::str::from_utf8(&f[4..]).unwrap(),
            r#"{"type":"ExecStdin","id":3,"data":"bHMK","eof":false}"#
        );
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let mut d = FrameDecoder::new();
        d.push(&(MAX_FRAME_LEN + 1).to_be_bytes());
        assert!(matches!(
            d.next_frame::<GuestMessage>(),
            Err(FrameError::TooLarge { .. })
        ));
        let mut d = FrameDecoder::new();
        d.push(&5u32.to_be_bytes());
        d.push(b"{\"ty");
        assert!(d.next_frame::<GuestMessage>().unwrap().is_none());
        d.push(b"p");
        assert!(matches!(
            d.next_frame::<GuestMessage>(),
            Err(FrameError::Json(_))
        ));
    }

    #[test]
    fn command_resolution() {
        let mut c = cfg();
        assert_eq!(
            c.command(),
            Err(RunConfigError::NothingToRun {
                machine_id: "m1".into()
            })
        );
        c.image_config.entrypoint = vec!["/entry".into()];
        c.image_config.cmd = vec!["serve".into()];
        assert_eq!(c.command().unwrap(), ["/entry", "serve"]);
        c.config.init.cmd = Some(vec!["other".into(), "x".into()]);
        assert_eq!(c.command().unwrap(), ["/entry", "other", "x"]);
        c.config.init = MachineInit {
            entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
            ..Default::default()
        };
        // An overridden entrypoint drops the image's cmd (Docker semantics).
        assert_eq!(c.command().unwrap(), ["/bin/sh", "-c"]);
        c.config.init.exec = Some(vec!["/bin/true".into()]);
        assert_eq!(c.command().unwrap(), ["/bin/true"]);
        let mut c = cfg();
        c.image_config.cmd = vec!["/bin/httpd".into(), "-f".into()];
        assert_eq!(c.command().unwrap(), ["/bin/httpd", "-f"]);
    }

    #[test]
    fn environment_merge_order() {
        let mut c = cfg();
        c.image_config.env = vec![
            "PATH=/image/bin".into(),
            "A=image".into(),
            "B=image".into(),
            "C=image".into(),
            "broken".into(),
        ];
        c.config.env.insert("B".into(), "config".into());
        c.config.env.insert("C".into(), "config".into());
        c.extra_env.insert("C".into(), "extra".into());
        c.extra_env.insert("FLY_APP_NAME".into(), "app".into());
        let env = c.environment();
        assert_eq!(env["PATH"], "/image/bin");
        assert_eq!(env["A"], "image");
        assert_eq!(env["B"], "config");
        assert_eq!(env["C"], "extra");
        assert_eq!(env["HOSTNAME"], "m1");
        assert_eq!(env["FLY_APP_NAME"], "app");
        assert!(!env.contains_key("broken"));
        assert_eq!(cfg().environment()["PATH"], DEFAULT_PATH);
    }

    #[test]
    fn run_json_defaults_and_errors() {
        let c = RunConfig::from_json("/run.json", br#"{"machine_id":"m","app_name":"a"}"#).unwrap();
        assert_eq!(c.kill_timeout_ms, 5000);
        assert_eq!(c.kill_signal, "SIGINT");
        assert_eq!(c.root_device, "/dev/vda");
        assert_eq!(c.hostname(), "m");
        assert_eq!(c.kill_signal_number().unwrap(), 2);
        let err = RunConfig::from_json("/run.json", br#"{"machine_id":"m"}"#).unwrap_err();
        assert!(err.to_string().contains("/run.json"), "{err}");
        assert!(err.to_string().contains("app_name"), "{err}");
        let err = RunConfig::from_json(
            "/run.json",
            br#"{"machine_id":"m","app_name":"a","bogus":1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = RunConfig::from_json("/run.json", b"{").unwrap_err();
        assert!(matches!(err, RunConfigError::Parse { .. }));
        // Full round trip.
        let mut full = cfg();
        full.network.interfaces.push(InterfaceConfig {
            name: "eth0".into(),
            mac: "52:54:00:00:00:01".into(),
            addresses: vec!["172.19.0.2/24".into(), "fdaa::2/64".into()],
            gateway4: Some("172.19.0.1".into()),
            gateway6: Some("fdaa::1".into()),
            mtu: None,
        });
        full.volumes.push(VolumeMount {
            name: "data".into(),
            device: "/dev/vdb".into(),
            path: "/data".into(),
            fs: "ext4".into(),
        });
        full.ready_ports = vec![8080];
        let text = serde_json::to_vec(&full).unwrap();
        assert_eq!(RunConfig::from_json("x", &text).unwrap(), full);
    }

    #[test]
    fn signals_and_stop_config() {
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_number("term"), Some(15));
        assert_eq!(signal_number("9"), Some(9));
        assert_eq!(signal_number("SIGNOPE"), None);
        assert_eq!(signal_number("0"), None);
        let mut c = cfg();
        c.config.stop_config = Some(StopConfig {
            signal: Some("SIGUSR1".into()),
            timeout: None,
        });
        assert_eq!(c.kill_signal_number().unwrap(), 10);
        c.kill_signal = "SIGBOGUS".into();
        c.config.stop_config = None;
        assert!(matches!(
            c.kill_signal_number(),
            Err(RunConfigError::BadSignal { .. })
        ));
    }

    #[test]
    fn files_from_raw_value_and_secret() {
        let mut c = cfg();
        c.config.files = vec![
            MachineFile {
                guest_path: "/etc/a".into(),
                raw_value: Some(base64::encode(b"hello")),
                mode: Some(0o600),
                ..Default::default()
            },
            MachineFile {
                guest_path: "/etc/b".into(),
                secret_name: Some("SECRET_FILE".into()),
                ..Default::default()
            },
        ];
        c.extra_env
            .insert("SECRET_FILE".into(), base64::encode(b"s3cret"));
        let files = c.files().unwrap();
        assert_eq!(files[0], ("/etc/a".into(), b"hello".to_vec(), 0o600));
        assert_eq!(files[1], ("/etc/b".into(), b"s3cret".to_vec(), 0o644));
        c.extra_env.clear();
        let err = c.files().unwrap_err();
        assert!(err.to_string().contains("/etc/b"), "{err}");
    }
}
