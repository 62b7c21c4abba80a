//! Spawning the app and exec'd commands (pipes or a PTY, credentials, new session) and
//! turning their output into lines or chunks.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use aloft_types::guest::Stream;

use crate::sys;
use crate::users::Credentials;

/// Longest log line; longer output is cut into pieces of this size.
pub const MAX_LINE: usize = 16 * 1024;

/// What to run and how.
pub struct Spec<'a> {
    pub argv: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub cwd: &'a str,
    pub creds: &'a Credentials,
    /// Run on a new PTY of this size instead of pipes.
    pub tty: Option<(u16, u16)>,
    /// Give the child a stdin pipe (else /dev/null, unless on a PTY).
    pub stdin: bool,
}

/// A started child: its pid, our end of its stdin, and its outputs.
pub struct Spawned {
    pub pid: i32,
    pub stdin: Option<File>,
    pub outputs: Vec<Output>,
    /// The PTY master, for resizing.
    pub pty: Option<File>,
}

/// One output stream of a child, read without blocking.
pub struct Output {
    pub file: File,
    pub stream: Stream,
    pub open: bool,
    partial: Vec<u8>,
}

impl Output {
    fn new(file: File, stream: Stream) -> io::Result<Output> {
        sys::set_nonblocking(file.as_raw_fd())?;
        Ok(Output {
            file,
            stream,
            open: true,
            partial: Vec::new(),
        })
    }

    /// Reads what is available. Returns the bytes; marks the output closed at EOF
    /// (a PTY master reports EIO once the last slave is closed).
    pub fn read_available(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 16384];
        while self.open {
            match self.file.read(&mut buf) {
                Ok(0) => self.open = false,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if out.len() >= 256 * 1024 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.open = false,
            }
        }
        out
    }

    /// Reads what is available and splits it into lines (without the newline); at EOF
    /// the unterminated rest is a line too.
    pub fn read_lines(&mut self) -> Vec<String> {
        let data = self.read_available();
        let mut lines = split_lines(&mut self.partial, &data);
        if !self.open && !self.partial.is_empty() {
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
            self.partial.clear();
        }
        lines
    }
}

/// Appends `data` to `partial` and takes out every complete line (and every
/// [`MAX_LINE`]-sized piece of an over-long one).
pub fn split_lines(partial: &mut Vec<u8>, data: &[u8]) -> Vec<String> {
    partial.extend_from_slice(data);
    let mut lines = Vec::new();
    let mut start = 0;
    loop {
        let rest = &partial[start..];
        match rest.iter().position(|b| *b == b'\n') {
            Some(i) if i <= MAX_LINE => {
                let mut line = &rest[..i];
                if line.ends_with(b"\r") {
                    line = &line[..line.len() - 1];
                }
                lines.push(String::from_utf8_lossy(line).into_owned());
                start += i + 1;
            }
            _ if rest.len() >= MAX_LINE => {
                lines.push(String::from_utf8_lossy(&rest[..MAX_LINE]).into_owned());
                start += MAX_LINE;
            }
            _ => break,
        }
    }
    partial.drain(..start);
    lines
}

/// Finds `prog` the way a shell would, in the `PATH` of the child's environment.
pub fn lookup(prog: &str, env: &BTreeMap<String, String>) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    if prog.contains('/') {
        return Some(prog.to_string());
    }
    let path = env
        .get("PATH")
        .map(String::as_str)
        .unwrap_or(aloft_types::guest::DEFAULT_PATH);
    path.split(':').filter(|d| !d.is_empty()).find_map(|dir| {
        let candidate = format!("{dir}/{prog}");
        let meta = std::fs::metadata(&candidate).ok()?;
        (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(candidate)
    })
}

/// Why a command could not be started, with the exit code a shell would give.
#[derive(Debug)]
pub struct SpawnError {
    pub message: String,
    pub code: i32,
}

pub fn spawn(spec: &Spec) -> Result<Spawned, SpawnError> {
    let fail = |what: &str, e: io::Error| SpawnError {
        message: format!("{what}: {e}"),
        code: 1,
    };
    let Some(argv0) = spec.argv.first() else {
        return Err(SpawnError {
            message: "empty command".into(),
            code: 127,
        });
    };
    let Some(program) = lookup(argv0, spec.env) else {
        return Err(SpawnError {
            message: format!(
                "{argv0:?}: executable file not found in PATH ({})",
                spec.env.get("PATH").map(String::as_str).unwrap_or_default()
            ),
            code: 127,
        });
    };
    let mut cmd = Command::new(&program);
    cmd.arg0(argv0)
        .args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env)
        .current_dir(spec.cwd);
    let mut stdin = None;
    let mut outputs = Vec::new();
    let mut pty = None;
    if let Some((rows, cols)) = spec.tty {
        let (master, slave) = sys::open_pty(rows, cols).map_err(|e| fail("opening a pty", e))?;
        let s2 = slave.try_clone().map_err(|e| fail("dup", e))?;
        let s3 = slave.try_clone().map_err(|e| fail("dup", e))?;
        cmd.stdin(Stdio::from(slave))
            .stdout(Stdio::from(s2))
            .stderr(Stdio::from(s3));
        stdin = Some(master.try_clone().map_err(|e| fail("dup", e))?);
        pty = Some(master.try_clone().map_err(|e| fail("dup", e))?);
        outputs.push(Output::new(master, Stream::Stdout).map_err(|e| fail("pty", e))?);
    } else {
        if spec.stdin {
            let (r, w) = sys::pipe().map_err(|e| fail("pipe", e))?;
            sys::set_nonblocking(w.as_raw_fd()).map_err(|e| fail("pipe", e))?;
            cmd.stdin(Stdio::from(r));
            stdin = Some(w);
        } else {
            cmd.stdin(Stdio::null());
        }
        for stream in [Stream::Stdout, Stream::Stderr] {
            let (r, w) = sys::pipe().map_err(|e| fail("pipe", e))?;
            match stream {
                Stream::Stdout => cmd.stdout(Stdio::from(w)),
                Stream::Stderr => cmd.stderr(Stdio::from(w)),
            };
            outputs.push(Output::new(r, stream).map_err(|e| fail("pipe", e))?);
        }
    }
    let ctty = spec.tty.is_some();
    let (uid, gid, groups) = (spec.creds.uid, spec.creds.gid, spec.creds.groups.clone());
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // syscalls (setsid, ioctl, setgroups, setgid, setuid) on data captured by move.
    unsafe {
        cmd.pre_exec(move || sys::child_setup(ctty, uid, gid, &groups));
    }
    let child = cmd.spawn().map_err(|e| SpawnError {
        code: match e.kind() {
            io::ErrorKind::NotFound => 127,
            io::ErrorKind::PermissionDenied => 126,
            _ => 1,
        },
        message: format!("starting {program:?} in {}: {e}", spec.cwd),
    })?;
    // Dropping the Command closes our copies of the child's ends, so EOF arrives.
    drop(cmd);
    Ok(Spawned {
        pid: child.id() as i32,
        stdin,
        outputs,
        pty,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_splitting() {
        let mut p = Vec::new();
        assert_eq!(split_lines(&mut p, b"a\nb"), vec!["a"]);
        assert_eq!(split_lines(&mut p, b"c\r\n\nd"), vec!["bc", ""]);
        assert_eq!(p, b"d");
        let long = vec![b'x'; MAX_LINE * 2 + 5];
        let lines = split_lines(&mut Vec::new(), &long);
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l.len() == MAX_LINE));
    }

    #[test]
    fn path_lookup() {
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), "/nonexistent:/bin:/usr/bin".to_string());
        let sh = lookup("sh", &env).expect("sh on this host");
        assert!(sh.ends_with("/sh"));
        assert_eq!(lookup("./rel/x", &env).as_deref(), Some("./rel/x"));
        assert_eq!(lookup("no-such-program-aloft", &env), None);
    }

    #[test]
    fn spawn_pipes_and_pty_on_this_host() {
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), "/bin:/usr/bin".to_string());
        env.insert("GREETING".to_string(), "hi".to_string());
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let creds = Credentials {
            uid,
            gid,
            groups: vec![gid],
            home: "/".into(),
        };
        if creds.uid != 0 {
            return; // setgroups needs root
        }
        let argv: Vec<String> = [
            "sh",
            "-c",
            "echo $GREETING; echo err >&2; test -t 0 && echo tty",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for tty in [None, Some((30, 100))] {
            let mut s = spawn(&Spec {
                argv: &argv,
                env: &env,
                cwd: "/",
                creds: &creds,
                tty,
                stdin: true,
            })
            .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let mut out = String::new();
            while s.outputs.iter().any(|o| o.open) {
                assert!(std::time::Instant::now() < deadline);
                let mut fds: Vec<libc::pollfd> = s
                    .outputs
                    .iter()
                    .filter(|o| o.open)
                    .map(|o| libc::pollfd {
                        fd: o.file.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                sys::poll(&mut fds, 100).unwrap();
                for o in &mut s.outputs {
                    for l in o.read_lines() {
                        out.push_str(&format!("{:?}:{l}\n", o.stream));
                    }
                }
                if tty.is_some() {
                    // The PTY master stays readable until the child is gone.
                    let mut st = 0;
                    // SAFETY: waiting for our own child.
                    let r = unsafe { libc::waitpid(s.pid, &mut st, libc::WNOHANG) };
                    if r == s.pid {
                        for o in &mut s.outputs {
                            for l in o.read_lines() {
                                out.push_str(&format!("{:?}:{l}\n", o.stream));
                            }
                            o.open = false;
                        }
                    }
                }
            }
            if tty.is_none() {
                assert_eq!(out, "Stdout:hi\nStderr:err\n");
                let mut st = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(s.pid, &mut st, 0) };
            } else {
                assert!(out.contains("Stdout:hi"), "{out}");
                assert!(out.contains("Stdout:err"), "{out}");
                assert!(out.contains("Stdout:tty"), "{out}");
            }
        }
    }
}
