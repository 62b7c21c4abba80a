//! A minimal rtnetlink client: link up, addresses, default routes. Messages are built
//! by hand (the layouts of `linux/rtnetlink.h`) and every request waits for its ack.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;
const IFLA_MTU: u16 = 4;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RTN_UNICAST: u8 = 1;
const IFF_UP: u32 = 1;

/// An `address/prefix` pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// Parses `172.19.0.2/24` or `fdaa::2/64` (a bare address is a host route).
pub fn parse_cidr(s: &str) -> Option<Cidr> {
    let (a, p) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = a.trim().parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match p {
        Some(p) => p.trim().parse().ok().filter(|n| *n <= max)?,
        None => max,
    };
    Some(Cidr { addr, prefix })
}

fn family(addr: &IpAddr) -> u8 {
    if addr.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    }
}

fn addr_bytes(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// One request under construction: header, fixed part, attributes.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, fixed: &[u8]) -> Msg {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(fixed);
        Msg { buf }
    }

    fn attr(mut self, kind: u16, data: &[u8]) -> Msg {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// An open rtnetlink socket.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socket returned a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Netlink { fd, seq: 0 })
    }

    fn request(&mut self, msg: Vec<u8>) -> io::Result<()> {
        // SAFETY: sending a buffer we own to the kernel (pid 0) on our socket.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: receiving into a stack buffer of the given length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let data = &buf[..n as usize];
            let mut off = 0;
            while off + 16 <= data.len() {
                let len =
                    u32::from_ne_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]])
                        as usize;
                let kind = u16::from_ne_bytes([data[off + 4], data[off + 5]]);
                let seq = u32::from_ne_bytes([
                    data[off + 8],
                    data[off + 9],
                    data[off + 10],
                    data[off + 11],
                ]);
                if kind == NLMSG_ERROR && seq == self.seq && off + 20 <= data.len() {
                    let errno = i32::from_ne_bytes([
                        data[off + 16],
                        data[off + 17],
                        data[off + 18],
                        data[off + 19],
                    ]);
                    return if errno == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    };
                }
                if len < 16 {
                    break;
                }
                off += (len + 3) & !3;
            }
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// Sets the link up (and its MTU when given).
    pub fn link_up(&mut self, index: u32, mtu: Option<u32>) -> io::Result<()> {
        let mut fixed = Vec::with_capacity(16);
        fixed.push(libc::AF_UNSPEC as u8);
        fixed.push(0);
        fixed.extend_from_slice(&0u16.to_ne_bytes());
        fixed.extend_from_slice(&(index as i32).to_ne_bytes());
        fixed.extend_from_slice(&IFF_UP.to_ne_bytes());
        fixed.extend_from_slice(&IFF_UP.to_ne_bytes());
        let seq = self.next_seq();
        let mut msg = Msg::new(RTM_NEWLINK, 0, seq, &fixed);
        if let Some(mtu) = mtu {
            msg = msg.attr(IFLA_MTU, &mtu.to_ne_bytes());
        }
        self.request(msg.finish())
    }

    /// Adds an address (IPv6 without duplicate address detection).
    pub fn add_address(&mut self, index: u32, cidr: Cidr) -> io::Result<()> {
        let mut fixed = vec![
            family(&cidr.addr),
            cidr.prefix,
            if cidr.addr.is_ipv6() { IFA_F_NODAD } else { 0 },
            0, // RT_SCOPE_UNIVERSE
        ];
        fixed.extend_from_slice(&index.to_ne_bytes());
        let bytes = addr_bytes(&cidr.addr);
        let seq = self.next_seq();
        let mut msg =
            Msg::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, seq, &fixed).attr(IFA_ADDRESS, &bytes);
        if cidr.addr.is_ipv4() {
            msg = msg.attr(IFA_LOCAL, &bytes);
        }
        self.request(msg.finish())
    }

    /// Adds a default route via `gateway` out of `index`.
    pub fn add_default_route(&mut self, index: u32, gateway: IpAddr) -> io::Result<()> {
        let fixed = [
            family(&gateway),
            0, // dst_len: default route
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            0, // RT_SCOPE_UNIVERSE
            RTN_UNICAST,
            0,
            0,
            0,
            0,
        ];
        let seq = self.next_seq();
        let msg = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, seq, &fixed)
            .attr(RTA_GATEWAY, &addr_bytes(&gateway))
            .attr(RTA_OIF, &index.to_ne_bytes());
        self.request(msg.finish())
    }
}

/// Index of a network interface, if it exists.
pub fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: valid NUL-terminated name.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing() {
        assert_eq!(
            parse_cidr("172.19.0.2/24"),
            Some(Cidr {
                addr: "172.19.0.2".parse().unwrap(),
                prefix: 24
            })
        );
        assert_eq!(parse_cidr("fdaa::2/64").unwrap().prefix, 64);
        assert_eq!(parse_cidr("10.0.0.1").unwrap().prefix, 32);
        assert_eq!(parse_cidr("10.0.0.1/33"), None);
        assert_eq!(parse_cidr("nope/24"), None);
    }

    #[test]
    fn message_layout_is_aligned_and_length_patched() {
        let m = Msg::new(RTM_NEWADDR, 0, 7, &[1, 2, 3, 4, 5, 6, 7, 8])
            .attr(IFA_ADDRESS, &[10, 0, 0, 1])
            .attr(9, &[1])
            .finish();
        assert_eq!(m.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        // header 16 + fixed 8 + attr 8 + attr 5 padded to 8
        assert_eq!(m.len(), 40);
        assert_eq!(u16::from_ne_bytes([m[32], m[33]]), 5);
    }
}
