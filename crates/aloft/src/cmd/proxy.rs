//! `aloft proxy`: the edge proxy daemon (static routes file; catalog-fed later through
//! the same `Routes` table).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use aloft_proxy::{Listener, ProxyConfig, Routes, load_routes_file};
use aloft_types::datadir::DataDir;
use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Args, Debug)]
pub struct ProxyArgs {
    /// Address to listen on: `ADDR`, or `ADDR=PORT` to route its traffic as public
    /// port PORT (services name public ports). Repeatable.
    #[arg(long = "listen", required = true, value_name = "ADDR[=PORT]")]
    pub listen: Vec<String>,
    /// Static routes file (TOML: [[apps]], [[apps.services]], [[apps.machines]]).
    /// Re-read on SIGHUP; a bad file then keeps the routes in force.
    #[arg(long, value_name = "FILE")]
    pub routes: PathBuf,
    /// This proxy's region: its machines are preferred.
    #[arg(long, env = "FLY_REGION", default_value = "local")]
    pub region: String,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seconds to receive a request's headers; also the keep-alive idle timeout.
    #[arg(long, default_value_t = 30)]
    pub header_timeout_secs: u64,
    /// Largest request head in bytes (at least 8192); larger gets 431.
    #[arg(long, default_value_t = 32 * 1024)]
    pub max_header_bytes: usize,
    /// Most client connections at once.
    #[arg(long, default_value_t = 16 * 1024)]
    pub max_connections: usize,
    /// Milliseconds a request may wait for a machine below its hard limit before 503.
    #[arg(long, default_value_t = 1000)]
    pub queue_timeout_ms: u64,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 10)]
    pub drain_timeout_secs: u64,
}

fn parse_listen(s: &str) -> Result<(SocketAddr, Option<u16>)> {
    let (addr, port) = match s.rsplit_once('=') {
        Some((a, p)) => (
            a,
            Some(
                p.parse::<u16>()
                    .with_context(|| format!("--listen {s}: {p:?} is not a port"))?,
            ),
        ),
        None => (s, None),
    };
    let addr = addr
        .parse::<SocketAddr>()
        .with_context(|| format!("--listen {s}: {addr:?} is not an IP:port address"))?;
    Ok((addr, port))
}

pub fn run(args: ProxyArgs, _data_dir: &DataDir) -> Result<ExitCode> {
    let listens = args
        .listen
        .iter()
        .map(|s| parse_listen(s))
        .collect::<Result<Vec<_>>>()?;
    let routes = Arc::new(Routes::new(args.region.clone()));
    load_routes_file(&args.routes, &routes)?;

    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rt.worker_threads(n);
    }
    let rt = rt.build().context("cannot start the async runtime")?;
    rt.block_on(serve(args, listens, routes))
}

async fn serve(
    args: ProxyArgs,
    listens: Vec<(SocketAddr, Option<u16>)>,
    routes: Arc<Routes>,
) -> Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};

    let mut listeners = Vec::new();
    for (addr, port) in listens {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr().context("listener address")?;
        let public_port = port.unwrap_or(local.port());
        println!("aloft proxy: listening on {local} (public port {public_port})");
        listeners.push(Listener {
            listener,
            public_port,
        });
    }

    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let file = args.routes.clone();
    let reload_routes = Arc::clone(&routes);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match load_routes_file(&file, &reload_routes) {
                Ok(()) => tracing::warn!(file = %file.display(), "routes reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "routes not reloaded; keeping the current ones")
                }
            }
        }
    });

    let cfg = ProxyConfig {
        header_read_timeout: Duration::from_secs(args.header_timeout_secs.max(1)),
        max_header_bytes: args.max_header_bytes,
        max_connections: args.max_connections.max(1),
        queue_timeout: Duration::from_millis(args.queue_timeout_ms),
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        ..ProxyConfig::default()
    };
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        eprintln!("aloft proxy: draining");
    };
    let report = aloft_proxy::serve(listeners, routes, cfg, shutdown).await;
    if report.cut_at_drain > 0 {
        eprintln!(
            "aloft proxy: {} connection(s) still open after the drain timeout",
            report.cut_at_drain
        );
    }
    Ok(ExitCode::SUCCESS)
}
