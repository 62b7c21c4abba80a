//! Health checks of started machines (tcp, http, and `exec` commands run in the guest,
//! from the machine config's `checks` and each service's `checks`), run by the agent on
//! their interval and published with the machine. A check with `unhealthy = "restart"`
//! that fails `failure_threshold` times in a row (after its grace period) restarts the
//! machine; the counts start again with the new boot.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aloft_types::machine::{
    CheckStatus, DEFAULT_FAILURE_THRESHOLD, MachineCheck, UNHEALTHY_RESTART,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::AgentApi;
use crate::agent::{Agent, now_ms, rfc3339};

/// Most bytes of a command check's output kept in its result.
const EXEC_OUTPUT_MAX: usize = 4096;

fn dur(s: &Option<String>, default: Duration) -> Duration {
    s.as_deref()
        .and_then(|t| aloft_types::appconfig::parse_go_duration(t).ok())
        .unwrap_or(default)
}

/// Runs forever, checking what is due once per second.
pub(crate) async fn run(agent: Agent) {
    let mut next: HashMap<(String, String), Instant> = HashMap::new();
    let mut results: HashMap<String, Vec<CheckStatus>> = HashMap::new();
    // Failed runs in a row per (machine, check).
    let mut failures: HashMap<(String, String), i64> = HashMap::new();
    // Machines being restarted for failing checks: not checked until that is done.
    let restarting: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let busy: HashSet<String> = match restarting.lock() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let machines: Vec<_> = agent
            .started_machines()
            .into_iter()
            .filter(|(_, m, _)| !busy.contains(&m.id))
            .collect();
        next.retain(|(id, _), _| machines.iter().any(|(_, m, _)| &m.id == id));
        failures.retain(|(id, _), _| machines.iter().any(|(_, m, _)| &m.id == id));
        results.retain(|id, _| machines.iter().any(|(_, m, _)| &m.id == id));
        for (app, m, extra) in machines {
            let mut restart_for: Option<String> = None;
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
                let (status, output) = if check.kind.as_deref() == Some("exec") {
                    exec_probe(&agent, &app, &m.id, &check, timeout).await
                } else {
                    match host_port {
                        None => (
                            "critical",
                            format!("port {port} is not reachable from the host"),
                        ),
                        Some((ip, p)) => probe(&ip, p, &check, timeout).await,
                    }
                };
                let failed = failures.entry((m.id.clone(), name.clone())).or_insert(0);
                *failed = if status == "passing" { 0 } else { *failed + 1 };
                let threshold = check
                    .failure_threshold
                    .filter(|n| *n > 0)
                    .unwrap_or(DEFAULT_FAILURE_THRESHOLD);
                // Once per streak: a restart refused (its budget used up) is not
                // asked for again until the check has passed.
                if check.unhealthy.as_deref() == Some(UNHEALTHY_RESTART)
                    && *failed == threshold
                    && restart_for.is_none()
                {
                    restart_for = Some(format!(
                        "health check {name} failed {failed} times in a row: {output}"
                    ));
                }
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
            if let Some(why) = restart_for {
                next.retain(|(id, _), _| id != &m.id);
                failures.retain(|(id, _), _| id != &m.id);
                if let Ok(mut r) = restarting.lock() {
                    r.insert(m.id.clone());
                }
                let (agent, restarting, id) = (agent.clone(), restarting.clone(), m.id.clone());
                tokio::spawn(async move {
                    agent.restart_unhealthy(&app, &id, &why).await;
                    if let Ok(mut r) = restarting.lock() {
                        r.remove(&id);
                    }
                });
            }
        }
    }
}

/// Runs a command check in the guest: exit 0 passes; the output is kept.
async fn exec_probe(
    agent: &Agent,
    app: &str,
    id: &str,
    check: &MachineCheck,
    timeout: Duration,
) -> (&'static str, String) {
    if check.command.is_empty() {
        return ("critical", "exec check without a command".to_string());
    }
    match agent.exec(app, id, check.command.clone(), timeout).await {
        Ok(out) => {
            let mut text = out.stdout;
            text.push_str(&out.stderr);
            let mut text = text.trim().to_string();
            if text.len() > EXEC_OUTPUT_MAX {
                let mut cut = EXEC_OUTPUT_MAX;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
            }
            if out.exit_code == 0 {
                ("passing", text)
            } else {
                ("critical", format!("exit code {}: {text}", out.exit_code))
            }
        }
        Err(e) => ("critical", e.to_string()),
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
