//! Parsers for the `/proc` files init reads: listening sockets and the OOM counter.

/// Local ports in LISTEN state in a `/proc/net/tcp` or `/proc/net/tcp6` text.
pub fn listening_ports(text: &str) -> Vec<u16> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _slot = fields.next()?;
            let local = fields.next()?;
            let _remote = fields.next()?;
            let state = fields.next()?;
            if state != "0A" {
                return None;
            }
            let (_, port) = local.rsplit_once(':')?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

/// The first of `wanted` that is listening in any of `texts`.
pub fn first_ready(wanted: &[u16], texts: &[&str]) -> Option<u16> {
    let listening: Vec<u16> = texts.iter().flat_map(|t| listening_ports(t)).collect();
    wanted.iter().copied().find(|p| listening.contains(p))
}

/// The `oom_kill` counter of `/proc/vmstat`.
pub fn oom_kills(vmstat: &str) -> Option<u64> {
    vmstat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == "oom_kill").then(|| v.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1235 1 0000000000000000 100 0 0 10 0
   2: 0200A8C0:1F91 0100A8C0:D431 01 00000000:00000000 00:00000000 00000000     0        0 1236 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn parses_listening_ports_v4_and_v6() {
        assert_eq!(listening_ports(TCP), vec![8080, 22]);
        assert_eq!(listening_ports(TCP6), vec![80]);
        assert_eq!(listening_ports(""), Vec::<u16>::new());
        assert_eq!(
            listening_ports("header\n garbage line\n"),
            Vec::<u16>::new()
        );
    }

    #[test]
    fn ready_only_on_listen_state() {
        assert_eq!(
            first_ready(&[8081], &[TCP, TCP6]),
            None,
            "8081 is ESTABLISHED only"
        );
        assert_eq!(first_ready(&[9999, 80], &[TCP, TCP6]), Some(80));
        assert_eq!(first_ready(&[8080, 80], &[TCP, TCP6]), Some(8080));
        assert_eq!(first_ready(&[], &[TCP]), None);
    }

    #[test]
    fn oom_counter() {
        assert_eq!(oom_kills("nr_free_pages 1\noom_kill 3\nfoo 2\n"), Some(3));
        assert_eq!(oom_kills("nr_free_pages 1\n"), None);
    }
}
