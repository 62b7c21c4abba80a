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
    /// Admin listener serving Prometheus `GET /metrics` (not routed to apps).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Unix socket for hitless reload: a new `aloft proxy` started with the same path
    /// takes over the listening sockets of the running one, which then stops
    /// accepting and drains (no connection is refused or reset).
    #[arg(long, value_name = "PATH")]
    pub handoff_socket: Option<PathBuf>,
    /// A certificate served by SNI on TLS ports: `HOSTNAME=CERT_PEM,KEY_PEM`
    /// (`*.domain` covers one label). Repeatable; adds to the routes file's `[[certs]]`.
    #[arg(long = "cert", value_name = "HOST=CERT,KEY")]
    pub certs: Vec<String>,
    /// A public port served as TLS (then HTTP) even when no service names it with
    /// `tls`. Repeatable.
    #[arg(long = "tls-port", value_name = "PORT")]
    pub tls_ports: Vec<u16>,
    /// ACME: certificates of the catalog (`<data-dir>`'s SQLite catalog) issued and
    /// renewed by this proxy, served with the catalog's other certificates.
    #[command(flatten)]
    pub acme: super::certs::AcmeArgs,
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

pub fn run(args: ProxyArgs, data_dir: &DataDir) -> Result<ExitCode> {
    let acme = args.acme.config()?.map(|cfg| (cfg, data_dir.catalog_db()));
    let listens = args
        .listen
        .iter()
        .map(|s| parse_listen(s))
        .collect::<Result<Vec<_>>>()?;
    let routes = Arc::new(Routes::new(args.region.clone()));
    load_routes_file(&args.routes, &routes)?;
    for c in &args.certs {
        let (host, files) = c
            .split_once('=')
            .and_then(|(h, f)| Some((h, f.split_once(',')?)))
            .with_context(|| format!("--cert {c}: expected HOSTNAME=CERT_PEM,KEY_PEM"))?;
        let spec = aloft_proxy::tls::CertSpec {
            hostname: host.to_string(),
            cert: files.0.into(),
            key: files.1.into(),
        };
        for (name, key) in aloft_proxy::tls::load_cert_files(&[spec], std::path::Path::new("."))? {
            routes.certs().insert_file(&name, key);
        }
    }

    // One thread: a current-thread runtime polls the sockets and runs the requests on
    // the same thread: no cross-thread wake-ups or work-stealing bookkeeping.
    let mut rt = match args.threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    rt.enable_all();
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        if n > 1 {
            rt.worker_threads(n);
        }
    }
    let rt = rt.build().context("cannot start the async runtime")?;
    rt.block_on(serve(args, listens, routes, acme))
}

async fn serve(
    args: ProxyArgs,
    listens: Vec<(SocketAddr, Option<u16>)>,
    routes: Arc<Routes>,
    acme: Option<(aloft_proxy::acme::AcmeConfig, std::path::PathBuf)>,
) -> Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};

    // reload: take the listening sockets over from a running proxy, if one answers.
    let mut inherited = match &args.handoff_socket {
        Some(path) => aloft_proxy::reload::inherit(path)?,
        None => None,
    };
    let mut bind = async |addr: SocketAddr, what: &str| -> Result<tokio::net::TcpListener> {
        if let Some(l) = inherited.as_mut().and_then(|i| i.take(addr)) {
            println!("aloft proxy: took over {addr} from the running proxy");
            return tokio::net::TcpListener::from_std(l)
                .with_context(|| format!("inherited listener {addr}"));
        }
        tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}{what}"))
    };
    let mut listeners = Vec::new();
    for (addr, port) in listens {
        let listener = bind(addr, "").await?;
        let local = listener.local_addr().context("listener address")?;
        let public_port = port.unwrap_or(local.port());
        println!("aloft proxy: listening on {local} (public port {public_port})");
        listeners.push(Listener {
            listener,
            public_port,
        });
    }

    let mut handoff_fds = aloft_proxy::reload::raw_listeners(
        &listeners.iter().map(|l| &l.listener).collect::<Vec<_>>(),
    );
    let (admin_stop_tx, admin_stop_rx) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = args.metrics_listen {
        let l = bind(addr, " for metrics").await?;
        let local = l.local_addr().context("metrics listener address")?;
        println!("aloft proxy: metrics on http://{local}/metrics");
        handoff_fds.extend(aloft_proxy::reload::raw_listeners(&[&l]));
        tokio::spawn(aloft_proxy::metrics::serve_admin(l, async move {
            let _ = admin_stop_rx.await;
        }));
    }
    // reload: the old proxy drains once this one serves; then offer the same to the
    // next one.
    let (handed_tx, handed_rx) = tokio::sync::oneshot::channel::<()>();
    if let Some(path) = &args.handoff_socket {
        if let Some(i) = inherited.take() {
            let left = i.remaining();
            if !left.is_empty() {
                // Taking over would leave these addresses unserved once the old one
                // drains; without `ready` it keeps serving everything.
                bail!(
                    "the running proxy also listens on {left:?}: start the new one with the \
                     same --listen and --metrics-listen addresses"
                );
            }
            i.ready()?;
        }
        let handoff = aloft_proxy::reload::Handoff::bind(path)?;
        tokio::spawn(async move {
            let handed = handoff.next_successor(&handoff_fds).await;
            eprintln!(
                "aloft proxy: handed {} listener(s) to a new proxy; draining",
                handed.0.len()
            );
            let _ = handed_tx.send(());
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

    // acme: issue and renew the catalog's certificates; serve them and the challenges.
    let acme_challenges = match acme {
        Some((acme_cfg, db)) => {
            let store: Arc<dyn aloft_store::Store> = Arc::new(
                aloft_store::SqliteStore::open(&db)
                    .await
                    .with_context(|| format!("cannot open the catalog {}", db.display()))?,
            );
            tokio::spawn(aloft_proxy::tls::follow_certs(
                store.clone(),
                Arc::clone(routes.certs()),
            ));
            println!(
                "aloft proxy: ACME certificates from {} ({})",
                acme_cfg.directory_url,
                db.display()
            );
            Some(aloft_proxy::acme::start(
                store,
                acme_cfg,
                Some(Arc::clone(routes.certs())),
            ))
        }
        None => None,
    };
    let cfg = ProxyConfig {
        header_read_timeout: Duration::from_secs(args.header_timeout_secs.max(1)),
        max_header_bytes: args.max_header_bytes,
        max_connections: args.max_connections.max(1),
        queue_timeout: Duration::from_millis(args.queue_timeout_ms),
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        tls_ports: Arc::from(args.tls_ports.clone()),
        acme_challenges,
        ..ProxyConfig::default()
    };
    let mut quit = signal(SignalKind::quit()).context("cannot watch SIGQUIT")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => eprintln!("aloft proxy: draining"),
            _ = int.recv() => eprintln!("aloft proxy: draining"),
            _ = quit.recv() => eprintln!("aloft proxy: draining"),
            Ok(()) = handed_rx => {},
        }
        let _ = admin_stop_tx.send(());
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
