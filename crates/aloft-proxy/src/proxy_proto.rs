//! The PROXY protocol header (HAProxy's, versions 1 and 2) the proxy writes to a
//! machine before a raw TCP connection's bytes, so the app learns the client's
//! address (`proxy_proto` handler, `proxy_proto_options.version`). Only writing;
//! nothing here reads from the network.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// A PROXY protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Version {
    /// The text form: `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`.
    #[default]
    V1,
    /// The binary form.
    V2,
}

impl Version {
    /// `v1`/`1` or `v2`/`2` (fly.toml's `proxy_proto_options.version`).
    pub fn parse(s: &str) -> Option<Version> {
        match s.trim().to_ascii_lowercase().as_str() {
            "v1" | "1" => Some(Version::V1),
            "v2" | "2" => Some(Version::V2),
            _ => None,
        }
    }
}

/// The v2 signature every binary header starts with.
pub const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The header for a TCP connection from `src` (the client) to `dst` (the address the
/// client connected to). Both addresses are given in one family: IPv4 when both are
/// IPv4 (IPv4-mapped IPv6 counts as IPv4), IPv6 otherwise.
pub fn header(version: Version, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (s, d) = (unmap(src.ip()), unmap(dst.ip()));
    match version {
        Version::V1 => match (s, d) {
            (IpAddr::V4(s4), IpAddr::V4(d4)) => {
                format!("PROXY TCP4 {s4} {d4} {} {}\r\n", src.port(), dst.port()).into_bytes()
            }
            _ => format!(
                "PROXY TCP6 {} {} {} {}\r\n",
                as_v6(s),
                as_v6(d),
                src.port(),
                dst.port()
            )
            .into_bytes(),
        },
        Version::V2 => {
            let mut h = Vec::with_capacity(16 + 36);
            h.extend_from_slice(&V2_SIGNATURE);
            // Version 2, command PROXY.
            h.push(0x21);
            match (s, d) {
                (IpAddr::V4(s4), IpAddr::V4(d4)) => {
                    // TCP over IPv4, 12 bytes of addresses.
                    h.push(0x11);
                    h.extend_from_slice(&12u16.to_be_bytes());
                    h.extend_from_slice(&s4.octets());
                    h.extend_from_slice(&d4.octets());
                }
                _ => {
                    // TCP over IPv6, 36 bytes of addresses.
                    h.push(0x21);
                    h.extend_from_slice(&36u16.to_be_bytes());
                    h.extend_from_slice(&as_v6(s).octets());
                    h.extend_from_slice(&as_v6(d).octets());
                }
            }
            h.extend_from_slice(&src.port().to_be_bytes());
            h.extend_from_slice(&dst.port().to_be_bytes());
            h
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_ipv4_and_ipv6() {
        let h = header(
            Version::V1,
            "192.0.2.1:5000".parse().unwrap(),
            "[::ffff:127.0.0.1]:443".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.1 127.0.0.1 5000 443\r\n");
        let h = header(
            Version::V1,
            "[2001:db8::1]:5000".parse().unwrap(),
            "127.0.0.1:80".parse().unwrap(),
        );
        assert_eq!(
            String::from_utf8(h).unwrap(),
            "PROXY TCP6 2001:db8::1 ::ffff:127.0.0.1 5000 80\r\n"
        );
    }

    #[test]
    fn v2_ipv4_layout() {
        let h = header(
            Version::V2,
            "10.0.0.1:1234".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h[16..20], &[10, 0, 0, 1]);
        assert_eq!(&h[20..24], &[10, 0, 0, 2]);
        assert_eq!(&h[24..], &[0x04, 0xD2, 0, 80]);
    }

    #[test]
    fn v2_ipv6_length() {
        let h = header(
            Version::V2,
            "[::1]:1".parse().unwrap(),
            "[::1]:2".parse().unwrap(),
        );
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[13..16], &[0x21, 0, 36]);
    }

    #[test]
    fn versions_parse() {
        assert_eq!(Version::parse("v2"), Some(Version::V2));
        assert_eq!(Version::parse("V1"), Some(Version::V1));
        assert_eq!(Version::parse("v3"), None);
    }
}
