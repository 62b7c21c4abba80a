//! Parsers for the `/proc` files init reads: listening sockets, the OOM counter, and
//! the process list (`ps`) with memory counters.

use aloft_types::guest::{ListenSocket, ProcessStat};

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

/// Kernel clock ticks per second as reported in `/proc/<pid>/stat` (USER_HZ, 100 on
/// every Linux architecture Aloft boots).
const TICKS_PER_SEC: u64 = 100;
const PAGE_SIZE: u64 = 4096;

/// The fields of `/proc/<pid>/stat` that `ps` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub comm: String,
    pub utime_ticks: u64,
    pub stime_ticks: u64,
    pub start_ticks: u64,
    pub rss_pages: u64,
}

/// Parses `/proc/<pid>/stat` (the command name may hold spaces and parentheses).
pub fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); field n is rest[n - 3].
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        comm,
        utime_ticks: field(14)?,
        stime_ticks: field(15)?,
        start_ticks: field(22)?,
        rss_pages: field(24)?,
    })
}

/// The `n` tasks that used the most CPU, as "comm ms" (ticks are USER_HZ, so 10 ms
/// steps), for the boot timeline: where the guest's CPU went before the app was ready.
pub fn busiest(stats: impl IntoIterator<Item = Stat>, n: usize) -> Vec<String> {
    let mut used: Vec<(u64, String)> = stats
        .into_iter()
        .map(|s| (s.utime_ticks + s.stime_ticks, s.comm))
        .filter(|(ticks, _)| *ticks > 0)
        .collect();
    used.sort_by_key(|u| std::cmp::Reverse(u.0));
    used.into_iter()
        .take(n)
        .map(|(ticks, comm)| format!("{comm} {}ms", ticks * 1000 / TICKS_PER_SEC))
        .collect()
}

/// Seconds since boot, from `/proc/uptime`, in milliseconds.
pub fn uptime_ms(text: &str) -> Option<u64> {
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((secs * 1000.0) as u64)
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, in kB.
pub fn meminfo(text: &str) -> (u64, u64) {
    let get = |key: &str| {
        text.lines()
            .find_map(|l| {
                let v = l.strip_prefix(key)?.strip_prefix(':')?;
                v.split_whitespace().next()?.parse::<u64>().ok()
            })
            .unwrap_or(0)
    };
    (get("MemTotal"), get("MemAvailable"))
}

fn hex_addr(hex: &str) -> Option<String> {
    let (ip, port) = hex.rsplit_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    match ip.len() {
        8 => {
            let n = u32::from_str_radix(ip, 16).ok()?;
            let ip = std::net::Ipv4Addr::from(n.swap_bytes());
            Some(format!("{ip}:{port}"))
        }
        32 => {
            let mut bytes = [0u8; 16];
            for w in 0..4 {
                let n = u32::from_str_radix(ip.get(w * 8..w * 8 + 8)?, 16).ok()?;
                bytes[w * 4..w * 4 + 4].copy_from_slice(&n.swap_bytes().to_be_bytes());
            }
            Some(format!("[{}]:{port}", std::net::Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// Listening sockets of a `/proc/net/{tcp,tcp6,udp,udp6}` text as (inode, socket):
/// TCP in LISTEN state, UDP unconnected.
pub fn listen_sockets(proto: &str, text: &str) -> Vec<(u64, ListenSocket)> {
    let listening = if proto.starts_with("udp") { "07" } else { "0A" };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) != Some(&listening) {
                return None;
            }
            let inode = f.get(9)?.parse::<u64>().ok()?;
            let address = hex_addr(f.get(1)?)?;
            Some((
                inode,
                ListenSocket {
                    proto: proto.to_string(),
                    address,
                },
            ))
        })
        .collect()
}

/// Each process directory of `proc_dir` with its pid and parsed `stat`; processes
/// that vanish meanwhile are skipped.
pub fn process_stats(
    proc_dir: &std::path::Path,
) -> impl Iterator<Item = (i32, std::path::PathBuf, Stat)> {
    std::fs::read_dir(proc_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let dir = entry.path();
            let stat = parse_stat(&std::fs::read_to_string(dir.join("stat")).ok()?)?;
            Some((pid, dir, stat))
        })
}

/// Reads every process of `/proc` (as `ps` shows them) and the memory counters
/// (`MemTotal`, `MemAvailable` in kB). Processes that vanish meanwhile are skipped.
pub fn processes(proc_dir: &std::path::Path) -> (Vec<ProcessStat>, u64, u64) {
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let now_ms = uptime_ms(&read(proc_dir.join("uptime"))).unwrap_or(0);
    let mut sockets: Vec<(u64, ListenSocket)> = Vec::new();
    for proto in ["tcp", "tcp6", "udp", "udp6"] {
        sockets.extend(listen_sockets(
            proto,
            &read(proc_dir.join("net").join(proto)),
        ));
    }
    let ms = |ticks: u64| ticks * 1000 / TICKS_PER_SEC;
    let mut out = Vec::new();
    for (pid, dir, stat) in process_stats(proc_dir) {
        let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
        let command = if cmdline.is_empty() {
            format!("[{}]", stat.comm)
        } else {
            cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let directory = std::fs::read_link(dir.join("cwd"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let mut listen = Vec::new();
        for fd in std::fs::read_dir(dir.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            for (_, s) in sockets.iter().filter(|(i, _)| *i == inode) {
                if !listen.contains(s) {
                    listen.push(s.clone());
                }
            }
        }
        out.push(ProcessStat {
            pid,
            command,
            cpu: ms(stat.utime_ticks + stat.stime_ticks),
            rss: stat.rss_pages * PAGE_SIZE,
            rtime: now_ms.saturating_sub(ms(stat.start_ticks)),
            stime: ms(stat.stime_ticks),
            directory,
            listen_sockets: listen,
        });
    }
    out.sort_by_key(|p| p.pid);
    let (total, available) = meminfo(&read(proc_dir.join("meminfo")));
    (out, total, available)
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
    fn busiest_tasks_come_first() {
        let stat = |comm: &str, utime_ticks, stime_ticks| Stat {
            comm: comm.into(),
            utime_ticks,
            stime_ticks,
            start_ticks: 0,
            rss_pages: 0,
        };
        let tasks = [
            stat("idle", 0, 0),
            stat("init", 2, 5),
            stat("jbd2/vda-8", 0, 9),
            stat("app", 1, 0),
        ];
        assert_eq!(busiest(tasks, 2), ["jbd2/vda-8 90ms", "init 70ms"]);
    }

    #[test]
    fn oom_counter() {
        assert_eq!(oom_kills("nr_free_pages 1\noom_kill 3\nfoo 2\n"), Some(3));
        assert_eq!(oom_kills("nr_free_pages 1\n"), None);
    }

    #[test]
    fn parses_stat_with_odd_command_names() {
        let text = "42 (my (odd) app) S 1 42 42 0 -1 4194560 100 0 0 0 250 30 0 0 20 0 1 0 500 12345678 321 18446744073709551615";
        let s = parse_stat(text).unwrap();
        assert_eq!(s.comm, "my (odd) app");
        assert_eq!((s.utime_ticks, s.stime_ticks), (250, 30));
        assert_eq!((s.start_ticks, s.rss_pages), (500, 321));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn parses_meminfo_and_uptime() {
        let m = "MemTotal:         236000 kB\nMemFree:  1000 kB\nMemAvailable:     180000 kB\n";
        assert_eq!(meminfo(m), (236000, 180000));
        assert_eq!(meminfo(""), (0, 0));
        assert_eq!(uptime_ms("12.34 20.00\n"), Some(12340));
    }

    #[test]
    fn listen_sockets_carry_inode_and_address() {
        let v4 = listen_sockets("tcp", TCP);
        assert_eq!(v4.len(), 2);
        assert_eq!(v4[0].0, 1234);
        assert_eq!(v4[0].1.address, "0.0.0.0:8080");
        assert_eq!(v4[1].1.address, "127.0.0.1:22");
        let v6 = listen_sockets("tcp6", TCP6);
        assert_eq!(v6[0].1.address, "[::]:80");
        assert_eq!(v6[0].1.proto, "tcp6");
    }

    #[test]
    fn reads_this_hosts_processes() {
        let (ps, total, _) = processes(std::path::Path::new("/proc"));
        let me = ps
            .iter()
            .find(|p| p.pid == std::process::id() as i32)
            .expect("this test's own process");
        assert!(me.rss > 0 && !me.directory.is_empty(), "{me:?}");
        assert!(total > 0);
    }
}
