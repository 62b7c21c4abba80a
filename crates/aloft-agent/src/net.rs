//! Private networking for machines when the agent runs as root: one routed TAP device
//! per machine, a private IPv6 address in a 6PN-like layout (the organisation and the
//! host embedded, a /112 per machine) and a private IPv4 (/30 per machine), outbound
//! NAT and organisation isolation with nftables.
//!
//! Addresses of slot `s` on host `h` for organisation `o` (16-bit numbers):
//! IPv6 `fdaa:o:h:s::2/112` (host side `::1`), IPv4 `172.19.(s*4)/30` + 2 (host `+1`).
//! Forwarding between two machine TAPs is allowed only within one organisation.

use std::process::Command;

use sha2::{Digest, Sha256};

/// Why the network could not be set up or torn down.
#[derive(Debug, thiserror::Error)]
#[error("network: `{command}` failed: {detail}")]
pub struct NetError {
    pub command: String,
    pub detail: String,
}

fn run(args: &[&str]) -> Result<(), NetError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| NetError {
            command: args.join(" "),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(NetError {
            command: args.join(" "),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// A 16-bit number for a name (organisation slug, host id).
pub fn short_id(name: &str) -> u16 {
    let h = Sha256::digest(name.as_bytes());
    u16::from_be_bytes([h[0], h[1]]).max(1)
}

/// The network identity of one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineNet {
    pub tap: String,
    pub mac: String,
    pub ipv4: String,
    pub gateway4: String,
    pub ipv6: String,
    pub gateway6: String,
    pub org_set: String,
}

/// The addresses of `slot` for `org` on `host`.
pub fn machine_net(host: &str, org: &str, slot: u16) -> MachineNet {
    let (h, o) = (short_id(host), short_id(org));
    let base = u32::from(slot) * 4;
    let v4 = |n: u32| {
        let a = base + n;
        format!("172.19.{}.{}", (a >> 8) & 0xff, a & 0xff)
    };
    MachineNet {
        tap: format!("al{h:04x}s{slot}"),
        mac: format!(
            "52:54:{:02x}:{:02x}:{:02x}:{:02x}",
            h >> 8,
            h & 0xff,
            slot >> 8,
            slot & 0xff
        ),
        ipv4: v4(2),
        gateway4: v4(1),
        ipv6: format!("fdaa:{o:x}:{h:x}:{slot:x}::2"),
        gateway6: format!("fdaa:{o:x}:{h:x}:{slot:x}::1"),
        org_set: format!("org{o:04x}"),
    }
}

fn table(host: &str) -> String {
    format!("aloft_{:04x}", short_id(host))
}

/// Forwarding on, and this host's nftables table: NAT for outbound IPv4 and the
/// isolation rule (a packet between two machine TAPs of different organisations is
/// dropped). Idempotent.
pub fn host_setup(host: &str) -> Result<(), NetError> {
    run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    run(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
    let t = table(host);
    let prefix = format!("al{:04x}s", short_id(host));
    let script = format!(
        "table inet {t} {{}}\n\
         delete table inet {t}\n\
         table inet {t} {{\n\
           set taps {{ type ifname; }}\n\
           map tap_org {{ type ifname : verdict; }}\n\
           chain forward {{ type filter hook forward priority 0; policy accept;\n\
             iifname @taps oifname @taps iifname vmap @tap_org\n\
           }}\n\
           chain postrouting {{ type nat hook postrouting priority 100; policy accept;\n\
             ip saddr 172.19.0.0/16 oifname != \"{prefix}*\" masquerade\n\
           }}\n\
         }}\n"
    );
    nft(&script)
}

fn nft(script: &str) -> Result<(), NetError> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| NetError {
            command: "nft -f -".into(),
            detail: e.to_string(),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| NetError {
        command: "nft -f -".into(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(NetError {
            command: format!("nft -f - <<{script}"),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Creates (or re-creates) the machine's TAP with the host-side addresses and puts it
/// in its organisation's isolation chain.
pub fn machine_up(host: &str, n: &MachineNet) -> Result<(), NetError> {
    let _ = run(&["ip", "link", "del", &n.tap]);
    run(&["ip", "tuntap", "add", "dev", &n.tap, "mode", "tap"])?;
    let _ = run(&[
        "sysctl",
        "-qw",
        &format!("net.ipv6.conf.{}.accept_dad=0", n.tap),
    ]);
    run(&[
        "ip",
        "addr",
        "add",
        &format!("{}/30", n.gateway4),
        "dev",
        &n.tap,
    ])?;
    run(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{}/112", n.gateway6),
        "dev",
        &n.tap,
        "nodad",
    ])?;
    run(&["ip", "link", "set", &n.tap, "up"])?;
    let t = table(host);
    let chain = &n.org_set;
    // One chain per organisation: traffic from one of its TAPs may only leave to
    // another of its TAPs.
    let script = format!(
        "add set inet {t} {chain} {{ type ifname; }}\n\
         add chain inet {t} {chain}\n\
         flush chain inet {t} {chain}\n\
         add rule inet {t} {chain} oifname != @{chain} drop\n\
         add element inet {t} {chain} {{ \"{tap}\" }}\n\
         add element inet {t} taps {{ \"{tap}\" }}\n\
         add element inet {t} tap_org {{ \"{tap}\" : jump {chain} }}\n",
        tap = n.tap
    );
    nft(&script)
}

/// Removes the machine's TAP and its place in the isolation rules.
pub fn machine_down(host: &str, n: &MachineNet) {
    let t = table(host);
    let _ = nft(&format!(
        "delete element inet {t} tap_org {{ \"{tap}\" }}\n",
        tap = n.tap
    ));
    let _ = nft(&format!(
        "delete element inet {t} taps {{ \"{tap}\" }}\n",
        tap = n.tap
    ));
    let _ = nft(&format!(
        "delete element inet {t} {} {{ \"{tap}\" }}\n",
        n.org_set,
        tap = n.tap
    ));
    let _ = run(&["ip", "link", "del", &n.tap]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_embed_org_host_and_slot() {
        let n = machine_net("ams-1", "personal", 3);
        let (h, o) = (short_id("ams-1"), short_id("personal"));
        assert_eq!(n.ipv6, format!("fdaa:{o:x}:{h:x}:3::2"));
        assert_eq!(n.gateway6, format!("fdaa:{o:x}:{h:x}:3::1"));
        assert_eq!(
            (n.ipv4.as_str(), n.gateway4.as_str()),
            ("172.19.0.14", "172.19.0.13")
        );
        assert!(n.tap.len() <= 15, "{}", n.tap);
        let other = machine_net("ams-1", "acme", 3);
        assert_ne!(n.org_set, other.org_set);
        assert_eq!(machine_net("ams-1", "personal", 300).ipv4, "172.19.4.178");
    }
}
