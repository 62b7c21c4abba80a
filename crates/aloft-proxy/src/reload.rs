//! Hitless reload: a new proxy process takes over the listening sockets of the
//! running one over a unix socket (`SCM_RIGHTS`), then the old one drains.
//!
//! Hand-off, not `SO_REUSEPORT`: with reuseport each process has its own accept queue,
//! and the connections queued on the old socket when it closes are reset. Handing
//! over the socket itself keeps one accept queue, so no connection is ever lost:
//!
//! 1. the running proxy listens on a unix socket ([`Handoff::bind`]);
//! 2. a new process connects ([`inherit`]) and receives every listening socket
//!    with its address;
//! 3. it starts serving them (both processes accept from the same queue for a moment)
//!    and says `ready` ([`Inherited::ready`]);
//! 4. the old process stops accepting and drains: in-flight requests finish, HTTP/1
//!    keep-alive connections are closed after their next response
//!    (`Connection: close`), HTTP/2 ones with GOAWAY — bounded by its drain timeout;
//! 5. the new process binds the unix socket path for the next reload.

use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long either side waits for the other during a hand-off.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);
/// Most listening sockets one hand-off carries.
const MAX_FDS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("hand-off socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("hand-off over {path}: {why}")]
    Protocol { path: PathBuf, why: String },
    #[error("hand-off over {path}: more than {MAX_FDS} listeners")]
    TooMany { path: PathBuf },
}

/// Listening sockets received from the running proxy; say [`Inherited::ready`] once
/// they are served.
#[derive(Debug)]
pub struct Inherited {
    path: PathBuf,
    stream: UnixStream,
    listeners: Vec<(SocketAddr, std::net::TcpListener)>,
}

impl Inherited {
    /// The inherited listener bound to `addr`, if the old proxy had one.
    pub fn take(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let i = self.listeners.iter().position(|(a, _)| *a == addr)?;
        Some(self.listeners.swap_remove(i).1)
    }

    /// Addresses received and not taken yet.
    pub fn remaining(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|(a, _)| *a).collect()
    }

    /// Tell the old proxy that the listeners are served: it stops accepting and
    /// drains. Blocking (a few bytes on a local socket).
    pub fn ready(mut self) -> Result<(), ReloadError> {
        let path = self.path.clone();
        self.stream
            .write_all(b"ready\n")
            .map_err(|source| ReloadError::Socket { path, source })
    }
}

/// Connect to the running proxy's hand-off socket at `path` and receive its
/// listening sockets. `Ok(None)` when no proxy listens there. Blocking.
pub fn inherit(path: &Path) -> Result<Option<Inherited>, ReloadError> {
    let sock_err = |source| ReloadError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(sock_err(e)),
    };
    stream
        .set_read_timeout(Some(HANDOFF_TIMEOUT))
        .map_err(sock_err)?;
    let (text, fds) = recv_with_fds(&stream).map_err(sock_err)?;
    let protocol = |why: String| ReloadError::Protocol {
        path: path.to_path_buf(),
        why,
    };
    let text = String::from_utf8(text).map_err(|_| protocol("message is not UTF-8".into()))?;
    let addrs: Vec<SocketAddr> = text
        .trim()
        .strip_prefix("listeners ")
        .ok_or_else(|| protocol(format!("unexpected message {text:?}")))?
        .split_whitespace()
        .map(|a| {
            a.parse()
                .map_err(|_| protocol(format!("bad address {a:?}")))
        })
        .collect::<Result<_, _>>()?;
    if addrs.len() != fds.len() {
        return Err(protocol(format!(
            "{} addresses but {} sockets",
            addrs.len(),
            fds.len()
        )));
    }
    let mut listeners = Vec::new();
    for (addr, fd) in addrs.into_iter().zip(fds) {
        let l = std::net::TcpListener::from(fd);
        l.set_nonblocking(true).map_err(sock_err)?;
        listeners.push((addr, l));
    }
    Ok(Some(Inherited {
        path: path.to_path_buf(),
        stream,
        listeners,
    }))
}

/// The running proxy's end: hands its listeners to the next process that asks.
#[derive(Debug)]
pub struct Handoff {
    path: PathBuf,
    listener: tokio::net::UnixListener,
}

impl Handoff {
    /// Listen on `path`, replacing any file there (call after [`inherit`]: either no
    /// proxy answered there, or this process is the successor of the one that did).
    pub fn bind(path: &Path) -> Result<Handoff, ReloadError> {
        let sock_err = |source| ReloadError::Socket {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(sock_err(e)),
        }
        let listener = tokio::net::UnixListener::bind(path).map_err(sock_err)?;
        Ok(Handoff {
            path: path.to_path_buf(),
            listener,
        })
    }

    /// Wait for a successor, send it `listeners` and return once it reports that it
    /// serves them (then stop accepting and drain). A successor that fails before
    /// saying so is logged and the wait goes on: this proxy keeps serving.
    pub async fn next_successor(&self, listeners: &[(SocketAddr, RawFd)]) -> SocketAddrs {
        loop {
            match self.one(listeners).await {
                Ok(()) => return SocketAddrs(listeners.iter().map(|(a, _)| *a).collect()),
                Err(e) => {
                    tracing::warn!(error = %e, "hand-off to a new proxy failed; still serving")
                }
            }
        }
    }

    async fn one(&self, listeners: &[(SocketAddr, RawFd)]) -> Result<(), ReloadError> {
        let sock_err = |source| ReloadError::Socket {
            path: self.path.clone(),
            source,
        };
        if listeners.len() > MAX_FDS {
            return Err(ReloadError::TooMany {
                path: self.path.clone(),
            });
        }
        let (stream, _) = self.listener.accept().await.map_err(sock_err)?;
        let stream = stream.into_std().map_err(sock_err)?;
        stream.set_nonblocking(false).map_err(sock_err)?;
        let listeners = listeners.to_vec();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || -> Result<(), ReloadError> {
            let sock_err = |source| ReloadError::Socket {
                path: path.clone(),
                source,
            };
            stream
                .set_read_timeout(Some(HANDOFF_TIMEOUT))
                .map_err(sock_err)?;
            let mut text = String::from("listeners");
            for (a, _) in &listeners {
                text.push(' ');
                text.push_str(&a.to_string());
            }
            text.push('\n');
            let fds: Vec<RawFd> = listeners.iter().map(|(_, fd)| *fd).collect();
            send_with_fds(&stream, text.as_bytes(), &fds).map_err(sock_err)?;
            let mut line = String::new();
            BufReader::new(&stream)
                .read_line(&mut line)
                .map_err(sock_err)?;
            if line.trim() != "ready" {
                return Err(ReloadError::Protocol {
                    path: path.clone(),
                    why: format!("successor said {:?} instead of ready", line.trim()),
                });
            }
            Ok(())
        })
        .await
        .map_err(|e| ReloadError::Protocol {
            path: self.path.clone(),
            why: format!("hand-off task failed: {e}"),
        })?
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The addresses handed to a successor.
#[derive(Debug)]
pub struct SocketAddrs(pub Vec<SocketAddr>);

/// Raw descriptors of `listeners` with their addresses, for [`Handoff::next_successor`].
/// The descriptors stay owned by the listeners, which must outlive the hand-off.
pub fn raw_listeners(listeners: &[&tokio::net::TcpListener]) -> Vec<(SocketAddr, RawFd)> {
    listeners
        .iter()
        .filter_map(|l| Some((l.local_addr().ok()?, l.as_raw_fd())))
        .collect()
}

fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cmsg_buf = vec![0u8; space.max(1)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cmsg_buf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` bytes, enough for one header carrying
        // `fds.len()` descriptors (CMSG_SPACE above); CMSG_FIRSTHDR is non-null then.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    // SAFETY: msg points at live buffers (iov → data, control → cmsg_buf) for the call.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if (n as usize) < data.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "hand-off message sent partly",
        ));
    }
    Ok(())
}

fn recv_with_fds(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = vec![0u8; 8192];
    let fd_bytes = MAX_FDS * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cmsg_buf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: msg points at live, writable buffers of the stated sizes; CMSG_CLOEXEC
    // keeps received descriptors from leaking into child processes.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with well-formed headers; CMSG_FIRSTHDR /
    // CMSG_NXTHDR walk them within msg_controllen, and each SCM_RIGHTS payload is an
    // array of descriptors now owned by this process (wrapped in OwnedFd exactly once).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = payload / std::mem::size_of::<RawFd>();
                let base = libc::CMSG_DATA(cmsg) as *const RawFd;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(base.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "hand-off carried more sockets than expected",
        ));
    }
    data.truncate(n as usize);
    Ok((data, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listeners_move_to_the_successor_and_keep_their_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handoff.sock");
        assert!(inherit(&path).unwrap().is_none(), "nothing listens yet");
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        // A client connects before the hand-off and is accepted after it, by the
        // successor: the accept queue moved with the socket.
        let early = std::net::TcpStream::connect(addr).unwrap();
        let handoff = Handoff::bind(&path).unwrap();
        let raw = raw_listeners(&[&tcp]);
        let old = tokio::spawn(async move {
            let addrs = handoff.next_successor(&raw).await;
            drop(tcp);
            addrs
        });
        let p = path.clone();
        let mut inherited = tokio::task::spawn_blocking(move || inherit(&p))
            .await
            .unwrap()
            .unwrap()
            .expect("the old proxy answers");
        assert_eq!(inherited.remaining(), vec![addr]);
        let l = inherited.take(addr).expect("listener for addr");
        tokio::task::spawn_blocking(move || inherited.ready())
            .await
            .unwrap()
            .unwrap();
        let handed = tokio::time::timeout(HANDOFF_TIMEOUT, old)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(handed.0, vec![addr]);
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        let (s, _) = tokio::time::timeout(HANDOFF_TIMEOUT, l.accept())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.peer_addr().unwrap(), early.local_addr().unwrap());
    }
}
