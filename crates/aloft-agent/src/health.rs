//! Health checks of started machines (tcp and http, from the machine config's
//! `checks` and each service's `checks`), run by the agent on their interval and
//! published with the machine.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aloft_types::machine::{CheckStatus, MachineCheck};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agent::{Agent, now_ms, rfc3339};

fn dur(s: &Option<String>, default: Duration) -> Duration {
    s.as_deref()
        .and_then(|t| aloft_types::appconfig::parse_go_duration(t).ok())
        .unwrap_or(default)
}

/// Runs forever, checking what is due once per second.
pub(crate) async fn run(agent: Agent) {
    let mut next: HashMap<(String, String), Instant> = HashMap::new();
    let mut results: HashMap<String, Vec<CheckStatus>> = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let machines = agent.started_machines();
        next.retain(|(id, _), _| machines.iter().any(|(_, m, _)| &m.id == id));
        results.retain(|id, _| machines.iter().any(|(_, m, _)| &m.id == id));
        for (app, m, extra) in machines {
            let mut checks: Vec<(String, MachineCheck, i64)> = m
                .config
                .checks
                .iter()
                .map(|(name, c)| (name.clone(), c.clone(), c.port.unwrap_or(0)))
                .collect();
            for (si, s) in m.config.services.iter().enumerate() {
                for (ci, c) in s.checks.iter().enumerate() {
                    let kind = c.kind.clone().unwrap_or_else(|| "tcp".into());
                    checks.push((
                        format!("servicecheck-{si:02}-{kind}-{ci}"),
                        c.clone(),
                        s.internal_port,
                    ));
                }
            }
            if checks.is_empty() {
                continue;
            }
            let mut changed = false;
            let current = results.entry(m.id.clone()).or_default();
            for (name, check, port) in checks {
                let key = (m.id.clone(), name.clone());
                let now = Instant::now();
                let due = *next
                    .entry(key.clone())
                    .or_insert_with(|| now + dur(&check.grace_period, Duration::ZERO));
                if now < due {
                    continue;
                }
                next.insert(
                    key,
                    now + dur(&check.interval, Duration::from_secs(15)).max(Duration::from_secs(1)),
                );
                let host_port = extra
                    .forwards
                    .iter()
                    .find(|(g, _)| i64::from(*g) == port)
                    .map(|(g, h)| agent.target(&extra, *g, *h));
                let timeout =
                    dur(&check.timeout, Duration::from_secs(2)).min(Duration::from_secs(60));
                let (status, output) = match host_port {
                    None => (
                        "critical",
                        format!("port {port} is not reachable from the host"),
                    ),
                    Some((ip, p)) => probe(&ip, p, &check, timeout).await,
                };
                let entry = CheckStatus {
                    name: name.clone(),
                    status: status.to_string(),
                    output,
                    updated_at: rfc3339(now_ms()),
                };
                match current.iter_mut().find(|c| c.name == name) {
                    Some(c) => {
                        changed |= c.status != entry.status;
                        *c = entry;
                    }
                    None => {
                        changed = true;
                        current.push(entry);
                    }
                }
            }
            if changed {
                agent.set_checks(&app, &m.id, current.clone()).await;
            }
        }
    }
}

async fn probe(
    addr: &str,
    port: u16,
    check: &MachineCheck,
    timeout: Duration,
) -> (&'static str, String) {
    let attempt = async {
        let mut conn = tokio::net::TcpStream::connect((addr, port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        if check.kind.as_deref() != Some("http") {
            return Ok("connected".to_string());
        }
        let method = check.method.clone().unwrap_or_else(|| "GET".into());
        let path = check.path.clone().unwrap_or_else(|| "/".into());
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nUser-Agent: aloft-health\r\n"
        );
        for h in &check.headers {
            for v in &h.values {
                req.push_str(&format!("{}: {v}\r\n", h.name));
            }
        }
        req.push_str("\r\n");
        conn.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = vec![0u8; 4096];
        let mut got = 0;
        while got < buf.len() {
            let n = conn
                .read(&mut buf[got..])
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            got += n;
            if buf[..got].windows(2).any(|w| w == b"\r\n") {
                break;
            }
        }
        let head = String::from_utf8_lossy(&buf[..got]);
        let status_line = head.lines().next().unwrap_or("").to_string();
        let code: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if (200..400).contains(&code) {
            Ok(status_line)
        } else {
            Err(format!("unexpected response: {status_line:?}"))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(out)) => ("passing", out),
        Ok(Err(e)) => ("critical", e),
        Err(_) => ("critical", format!("timed out after {timeout:?}")),
    }
}
