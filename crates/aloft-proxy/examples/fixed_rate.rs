//! Open-loop fixed-rate HTTP/1.1 load for `cargo xtask bench proxy`.
//!
//! `fixed_rate ADDR RATE SECS CONNECTIONS`: request i is due at start + i/RATE and is
//! sent on the next free keep-alive connection; its latency is measured from the due
//! time, so a stalled server is charged for the requests it delayed (no coordinated
//! omission). Prints one JSON line: {"p50_ms", "p99_ms", "requests", "achieved_rps"}.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("usage: fixed_rate ADDR RATE SECS CONNECTIONS ({0})")]
    Usage(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP to {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("{addr} answered {status}")]
    Status {
        addr: SocketAddr,
        status: http::StatusCode,
    },
    #[error("no request completed")]
    Empty,
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, LoadError> {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| LoadError::Usage(format!("bad or missing {what}")))
}

async fn connection(
    addr: SocketAddr,
    next: Arc<AtomicU64>,
    total: u64,
    rate: f64,
    start: tokio::time::Instant,
) -> Result<Vec<f64>, LoadError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| LoadError::Connect { addr, source })?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| LoadError::Http { addr, source })?;
    tokio::spawn(conn);
    let mut lat = Vec::new();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            return Ok(lat);
        }
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        sender
            .ready()
            .await
            .map_err(|source| LoadError::Http { addr, source })?;
        let mut req = http::Request::new(Empty::<Bytes>::new());
        req.headers_mut().insert(
            http::header::HOST,
            http::HeaderValue::from_static("bench.test"),
        );
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| LoadError::Http { addr, source })?;
        if !resp.status().is_success() {
            return Err(LoadError::Status {
                addr,
                status: resp.status(),
            });
        }
        resp.into_body()
            .collect()
            .await
            .map_err(|source| LoadError::Http { addr, source })?;
        lat.push(due.elapsed().as_secs_f64() * 1000.0);
    }
}

async fn run(args: Vec<String>) -> Result<(), LoadError> {
    let addr: SocketAddr = arg(&args, 1, "ADDR")?;
    let rate: f64 = arg(&args, 2, "RATE")?;
    let secs: f64 = arg(&args, 3, "SECS")?;
    let conns: usize = arg(&args, 4, "CONNECTIONS")?;
    if rate <= 0.0 || secs <= 0.0 || conns == 0 {
        return Err(LoadError::Usage(
            "RATE, SECS and CONNECTIONS must be > 0".into(),
        ));
    }
    let total = (rate * secs) as u64;
    let next = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        tasks.spawn(connection(addr, Arc::clone(&next), total, rate, start));
    }
    let mut all = Vec::with_capacity(total as usize);
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(lat) => all.extend(lat?),
            Err(e) => return Err(LoadError::Usage(format!("client task failed: {e}"))),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if all.is_empty() {
        return Err(LoadError::Empty);
    }
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| all[((all.len() - 1) as f64 * p).round() as usize];
    println!(
        "{}",
        serde_json::json!({
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "requests": all.len(),
            "achieved_rps": all.len() as f64 / elapsed,
        })
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fixed_rate: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(std::env::args().collect())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fixed_rate: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
