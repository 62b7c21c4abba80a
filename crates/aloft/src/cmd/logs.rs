//! `aloft logs [--machine ID] [--region R] [--since 10m] [-f]`: the app's machine logs
//! from the API's logs endpoint (`GET /v1/apps/{app}/logs`), followed by polling.

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aloft_types::datadir::DataDir;
use anyhow::{Context, Result, anyhow};
use clap::Args;
use serde::{Deserialize, Serialize};

use super::client::{Api, ApiError, block_on, enc};
use super::common::{AppArgs, parse_duration};

#[derive(Args, Debug)]
pub struct LogsArgs {
    #[command(flatten)]
    pub common: AppArgs,
    /// Only this machine.
    #[arg(short = 'i', long = "machine", alias = "instance")]
    pub machine: Option<String>,
    /// Only this region.
    #[arg(short = 'r', long)]
    pub region: Option<String>,
    /// Only lines newer than this (`10m`, `1h`).
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// Keep printing new lines.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Print what is there and stop (the default unless -f).
    #[arg(long, conflicts_with = "follow")]
    pub no_tail: bool,
}

/// One log line (the agent's `LogLine`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    #[serde(default)]
    pub machine_id: String,
    #[serde(default)]
    pub region: String,
    /// Unix milliseconds.
    #[serde(default)]
    pub timestamp: i64,
    #[serde(default)]
    pub stream: String,
    #[serde(default)]
    pub message: String,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Lines of the app (or one machine) since `since_ms`, oldest first.
pub async fn fetch_logs(
    api: &Api,
    app: &str,
    machine: Option<&str>,
    since_ms: Option<i64>,
) -> Result<Vec<LogLine>> {
    fetch(api, app, machine, None, since_ms).await
}

async fn fetch(
    api: &Api,
    app: &str,
    machine: Option<&str>,
    region: Option<&str>,
    since_ms: Option<i64>,
) -> Result<Vec<LogLine>> {
    let mut q = Vec::new();
    if let Some(m) = machine {
        q.push(format!("machine_id={}", enc(m)));
    }
    if let Some(r) = region {
        q.push(format!("region={}", enc(r)));
    }
    if let Some(s) = since_ms {
        q.push(format!("since={s}"));
    }
    let path = if q.is_empty() {
        format!("/apps/{}/logs", enc(app))
    } else {
        format!("/apps/{}/logs?{}", enc(app), q.join("&"))
    };
    let v: serde_json::Value = match api.get(&path).await {
        Ok(v) => v,
        Err(e @ ApiError::Status { status: 404, .. })
            if e.to_string().contains("no such API route") =>
        {
            return Err(anyhow!(e).context(format!(
                "the API at {} has no logs endpoint (GET /v1/apps/{{app}}/logs)",
                api.base()
            )));
        }
        Err(e) => return Err(anyhow!(e).context(format!("logs of app {app}"))),
    };
    // A bare array, or `{"lines": [...]}` / `{"data": [...]}`.
    let arr = match v {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(mut o) => match o.remove("lines").or_else(|| o.remove("data")) {
            Some(serde_json::Value::Array(a)) => a,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    let mut lines: Vec<LogLine> = arr
        .into_iter()
        .map(serde_json::from_value)
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading the logs of app {app}"))?;
    lines.sort_by_key(|l| l.timestamp);
    Ok(lines)
}

fn format_ts(ms: i64) -> String {
    // RFC 3339 in UTC without pulling in a date crate.
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
}

fn print_line(l: &LogLine, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(l)?);
    } else {
        println!(
            "{} app[{}] {} [{}] {}",
            format_ts(l.timestamp),
            l.machine_id,
            l.region,
            l.stream,
            l.message.trim_end()
        );
    }
    Ok(())
}

pub fn run(args: LogsArgs, data_dir: &DataDir) -> Result<ExitCode> {
    let app = args.common.app()?;
    let api = Api::connect(data_dir)?;
    let json = args.common.json;
    block_on(async move {
        let mut since = args
            .since
            .map(|d| now_ms() - i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2));
        let mut seen: HashSet<(i64, String, String)> = HashSet::new();
        loop {
            let lines = fetch(
                &api,
                &app,
                args.machine.as_deref(),
                args.region.as_deref(),
                since,
            )
            .await?;
            for l in &lines {
                if seen.insert((l.timestamp, l.machine_id.clone(), l.message.clone())) {
                    print_line(l, json)?;
                }
            }
            if !args.follow {
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(last) = lines.last() {
                // Same-millisecond lines may arrive later: ask from that millisecond
                // again and drop what was printed.
                since = Some(last.timestamp);
                seen.retain(|(t, _, _)| *t >= last.timestamp);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            }
        }
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(format_ts(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ts(1_764_072_000_123), "2025-11-25T12:00:00.123Z");
    }
}
